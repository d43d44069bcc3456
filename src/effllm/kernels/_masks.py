"""Which keys each query may see: causal and sliding-window masks with bottom-right alignment."""

from __future__ import annotations

import numbers

import torch


def _is_int(value) -> bool:
    """An integer (numpy's too), but not a bool: ``window=True`` is a mistake, not a width of 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def normalize_window(window: int | tuple[int, int] | None, causal: bool) -> tuple[int, int] | None:
    """``window`` as ``(left, right)`` key counts around the query's own position, -1 = unbounded.

    An int ``w`` means ``(w, 0)`` for causal attention and ``(w, w)`` otherwise.
    """
    if window is None:
        return None
    if _is_int(window):
        window = (window, 0 if causal else window)
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(_is_int(w) for w in window)):
        raise ValueError(f"window must be None, an int or a (left, right) pair of ints, got {window!r}")
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise ValueError(f"window entries must be >= 0 or -1 (unbounded), got {window!r}")
    if left == -1 and right == -1:
        return None
    return left, right


def visible_key_range(
    seq_q: int, seq_k: int, *, causal: bool, window: tuple[int, int] | None
) -> tuple[int, int, int, int]:
    """First/last visible key of the first and of the last query: ``(lo0, hi0, lo1, hi1)``.

    Both bounds grow by one key per query, so a query sees no key iff ``lo > hi`` at one of
    the two ends; this answers "does any row see nothing?" in O(1), without a mask.
    """
    bounds = []
    for pos in (seq_k - seq_q, seq_k - 1):  # absolute positions of the first and last query
        lo, hi = 0, seq_k - 1
        if causal:
            hi = min(hi, pos)
        if window is not None:
            left, right = window
            if left >= 0:
                lo = max(lo, pos - left)
            if right >= 0:
                hi = min(hi, pos + right)
        bounds += [lo, hi]
    return tuple(bounds)


def has_rows_without_keys(seq_q: int, seq_k: int, *, causal: bool, window: tuple[int, int] | None) -> bool:
    if seq_k == 0:
        return seq_q > 0
    lo0, hi0, lo1, hi1 = visible_key_range(seq_q, seq_k, causal=causal, window=window)
    return lo0 > hi0 or lo1 > hi1


def attention_keep_mask(
    seq_q: int,
    seq_k: int,
    *,
    causal: bool,
    window: tuple[int, int] | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Boolean ``(Sq, Sk)`` mask, True where query i may attend key j; None when all may.

    Queries are aligned to the end of the keys (bottom-right, as in flash-attn): query i sits at
    absolute position ``i + Sk - Sq``.
    """
    if not causal and window is None:
        return None
    q_pos = torch.arange(seq_q, device=device).unsqueeze(1) + (seq_k - seq_q)
    k_pos = torch.arange(seq_k, device=device).unsqueeze(0)
    keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if causal:
        keep &= k_pos <= q_pos
    if window is not None:
        left, right = window
        if left >= 0:
            keep &= k_pos >= q_pos - left
        if right >= 0:
            keep &= k_pos <= q_pos + right
    return keep
