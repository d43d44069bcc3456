"""KIVI KV quantization: packing, group layout (keys per channel, values per token), the error
bound of min-max rounding, and a layer store that keeps the newest tokens in full precision."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from effllm.kv.quantizers import KIVI, bits_per_element, dequantize, pack, quantize_groups, unpack


@given(bits=st.sampled_from([2, 4]), rows=st.integers(1, 5), bytes_=st.integers(1, 9), seed=st.integers(0, 99))
def test_pack_round_trips(bits, rows, bytes_, seed):
    codes = torch.randint(0, 2**bits, (rows, bytes_ * 8 // bits), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (rows, bytes_) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_layout_is_low_bits_first():
    assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
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
