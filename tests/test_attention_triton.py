"""The Triton attention forward kernel under TRITON_INTERPRET=1 (or on a GPU), against the
float32 reference, with the "2x torch's same-dtype error" rule."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effllm._backend import interpreting
from effllm.kernels import attention, attention_reference
from effllm.testing import assert_close_to_reference
from effllm.testing.strategies import attention_shapes

pytestmark = pytest.mark.interpret

if not (torch.cuda.is_available() or interpreting()):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda s, h: torch.randn(shape.batch, s, h, shape.head_dim, generator=gen).to(DEVICE, dtype)
    return make(shape.seqlen_q, shape.heads), make(shape.seqlen_k, shape.kv_heads), make(shape.seqlen_k, shape.kv_heads)


def _check(q, k, v, **kw):
    out, lse = attention(q, k, v, backend="triton", return_lse=True, **kw)
    ref, ref_lse = attention_reference(q, k, v, **kw)
    same, _ = attention_reference(q, k, v, compute_dtype=q.dtype, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_to_reference(out, ref, same.to(q.dtype), name="out")
    assert_close_to_reference(lse, ref_lse, ref_lse, floor=1e-4 if q.dtype == torch.float32 else 2e-2, name="lse")


SMALL = dict(max_batch=2, max_seqlen=100, max_kv_heads=2, gqa_ratios=(1, 2, 3, 4))


@settings(max_examples=12)
@given(shape=attention_shapes(**SMALL), causal=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_matches_reference(shape, causal, dtype):
    _check(*_inputs(shape, dtype), causal=causal)


@settings(max_examples=8)
@given(shape=attention_shapes(**SMALL, head_dims=(64, 80)), left=st.integers(0, 70), right=st.integers(-1, 40),
       causal=st.booleans())
def test_sliding_window(shape, left, right, causal):
    _check(*_inputs(shape, torch.float32), causal=causal, window=(left, right))


@settings(max_examples=6)
@given(shape=attention_shapes(**SMALL, head_dims=(64,)), cap=st.floats(2.0, 50.0))
def test_softcap(shape, cap):
    _check(*_inputs(shape, torch.float32), softcap=cap)


@pytest.mark.parametrize("seq_q,seq_k", [(1, 129), (5, 77), (64, 64), (70, 33)])
def test_gqa8_and_lengths_around_blocks(seq_q, seq_k):
    gen = torch.Generator().manual_seed(seq_q)
    q = torch.randn(1, seq_q, 8, 64, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, seq_k, 1, 64, generator=gen).to(DEVICE) for _ in range(2))
    _check(q, k, v, causal=True)


def test_bfloat16_storage():
    # bf16 is storage-only under the interpreter: the kernel upcasts before tl.dot and arithmetic.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 45, 4, 96, generator=gen).to(DEVICE, torch.bfloat16)
    k, v = (torch.randn(2, 45, 2, 96, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    _check(q, k, v, causal=True)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(1, 50, 3, 4, 64, generator=gen).to(DEVICE)  # packed qkv, strided views
    q, k, v = qkv[:, :, 0], qkv[:, :, 1, :2], qkv[:, :, 2, :2]
    assert not q.is_contiguous()
    _check(q, k, v, causal=True)


# ---- backward -------------------------------------------------------------------------------

def _grads(fn, q, k, v, dout, dlse):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    finite = torch.isfinite(lse)  # rows that see no key: -inf LSE, no gradient
    loss = (out.float() * dout.float()).sum() + (torch.where(finite, lse, 0.0) * dlse).sum()
    loss.backward()
    return [t.grad for t in leaves]


def _check_grads(q, k, v, **kw):
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE, q.dtype)
    dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=gen).to(DEVICE)
    got = _grads(lambda *t: attention(*t, backend="triton", return_lse=True, **kw), q, k, v, dout, dlse)
    # float64 reference: gradients are sums over many rows (dv up to ~50 here), where the fp32
    # reference's own rounding is what the fp32 comparison measures.
    want = _grads(lambda *t: attention_reference(*t, compute_dtype=torch.float64, **kw), q, k, v, dout, dlse)
    same = _grads(lambda *t: attention_reference(*t, compute_dtype=q.dtype, **kw), q, k, v, dout, dlse)
    for name, g, w, s in zip(("dq", "dk", "dv"), got, want, same):
        assert g.dtype == q.dtype and g.shape == w.shape
        assert_close_to_reference(g, w, s.to(q.dtype), name=name)


@settings(max_examples=8)
@given(shape=attention_shapes(**SMALL, head_dims=(64, 80)), causal=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_gradients_match_reference(shape, causal, dtype):
    _check_grads(*_inputs(shape, dtype, seed=3), causal=causal)


@pytest.mark.parametrize("options", [dict(window=(9, 0)), dict(causal=False, window=(12, 7)), dict(softcap=6.0),
                                     dict(scale=0.2)])
def test_gradients_with_window_softcap_scale(options):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 41, 6, 64, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, 58, 2, 64, generator=gen).to(DEVICE) for _ in range(2))
    _check_grads(q, k, v, **{"causal": True, **options})


def test_gradients_gqa8_rows_without_keys_and_bf16():
    gen = torch.Generator().manual_seed(5)
    # Sq > Sk with bottom-right causal: the first 30 queries see no key (zero gradient).
    q = torch.randn(1, 47, 8, 64, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 17, 1, 64, generator=gen).to(DEVICE) for _ in range(2))
    _check_grads(q, k, v, causal=True)
    _check_grads(*(t.to(torch.bfloat16) for t in (q[:, :33], k, v)), causal=True)


@pytest.mark.parametrize("options", [dict(causal=True), dict(causal=False, window=(3, 1))])
def test_gradients_at_block_edges(options):
    # One key more than queries (or a right window of 1) puts the first query that sees key
    # block n at the last row of a query block: an off-by-one in the backward's query range
    # drops exactly that row's contribution.
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 96, 2, 64, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 97 if options["causal"] else 96, 1, 64, generator=gen).to(DEVICE) for _ in range(2))
    _check_grads(q, k, v, **options)
