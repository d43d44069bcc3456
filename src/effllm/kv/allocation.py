"""Budget allocation, the framework's side of eviction: how many tokens each layer and head keeps,
given the rankings the policies' scorers produced.

Three scopes (a policy declares which): **per layer** (every KV head of a layer keeps the layer's
budget: ``CompressedLayer.evict``), **shared across a layer's heads** (Ada-KV:
``evict(..., share_heads=alpha)``), **across layers** in proportion to a per-layer weight, re-divided
after every layer of a prefill (CAKE's cascade: ``cascade``), and **global** over every layer and
head of a sequence (KVzip: ``evict_global``).
"""

from __future__ import annotations

import math

import torch

from .ranking import top_mask


def water_fill(total: int, weights: dict, caps: dict) -> dict:
    """``total`` tokens shared in proportion to ``weights``, none above its cap (an uncapped
    share at least 1): the shares that would pass their cap are held at it, and the rest is
    shared again among the others (so the shares add up to ``total``, less up to a token a share
    rounded down, unless every cap binds)."""
    shares, free, left = {}, dict(weights), total
    while free:
        weight = sum(free.values()) or 1.0
        capped = [idx for idx, w in free.items() if left * w / weight >= caps[idx]]
        if not capped:
            shares.update({idx: max(1, int(left * w / weight)) for idx, w in free.items()})
            break
        for idx in capped:
            shares[idx] = caps[idx]
            left -= caps[idx]
            del free[idx]
    return shares


def cascade(cache, layer_idx: int, weights: list[float], window: int) -> None:
    """Cross-layer budgets (CAKE), per batch row: the layers prefilled so far share ``(budget -
    window) * layers`` prefix tokens in proportion to their weights (``weights``: this layer's,
    one a row); re-divided after each layer, so earlier layers only shrink and peak memory stays
    near the total. Each layer's ranking is its ``scores`` (window ranked first); every layer
    keeps its ``window`` newest tokens on top."""
    prefs = cache.policy_state.setdefault("preferences", {})
    prefs[layer_idx] = weights
    layer = cache.layers[layer_idx]
    held = {idx: cache.layers[idx].real_tokens() for idx in prefs}
    budgets = {idx: [] for idx in prefs}
    for row, keep in enumerate(layer.row_keeps()):  # this layer's budget: the average per-layer size
        # a layer holds at most what it has (budgets only shrink): what it cannot take goes to the others
        shares = water_fill((keep - window) * cache.num_layers, {idx: w[row] for idx, w in prefs.items()},
                            {idx: held[idx][row] - window for idx in prefs})
        for idx in prefs:
            budgets[idx].append(shares[idx] + window)
    for idx, rows in budgets.items():
        target = cache.layers[idx]
        target.budget, target.row_budget = max(rows), (rows if len(set(rows)) > 1 else None)
        if target.stored() > target.budget or target.row_budget is not None:
            target.evict(target.scores, target.keeps())
        else:
            target.rank_staged(target.scores)


def evict_global(cache, rankings: list[torch.Tensor], floor: float = 0.0) -> None:
    """Per batch row, keep the best ``budget * H_kv`` tokens of every layer together (``rankings``:
    one ``(B, H_kv, width)`` per layer, the layers' budgets already fixed), after each head of
    each layer first keeps its best ``ceil(floor * budget)`` (Ada-KV's safeguard). Layers and
    heads end with different lengths (ragged); padding ranks last and goes."""
    valid = cache.layers[0].valid_mask()  # None, or (B, H_kv, width): the same in every layer
    if valid is not None:
        rankings = [ranking.masked_fill(~valid, float("-inf")) for ranking in rankings]
    scored = rankings  # what quantizers that protect the best-ranked tokens see (the floor is forced)
    batch, kv_heads = cache.layers[0].batch_heads()
    keeps = [layer.row_keeps() for layer in cache.layers]  # per layer, each batch row's budget
    if floor:
        rankings = [_floor_first(ranking, [min(math.ceil(floor * keep), ranking.shape[-1]) for keep in row_keeps])
                    for row_keeps, ranking in zip(keeps, rankings)]
    totals = [sum(min(row_keeps[row], layer.stored()) for layer, row_keeps in zip(cache.layers, keeps)) * kv_heads
              for row in range(batch)]
    flat = torch.cat([ranking.reshape(batch, -1) for ranking in rankings], dim=1)
    # A row with fewer real tokens than that keeps them all (padding ranks last, then goes).
    chosen = top_mask(flat, totals)
    offset = 0
    for layer, ranking in zip(cache.layers, scored):
        size = ranking[0].numel()
        mask = chosen[:, offset:offset + size].view_as(ranking)
        offset += size
        if valid is not None:
            layer.keep_mask(mask & valid, priority=ranking)  # drops the padding
        elif not bool(mask.all()):
            layer.keep_mask(mask, priority=ranking)
        else:
            layer.rank_staged(ranking)


def _floor_first(ranking: torch.Tensor, floors: list[int]) -> torch.Tensor:
    """``ranking`` with each row's best ``floors[b]`` tokens (per batch row b) ranked first."""
    return ranking.masked_fill(top_mask(ranking, floors), float("inf"))
