"""effllm/native: the fused CPU loops are taken where they apply, built once per source and CPU,
refuse bad input by name, and fall back to the torch path (with one warning) where no compiler
works. Their results against dequantize-then-attend are in tests/test_kv_codes_attention.py, the
softmax pass's against the reference in tests/test_kernel_scores.py (every CPU test there runs
with and without them)."""

import os
import shutil

import pytest
import torch

from effllm import native
from effllm.kv import KIVI, NSNQuant
from effllm.kv import codes_attention as ca

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None,
                                reason="no C compiler on PATH: the torch path is all there is")


def _filled(config, tokens=200, dim=64, kv_heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    store = config.new_store()
    store.append(torch.randn(1, kv_heads, tokens, dim, generator=gen), torch.randn(1, kv_heads, tokens, dim, generator=gen))
    return store


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A build into an empty cache directory; the process's own build is restored afterwards."""
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    monkeypatch.delenv("EFFLLM_NATIVE", raising=False)
    native._load.cache_clear()
    yield tmp_path
    native._load.cache_clear()


@pytest.mark.parametrize("config,torch_path,native_path", [
    (NSNQuant(bits=2), "_nsn_attend_torch", "_nsn_attend_native"),
    (KIVI(bits=2, group=32, residual=32), "_kivi_attend_torch", "_kivi_attend_native")])
def test_decode_steps_take_the_loops_and_the_switch_turns_them_off(monkeypatch, config, torch_path, native_path):
    store = _filled(config)
    query = torch.randn(1, 6, 1, 64)
    expected = store.attend(query, 0.125)

    def refuse(*_args):
        raise AssertionError("wrong path")

    monkeypatch.setattr(ca, torch_path, refuse)
    torch.testing.assert_close(store.attend(query, 0.125), expected, rtol=0, atol=0)
    monkeypatch.undo()
    monkeypatch.setenv("EFFLLM_NATIVE", "0")
    monkeypatch.setattr(ca, native_path, refuse)
    assert not native.available() and native.why_unavailable() == "EFFLLM_NATIVE is off"
    torch.testing.assert_close(store.attend(query, 0.125), expected, rtol=1e-5, atol=2e-6)


def test_more_query_rows_than_the_loops_hold_take_the_torch_path(monkeypatch):
    store = _filled(NSNQuant(bits=1, residual=8, chunk=16), tokens=120)
    assert native.MAX_ROWS == 64

    def refuse(*_args):
        raise AssertionError("wrong path")

    monkeypatch.setattr(ca, "_nsn_attend_native", refuse)
    assert store.attend(torch.randn(1, 4, 40, 64), 0.125).shape == (1, 40, 4, 64)  # 80 rows a group: torch
    monkeypatch.undo()
    monkeypatch.setattr(ca, "_nsn_attend_torch", refuse)
    assert store.attend(torch.randn(1, 2, 40, 64), 0.125).shape == (1, 40, 2, 64)  # 40 rows: the loops


def test_the_build_is_cached_per_source_and_cpu(fresh_build):
    assert native.available(), native.why_unavailable()
    built = list((fresh_build / "native").glob("codes-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._load.cache_clear()
    assert native.available()
    assert list((fresh_build / "native").glob("*")) == built and built[0].stat().st_mtime_ns == stamp


def test_without_a_compiler_the_torch_path_runs_after_one_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    query = torch.randn(1, 4, 1, 64)
    with pytest.warns(RuntimeWarning, match="unavailable.*no C compiler"):
        store = _filled(NSNQuant(bits=2))  # the codes are made (encoded) through the same library
    out = store.attend(query, 0.125)
    assert not native.available() and "no-such-cc" in native.why_unavailable()
    torch.testing.assert_close(out, ca._unrows(ca._nsn_attend_torch(ca._rows(query, 2), store, 0.125, None, 1)[0],
                                               4, 1, query.dtype), rtol=0, atol=0)


def test_a_failing_compiler_says_why(fresh_build, monkeypatch):
    fake = fresh_build / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: fatal error: out of disk' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(RuntimeWarning, match="out of disk"):
        assert not native.available()
    assert not list((fresh_build / "native").glob("*.so"))


def test_a_compiler_without_openmp_builds_the_serial_loops(fresh_build, monkeypatch):
    # clang without libomp refuses -fopenmp: the loops are built without it and give the same results
    real = shutil.which(os.environ.get("CC") or "cc")
    query = torch.randn(1, 4, 1, 64)
    monkeypatch.setattr(native, "TOKENS_PER_THREAD", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert native.openmp()  # this machine's compiler takes -fopenmp: the work is cut in 2
        cut = _filled(NSNQuant(bits=2), tokens=300).attend(query, 0.125)
        native._load.cache_clear()
        fake = fresh_build / "cc"
        fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
        fake.chmod(0o755)
        monkeypatch.setenv("CC", str(fake))
        assert native.available() and not native.openmp()
        serial = _filled(NSNQuant(bits=2), tokens=300).attend(query, 0.125)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(serial, cut, rtol=1e-5, atol=1e-6)


def test_work_is_cut_one_range_a_thread_with_enough_tokens_each():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert native.parts(8, 10**6) == 1
        torch.set_num_threads(3)
        per = native.TOKENS_PER_THREAD
        if not native.openmp():  # built without OpenMP: ranges would only run one after another
            assert native.parts(3, 4000) == 1
            return
        assert native.parts(3, 4000) == 3 and native.parts(2, per) == 2 and native.parts(1, 2 * per - 1) == 1
    finally:
        torch.set_num_threads(threads)


def test_each_range_keeps_its_own_value_sum(monkeypatch):
    # range p's sum is the serial sum of its tokens alone (the others' weights zeroed): a range
    # writing into another's sum would pass the summed result while racing when run in parallel
    store = _filled(NSNQuant(bits=2, residual=8, chunk=16), tokens=300, kv_heads=2)
    codes = store.value_codes
    flat, tokens, chunks = 2, codes.tokens(), codes.shift.shape[2]
    weights = torch.rand(flat, 3, tokens, generator=torch.Generator().manual_seed(6))
    args = (*ca._native_codes(codes, flat), codes.chunk, ca.codebook(8).vectors.contiguous(), 0.5, codes.stages)
    monkeypatch.setattr(native, "parts", lambda heads, tokens: 3)
    by_range, _ = native.nsn_values(weights, *args, by_range=True)
    monkeypatch.setattr(native, "parts", lambda heads, tokens: 1)
    assert by_range.shape[0] == 3
    for part in range(3):
        lo, hi = chunks * part // 3 * codes.chunk, min(tokens, chunks * (part + 1) // 3 * codes.chunk)
        alone = torch.zeros_like(weights)
        alone[..., lo:hi] = weights[..., lo:hi]
        torch.testing.assert_close(by_range[part], native.nsn_values(alone, *args)[0], rtol=1e-5, atol=1e-6)
    kivi = _filled(KIVI(bits=2, group=32, residual=32), tokens=300, kv_heads=2)
    block = kivi.value_blocks[0]
    tokens = block.tokens()
    weights = torch.rand(flat, 3, tokens, generator=torch.Generator().manual_seed(7))
    args = (block.codes.reshape(flat, tokens, -1).contiguous(), block.scale.float().reshape(flat, tokens, 2).contiguous(),
            block.minimum.float().reshape(flat, tokens, 2).contiguous(), block.bits, block.group)
    monkeypatch.setattr(native, "parts", lambda heads, tokens: 3)
    by_range = native.kivi_values(weights, *args, torch.zeros(flat, 3, 64), by_range=True)
    monkeypatch.setattr(native, "parts", lambda heads, tokens: 1)
    for part in range(3):
        lo, hi = tokens * part // 3, tokens * (part + 1) // 3
        alone = torch.zeros_like(weights)
        alone[..., lo:hi] = weights[..., lo:hi]
        torch.testing.assert_close(by_range[part], native.kivi_values(alone, *args, torch.zeros(flat, 3, 64)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [NSNQuant(bits=2), NSNQuant(bits=1, residual=8, chunk=16),
                                    KIVI(bits=2, group=32, residual=32)])
def test_ranges_of_one_head_on_different_threads_give_the_serial_result(monkeypatch, config):
    # 2 heads cut in 3 ranges each on 3 threads: a head's ranges land on different threads, so
    # a sum two threads share would race (stores large enough that a race shows)
    if not native.openmp():
        pytest.skip("built without OpenMP: nothing runs in parallel")
    store = _filled(config, tokens=1500, kv_heads=2)
    query = torch.randn(1, 6, 1, 64, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = store.attend(query, 0.125)
        torch.set_num_threads(3)
        monkeypatch.setattr(native, "TOKENS_PER_THREAD", 1)
        assert native.parts(2, 1500) == 3
        for _ in range(20):
            torch.testing.assert_close(store.attend(query, 0.125), serial, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_bad_arguments_are_refused_by_name():
    codes = torch.zeros(2, 10, 16, dtype=torch.uint8)
    rotated, vectors = torch.zeros(2, 3, 64), torch.zeros(256, 8)
    scales, grid = torch.zeros(2, 10, 2, dtype=torch.uint8), torch.zeros(2, 1, 4)
    qmu, out = torch.zeros(2, 3, 1), torch.zeros(2, 3, 10)
    native.nsn_scores(rotated, vectors, codes, scales, grid, None, 64, qmu, 0.5, out)  # the valid call
    with pytest.raises(ValueError, match="codes must be a contiguous torch.uint8"):
        native.nsn_scores(rotated, vectors, codes.long(), scales, grid, None, 64, qmu, 0.5, out)
    with pytest.raises(ValueError, match=r"grid must be .* \(2, 1, 4\)"):
        native.nsn_scores(rotated, vectors, codes, scales, torch.zeros(2, 2, 4), None, 64, qmu, 0.5, out)
    with pytest.raises(ValueError, match="out must be float32"):
        native.nsn_scores(rotated, vectors, codes, scales, grid, None, 64, qmu, 0.5, out.transpose(0, 1))
    with pytest.raises(ValueError, match="at most 64 rows"):
        native.nsn_scores(torch.zeros(2, 65, 64), vectors, codes, scales, grid, None, 64, torch.zeros(2, 65, 1), 0.5,
                          torch.zeros(2, 65, 10))
    with pytest.raises(ValueError, match="bits in"):
        native.kivi_key_scores(torch.zeros(2, 3, 64), codes, torch.zeros(2, 1, 64), torch.zeros(2, 1, 64), 3, 10,
                               out)
    # rows of different lengths, each in tensors of its own
    row = (codes[0], scales[0], grid[0], None)
    native.nsn_scores(rotated, vectors, native.RowCodes([row, None], slots=16), None, None, None, 64, qmu, 0.5, out)
    with pytest.raises(ValueError, match=r"rows\[0\] counts add up to 7, not its 10 tokens"):
        native.RowCodes([(codes[0], scales[0], grid[0], torch.tensor([7], dtype=torch.int32))], slots=16)
    block = (codes[0, :, :16], torch.zeros(1, 64), torch.zeros(1, 64))  # 10 keys: not whole groups of 8
    with pytest.raises(ValueError, match=r"rows\[0\] holds 10 keys, not groups of 8"):
        native.RowBlocks([block], dim=64, bits=2, group=8, per_token=False)
    keys = native.RowBlocks([(codes[0, :8, :16], torch.zeros(1, 64), torch.zeros(1, 64))], dim=64, bits=2, group=8,
                            per_token=False)
    with pytest.raises(ValueError, match="blocks built for dim=64, bits=2, group=8, read as dim=64, bits=4"):
        native.kivi_key_scores(torch.zeros(1, 3, 64), keys, None, None, 4, 8, torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match=r"rows\[1\] scales must be a contiguous torch.uint8"):
        native.RowCodes([row, (codes[1], scales[1].float(), grid[1], None)], slots=16)
    with pytest.raises(ValueError, match=r"rows\[0\] codes must be .* \(10, 8\)"):
        native.RowCodes([row], slots=8)
    with pytest.raises(ValueError, match="1 rows of codes for 2 heads"):
        native.nsn_scores(rotated, vectors, native.RowCodes([row], slots=16), None, None, None, 64, qmu, 0.5, out)
    # a row rewritten in place: a bad row is refused with the table as it was; a good one changes
    # that row's entry and the sizes the loops read
    table = native.RowCodes([row, None], slots=16)
    before = table.table.clone()
    with pytest.raises(ValueError, match=r"rows\[1\] scales must be a contiguous torch.uint8"):
        table.replace(1, (codes[1], scales[1].float(), grid[1], None))
    assert torch.equal(table.table, before) and (table.tokens, table.total) == (10, 10)
    table.replace(1, (codes[1, :4], scales[1, :4], grid[1], None))
    assert table.table[1].tolist()[4:] == [4, 1] and (table.tokens, table.total) == (10, 14)
    table.replace(0, None)
    assert table.table[0].tolist() == [0] * 6 and (table.tokens, table.chunks, table.total) == (4, 1, 4)


@pytest.mark.parametrize("stages", [1, 2])
def test_the_encoder_loop_chooses_the_codes_the_torch_encoder_chooses(monkeypatch, stages):
    # Standard normals and real-looking scales: the loop computes the dot products in another
    # order than torch's matmul, so only exact near-ties could go the other way; each code's error
    # must match the torch choice's to rounding, and almost every code must be the same
    from effllm.kv import codebook as cb

    book = cb.codebook(8)
    gen = torch.Generator().manual_seed(stages)
    y = torch.randn(20000, 8, generator=gen) * torch.rand(20000, 1, generator=gen) * 3
    taken = []
    original = native.nsn_encode
    monkeypatch.setattr(native, "nsn_encode", lambda *args: taken.append(1) or original(*args))
    got = cb.encode(y, book, stages)
    assert taken, "the CPU encoder did not take the loop"
    # a NaN sub-vector gets code 0, as torch's argmax gives it, not an out-of-range code
    nan = torch.full((2, 8), float("nan"))
    assert native.nsn_encode(nan, book.vectors, book.beta, stages, cb.BEAM).tolist() == [[0] * stages] * 2
    taken.clear()
    monkeypatch.setenv("EFFLLM_NATIVE", "0")
    want = cb.encode(y, book, stages)
    assert not taken  # switched off: the torch ops
    same = (got == want).all(1)
    assert same.float().mean() > 0.999

    def error(codes):
        return (y - cb.decode(codes, book)).square().sum(1)

    torch.testing.assert_close(error(got), error(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="1-2 stages"):
        native.nsn_encode(y, book.vectors, book.beta, 3, cb.BEAM)
    with pytest.raises(ValueError, match="y must be a contiguous torch.float32"):
        native.nsn_encode(y.double(), book.vectors, book.beta, stages, cb.BEAM)
    with pytest.raises(ValueError, match=r"a multiple of 8 vectors \(8 to 256\)"):
        native.nsn_encode(y, book.vectors[:0], book.beta, stages, cb.BEAM)


@pytest.mark.parametrize("stages", [1, 2])
def test_rows_read_through_their_table_as_the_same_rows_in_one_tensor(stages, monkeypatch):
    # rows of equal length read through RowCodes give the uniform call's scores and value sums;
    # with rows of fewer chunks, the chunk weights past a row's chunks are exactly zero (written,
    # not left as the allocation's garbage: empty tensors are NaN-filled here)
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    store = _filled(NSNQuant(bits=stages, residual=8, chunk=16), tokens=200, kv_heads=3)
    codes = store.key_codes
    flat, tokens, chunks = 3, codes.tokens(), codes.shift.shape[2]
    uniform = ca._native_codes(codes, flat)
    rows = native.RowCodes([tuple(t[r] if t is not None else None for t in uniform) for r in range(flat)],
                           slots=codes.codes.shape[-1])
    gen = torch.Generator().manual_seed(2)
    rotated, qmu = torch.randn(flat, 3, 64, generator=gen), torch.randn(flat, 3, chunks, generator=gen)
    book = ca.codebook(8)
    vectors = book.vectors.contiguous()
    want, got = torch.full((flat, 3, tokens), 7.0), torch.full((flat, 3, tokens), 7.0)
    native.nsn_scores(rotated, vectors, *uniform, codes.chunk, qmu, book.beta, want)
    native.nsn_scores(rotated, vectors, rows, None, None, None, codes.chunk, qmu, book.beta, got)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    weights = torch.rand(flat, 3, tokens, generator=gen)
    args = (codes.chunk, vectors, book.beta, codes.stages)
    want = native.nsn_values(weights, *uniform, *args)
    got = native.nsn_values(weights, rows, None, None, None, *args)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    short = [tuple(t[r] if t is not None else None for t in uniform) for r in range(flat)]
    short[1] = (short[1][0][:tokens // 2], short[1][1][:tokens // 2], short[1][2][:chunks // 2], None)
    torch.use_deterministic_algorithms(True)
    try:
        _, chunk_w = native.nsn_values(weights, native.RowCodes(short, slots=codes.codes.shape[-1]), None, None, None,
                                       *args)
    finally:
        torch.use_deterministic_algorithms(False)
    assert (chunk_w[1, :, chunks // 2:] == 0).all() and not chunk_w.isnan().any()


def _rows_reference(q, keys, values, lengths, scale, softcap):
    """Explicit float64 attention of ``q (R, G, D)`` over each row's first ``lengths[r]`` keys."""
    scores = torch.einsum("rgd,rtd->rgt", q.double(), keys.double()) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    hide = torch.arange(keys.shape[1])[None, None] >= lengths[:, None, None]
    probs = scores.masked_fill(hide, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("rgt,rtd->rgd", probs, values.double()), probs.sum(1)


@pytest.mark.parametrize("page_size", [None, 4, 64])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_rows_decode_reads_each_row_where_it_lies(page_size, softcap):
    # A ragged layer's rows, as one tensor or as pages in a shuffled pool: each row's output and
    # the mass of each of its tokens are those of explicit attention over its own keys only.
    from effllm.kv.ragged import RaggedKV

    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([37, 1, 0, 53, 9])  # odd, one token, an empty row
    keys, values = torch.randn(5, 53, 16, generator=gen), torch.randn(5, 53, 16, generator=gen)
    store = RaggedKV.from_padded(keys, values, torch.arange(53)[None] < lengths[:, None], page_size=page_size)
    if page_size is not None:  # pages anywhere in the pool, not one run per row
        perm = torch.randperm(store.k.shape[0], generator=gen)
        store.k, store.v = store.k[perm.argsort()], store.v[perm.argsort()]
        store.block_table = perm[store.block_table.long()].to(torch.int32)
    q = torch.randn(5, 3, 16, generator=gen)
    out, mass = native.rows_decode(q, **store.native_args(), scale=0.3, softcap=softcap, need_mass=True)
    expect_out, expect_mass = _rows_reference(q, keys, values, lengths, 0.3, softcap)
    torch.testing.assert_close(out, expect_out.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass, expect_mass.float(), rtol=1e-5, atol=1e-6)
    assert mass.shape == (5, 53) and not out[2].any() and not mass[2].any() and not mass[1, 1:].any()
    alone, none = native.rows_decode(q, **store.native_args(), scale=0.3, softcap=softcap, need_mass=False)
    assert none is None
    torch.testing.assert_close(alone, out, rtol=0, atol=0)


def test_rows_decode_makes_a_nan_query_heads_output_nan_and_no_other():
    from effllm.kv.ragged import RaggedKV

    keys = torch.randn(2, 7, 8)
    store = RaggedKV.from_padded(keys, keys.flip(1), torch.ones(2, 7, dtype=torch.bool), page_size=None)
    q = torch.randn(2, 2, 8)
    q[1, 0, 3] = float("nan")
    out, mass = native.rows_decode(q, **store.native_args(), scale=1.0, softcap=None, need_mass=True)
    assert out[1, 0].isnan().all() and not out[1, 1].isnan().any() and not out[0].isnan().any()
    assert mass[1].isnan().all() and not mass[0].isnan().any()  # the mass sums the row's heads


def test_rows_decode_gives_far_logits_no_weight_and_a_nan_key_its_row():
    # logits hundreds of nats below the largest leave the fast exp's range: they weigh nothing
    # (not NaN); a NaN in one key makes every head of its row NaN, and no other row
    from effllm.kv.ragged import RaggedKV

    gen = torch.Generator().manual_seed(4)
    keys, values = torch.randn(3, 11, 16, generator=gen), torch.randn(3, 11, 16, generator=gen)
    keys[:, 2], keys[:, 5] = 10.0, -10.0  # with the all-ones query below: logits 160 and -160
    lengths = torch.tensor([11, 6, 9])
    store = RaggedKV.from_padded(keys, values, torch.arange(11)[None] < lengths[:, None], page_size=4)
    q = torch.ones(3, 2, 16)
    out, mass = native.rows_decode(q, **store.native_args(), scale=1.0, softcap=None, need_mass=True)
    expect_out, expect_mass = _rows_reference(q, keys, values, lengths, 1.0, None)
    torch.testing.assert_close(out, expect_out.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass, expect_mass.float(), rtol=1e-5, atol=1e-6)
    assert not mass[:, 5].any()  # e^-320 of the largest: exactly 0, as float32's exp gives
    store.k[store.block_table[1, 0], 3, 7] = float("nan")  # row 1's token 3
    out, mass = native.rows_decode(q, **store.native_args(), scale=1.0, softcap=None, need_mass=True)
    assert out[1].isnan().all() and mass[1, :6].isnan().all()
    assert not out[[0, 2]].isnan().any() and not mass[[0, 2]].isnan().any()


def test_rows_decode_refuses_bad_arguments_by_name():
    k = torch.zeros(3, 10, 16)
    table = torch.zeros(2, 3, dtype=torch.int32)
    lengths = torch.tensor([4, 9], dtype=torch.int32)
    q = torch.zeros(2, 2, 16)
    native.rows_decode(q, k, k, table, lengths, width=9, scale=1.0, softcap=None, need_mass=False)  # the valid call
    with pytest.raises(ValueError, match="q must be a contiguous torch.float32"):
        native.rows_decode(q.double(), k, k, table, lengths, width=9, scale=1.0, softcap=None, need_mass=False)
    with pytest.raises(ValueError, match="lengths must be a contiguous torch.int32"):
        native.rows_decode(q, k, k, table, lengths.long(), width=9, scale=1.0, softcap=None, need_mass=False)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, min\(width=8, capacity=30\)\], got up to 9"):
        native.rows_decode(q, k, k, table, lengths, width=8, scale=1.0, softcap=None, need_mass=False)
    with pytest.raises(ValueError, match=r"table must hold page ids in \[0, 3\)"):
        native.rows_decode(q, k, k, table + 3, lengths, width=9, scale=1.0, softcap=None, need_mass=False)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, min\(width=12, capacity=10\)\], got up to 12"):
        native.rows_decode(q, k[:2], k[:2], None, torch.tensor([4, 12], dtype=torch.int32), width=12, scale=1.0,
                           softcap=None, need_mass=False)
    with pytest.raises(ValueError, match="softcap must be None or > 0"):
        native.rows_decode(q, k, k, table, lengths, width=9, scale=1.0, softcap=-5.0, need_mass=False)
    with pytest.raises(ValueError, match="q must be on the CPU, got meta"):
        native.rows_decode(q.to("meta"), k, k, table, lengths, width=9, scale=1.0, softcap=None, need_mass=False)
    with pytest.raises(ValueError, match="k holds 3 rows for 2 rows of queries"):
        native.rows_decode(q, k, k, None, lengths, width=9, scale=1.0, softcap=None, need_mass=False)
    with pytest.raises(ValueError, match="D must be a multiple of 8"):
        native.rows_decode(torch.zeros(2, 2, 12), torch.zeros(2, 10, 12), torch.zeros(2, 10, 12), None, lengths,
                           width=9, scale=1.0, softcap=None, need_mass=False)


def test_the_softmax_pass_runs_for_cpu_scores_and_not_under_autograd(monkeypatch):
    from effllm.kernels.scores import softmax_attention

    calls = []
    real = native.softmax_rows
    monkeypatch.setattr(native, "softmax_rows", lambda *a, **kw: calls.append(kw["write"]) or real(*a, **kw))
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    softmax_attention(q, k, need_out=False, need_mass=True)
    assert calls == [False]  # only the mass asked for: the probabilities need not be written
    q.requires_grad_()
    softmax_attention(q, k, k).out.sum().backward()  # autograd: the torch ops
    assert calls == [False] and q.grad is not None
    with torch.no_grad():
        softmax_attention(q, k, k)
    assert calls == [False, True]
    monkeypatch.setenv("EFFLLM_NATIVE", "0")
    softmax_attention(q.detach(), k, k)
    assert calls == [False, True]


def test_softmax_rows_refuses_bad_arguments_by_name():
    scores = torch.randn(2, 3, 4 * 5, 7)
    bounds = torch.zeros(1, 5, dtype=torch.int32), torch.full((1, 5), 7, dtype=torch.int32)
    ok = {"groups": 4, "write": True, "need_lse": True, "need_mass": True, "need_peak": False}
    lse, mass, peak = native.softmax_rows(scores.clone(), *bounds, **ok)
    assert lse.shape == (2, 3, 20) and mass.shape == (2, 3, 4, 7) and peak is None
    # ranges past the row are clamped to it: the same as the row exactly, nothing read outside it
    wide = torch.full((1, 5), -3, dtype=torch.int32), torch.full((1, 5), 12, dtype=torch.int32)
    wide_lse, wide_mass, _ = native.softmax_rows(scores.clone(), *wide, **ok)
    assert torch.equal(wide_lse, lse) and torch.equal(wide_mass, mass)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))
    cases = [
        ((scores.double(), *bounds), ok, "scores must be float32"),
        ((scores.transpose(2, 3).contiguous().transpose(2, 3), *bounds), ok, "unit stride"),
        ((scores, *bounds), {**ok, "groups": 3}, "not groups=3"),
        ((scores, bounds[0].long(), bounds[1]), ok, "lo must be"),
        ((scores, bounds[0], bounds[1][:, :4]), ok, "hi must be"),
        ((scores, bounds[0].expand(3, 5).contiguous(), bounds[1].expand(3, 5).contiguous()), ok, "1 or 2 rows"),
        ((scores, *bounds), {**ok, "key_valid": torch.ones(2, 6, dtype=torch.bool)}, "key_valid must be"),
        ((scores, *bounds), {**ok, "query_valid": torch.ones(2, 5)}, "query_valid must be"),
        ((scores[:1].expand(2, -1, -1, -1), *bounds), ok, "do not overlap"),  # two batch rows, one buffer
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            native.softmax_rows(*args, **kwargs)
