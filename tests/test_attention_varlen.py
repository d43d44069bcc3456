"""Packed varlen attention (cu_seqlens): each sequence against its own keys, both backends,
forward and gradients, against the per-sequence reference; and bad cu_seqlens."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effllm._backend import interpreting
from effllm.kernels import attention, attention_reference
from effllm.testing import assert_close_to_reference
from effllm.testing.strategies import ragged_lengths

HAS_TRITON = torch.cuda.is_available() or interpreting()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=[
    pytest.mark.interpret, pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")])]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _packed(lengths_q, lengths_k, heads, kv_heads, dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda n, h: torch.randn(n, h, dim, generator=gen).to(DEVICE, dtype)
    return make(sum(lengths_q), heads), make(sum(lengths_k), kv_heads), make(sum(lengths_k), kv_heads)


def _per_sequence(q, k, v, lengths_q, lengths_k, compute_dtype=torch.float32, **kw):
    outs, lses, a, b = [], [], 0, 0
    for nq, nk in zip(lengths_q, lengths_k):
        out, lse = attention_reference(q[None, a:a + nq], k[None, b:b + nk], v[None, b:b + nk],
                                       compute_dtype=compute_dtype, **kw)
        outs.append(out[0])
        lses.append(lse[0])
        a, b = a + nq, b + nk
    return torch.cat(outs), torch.cat(lses, dim=1)


def _check(backend, lengths_q, lengths_k, q, k, v, grads=True, **kw):
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE, q.dtype)

    def run(fn):
        leaves = [t.clone().requires_grad_(grads) for t in (q, k, v)]
        out, lse = fn(*leaves)
        if grads:
            (out.float() * dout.float()).sum().backward()
        return out, lse, [t.grad for t in leaves]

    out, lse, g = run(lambda *t: attention(*t, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True,
                                           backend=backend, **kw))
    ref, ref_lse, rg = run(lambda *t: _per_sequence(*t, lengths_q, lengths_k, compute_dtype=torch.float64, **kw))
    same, _, sg = run(lambda *t: _per_sequence(*t, lengths_q, lengths_k, compute_dtype=q.dtype, **kw))
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    assert_close_to_reference(out, ref, same.to(q.dtype), name="out")
    assert_close_to_reference(lse, ref_lse, ref_lse, floor=1e-4 if q.dtype == torch.float32 else 2e-2, name="lse")
    for name, a, b, c in zip(("dq", "dk", "dv"), g, rg, sg) if grads else ():
        assert_close_to_reference(a, b, c.to(q.dtype), name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8)
@given(lengths=ragged_lengths(max_batch=4, max_len=90), extra=st.lists(st.integers(0, 30), min_size=4, max_size=4),
       causal=st.booleans(), group=st.sampled_from([1, 2, 3]), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_matches_per_sequence_reference(backend, lengths, extra, causal, group, dtype):
    lengths_k = [n + e for n, e in zip(lengths, extra)]  # Sk >= Sq per sequence (prefill onto a prefix)
    q, k, v = _packed(lengths, lengths_k, 2 * group, 2, 64, dtype=dtype)
    _check(backend, lengths, lengths_k, q, k, v, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequences_window_softcap(backend):
    lengths_q, lengths_k = [5, 0, 40, 33], [7, 3, 40, 20]  # an empty query run; Sq > Sk (rows without keys)
    q, k, v = _packed(lengths_q, lengths_k, 4, 2, 80, seed=2)
    _check(backend, lengths_q, lengths_k, q, k, v, causal=True, window=(12, 0), softcap=8.0)


def test_backends_agree_on_bf16():
    if not HAS_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    lengths = [17, 50, 3]
    q, k, v = _packed(lengths, lengths, 4, 1, 64, dtype=torch.bfloat16, seed=3)
    _check("triton", lengths, lengths, q, k, v, grads=False, causal=True)


def _bad(match, **changes):
    q, k, v = _packed([3, 4], [3, 4], 2, 1, 32)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=_cu([3, 4]), cu_seqlens_k=_cu([3, 4])) | changes
    with pytest.raises(ValueError, match=match):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), backend="torch", **args)


def test_bad_cu_seqlens():
    q, k, v = _packed([3, 4], [3, 4], 2, 1, 32)
    _bad("needs both", cu_seqlens_k=None)
    _bad(r"q must be packed 3-D \(total, heads, head_dim\)", q=q[None])
    _bad(r"cu_seqlens_q must start at 0, never decrease", cu_seqlens_q=torch.tensor([0, 5, 4], dtype=torch.int32, device=DEVICE))
    _bad(r"cu_seqlens_k must start at 0, never decrease and end at the packed length 7",
         cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32, device=DEVICE))
    _bad(r"cu_seqlens_q must be a 1-D int32/int64", cu_seqlens_q=_cu([3, 4]).float())
    _bad(r"one shape", cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32, device=DEVICE))
    _bad(r"max_seqlen_q must be an int >= the longest sequence \(4\)", max_seqlen_q=3)
    _bad(r"kv heads \(2\) must divide query heads \(3\)", q=torch.zeros(7, 3, 32, device=DEVICE),
         k=torch.zeros(7, 2, 32, device=DEVICE), v=torch.zeros(7, 2, 32, device=DEVICE))


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
def test_varlen_op(backend):
    from effllm.kernels.ops import attention_varlen_op

    lengths_q, lengths_k = [5, 0, 12], [7, 3, 12]
    q, k, v = _packed(lengths_q, lengths_k, 4, 2, 32, seed=4)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    for args in ((q, k, v, cu_q, cu_k, 12, 12, True, None, -1, -1, None, backend),
                 (q, k, v, cu_q, cu_k, 12, 12, False, 0.3, 4, 2, 9.0, backend)):
        torch.library.opcheck(attention_varlen_op, args, test_utils=("test_schema", "test_faketensor",
                                                                     "test_aot_dispatch_static"))


def test_varlen_compiles_fullgraph_and_trains():
    lengths = [9, 4, 17]
    q, k, v = _packed(lengths, lengths, 4, 2, 32, seed=5)
    cu = _cu(lengths)

    def block(q, k, v):
        return attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=17, max_seqlen_k=17,
                         backend="torch").sin()

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(block, fullgraph=True, backend=capture)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    compiled(*leaves).sum().backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    block(*ref_leaves).sum().backward()
    assert any("effllm.attention_varlen" in str(node.target) for node in graphs[0].graph.nodes)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)
