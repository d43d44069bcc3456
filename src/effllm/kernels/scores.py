"""Attention computed by hand in float32: scores, probabilities, log-sum-exp, attention mass.

Every explicit-softmax path in effllm goes through this module: the torch paths of
``attention`` and ``decode_attention`` when SDPA cannot express a request (logit softcap, LSE,
per-key statistics, rows that see no key), and the KV-cache scorers that need the probabilities
themselves (which keys the queries looked at). One arithmetic, one mask convention, one NaN
convention, one memory bound.

Contract
--------
Layout, heads first as in SDPA and transformers: ``q (B, H, Sq, D)``, ``k (B, H_kv, Sk, D)``,
``v (B, H_kv, Sk, Dv)``; any strides (a ``(B, S, H, D)`` tensor's ``transpose(1, 2)`` view is
fine). ``H_kv`` divides ``H``; query head ``h`` reads KV head ``h // (H // H_kv)``, and the
query heads of one KV head are stacked as rows of one matrix, so keys and values are never
repeated per query head.

Positions: query ``i`` sits at key position ``Sk - Sq + i`` (bottom-right, as in flash-attn: the
queries are the last ``Sq`` positions). With ``key_lengths (B,)`` row ``b`` holds
``key_lengths[b] <= Sk`` keys instead, its query ``i`` sits at ``key_lengths[b] - Sq + i``, and
keys at or past ``key_lengths[b]`` are never seen (a padded batch of caches). To score only some queries
of a step (a window of the last ones), pass those queries: positions stay bottom-right.

Visibility, all combined: ``causal`` (keys at or before the query's position); ``window``, a
``(left, right)`` pair of key counts around the query's position, -1 unbounded (the form
``_masks.normalize_window`` returns); ``key_valid (B, Sk)`` bool, False for keys no query may see
(padding).

Arithmetic, float32 whatever the input dtype: ``logits = (q * scale) @ k^T``
(``scale`` defaults to ``1/sqrt(D)``), then ``softcap * tanh(logits / softcap)`` when a softcap is
given, then -inf where a key is not visible; ``lse = logsumexp(logits)`` (natural log),
``probs = exp(logits - lse)``, ``out = probs @ v``.

Rows with no visible key: probabilities 0, ``out`` 0, ``lse`` -inf. NaN: a NaN in a query row, or
in a key or value that row sees, makes that row's probabilities, ``out`` and ``lse`` NaN (and the
``mass``/``peak`` of the keys of its KV head); other rows are untouched.

Outputs (``softmax_attention``), each computed only when asked for:

- ``out (B, H, Sq, Dv)`` float32 (written into ``out=`` when given);
- ``lse (B, H, Sq)`` float32;
- ``mass (B, H_kv, Sk)``: the probability each key received, summed over the queries and the
  query heads of its KV head (rows with ``query_valid`` False add nothing);
- ``peak (B, H_kv, Sk)``: the largest probability each key received from any such query row;
- ``probs (B, H, Sq, Sk)``: the probabilities themselves (this one is materialised whole: ask for
  it only for a few queries).

Rows with ``query_valid`` False add nothing to ``mass`` and ``peak``, not even a NaN.

Memory: queries are processed in chunks so that one chunk's ``(B, H, chunk, Sk)`` float32 scores
hold at most ``chunk_elems`` elements (16 MiB by default); nothing of size ``Sq * Sk`` exists at
once unless ``probs`` is asked for. A chunk's logits stop at the last key any of its queries may
see (``seen_width``): causal chunks early in the prompt compute only their prefix of the keys.

Paths: on CPU without autograd, one native pass per row (``effllm.native.softmax_rows``) does a
chunk's masking, softmax, log-sum-exp, mass and peak after the logits' matmul; elsewhere (CUDA,
autograd, ``EFFLLM_NATIVE=0``, no C compiler) the torch ops do, with the same conventions, but
for one: a row whose visible logits all overflow to -inf where no mask could empty a row gets
NaN from the torch ops (their one-kernel softmax) and 0 with lse -inf from the native pass, as
from ``kernels/reference.py``.

The building blocks, ``logits`` and ``softmax``, serve loops that already hold one row's keys
(the decode paths): same arithmetic, no mask, no chunking.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._masks import has_rows_without_keys

# One chunk's float32 scores: at most this many elements (16 MiB: smaller chunks stop closer to
# the causal diagonal, and the softmax pass finds them still in cache; on a SmolLM2 layer's H2O
# prefill, 64 MiB chunks took about twice as long, ad hoc).
SCORE_ELEMS = 4 * 1024 * 1024

_FLOAT32_MIN = torch.finfo(torch.float32).min


class SoftmaxAttention(NamedTuple):
    """What ``softmax_attention`` computed; None for what was not asked for."""

    out: torch.Tensor | None
    lse: torch.Tensor | None
    mass: torch.Tensor | None
    peak: torch.Tensor | None
    probs: torch.Tensor | None


def logits(q: torch.Tensor, k: torch.Tensor, scale: float | None, softcap: float | None = None) -> torch.Tensor:
    """Float32 ``(q * scale) @ k^T``, soft-capped: ``q (..., R, D)``, ``k (..., S, D)`` -> ``(..., R, S)``.

    The scale goes on the queries (R x D numbers) rather than on the logits (R x S, a pass over
    memory as long as the matmul's output). ``scale=None`` means q is already scaled (a loop that
    scales its queries once)."""
    q = q.float() if scale is None else q.float() * scale
    scores = matmul(q, k.float().transpose(-1, -2))
    if scores.requires_grad:  # autograd (the ops' torch backward recomputes this): no in-place ops
        return torch.tanh(scores / softcap) * softcap if softcap is not None else scores
    if softcap is not None:
        scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    return scores


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a (B, H, R, K)`` and ``b (B, H, K, N)``, one KV head at a time when ``b``'s
    ``(B, H)`` dims cannot be flattened into one batch dim (a ``(B, S, H, D)`` cache seen heads
    first): ``torch.matmul`` would copy the whole of ``b`` for every call, a multi-MiB buffer
    that costs page faults; a view per head goes to the batched GEMM as it is. Returns a
    ``(B, H, R, N)`` view of an ``(H, B, R, N)`` buffer in that case."""
    if a.dim() != 4 or b.dim() != 4 or b.shape[0] == 1 or b.shape[1] == 1 \
            or b.stride(0) == b.stride(1) * b.shape[1] or a.requires_grad or b.requires_grad:
        return torch.matmul(a, b)
    out = torch.empty(b.shape[1], a.shape[0], a.shape[2], b.shape[3], dtype=torch.result_type(a, b), device=a.device)
    for h in range(b.shape[1]):
        torch.matmul(a[:, h], b[:, h], out=out[h])
    return out.transpose(0, 1)


def softmax(scores: torch.Tensor, *, need_lse: bool = False, may_be_empty: bool = True,
            lse_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(probs, lse)`` of float32 logits over their last dim; ``scores`` is overwritten (unless
    it requires grad).

    ``lse`` keeps the reduced dim (``(..., R, 1)``), None unless ``need_lse``; ``lse_out`` (that
    shape) receives it. ``may_be_empty=False`` promises every row has a finite logit (no row
    masked whole), which saves one op; rows that are all -inf otherwise give 0 and lse -inf.
    """
    if not need_lse and not may_be_empty:
        return torch.softmax(scores, dim=-1), None  # one kernel
    lse = torch.logsumexp(scores, dim=-1, keepdim=True, out=lse_out)
    # clamp_min keeps NaN (the NaN convention) and turns -inf into a finite shift: exp(-inf) = 0.
    shift = lse.clamp_min(_FLOAT32_MIN) if may_be_empty else lse
    probs = torch.exp(scores - shift) if scores.requires_grad else scores.sub_(shift).exp_()
    return probs, (lse if need_lse else None)


def visible_range(queries: slice, seq_q: int, seq_k: int, *, causal: bool, window: tuple[int, int] | None,
                  key_lengths: torch.Tensor | None = None,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(lo, hi)`` int64 ``(B or 1, len(queries))``: query row ``i`` of ``queries`` (of ``seq_q``)
    may see keys ``lo <= j < hi`` (``key_valid`` aside), with the positions and masks of the
    module contract; ``lo`` None where it is 0 (no window's left bound). Not clamped: ``hi`` may
    pass ``seq_k`` or fall to ``lo`` or below (no key), ``lo`` may be negative."""
    offsets = torch.arange(queries.start - seq_q, queries.stop - seq_q, device=device)
    if key_lengths is None:
        q_pos = (offsets + seq_k)[None, :]  # 1, c
    else:
        lengths = key_lengths.to(device=device, dtype=torch.int64)[:, None]  # B, 1
        q_pos = lengths + offsets  # B, c
    if causal:
        hi = q_pos + 1
    else:
        hi = torch.full_like(q_pos, seq_k) if key_lengths is None else lengths.expand_as(q_pos)
    lo = None
    if window is not None:
        left, right = window
        if left >= 0:
            lo = q_pos - left
        if right >= 0:
            hi = torch.minimum(hi, q_pos + right + 1)
    return lo, hi


def visible_keys(queries: slice, seq_q: int, seq_k: int, *, causal: bool, window: tuple[int, int] | None,
                 key_lengths: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Bool ``(B or 1, len(queries), Sk)``: True where query row ``i`` of ``queries`` (of ``seq_q``)
    may see key ``j``, with the positions and masks of the module contract; None when all may."""
    start, stop = queries.start, queries.stop
    if not causal and window is None and key_lengths is None and key_valid is None:
        return None
    if key_lengths is None and key_valid is None and window is None and seq_k - seq_q + start >= seq_k - 1:
        return None  # causal queries at the end of the keys see all of them
    keep = key_valid[:, None, :] if key_valid is not None else None
    if causal or window is not None or key_lengths is not None:
        lo, hi = visible_range(queries, seq_q, seq_k, causal=causal, window=window, key_lengths=key_lengths,
                               device=device)
        k_pos = torch.arange(seq_k, device=device)
        seen = k_pos < hi[..., None]
        keep = _and(keep, seen if lo is None else seen & (k_pos >= lo[..., None]))
    return keep.expand(-1, stop - start, -1) if keep.shape[1] != stop - start else keep


def seen_width(stop: int, seq_q: int, seq_k: int, *, causal: bool, window: tuple[int, int] | None,
               end: int | None = None) -> int:
    """Keys at or past this index are seen by no query row before ``stop``: a chunk's logits stop
    there (with causal queries, a chunk early in the prompt computes its own prefix of the keys,
    not the whole row). ``end``: the most keys any row holds (``keys_end``; default ``seq_k``)."""
    end = seq_k if end is None else end
    last = end - seq_q + stop  # one past the last query row's position
    width = end
    if causal:
        width = last
    elif window is not None and window[1] >= 0:
        width = last + window[1]
    return max(1, min(seq_k, width)) if seq_k else 0


def keys_end(seq_k: int, key_lengths: torch.Tensor | None) -> int:
    """The most keys any row holds: the largest of ``key_lengths`` (read once, on CPU), else
    ``seq_k`` (on CUDA it is not read back: no sync)."""
    if key_lengths is None or key_lengths.device.type != "cpu" or not key_lengths.numel():
        return seq_k
    return min(seq_k, int(key_lengths.max()))


def _native_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None):
    """``effllm.native.softmax_rows`` where it applies: CPU tensors, no autograd, the loops built
    (``EFFLLM_NATIVE=0`` or no C compiler: None, and the torch ops run)."""
    if q.device.type != "cpu" or torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v)):
        return None
    from ..native import library, softmax_rows

    return softmax_rows if library() is not None else None


def _add_keys(total: torch.Tensor | None, new: torch.Tensor, seq_k: int, peak: bool = False) -> torch.Tensor:
    """``total`` (B, H_kv, Sk) with one chunk's per-key ``new`` (its first keys) summed in, or
    maxed in (``peak``); the first chunk's own tensor when it spans every key."""
    width = new.shape[-1]
    if new.requires_grad:  # autograd: out of place (probabilities are >= 0: zero-padding keeps the peak)
        new = F.pad(new, (0, seq_k - width))
        return new if total is None else torch.maximum(total, new) if peak else total + new
    if total is None:
        if width == seq_k:
            return new
        total = new.new_zeros(*new.shape[:-1], seq_k)
    seen = total[..., :width]
    if peak:
        torch.maximum(seen, new, out=seen)
    else:
        seen += new
    return total


def _and(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a & b


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    causal: bool = True,
    window: tuple[int, int] | None = None,
    key_lengths: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    need_out: bool = True,
    need_lse: bool = False,
    need_mass: bool = False,
    need_peak: bool = False,
    need_probs: bool = False,
    out: torch.Tensor | None = None,
    chunk_elems: int = SCORE_ELEMS,
) -> SoftmaxAttention:
    """Explicit float32 softmax attention of ``q`` over ``k`` (and ``v``), chunked over queries.

    See the module docstring for layouts, positions, masks, arithmetic and outputs.
    ``query_valid (B, Sq)`` bool: rows that add to ``mass`` and ``peak`` (padding queries do not);
    their other outputs are computed as usual. ``out``: a float32 ``(B, H, Sq, Dv)`` tensor (any
    strides) to write the output into, returned as ``.out``. ``need_out`` needs ``v``.
    """
    batch, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if need_out and v is None:
        raise ValueError("softmax_attention: need_out=True needs v")
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    device = q.device
    qg = q.unflatten(1, (kv_heads, group))  # B, H_kv, G, Sq, D (a view)
    kf = k.float()
    vf = v.float() if need_out else None
    may_be_empty = key_valid is not None or key_lengths is not None \
        or has_rows_without_keys(seq_q, seq_k, causal=causal, window=window)

    f32 = {"dtype": torch.float32, "device": device}
    if need_out:
        out = torch.empty(batch, heads, seq_q, v.shape[-1], **f32) if out is None else out
        out_g = out.unflatten(1, (kv_heads, group))
    lse = torch.empty(batch, kv_heads, group, seq_q, **f32) if need_lse else None
    # a chunk's logits stop at the keys its queries may see, so later keys stay zero here
    probs_all = torch.zeros(batch, kv_heads, group, seq_q, seq_k, **f32) if need_probs else None
    mass = peak = None  # (B, H_kv, Sk) once a chunk adds to them
    narrowed = False  # a chunk's logits stopped short of the last key
    fused = _native_rows(q, k, v)
    chunk = max(1, chunk_elems // max(1, batch * heads * seq_k))
    end = keys_end(seq_k, key_lengths)
    for start in range(0, seq_q, chunk):
        stop = min(seq_q, start + chunk)
        rows = stop - start
        width = seen_width(stop, seq_q, seq_k, causal=causal, window=window, end=end)
        narrowed |= width < seq_k
        # The query heads of a KV head as rows (g, i) of one matrix: a plain batched matmul.
        q_rows = qg[:, :, :, start:stop].reshape(batch, kv_heads, group * rows, dim)
        scores = logits(q_rows, kf[:, :, :width], scale, softcap)  # B, H_kv, G * rows, width
        chunk_valid = None if query_valid is None else query_valid[:, start:stop]
        if fused is not None:  # masking, softmax, lse, mass and peak: one native pass per row
            lo, hi = visible_range(slice(start, stop), seq_q, seq_k, causal=causal, window=window,
                                   key_lengths=key_lengths, device=device)
            hi = hi.to(torch.int32)  # the loop clamps both to the row
            row_lse, part_mass, part_peak = fused(
                scores, torch.zeros_like(hi) if lo is None else lo.to(torch.int32), hi, groups=group,
                # masks of one row broadcast over the batch, as the torch ops take them
                key_valid=None if key_valid is None else key_valid[:, :width].expand(batch, -1).contiguous(),
                query_valid=None if chunk_valid is None else chunk_valid.expand(batch, -1).contiguous(),
                write=need_out or need_probs, need_lse=need_lse, need_mass=need_mass, need_peak=need_peak)
            probs = scores
            if need_mass:
                mass = _add_keys(mass, part_mass.sum(dim=2), seq_k)
            if need_peak:
                peak = _add_keys(peak, part_peak.amax(dim=2), seq_k, peak=True)
        else:
            keep = visible_keys(slice(start, stop), seq_q, seq_k, causal=causal, window=window,
                                key_lengths=key_lengths, key_valid=key_valid, device=device)
            if keep is not None:  # in place is autograd-safe: no op before it saved its output
                scores.view(batch, kv_heads, group, rows, width).masked_fill_(~keep[:, None, None, :, :width],
                                                                            float("-inf"))
            probs, row_lse = softmax(scores, need_lse=need_lse, may_be_empty=may_be_empty)
            if need_mass or need_peak:
                counted = probs
                if chunk_valid is not None:  # rows are ordered (g, i); the others add nothing, not even NaN
                    counted = probs.masked_fill(~chunk_valid[:, None, :].repeat(1, 1, group)[..., None], 0.0)
                if need_mass:
                    mass = _add_keys(mass, counted.sum(dim=2), seq_k)
                if need_peak:
                    peak = _add_keys(peak, counted.amax(dim=2), seq_k, peak=True)
        if need_out:
            out_g[:, :, :, start:stop] = matmul(probs, vf[:, :, :width]).view(batch, kv_heads, group, rows, -1)
        if need_lse:
            lse[:, :, :, start:stop] = row_lse.view(batch, kv_heads, group, rows)
        if need_probs:
            probs_all[:, :, :, start:stop, :width] = probs.view(batch, kv_heads, group, rows, width)
    if seq_q == 0:  # no chunk ran: nothing was seen
        mass = torch.zeros(batch, kv_heads, seq_k, **f32) if need_mass else None
        peak = torch.zeros(batch, kv_heads, seq_k, **f32) if need_peak else None
    if narrowed:  # a NaN row taints every key (probs: of its row; mass, peak: of its KV head), those
        # past its chunk's width too, as a softmax over the whole row does
        for stat in (mass, peak, probs_all):
            if stat is not None:
                stat.masked_fill_(stat.isnan().any(dim=-1, keepdim=True), float("nan"))
    return SoftmaxAttention(
        out=out if need_out else None,
        lse=lse.view(batch, heads, seq_q) if need_lse else None,
        mass=mass,
        peak=peak,
        probs=probs_all.view(batch, heads, seq_q, seq_k) if need_probs else None,
    )
