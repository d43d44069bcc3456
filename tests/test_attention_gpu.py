"""Tier 1: the Triton attention kernel on a GPU over a full grid, bf16/fp16 numerics.
Skipped without CUDA (conftest adds the skip for the `gpu` marker)."""

import pytest
import torch

from effllm.kernels import attention, attention_reference
from effllm.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("seq_q,seq_k", [(1, 4097), (113, 1025), (1000, 1000), (2048, 2048)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (32, 8), (12, 1)])
def test_grid(dtype, head_dim, seq_q, seq_k, causal, heads, kv_heads):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, seq_q, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(2, seq_k, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(2, seq_k, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    out = attention(q, k, v, causal=causal, backend="triton")
    ref, _ = attention_reference(q, k, v, causal=causal)
    same, _ = attention_reference(q, k, v, causal=causal, compute_dtype=dtype)
    assert_close_to_reference(out, ref, same.to(dtype))
