"""KIVI KV quantization: packing, group layout (keys per channel, values per token), the error
bound of min-max rounding, and a layer store that keeps the newest tokens in full precision."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from effllm.kv.quantizers import (
    KIVI,
    bits_per_element,
    dequantize,
    pack,
    quantize_groups,
    unpack,
)


@given(bits=st.sampled_from([2, 4]), rows=st.integers(1, 5), bytes_=st.integers(1, 9), seed=st.integers(0, 99))
def test_pack_round_trips(bits, rows, bytes_, seed):
    codes = torch.randint(0, 2**bits, (rows, bytes_ * 8 // bits), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (rows, bytes_) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_layout_is_in_planes():
    # 8 codes of 2 bits in 2 bytes: byte j holds codes j, j + 2, j + 4, j + 6 (low bits first)
    codes = torch.tensor([[1, 2, 3, 0, 2, 1, 0, 3]], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [[1 | 3 << 2 | 2 << 4 | 0 << 6, 2 | 0 << 2 | 1 << 4 | 3 << 6]]
    assert pack(torch.tensor([[5, 12]], dtype=torch.uint8), 4).tolist() == [[5 | 12 << 4]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis", [-2, -1])
def test_error_is_at_most_half_a_step_of_its_group(axis, bits, dtype):
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(2, 3, 24, 16, generator=gen) * torch.logspace(-2, 1, 16)).to(dtype)
    q = quantize_groups(x, bits, 8, axis)
    assert q.scale.shape == ((2, 3, 3, 16) if axis == -2 else (2, 3, 24, 2)) and q.scale.dtype == dtype
    back = dequantize(q, dtype)
    assert back.shape == x.shape and back.dtype == dtype
    step = q.scale.float().repeat_interleave(8, dim=axis)
    # min-max rounding: half a step, plus the bf16 rounding of the scale, minimum and result
    slack = 0 if dtype == torch.float32 else 2**-7 * (x.float().abs() + step * 2**bits)
    assert ((back.float() - x.float()).abs() <= step / 2 * (1 + 1e-5) + slack).all()
    # each group's extremes come back exactly (min) and within the scale's rounding (max)
    lo = x.float().amin(dim=axis)
    assert torch.allclose(back.float().amin(dim=axis), lo, atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_keys_per_channel_keep_an_outlier_channel_from_spoiling_the_others():
    # KIVI's reason for per-channel keys: one channel 50x larger than the rest.
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 1, 64, 32, generator=gen)
    keys[..., 5] *= 50
    per_channel = dequantize(quantize_groups(keys, 2, 32, axis=-2), torch.float32)
    per_token = dequantize(quantize_groups(keys, 2, 32, axis=-1), torch.float32)
    others = torch.arange(32) != 5
    err_channel = (per_channel - keys)[..., others].abs().mean()
    err_token = (per_token - keys)[..., others].abs().mean()
    assert err_channel * 5 < err_token


def test_values_on_the_grid_come_back_exactly():
    codes = torch.randint(0, 4, (1, 2, 5, 8), generator=torch.Generator().manual_seed(4)).float()
    codes[..., 0], codes[..., 1] = 0.0, 3.0  # every group (4 channels) spans the full range
    codes[..., 4], codes[..., 5] = 0.0, 3.0
    x = codes * 0.25 - 1.0
    assert torch.equal(dequantize(quantize_groups(x, 2, 4, axis=-1), torch.float32), x)


def test_store_keeps_the_newest_tokens_exact_and_the_rest_within_bounds():
    cfg = KIVI(bits=4, group=8, residual=16)
    store = cfg.new_store()
    gen = torch.Generator().manual_seed(5)
    chunks = [torch.randn(2, 3, n, 16, generator=gen) for n in [37] + [1] * 30]
    values = [c * 2 - 1 for c in chunks]
    for k, v in zip(chunks, values):
        store.append(k, v)
    keys, vals = torch.cat(chunks, -2), torch.cat(values, -2)
    assert len(store) == 67 and store.keys().shape == keys.shape
    full_k, full_v = store.full_precision_tokens()
    assert (full_k, full_v) == (67 % 16, 16 + (67 - 16) % 16)
    assert torch.equal(store.keys()[..., -full_k:, :], keys[..., -full_k:, :])
    assert torch.equal(store.values()[..., -full_v:, :], vals[..., -full_v:, :])
    # older tokens: quantized, off by at most half a step of a 4-bit group
    for got, want, axis in ((store.keys(), keys, -2), (store.values(), vals, -1)):
        old = slice(0, 48)
        err = (got[..., old, :] - want[..., old, :]).abs()
        assert 0 < err.max() <= (want.amax() - want.amin()) / 15 / 2
    # batch selection (beam search) moves the codes and the residuals of the chosen rows
    index = torch.tensor([1, 1, 0])
    keys_before, values_before = store.keys(), store.values()
    store.select_batch(index)
    assert torch.equal(store.keys(), keys_before[index]) and torch.equal(store.values(), values_before[index])
    store.select_batch(torch.tensor([2, 0]))
    # bytes: codes + scales for the quantized part, the residuals in full
    quantized = 2 * 3 * 16 * ((67 - full_k) + (67 - full_v)) * bits_per_element(cfg, torch.float32) / 8
    assert store.nbytes() == quantized + 2 * 3 * 16 * (full_k + full_v) * 4


def test_store_saves_memory_on_long_caches():
    cfg = KIVI(bits=2, group=32, residual=128)
    store = cfg.new_store()
    keys = torch.randn(1, 3, 4096, 64).bfloat16()
    store.append(keys, keys)
    full = 2 * keys.numel() * keys.element_size()
    # 2-bit codes + a bf16 scale and minimum per 32: 3 bits of 16; the newest 128 values in bf16
    assert store.nbytes() / full == pytest.approx(3 / 16 + 0.5 * 128 / 4096 * (1 - 3 / 16))


def test_bad_settings_and_input():
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        KIVI(bits=3)
    with pytest.raises(ValueError, match="residual must be a positive multiple of group"):
        KIVI(group=32, residual=48)
    with pytest.raises(ValueError, match="group must be an int"):
        KIVI(group=0)
    store = KIVI(group=32, residual=32).new_store()
    with pytest.raises(ValueError, match="head dim 48 must be a multiple of group"):
        store.append(torch.zeros(1, 1, 4, 48), torch.zeros(1, 1, 4, 48))
    with pytest.raises(ValueError, match=r"must be \(B, H, n, D\)"):
        store.append(torch.zeros(1, 4, 64), torch.zeros(1, 4, 64))
    store.append(torch.zeros(1, 2, 4, 64), torch.zeros(1, 2, 4, 64))
    with pytest.raises(ValueError, match="expected"):
        store.append(torch.zeros(1, 3, 1, 64), torch.zeros(1, 3, 1, 64))
    assert len(store) == 4  # the bad append changed nothing
    with pytest.raises(ValueError, match="multiple of group"):
        quantize_groups(torch.zeros(5, 64), 2, 32, axis=-2)


# ---- QuantizedKVCache: the store as a transformers Cache ---------------------------------------

def _tiny(seed=0):
    from effllm.testing.models import tiny_causal_lm

    return tiny_causal_lm("llama", seed, num_hidden_layers=2)


def _ids(n, batch=2, seed=1):
    return torch.randint(0, 101, (batch, n), generator=torch.Generator().manual_seed(seed))


def _teacher_forced_logits(model, cache, ids, steps):
    with torch.inference_mode():
        logits = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1]]
        for token in steps:
            logits.append(model(token, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits)


def test_cache_with_nothing_quantized_equals_the_full_cache():
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    from effllm.kv import QuantizedKVCache

    model, ids = _tiny(), _ids(40)
    steps = [_ids(1, seed=s) for s in range(5)]
    full = _teacher_forced_logits(model, DynamicCache(), ids, steps)
    cache = QuantizedKVCache(KIVI(bits=2, group=8, residual=48), config=model.config)
    assert torch.equal(_teacher_forced_logits(model, cache, ids, steps), full)
    assert cache.get_seq_length() == 45 and cache.stats()["full_precision_tokens"] == [(45, 45)] * 2
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
        got = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False,
                             past_key_values=QuantizedKVCache(KIVI(bits=2, group=8, residual=48)))
    assert torch.equal(got, want)  # beam reordering moves every block and residual


def test_a_step_attends_to_its_own_tokens_in_full_precision():
    # The prompt is quantized as it is stored, but its own forward reads it unrounded (as KIVI);
    # the next step reads it rounded.
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    from effllm.kv import QuantizedKVCache

    model, ids, nxt = _tiny(), _ids(40), _ids(1, seed=9)
    full_cache, cache = DynamicCache(), QuantizedKVCache(KIVI(bits=2, group=8, residual=8))
    with torch.inference_mode():
        assert torch.equal(model(ids, past_key_values=cache).logits, model(ids, past_key_values=full_cache).logits)
        assert cache.stats()["full_precision_tokens"] == [(0, 8)] * 2
        assert not torch.equal(model(nxt, past_key_values=cache).logits, model(nxt, past_key_values=full_cache).logits)


def test_cache_error_follows_the_bits_and_memory_follows_the_codes():
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    from effllm.kv import QuantizedKVCache

    model, ids = _tiny(seed=3), _ids(70, seed=3)
    steps = [_ids(1, seed=10 + s) for s in range(20)]
    full_cache = DynamicCache()
    full = _teacher_forced_logits(model, full_cache, ids, steps)
    errors, caches = {}, {}
    for bits in (2, 4):
        caches[bits] = QuantizedKVCache(KIVI(bits=bits, group=8, residual=16))
        errors[bits] = (_teacher_forced_logits(model, caches[bits], ids, steps) - full).abs().max()
    assert 0 < errors[4] < errors[2] / 2 and errors[4] < 0.05 * full.abs().max()
    full_bytes = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in full_cache.layers)
    for bits, cache in caches.items():
        stats = cache.stats()
        assert stats["kv_bytes_full"] == full_bytes and stats["tokens_seen"] == 90
        k_fp, v_fp = stats["full_precision_tokens"][0]
        elements = 2 * 2 * 16  # a token's keys (or values) in one layer: (B, H_kv, D) = (2, 2, 16)
        quantized = (90 - k_fp + 90 - v_fp) * elements * bits_per_element(KIVI(bits, 8, 16), torch.float32) / 8
        buffers = cache.read_buffers  # one layer's dequantized keys and values, shared by the layers
        assert buffers is cache.layers[0].read_buffers is cache.layers[1].read_buffers
        assert buffers.keys.shape[2] >= 90
        read = 2 * buffers.keys.numel() * 4
        assert cache.nbytes() == 2 * (quantized + (k_fp + v_fp) * elements * 4) + read  # 2 layers, fp32 residuals


def test_cache_refuses_what_it_cannot_hold_and_stays_empty():
    pytest.importorskip("transformers")
    from effllm.kv import QuantizedKVCache
    from effllm.testing.models import tiny_causal_lm

    with pytest.raises(ValueError, match="quantizer must follow effllm.kv's quantizer protocol"):
        QuantizedKVCache("kivi")
    with pytest.raises(ValueError, match="sliding-window"):
        QuantizedKVCache(KIVI(), config=tiny_causal_lm("mistral", 0, num_hidden_layers=1, sliding_window=8).config)
    model = _tiny()
    cache = QuantizedKVCache(KIVI(group=32, residual=32))  # head dim 16 is no multiple of 32
    with pytest.raises(ValueError, match="head dim 16 must be a multiple of group"), torch.inference_mode():
        model(_ids(5), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0


def test_patch_with_a_quantizer_gives_generate_a_quantized_cache_and_undoes():
    pytest.importorskip("transformers")
    import effllm

    model, ids = _tiny(), _ids(40)
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
        handle = effllm.patch(model, kv=KIVI(bits=4, group=8, residual=48))  # nothing quantized: exact
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(got, want) and handle.kv.stats()["tokens_seen"] == 44
        cache = handle.kv.last_cache
        assert type(cache).__name__ == "CompressedCache" and cache.policy is None and cache.quantizer.bits == 4
        assert model.config._attn_implementation == "effllm"  # effllm's attention reads the cache
        handle.unpatch()
    assert "generate" not in vars(model) and model.config._attn_implementation == "sdpa"


def test_reuse_with_another_batch_size_names_the_change():
    from effllm.kv import KIVI, QuantizedKVCache
    from effllm.testing.models import tiny_causal_lm

    model = tiny_causal_lm()
    cache = QuantizedKVCache(KIVI(bits=4, group=16, residual=16), config=model.config)
    with torch.inference_mode():
        model(torch.randint(0, 101, (1, 20)), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="batch size changed"):
            model(torch.randint(0, 101, (2, 1)), past_key_values=cache, use_cache=True)
        k = torch.zeros(1, 2, 1, 16, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"^CompressedCache.update: dtype changed"):
            cache.update(k, k, 0)


# ---- one cache: a policy and a quantizer together -------------------------------------------------

def _generate_with(model, ids, kv, **kwargs):
    import effllm

    with effllm.patched(model, kv=kv) as handle, torch.inference_mode():
        cache = handle.kv.new_cache(keep_positions=True)  # the tests compare which tokens were kept
        out = model.generate(ids, do_sample=False, past_key_values=cache, **kwargs)
        return out, cache


def test_policy_with_a_quantizer_that_quantizes_nothing_equals_the_policy_alone():
    # residual longer than everything: every token stays full precision, so the one cache must
    # keep, evict and attend exactly as the policy alone does (prefill, decode eviction, beams)
    from effllm.kv import H2O, SnapKV, StreamingLLM

    model, ids = _tiny(seed=4), _ids(60, batch=1, seed=4)
    for policy in (SnapKV(24, window=8, kernel=5), StreamingLLM(20, sinks=4, slack=1), H2O(24, recent=8, slack=2)):
        for beams in (1, 3):
            want, alone = _generate_with(model, ids, policy, max_new_tokens=8, num_beams=beams)
            got, both = _generate_with(model, ids, (policy, KIVI(bits=2, group=8, residual=512)), max_new_tokens=8,
                                       num_beams=beams)
            assert torch.equal(got, want), (policy, beams)
            for a, b in zip(alone.layers, both.layers):
                assert torch.equal(a.positions, b.positions)
                # decode reads the store through its attend() (an explicit float32 softmax) where the
                # policy alone runs decode_attention: the later layers' keys differ by rounding only
                torch.testing.assert_close(a.keys, b.all_keys_values()[0], rtol=1e-5, atol=1e-6)


def test_evict_then_quantize_the_store_holds_only_the_kept_tokens():
    import effllm
    from effllm.kv import SnapKV

    model, ids = _tiny(seed=5), _ids(70, batch=1, seed=5)
    policy = SnapKV(24, window=8, kernel=5)
    with effllm.patched(model, kv=policy) as handle, torch.inference_mode():
        alone = handle.kv.new_cache(keep_positions=True)
        model(ids, past_key_values=alone, use_cache=True)
    with effllm.patched(model, kv=(policy, KIVI(bits=4, group=8, residual=8))) as handle, torch.inference_mode():
        cache = handle.kv.new_cache(keep_positions=True)
        model(ids, past_key_values=cache, use_cache=True)
        # evicted, then quantized once the forward's last layer was evicted from: nothing staged
        assert all(len(layer.store) == 24 and layer.keys.shape[2] == 0 for layer in cache.layers)
        layer = cache.layers[0]
        model(ids[:, :1], past_key_values=cache, use_cache=True)
        assert len(layer.store) == 25 and layer.keys.shape[2] == 0
        assert layer.store.full_precision_tokens()[0] == 25 % 8
        stats = cache.stats()
    for a, b in zip(alone.layers, cache.layers):
        assert torch.equal(a.positions, b.positions[..., :24])
        keys = b.store.keys()[:, :, :24]
        step = (a.keys.amax(2, keepdim=True) - a.keys.amin(2, keepdim=True)) / 15  # per channel, 4 bits
        assert ((keys - a.keys).abs() <= step / 2 + 1e-5).all()  # quantized from the kept tokens themselves
    assert stats["quantizer"].startswith("KIVI") and stats["policy"].startswith("SnapKV")
    assert stats["kept_per_layer"] == [25, 25] and stats["kv_bytes"] < 0.5 * stats["kv_bytes_full"]
    assert stats["bytes_saved"] == stats["kv_bytes_full"] - cache.nbytes()


def test_a_cache_that_does_not_know_its_layers_quantizes_the_kept_prompt_at_the_next_step():
    import effllm
    from effllm.kv import SnapKV

    model, ids = _tiny(seed=5), _ids(70, batch=1, seed=5)
    with effllm.patched(model, kv=(SnapKV(24, window=8, kernel=5), KIVI(bits=4, group=8, residual=8))) as handle, \
            torch.inference_mode():
        settled = handle.kv.new_cache()
        model(ids, past_key_values=settled, use_cache=True)
        deferred = handle.kv.new_cache()
        deferred.num_layers = None  # as a cache made without a config
        model(ids, past_key_values=deferred, use_cache=True)
        assert all(len(layer.store) == 0 and layer.keys.shape[2] == 24 for layer in deferred.layers)  # staged
        for cache in (settled, deferred):
            model(ids[:, :1], past_key_values=cache, use_cache=True)
        for a, b in zip(settled.layers, deferred.layers, strict=True):
            assert len(b.store) == 25 and b.keys.shape[2] == 0
            assert torch.equal(a.store.keys(), b.store.keys())


def test_decode_time_eviction_drops_tokens_from_the_quantized_store():
    from effllm.kv import StreamingLLM

    model, ids = _tiny(seed=6), _ids(40, batch=1, seed=6)
    policy = StreamingLLM(16, sinks=4, slack=1)
    out, cache = _generate_with(model, ids, (policy, KIVI(bits=4, group=8, residual=8)), max_new_tokens=12)
    want, alone = _generate_with(model, ids, policy, max_new_tokens=12)
    for a, b in zip(alone.layers, cache.layers):
        assert torch.equal(a.positions, b.positions) and b.stored() == len(b.store) + b.keys.shape[2]
        assert b.stored() <= 17
        assert (b.all_keys_values()[0] - a.keys).abs().max() < 0.2 * a.keys.abs().max()
    assert out.shape == want.shape


class _ReadsCodes:
    """KIVI whose store attends itself (dequantize, then explicit attention): stands in for a
    quantizer with attention over its codes, to check the cache hands decode steps to it."""

    evicts_exactly = False

    def __init__(self, kivi):
        self.kivi, self.calls = kivi, 0

    def validate(self, head_dim, dtype):
        self.kivi.validate(head_dim, dtype)

    def new_store(self):
        owner = self

        class Store(type(self.kivi.new_store())):
            def attend(self, query, scale, *, softcap=None, return_mass=False, backend="auto"):
                owner.calls += 1
                from effllm.kv.policies import attention_mass

                keys, values = self.keys(), self.values()
                group = query.shape[1] // keys.shape[1]
                k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
                probs = torch.softmax((query.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
                out = (probs @ v.float()).to(query.dtype).transpose(1, 2)
                return (out, attention_mass(query, keys, scale)) if return_mass else out

        return Store(self.kivi)


class _Dequantizes(_ReadsCodes):
    """KIVI whose store cannot attend: the cache falls back to dequantize-then-attend."""

    def new_store(self):
        class Store(type(self.kivi.new_store())):
            attend = None

        return Store(self.kivi)


@pytest.mark.parametrize("with_policy", [False, True])
def test_a_store_that_attends_over_its_codes_is_read_that_way(with_policy):
    from effllm.kv import H2O

    model, ids = _tiny(seed=7), _ids(30, batch=1, seed=7)
    kivi = KIVI(bits=4, group=8, residual=8)
    policy = H2O(20, recent=6, slack=1)  # needs each decode step's attention mass
    reader, fallback = _ReadsCodes(kivi), _Dequantizes(kivi)
    out, _ = _generate_with(model, ids, (policy, reader) if with_policy else reader, max_new_tokens=6)
    want, _ = _generate_with(model, ids, (policy, fallback) if with_policy else fallback, max_new_tokens=6)
    assert reader.calls == 5 * 2  # every decode step of both layers
    assert torch.equal(out, want)


def test_a_store_that_cannot_attend_keeps_a_padded_batchs_padding_under_the_mask():
    # the quantizer protocol makes attend optional: such a store is read dequantized, under
    # transformers' mask, so the padding stays (rows of their own are read over their codes)
    import effllm

    model = _tiny(seed=13)
    rows = [_ids(n, batch=1, seed=20 + n)[0].clamp(min=1).tolist() for n in (10, 41)]
    ids, mask = _left_pad(rows)
    with effllm.patched(model, kv=_Dequantizes(KIVI(bits=4, group=8, residual=8))) as handle, torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        layers = handle.kv.last_cache.layers
    assert all(layer.ragged is None and layer.stored() == 41 + 2 for layer in layers)


@pytest.mark.parametrize("quantizer", ["KIVI", "NSNQuant", "NSNQuant, no window"])
def test_attention_over_codes_matches_the_dequantized_cache_under_any_attention(quantizer):
    # patched: effllm's attention reads the codes (store.attend); unpatched: transformers' sdpa
    # reads the same store dequantized. Same codes, so the logits agree to float32 rounding, also
    # at the steps whose token completes a group or chunk: both read the step's own token exactly
    # (the patched store codes it at the next step; until session 21 it coded it first)
    import effllm
    from effllm.kv import CompressedCache, NSNQuant

    q = {"KIVI": KIVI(bits=2, group=8, residual=8), "NSNQuant": NSNQuant(bits=2, residual=8, chunk=16),
         "NSNQuant, no window": NSNQuant(bits=2, residual=0, chunk=8)}[quantizer]
    model, ids = _tiny(seed=8), _ids(40, batch=2, seed=8)
    steps = [torch.randint(0, 101, (2, 1), generator=torch.Generator().manual_seed(s)) for s in range(20)]
    want = _teacher_forced_logits(model, CompressedCache(quantizer=q), ids, steps)
    with effllm.patched(model, kv=q) as handle:
        got = _teacher_forced_logits(model, handle.kv.new_cache(), ids, steps)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # logits ~0.5: fp32 rounding only


def test_bad_combinations_are_refused_before_the_model_changes():
    import effllm
    from effllm.kv import H2O, CompressedCache, SnapKV

    model = _tiny()
    for kv, match in [((KIVI(), KIVI(4)), "pair"), ((H2O(0.5), SnapKV(0.5)), "pair"), ((), "pair"),
                      (KIVI(group=32, residual=32), "head dim 16"), ("kivi", "policy")]:
        with pytest.raises(ValueError, match=match):
            effllm.patch(model, kv=kv)
        assert model.config._attn_implementation == "sdpa" and "generate" not in vars(model)
        assert not hasattr(model, "_effllm_patch_handle")
    with pytest.raises(ValueError, match="give a policy, a quantizer, or both"):
        CompressedCache()
    with pytest.raises(ValueError, match="not wired"), torch.inference_mode():  # a policy needs effllm's attention
        model(_ids(20), past_key_values=CompressedCache(SnapKV(0.5, window=4), quantizer=KIVI(4, 8, 8)))
    from effllm.testing.models import tiny_causal_lm

    sliding = tiny_causal_lm("mistral", 0, num_hidden_layers=1, sliding_window=8)
    with pytest.raises(ValueError, match="sliding-window"):
        effllm.patch(sliding, kv=(H2O(0.5), KIVI(4, 8, 8)))


def _left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


@pytest.mark.parametrize("quantizer", ["kivi", "nsnquant"])
@pytest.mark.parametrize("lengths", [(30, 41), (10, 41)], ids=["equal-budgets", "rows-differ"])
def test_padded_batch_with_policy_and_quantizer_matches_one_by_one(quantizer, lengths):
    # dropping the padding leaves rows of different lengths (one row under budget): each row
    # gets its own quantized store, coded exactly as the row alone codes its tokens
    import effllm
    from effllm.kv import NSNQuant, SnapKV
    from effllm.kv.quantized_rows import QuantizedRows

    model = _tiny(seed=13)
    rows = [_ids(n, batch=1, seed=20 + n)[0].clamp(min=1).tolist() for n in lengths]  # pad id 0 is in no row
    ids, mask = _left_pad(rows)
    q = KIVI(2, 8, 8) if quantizer == "kivi" else NSNQuant(bits=2, residual=4, chunk=8)
    kv = (SnapKV(16, window=4, kernel=1), q)
    with effllm.patched(model, kv=kv) as handle, torch.inference_mode():
        together = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        cache = handle.kv.last_cache
        alone = [model.generate(torch.tensor([r]), max_new_tokens=6, do_sample=False, pad_token_id=0) for r in rows]
    for i, row in enumerate(rows):
        assert together[i, ids.shape[1]:].tolist() == alone[i][0, len(row):].tolist()
    kept = [min(16, n) + 5 for n in lengths]  # the budget (or the whole row), then 5 decoded tokens
    for layer in cache.layers:
        assert layer.row_lengths()[:, 0].tolist() == kept
        assert isinstance(layer.ragged, QuantizedRows) == (kept[0] != kept[1])
        assert layer.stored() == max(kept) and layer.full_precision_tokens()[0] < max(kept)  # codes are held


@pytest.mark.parametrize("quantizer", ["kivi", "nsnquant"])
@pytest.mark.parametrize("lengths", [(30, 41), (10, 41)])
def test_a_quantizer_alone_codes_each_padded_row_as_alone(quantizer, lengths):
    # without a policy the cache still drops a left-padded batch's padding: each row is coded
    # from its own tokens (the padding sat in its first KIVI key group / NSNQuant chunk) and
    # read over its own codes
    import effllm
    from effllm.kv import NSNQuant
    from effllm.kv.quantized_rows import QuantizedRows

    model = _tiny(seed=13)
    rows = [_ids(n, batch=1, seed=20 + n)[0].clamp(min=1).tolist() for n in lengths]  # pad id 0 is in no row
    ids, mask = _left_pad(rows)
    q = KIVI(2, 8, 8) if quantizer == "kivi" else NSNQuant(bits=2, residual=4, chunk=8)
    with effllm.patched(model, kv=q) as handle, torch.inference_mode():
        together = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        cache = handle.kv.last_cache
        alone, alone_caches = [], []
        for row in rows:
            alone.append(model.generate(torch.tensor([row]), max_new_tokens=6, do_sample=False, pad_token_id=0))
            alone_caches.append(handle.kv.last_cache)
    for i, row in enumerate(rows):
        assert together[i, ids.shape[1]:].tolist() == alone[i][0, len(row):].tolist()
    for idx, layer in enumerate(cache.layers):
        assert isinstance(layer.ragged, QuantizedRows)
        assert layer.row_lengths()[:, 0].tolist() == [n + 5 for n in lengths]  # no padding: its tokens and 5 decoded
        kv_heads = layer.batch_heads()[1]
        for i in range(len(rows)):
            store = alone_caches[i].layers[idx].store
            for head in range(kv_heads):
                mine = layer.ragged.stores[i * kv_heads + head]
                # the same codes: equal up to the float rounding of the decoded tokens' batched
                # matmuls (~1e-7; the padding's coding error was of a quantization step, ~1e-1)
                torch.testing.assert_close(mine.keys()[0, 0], store.keys()[0, head], rtol=0, atol=1e-5)
                torch.testing.assert_close(mine.values()[0, 0], store.values()[0, head], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [16, 32])
def test_a_quantizer_alone_keeps_the_mask_while_a_chunked_prompts_row_is_all_padding(chunk):
    # generate(prefill_chunk_size=16): the short row's 31 padding tokens run past the first
    # forward, whose row then has no token: the padding stays (masked), else the next forward's
    # padding would be stored as the row's tokens. With 32 every row has a token in the first
    # forward, so the padding is dropped there and the later forwards append to the rows.
    # (Outputs are not compared with the rows alone: a prompt fed in chunks reads its earlier
    # chunks over their codes, one forward reads them exactly.)
    import effllm
    from effllm.kv import NSNQuant

    model = _tiny(seed=13)
    rows = [_ids(n, batch=1, seed=20 + n)[0].clamp(min=1).tolist() for n in (10, 41)]  # pad id 0 is in no row
    ids, mask = _left_pad(rows)
    with effllm.patched(model, kv=NSNQuant(bits=2, residual=4, chunk=8)) as handle, torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                       prefill_chunk_size=chunk)
        kept = handle.kv.last_cache.stats()["kept_per_head"]
    held = [41 + 5, 41 + 5] if chunk == 16 else [10 + 5, 41 + 5]  # the padding kept, or only the rows' tokens
    assert all([row[0] for row in layer] == held for layer in kept)


def _dequantized_reference(rows, q, scale):
    """Per row, in float64: attention of ``q (B, H, Sq, D)`` over the row store's keys and
    values as it gives them back dequantized (its last Sq tokens are the queries' own)."""
    from effllm.testing.compare import per_row_attention_reference

    return per_row_attention_reference(q, [(s.keys()[0, 0], s.values()[0, 0]) for s in rows.stores], scale)


@pytest.mark.parametrize("quantizer", ["kivi", "nsnquant"])
@pytest.mark.parametrize("q_len", [1, 5, 19])
def test_rows_of_different_lengths_attend_over_their_own_codes(quantizer, q_len):
    from effllm.kv import CompressedLayer, NSNQuant
    from effllm.kv.attention import _ragged_attention
    from effllm.kv.quantized_rows import QuantizedRows

    gen = torch.Generator().manual_seed(q_len)
    batch, kv_heads, group, seq, dim = 2, 3, 2, 41, 16
    keys, values = torch.randn(batch, kv_heads, seq, dim, generator=gen), torch.randn(batch, kv_heads, seq, dim,
                                                                                      generator=gen)
    mask = torch.rand(batch, kv_heads, seq, generator=gen) < torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1)
    layer = CompressedLayer()
    layer.quantizer = KIVI(2, 8, 8) if quantizer == "kivi" else NSNQuant(bits=2, residual=4, chunk=8)
    layer.stage_prefill = True
    layer.update(keys, values)  # staged in full precision, as a prompt before its eviction
    layer.keep_mask(mask)
    assert isinstance(layer.ragged, QuantizedRows) and layer.row_lengths().tolist() == mask.sum(-1).tolist()
    coded = [store.keys()[0, 0] for store in layer.ragged.stores]
    for row, k in enumerate(coded):  # each row's own kept tokens, within 2-bit error
        b, h = divmod(row, kv_heads)
        assert len(k) == int(mask[b, h].sum()) and (k - keys[b, h][mask[b, h]]).norm() < 0.8 * k.norm()
    new_k, new_v = torch.randn(batch, kv_heads, q_len, dim, generator=gen), torch.randn(batch, kv_heads, q_len, dim,
                                                                                        generator=gen)
    layer.update(new_k, new_v)
    q = torch.randn(batch, kv_heads * group, q_len, dim, generator=gen)
    with torch.no_grad():
        out, stats = _ragged_attention(layer, q, 0.3, None, "auto", need_stats=True)
    torch.testing.assert_close(out, _dequantized_reference(layer.ragged, q, 0.3), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.sum(-1), torch.full((batch, kv_heads), float(group * q_len)))
    assert (stats[~layer.valid_mask()] == 0).all()
    # decode-time eviction from rows: each store drops its tokens; NSNQuant keeps the others' codes
    before = [(store.keys()[0, 0], store.values()[0, 0]) for store in layer.ragged.stores]
    drop = layer.valid_mask() & (torch.rand(stats.shape, generator=gen) < 0.3)
    layer.keep_mask(layer.valid_mask() & ~drop)
    assert layer.row_lengths().tolist() == (layer.valid_mask()).sum(-1).tolist()
    all_k, all_v = torch.cat([keys, new_k], dim=2), torch.cat([values, new_v], dim=2)
    for row, store in enumerate(layer.ragged.stores):
        b, h = divmod(row, kv_heads)
        stay = ~drop[b, h, :len(before[row][0])]
        got_k, got_v = store.keys()[0, 0], store.values()[0, 0]
        assert got_k.shape == before[row][0][stay].shape
        # the row holds its kept tokens (positions say which), within 2-bit error of what came in
        original = layer.positions[b, h, :len(got_k)].long()
        for got, truth in ((got_k, all_k[b, h, original]), (got_v, all_v[b, h, original])):
            assert (got - truth).norm() < 0.8 * truth.norm()
        if quantizer == "nsnquant":  # codes of the tokens that stay are kept as they were
            torch.testing.assert_close(got_k, before[row][0][stay], rtol=0, atol=1e-6)
            torch.testing.assert_close(got_v, before[row][1][stay], rtol=0, atol=1e-6)


@pytest.mark.interpret
def test_rows_attend_with_the_triton_kernel_as_with_the_torch_path():
    # decode steps that need no attention mass (KVzip, AdaKV once compressed) take the kernel on a GPU
    from effllm._backend import interpreting
    from effllm.kv import CompressedLayer, NSNQuant

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on CUDA, else interpreted
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 3, 45, 16, generator=gen), torch.randn(1, 3, 45, 16, generator=gen)
    mask = torch.rand(1, 3, 45, generator=gen) < torch.tensor([0.3, 0.6, 0.9]).view(1, 3, 1)
    step = torch.randn(1, 3, 1, 16, generator=gen), torch.randn(1, 3, 1, 16, generator=gen)
    q = torch.randn(3, 1, 2, 16, generator=gen).to(device)  # 3 rows, 1 query, 2 query heads a row
    layer = CompressedLayer()
    layer.quantizer, layer.stage_prefill = NSNQuant(bits=2, residual=4, chunk=8), True
    layer.update(keys.to(device), values.to(device))
    layer.keep_mask(mask.to(device))
    layer.update(*(t.to(device) for t in step))
    assert all(store.key_codes is not None for store in layer.ragged.stores)  # every row has codes to read
    from effllm.kv import codes_attention

    want, _ = layer.ragged.attend(q, 0.25, softcap=None, need_stats=False, backend="torch")
    kernel, calls = codes_attention._nsn_attend_triton, []
    codes_attention._nsn_attend_triton = lambda *args: calls.append(1) or kernel(*args)
    try:
        got, stats = layer.ragged.attend(q, 0.25, softcap=None, need_stats=False, backend="triton")
    finally:
        codes_attention._nsn_attend_triton = kernel
    assert stats is None and len(calls) == 3  # one kernel call a row
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beams", [1, 3])
def test_ragged_policies_with_a_quantizer_that_quantizes_nothing_equal_the_policy_alone(beams):
    # AdaKV and KVzip's global scope leave heads with different numbers of tokens: a store per
    # row, attended row by row, must keep and generate exactly what the policy alone does
    # (beams copy a row's store when it repeats)
    from effllm.kv import AdaKV, KVzip, NSNQuant, SnapKV

    model, ids = _tiny(seed=4), _ids(60, batch=1, seed=4)
    for policy in (AdaKV(SnapKV(24, window=8, kernel=5)), KVzip(0.4, ids[0].tolist(), scope="global")):
        want, alone = _generate_with(model, ids, policy, max_new_tokens=8, num_beams=beams)
        got, both = _generate_with(model, ids, (policy, NSNQuant(bits=2, residual=512, chunk=8)), max_new_tokens=8,
                                   num_beams=beams)
        assert torch.equal(got, want), policy
        for a, b in zip(alone.layers, both.layers):
            assert torch.equal(a.positions, b.positions) and torch.equal(a.row_lengths(), b.row_lengths())
            keys, _ = a.ragged.padded()
            for row, store in enumerate(b.ragged.stores):
                torch.testing.assert_close(store.keys()[0, 0], keys[row, :len(store)], rtol=1e-5, atol=1e-6)
        # with codes, beams copy stores that then diverge: each beam still generates
        got, coded = _generate_with(model, ids, (policy, NSNQuant(bits=2, residual=4, chunk=8)), max_new_tokens=8,
                                    num_beams=beams)
        assert got.shape == want.shape and coded.nbytes() < alone.nbytes() / 2


def test_a_dropped_model_patched_with_policy_and_quantizer_is_freed():
    import gc
    import weakref

    import effllm
    from effllm.kv import H2O

    model = _tiny()
    effllm.patch(model, kv=(H2O(16, recent=4), KIVI(4, 8, 8)))
    with torch.inference_mode():
        model.generate(_ids(30, batch=1), max_new_tokens=3, do_sample=False)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "a patched model dropped without unpatch() is still referenced"


@pytest.mark.model
def test_smollm2_generates_with_a_quantizer_eviction_and_beams(smollm2):
    import effllm
    from effllm.demo import build_prompt
    from effllm.kv import KVzip, SnapKV

    model, tok = smollm2
    prompt = build_prompt(tok, 600)
    n = prompt.input_ids.shape[1]
    from effllm.kv import NSNQuant

    # fp32 model: 4-bit codes + fp32 scale and minimum per 32 = 0.19 of fp32, plus the residual
    # windows (up to 31 keys, 63 values) and the read buffers (one layer of 30)
    kivi = KIVI(bits=4, residual=32)
    nsn = NSNQuant(bits=2)
    # NSNQuant keeps a 64-token fp32 window: a fifth of the ~320 tokens SnapKV(0.5) keeps here.
    # KVzip's global scope leaves heads of different lengths, each its own store: 25% of the
    # tokens at 2.81 bits (2.2% of fp32) plus a 16-47-token fp32 window per row (~5%)
    small = NSNQuant(bits=2, residual=16, chunk=32)
    for kv, bytes_at_most in [(kivi, 0.30), ((SnapKV(0.5), kivi), 0.20), (nsn, 0.30), ((SnapKV(0.5), nsn), 0.25),
                              ((KVzip(0.25, tokenizer=tok), small), 0.10)]:
        with effllm.patched(model, kv=kv) as handle, torch.inference_mode():
            out = model.generate(prompt.input_ids, max_new_tokens=12, do_sample=False)
            stats = handle.kv.stats()
            assert prompt.key in tok.decode(out[0, n:]), kv
            assert stats["kv_bytes"] <= bytes_at_most * stats["kv_bytes_full"], (kv, stats["kv_bytes"])
            beams = model.generate(prompt.input_ids, max_new_tokens=12, do_sample=False, num_beams=2)
            assert prompt.key in tok.decode(beams[0, n:]), kv


@pytest.mark.parametrize("beams", [1, 3])
def test_nsnquant_composes_with_eviction_and_beams(beams):
    # StreamingLLM's choice depends on positions only, so with NSNQuant the cache must keep
    # exactly the policy-alone positions while decoding evicts from the coded store (beams
    # reorder the store's rows, an empty one included: the prefill is staged before it is coded)
    from effllm.kv import NSNQuant, StreamingLLM

    model, ids = _tiny(seed=9), _ids(50, batch=1, seed=9)
    policy = StreamingLLM(20, sinks=4, slack=2)
    out, cache = _generate_with(model, ids, (policy, NSNQuant(bits=2, residual=8, chunk=16)), max_new_tokens=10,
                                num_beams=beams)
    want, alone = _generate_with(model, ids, policy, max_new_tokens=10, num_beams=beams)
    assert out.shape == want.shape
    for a, b in zip(alone.layers, cache.layers):
        assert torch.equal(a.positions, b.positions) and len(b.store) + b.keys.shape[2] == b.stored() <= 22
        assert len(b.store) > 8  # coded tokens beyond the full-precision window


def test_a_head_dim_the_quantizer_cannot_hold_is_refused_at_patch():
    import effllm
    from effllm.kv import NSNQuant, SnapKV
    from effllm.testing.models import tiny_causal_lm

    model = tiny_causal_lm("llama", 0, num_hidden_layers=1, hidden_size=48, num_attention_heads=4,
                           num_key_value_heads=2)  # head dim 12: no multiple of 8
    for kv in (NSNQuant(bits=2), (SnapKV(0.5), NSNQuant(bits=1)), KIVI(bits=2, group=8, residual=8)):
        with pytest.raises(ValueError, match="head dim 12"):
            effllm.patch(model, kv=kv)
        assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_effllm_patch_handle")
    effllm.patch(model, kv=NSNQuant(bits=2, vector_dim=4)).unpatch()  # 12 = 3 x 4 fits
