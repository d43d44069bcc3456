"""Prefill attention: effllm.kernels.attention against torch SDPA (and flash-attn when installed)."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ...kernels import attention, attention_reference
from ..registry import Setup, case

# SmolLM2-135M (9/3 heads, D 64) and a Llama-3-8B layer (32/8 heads, D 128).
_SHAPES = [
    {"B": 1, "S": 512, "H": 9, "Hkv": 3, "D": 64},
    {"B": 1, "S": 2048, "H": 9, "Hkv": 3, "D": 64},
    {"B": 1, "S": 1024, "H": 32, "Hkv": 8, "D": 128},
]
# Long Llama-3-8B prompts: the sizes that keep a GPU busy.
_GPU_SHAPES = [
    {"B": 1, "S": 8192, "H": 32, "Hkv": 8, "D": 128},
    {"B": 4, "S": 4096, "H": 32, "Hkv": 8, "D": 128},
]


@case("attention.prefill", shapes=_SHAPES, gpu_shapes=_GPU_SHAPES, dtypes=("float32", "bfloat16"), baseline="sdpa",
      description="causal GQA prefill, layout (B, S, H, D); effllm vs torch SDPA")
def attention_prefill(shape, dtype, device) -> Setup:
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, s, h, hkv, d = shape["B"], shape["S"], shape["H"], shape["Hkv"], shape["D"]
    q = torch.randn(b, s, h, d, generator=gen).to(device, dtype)
    k = torch.randn(b, s, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(b, s, hkv, d, generator=gen).to(device, dtype)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    providers = {
        "effllm": lambda: attention(q, k, v, causal=True),
        "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2),
    }
    unavailable = {}
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None and dtype != torch.float32:
        from flash_attn import flash_attn_func

        providers["flash-attn"] = lambda: flash_attn_func(q, k, v, causal=True)
    else:
        unavailable["flash-attn"] = "needs CUDA, fp16/bf16 and the flash_attn package"
    element = q.element_size()
    return Setup(
        providers=providers,
        reference=lambda: attention_reference(q, k, v, causal=True)[0],
        same_dtype_reference=lambda: attention_reference(q, k, v, causal=True, compute_dtype=dtype)[0].to(dtype),
        flops=4 * b * h * s * s * d / 2,  # causal: half of the S x S score matrix
        bytes_moved=(2 * b * s * h * d + 2 * b * s * hkv * d) * element,
        unavailable=unavailable,
    )


@case("attention.prefill_fwd_bwd", shapes=_SHAPES[:2], gpu_shapes=_GPU_SHAPES, dtypes=("float32", "bfloat16"), baseline="sdpa",
      description="causal GQA prefill forward + backward (dq, dk, dv); effllm vs torch SDPA")
def attention_prefill_fwd_bwd(shape, dtype, device) -> Setup:
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, s, h, hkv, d = shape["B"], shape["S"], shape["H"], shape["Hkv"], shape["D"]
    leaves = [torch.randn(b, s, n, d, generator=gen).to(device, dtype).requires_grad_(True) for n in (h, hkv, hkv)]
    dout = torch.randn(b, s, h, d, generator=gen).to(device, dtype)

    def grads(forward):
        def run():
            for t in leaves:
                t.grad = None
            forward(*leaves).backward(dout)
            return torch.cat([t.grad.flatten() for t in leaves])
        return run

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)

    def reference(compute_dtype):
        return grads(lambda q, k, v: attention_reference(q, k, v, causal=True, compute_dtype=compute_dtype)[0].to(dtype))

    return Setup(
        providers={"effllm": grads(lambda q, k, v: attention(q, k, v, causal=True)), "sdpa": grads(sdpa)},
        reference=lambda: reference(torch.float32)().float(),
        same_dtype_reference=reference(dtype),
        flops=2.5 * 4 * b * h * s * s * d / 2,  # backward ~2.5x the forward's matmul work
        unavailable={} if device.type == "cuda" else {"flash-attn": "needs CUDA"},
    )
