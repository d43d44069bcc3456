"""NSNQuant: the Hadamard transform, the NSN transform, the fixed codebook, packing, codes,
reconstruction error (Gaussian and real SmolLM2 KV), the per-layer store and bad input."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from effllm.kv.codebook import build_codebook, codebook, decode, encode
from effllm.kv.hadamard import fwht, hadamard_block, hadamard_matrix
from effllm.kv.nsnquant import (
    NSNQuant,
    dequantize,
    log_decode,
    log_encode,
    nsn_forward,
    nsn_inverse,
    pack_indices,
    quantize,
    unpack_indices,
)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def _rel(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).square().sum() / exact.float().square().sum())


def _outlier_data(shape, seed=0):
    """Tokens with a few large outlier channels and widely varying norms, like real keys."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    x[..., :3] += 12.0  # outlier channels with a consistent offset
    return x * torch.exp(torch.randn(*shape[:-1], 1, generator=gen))


# ---- transforms ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [8, 16, 64, 128])
def test_fwht_is_the_normalised_sylvester_hadamard_and_its_own_inverse(dim):
    x = torch.randn(5, 3, dim, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ _sylvester(dim), rtol=0, atol=1e-12)
    torch.testing.assert_close(fwht(fwht(x)), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim,block", [(80, 16), (96, 32), (72, 8), (24, 8)])
def test_other_head_dims_rotate_in_power_of_two_blocks(dim, block):
    assert hadamard_block(dim) == block
    matrix = hadamard_matrix(dim, torch.float64)
    expected = torch.block_diag(*[_sylvester(block)] * (dim // block))
    torch.testing.assert_close(matrix, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(dim, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim", [64, 80, 128])
def test_nsn_round_trip_without_quantization_is_exact_to_fp32(dim):
    x = _outlier_data((2, 3, 96, dim))
    y, s1, s2, mu = nsn_forward(x, chunk=32)
    back = nsn_inverse(y, s1, s2, mu)
    # fp32 round-off only: a few ulps of each token's own scale
    scale = x.abs().amax(-1, keepdim=True)
    assert float(((back - x).abs() / scale).max()) < 1e-5
    # the transformed tokens have norm sqrt(D) and look standard normal
    torch.testing.assert_close(y.square().mean(-1), torch.ones(2, 3, 96), rtol=1e-5, atol=1e-5)
    assert abs(float(y.mean())) < 0.05 and abs(float(y.std()) - 1) < 0.02


def test_the_shift_removes_outlier_channels_before_the_rotation():
    x = _outlier_data((1, 2, 64, 64))
    y, _, _, _ = nsn_forward(x, chunk=64)
    without_shift = fwht(x / x.square().mean(-1, keepdim=True).sqrt())
    # an offset shared by all tokens rotates into a fixed direction: large per-channel means
    assert float(y.mean(2).abs().max()) < 0.05 < float(without_shift.mean(2).abs().max())


# ---- codebook ------------------------------------------------------------------------------------

def test_codebook_is_deterministic_and_cached():
    book = codebook(8)
    assert codebook(8) is book
    again = build_codebook(8)
    assert torch.equal(again.vectors, book.vectors) and again.beta == book.beta
    assert book.vectors.shape == (256, 8) and book.vectors.dtype == torch.float32
    assert 0.4 < book.beta < 0.7


def test_codebook_is_rebuilt_identically_in_a_fresh_process():
    book = codebook(8)
    digest = hashlib.sha256(book.vectors.numpy().tobytes() + repr(book.beta).encode()).hexdigest()
    code = ("import hashlib; from effllm.kv.codebook import codebook; b = codebook(8); "
            "print(hashlib.sha256(b.vectors.numpy().tobytes() + repr(b.beta).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         # PYTHONPATH passes on so a source checkout (PYTHONPATH=src) imports there too
                         env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert out.stdout.strip() == digest


@pytest.mark.parametrize("vector_dim,one,two", [(8, 0.335, 0.106), (4, 0.352, 0.122)])
def test_codebook_error_on_standard_normal_samples(vector_dim, one, two):
    book = codebook(vector_dim)
    y = torch.randn(1 << 14, vector_dim, generator=torch.Generator().manual_seed(3))
    errors = [float((decode(encode(y, book, stages), book) - y).square().mean()) for stages in (1, 2)]
    # 1 bit an element: close to an 8-dim VQ at that rate (scalar sign quantizer: 0.363)
    assert errors[0] < one and errors[1] < two


# ---- packing -------------------------------------------------------------------------------------

@given(st.sampled_from([4, 8]), st.integers(1, 3), st.integers(1, 12), st.integers(0, 2**16))
def test_index_packing_round_trips(index_bits, rows, pairs, seed):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 2**index_bits, (rows, 2 * pairs), generator=gen)
    packed = pack_indices(indices, index_bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 2 * pairs * index_bits // 8
    assert torch.equal(unpack_indices(packed, index_bits), indices)


def test_four_bit_indices_are_packed_in_planes():
    packed = pack_indices(torch.tensor([1, 2, 3, 4, 5, 6]), 4)
    assert packed.tolist() == [1 | 4 << 4, 2 | 5 << 4, 3 | 6 << 4]


@given(st.integers(1, 40), st.floats(0.0, 20.0), st.floats(-30.0, 30.0), st.integers(0, 2**16))
def test_log_scale_codes_round_trip_within_half_a_step(tokens, span, centre, seed):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp2(centre + span * torch.rand(3, tokens, generator=gen, dtype=torch.float64)).float()
    codes, lo, step = log_encode(scales)
    back = log_decode(codes, lo[:, None], step[:, None])
    ratio = (back / scales).log2().abs()
    assert codes.dtype == torch.uint8
    assert float(ratio.max()) <= float(step.max()) / 2 + 1e-5


def test_log_scale_codes_floor_scales_far_below_the_largest():
    scales = torch.tensor([[1.0, 2.0**-40, 0.0, 0.5]])
    codes, lo, step = log_encode(scales)
    back = log_decode(codes, lo[:, None], step[:, None])
    assert float(back[0, 1]) == pytest.approx(2.0**-24, rel=1e-4) and float(back[0, 2]) == pytest.approx(2.0**-24, rel=1e-4)
    assert float(back[0, 0]) == pytest.approx(1.0, rel=1e-6)


# ---- reconstruction error -------------------------------------------------------------------------

@pytest.mark.parametrize("bits,bound", [(1, 0.33), (2, 0.10)])
def test_reconstruction_error_on_gaussian_data(bits, bound):
    x = torch.randn(2, 2, 256, 64, generator=torch.Generator().manual_seed(0))
    least_squares = _rel(dequantize(quantize(x, NSNQuant(bits=bits, gain="least_squares")), torch.float32), x)
    assert least_squares < bound
    # the norm gain's squared error is 2 / (1 + cos) times the least-squares one, per token
    cos = (1 - least_squares) ** 0.5
    norm = _rel(dequantize(quantize(x, NSNQuant(bits=bits)), torch.float32), x)
    assert least_squares < norm < 1.05 * 2 / (1 + cos) * least_squares


@pytest.mark.parametrize("bits", [1, 2])
def test_the_norm_gain_keeps_token_norms_where_least_squares_shrinks_them(bits):
    x = torch.randn(2, 2, 256, 64, generator=torch.Generator().manual_seed(1)) * 3
    ratios = {}
    for gain in ("norm", "least_squares"):
        x_hat = dequantize(quantize(x, NSNQuant(bits=bits, gain=gain)), torch.float32)
        ratios[gain] = x_hat.norm(dim=-1) / x.norm(dim=-1)
    assert float((ratios["norm"] - 1).abs().mean()) < 0.02  # the 8-bit scale codes round by < 1%
    shrink = 0.93 if bits == 1 else 0.985
    assert float(ratios["least_squares"].mean()) < shrink


def test_reconstruction_error_does_not_depend_on_outliers_or_norms():
    # after the transform any distribution looks Gaussian: relative to the energy left once the
    # shift is removed (what the codebook must code), outliers and norms cost (almost) nothing
    plain = torch.randn(2, 2, 256, 64, generator=torch.Generator().manual_seed(0))
    skewed = _outlier_data((2, 2, 256, 64))
    config = NSNQuant(bits=2)
    e_plain = _rel(dequantize(quantize(plain, config), torch.float32), plain)
    _, s1, s2, _ = nsn_forward(skewed, config.chunk)
    coded_energy = float((s1 * s2).square().sum()) * 64
    e_skewed = float((dequantize(quantize(skewed, config), torch.float32) - skewed).square().sum()) / coded_energy
    assert e_skewed < 1.1 * e_plain
    assert _rel(dequantize(quantize(skewed, config), torch.float32), skewed) < 0.2 * e_plain  # the shift is exact


def test_non_power_of_two_head_dims_are_coded_with_bounded_error():
    x = torch.randn(1, 2, 128, 80, generator=torch.Generator().manual_seed(1))
    # the least-squares gain's error, the bound of the power-of-two dims (the norm gain's is
    # 2 / (1 + cos) of it: test_reconstruction_error_on_gaussian_data)
    assert _rel(dequantize(quantize(x, NSNQuant(bits=2, gain="least_squares")), torch.float32), x) < 0.10


def _smollm2_kv(smollm2, tokens=512):
    from transformers import DynamicCache

    from effllm._cache_arg import cache_argument_name
    from effllm.testing.quality import shipped_text

    model, tokenizer = smollm2
    ids = tokenizer(shipped_text("haystack.txt"), return_tensors="pt").input_ids[:, :tokens]
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, **{cache_argument_name(model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def test_reconstruction_error_on_real_smollm2_kv_beats_kivi2(smollm2):
    from effllm.kv.quantizers import dequantize as kivi_dequantize
    from effllm.kv.quantizers import quantize_groups

    errors = {}
    for keys, values in _smollm2_kv(smollm2):
        for name, x, axis in (("keys", keys, -2), ("values", values, -1)):
            for bits in (1, 2):
                approx = dequantize(quantize(x, NSNQuant(bits=bits)), torch.float32)
                errors.setdefault((name, bits), []).append(_rel(approx, x))
            kivi = kivi_dequantize(quantize_groups(x, 2, 32, axis), torch.float32)
            errors.setdefault((name, "kivi2"), []).append(_rel(kivi, x))
    mean = {key: sum(v) / len(v) for key, v in errors.items()}
    # measured: keys 0.095 / 0.029 (KIVI-2 0.041), values 0.262 / 0.080 (KIVI-2 0.180)
    assert mean["keys", 1] < 0.12 and mean["keys", 2] < 0.035
    assert mean["values", 1] < 0.30 and mean["values", 2] < 0.09
    assert mean["keys", 2] < mean["keys", "kivi2"] and mean["values", 2] < mean["values", "kivi2"]


# ---- codes and the store ---------------------------------------------------------------------------

def test_codes_take_the_bytes_the_rate_says():
    config = NSNQuant(bits=2, chunk=64)
    codes = quantize(torch.randn(2, 3, 128, 64), config)
    assert codes.nbytes() * 8 == pytest.approx(config.bits_per_element(64) * 2 * 3 * 128 * 64)
    assert config.bits_per_element(64) == pytest.approx(2 + 0.25 + 0.25 + 128 / 4096)
    config = NSNQuant(bits=2, chunk=64, shift_bits=8)  # int8 a channel plus a float16 scale a chunk
    codes = quantize(torch.randn(2, 3, 128, 64), config)
    assert codes.nbytes() * 8 == pytest.approx(config.bits_per_element(64) * 2 * 3 * 128 * 64)
    assert config.bits_per_element(64) == pytest.approx(2 + 0.25 + 8 / 64 + 16 / 4096 + 128 / 4096)


def test_shift_codes_round_trip_within_half_a_step():
    from effllm.kv.nsnquant import shift_decode, shift_encode

    mu = torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(8)) * torch.logspace(-2, 1, 64)
    mu[0, 0, 0] = 0.0  # an all-zero chunk comes back as zeros
    stored, scale = shift_encode(mu, 8)
    assert stored.dtype == torch.int8 and scale.dtype == torch.float16
    assert stored.shape == (2, 3, 5, 64) and scale.shape == (2, 3, 5)
    back = shift_decode(stored, scale, 8)
    step = scale.float()[..., None]
    assert ((back - mu).abs() <= step / 2 * 1.001 + 1e-7).all()
    assert (back[0, 0, 0] == 0).all()
    # the largest channel sits near the top of the range: the scale wastes no level
    assert ((back.abs().amax(-1) - mu.abs().amax(-1)).abs() <= scale.float() / 2 * 1.001 + 1e-7).all()


def test_an_int8_shift_is_the_one_subtracted_and_barely_moves_the_error():
    # keys with an outlier channel and an offset: the int8 shift leaves the reconstruction about as
    # good as the float16 one (the transform subtracts the rounded shift, so only centring moves)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 256, 64, generator=gen) + 4 * torch.randn(64, generator=gen)
    x[..., 5] *= 20
    exact = _rel(dequantize(quantize(x, NSNQuant(bits=2)), torch.float32), x)
    codes = quantize(x, NSNQuant(bits=2, shift_bits=8))
    assert codes.shift_bits == 8 and codes.shift.dtype == torch.int8
    assert _rel(dequantize(codes, torch.float32), x) < exact * 1.02
    # a second key code stores its shifts the same way
    assert NSNQuant(key_heads="all", key_residual="codes", shift_bits=8).residual_coder().shift_bits == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_keeps_the_newest_tokens_exact_and_codes_the_rest(dtype):
    config = NSNQuant(bits=2, residual=16, chunk=32)
    store = config.new_store()
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 150, 64, generator=gen).to(dtype)
    values = torch.randn(2, 3, 150, 64, generator=gen).to(dtype)
    store.append(keys[:, :, :100], values[:, :, :100])  # 100 - 16 = 84: two chunks coded
    assert (store.coded_tokens(), store.full_precision_tokens()) == (64, (36, 36))
    for t in range(100, 150):  # decode steps: flush when the window reaches 16 + 32
        store.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
        window = store.full_precision_tokens()[0]
        assert 16 <= window < 48 and len(store) == t + 1
    assert store.coded_tokens() == 128
    got_k, got_v = store.keys(), store.values()
    assert got_k.dtype == dtype and got_k.shape == keys.shape
    assert torch.equal(got_k[:, :, 128:], keys[:, :, 128:]) and torch.equal(got_v[:, :, 128:], values[:, :, 128:])
    assert _rel(got_k[:, :, :128], keys[:, :, :128]) < 0.11 and _rel(got_v[:, :, :128], values[:, :, :128]) < 0.11
    out = torch.empty(2, 3, 150, 64, dtype=dtype)
    assert store.keys(out=out) is out and torch.equal(out, got_k)
    dtype_bytes = torch.finfo(dtype).bits // 8
    assert store.nbytes() == 2 * store.key_codes.nbytes() + 2 * (2 * 3 * 22 * 64 * dtype_bytes)


@pytest.mark.parametrize("shift_bits", [16, 8])
def test_store_select_batch_and_select_tokens_keep_the_codes_of_kept_tokens(shift_bits):
    config = NSNQuant(bits=1, residual=8, chunk=16, shift_bits=shift_bits)
    gen = torch.Generator().manual_seed(0)
    store = config.new_store()
    store.append(torch.randn(2, 3, 70, 32, generator=gen), torch.randn(2, 3, 70, 32, generator=gen))
    keys, values = store.keys(), store.values()
    coded = store.coded_tokens()
    key_indices, value_indices = store.key_codes.indices(), store.value_codes.indices()
    index = torch.stack([torch.randperm(70, generator=gen)[:40].sort().values for _ in range(6)]).view(2, 3, 40)
    store.select_tokens(index)
    pick = index[..., None].expand(-1, -1, -1, 32)
    assert len(store) == 40
    kept = store.coded_tokens()
    assert kept == int((index < coded).sum(-1).min())  # every row keeps that many codes
    code_pick = index[..., :kept, None].expand(-1, -1, -1, key_indices.shape[-1])
    assert torch.equal(store.key_codes.indices(), key_indices.gather(2, code_pick))
    assert torch.equal(store.value_codes.indices(), value_indices.gather(2, code_pick))
    # Decoding fewer tokens may round the inverse rotation differently in the last bit.
    exact = {"rtol": 0, "atol": 1e-6}
    torch.testing.assert_close(store.keys(), keys.gather(2, pick), **exact)
    torch.testing.assert_close(store.values(), values.gather(2, pick), **exact)
    store.select_batch(torch.tensor([1, 1, 0]))
    torch.testing.assert_close(store.keys()[0], keys.gather(2, pick)[1], **exact)
    assert store.keys().shape[0] == 3
    before = store.keys()
    store.append(torch.randn(3, 3, 30, 32), torch.randn(3, 3, 30, 32))  # new chunks join the kept ones
    assert len(store) == 70 and store.coded_tokens() > kept
    torch.testing.assert_close(store.keys()[:, :, :kept], before[:, :, :kept], **exact)


def test_select_batch_before_any_append_is_a_no_op():
    store = NSNQuant(bits=2, residual=8, chunk=8).new_store()
    store.select_batch(torch.tensor([0, 0]))  # beam search may reorder a cache a layer has not stored in
    assert len(store) == 0 and store.key_window is None and store.key_codes is None
    store.append(torch.randn(2, 3, 20, 32), torch.randn(2, 3, 20, 32))
    assert len(store) == 20


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"bits": 3}, {"bits": 4}, {"bits": 2.0}, {"bits": True}, {"vector_dim": 16},
                                    {"vector_dim": 8.0}, {"residual": -1}, {"residual": 1.5}, {"chunk": 0},
                                    {"chunk": True}, {"shift_bits": 4}, {"shift_bits": 8.0}, {"shift_bits": True}])
def test_bad_settings_are_refused_at_construction(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        NSNQuant(**kwargs)


def test_validate_names_head_dims_and_dtypes_it_cannot_hold():
    config = NSNQuant(vector_dim=8)
    for dim in (60, 4, 0):
        with pytest.raises(ValueError, match="head dim"):
            config.validate(dim, torch.float32)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        config.validate(64, torch.int8)
    config.validate(80, torch.bfloat16)  # not a power of two: block Hadamard, accepted
    NSNQuant(vector_dim=4).validate(36, torch.float32)


def test_bad_appends_leave_the_store_unchanged():
    store = NSNQuant(residual=4, chunk=8).new_store()
    store.append(torch.randn(1, 2, 20, 32), torch.randn(1, 2, 20, 32))
    before = (len(store), store.nbytes(), store.keys().clone())
    bad = [(torch.randn(1, 2, 3, 24), torch.randn(1, 2, 3, 24)),  # head dim changed
           (torch.randn(1, 3, 3, 32), torch.randn(1, 3, 3, 32)),  # heads changed
           (torch.randn(1, 2, 3, 32).half(), torch.randn(1, 2, 3, 32).half()),  # dtype changed
           (torch.randn(1, 2, 3, 32), torch.randn(1, 2, 4, 32)),  # keys and values differ
           (torch.randn(2, 3, 32), torch.randn(2, 3, 32))]  # not 4-d
    for keys, values in bad:
        with pytest.raises(ValueError, match="NSNStore.append"):
            store.append(keys, values)
    for index in (torch.tensor([[[0, 1]]]), torch.tensor([[[1, 0], [0, 1]]]), torch.tensor([[[0, 99], [0, 1]]]),
                  torch.tensor([[[0, 1], [0, 1]]], dtype=torch.int32)):
        with pytest.raises(ValueError, match="select_tokens"):
            store.select_tokens(index)
    assert (len(store), store.nbytes()) == before[:2] and torch.equal(store.keys(), before[2])
    with pytest.raises(ValueError, match="head dim"):
        NSNQuant().new_store().append(torch.randn(1, 1, 3, 12), torch.randn(1, 1, 3, 12))


# ---- in the one cache ----------------------------------------------------------------------------

def _tiny(kind="llama", **overrides):
    from effllm.testing.models import tiny_causal_lm

    return tiny_causal_lm(kind, 0, num_hidden_layers=2, **overrides)


def test_sliding_window_models_are_refused_before_anything_changes():
    import effllm
    from effllm.kv import CompressedCache

    model = _tiny("mistral", sliding_window=8)
    with pytest.raises(ValueError, match="sliding-window"):
        CompressedCache(quantizer=NSNQuant(), config=model.config)
    with pytest.raises(ValueError, match="sliding-window"):
        effllm.patch(model, kv=NSNQuant(bits=1))
    assert "generate" not in vars(model) and model.config._attn_implementation != "effllm"


def test_patch_refuses_head_dims_nsnquant_cannot_hold():
    import effllm

    model = _tiny(head_dim=12)  # not a multiple of vector_dim 8
    with pytest.raises(ValueError, match="head dim"):
        effllm.patch(model, kv=NSNQuant())
    assert "generate" not in vars(model)


def test_generate_with_nsnquant_reads_the_codes_and_undoes(monkeypatch):
    import effllm
    from effllm.kv.nsnquant import NSNStore

    calls = []
    attend = NSNStore.attend
    monkeypatch.setattr(NSNStore, "attend", lambda self, *a, **kw: calls.append(1) or attend(self, *a, **kw))

    model = _tiny()
    ids = torch.randint(0, 101, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        handle = effllm.patch(model, kv=NSNQuant(bits=2, residual=64, chunk=8))  # nothing coded: exact
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
        handle.unpatch()
        calls.clear()
        handle = effllm.patch(model, kv=NSNQuant(bits=2, residual=4, chunk=8))
        got = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=2)
        cache = handle.kv.last_cache
        stores = [layer.store for layer in cache.layers]
        assert got.shape == (2, 51) and all(s.coded_tokens() == 40 for s in stores)
        assert handle.kv.stats()["tokens_seen"] == 50 and cache.nbytes() >= sum(s.nbytes() for s in stores)
        assert len(calls) == 5 * 2  # every decode step of both layers attended over the codes
        handle.unpatch()
    assert "generate" not in vars(model)


def test_generate_with_eviction_and_nsnquant_in_one_cache(monkeypatch):
    import effllm
    from effllm.kv import H2O
    from effllm.kv.nsnquant import NSNStore

    calls = []
    select = NSNStore.select_tokens
    monkeypatch.setattr(NSNStore, "select_tokens", lambda self, index: calls.append(1) or select(self, index))

    model = _tiny()
    ids = torch.randint(0, 101, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        handle = effllm.patch(model, kv=(H2O(0.5), NSNQuant(bits=1, residual=4, chunk=8)))
        out = model.generate(ids, max_new_tokens=30, do_sample=False)
        cache = handle.kv.last_cache
        stores = [layer.store for layer in cache.layers]
        assert out.shape == (1, 90)
        # H2O keeps about half of what was seen, evicting while decoding (select_tokens on the store)
        assert all(len(s) < 60 and s.coded_tokens() > 0 for s in stores)
        assert calls and any(s.key_codes.counts is not None for s in stores)  # codes kept through evictions
        handle.unpatch()


def test_smollm2_continuation_with_nsnquant_stays_close_to_the_full_cache(smollm2):
    import torch.nn.functional as F
    from transformers import DynamicCache

    import effllm
    from effllm._cache_arg import cache_argument_name
    from effllm.testing.quality import shipped_text

    model, tokenizer = smollm2
    ids = tokenizer(shipped_text("calibration.txt"), return_tensors="pt").input_ids[:, :448]
    prefix, cont = ids[:, :384], ids[:, 384:]
    arg = cache_argument_name(model)

    def nll(cache):
        last = model(prefix, **{arg: cache}, use_cache=True).logits[0, -1:]
        logits = torch.cat([last, model(cont[:, :-1], **{arg: cache}, use_cache=True).logits[0]])
        return float(F.cross_entropy(logits.float(), cont[0]))

    with torch.inference_mode():
        full = nll(DynamicCache(config=model.config))
        handle = effllm.patch(model, kv=NSNQuant(bits=2))
        try:
            cache = handle.kv.new_cache()
            coded = nll(cache)
            assert all(layer.store.coded_tokens() == 320 for layer in cache.layers)
            beams = model.generate(prefix[:, :200], max_new_tokens=4, do_sample=False, num_beams=2)
            assert beams.shape == (1, 204)
        finally:
            handle.unpatch()
    assert coded < 1.05 * full


def test_the_patched_attention_backend_reaches_the_codes_reader(monkeypatch):
    import effllm
    from effllm.kv import codes_attention
    from effllm.testing.models import tiny_causal_lm

    seen, real = [], codes_attention.nsn_attend

    def spy(*args, backend="auto", **kwargs):
        seen.append(backend)
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(codes_attention, "nsn_attend", spy)
    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(0))
    with effllm.patched(model, attention="torch", kv=NSNQuant(bits=2, residual=0, chunk=4)), torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert seen and set(seen) == {"torch"}
