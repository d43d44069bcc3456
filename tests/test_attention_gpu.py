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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq_q,seq_k", [(113, 1025), (1000, 1000)])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (32, 8)])
def test_backward_grid(dtype, head_dim, seq_q, seq_k, heads, kv_heads):
    gen = torch.Generator(device="cuda").manual_seed(1)
    make = lambda s, h: torch.randn(2, s, h, head_dim, device="cuda", dtype=dtype, generator=gen)
    q, k, v, dout = make(seq_q, heads), make(seq_k, kv_heads), make(seq_k, kv_heads), make(seq_q, heads)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        (fn(*leaves).float() * dout.float()).sum().backward()
        return [t.grad for t in leaves]

    got = grads(lambda *t: attention(*t, causal=True, backend="triton"))
    want = grads(lambda *t: attention_reference(*t, causal=True)[0])
    same = grads(lambda *t: attention_reference(*t, causal=True, compute_dtype=dtype)[0])
    for g, w, s in zip(got, want, same):
        assert_close_to_reference(g, w, s.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 16, 256])
@pytest.mark.parametrize("batch,length", [(1, 32768), (64, 4097)])
def test_decode_grid(dtype, page_size, batch, length):
    from effllm.kernels import decode_attention, decode_reference

    gen = torch.Generator(device="cuda").manual_seed(2)
    heads, kv_heads, dim = 32, 8, 128
    q = torch.randn(batch, 1, heads, dim, device="cuda", dtype=dtype, generator=gen)
    seqlens = torch.randint(length // 2, length + 1, (batch,), device="cuda", generator=gen).int()
    if page_size is None:
        k, v = (torch.randn(batch, length, kv_heads, dim, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
        table = None
    else:
        pages = -(-length // page_size)
        k, v = (torch.randn(batch * pages, page_size, kv_heads, dim, device="cuda", dtype=dtype, generator=gen)
                for _ in range(2))
        table = torch.randperm(batch * pages, device="cuda", generator=gen).view(batch, pages).int()
    out = decode_attention(q, k, v, seqlens, block_table=table, backend="triton")
    ref, _, _ = decode_reference(q[:2], k if table is not None else k[:2], v if table is not None else v[:2],
                                 seqlens[:2], block_table=None if table is None else table[:2])
    same, _, _ = decode_reference(q[:2], k if table is not None else k[:2], v if table is not None else v[:2],
                                  seqlens[:2], block_table=None if table is None else table[:2], compute_dtype=dtype)
    assert_close_to_reference(out[:2], ref, same.to(dtype))
