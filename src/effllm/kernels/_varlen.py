"""Input checks of packed variable-length attention: ``(total, H, D)`` tensors split by ``cu_seqlens``.

``attention`` runs them before it dispatches varlen input (``_attention_impl`` holds the paths).
"""

from __future__ import annotations

import itertools

import torch

from ._checks import INDEX_DTYPES, check_attention_inputs, describe


def check_packed_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k) -> None:
    """Both ``cu_seqlens`` given; q/k/v packed 3-D with the padded layout's shape rules."""
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("attention: varlen input needs both cu_seqlens_q and cu_seqlens_k")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"attention: with cu_seqlens, {name} must be packed 3-D (total, heads, head_dim), "
                             f"got {describe(t)}")
    # Same checks as the padded layout, on a batch-of-one view.
    check_attention_inputs(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))


def check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k) -> None:
    """Two ``(num_seqs + 1,)`` int32/int64 tensors of one shape on q's device (no device read)."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_cu_shape(name, cu, q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"attention: cu_seqlens_q and cu_seqlens_k must have one shape (num_seqs + 1,), got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")


def checked_maxima(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[int, int]:
    """``(max_seqlen_q, max_seqlen_k)`` after checking both ``cu_seqlens`` are valid prefix sums
    (one device read each); computed when None, refused when shorter than the longest sequence."""
    lengths_q = _lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    lengths_k = _lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    return _check_max("max_seqlen_q", max_seqlen_q, lengths_q), _check_max("max_seqlen_k", max_seqlen_k, lengths_k)


def _check_cu_shape(name, cu, device) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dtype not in INDEX_DTYPES or cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"attention: {name} must be a 1-D int32/int64 tensor of shape (num_seqs + 1,), "
                         f"got {describe(cu)}")
    if cu.device != device:
        raise ValueError(f"attention: {name} must be on {device}, got {cu.device}")


def _lengths(name, cu, total) -> list[int]:
    """Per-sequence lengths from ``cu``, after checking it is a valid prefix sum (one device read)."""
    values = cu.tolist()
    lengths = [b - a for a, b in itertools.pairwise(values)]
    if values[0] != 0 or any(n < 0 for n in lengths) or values[-1] != total:
        raise ValueError(f"attention: {name} must start at 0, never decrease and end at the packed length "
                         f"{total}, got {values[:8]}{' ...' if len(values) > 8 else ''}")
    return lengths


def _check_max(name, given, lengths) -> int:
    actual = max(lengths, default=0)
    if given is None:
        return actual
    if not isinstance(given, int) or given < actual:
        raise ValueError(f"attention: {name} must be an int >= the longest sequence ({actual}), got {given!r}")
    return given
