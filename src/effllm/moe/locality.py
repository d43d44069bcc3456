"""Local routing consistency of a trace: SRP and SCH ("Not All Models Suit Expert Offloading").

Both work on the activation matrix of one layer (token t used expert e), window by window inside
each request (windows never cross a request boundary).

- ``srp(trace, m)``, Segment Routing best Performance: a router that predicts one fixed expert
  set per segment of m tokens, the experts used at least tau times in it; F1 of that prediction
  against the real routes, best over tau. Counts are summed over every sliding window (and over
  layers for the model-level value, which shares one tau).
- ``sch(trace, capacity, m)``, Segment Cache best Hit rate: an idealised cache that, before token
  t, holds the ``capacity`` experts with the most uses among tokens t..t+m-1 (ties by most recent
  earlier use, then lower id); the share of accesses it serves. ``pooled=True`` uses one cache
  over all layers (expert ids offset per layer), the paper's model level.
"""

from __future__ import annotations

import torch

from .traces import RoutingTrace


def _activations(trace: RoutingTrace) -> torch.Tensor:
    """Bool ``[T, L, E]``: token t used expert e at layer column l."""
    act = torch.zeros(trace.num_tokens, trace.num_layers, trace.num_experts, dtype=torch.bool)
    act.scatter_(2, trace.experts, True)
    return act


def _requests(trace: RoutingTrace) -> list[torch.Tensor]:
    """Token index ranges of each request, in order of first appearance (contiguous runs)."""
    req = trace.request
    change = torch.nonzero(req[1:] != req[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), len(req)]
    return [torch.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def srp(trace: RoutingTrace, m: int) -> dict:
    """``{"model": SRP, "per_layer": [SRP per layer column], "tau": best shared tau}``."""
    if m < 1:
        raise ValueError(f"srp: window m must be >= 1, got {m}")
    act = _activations(trace).long()
    taus = torch.arange(1, m + 1)
    matches = torch.zeros(trace.num_layers, m, dtype=torch.float64)
    preds = torch.zeros_like(matches)
    acts = torch.zeros(trace.num_layers, dtype=torch.float64)
    for idx in _requests(trace):
        a = act[idx]  # [t, L, E]
        if len(idx) < m:
            continue
        csum = torch.cat([torch.zeros_like(a[:1]), a.cumsum(0)])
        counts = (csum[m:] - csum[:-m]).double()  # [windows, L, E]
        chosen = counts[..., None] >= taus  # [windows, L, E, taus]
        matches += (counts[..., None] * chosen).sum((0, 2))
        preds += m * chosen.sum((0, 2))
        acts += counts.sum((0, 2))
    if not acts.sum():
        raise ValueError(f"srp: no request has {m} tokens")
    f1 = 2 * matches / (preds + acts[:, None])
    model_f1 = 2 * matches.sum(0) / (preds.sum(0) + acts.sum())
    best = int(torch.argmax(model_f1))
    return {"model": float(model_f1[best]), "per_layer": f1.max(1).values.tolist(), "tau": best + 1}


def sch(trace: RoutingTrace, capacity: int, m: int, *, pooled: bool = False) -> dict:
    """``{"model": SCH over all accesses, "per_layer": [SCH per layer column]}``."""
    if m < 1:
        raise ValueError(f"sch: window m must be >= 1, got {m}")
    act = _activations(trace)
    T, L, E = act.shape
    if pooled:
        act = act.reshape(T, 1, L * E)
    need = trace.top_k * (L if pooled else 1)
    if capacity < need:
        raise ValueError(f"sch: capacity must hold one token's experts ({need}), got {capacity}")
    hits = torch.zeros(act.shape[1], dtype=torch.float64)
    total = torch.zeros_like(hits)
    for idx in _requests(trace):
        a = act[idx]  # [t, C, X]
        n = len(idx)
        csum = torch.cat([torch.zeros_like(a[:1], dtype=torch.long), a.long().cumsum(0)])
        ends = torch.clamp(torch.arange(n) + m, max=n)
        uses = csum[ends] - csum[:n]  # uses in [t, t + m)
        pos = torch.arange(n).view(n, 1, 1).expand_as(a)
        last = torch.where(a, pos, torch.full_like(pos, -1)).cummax(0).values
        last_before = torch.cat([torch.full_like(last[:1], -1), last[:-1]])  # most recent use before t
        key = uses * (n + 2) + (last_before + 1)
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(key.shape[-1]).expand_as(order).contiguous())
        hits += ((rank < capacity) & a).sum((0, 2)).double()
        total += a.sum((0, 2)).double()
    return {"model": float(hits.sum() / total.sum()),
            "per_layer": [] if pooled else (hits / total).tolist()}
