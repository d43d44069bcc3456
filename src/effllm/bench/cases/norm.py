"""RMSNorm: effllm.kernels.rms_norm against the explicit formula transformers' Llama uses."""

from __future__ import annotations

import torch

from ...kernels import rms_norm, rms_norm_reference
from ..registry import Setup, case

_SHAPES = [{"T": 1, "N": 576}, {"T": 2048, "N": 576}, {"T": 4096, "N": 4096}]


def _hf_llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@case("rms_norm", shapes=_SHAPES, dtypes=("float32", "bfloat16"), baseline="hf-eager",
      description="RMSNorm over T tokens of width N; effllm vs transformers' eager formula")
def rms_norm_case(shape, dtype, device) -> Setup:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape["T"], shape["N"], generator=gen).to(device, dtype)
    w = (1 + 0.1 * torch.randn(shape["N"], generator=gen)).to(device, dtype)
    eps = 1e-5
    return Setup(
        providers={"effllm": lambda: rms_norm(x, w, eps), "hf-eager": lambda: _hf_llama_rms_norm(x, w, eps)},
        reference=lambda: rms_norm_reference(x, w, eps),
        same_dtype_reference=lambda: _hf_llama_rms_norm(x, w, eps),
        bytes_moved=2 * x.numel() * x.element_size(),
    )
