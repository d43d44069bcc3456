"""Comparisons against references, with reports a person can read."""

from __future__ import annotations

import math

import torch

from .tolerances import ATTENTION_ERROR_RATIO, abs_floor


def _max_abs_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, tuple[int, ...] | None]:
    diff = (a.double() - b.double()).abs()
    if diff.numel() == 0:
        return 0.0, None
    flat = torch.nan_to_num(diff, nan=math.inf).flatten()
    idx = int(flat.argmax())
    return float(flat[idx]), tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), diff.shape))


def _nonfinite(t: torch.Tensor) -> str:
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return f"{nan} NaN, {inf} inf" if nan or inf else "all finite"


def assert_close_to_reference(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    same_dtype_torch: torch.Tensor,
    *,
    ratio: float = ATTENTION_ERROR_RATIO,
    floor: float | None = None,
    name: str = "output",
) -> None:
    """Assert ``max|out - ref| <= ratio * max|same_dtype_torch - ref| + floor``.

    ``ref_fp32`` is the float32 (or better) reference; ``same_dtype_torch`` is the same computation
    done by torch at ``out``'s dtype, so the bound scales with what that dtype can achieve.
    ``floor`` defaults to the tolerance table's entry for ``out.dtype``.
    """
    if out.shape != ref_fp32.shape or same_dtype_torch.shape != ref_fp32.shape:
        raise AssertionError(
            f"{name}: shape mismatch: out {tuple(out.shape)}, reference {tuple(ref_fp32.shape)}, "
            f"torch same-dtype {tuple(same_dtype_torch.shape)}"
        )
    out, ref_fp32, same_dtype_torch = (t.detach() for t in (out, ref_fp32, same_dtype_torch))
    floor = abs_floor(out.dtype) if floor is None else floor
    # NaN/inf must match the reference exactly (e.g. -inf LSE of empty rows).
    out_bad, ref_bad = ~torch.isfinite(out), ~torch.isfinite(ref_fp32)
    same = torch.equal(out_bad, ref_bad)
    if same:
        a, b = out[out_bad], ref_fp32[ref_bad].to(out.dtype)
        same = bool(((a == b) | (a.isnan() & b.isnan())).all())
    if not same:
        raise AssertionError(
            f"{name}: non-finite values differ: kernel has {_nonfinite(out)}, reference has {_nonfinite(ref_fp32)}"
        )
    finite = ~ref_bad
    kernel_err, where = _max_abs_error(out[finite], ref_fp32[finite])
    torch_err, _ = _max_abs_error(same_dtype_torch[finite], ref_fp32[finite])
    bound = ratio * torch_err + floor
    if not kernel_err <= bound:
        n_over = int(((out[finite].double() - ref_fp32[finite].double()).abs() > bound).sum())
        raise AssertionError(
            f"{name}: max |kernel - reference| = {kernel_err:.3e} exceeds {ratio:g} x torch's same-dtype error "
            f"{torch_err:.3e} + floor {floor:.1e} = {bound:.3e}\n"
            f"  dtype {out.dtype}, shape {tuple(out.shape)}, {n_over} of {int(finite.sum())} elements over the bound, "
            f"worst at flat-finite index {where}"
        )


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio ``20 log10(||ref|| / ||ref - approx||)`` in dB (inf if exact)."""
    ref = reference.double()
    noise = torch.linalg.vector_norm(ref - approx.double())
    signal = torch.linalg.vector_norm(ref)
    if noise == 0:
        return math.inf
    return float(20.0 * torch.log10(signal / noise).detach())


def assert_sqnr_at_least(reference: torch.Tensor, approx: torch.Tensor, floor_db: float, *, name: str = "output") -> float:
    value = sqnr_db(reference, approx)
    if not value >= floor_db:
        raise AssertionError(f"{name}: SQNR {value:.2f} dB is below the floor {floor_db:.2f} dB")
    return value


def per_row_attention_reference(query: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]],
                                scale: float) -> torch.Tensor:
    """Float64 attention of ``query (B, H, Sq, D)`` over rows of different lengths: ``rows[b * H_kv
    + h]`` is KV head h of batch row b as ``(keys (T, D), values (T, D))``, its last ``Sq`` tokens
    the queries' own (causal among themselves); ``H`` a multiple of ``H_kv``. ``(B, Sq, H, D)``
    float32: the reference for a ragged cache layer, full precision or dequantized."""
    batch, heads, q_len, dim = query.shape
    kv_heads = len(rows) // batch
    group = heads // kv_heads
    out = torch.empty(batch, q_len, heads, dim)
    for row, (keys, values) in enumerate(rows):
        b, h = divmod(row, kv_heads)
        k, v = keys.double(), values.double()
        future = torch.arange(len(k))[None, :] > (len(k) - q_len + torch.arange(q_len))[:, None]
        for g in range(group):
            s = (query[b, h * group + g].double() @ k.T * scale).masked_fill(future, float("-inf"))
            out[b, :, h * group + g] = (torch.softmax(s, -1) @ v).float()
    return out
