"""Attention over KV codes (NSNQuant lookup tables, KIVI folded scales; the CPU path with and
without ``native``'s fused loops, and the Triton decode kernel under the interpreter) against
dequantize-then-attend."""

import copy
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effllm._backend import interpreting
from effllm.kv.codes_attention import dense_attend, kivi_attend, nsn_attend
from effllm.kv.nsnquant import NSNQuant, NSNStore
from effllm.kv.nsnquant import dequantize as nsn_dequantize
from effllm.kv.quantizers import KIVI, KIVIStore
from effllm.kv.quantizers import dequantize as kivi_dequantize

HAS_TRITON = torch.cuda.is_available() or interpreting()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel runs compiled on CUDA
BACKENDS = ["torch", pytest.param("triton", marks=[
    pytest.mark.interpret, pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")])]


def _store(config, batch, kv_heads, tokens, dim, *, dtype=torch.float32, steps=0, seed=0, device="cpu"):
    """A store filled with a prefill of ``tokens - steps`` tokens, then ``steps`` single ones."""
    gen = torch.Generator().manual_seed(seed)
    keys = (torch.randn(batch, kv_heads, tokens, dim, generator=gen) * 2 + torch.randn(dim, generator=gen))
    keys = keys.to(device, dtype)
    values = torch.randn(batch, kv_heads, tokens, dim, generator=gen).to(device, dtype)
    store = config.new_store()
    store.append(keys[:, :, :tokens - steps], values[:, :, :tokens - steps])
    for t in range(tokens - steps, tokens):
        store.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
    return store


def _query(batch, heads, seq_q, dim, seed=1, dtype=torch.float32):
    return torch.randn(batch, heads, seq_q, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _dequantized_fp32(store):
    """All keys and values dequantized straight to float32 (``keys()`` rounds to the store's
    dtype, which the code paths never do)."""
    if isinstance(store, NSNStore):
        coded = [(nsn_dequantize(store.key_codes, torch.float32), nsn_dequantize(store.value_codes, torch.float32))
                 if store.key_codes is not None else (store.key_window[:, :, :0].float(),) * 2]
        return (torch.cat([coded[0][0], store.key_window.float()], 2),
                torch.cat([coded[0][1], store.value_window.float()], 2))
    exact = [replace(b, scale=b.scale.float(), minimum=b.minimum.float()) for b in store.key_blocks + store.value_blocks]
    keys = [kivi_dequantize(b, torch.float32) for b in exact[:len(store.key_blocks)]] + [store.key_residual.float()]
    values = [kivi_dequantize(b, torch.float32) for b in exact[len(store.key_blocks):]] + [store.value_residual.float()]
    return torch.cat(keys, 2), torch.cat(values, 2)


def _against_dequantized(attend, store, query, scale, *, softcap=None, mass=True, **kw):
    keys, values = _dequantized_fp32(store)
    reference, ref_mass = dense_attend(keys, values, query.float(), scale, softcap=softcap, return_mass=True)
    if mass:
        out, got_mass = attend(store, query, scale, softcap=softcap, return_mass=True, **kw)
        torch.testing.assert_close(got_mass, ref_mass, rtol=1e-5, atol=2e-6)
    else:
        out = attend(store, query, scale, softcap=softcap, **kw)
    assert out.shape == (query.shape[0], query.shape[2], query.shape[1], query.shape[3]) and out.dtype == query.dtype
    return out.float(), reference


@pytest.mark.parametrize("bits,vector_dim", [(1, 8), (2, 8), (2, 4), (1, 4)])
@pytest.mark.parametrize("seq_q,softcap", [(1, None), (3, None), (5, 3.0)])
def test_nsn_attention_over_codes_equals_dequantize_then_attend(bits, vector_dim, seq_q, softcap, cpu_path):
    store = _store(NSNQuant(bits=bits, vector_dim=vector_dim, residual=4, chunk=16), 2, 2, 83, 32, steps=7)
    out, reference = _against_dequantized(nsn_attend, store, _query(2, 6, seq_q, 32), 0.25, softcap=softcap)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=2e-6)


def test_nsn_attention_over_codes_with_int8_shifts_equals_dequantize_then_attend(cpu_path):
    store = _store(NSNQuant(bits=2, residual=4, chunk=16, shift_bits=8), 2, 2, 83, 32, steps=7)
    assert store.key_codes.shift.dtype == torch.int8
    out, reference = _against_dequantized(nsn_attend, store, _query(2, 6, 3, 32), 0.25)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=2e-6)


def test_nsn_queries_inside_the_coded_part_are_causal(cpu_path):
    # residual 0: the last chunk's tokens, queries included, are codes
    store = _store(NSNQuant(bits=2, residual=0, chunk=8), 1, 2, 48, 16)
    assert store.coded_tokens() == 48
    out, reference = _against_dequantized(nsn_attend, store, _query(1, 4, 6, 16), 0.3)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=2e-6)


def test_nsn_attention_after_eviction_reads_uneven_chunks(cpu_path):
    store = _store(NSNQuant(bits=2, residual=4, chunk=8), 2, 3, 60, 16)
    gen = torch.Generator().manual_seed(2)
    index = torch.stack([torch.randperm(60, generator=gen)[:33].sort().values for _ in range(6)]).view(2, 3, 33)
    store.select_tokens(index)
    assert store.key_codes.counts is not None
    store.append(torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 16))
    out, reference = _against_dequantized(nsn_attend, store, _query(2, 6, 2, 16), 0.3)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nsn_low_precision_stores_read_in_float32(dtype, cpu_path):
    store = _store(NSNQuant(bits=2, residual=8, chunk=16), 1, 2, 70, 32, dtype=dtype)
    query = _query(1, 2, 1, 32, dtype=dtype)
    out, reference = _against_dequantized(nsn_attend, store, query, 0.2)
    # the only difference: the output's rounding to the query dtype
    torch.testing.assert_close(out, reference, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # cpu_path is the same for every example
@given(st.sampled_from([1, 2]), st.integers(1, 3), st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       st.integers(1, 90), st.integers(1, 4), st.sampled_from([8, 16, 24]), st.integers(0, 100))
def test_nsn_attention_matches_on_random_shapes(cpu_path, bits, batch, heads, tokens, seq_q, dim, seed):
    heads, kv_heads = heads
    seq_q = min(seq_q, tokens)
    store = _store(NSNQuant(bits=bits, residual=seed % 5, chunk=1 + seed % 13), batch, kv_heads, tokens, dim,
                   steps=min(seed % 4, tokens - 1), seed=seed)
    out, reference = _against_dequantized(nsn_attend, store, _query(batch, heads, seq_q, dim, seed=seed), 0.4)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=3e-6)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("seq_q,softcap", [(1, None), (4, 2.5)])
def test_kivi_attention_over_codes_equals_dequantize_then_attend(bits, seq_q, softcap, cpu_path):
    # keys and values hold different numbers of coded tokens: 80 coded keys, 64 coded values
    store = _store(KIVI(bits=bits, group=8, residual=16), 2, 2, 90, 32, steps=5)
    assert [len(store.key_blocks), len(store.value_blocks)] != [0, 0]
    out, reference = _against_dequantized(kivi_attend, store, _query(2, 4, seq_q, 32), 0.25, softcap=softcap)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=2e-6)


def test_kivi_attention_reads_bf16_stores(cpu_path):
    store = _store(KIVI(bits=2, group=16, residual=32), 1, 1, 100, 32, dtype=torch.bfloat16)
    out, reference = _against_dequantized(kivi_attend, store, _query(1, 3, 1, 32, dtype=torch.bfloat16), 0.2)
    torch.testing.assert_close(out, reference, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-3)


def test_bad_queries_are_refused():
    store = _store(NSNQuant(residual=4, chunk=8), 1, 2, 20, 16)
    for query in (torch.randn(1, 3, 1, 16), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 21, 16),
                  torch.randn(2, 1, 16), torch.ones(1, 2, 1, 16, dtype=torch.int64)):
        with pytest.raises(ValueError, match="nsn_attend: query"):
            nsn_attend(store, query, 0.1)
    with pytest.raises(ValueError, match="empty"):
        nsn_attend(NSNQuant().new_store(), torch.randn(1, 2, 1, 16), 0.1)
    with pytest.raises(ValueError, match="kivi_attend: query"):
        kivi_attend(_store(KIVI(group=8, residual=8), 1, 2, 20, 16), torch.randn(1, 3, 1, 16), 0.1)


# ---- the Triton kernel (interpreter on CPU) ----------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits,vector_dim,seq_q,softcap,residual,tokens,shift_bits", [
    (2, 8, 1, None, 8, 85, 16),    # decode
    (1, 8, 3, 2.0, 8, 85, 16),     # a few queries, softcap
    (2, 4, 3, None, 0, 80, 16),    # 4-dim vectors; every token coded, queries too (causal inside the kernel)
    (2, 8, 1, None, 8, 85, 8),     # int8 shifts (read as float32 by the kernel)
])
def test_triton_kernel_over_codes_equals_dequantize_then_attend(bits, vector_dim, seq_q, softcap, residual, tokens,
                                                               shift_bits):
    store = _store(NSNQuant(bits=bits, vector_dim=vector_dim, residual=residual, chunk=16, shift_bits=shift_bits),
                   2, 2, tokens, 32, steps=3, device=DEVICE)
    assert (store.coded_tokens() == tokens) == (residual == 0)
    out, reference = _against_dequantized(nsn_attend, store, _query(2, 6, seq_q, 32).to(DEVICE), 0.3,
                                          softcap=softcap, mass=False, backend="triton")
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=2e-6)


@pytest.mark.interpret
@pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_kernel_with_several_splits_and_evicted_chunks():
    from effllm.kernels.triton.decode_codes import nsn_decode_codes  # noqa: F401 (the module imports)

    store = _store(NSNQuant(bits=2, residual=4, chunk=8), 1, 2, 300, 16, dtype=torch.float16, device=DEVICE)
    gen = torch.Generator().manual_seed(4)
    index = torch.stack([torch.randperm(300, generator=gen)[:270].sort().values for _ in range(2)]).view(1, 2, 270)
    store.select_tokens(index.to(DEVICE))
    query = _query(1, 4, 1, 16, dtype=torch.float16).to(DEVICE)
    out, reference = _against_dequantized(nsn_attend, store, query, 0.3, mass=False, backend="triton")
    torch.testing.assert_close(out, reference, rtol=2 * torch.finfo(torch.float16).eps, atol=1e-3)


def test_kivi_store_keeps_one_block_and_codes_tokens_as_one_append_would(cpu_path):
    """Flushes append to one block (a reader makes a few calls per layer, not per flush); groups
    never straddle a flush, so step-by-step appends code every token as one append does."""
    config = KIVI(bits=2, group=8, residual=16)
    stepped = _store(config, 2, 3, 120, 32, steps=90)
    whole = _store(config, 2, 3, 120, 32)
    assert len(stepped.key_blocks) == 1 and len(stepped.value_blocks) == 1
    assert stepped.key_blocks[0].tokens() == whole.key_blocks[0].tokens() == 112
    for a, b in zip(stepped.key_blocks + stepped.value_blocks, whole.key_blocks + whole.value_blocks, strict=True):
        for name in ("codes", "scale", "minimum"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    query = _query(2, 6, 1, 32)
    torch.testing.assert_close(kivi_attend(stepped, query, 0.2), kivi_attend(whole, query, 0.2), rtol=0, atol=0)


def test_nsn_scales_per_chunk_equal_the_per_token_gather():
    """While every chunk is whole, scales and shifts broadcast over each chunk's tokens; the
    result equals the general per-token gather (which evicted chunks use) bit for bit."""
    from effllm.kv.codes_attention import _chunk_sums, _per_token, _scales

    store = _store(NSNQuant(bits=2, residual=8, chunk=16), 2, 3, 90, 32, steps=20)
    codes = store.key_codes
    assert codes.counts is None and codes.tokens() == 80
    general = replace(codes, counts=torch.full(codes.shift.shape[:3], 16, dtype=torch.int32))
    assert torch.equal(_scales(codes), _scales(general))
    per_chunk = torch.randn(2, 3, 4, codes.shift.shape[2])
    assert torch.equal(_per_token(per_chunk, codes), _per_token(per_chunk, general))
    per_token = torch.rand(2, 3, 4, 80)
    torch.testing.assert_close(_chunk_sums(per_token, codes), _chunk_sums(per_token, general), rtol=1e-6, atol=0)


def _rows_of_different_lengths(config, lengths, dim=16, seed=0):
    """``QuantizedRows`` of one store a row, row ``r`` holding ``lengths[r]`` tokens (its codes
    and window as a one-row store codes them), then two decode tokens, the second evicting from
    the first and third rows' codes (uneven chunks)."""
    from effllm.kv.quantized_rows import QuantizedRows

    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    keys = torch.randn(len(lengths), width, dim, generator=gen) * 2 + torch.randn(dim, generator=gen)
    values = torch.randn(len(lengths), width, dim, generator=gen)
    keep = torch.arange(width) < torch.tensor(lengths)[:, None]
    rows = QuantizedRows.from_padded(config, keys, values, keep)
    rows.append(torch.randn(len(lengths), 1, dim, generator=gen), torch.randn(len(lengths), 1, dim, generator=gen))
    drop = torch.zeros(len(lengths), rows.width(), dtype=torch.bool)
    drop[0, 3:9] = drop[2, 1:30:3] = True
    rows.keep(~drop)
    rows.append(torch.randn(len(lengths), 1, dim, generator=gen), torch.randn(len(lengths), 1, dim, generator=gen))
    return rows


def _one_by_one(rows, query, scale, softcap):
    """Each row's store attending on its own: ``(out (R, 1, G, D), mass (R, width))``."""
    out = torch.empty_like(query)
    mass = torch.zeros(len(rows.stores), rows.width())
    for row, store in enumerate(rows.stores):
        result, got = store.attend(query[row].transpose(0, 1)[None], scale, softcap=softcap, return_mass=True)
        out[row], mass[row, :got.shape[-1]] = result[0], got[0, 0]
    return out, mass


def _coded(store):
    """Tokens a one-row store holds as key codes."""
    if isinstance(store, NSNStore):
        return store.coded_tokens()
    return sum(block.tokens() for block in store.key_blocks)


@pytest.mark.parametrize("config", [NSNQuant(bits=2, residual=4, chunk=8),
                                    NSNQuant(bits=1, residual=4, chunk=8, shift_bits=8),
                                    KIVI(bits=2, group=8, residual=8), KIVI(bits=4, group=8, residual=16)],
                         ids=["nsn-2", "nsn-1-int8-shifts", "kivi-2", "kivi-4"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_rows_of_different_lengths_attend_in_one_pass_as_one_by_one(config, softcap, cpu_path, monkeypatch):
    """A decode step over rows of different lengths (``QuantizedRows``: KVzip's global scope, AdaKV,
    a padded batch) reads every row's codes in one pass of the native loops, with the result and
    attention mass of each row's store attending alone: rows with no codes yet, several chunks or
    groups, chunks left uneven by an eviction, a flush between steps, an eviction between steps,
    a copy whose original's codes change."""
    if cpu_path == "torch ops":
        pytest.skip("the one pass is the native loops' (without them each row attends alone)")
    store_class = NSNStore if isinstance(config, NSNQuant) else KIVIStore
    rows = _rows_of_different_lengths(config, [37, 5, 60, 21, 9])
    assert _coded(rows.stores[1]) == 0 and min(map(_coded, rows.stores[2:4])) > 0
    assert len({len(s) for s in rows.stores}) == 5

    def step(seed):
        query = torch.randn(len(rows.stores), 1, 3, 16, generator=torch.Generator().manual_seed(seed))
        expected = _one_by_one(rows, query, 0.4, softcap)
        with monkeypatch.context() as patch:  # the step must not fall back to the stores one by one
            patch.setattr(store_class, "attend", lambda *a, **k: pytest.fail("a row attended on its own"))
            out, mass = rows.attend(query, 0.4, softcap=softcap, need_stats=True, backend="auto")
        torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mass, expected[1], rtol=1e-5, atol=1e-7)

    step(1)
    coded = [_coded(store) for store in rows.stores]
    for _ in range(9):  # some rows flush new codes: the pass must read those, not the ones it read before
        rows.append(torch.randn(5, 1, 16), torch.randn(5, 1, 16))
    assert [_coded(store) for store in rows.stores] != coded
    step(2)
    keep = torch.ones(5, rows.width(), dtype=torch.bool)
    keep[3, :6] = keep[4, 2] = False
    rows.keep(keep)
    step(3)
    original, rows = rows, copy.deepcopy(rows)  # a copy reads its own codes, not the original's
    for store in original.stores:
        for codes in ([store.key_codes, store.value_codes] if store_class is NSNStore
                      else store.key_blocks + store.value_blocks):
            if codes is not None:
                codes.codes.zero_()
    step(4)


@pytest.mark.parametrize("config", [NSNQuant(bits=2, residual=4, chunk=8), KIVI(bits=2, group=8, residual=8)],
                         ids=["nsn", "kivi"])
def test_a_kept_reader_is_brought_up_to_date_row_by_row(config, cpu_path, monkeypatch):
    """The reader of a ragged quantized layer is kept from step to step, so its table must follow
    every flush: each step rewrites exactly the rows whose codes changed (a missed row would be
    read stale) and every step's result equals each row's store attending alone. A correctness
    check of the incremental update; no clock is read, no speed asserted (that is kv.batch's, in
    the benchmarks)."""
    from effllm import native

    if cpu_path == "torch ops":
        pytest.skip("the one pass is the native loops'")
    rows = _rows_of_different_lengths(config, [37, 5, 60, 21, 9])

    def held(store):
        return (store.key_codes, store.value_codes) if isinstance(store, NSNStore) else (
            tuple(store.key_blocks), tuple(store.value_blocks))

    def same(a, b):
        return all(x is y if not isinstance(x, tuple) else len(x) == len(y) and all(p is q for p, q in zip(x, y))
                   for x, y in zip(a, b))

    written, replace = [], native._RowTable.replace
    monkeypatch.setattr(native._RowTable, "replace",
                        lambda table, index, row: (written.append(index), replace(table, index, row))[1])
    gen = torch.Generator().manual_seed(5)
    rows.attend(torch.randn(5, 1, 3, 16, generator=gen), 0.4, softcap=None, need_stats=False, backend="auto")
    reader, flushed, quiet = rows._reader, 0, 0
    assert reader is not None
    for _ in range(12):
        before = [held(store) for store in rows.stores]
        rows.append(torch.randn(5, 1, 16, generator=gen), torch.randn(5, 1, 16, generator=gen))
        written.clear()
        query = torch.randn(5, 1, 3, 16, generator=gen)
        out, _ = rows.attend(query, 0.4, softcap=None, need_stats=False, backend="auto")
        changed = {row for row, store in enumerate(rows.stores) if not same(held(store), before[row])}
        assert rows._reader is reader and set(written) == changed
        torch.testing.assert_close(out, _one_by_one(rows, query, 0.4, None)[0], rtol=1e-5, atol=1e-6)
        flushed, quiet = flushed + bool(changed), quiet + (not changed)
    assert flushed and quiet  # steps with and without a flush were both seen


@pytest.mark.parametrize("config", [NSNQuant(bits=2, residual=0, chunk=8), KIVI(bits=2, group=8, residual=8)],
                         ids=["nsn-no-window", "kivi"])
def test_rows_read_a_decode_steps_own_token_exactly(config, cpu_path):
    """Rows of different lengths read over their codes: a step whose token completes a chunk or a
    key group still reads that token as computed (it is coded at the next step), as the uniform
    store does (``append(defer=True)``)."""
    from effllm.testing.compare import per_row_attention_reference

    rows = _rows_of_different_lengths(config, [37, 5, 60, 21, 9])
    gen = torch.Generator().manual_seed(7)
    for _ in range(9):  # every row completes a chunk or group in these steps
        keys, values = torch.randn(5, 1, 16, generator=gen), torch.randn(5, 1, 16, generator=gen)
        rows.append(keys, values)
        query = torch.randn(5, 1, 3, 16, generator=gen)
        out, _ = rows.attend(query, 0.4, softcap=None, need_stats=False, backend="auto")
        held = [(torch.cat([s.keys()[0, 0, :-1], keys[r]]), torch.cat([s.values()[0, 0, :-1], values[r]]))
                for r, s in enumerate(rows.stores)]
        # the 5 rows as one batch row's 5 KV heads, 3 query heads each
        reference = per_row_attention_reference(query[:, 0].reshape(1, 15, 1, 16), held, 0.4)
        torch.testing.assert_close(out.reshape(1, 1, 15, 16), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_of_a_low_precision_model_attend_in_one_pass_and_keep_no_float32_copies(dtype, cpu_path):
    """KIVI rows of a bf16 / fp16 model: the one pass reads float32 copies of their scales, made
    for the step and not kept to the next (nbytes would not count them); NSNQuant's reader holds
    only addresses and is kept."""
    from effllm.kv.quantized_rows import QuantizedRows

    if cpu_path == "torch ops":
        pytest.skip("the one pass is the native loops'")
    gen = torch.Generator().manual_seed(3)
    keep = torch.arange(40) < torch.tensor([40, 23, 31])[:, None]
    for config, kept in ((KIVI(bits=2, group=8, residual=8), False), (NSNQuant(bits=2, residual=4, chunk=8), True)):
        keys, values = (torch.randn(3, 40, 16, generator=gen).to(dtype) for _ in range(2))
        rows = QuantizedRows.from_padded(config, keys, values, keep)
        rows.append(*(torch.randn(3, 1, 16, generator=gen).to(dtype) for _ in range(2)))
        query = torch.randn(3, 1, 2, 16, generator=gen).to(dtype)
        expected = _one_by_one(rows, query, 0.3, None)[0]
        out, _ = rows.attend(query, 0.3, softcap=None, need_stats=False, backend="auto")
        torch.testing.assert_close(out, expected)
        assert (rows._reader is not None) == kept
