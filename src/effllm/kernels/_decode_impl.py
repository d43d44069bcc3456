"""The one implementation of ``decode_attention``: a plan per decode step, a run per layer.

``make_plan`` reads the host-side metadata of a step once (the lengths, and on a paged cache
which rows' pages lie consecutively in the pool) and decides how the torch path attends; ``run``
attends one layer with that plan. Every layer of a step shares the plan, so the device reads
(``.tolist()``) and the decision happen once per step, not once per layer. The public function
(``decode.py``) and the ``torch.library`` op body (``ops.py``) both plan and run here.

How the torch path attends (``DecodePlan.path``), decided in ``make_plan`` only:

- ``"padded"``: every row in one call, padded to the longest row (a paged cache's pages are
  gathered into a padded buffer first). Chosen when padding costs at most ``MAX_PADDING`` times
  the rows' own keys and no row is read in place.
- ``"per_row"``: one query per row, no window, rows of different lengths or a paged cache: each
  row attended alone over exactly its keys (a view of its slots or of its consecutive pages; a
  row on scattered pages is copied ``GATHER_CHUNK_BYTES`` at a time and the chunks merged by
  their log-sum-exp). No padding, no mask. CPU only, for up to ``PER_ROW_MAX_ROWS`` rows, or any
  number of paged rows with ``PER_ROW_MIN_MEAN_KEYS`` keys on average (a batched call would
  gather every page).
- ``"groups"``: rows attended in several calls: each row whose pages are consecutive (read in
  place, a view) alone, the others grouped by length (``length_groups``) so that each group's
  padding stays within ``MAX_PADDING``.
- ``"triton"``: the split-K kernel (``triton/decode.py``); it needs no host metadata.

Explicit float32 softmax (softcap, LSE, per-key stats) goes through ``scores.py``; otherwise
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._checks import nan_query_rows
from .scores import logits, softmax, softmax_attention, visible_keys

MAX_QUERIES = 16
# Padding every row to the longest is accepted up to this multiple of the rows' own keys; past
# it, rows of similar length are attended in separate calls.
MAX_PADDING = 1.25
# On CPU, up to this many rows may be attended one call per row ...
PER_ROW_MAX_ROWS = 16
# ... and any number of paged rows holding this many keys on average: past it, a call per row
# costs less than gathering every page into one padded buffer (docs/benchmarks.md).
PER_ROW_MIN_MEAN_KEYS = 512
# A row on scattered pages is copied this many bytes of keys (and values) at a time, attended
# while the copy is still in cache, and the chunks merged by their log-sum-exp: no buffer of
# the row's whole cache.
GATHER_CHUNK_BYTES = 2 << 20


@dataclass(eq=False, slots=True)
class DecodePlan:
    """How one decode step attends, shared by every layer of the step (``plan_decode``).

    ``cache_seqlens (B,)`` and ``block_table`` are the step's tensors; ``lengths`` their host
    copy (empty on Triton, which reads them on the device); ``page_starts`` maps each row read in
    place to its first page; ``groups`` lists the rows of each call of the ``"groups"`` path;
    ``source`` is the ``cache_seqlens`` argument ``plan_decode`` was given (a tensor or an int).
    Treat it as read-only.
    """

    cache_seqlens: torch.Tensor
    block_table: torch.Tensor | None
    num_queries: int
    window: tuple[int, int] | None
    slots: int  # k_cache.shape[1]: tokens per page, or per contiguous row
    backend: str
    path: str
    lengths: tuple[int, ...] = ()
    page_starts: dict[int, int] = field(default_factory=dict)
    groups: tuple[tuple[int, ...], ...] = ()
    source: object = None

    @property
    def batch(self) -> int:
        return self.cache_seqlens.shape[0]

    @property
    def capacity(self) -> int:
        """Tokens a row can hold: ``S_cap`` (contiguous) or ``max_pages * page_size`` (paged)."""
        return self.slots * self.block_table.shape[1] if self.block_table is not None else self.slots


def make_plan(cache_seqlens: torch.Tensor, block_table: torch.Tensor | None, *, num_queries: int,
              window: tuple[int, int] | None, slots: int, backend: str,
              lengths: list[int] | None = None) -> DecodePlan:
    """Plan a step from validated metadata. ``lengths``: ``cache_seqlens`` on the host when the
    caller has them (else read here, on the torch path only); ``backend`` is resolved."""
    if backend == "triton":
        return DecodePlan(cache_seqlens, block_table, num_queries, window, slots, backend, "triton")
    lengths = tuple(cache_seqlens.tolist() if lengths is None else lengths)
    rows, paged = len(lengths), block_table is not None
    per_row_ok = cache_seqlens.device.type == "cpu" and (
        rows <= PER_ROW_MAX_ROWS or (paged and sum(lengths) >= PER_ROW_MIN_MEAN_KEYS * rows))
    starts = consecutive_pages(block_table, lengths, slots) if paged and per_row_ok else {}
    ragged = rows > 0 and min(lengths) < max(lengths)
    if num_queries == 1 and window is None and per_row_ok and (ragged or paged):
        return DecodePlan(cache_seqlens, block_table, num_queries, window, slots, backend, "per_row", lengths, starts)
    rest = [r for r in range(rows) if r not in starts]
    groups = [(r,) for r in starts]
    if rest:
        groups += [tuple(rest[i] for i in group) for group in length_groups([lengths[r] for r in rest])]
    path = "padded" if not starts and len(groups) <= 1 else "groups"
    return DecodePlan(cache_seqlens, block_table, num_queries, window, slots, backend, path, lengths, starts,
                      tuple(groups))


def consecutive_pages(block_table: torch.Tensor, lengths: list[int], page_size: int) -> dict[int, int]:
    """``{row: first page}`` for the rows whose pages in use are consecutive page ids."""
    starts = {}
    for r, (row, length) in enumerate(zip(block_table.tolist(), lengths)):
        pages = row[: -(-length // page_size)]
        if pages == list(range(pages[0], pages[0] + len(pages))):
            starts[r] = pages[0]
    return starts


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped so that padding each group to its longest row costs at most
    ``MAX_PADDING`` times the group's own keys; one group (all rows, in order) when padding
    everything to the longest already does."""
    if len(lengths) < 2 or max(lengths) * len(lengths) <= MAX_PADDING * max(1, sum(lengths)):
        return [list(range(len(lengths)))]
    groups, current, real = [], [], 0
    for r in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if current and lengths[current[0]] * (len(current) + 1) > MAX_PADDING * (real + lengths[r]):
            groups.append(current)
            current, real = [], 0
        current.append(r)
        real += lengths[r]
    return groups + [current]


def run(q, k_cache, v_cache, plan: DecodePlan, *, scale, softcap, num_splits, need_lse, need_stats):
    """One layer of a planned step: ``(out, lse or None, stats or None)``."""
    if plan.path == "triton":
        from .triton.decode import decode_fwd

        return decode_fwd(q, k_cache, v_cache, plan.cache_seqlens, plan.block_table, scale=scale, window=plan.window,
                          softcap=softcap, num_splits=num_splits, return_stats=need_stats)
    kw = {"scale": scale, "softcap": softcap, "need_lse": need_lse, "need_stats": need_stats}
    if plan.path == "per_row":
        out, lse, stats = _per_row(q, k_cache, v_cache, plan, **kw)
    elif plan.path == "padded":
        out, lse, stats = _padded(q, k_cache, v_cache, plan.cache_seqlens, plan.lengths, plan.block_table,
                                  window=plan.window, **kw)
    else:
        out, lse, stats = _groups(q, k_cache, v_cache, plan, **kw)
    return nan_query_rows(q, out), lse, stats


def _groups(q, k_cache, v_cache, plan, *, scale, softcap, need_lse, need_stats):
    """Each group of ``plan.groups`` in a padded call of its own; rows read in place are views."""
    batch, seq_q, heads, _ = q.shape
    lengths, starts, seqlens, block_table = plan.lengths, plan.page_starts, plan.cache_seqlens, plan.block_table
    kw = {"scale": scale, "window": plan.window, "softcap": softcap, "need_lse": need_lse, "need_stats": need_stats}
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device) if need_lse else None
    stats = torch.zeros(batch, k_cache.shape[2], plan.capacity, dtype=torch.float32, device=q.device) \
        if need_stats else None
    for rows in plan.groups:
        span = lengths[rows[0]]  # the group's longest
        if len(rows) == 1:  # views, no copy
            r = rows[0]
            sub = (q[r:r + 1], seqlens[r:r + 1])
            table = None
            if r in starts:  # the row's pages, one after another: a contiguous (1, span) view
                pages = slice(starts[r], starts[r] + -(-span // k_cache.shape[1]))
                kv = tuple(c[pages].view(1, -1, *c.shape[2:])[:, :span] for c in (k_cache, v_cache))
            elif block_table is None:
                kv = (k_cache[r:r + 1, :span], v_cache[r:r + 1, :span])
            else:
                kv, table = (k_cache, v_cache), block_table[r:r + 1]
        else:
            idx = torch.tensor(rows, device=q.device)
            sub = (q.index_select(0, idx), seqlens.index_select(0, idx))
            kv = ((k_cache[:, :span].index_select(0, idx), v_cache[:, :span].index_select(0, idx))
                  if block_table is None else (k_cache, v_cache))
            table = None if block_table is None else block_table.index_select(0, idx)
        o, l, st = _padded(sub[0], *kv, sub[1], [lengths[r] for r in rows], table, **kw)
        for i, r in enumerate(rows):
            out[r] = o[i]
            if lse is not None:
                lse[r] = l[i]
            if stats is not None:
                stats[r, :, :st.shape[-1]] = st[i]
    return out, lse, stats


def _per_row(q, k_cache, v_cache, plan, *, scale, softcap, need_lse, need_stats):
    """One query per row, each row attended alone over exactly its keys: a view of its slots or
    of its consecutive pages, else a copy of its own pages (a chunk at a time where no stats are
    asked for). No padding and no mask, which on CPU cost more than the attention of a few
    short rows."""
    rows, _, heads, dim = q.shape
    kv_heads, slots = k_cache.shape[2], k_cache.shape[1]  # slots: a page, or a contiguous row
    group = heads // kv_heads
    block_table, starts = plan.block_table, plan.page_starts
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    explicit = softcap is not None or need_lse or need_stats
    stats = torch.zeros(rows, kv_heads, plan.capacity, dtype=torch.float32, device=q.device) if need_stats else None
    qg = q.view(rows, kv_heads, group, dim)  # one query: (R, H_kv, G, D)
    if explicit:  # few ops per row: at these sizes each op's dispatch costs as much as its work
        qs = qg.float() * scale
        out = torch.empty(rows, kv_heads, group, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(rows, kv_heads, group, 1, dtype=torch.float32, device=q.device) if need_lse else None
    else:
        outs = []
    for r, length in enumerate(plan.lengths):
        if block_table is None:
            k, v = k_cache[r, :length], v_cache[r, :length]
        else:
            used = -(-length // slots)
            if r in starts:
                k, v = (c[starts[r]:starts[r] + used] for c in (k_cache, v_cache))
            elif not explicit:
                outs.append(_attend_scattered_pages(qg[r:r + 1], k_cache, v_cache, block_table[r, :used], length,
                                                    scale))
                continue
            else:  # a row whose pages are not one run in the pool
                k, v = (c.index_select(0, block_table[r, :used]) for c in (k_cache, v_cache))
            k, v = (c.flatten(0, 1)[:length] for c in (k, v))
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # (H_kv, length, D)
        if not explicit:
            outs.append(F.scaled_dot_product_attention(qg[r:r + 1], kt[None], vt[None], scale=scale))
            continue
        scores = logits(qs[r], kt, None, softcap)  # (H_kv, G, length); the queries are scaled
        # Every row sees its own key; without lse, one softmax kernel (H2O's decode-time scores).
        probs, _ = softmax(scores, need_lse=need_lse, may_be_empty=False, lse_out=lse[r] if need_lse else None)
        torch.matmul(probs, vt.float(), out=out[r])
        if stats is not None:
            torch.sum(probs, dim=1, out=stats[r, :, :length])
    if not explicit:
        return torch.cat(outs).view(rows, 1, heads, dim), None, stats
    return out.to(q.dtype).view(rows, 1, heads, dim), (lse.view(rows, heads, 1) if need_lse else None), stats


def _attend_scattered_pages(q, k_cache, v_cache, pages, length: int, scale: float) -> torch.Tensor:
    """``(1, H_kv, G, D)`` attention of one query row over ``length`` keys on ``pages`` (not one
    run in the pool): ``GATHER_CHUNK_BYTES`` of pages copied at a time into one reused buffer,
    the chunks' results merged by their log-sum-exp."""
    slots, kv_heads, dim = k_cache.shape[1:]
    step = min(len(pages), max(1, GATHER_CHUNK_BYTES // (slots * kv_heads * dim * k_cache.element_size())))
    # One buffer per call, not one per chunk: fresh multi-MiB buffers per chunk cost page faults.
    buffers = [c.new_empty(step, *c.shape[1:]) for c in (k_cache, v_cache)]
    outs, lses = [], []
    for first in range(0, len(pages), step):
        chunk = pages[first:first + step]
        keys = min(length, (first + len(chunk)) * slots) - first * slots
        k, v = (torch.index_select(c, 0, chunk, out=buf[:len(chunk)]).view(1, -1, kv_heads, dim)[:, :keys]
                .transpose(1, 2) for c, buf in zip((k_cache, v_cache), buffers))
        if len(pages) <= step:  # one chunk: no log-sum-exp needed
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        out, lse = attention_with_lse(q, k, v, scale)
        outs.append(out)
        lses.append(lse)
    lse = torch.stack(lses)
    weights = torch.exp(lse - torch.logsumexp(lse, dim=0)).unsqueeze(-1)
    return (torch.stack(outs).float() * weights).sum(dim=0).to(q.dtype)


def attention_with_lse(q, k, v, scale: float, *, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's output and float32 log-sum-exp, ``(B, H, Sq, D)`` and ``(B, H, Sq)``, no mask: one
    fused CPU kernel where torch has it (and ``fused``), else the explicit float32 softmax."""
    fused = fused and getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused:
        return fused(q, k, v, scale=scale)
    result = softmax_attention(q, k, v, scale=scale, causal=False, need_lse=True)
    return result.out.to(q.dtype), result.lse


def _padded(q, k_cache, v_cache, seqlens, lengths, block_table, *, scale, window, softcap, need_lse, need_stats):
    """Rows padded to the longest of ``lengths`` (``seqlens`` on the host) in one call."""
    batch, seq_q, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    span = max(lengths)  # keys past the longest sequence are never read
    if block_table is None:
        capacity = k_cache.shape[1]
        k, v = k_cache[:, :span], v_cache[:, :span]
    else:
        capacity = block_table.shape[1] * k_cache.shape[1]
        k, v = _gather_pages(k_cache, block_table, span), _gather_pages(v_cache, block_table, span)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, S, D): contiguous for HF-layout caches
    # Rows shorter than the span hide the keys past their length; equal rows need no lengths.
    key_lengths = None if min(lengths) == span else seqlens

    if softcap is None and not need_lse and not need_stats:
        # Query heads of one KV head become rows (g, i) of one (G * Sq, D) block: K/V are never repeated.
        qg = q.view(batch, seq_q, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads,
                                                                                       group * seq_q, dim)
        keep = visible_keys(slice(0, seq_q), seq_q, span, causal=True, window=window, key_lengths=key_lengths,
                            device=q.device)
        keep = None if keep is None else keep.repeat(1, group, 1)[:, None]  # rows (g, i)
        out = F.scaled_dot_product_attention(qg, kt, vt, attn_mask=keep, scale=scale)
        out = out.view(batch, kv_heads, group, seq_q, dim).permute(0, 3, 1, 2, 4).reshape(batch, seq_q, heads, dim)
        return out, None, None
    out = torch.empty(batch, seq_q, heads, dim, dtype=torch.float32, device=q.device)
    result = softmax_attention(q.transpose(1, 2), kt, vt, scale=scale, softcap=softcap, causal=True, window=window,
                               key_lengths=key_lengths, need_lse=need_lse, need_mass=need_stats,
                               out=out.transpose(1, 2))
    stats = None
    if need_stats:
        stats = torch.zeros(batch, kv_heads, capacity, dtype=torch.float32, device=q.device)
        stats[:, :, :span] = result.mass
    return out.to(q.dtype), result.lse, stats


def _gather_pages(cache, block_table, span):
    """Logical ``(B, span, H_kv, D)`` view of a paged cache (a copy of the pages in use)."""
    page_size = cache.shape[1]
    pages = block_table[:, : (span + page_size - 1) // page_size]
    # index_select copies whole pages (faster than advanced indexing on CPU)
    gathered = cache.index_select(0, pages.flatten()).view(pages.shape[0], -1, *cache.shape[2:])
    return gathered[:, :span]
