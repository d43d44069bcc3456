"""INT4 / INT8 / FP8 formats: pack round trips, rounding bounds, AWQ/GPTQ layout converters
checked on hand-built words."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effllm.quant import checkpoint_layouts as layouts
from effllm.quant import formats


@settings(max_examples=25)
@given(n=st.integers(1, 9), half_k=st.integers(1, 40), seed=st.integers(0, 999))
def test_int4_pack_round_trip(n, half_k, seed):
    q = torch.randint(0, 16, (n, 2 * half_k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = formats.int4_pack(q)
    assert packed.shape == (n, half_k) and packed.dtype == torch.uint8
    assert torch.equal(formats.int4_unpack(packed), q)


def test_int4_nibble_order_is_documented_one():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert formats.int4_pack(q).tolist() == [[0x21, 0x0F]]  # k=0 low nibble, k=1 high nibble


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_rounding_error_is_at_most_half_a_step(symmetric, group_size):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(group_size)) * 0.05
    q, scales, zeros = formats.int4_quantize(w, group_size, symmetric)
    assert q.max() <= 15 and q.min() >= 0
    deq = formats.int4_dequantize(q, scales, zeros, group_size)
    step = scales.repeat_interleave(group_size, 1)
    err = (deq - w).abs()
    if symmetric:
        # the group's largest positive value may clip to +7 steps: allow that one extra half step
        assert (err <= step * 0.5 + 1e-7).float().mean() > 0.99 and (err <= step + 1e-7).all()
    else:
        assert (err <= step * 0.5 + 1e-6).all()
        # default: integer zero points (AWQ/GPTQ-exportable), so 8 - zero / scale is an integer
        z = 8 - zeros / scales
        torch.testing.assert_close(z, z.round(), rtol=0, atol=1e-4)
        # float zeros: each group's min and max are exactly representable (q = 0 and q = 15)
        q, scales, zeros = formats.int4_quantize(w, group_size, symmetric, integer_zeros=False)
        groups = w.view(24, -1, group_size)
        torch.testing.assert_close(zeros - 8 * scales, groups.amin(-1), rtol=0, atol=1e-6)
        assert ((formats.int4_dequantize(q, scales, zeros, group_size) - w).abs() <= step * 0.5 + 1e-6).all()


def test_int4_rejects_bad_group():
    with pytest.raises(ValueError, match="in_features 96 is not a multiple of group_size 64.*e.g. 32"):
        formats.int4_quantize(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        formats.int4_quantize(torch.randn(4, 96), 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_decodes_within_half_a_step_of_the_stored_scale(dtype):
    w = torch.randn(40, 300, generator=torch.Generator().manual_seed(0))
    w[:20] *= 3
    w[20:] *= 1e-4  # small rows: their scales below float16's smallest normal
    w = w.to(dtype)
    w[3] = 0  # an all-zero row: a positive scale, zero codes
    q, s = formats.int8_quantize(w)
    assert s.dtype == dtype and (s > 0).all() and (q[3] == 0).all()
    error = (formats.int8_dequantize(q, s, torch.float32) - w.float()).abs()
    assert (error <= s.float()[:, None] * (0.5 + 1e-5)).all()
    # every other row uses the whole range (float16's subnormal scales are a little coarser)
    reach = q.abs().amax(dim=1).float()
    assert (reach[:20][torch.arange(20) != 3] == 127).all() and (reach[20:] >= 120).all()


def test_int8_and_fp8_round_trip_bounds():
    w = torch.randn(40, 300, generator=torch.Generator().manual_seed(0))
    for granularity in formats.FP8_WEIGHT_GRANULARITIES:
        q, s = formats.fp8_quantize(w, granularity)
        assert q.dtype == torch.float8_e4m3fn
        rel = (formats.fp8_dequantize(q, s) - w).abs() / w.abs().clamp_min(1e-3)
        assert rel.median() < 0.04, granularity  # e4m3: 3 mantissa bits, <= 1/16 relative step
    assert formats.fp8_quantize(w, "block")[1].shape == (1, 3)  # ceil(40/128), ceil(300/128)


# ---- AWQ / GPTQ layouts on hand-built words ---------------------------------------------------

def test_awq_word_order():
    # Columns 0..7 hold values 0..7: AWQ packs them in order [0, 2, 4, 6, 1, 3, 5, 7].
    qweight = torch.tensor([[0x75316420]], dtype=torch.int32).repeat(32, 1)  # K=32, N=8
    qzeros = torch.tensor([[0x33333333]], dtype=torch.int32)  # z = 3 everywhere, one group
    scales = torch.full((1, 8), 0.5)
    q, s, zeros = layouts.from_awq(qweight, qzeros, scales, group_size=32)
    assert q.shape == (8, 32) and q[:, 0].tolist() == list(range(8))
    w = formats.int4_dequantize(q, s, zeros, 32)
    torch.testing.assert_close(w[:, 0], (torch.arange(8.0) - 3) * 0.5)  # w = (q - z) * s
    back = layouts.to_awq(q, s, zeros)
    assert torch.equal(back[0], qweight) and torch.equal(back[1], qzeros)


def test_gptq_word_order_and_zero_offset():
    # K packed: nibble i of row 0 is k = i; values k + 1. v1 zeros store z - 1 (here z = 8 -> 7).
    qweight = torch.tensor([[0x87654321 - 2**32]], dtype=torch.int32).repeat(4, 8)  # K=32, N=8 (signed words)
    qzeros = torch.tensor([[0x77777777]], dtype=torch.int32)
    scales = torch.full((1, 8), 2.0)
    q, s, zeros = layouts.from_gptq(qweight, qzeros, scales, group_size=32)
    assert q[0, :8].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    torch.testing.assert_close(formats.int4_dequantize(q, s, zeros, 32)[0, :8], (torch.arange(1.0, 9) - 8) * 2)
    qw, qz, sc, g_idx = layouts.to_gptq(q, s, zeros)
    assert torch.equal(qw, qweight) and torch.equal(qz, qzeros) and torch.equal(g_idx, torch.zeros(32, dtype=torch.int32))


def test_gptq_zero_point_zero_wraps_like_v1_checkpoints():
    q = torch.randint(0, 16, (8, 32), dtype=torch.uint8)
    scales = torch.ones(8, 1)
    zeros = torch.full((8, 1), 8.0)  # z = 0: stored as -1, i.e. nibble 15
    qw, qz, sc, _ = layouts.to_gptq(q, scales, zeros)
    assert qz.item() == -1  # 0xFFFFFFFF
    q2, s2, z2 = layouts.from_gptq(qw, qz, sc, 32)
    assert torch.equal(q2, q) and torch.equal(z2, zeros)


def test_layout_errors():
    with pytest.raises(ValueError, match="act-order"):
        layouts.from_gptq(torch.zeros(4, 8, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                          torch.ones(1, 8), 32, g_idx=torch.arange(32) % 2)  # act-order: groups interleaved
    with pytest.raises(ValueError, match="qzeros must be int32 of shape"):
        layouts.from_awq(torch.zeros(32, 1, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32), torch.ones(1, 8), 32)
    w = torch.randn(8, 32)
    q, s, zeros = formats.int4_quantize(w, 32, integer_zeros=False)  # min/max mapped exactly
    with pytest.raises(ValueError, match="not integer zero points"):
        layouts.to_awq(q, s, zeros)
    q, s, zeros = formats.int4_quantize(w, 32)
    assert torch.equal(layouts.from_awq(*layouts.to_awq(q, s, zeros), 32)[0], q)
