import math

import pytest
import torch
from hypothesis import given

from effllm.testing import ABS_FLOOR, assert_close_to_reference, assert_sqnr_at_least, sqnr_db
from effllm.testing.strategies import attention_shapes, odd_lengths, ragged_lengths


def test_passes_within_twice_torch_error():
    ref = torch.randn(64)
    torch_out = ref + 1e-3 * torch.sign(torch.randn(64))  # torch's own error: 1e-3
    kernel = ref + 1.9e-3
    assert_close_to_reference(kernel, ref, torch_out, floor=0.0)


def test_fails_beyond_twice_torch_error_with_readable_report():
    ref = torch.zeros(4, 8)
    torch_out = ref + 1e-3
    kernel = ref.clone()
    kernel[2, 5] = 5e-3
    with pytest.raises(AssertionError) as info:
        assert_close_to_reference(kernel, ref, torch_out, floor=0.0, name="attn")
    text = str(info.value)
    assert "attn: max |kernel - reference| = 5.000e-03 exceeds 2 x torch's same-dtype error 1.000e-03" in text
    assert "1 of 32 elements over the bound" in text


def test_floor_comes_from_the_table():
    ref = torch.zeros(3)
    exact = ref.clone()
    assert_close_to_reference(ref + 0.5 * ABS_FLOOR[torch.float32], ref, exact)
    with pytest.raises(AssertionError):
        assert_close_to_reference(ref + 3 * ABS_FLOOR[torch.float32], ref, exact)


def test_nonfinite_must_match():
    ref = torch.tensor([1.0, float("-inf")])
    assert_close_to_reference(ref.clone(), ref, ref.clone())
    with pytest.raises(AssertionError, match="non-finite values differ"):
        assert_close_to_reference(torch.tensor([1.0, float("nan")]), ref, ref.clone())
    with pytest.raises(AssertionError, match="non-finite values differ"):
        assert_close_to_reference(torch.tensor([float("inf"), 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))


def test_shape_mismatch():
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close_to_reference(torch.zeros(2), torch.zeros(3), torch.zeros(3))


def test_sqnr():
    ref = torch.randn(1000, dtype=torch.float64)
    assert math.isclose(sqnr_db(ref, ref * 1.1), 20.0, rel_tol=1e-9)
    assert sqnr_db(ref, ref) == math.inf
    assert_sqnr_at_least(ref, ref * 1.01, 39.0)
    with pytest.raises(AssertionError, match="below the floor"):
        assert_sqnr_at_least(ref, ref * 1.1, 25.0)


@given(attention_shapes())
def test_attention_shapes_are_odd_and_grouped(shape):
    assert shape.heads % shape.kv_heads == 0
    assert shape.seqlen_q % 16 and shape.seqlen_k % 16
    assert shape.head_dim in (64, 80, 96, 128)


@given(odd_lengths(), ragged_lengths())
def test_lengths(n, lengths):
    assert n % 16 != 0
    assert lengths and not all(x % 16 == 0 for x in lengths)
