"""``effllm.kernels.decode_attention``: a few new queries against a long KV cache.

The cache is either contiguous, ``k_cache (B, S_cap, H_kv, D)``, or paged,
``k_cache (num_pages, page_size, H_kv, D)`` with ``block_table (B, max_pages)`` mapping each
sequence's logical page to a physical page. ``cache_seqlens[b]`` tokens of sequence b are valid
and already include the new queries' own keys: the ``Sq`` queries sit at the last ``Sq``
positions (bottom-right causal), as in a decode step after the cache update.

Triton (``triton/decode.py``): split-K flash-decoding, the query heads of one KV head packed as
rows of one tile so each KV byte is read once per KV head, an LSE merge over the splits, and an
optional pass that returns the probability mass each key received (``return_stats``).
The torch path groups the query heads the same way and calls ``scaled_dot_product_attention``
when it can express the request, or a float32 explicit softmax when it cannot.
"""

from __future__ import annotations

import math

import numbers

import torch
import torch.nn.functional as F

from .._backend import resolve_backend
from ._checks import INDEX_DTYPES, can_sync, check_float_tensors, check_positive_scalar, describe, nan_query_rows
from ._masks import normalize_window

MAX_QUERIES = 16
# The torch path pads every row to the longest; when that is more than this multiple of the
# rows' own keys (ragged KV caches: one head keeps 980 tokens, another 12), rows of similar
# length are attended in separate calls instead.
BUCKET_WASTE = 1.25
# On CPU, for up to this many rows: with one query, rows of different lengths, or of a paged
# cache, are attended one by one, each over exactly its keys (``_decode_rows_one_by_one``);
# otherwise (more queries, a window) a row of a paged cache whose pages lie consecutively in the
# pool (effllm's compressed caches lay rows out that way) is read in place, a view instead of a
# gathered copy, in a call of its own.
IN_PLACE_MAX_ROWS = 16
# ... and for any number of rows of a paged cache whose rows hold this many keys on average: a
# batched call gathers every page into a padded buffer, which costs more than a call per row once
# rows are long (1 thread, benchmarks/decode_many_rows.py: rows of ~1000-2000 keys 1.5-2.1x
# faster one by one, ~500 1.0-1.3x, ~100-250 0.3-0.9x).
IN_PLACE_MIN_MEAN_KEYS = 512
# A row whose pages are scattered in the pool is copied this many bytes of keys (and values) at a
# time, attended while the copy is still in cache, and the chunks merged by their log-sum-exp:
# no per-call buffer of the row's whole cache.
GATHER_CHUNK_BYTES = 2 << 20


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | int,
    *,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | tuple[int, int] | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
):
    """Attention of ``q (B, Sq, H, D)``, ``1 <= Sq <= 16``, over a contiguous or paged KV cache.

    - ``cache_seqlens``: ``(B,)`` int32/int64 (or one int for all), valid tokens per sequence,
      counting the queries' own keys; query i of sequence b sits at ``cache_seqlens[b] - Sq + i``.
    - ``block_table``: ``(B, max_pages)`` int32/int64 page ids when the cache is paged.
    - ``window``: keys within ``left`` positions before the query (an int w means ``(w, 0)``).
    - ``num_splits``: KV splits per sequence for the Triton kernel (None: chosen from the work).
    - ``return_lse``: also return the natural-log LSE, float32 ``(B, H, Sq)``.
    - ``return_stats``: also return float32 ``(B, H_kv, S_cap)``: the attention probability each
      cached key received, summed over the ``Sq`` queries and the query heads sharing its KV
      head (0 past ``cache_seqlens``). ``S_cap`` is ``k_cache.shape[1]`` (contiguous) or
      ``max_pages * page_size`` (paged).

    Returns ``out (B, Sq, H, D)`` in q's dtype, then ``lse`` and ``stats`` when asked.
    Inference only: no autograd. A tensor ``cache_seqlens`` (and a ``block_table``) is range-checked
    by reading it back: on a GPU that is a device sync per call (skipped under torch.compile and
    CUDA-graph capture). An int length over a contiguous cache needs no read;
    ``decode_attention_unchecked`` skips the checks for callers that build the layout themselves.
    """
    seqlens = _validate(q, k_cache, v_cache, cache_seqlens, block_table)
    window = normalize_window(window, causal=True)
    check_positive_scalar("decode_attention", "softcap", softcap)
    check_positive_scalar("decode_attention", "scale", scale)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"decode_attention: num_splits must be a positive int or None, got {num_splits!r}")
    if torch.compiler.is_compiling():
        from .ops import decode_attention_op

        resolve_backend(backend, q, k_cache, v_cache, op="decode_attention")  # fail now, with the reason
        out, lse, stats = decode_attention_op(q, k_cache, v_cache, seqlens, block_table, scale,
                                              window[0] if window is not None else -1, softcap, num_splits,
                                              return_stats, backend)
    else:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
            raise RuntimeError("decode_attention is inference-only: run it under torch.no_grad() or use attention()")
        out, lse, stats = _dispatch(q, k_cache, v_cache, seqlens, block_table, scale=scale, window=window,
                                    softcap=softcap, num_splits=num_splits, need_lse=return_lse,
                                    need_stats=return_stats, backend=backend)
    extra = ([lse] if return_lse else []) + ([stats] if return_stats else [])
    return (out, *extra) if extra else out


def decode_attention_unchecked(q, k_cache, v_cache, cache_seqlens: torch.Tensor, block_table=None, *, scale=None,
                               softcap=None, return_stats: bool = False, backend: str = "auto"):
    """``decode_attention`` without the input checks, for callers that build the cache layout
    themselves (``effllm.kv``'s ragged layers, every layer and decode step). The shape and
    index-range checks cost a dozen small ops and, on GPU, a device sync per call; here bad
    input is undefined behaviour. ``cache_seqlens`` must be a tensor; no window."""
    out, _, stats = _dispatch(q, k_cache, v_cache, cache_seqlens, block_table, scale=scale, window=None,
                              softcap=softcap, num_splits=None, need_lse=False, need_stats=return_stats,
                              backend=backend)
    return (out, stats) if return_stats else out


def _dispatch(q, k_cache, v_cache, seqlens, block_table, *, scale, window, softcap, num_splits, need_lse,
              need_stats, backend):
    """Run validated inputs on the chosen backend: ``(out, lse or None, stats or None)``."""
    chosen = resolve_backend(backend, q, k_cache, v_cache, seqlens, block_table, op="decode_attention")
    if chosen == "triton":
        from .triton.decode import decode_fwd

        return decode_fwd(q, k_cache, v_cache, seqlens, block_table, scale=scale, window=window, softcap=softcap,
                          num_splits=num_splits, return_stats=need_stats)
    out, lse, stats = _decode_torch(q, k_cache, v_cache, seqlens, block_table, scale=scale, window=window,
                                    softcap=softcap, need_lse=need_lse, need_stats=need_stats)
    return nan_query_rows(q, out), lse, stats


def _validate(q, k_cache, v_cache, cache_seqlens, block_table) -> torch.Tensor:
    """Check shapes, dtypes and index ranges; return ``cache_seqlens`` as a ``(B,)`` tensor."""
    check_float_tensors("decode_attention", {"q": q, "k_cache": k_cache, "v_cache": v_cache}, ndim=4)
    batch, seq_q, heads, dim = q.shape
    if not 1 <= seq_q <= MAX_QUERIES:
        raise ValueError(f"decode_attention: q must be (batch, Sq, heads, head_dim) with 1 <= Sq <= {MAX_QUERIES}, "
                         f"got shape {tuple(q.shape)}; use attention() for prefill")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    kv_heads = k_cache.shape[2]
    layout = "(num_pages, page_size, H_kv, D)" if block_table is not None else "(batch, S_cap, H_kv, D)"
    if k_cache.shape[3] != dim or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"decode_attention: k_cache must be {layout} with D = {dim} and H_kv dividing {heads} "
                         f"query heads, got {tuple(k_cache.shape)}")

    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"decode_attention: k_cache must be {layout} with batch {batch}, got {tuple(k_cache.shape)}")
        capacity = k_cache.shape[1]
    else:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype not in INDEX_DTYPES \
                or block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"decode_attention: block_table must be an int32/int64 tensor of shape ({batch}, "
                             f"max_pages), got {describe(block_table)}")
        if block_table.device != q.device:
            raise ValueError(f"decode_attention: block_table must be on {q.device}, got {block_table.device}")
        capacity = block_table.shape[1] * k_cache.shape[1]

    checked_on_host = False
    if isinstance(cache_seqlens, bool):
        raise ValueError(f"decode_attention: cache_seqlens must be an int or an int32/int64 tensor, got {cache_seqlens!r}")
    if isinstance(cache_seqlens, numbers.Integral):
        cache_seqlens = int(cache_seqlens)  # numpy integers too
        # One length for all: checked here, so a contiguous cache needs no device read (the HF
        # decode hook passes an int: no sync per layer and step).
        if not seq_q <= cache_seqlens <= capacity:
            raise ValueError(f"decode_attention: cache_seqlens must lie in [Sq={seq_q}, {capacity}], got "
                             f"{cache_seqlens}")
        checked_on_host = block_table is None
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in INDEX_DTYPES \
            or tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"decode_attention: cache_seqlens must be an int or an int32/int64 tensor of shape "
                         f"({batch},), got {describe(cache_seqlens)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"decode_attention: cache_seqlens must be on {q.device}, got {cache_seqlens.device}")
    if not checked_on_host and can_sync(q):
        _check_ranges(cache_seqlens, block_table, seq_q, capacity, k_cache.shape[0], k_cache.shape[1])
    return cache_seqlens


def _check_ranges(seqlens, block_table, seq_q, capacity, num_pages, page_size) -> None:
    lo, hi = int(seqlens.min()), int(seqlens.max())
    if lo < seq_q or hi > capacity:
        raise ValueError(f"decode_attention: cache_seqlens must lie in [Sq={seq_q}, {capacity}] (the queries' keys "
                         f"are in the cache; the cache holds {capacity} tokens per sequence), got min {lo}, max {hi}")
    if block_table is not None:
        pages_used = (seqlens.to(torch.int64) + page_size - 1) // page_size
        used = torch.arange(block_table.shape[1], device=block_table.device) < pages_used[:, None]
        bad = used & ((block_table < 0) | (block_table >= num_pages))
        if bool(bad.any()):
            b, j = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"decode_attention: block_table[{b}, {j}] = {int(block_table[b, j])} is out of range: "
                             f"page ids must lie in [0, {num_pages}) for every page that cache_seqlens covers")


def _decode_torch(q, k_cache, v_cache, seqlens, block_table, *, scale, window, softcap, need_lse, need_stats):
    lengths = seqlens.tolist()
    kw = dict(scale=scale, window=window, softcap=softcap, need_lse=need_lse, need_stats=need_stats)
    starts = {}  # row -> its first page, for rows read in place
    in_place = k_cache.device.type == "cpu" and (
        len(lengths) <= IN_PLACE_MAX_ROWS
        or (block_table is not None and sum(lengths) >= IN_PLACE_MIN_MEAN_KEYS * len(lengths)))
    if block_table is not None and in_place:
        starts = _consecutive_pages(block_table, lengths, k_cache.shape[1])
    # One query: rows attended one by one when they differ in length or are paged (a view of
    # consecutive pages, else their pages copied a chunk at a time): no padding, mask or gather of
    # the whole cache. Equal contiguous rows stay one batched call.
    ragged = min(lengths) < max(lengths)
    if q.shape[1] == 1 and window is None and in_place and (ragged or block_table is not None):
        return _decode_rows_one_by_one(q, k_cache, v_cache, lengths, block_table, starts, scale=scale,
                                       softcap=softcap, need_lse=need_lse, need_stats=need_stats)
    rest = [r for r in range(len(lengths)) if r not in starts]
    buckets = [[r] for r in starts]
    if rest:
        buckets += [[rest[i] for i in bucket] for bucket in length_buckets([lengths[r] for r in rest])]
    if not starts and len(buckets) == 1:
        return _decode_rows(q, k_cache, v_cache, seqlens, lengths, block_table, **kw)
    batch, seq_q, heads, _ = q.shape
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device) if need_lse else None
    stats = torch.zeros(batch, k_cache.shape[2], capacity, dtype=torch.float32, device=q.device) if need_stats else None
    for rows in buckets:
        span = lengths[rows[0]]  # the bucket's longest
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
        o, l, st = _decode_rows(sub[0], *kv, sub[1], [lengths[r] for r in rows], table, **kw)
        for i, r in enumerate(rows):
            out[r] = o[i]
            if lse is not None:
                lse[r] = l[i]
            if stats is not None:
                stats[r, :, :st.shape[-1]] = st[i]
    return out, lse, stats


def _decode_rows_one_by_one(q, k_cache, v_cache, lengths, block_table, starts, *, scale, softcap, need_lse,
                            need_stats):
    """One query per row, each row attended alone over exactly its keys: a view of its slots or
    of its consecutive pages (``starts``), else a copy of its own pages (a chunk at a time where
    no stats are asked for). No padding and no mask, which on CPU cost more than the attention
    of a few short rows."""
    rows, _, heads, dim = q.shape
    kv_heads, slots = k_cache.shape[2], k_cache.shape[1]  # slots: a page, or a contiguous row
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    explicit = softcap is not None or need_lse or need_stats
    capacity = slots * block_table.shape[1] if block_table is not None else slots
    stats = torch.zeros(rows, kv_heads, capacity, dtype=torch.float32, device=q.device) if need_stats else None
    qg = q.view(rows, kv_heads, group, dim)  # one query: (R, H_kv, G, D)
    if explicit:  # few ops per row: at these sizes each op's dispatch costs as much as its work
        qs = qg.float() * scale
        out = torch.empty(rows, kv_heads, group, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(rows, kv_heads, group, 1, dtype=torch.float32, device=q.device) if need_lse else None
    else:
        outs = []
    for r, length in enumerate(lengths):
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
        scores = torch.matmul(qs[r], kt.float().transpose(-1, -2))  # (H_kv, G, length)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if need_lse:
            torch.logsumexp(scores, dim=-1, keepdim=True, out=lse[r])
            probs = torch.exp(scores - lse[r])
        else:  # one kernel where no lse is asked for (H2O's decode-time scores)
            probs = torch.softmax(scores, dim=-1)
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
    # One buffer per call, not one per chunk: fresh multi-MiB buffers per chunk made the paged
    # bench 2.7x slower (30.6 vs 11.3 ms, fp32 B=1 L=4096 D=128; page faults, most likely).
    buffers = [c.new_empty(step, *c.shape[1:]) for c in (k_cache, v_cache)]
    outs, lses = [], []
    for first in range(0, len(pages), step):
        chunk = pages[first:first + step]
        keys = min(length, (first + len(chunk)) * slots) - first * slots
        k, v = (torch.index_select(c, 0, chunk, out=buf[:len(chunk)]).view(1, -1, kv_heads, dim)[:, :keys]
                .transpose(1, 2) for c, buf in zip((k_cache, v_cache), buffers))
        if len(pages) <= step:  # one chunk: no log-sum-exp needed
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        out, lse = _attention_with_lse(q, k, v, scale)
        outs.append(out)
        lses.append(lse)
    lse = torch.stack(lses)
    weights = torch.exp(lse - torch.logsumexp(lse, dim=0)).unsqueeze(-1)
    return (torch.stack(outs).float() * weights).sum(dim=0).to(q.dtype)


def _attention_with_lse(q, k, v, scale: float, *, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's output and float32 log-sum-exp, ``(B, H, Sq, D)`` and ``(B, H, Sq)``: one fused
    CPU kernel where torch has it (and ``fused``), else explicit float32."""
    fused = fused and getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused:
        return fused(q, k, v, scale=scale)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse.unsqueeze(-1)) @ v.float()).to(q.dtype), lse


def _consecutive_pages(block_table: torch.Tensor, lengths: list[int], page_size: int) -> dict[int, int]:
    """``{row: first page}`` for the rows whose pages in use are consecutive page ids."""
    starts = {}
    for r, (row, length) in enumerate(zip(block_table.tolist(), lengths)):
        pages = row[: -(-length // page_size)]
        if pages == list(range(pages[0], pages[0] + len(pages))):
            starts[r] = pages[0]
    return starts


def length_buckets(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped so that padding each group to its longest row costs at most
    ``BUCKET_WASTE`` times the group's own keys; one group (all rows, in order) when padding
    everything to the longest already does."""
    if len(lengths) < 2 or max(lengths) * len(lengths) <= BUCKET_WASTE * max(1, sum(lengths)):
        return [list(range(len(lengths)))]
    buckets, current, real = [], [], 0
    for r in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if current and lengths[current[0]] * (len(current) + 1) > BUCKET_WASTE * (real + lengths[r]):
            buckets.append(current)
            current, real = [], 0
        current.append(r)
        real += lengths[r]
    return buckets + [current]


def _decode_rows(q, k_cache, v_cache, seqlens, lengths, block_table, *, scale, window, softcap, need_lse,
                 need_stats):
    """The torch path over rows padded to the longest of ``lengths`` (``seqlens`` as a list)."""
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
    # Query heads of one KV head become rows of one (G * Sq, D) block: K/V are never repeated.
    qg = q.view(batch, seq_q, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, group * seq_q, dim)
    keep = _keep_mask(seqlens, seq_q, group, span, window, uniform=min(lengths) == span)

    if softcap is None and not need_lse and not need_stats:
        out = F.scaled_dot_product_attention(qg, kt, vt, attn_mask=keep, scale=scale)
        lse = stats = None
    else:
        scores = (qg.float() @ kt.float().transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - row_lse)  # every row sees its own key: lse is finite
        out = (probs @ vt.float()).to(q.dtype)
        lse = row_lse.view(batch, kv_heads, group, seq_q).reshape(batch, heads, seq_q)
        stats = None
        if need_stats:
            stats = torch.zeros(batch, kv_heads, capacity, dtype=torch.float32, device=q.device)
            stats[:, :, :span] = probs.sum(dim=2)
    out = out.view(batch, kv_heads, group, seq_q, dim).permute(0, 3, 1, 2, 4).reshape(batch, seq_q, heads, dim)
    return out, lse, stats


def _gather_pages(cache, block_table, span):
    """Logical ``(B, span, H_kv, D)`` view of a paged cache (a copy of the pages in use)."""
    page_size = cache.shape[1]
    pages = block_table[:, : (span + page_size - 1) // page_size]
    # index_select copies whole pages (1.8x faster than advanced indexing for 48 pages on CPU)
    gathered = cache.index_select(0, pages.flatten()).view(pages.shape[0], -1, *cache.shape[2:])
    return gathered[:, :span]


def _keep_mask(seqlens, seq_q, group, span, window, *, uniform):
    """Boolean mask broadcastable to ``(B, H_kv, G * Sq, span)``; None when every key is visible."""
    if uniform and seq_q == 1 and window is None:
        return None
    device = seqlens.device
    q_pos = seqlens.long()[:, None] - seq_q + torch.arange(seq_q, device=device)  # B, Sq
    q_pos = q_pos.repeat(1, group)[:, None, :, None]  # rows are ordered (g, i): B, 1, G*Sq, 1
    k_pos = torch.arange(span, device=device)
    keep = k_pos <= q_pos  # causal, which also hides keys past each sequence's length
    if window is not None and window[0] >= 0:
        keep = keep & (k_pos >= q_pos - window[0])
    return keep
