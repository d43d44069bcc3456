"""effllm.kernels.scores (the one explicit float32 softmax) against kernels/reference.py.

Probabilities come from the reference itself: attending values that are the identity matrix
returns each query's probability row, so ``probs``, ``mass`` and ``peak`` are checked against
``attention_reference`` without a second hand-written softmax. Tests taking ``cpu_path`` run
through the native softmax pass (one thread, then 3) and through the torch ops.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effllm.kernels import attention_reference, decode_reference
from effllm.kernels.scores import logits, softmax, softmax_attention
from effllm.testing import assert_close_to_reference
from effllm.testing.strategies import attention_shapes


def _inputs(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(seq, heads):
        return torch.randn(shape.batch, seq, heads, shape.head_dim, generator=gen).to(dtype)

    q = rand(shape.seqlen_q, shape.heads)
    return q, rand(shape.seqlen_k, shape.kv_heads), rand(shape.seqlen_k, shape.kv_heads)


def _heads_first(*ts):
    return [t.transpose(1, 2) for t in ts]


def _reference_probs(q, k, compute_dtype=torch.float32, **kw):
    """``(B, H, Sq, Sk)`` probabilities from ``attention_reference`` with identity values."""
    batch, seq_k, kv_heads, _ = k.shape
    eye = torch.eye(seq_k).expand(batch, kv_heads, seq_k, seq_k).transpose(1, 2).to(q.dtype)
    probs, _ = attention_reference(q, k, eye, compute_dtype=compute_dtype, **kw)  # B, Sq, H, Sk
    return probs.transpose(1, 2)


def _mass_and_peak(probs, kv_heads):
    batch, heads, seq_q, seq_k = probs.shape
    rows = probs.reshape(batch, kv_heads, heads // kv_heads * seq_q, seq_k)
    return rows.sum(dim=2), rows.amax(dim=2)


options = st.fixed_dictionaries({
    "causal": st.booleans(),
    "window": st.one_of(st.none(), st.tuples(st.integers(0, 30), st.integers(-1, 10))),
    "softcap": st.one_of(st.none(), st.floats(1.0, 30.0)),
    "scale": st.one_of(st.none(), st.floats(0.05, 1.0)),
})


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # cpu_path is the same for every example
@given(shape=attention_shapes(max_seqlen=70), kw=options, dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       chunked=st.booleans())
def test_outputs_match_reference(shape, kw, dtype, chunked, cpu_path):
    q, k, v = _inputs(shape, dtype)
    elems = shape.batch * shape.heads * shape.seqlen_k * 3 if chunked else 1 << 24  # chunks of 3 queries
    got = softmax_attention(*_heads_first(q, k, v), need_lse=True, need_mass=True, need_peak=True, need_probs=True,
                            chunk_elems=elems, **kw)
    # The oracle in float64; the bound scales with the float32 reference's own error.
    ref, ref_lse = attention_reference(q, k, v, compute_dtype=torch.float64, **kw)
    same, same_lse = attention_reference(q, k, v, **kw)
    assert got.out.dtype == torch.float32 and got.out.shape == (shape.batch, shape.heads, shape.seqlen_q,
                                                                 shape.head_dim)
    assert_close_to_reference(got.out.transpose(1, 2), ref, same, name="out")
    assert_close_to_reference(got.lse, ref_lse, same_lse, name="lse")
    probs, same_probs = _reference_probs(q, k, torch.float64, **kw), _reference_probs(q, k, torch.float32, **kw)
    assert_close_to_reference(got.probs, probs, same_probs, name="probs")
    (mass, peak), (same_mass, same_peak) = _mass_and_peak(probs, shape.kv_heads), \
        _mass_and_peak(same_probs, shape.kv_heads)
    assert_close_to_reference(got.mass, mass, same_mass, name="mass")
    assert_close_to_reference(got.peak, peak, same_peak, name="peak")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=3), seq_q=st.integers(1, 5),
       group=st.sampled_from([1, 3]), left=st.one_of(st.none(), st.integers(0, 20)), cap=st.sampled_from([None, 5.0]))
def test_key_lengths_match_decode_reference(lengths, seq_q, group, left, cap, cpu_path):
    """Per-row cache lengths: queries at the end of each row's keys, keys past it unseen."""
    lengths = [max(n, seq_q) for n in lengths]
    gen = torch.Generator().manual_seed(len(lengths) * 7 + seq_q)
    batch, kv_heads, dim, capacity = len(lengths), 2, 16, max(lengths) + 4
    q = torch.randn(batch, seq_q, kv_heads * group, dim, generator=gen)
    k, v = (torch.randn(batch, capacity, kv_heads, dim, generator=gen) for _ in range(2))
    seqlens = torch.tensor(lengths)
    window = None if left is None else (left, 0)
    got = softmax_attention(*_heads_first(q, k, v), key_lengths=seqlens, window=window, softcap=cap, need_lse=True,
                            need_mass=True)
    ref, ref_lse, ref_mass = decode_reference(q, k, v, seqlens, window=window, softcap=cap,
                                              compute_dtype=torch.float64)
    same, same_lse, same_mass = decode_reference(q, k, v, seqlens, window=window, softcap=cap)
    assert_close_to_reference(got.out.transpose(1, 2), ref, same, name="out")
    assert_close_to_reference(got.lse, ref_lse, same_lse, name="lse")
    assert_close_to_reference(got.mass, ref_mass, same_mass, name="mass")
    # Not causal: each row's queries see all of its keys and none past it.
    free = softmax_attention(*_heads_first(q, k, v), key_lengths=seqlens, causal=False, softcap=cap)
    for b, n in enumerate(lengths):
        ref, _ = attention_reference(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=False, softcap=cap)
        assert_close_to_reference(free.out[b:b + 1].transpose(1, 2), ref, ref, name="out (not causal)")


def test_key_valid_hides_keys_and_query_valid_drops_rows(cpu_path):
    """Left padding: hiding the first p keys equals attending without them (bottom-right
    positions do not move); invalid query rows add nothing to mass and peak."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 6, 4, 8, generator=gen), torch.randn(2, 9, 2, 8, generator=gen), \
        torch.randn(2, 9, 2, 8, generator=gen)
    pad = [3, 0]
    key_valid = torch.arange(9)[None] >= torch.tensor(pad)[:, None]
    query_valid = torch.ones(2, 6, dtype=torch.bool)
    query_valid[0, :2] = False
    got = softmax_attention(*_heads_first(q, k, v), key_valid=key_valid, query_valid=query_valid, need_mass=True,
                            need_peak=True, need_probs=True)
    for b, p in enumerate(pad):
        ref, _ = attention_reference(q[b:b + 1], k[b:b + 1, p:], v[b:b + 1, p:])
        torch.testing.assert_close(got.out[b:b + 1].transpose(1, 2), ref)
        probs = _reference_probs(q[b:b + 1], k[b:b + 1, p:])
        assert torch.all(got.probs[b, ..., :p] == 0)
        torch.testing.assert_close(got.probs[b:b + 1, ..., p:], probs)
        counted = probs * query_valid[b, None, :, None].float()
        mass, peak = _mass_and_peak(counted, 2)
        torch.testing.assert_close(got.mass[b:b + 1, :, p:], mass)
        torch.testing.assert_close(got.peak[b:b + 1, :, p:], peak)
        assert torch.all(got.mass[b, :, :p] == 0)


def test_rows_without_keys_are_zero_with_lse_minus_inf(cpu_path):
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8)
    got = softmax_attention(*_heads_first(q, k, v), causal=True, need_lse=True, need_probs=True)
    ref, ref_lse = attention_reference(q, k, v, causal=True)
    assert torch.isneginf(got.lse[:, :, :2]).all() and (got.out[:, :, :2] == 0).all()
    assert (got.probs[:, :, :2] == 0).all()
    assert_close_to_reference(got.out.transpose(1, 2), ref, ref)
    assert_close_to_reference(got.lse, ref_lse, ref_lse)


def test_nan_query_row_makes_only_that_row_nan(cpu_path):
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    q[0, 2, 1, 3] = float("nan")
    got = softmax_attention(*_heads_first(q, k, v), need_lse=True)
    bad = torch.zeros(1, 2, 4, dtype=torch.bool)
    bad[0, 1, 2] = True
    assert torch.equal(got.out.isnan().any(-1), bad)
    assert torch.equal(got.lse.isnan(), bad)


def test_out_buffer_with_strides_and_empty_queries(cpu_path):
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
    buffer = torch.empty(2, 7, 4, 8)  # (B, S, H, D), filled through its heads-first view
    got = softmax_attention(*_heads_first(q, k, v), causal=False, out=buffer.transpose(1, 2))
    ref, _ = attention_reference(q, k, v, causal=False)
    assert got.out.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, ref)
    none = softmax_attention(*_heads_first(q[:, :0], k, v), need_mass=True, need_lse=True)
    assert none.out.shape == (2, 4, 0, 8) and none.lse.shape == (2, 4, 0)
    assert torch.equal(none.mass, torch.zeros(2, 2, 5))


def test_building_blocks():
    q, k = torch.randn(3, 4, 8), torch.randn(3, 10, 8)
    scores = logits(q, k, 0.5, softcap=4.0)
    expected = 4.0 * torch.tanh((q @ k.transpose(-1, -2)) * 0.5 / 4.0)
    torch.testing.assert_close(scores, expected)
    probs, lse = softmax(scores.clone(), need_lse=True, may_be_empty=False)
    torch.testing.assert_close(probs, torch.softmax(expected, -1))
    torch.testing.assert_close(lse, torch.logsumexp(expected, -1, keepdim=True))
    fast, none = softmax(scores.clone())
    assert none is None
    torch.testing.assert_close(fast, torch.softmax(expected, -1))
    masked = scores.clone()
    masked[1] = float("-inf")
    probs, lse = softmax(masked, need_lse=True)
    assert (probs[1] == 0).all() and torch.isneginf(lse[1]).all()
    # scale=None: the queries are already scaled
    torch.testing.assert_close(logits(q * 0.5, k, None), (q @ k.transpose(-1, -2)) * 0.5)


def test_need_out_without_values_is_refused():
    with pytest.raises(ValueError, match="needs v"):
        softmax_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))


def test_a_nan_row_taints_its_kv_head_unless_query_valid_drops_it(cpu_path):
    """A NaN query row makes the mass and peak of every key of its KV head NaN, keys past the
    chunk it sits in too; with ``query_valid`` False it adds nothing, not even the NaN."""
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 9, 8, generator=gen), torch.randn(1, 2, 9, 8, generator=gen)
    q[0, 1, 2, 0] = float("nan")  # KV head 0 (query heads 0-1), query 2: sees keys 0-2 only
    kw = {"scale": 0.3, "need_out": False, "need_mass": True, "need_peak": True, "chunk_elems": 4 * 9 * 3}
    got = softmax_attention(q, k, **kw)
    for stat in (got.mass, got.peak):
        assert stat[0, 0].isnan().all() and not stat[0, 1].isnan().any()
    dropped = torch.ones(1, 9, dtype=torch.bool)
    dropped[0, 2] = False
    got = softmax_attention(q, k, query_valid=dropped, **kw)
    clean = q.clone()
    clean[0, 1, 2] = 0.0  # any finite values: the row is dropped
    ref = softmax_attention(clean, k, query_valid=dropped, **kw)
    torch.testing.assert_close(got.mass, ref.mass)
    torch.testing.assert_close(got.peak, ref.peak)


def test_an_infinite_logit_gives_lse_inf_and_nan_where_it_is(cpu_path):
    """An overflowed (+inf) logit, as torch's ``exp(x - lse)`` treats it: the rows that see it have
    lse +inf and probability (and output) NaN at it; rows that do not see it are untouched."""
    q, k = torch.ones(1, 1, 4, 8), torch.randn(1, 1, 4, 8, generator=torch.Generator().manual_seed(3))
    k[0, 0, 2] = 3e38  # (q * scale) . k overflows float32: +inf, seen by queries 2 and 3 (causal)
    got = softmax_attention(q, k, k, need_lse=True, need_probs=True, need_mass=True)
    assert torch.isfinite(got.lse[0, 0, :2]).all() and torch.isposinf(got.lse[0, 0, 2:]).all()
    assert got.probs[0, 0, 2:, 2].isnan().all() and got.out[0, 0, 2:].isnan().all() and got.mass[0, 0, 2].isnan()
    torch.testing.assert_close(got.probs[0, 0, :2].sum(dim=-1), torch.ones(2))
    assert torch.isfinite(got.out[0, 0, :2]).all()


def test_causal_chunks_stop_at_the_keys_their_queries_see(monkeypatch):
    """Which keys each chunk of causal queries reads: its logits cover the prefix of the keys its
    queries may see and no later key, and the results equal one chunk's. (A count of keys read,
    not a time: how much faster that makes a prefill is benchmarks/'s, case scores.stats.)"""
    from effllm.kernels import scores

    widths = []
    real = scores.logits
    monkeypatch.setattr(scores, "logits", lambda q, k, *a, **kw: widths.append(k.shape[-2]) or real(q, k, *a, **kw))
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    whole = softmax_attention(q, k, v, need_mass=True, need_lse=True)
    widths.clear()
    chunked = softmax_attention(q, k, v, need_mass=True, need_lse=True, chunk_elems=2 * 4 * 12 * 5)  # 5 queries
    assert widths == [5, 10, 12]
    for name in ("out", "lse", "mass"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name))
    widths.clear()
    softmax_attention(q[:, :, :3], k, v, chunk_elems=2 * 4 * 12 * 2)  # the last 3 queries: keys up to 11 and 12
    assert widths == [11, 12]


def test_a_nan_key_inside_a_block_of_eight_makes_the_rows_that_see_it_nan(cpu_path):
    """The native pass checks eight logits at a time before a row's tail: a NaN key among the
    first eight of rows that see 8 to 20 keys still makes those rows NaN (and the head's mass)."""
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 1, 20, 8, generator=gen), torch.randn(1, 1, 20, 8, generator=gen)
    k[0, 0, 3, 5] = float("nan")
    got = softmax_attention(q, k, k, need_lse=True, need_mass=True)
    assert torch.isfinite(got.lse[0, 0, :3]).all() and got.lse[0, 0, 3:].isnan().all()
    assert got.out[0, 0, 3:].isnan().all() and got.mass.isnan().all()


def test_probabilities_without_the_output(cpu_path):
    """``need_probs`` alone (SnapKV's and CAKE's window attention): the probabilities are written
    even though no output is computed from them."""
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 5, 4, 8, generator=gen), torch.randn(2, 9, 2, 8, generator=gen)
    got = softmax_attention(q.transpose(1, 2), k.transpose(1, 2), need_out=False, need_probs=True)
    assert got.out is None
    torch.testing.assert_close(got.probs, _reference_probs(q, k))


def test_masks_of_one_row_broadcast_over_the_batch(cpu_path):
    gen = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(3, 2, 6, 8, generator=gen), torch.randn(3, 1, 6, 8, generator=gen), \
        torch.randn(3, 1, 6, 8, generator=gen)
    key_valid, query_valid = torch.arange(6)[None] >= 2, torch.arange(6)[None] >= 3
    kw = {"need_mass": True, "need_peak": True}
    got = softmax_attention(q, k, v, key_valid=key_valid, query_valid=query_valid, **kw)
    ref = softmax_attention(q, k, v, key_valid=key_valid.expand(3, -1), query_valid=query_valid.expand(3, -1), **kw)
    for name in ("out", "mass", "peak"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name))


def test_mass_and_peak_under_autograd_over_several_chunks():
    """The torch ops (autograd): mass and peak accumulate across chunks without out= arguments,
    and their gradients reach the queries."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 6, 8, generator=gen).requires_grad_()
    k = torch.randn(1, 1, 6, 8, generator=gen)
    got = softmax_attention(q, k, need_out=False, need_mass=True, need_peak=True, chunk_elems=2 * 6 * 2)
    ref = softmax_attention(q.detach(), k, need_out=False, need_mass=True, need_peak=True)
    torch.testing.assert_close(got.mass, ref.mass)
    torch.testing.assert_close(got.peak, ref.peak)
    (got.mass.sum() + got.peak.sum()).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
