"""The torch path of effllm.kernels.attention against the explicit float32 reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from effllm.kernels import attention, attention_reference
from effllm.testing import assert_close_to_reference
from effllm.testing.strategies import attention_shapes


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape.batch, shape.seqlen_q, shape.heads, shape.head_dim, generator=gen).to(dtype)
    k = torch.randn(shape.batch, shape.seqlen_k, shape.kv_heads, shape.head_dim, generator=gen).to(dtype)
    v = torch.randn(shape.batch, shape.seqlen_k, shape.kv_heads, shape.head_dim, generator=gen).to(dtype)
    return q, k, v


def _check(q, k, v, **kw):
    out = attention(q, k, v, backend="torch", **kw)
    ref, _ = attention_reference(q, k, v, **kw)
    same, _ = attention_reference(q, k, v, compute_dtype=q.dtype, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_to_reference(out, ref, same.to(q.dtype))


@given(shape=attention_shapes(max_seqlen=80), causal=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_matches_reference(shape, causal, dtype):
    q, k, v = _inputs(shape, dtype)
    _check(q, k, v, causal=causal)


@given(shape=attention_shapes(max_seqlen=64), left=st.integers(0, 40), right=st.integers(-1, 20), causal=st.booleans())
def test_sliding_window(shape, left, right, causal):
    q, k, v = _inputs(shape, torch.float32)
    _check(q, k, v, causal=causal, window=(left, right))


@given(shape=attention_shapes(max_seqlen=64), cap=st.floats(1.0, 50.0))
def test_softcap_and_lse(shape, cap):
    q, k, v = _inputs(shape, torch.float32)
    out, lse = attention(q, k, v, softcap=cap, return_lse=True, backend="torch")
    ref, ref_lse = attention_reference(q, k, v, softcap=cap)
    assert lse.shape == (shape.batch, shape.heads, shape.seqlen_q) and lse.dtype == torch.float32
    assert_close_to_reference(out, ref, ref)
    assert_close_to_reference(lse, ref_lse, ref_lse)


def test_bottom_right_causal_alignment():
    # Two queries over five keys: the last query sees all keys, the first all but the last.
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8)
    out = attention(q, k, v, causal=True)
    full_last = attention(q[:, 1:], k, v, causal=False)
    first = attention(q[:, :1], k[:, :4], v[:, :4], causal=False)
    torch.testing.assert_close(out[:, 1:], full_last)
    torch.testing.assert_close(out[:, :1], first)


def test_rows_without_keys_are_zero():
    # More queries than keys, causal: the first Sq - Sk queries see nothing.
    q, k, v = torch.randn(1, 6, 2, 16), torch.randn(1, 3, 1, 16), torch.randn(1, 3, 1, 16)
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.isneginf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()


def test_gqa_equals_repeated_kv():
    q, k, v = torch.randn(2, 9, 6, 32), torch.randn(2, 9, 2, 32), torch.randn(2, 9, 2, 32)
    grouped = attention(q, k, v)
    repeated = attention(q, k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2))
    torch.testing.assert_close(grouped, repeated)


def test_bfloat16_runs_close_to_reference():
    q, k, v = (torch.randn(1, 33, 4, 64).bfloat16(), torch.randn(1, 33, 2, 64).bfloat16(),
               torch.randn(1, 33, 2, 64).bfloat16())
    _check(q, k, v, causal=True)


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "v_shape", "match"),
    [
        ((2, 5, 4, 16), (2, 5, 3, 16), (2, 5, 3, 16), r"kv heads \(3\) must divide query heads \(4\)"),
        ((2, 5, 4, 16), (1, 5, 2, 16), (1, 5, 2, 16), "batch sizes differ"),
        ((2, 5, 4, 16), (2, 5, 2, 8), (2, 5, 2, 8), "k and v head_dim must equal q head_dim 16"),
        ((2, 5, 4, 16), (2, 5, 2, 16), (2, 5, 2, 8), "k and v head_dim must equal q head_dim 16"),
        ((2, 5, 4, 16), (2, 5, 2, 16), (2, 6, 2, 16), "k and v must have the same"),
        ((5, 4, 16), (2, 5, 2, 16), (2, 5, 2, 16), "q must be 4-D"),
    ],
)
def test_bad_shapes(q_shape, k_shape, v_shape, match):
    with pytest.raises(ValueError, match=match):
        attention(torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape))


def test_bad_dtypes_and_options(monkeypatch):
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="share one dtype"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=(-3, 0))
    with pytest.raises(ValueError, match="softcap"):
        attention(q, k, v, softcap=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="needs both cu_seqlens_q and cu_seqlens_k"):
        attention(q, k, v, cu_seqlens_q=torch.tensor([0, 4]))


@given(sq=st.integers(1, 40), sk=st.integers(1, 40), causal=st.booleans(),
       window=st.one_of(st.none(), st.tuples(st.integers(-1, 12), st.integers(-1, 12))))
def test_empty_row_detection_matches_the_mask(sq, sk, causal, window):
    from effllm.kernels._masks import attention_keep_mask, has_rows_without_keys, normalize_window

    window = normalize_window(window, causal)
    keep = attention_keep_mask(sq, sk, causal=causal, window=window)
    brute = keep is not None and not bool(keep.any(dim=-1).all())
    assert has_rows_without_keys(sq, sk, causal=causal, window=window) == brute


@pytest.mark.parametrize("name", ["softcap", "scale"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 0.0, True])
@pytest.mark.parametrize("op", ["attention", "varlen", "decode"])
def test_non_finite_or_non_positive_scalars_are_refused(op, name, value):
    import effllm

    q = torch.randn(1, 3, 2, 8)
    kv = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match=name):
        if op == "attention":
            effllm.kernels.attention(q, kv, kv, causal=True, **{name: value})
        elif op == "varlen":
            cu = torch.tensor([0, 3], dtype=torch.int32)
            effllm.kernels.attention(q[0], kv[0, :3], kv[0, :3], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3,
                                     max_seqlen_k=3, causal=True, **{name: value})
        else:
            effllm.kernels.decode_attention(q[:, :1], kv, kv, 5, **{name: value})


def test_boolean_windows_and_lengths_are_refused_numpy_integers_taken():
    import numpy as np

    import effllm

    q = torch.randn(1, 1, 2, 8)
    kv = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="window"):
        effllm.kernels.attention(q, kv, kv, causal=True, window=True)
    with pytest.raises(ValueError, match="cache_seqlens"):
        effllm.kernels.decode_attention(q, kv, kv, True)
    torch.testing.assert_close(effllm.kernels.decode_attention(q, kv, kv, np.int64(5), window=np.int64(2)),
                               effllm.kernels.decode_attention(q, kv, kv, 5, window=2))


def test_zero_head_dim_is_refused():
    import effllm

    q = torch.randn(1, 3, 2, 0)
    with pytest.raises(ValueError, match="head_dim"):
        effllm.kernels.attention(q, q, q, causal=True)
    with pytest.raises(ValueError, match="head_dim"):
        effllm.kernels.decode_attention(q[:, :1], q, q, 3)


@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("path", ["torch", "torch-lse", "triton", "reference", "decode-torch", "decode-triton"])
def test_nan_inputs_give_nan_rows_the_same_way_on_every_path(where, path):
    # The convention (docs/testing.md): a NaN in a query row, or in a key the query sees, makes
    # exactly that query's row NaN. SDPA's CPU kernels gave zeros for a NaN query row.
    import effllm
    from effllm._backend import interpreting
    from effllm.kernels import attention_reference

    if "triton" in path and not interpreting():
        pytest.skip("Triton paths run under TRITON_INTERPRET=1 here")
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
    bad = 4 if path.startswith("decode") and where == "q" else 2
    (q if where == "q" else k)[:, bad] = float("nan")
    run = {
        "torch": lambda: effllm.kernels.attention(q, k, v, causal=True, backend="torch"),
        "torch-lse": lambda: effllm.kernels.attention(q, k, v, causal=True, backend="torch", return_lse=True)[0],
        "triton": lambda: effllm.kernels.attention(q, k, v, causal=True, backend="triton"),
        "reference": lambda: attention_reference(q, k, v, causal=True)[0],
        "decode-torch": lambda: effllm.kernels.decode_attention(q[:, -1:], k, v, 5, backend="torch"),
        "decode-triton": lambda: effllm.kernels.decode_attention(q[:, -1:], k, v, 5, backend="triton"),
    }[path]
    rows = run().isnan().any(-1).any(-1)[0].tolist()
    if path.startswith("decode"):
        assert rows == [True]
    else:
        assert rows == ([i == bad for i in range(5)] if where == "q" else [i >= bad for i in range(5)])
