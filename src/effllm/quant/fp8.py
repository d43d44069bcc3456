"""FP8 e4m3 (W8A8 with dynamic activation scales, or weight-only): the ``Fp8`` config and
``Fp8Linear``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .base import QuantLinear
from .formats import FP8_WEIGHT_GRANULARITIES
from .registry import QuantConfig, register


@dataclass(frozen=True)
class Fp8(QuantConfig):
    """FP8 e4m3 weights (scale per tensor, output row or 128x128 block) and, unless
    ``activations=None``, dynamically quantized activations (per token or per 1x128 block).

    ``gptq=True`` rounds the weights with error compensation (``effllm.quant.gptq``) on the
    same scales, from the input statistics of calibration batches (``quantize_(...,
    calibration=...)``); the stored format does not change.

    The default quantizes activations because that is the fast GPU path; it costs more quality
    than weight-only or ``gptq=True`` (each config's measured cost: docs/quantization.md)."""

    weights: str = "row"
    activations: str | None = "token"
    gptq: bool = False
    version: int = 1

    def __post_init__(self):
        if self.weights not in FP8_WEIGHT_GRANULARITIES:
            raise ValueError(f"Fp8: weights must be one of {FP8_WEIGHT_GRANULARITIES}, got {self.weights!r}")
        if self.activations not in ("token", "block", None):
            raise ValueError(f"Fp8: activations must be 'token', 'block' or None, got {self.activations!r}")



@register(Fp8)
class Fp8Linear(QuantLinear):
    """FP8 e4m3 linear (W8A8 with dynamic activation scales, or weight-only).

    Compute:

    - CUDA with Triton and quantized activations: bf16 activations with per-token scales and
      tensor/row weight scales go to ``torch._scaled_mm`` (cuBLASLt); other cases to effllm's
      Triton FP8 GEMM (``effllm.kernels.triton.fp8_gemm``).
    - Weight-only (``activations=None``), on CUDA too: there is no weight-only FP8 kernel;
      every call dequantizes the *whole* weight to float32 and runs ``F.linear`` in float32.
      It saves memory, not time.
    - CPU: a storage format. Weights (and activations, if configured) are quantized exactly as
      on GPU, then dequantized and multiplied in float32.
    """

    def __init__(self, in_features, out_features, bias=True, *, config: Fp8 = Fp8(), dtype=torch.float32,
                 device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.config = config
        block = formats.FP8_BLOCK
        scale_shape = {"tensor": (1, 1), "row": (out_features, 1),
                       "block": (-(-out_features // block), -(-in_features // block))}[config.weights]
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=formats.FP8_DTYPE,
                                                    device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Fp8, *, hessian: torch.Tensor | None = None) -> Fp8Linear:
        """``hessian``: the input statistics ``X^T X / rows`` for ``config.gptq``."""
        if config.gptq and hessian is None:
            raise ValueError("Fp8(gptq=True) needs calibration: pass calibration=... to quantize_")
        module = cls._empty_like(linear, config)
        q, scales = formats.fp8_quantize(linear.weight.detach(), config.weights)
        if config.gptq:
            from .gptq import gptq_round

            n, k = q.shape
            grid = formats.expand_scales(scales, n, k).expand(n, k).cpu()  # the RTN scales: the grid stays

            def round_column(col, j):
                s = grid[:, j]
                return (col / s).clamp_(-formats.FP8_MAX, formats.FP8_MAX).to(formats.FP8_DTYPE).float() * s

            rounded = gptq_round(linear.weight, hessian, round_column)
            q = (rounded / grid).to(formats.FP8_DTYPE).to(q.device)
        module.qweight.copy_(q)
        module.weight_scale.copy_(scales)
        return module

    def dequantize(self, dtype=None):
        return formats.fp8_dequantize(self.qweight, self.weight_scale, dtype=dtype or self.dtype)

    def _matmul(self, x2):
        if self._choose(x2) == "triton" and self.config.activations is not None:
            from ..kernels.triton.fp8_gemm import fp8_matmul

            if x2.is_cuda and self.config.activations == "token":
                # one kernel instead of five torch passes over x (bit-exact with them)
                from ..kernels.triton.fp8_quant import fp8_quantize_rows

                xq, xs = fp8_quantize_rows(x2)
            else:
                xq, xs = formats.fp8_quantize_activations(x2, self.config.activations)
            if x2.is_cuda:
                out = fp8_scaled_mm(xq, xs, self.qweight, self.weight_scale, out_dtype=x2.dtype)
                if out is not None:
                    return out
            return fp8_matmul(xq, xs, self.qweight, self.weight_scale, out_dtype=x2.dtype)
        # Storage format: quantize activations as the GPU kernel would, multiply dequantized in fp32.
        if self.config.activations is not None:
            xq, xs = formats.fp8_quantize_activations(x2, self.config.activations)
            x2 = _dequantize_activations(xq, xs)
        return F.linear(x2.float(), self.dequantize(torch.float32))

    def _format_repr(self):
        acts = f"activations={self.config.activations}" if self.config.activations else "weight-only"
        return f"fp8 e4m3 weights={self.config.weights} {acts}"


def fp8_scaled_mm(xq: torch.Tensor, x_scales: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, *,
                  out_dtype: torch.dtype) -> torch.Tensor | None:
    """``torch._scaled_mm`` (cuBLASLt's FP8 GEMM on CUDA) for per-token activation scales
    ``(M, 1)`` with per-tensor or per-row weight scales, or None where it does not apply: block
    scales, K or N not a multiple of 16 (cuBLASLt's alignment), an output other than bf16 (its
    row-wise scaling writes bf16 only; fp32/fp16 callers keep effllm's Triton kernel)."""
    m, k = xq.shape
    n = qweight.shape[0]
    if out_dtype != torch.bfloat16 or x_scales.shape != (m, 1) or weight_scale.shape not in ((1, 1), (n, 1)):
        return None
    if k % 16 or n % 16:
        return None
    scale_b = weight_scale.reshape(1, -1).expand(1, n).contiguous()
    return torch._scaled_mm(xq, qweight.t(), scale_a=x_scales.contiguous(), scale_b=scale_b, out_dtype=out_dtype)


def _dequantize_activations(xq: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    k = xq.shape[1]
    if scales.shape[1] != 1:
        scales = scales.repeat_interleave(formats.FP8_BLOCK, 1)[:, :k]
    return xq.float() * scales
