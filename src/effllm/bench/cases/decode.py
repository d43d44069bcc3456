"""Decode attention: one new token against a long KV cache, contiguous and paged.

effllm reads a cache laid out as transformers stores it, ``(B, H_kv, S, D)``, through a
``(B, S, H_kv, D)`` view, as the HF integration does.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ...kernels import decode_attention, decode_reference
from ..registry import Setup, case

# SmolLM2-135M (9/3 heads, D 64) and a Llama-3-8B layer (32/8 heads, D 128).
_SHAPES = [
    {"B": 1, "L": 4096, "H": 9, "Hkv": 3, "D": 64},
    {"B": 1, "L": 4096, "H": 32, "Hkv": 8, "D": 128},
    {"B": 8, "L": 1024, "H": 32, "Hkv": 8, "D": 128},
]
# A 32k-token context and a 64-sequence serving batch: what split-K decoding is for on a GPU.
_GPU_SHAPES = [
    {"B": 1, "L": 32768, "H": 32, "Hkv": 8, "D": 128},
    {"B": 64, "L": 4096, "H": 32, "Hkv": 8, "D": 128},
]
PAGE_SIZE = 16


def _inputs(shape, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, n, h, hkv, d = shape["B"], shape["L"], shape["H"], shape["Hkv"], shape["D"]
    q = torch.randn(b, 1, h, d, generator=gen).to(device, dtype)
    k_hf = torch.randn(b, hkv, n, d, generator=gen).to(device, dtype)
    v_hf = torch.randn(b, hkv, n, d, generator=gen).to(device, dtype)
    seqlens = torch.full((b,), n, dtype=torch.int32, device=device)
    return q, k_hf, v_hf, seqlens


def _baselines(q, k_hf, v_hf, device, dtype):
    qt = q.transpose(1, 2)
    providers = {"sdpa": lambda: F.scaled_dot_product_attention(qt, k_hf, v_hf, enable_gqa=True).transpose(1, 2)}
    unavailable = {}
    if importlib.util.find_spec("transformers") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        module = torch.nn.Module()
        module.is_causal, module.num_key_value_groups = True, q.shape[2] // k_hf.shape[1]
        module.eval()
        # What a transformers model runs per layer and decode step with attn_implementation="sdpa".
        providers["hf-sdpa"] = lambda: sdpa_attention_forward(module, qt, k_hf, v_hf, None)[0]
    else:
        unavailable["hf-sdpa"] = "needs transformers"
    if device.type == "cuda" and dtype != torch.float32 and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_with_kvcache

        k, v = k_hf.transpose(1, 2).contiguous(), v_hf.transpose(1, 2).contiguous()
        providers["flash-attn"] = lambda: flash_attn_with_kvcache(q, k, v)
    else:
        unavailable["flash-attn"] = "needs CUDA, fp16/bf16 and the flash_attn package"
    return providers, unavailable


def _setup(shape, dtype, providers, unavailable, reference_args):
    q = reference_args[0]
    b, n, h, hkv, d = shape["B"], shape["L"], shape["H"], shape["Hkv"], shape["D"]
    return Setup(
        providers=providers,
        reference=lambda: decode_reference(*reference_args)[0],
        same_dtype_reference=lambda: decode_reference(*reference_args, compute_dtype=dtype)[0].to(dtype),
        flops=4 * b * h * n * d,
        bytes_moved=(2 * b * n * hkv * d + 2 * b * h * d) * q.element_size(),
        unavailable=unavailable,
    )


@case("attention.decode", shapes=_SHAPES, gpu_shapes=_GPU_SHAPES, dtypes=("float32", "bfloat16"), baseline="hf-sdpa",
      description="one token vs a contiguous KV cache; effllm vs SDPA and transformers' sdpa attention")
def attention_decode(shape, dtype, device) -> Setup:
    q, k_hf, v_hf, seqlens = _inputs(shape, dtype, device)
    k, v = k_hf.transpose(1, 2), v_hf.transpose(1, 2)
    providers, unavailable = _baselines(q, k_hf, v_hf, device, dtype)
    providers = {"effllm": lambda: decode_attention(q, k, v, seqlens), **providers}
    return _setup(shape, dtype, providers, unavailable, (q, k, v, seqlens))


@case("attention.decode_paged", shapes=_SHAPES, gpu_shapes=_GPU_SHAPES, dtypes=("float32", "bfloat16"),
      baseline="effllm-contiguous",
      description=f"one token vs a paged KV cache (page {PAGE_SIZE}, shuffled pages); effllm paged vs contiguous")
def attention_decode_paged(shape, dtype, device) -> Setup:
    q, k_hf, v_hf, seqlens = _inputs(shape, dtype, device)
    b, n = shape["B"], shape["L"]
    pages_per_seq = -(-n // PAGE_SIZE)
    gen = torch.Generator(device="cpu").manual_seed(1)
    table = torch.randperm(b * pages_per_seq, generator=gen).view(b, pages_per_seq).to(device, torch.int32)
    k_pages = torch.empty(b * pages_per_seq, PAGE_SIZE, *k_hf.shape[1:2], k_hf.shape[3], dtype=dtype, device=device)
    v_pages = torch.empty_like(k_pages)
    k_pages[table.flatten().long()] = k_hf.transpose(1, 2).reshape(-1, PAGE_SIZE, *k_pages.shape[2:])
    v_pages[table.flatten().long()] = v_hf.transpose(1, 2).reshape(-1, PAGE_SIZE, *v_pages.shape[2:])
    k, v = k_hf.transpose(1, 2), v_hf.transpose(1, 2)
    providers = {
        "effllm-paged": lambda: decode_attention(q, k_pages, v_pages, seqlens, block_table=table),
        "effllm-contiguous": lambda: decode_attention(q, k, v, seqlens),
        "sdpa": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k_hf, v_hf, enable_gqa=True).transpose(1, 2),
    }
    # The pages hold the contiguous cache's tokens: check against its (faster) reference.
    return _setup(shape, dtype, providers, {}, (q, k, v, seqlens))
