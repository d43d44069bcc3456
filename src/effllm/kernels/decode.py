"""``effllm.kernels.decode_attention``: a few new queries against a long KV cache.

The cache is either contiguous, ``k_cache (B, S_cap, H_kv, D)``, or paged,
``k_cache (num_pages, page_size, H_kv, D)`` with ``block_table (B, max_pages)`` mapping each
sequence's logical page to a physical page. ``cache_seqlens[b]`` tokens of sequence b are valid
and already include the new queries' own keys: the ``Sq`` queries sit at the last ``Sq``
positions (bottom-right causal), as in a decode step after the cache update.

Plan and run (as in FlashInfer): ``plan_decode`` checks a step's lengths and block table once
(a device read) and decides how the step is attended (``DecodePlan``); every layer of the step
then calls ``decode_attention(..., plan=plan)``, which checks only the layer's tensors.
Without a plan, ``decode_attention`` plans the call itself. The paths (Triton split-K kernel,
the torch path's sub-paths and their thresholds) are described in ``_decode_impl``; under
``torch.compile`` calls go through the ``effllm::decode_attention`` custom op (``ops.py``), whose
body plans and runs the same implementation.
"""

from __future__ import annotations

import numbers

import torch

from .._backend import resolve_backend
from . import ops
from ._checks import (
    INDEX_DTYPES,
    can_sync,
    check_float_tensors,
    check_positive_scalar,
    describe,
)
from ._decode_impl import MAX_QUERIES, DecodePlan, make_plan, run
from ._masks import normalize_window

__all__ = ["MAX_QUERIES", "DecodePlan", "decode_attention", "decode_attention_unchecked", "plan_decode"]


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
    plan: DecodePlan | None = None,
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
    - ``plan``: a ``DecodePlan`` from ``plan_decode`` for these ``cache_seqlens`` and
      ``block_table`` (the same objects): the step's lengths are then neither checked nor read
      again, which is what a model's layers after the first want.

    Returns ``out (B, Sq, H, D)`` in q's dtype, then ``lse`` and ``stats`` when asked.
    Inference only: no autograd. Without a plan, a tensor ``cache_seqlens`` (and a
    ``block_table``) is range-checked by reading it back: on a GPU that is a device sync per call
    (skipped under torch.compile and CUDA-graph capture). An int length over a contiguous cache
    needs no read; ``decode_attention_unchecked`` skips the checks for callers that build the
    layout themselves.
    """
    capacity = _check_layer(q, k_cache, v_cache, block_table)
    window = normalize_window(window, causal=True)
    check_positive_scalar("decode_attention", "softcap", softcap)
    check_positive_scalar("decode_attention", "scale", scale)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"decode_attention: num_splits must be a positive int or None, got {num_splits!r}")
    if plan is None:
        seqlens, lengths = _check_lengths(cache_seqlens, block_table, batch=q.shape[0], seq_q=q.shape[1],
                                          capacity=capacity, k_cache=k_cache)
    else:
        _check_plan(plan, q, k_cache, cache_seqlens, block_table, window)
        seqlens, lengths = plan.cache_seqlens, None
    chosen = resolve_backend(backend, q, k_cache, v_cache, seqlens, block_table, op="decode_attention")
    if plan is not None and plan.backend != chosen:
        raise ValueError(f"decode_attention: plan was made for backend {plan.backend!r}, this call resolves "
                         f"backend={backend!r} to {chosen!r}")
    if torch.compiler.is_compiling():  # host values cannot be read while tracing: the op's body plans
        out, lse, stats = ops.decode_attention_op(q, k_cache, v_cache, seqlens, block_table, scale,
                                                  window[0] if window is not None else -1, softcap, num_splits,
                                                  return_stats, chosen, return_lse)
    else:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
            raise RuntimeError("decode_attention is inference-only: run it under torch.no_grad() or use attention()")
        if plan is None:
            plan = make_plan(seqlens, block_table, num_queries=q.shape[1], window=window, slots=k_cache.shape[1],
                             backend=chosen, lengths=lengths)
        out, lse, stats = run(q, k_cache, v_cache, plan, scale=scale, softcap=softcap, num_splits=num_splits,
                              need_lse=return_lse, need_stats=return_stats)
    extra = ([lse] if return_lse else []) + ([stats] if return_stats else [])
    return (out, *extra) if extra else out


def plan_decode(
    cache_seqlens: torch.Tensor | int,
    k_cache: torch.Tensor,
    *,
    num_queries: int = 1,
    block_table: torch.Tensor | None = None,
    window: int | tuple[int, int] | None = None,
    backend: str = "auto",
) -> DecodePlan:
    """Plan one decode step for every layer that shares its ``cache_seqlens`` and ``block_table``.

    ``k_cache`` is any layer's key cache (its shape, dtype and device: every layer's must match);
    ``num_queries`` is ``Sq``; ``window`` and ``backend`` as in ``decode_attention``. The lengths
    and the used part of the block table are range-checked here, once, by reading them on the
    host (a device sync on a GPU), and the torch path's way of attending the step is decided
    from them. Pass the plan to ``decode_attention(..., plan=plan)`` (or
    ``decode_attention_unchecked``) for each layer of the step, with the same ``cache_seqlens``
    and ``block_table`` objects; make a new plan when they change (every step).
    """
    check_float_tensors("plan_decode", {"k_cache": k_cache}, ndim=4)
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or not 1 <= num_queries <= MAX_QUERIES:
        raise ValueError(f"plan_decode: num_queries must be an int in [1, {MAX_QUERIES}], got {num_queries!r}")
    if isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.dim() == 1:
        batch = cache_seqlens.shape[0]
    elif isinstance(block_table, torch.Tensor) and block_table.dim() == 2:
        batch = block_table.shape[0]
    else:
        batch = k_cache.shape[0]
    capacity = _check_block_table(block_table, batch, k_cache)
    window = normalize_window(window, causal=True)
    seqlens, lengths = _check_lengths(cache_seqlens, block_table, batch=batch, seq_q=num_queries, capacity=capacity,
                                      k_cache=k_cache)
    chosen = resolve_backend(backend, k_cache, seqlens, block_table, op="decode_attention")
    plan = make_plan(seqlens, block_table, num_queries=num_queries, window=window, slots=k_cache.shape[1],
                     backend=chosen, lengths=lengths)
    plan.source = cache_seqlens  # what decode_attention(..., plan=) must be given
    return plan


def decode_attention_unchecked(q, k_cache, v_cache, cache_seqlens: torch.Tensor, block_table=None, *, scale=None,
                               softcap=None, return_stats: bool = False, backend: str = "auto",
                               plan: DecodePlan | None = None):
    """``decode_attention`` without the input checks, for callers that build the cache layout
    themselves (``effllm.kv``'s ragged layers, every layer and decode step). The shape and
    index-range checks cost a dozen small ops and, on GPU, a device sync per call; here bad
    input is undefined behaviour. ``cache_seqlens`` must be a tensor; no window. ``plan``: a
    ``DecodePlan`` of these ``cache_seqlens`` and ``block_table`` (made by ``plan_decode``), else
    the call plans itself (reading the lengths on the host)."""
    if plan is None:
        chosen = resolve_backend(backend, q, k_cache, v_cache, cache_seqlens, block_table, op="decode_attention")
        plan = make_plan(cache_seqlens, block_table, num_queries=q.shape[1], window=None, slots=k_cache.shape[1],
                         backend=chosen)
    out, _, stats = run(q, k_cache, v_cache, plan, scale=scale, softcap=softcap, num_splits=None, need_lse=False,
                        need_stats=return_stats)
    return (out, stats) if return_stats else out


def _check_layer(q, k_cache, v_cache, block_table) -> int:
    """One layer's tensors (shapes, dtypes, devices; no device read); returns the capacity."""
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
    return _check_block_table(block_table, batch, k_cache, device=q.device)


def _check_block_table(block_table, batch, k_cache, device=None) -> int:
    """``block_table``'s type, shape and device (or a contiguous cache's batch); returns the capacity."""
    device = k_cache.device if device is None else device
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"decode_attention: k_cache must be (batch, S_cap, H_kv, D) with batch {batch}, got "
                             f"{tuple(k_cache.shape)}")
        return k_cache.shape[1]
    if not isinstance(block_table, torch.Tensor) or block_table.dtype not in INDEX_DTYPES \
            or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"decode_attention: block_table must be an int32/int64 tensor of shape ({batch}, "
                         f"max_pages), got {describe(block_table)}")
    if block_table.device != device:
        raise ValueError(f"decode_attention: block_table must be on {device}, got {block_table.device}")
    return block_table.shape[1] * k_cache.shape[1]


def _check_lengths(cache_seqlens, block_table, *, batch, seq_q, capacity, k_cache):
    """``(cache_seqlens as a (B,) tensor, host lengths or None)`` after the type and range checks
    (a device read unless one int length over a contiguous cache, or when tracing)."""
    device = k_cache.device
    checked_on_host, lengths = False, None
    if isinstance(cache_seqlens, bool):
        raise ValueError(f"decode_attention: cache_seqlens must be an int or an int32/int64 tensor, got "  # noqa: TRY004
                         f"{cache_seqlens!r}")
    if isinstance(cache_seqlens, numbers.Integral):
        cache_seqlens = int(cache_seqlens)  # numpy integers too
        # One length for all: checked here, so a contiguous cache needs no device read (the HF
        # decode hook passes an int: no sync per layer and step).
        if not seq_q <= cache_seqlens <= capacity:
            raise ValueError(f"decode_attention: cache_seqlens must lie in [Sq={seq_q}, {capacity}], got "
                             f"{cache_seqlens}")
        checked_on_host = block_table is None
        lengths = [cache_seqlens] * batch
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in INDEX_DTYPES \
            or tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"decode_attention: cache_seqlens must be an int or an int32/int64 tensor of shape "
                         f"({batch},), got {describe(cache_seqlens)}")
    if cache_seqlens.device != device:
        raise ValueError(f"decode_attention: cache_seqlens must be on {device}, got {cache_seqlens.device}")
    if not checked_on_host and can_sync(k_cache):
        _check_ranges(cache_seqlens, block_table, seq_q, capacity, k_cache.shape[0], k_cache.shape[1])
    return cache_seqlens, lengths


def _check_plan(plan, q, k_cache, cache_seqlens, block_table, window) -> None:
    """The plan belongs to this call: same step metadata and geometry (no device read)."""
    if not isinstance(plan, DecodePlan):
        raise TypeError(f"decode_attention: plan must be a DecodePlan from plan_decode, got {type(plan).__name__}")
    source = plan.cache_seqlens if plan.source is None else plan.source
    same_lengths = cache_seqlens is source or (isinstance(cache_seqlens, numbers.Integral)
                                               and not isinstance(source, torch.Tensor) and cache_seqlens == source)
    if not same_lengths or block_table is not plan.block_table:
        raise ValueError("decode_attention: plan was made for other cache_seqlens or block_table: pass the same "
                         "objects given to plan_decode, or make a new plan for this step")
    got = (q.shape[0], q.shape[1], k_cache.shape[1], window, q.device)
    want = (plan.batch, plan.num_queries, plan.slots, plan.window, plan.cache_seqlens.device)
    if got != want:
        raise ValueError(f"decode_attention: plan was made for (batch, Sq, k_cache.shape[1], window, device) = "
                         f"{want}, this call has {got}")


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
