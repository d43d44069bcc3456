"""Packed variable-length attention: ``(total, H, D)`` tensors split by ``cu_seqlens``.

Validation, the Triton launch (one grid over all sequences, sized by the longest) and the torch
path, which runs the padded-batch torch path once per sequence (each call is vectorised over
heads and tokens; sequences are few compared with tokens). Under ``torch.compile`` the call
goes through the ``effllm::attention_varlen`` custom op (``ops.py``).
"""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from ._checks import INDEX_DTYPES, check_positive_scalar, describe
from ._masks import normalize_window



def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, scale, window,
                     softcap, return_lse, backend):
    from .attention import _validate

    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("attention: varlen input needs both cu_seqlens_q and cu_seqlens_k")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"attention: with cu_seqlens, {name} must be packed 3-D (total, heads, head_dim), "
                             f"got {describe(t)}")
    # Same checks as the padded layout, on a batch-of-one view.
    _validate(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
    check_positive_scalar("attention", "softcap", softcap)
    check_positive_scalar("attention", "scale", scale)
    window = normalize_window(window, causal)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_cu_shape(name, cu, q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"attention: cu_seqlens_q and cu_seqlens_k must have one shape (num_seqs + 1,), got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    if torch.compiler.is_compiling():
        # cu_seqlens values cannot be read while tracing: the op runs with the given maxima.
        from .ops import attention_varlen_op

        if max_seqlen_q is None or max_seqlen_k is None:
            raise ValueError("attention: pass max_seqlen_q and max_seqlen_k with varlen input under torch.compile")
        resolve_backend(backend, q, k, v, op="attention")
        left, right = window if window is not None else (-1, -1)
        out, lse = attention_varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                       scale, left, right, softcap, backend)
        return (out, lse) if return_lse else out
    lengths_q = _lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    lengths_k = _lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    max_seqlen_q = _check_max("max_seqlen_q", max_seqlen_q, lengths_q)
    max_seqlen_k = _check_max("max_seqlen_k", max_seqlen_k, lengths_k)
    out, lse = run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                          scale=scale, window=window, softcap=softcap, backend=backend)
    return (out, lse) if return_lse else out


def run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, scale, window, softcap,
               backend):
    """Validated varlen input on the chosen backend: ``(out, lse (H, total_q))``."""
    from .attention import _TritonAttention, _attention_torch

    chosen = resolve_backend(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, op="attention")
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap)
    if chosen == "triton":
        options |= dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                        max_seqlen_k=max_seqlen_k)
        return _TritonAttention.apply(q, k, v, options)
    outs, lses = [], []
    spans_q, spans_k = _spans(cu_seqlens_q.tolist()), _spans(cu_seqlens_k.tolist())
    for (q0, q1), (k0, k1) in zip(spans_q, spans_k):
        out, lse = _attention_torch(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], return_lse=True, **options)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, dim=1) if lses else q.new_full((q.shape[1], 0), float("-inf"), dtype=torch.float32)
    return out, lse


def _check_cu_shape(name, cu, device) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dtype not in INDEX_DTYPES or cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"attention: {name} must be a 1-D int32/int64 tensor of shape (num_seqs + 1,), "
                         f"got {describe(cu)}")
    if cu.device != device:
        raise ValueError(f"attention: {name} must be on {device}, got {cu.device}")


def _lengths(name, cu, total) -> list[int]:
    """Per-sequence lengths from ``cu``, after checking it is a valid prefix sum (one device read)."""
    values = cu.tolist()
    lengths = [b - a for a, b in zip(values, values[1:])]
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


def _spans(offsets):
    """(start, end) of each sequence from cu_seqlens values."""
    return list(zip(offsets, offsets[1:]))
