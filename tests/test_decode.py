"""decode_attention: torch path and Triton split-K kernel (interpreter on CPU) against the
per-sequence reference, contiguous and paged caches, stats, op registration and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effllm._backend import interpreting
from effllm.kernels import decode_attention, decode_reference, plan_decode
from effllm.kernels.decode import decode_attention_unchecked
from effllm.kernels.ops import decode_attention_op
from effllm.testing import assert_close_to_reference
from effllm.testing.strategies import ragged_lengths

HAS_TRITON = torch.cuda.is_available() or interpreting()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=[
    pytest.mark.interpret, pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")])]


def _case(lengths, seq_q, heads, kv_heads, dim, *, page_size=None, dtype=torch.float32, seed=0, spare=3):
    """Random queries and a cache holding ``lengths``; paged caches get shuffled pages."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    batch = len(lengths)
    q = rand(batch, seq_q, heads, dim)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    if page_size is None:
        capacity = max(lengths) + spare
        return q, rand(batch, capacity, kv_heads, dim), rand(batch, capacity, kv_heads, dim), seqlens, None
    max_pages = -(-max(lengths) // page_size) + 1
    num_pages = batch * max_pages + 2
    table = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages)
    k, v = rand(num_pages, page_size, kv_heads, dim), rand(num_pages, page_size, kv_heads, dim)
    return q, k, v, seqlens, table.to(DEVICE, torch.int32)


def _check(case, backend, **kw):
    q, k, v, seqlens, table = case
    out, lse, stats = decode_attention(q, k, v, seqlens, block_table=table, return_lse=True, return_stats=True,
                                       backend=backend, **kw)
    kw.pop("num_splits", None)
    ref, ref_lse, ref_stats = decode_reference(q, k, v, seqlens, block_table=table, **kw)
    same, _, _ = decode_reference(q, k, v, seqlens, block_table=table, compute_dtype=q.dtype, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close_to_reference(out, ref, same.to(q.dtype), name="out")
    lse_floor = 1e-4 if q.dtype == torch.float32 else 2e-2
    assert_close_to_reference(lse, ref_lse, ref_lse, floor=lse_floor, name="lse")
    assert_close_to_reference(stats, ref_stats, ref_stats, floor=lse_floor, name="stats")
    # Each query row's probabilities sum to one: stats of a KV head add up to G * Sq.
    group_rows = q.shape[2] // k.shape[2] * q.shape[1]
    torch.testing.assert_close(stats.sum(-1), torch.full_like(stats.sum(-1), group_rows), rtol=1e-3, atol=1e-3)


@st.composite
def decode_cases(draw, paged):
    lengths = draw(ragged_lengths(max_batch=3, max_len=150))
    seq_q = draw(st.sampled_from([1, 1, 2, 3, 5]))
    lengths = [max(n, seq_q) for n in lengths]
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    dim = draw(st.sampled_from([64, 80]))
    page = draw(st.sampled_from([16, 32, 48])) if paged else None
    return _case(lengths, seq_q, kv_heads * group, kv_heads, dim, page_size=page, seed=draw(st.integers(0, 99)))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)
@given(case=decode_cases(paged=False), splits=st.sampled_from([None, 1, 3]))
def test_contiguous_matches_reference(backend, case, splits):
    _check(case, backend, num_splits=splits)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)
@given(case=decode_cases(paged=True), splits=st.sampled_from([None, 2, 5]))
def test_paged_shuffled_pages_match_reference(backend, case, splits):
    _check(case, backend, num_splits=splits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{"window": (17, 0)}, {"window": 40}, {"softcap": 7.5}, {"scale": 0.3}])
def test_window_softcap_scale(backend, options):
    _check(_case([9, 70, 133], 3, 4, 2, 64, page_size=16, seed=3), backend, num_splits=4, **options)


@pytest.mark.parametrize("page_size", [None, 8])
def test_rows_of_very_different_lengths_are_attended_in_groups(page_size):
    from effllm.kernels._decode_impl import length_groups

    lengths = [60, 4, 58, 5, 59]
    # padding every row to 60 would cost 300 keys for 186: similar lengths are grouped
    assert length_groups(lengths) == [[0, 4, 2], [3, 1]]
    assert length_groups([40, 38, 36]) == [[0, 1, 2]]
    case = _case(lengths, 3, 4, 2, 32, page_size=page_size, seed=12)
    plan = plan_decode(case[3], case[1], num_queries=3, block_table=case[4], window=(20, 0), backend="torch")
    assert plan.path == "groups"
    _check(case, "torch", window=(20, 0), softcap=9.0)


def test_rows_on_consecutive_pages_are_read_in_place():
    from effllm.kernels._decode_impl import consecutive_pages

    q, k, v, seqlens, table = _case([37, 5, 20, 30], 2, 4, 2, 32, page_size=8, seed=13)
    table[0, :5] = torch.arange(3, 8, dtype=table.dtype)  # rows 0 and 1: consecutive pages
    table[1, 0] = 9
    table[2, :3] = torch.tensor([0, 2, 1], dtype=table.dtype)  # row 2: not; row 3: as drawn
    starts = consecutive_pages(table, seqlens.tolist(), 8)
    assert starts.get(0) == 3 and starts.get(1) == 9 and 2 not in starts
    for window in (None, (9, 0)):
        if DEVICE == "cpu":
            plan = plan_decode(seqlens, k, num_queries=2, block_table=table, window=window, backend="torch")
            assert plan.path == "groups" and plan.page_starts == starts
            # rows read in place are calls of their own; every row is in exactly one call
            assert plan.groups[:len(starts)] == tuple((r,) for r in starts)
            assert sorted(r for group in plan.groups for r in group) == [0, 1, 2, 3]
        _check((q, k, v, seqlens, table), "torch", window=window, softcap=6.0)


def _spy(monkeypatch, name):
    """Record the calls of ``_decode_impl.<name>`` (then run it)."""
    import effllm.kernels._decode_impl as impl

    original, calls = getattr(impl, name), []
    monkeypatch.setattr(impl, name, lambda *a, **kw: calls.append(a) or original(*a, **kw))
    return calls


@pytest.mark.parametrize("page_size", [None, 8])
def test_one_query_per_row_attends_each_row_alone(page_size, monkeypatch):
    # A ragged cache's decode step (one query, no stats): one SDPA call per row over exactly its
    # keys, a view of its slots or consecutive pages, else a copy of its own pages.
    from effllm.kernels._decode_impl import consecutive_pages

    calls = _spy(monkeypatch, "_per_row")
    # the CPU torch path (on CUDA the in-place reads do not apply): CPU tensors wherever we run
    q, k, v, seqlens, table = (t if t is None else t.cpu()
                               for t in _case([37, 5, 20, 30], 1, 4, 2, 32, page_size=page_size, seed=14))
    if table is not None:
        table[0, :5] = torch.arange(3, 8, dtype=table.dtype)  # row 0 in place; rows 2, 3 shuffled
        table[2, :3] = torch.tensor([0, 2, 1], dtype=table.dtype)
        assert 2 not in consecutive_pages(table, seqlens.tolist(), 8)
    assert plan_decode(seqlens, k, block_table=table, backend="torch").path == "per_row"
    out = decode_attention(q, k, v, seqlens, block_table=table, backend="torch")
    ref, _, _ = decode_reference(q, k, v, seqlens, block_table=table)
    same, _, _ = decode_reference(q, k, v, seqlens, block_table=table, compute_dtype=q.dtype)
    assert len(calls) == 1
    assert_close_to_reference(out, ref, same, name="out")
    # With lse and stats (H2O's decode-time scores) and a softcap: explicit float32, per row too.
    _check((q, k, v, seqlens, table), "torch", softcap=6.0)
    _check((q, k, v, seqlens, table), "torch")
    assert len(calls) == 3


def test_many_long_paged_rows_are_attended_one_by_one(monkeypatch):
    # Past PER_ROW_MAX_ROWS rows, a paged cache's rows still go one by one when they are long on
    # average (a batched call would gather every page); short ones go batched. Same results.
    import effllm.kernels._decode_impl as impl

    monkeypatch.setattr(impl, "PER_ROW_MAX_ROWS", 2)
    monkeypatch.setattr(impl, "PER_ROW_MIN_MEAN_KEYS", 20)
    calls = _spy(monkeypatch, "_per_row")
    for lengths, one_by_one in (([37, 5, 20, 30], True), ([19, 5, 20, 30], False), ([30, 25, 21], True)):
        q, k, v, seqlens, table = (t.cpu() for t in _case(lengths, 1, 4, 2, 16, page_size=8, seed=len(calls)))
        calls.clear()
        _check((q, k, v, seqlens, table), "torch")
        assert len(calls) == int(one_by_one)
        k_rows, v_rows = (t.cpu() for t in _case(lengths, 1, 4, 2, 16, seed=1)[1:3])
        decode_attention(q, k_rows, v_rows, seqlens, backend="torch")  # contiguous rows: batched
        assert len(calls) == int(one_by_one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scattered_rows_are_attended_a_chunk_of_pages_at_a_time(dtype, monkeypatch):
    # Rows whose pages are not one run in the pool (equal lengths too): copied a few pages at a
    # time and merged by log-sum-exp. A chunk of 3 pages: rows of 3 to 5 pages take one or two
    # chunks, the last page partly filled.
    import effllm.kernels._decode_impl as impl

    monkeypatch.setattr(impl, "GATHER_CHUNK_BYTES", 3 * 8 * 2 * 32 * torch.tensor([], dtype=dtype).element_size())
    original, calls = impl._attend_scattered_pages, []
    monkeypatch.setattr(impl, "_attend_scattered_pages", lambda *a: calls.append(a[4]) or original(*a))
    for lengths in ([37, 5, 20, 30], [37, 37, 37]):
        q, k, v, seqlens, table = (t.cpu() for t in _case(lengths, 1, 4, 2, 32, page_size=8, dtype=dtype, seed=15))
        calls.clear()
        out = decode_attention(q, k, v, seqlens, block_table=table, backend="torch")
        ref, _, _ = decode_reference(q, k, v, seqlens, block_table=table)
        same, _, _ = decode_reference(q, k, v, seqlens, block_table=table, compute_dtype=q.dtype)
        assert sorted(calls) == sorted(r for r in lengths if r > 8)  # one-page rows are one run
        assert_close_to_reference(out, ref, same, name="out")


def test_attention_with_lse_fused_and_explicit_agree():
    from effllm.kernels._decode_impl import attention_with_lse

    gen = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(2, 3, n, 32, generator=gen) for n in (4, 50, 50))
    ref_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    ref_lse = torch.logsumexp((q @ k.transpose(-1, -2)) * 0.3, dim=-1)
    for fused in (True, False):
        out, lse = attention_with_lse(q, k, v, 0.3, fused=fused)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


# ---- plan once per step, run per layer -------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths,seq_q,page_size,window", [
    ([37, 5, 20, 30], 1, 8, None),  # per row
    ([40, 40], 1, None, None),  # padded
    ([60, 4, 58, 5, 59], 2, None, (20, 0)),  # groups
    ([33, 31], 3, 16, None),  # padded, paged
])
def test_one_plan_serves_every_layer(backend, lengths, seq_q, page_size, window, monkeypatch):
    """A plan made once gives every layer the result of an unplanned call; no layer plans again."""
    layers = [_case(lengths, seq_q, 4, 2, 32, page_size=page_size, seed=30 + i) for i in range(3)]
    seqlens, table = layers[0][3], layers[0][4]
    plan = plan_decode(seqlens, layers[0][1], num_queries=seq_q, block_table=table, window=window, backend=backend)
    assert (plan.path == "triton") == (backend == "triton")
    planned = _spy(monkeypatch, "make_plan")
    for q, k, v, _, _ in layers:
        got = decode_attention(q, k, v, seqlens, block_table=table, window=window, softcap=7.0, return_lse=True,
                               return_stats=True, backend=backend, plan=plan)
        assert planned == []
        want = decode_attention(q, k, v, seqlens, block_table=table, window=window, softcap=7.0, return_lse=True,
                                return_stats=True, backend=backend)
        planned.clear()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        unchecked = decode_attention_unchecked(q, k, v, seqlens, table, backend=backend, plan=plan) \
            if window is None else None
        if unchecked is not None:
            torch.testing.assert_close(unchecked, decode_attention(q, k, v, seqlens, block_table=table,
                                                                   backend=backend))
    assert planned == []


def test_plan_decisions_in_kernel_terms():
    """The torch path's choice depends only on the step's metadata: rows, lengths, layout."""
    k_rows = torch.zeros(3, 64, 2, 8)
    k_pages = torch.zeros(20, 8, 2, 8)
    table = torch.arange(18, dtype=torch.int32).view(3, 6)
    even, ragged, very = torch.tensor([40, 40, 40]), torch.tensor([40, 36, 40]), torch.tensor([40, 9, 40])
    assert plan_decode(even, k_rows, backend="torch").path == "padded"  # equal contiguous rows: one call
    assert plan_decode(ragged, k_rows, backend="torch").path == "per_row"  # one query, different lengths
    assert plan_decode(ragged, k_rows, num_queries=2, backend="torch").path == "padded"  # little padding
    assert plan_decode(very, k_rows, num_queries=2, backend="torch").groups == ((0, 2), (1,))  # much padding
    assert plan_decode(even, k_pages, block_table=table, backend="torch").path == "per_row"  # paged: in place
    assert plan_decode(even, k_pages, block_table=table, window=4, backend="torch").path == "groups"
    assert plan_decode(even, k_pages, block_table=table, backend="torch").page_starts == {0: 0, 1: 6, 2: 12}
    assert plan_decode(40, k_rows, backend="torch").lengths == (40, 40, 40)


def test_plan_must_match_the_call():
    q, k, v, seqlens, table = _case([20, 30], 1, 4, 2, 64, page_size=16, seed=9)
    plan = plan_decode(seqlens, k, block_table=table, backend="torch")
    with pytest.raises(ValueError, match="other cache_seqlens or block_table"):
        decode_attention(q, k, v, seqlens.clone(), block_table=table, backend="torch", plan=plan)
    with pytest.raises(ValueError, match="other cache_seqlens or block_table"):
        decode_attention(q, k, v, seqlens, block_table=table.clone(), backend="torch", plan=plan)
    with pytest.raises(ValueError, match=r"\(batch, Sq, k_cache.shape\[1\], window, device\)"):
        decode_attention(q.repeat(1, 2, 1, 1), k, v, seqlens, block_table=table, backend="torch", plan=plan)
    with pytest.raises(ValueError, match="window"):
        decode_attention(q, k, v, seqlens, block_table=table, window=5, backend="torch", plan=plan)
    with pytest.raises(TypeError, match="DecodePlan"):
        decode_attention(q, k, v, seqlens, block_table=table, backend="torch", plan="plan")
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[Sq=1, 48\]"):
        plan_decode(torch.tensor([20, 49], device=DEVICE), k, block_table=table)
    with pytest.raises(ValueError, match="num_queries"):
        plan_decode(seqlens, k, num_queries=17, block_table=table)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="plan was made for backend 'triton'"):
            decode_attention(q, k, v, seqlens, block_table=table, backend="torch",
                             plan=plan_decode(seqlens, k, block_table=table, backend="triton"))
    # an int length: the same int is the same lengths
    q, k, v, _, _ = _case([30, 30], 1, 4, 2, 64, seed=9)
    plan = plan_decode(30, k, backend="torch")
    torch.testing.assert_close(decode_attention(q, k, v, 30, backend="torch", plan=plan),
                               decode_attention(q, k, v, 30, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sixteen_queries_gqa8(backend):
    _check(_case([16, 95], 16, 8, 1, 64, seed=4), backend, num_splits=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    # bf16 is storage-only under the interpreter: the kernel upcasts before tl.dot.
    _check(_case([33, 101], 2, 6, 2, 96, page_size=32, dtype=dtype, seed=5), backend, num_splits=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_layout_cache_view(backend):
    # transformers stores (B, H_kv, S, D); its transpose is a strided (B, S, H_kv, D) view.
    q, k, v, seqlens, _ = _case([40, 40], 1, 4, 2, 64, seed=6)
    k_hf, v_hf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    _check((q, k_hf.transpose(1, 2), v_hf.transpose(1, 2), seqlens, None), backend)


def test_backends_agree_and_int_seqlens():
    if not HAS_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    q, k, v, _, _ = _case([50], 1, 4, 2, 64, seed=7)
    a = decode_attention(q, k, v, 50, backend="torch")
    b = decode_attention(q, k, v, 50, backend="triton", num_splits=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stats_are_zero_past_each_length():
    q, k, v, seqlens, table = _case([5, 20], 1, 2, 1, 64, page_size=16, seed=8)
    _, stats = decode_attention(q, k, v, seqlens, block_table=table, return_stats=True, backend="torch")
    assert stats.shape == (2, 1, table.shape[1] * 16)
    assert stats[0, :, 5:].abs().sum() == 0 and stats[1, :, 20:].abs().sum() == 0


def test_choose_num_splits():
    pytest.importorskip("triton")
    from effllm.kernels.triton.decode import choose_num_splits

    cpu = torch.device("cpu")
    assert choose_num_splits(1, 1, 100, cpu) == 1  # short cache: one split
    assert choose_num_splits(1, 1, 32768, cpu) == 8  # long cache, little parallel work: split it
    assert choose_num_splits(64, 8, 32768, cpu) == 1  # plenty of (batch, head) programs already


# ---- bad input: ValueError naming the argument, before anything runs -------------------------

def _bad(match, **changes):
    q, k, v, seqlens, table = _case([20, 30], 1, 4, 2, 64, page_size=16, seed=9)
    args = {"q": q, "k_cache": k, "v_cache": v, "cache_seqlens": seqlens, "block_table": table} | changes
    with pytest.raises(ValueError, match=match):
        decode_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("cache_seqlens"),
                         backend="torch", **args)


def test_bad_inputs():
    q, k, v, seqlens, table = _case([20, 30], 1, 4, 2, 64, page_size=16, seed=9)
    _bad(r"q must be \(batch, Sq", q=torch.zeros(2, 17, 4, 64, device=DEVICE))
    _bad(r"H_kv dividing 3 query heads", q=torch.zeros(2, 1, 3, 64, device=DEVICE))
    _bad(r"D = 32", q=torch.zeros(2, 1, 4, 32, device=DEVICE))
    _bad(r"share one dtype", q=q.half())
    _bad(r"one shape", v_cache=v[:, :8])
    _bad(r"cache_seqlens must be .* shape \(2,\)", cache_seqlens=seqlens[:1])
    _bad(r"cache_seqlens must be .* int32/int64", cache_seqlens=seqlens.float())
    _bad(r"cache_seqlens must lie in \[Sq=1, 48\]", cache_seqlens=torch.tensor([20, 49], dtype=torch.int32, device=DEVICE))
    _bad(r"cache_seqlens must lie in \[Sq=1", cache_seqlens=torch.tensor([0, 5], dtype=torch.int32, device=DEVICE))
    broken = table.clone()
    broken[1, 1] = k.shape[0]
    _bad(r"block_table\[1, 1\] = .* out of range", block_table=broken)
    _bad(r"block_table must be an int32/int64 tensor of shape \(2, max_pages\)", block_table=table[:1])
    _bad(r"with batch 2", block_table=None, k_cache=k[:3], v_cache=v[:3])
    _bad(r"window", window=(-3, 0))
    _bad(r"softcap", softcap=-1.0)
    _bad(r"num_splits", num_splits=0)
    _bad(r"cache_seqlens must lie in \[Sq=1, 48\], got 49", cache_seqlens=49)


def test_unused_table_entries_may_hold_anything():
    q, k, v, seqlens, table = _case([20, 30], 1, 4, 2, 64, page_size=16, seed=9)
    table[:, -1] = -1  # past every sequence's pages: never read, so not an error
    out = decode_attention(q, k, v, seqlens, block_table=table, backend="torch")
    ref, _, _ = decode_reference(q, k, v, seqlens, block_table=table)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_needs_no_grad():
    q, k, v, seqlens, _ = _case([20], 1, 2, 1, 64)
    with pytest.raises(RuntimeError, match="inference-only"):
        decode_attention(q.requires_grad_(), k, v, seqlens, backend="torch")


# ---- the custom op ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
def test_opcheck(backend):
    q, k, v, seqlens, table = _case([20, 37], 2, 4, 2, 32, page_size=16, seed=10)
    for args in ((q, k, v, seqlens, table, None, -1, None, 2, True, backend, True),
                 (q, k[:2], v[:2], seqlens, None, 0.2, 9, 10.0, None, False, backend, False)):
        if args[4] is None:
            args = (q, *(torch.randn(2, 40, 2, 32, device=DEVICE) for _ in range(2)), *args[3:])
        torch.library.opcheck(decode_attention_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compiles_fullgraph():
    q, k, v, seqlens, table = _case([20, 37], 1, 4, 2, 32, page_size=16, seed=11)

    def step(q, k, v, seqlens, table):
        out, stats = decode_attention(q, k, v, seqlens, block_table=table, return_stats=True, backend="torch")
        return out * 2, stats

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(step, fullgraph=True, backend=capture)
    for got, want in zip(compiled(q, k, v, seqlens, table), step(q, k, v, seqlens, table)):
        torch.testing.assert_close(got, want)
    assert any("effllm.decode_attention" in str(node.target) for node in graphs[0].graph.nodes)
