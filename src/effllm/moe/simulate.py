"""Replay a routing trace through an expert cache: hit rates, prefetch accuracy and stall time.

Conventions (what one number means):
- Tokens are replayed one at a time, layer by layer, in trace order. At each (token, layer) the
  token's top-k experts are accessed: each distinct expert is one access. A resident expert is a
  hit; a missing one is a miss, is loaded, and stays resident (the cache is filled on every miss).
  Cold misses count. The experts of the current (token, layer) are never evicted to make room for
  each other, so a cache must hold at least one token's top-k.
- ``scope="per_layer"``: every layer has its own cache of ``capacity`` experts (mixtral-offloading's
  layout). ``scope="global"``: one cache of ``capacity`` experts shared by all layers.
- ``hit_rate`` = (hits + prefetch hits) / accesses, i.e. the share of accesses that did not load on
  demand; ``prefetch_hits`` are first uses of an expert that a prefetch brought in.
- Prefetch: after a layer's routes are known, the predictor names ``prefetch_k`` experts (default
  top-k) for each of the next ``lookahead`` layers (the last layer predicts the next token's first
  layers); the missing ones are loaded and inserted, evicting by the policy, never an expert of the
  current layer. A prefetched expert evicted (or left at the end) before any use is wasted.

Cost model (``CostModel``): one link moves experts from the slow tier at ``bandwidth`` bytes/s,
one transfer at a time; each layer computes for ``compute_s`` seconds once its experts are
resident. When a layer starts, a transfer in progress finishes first; then the layer's on-demand
loads go ahead of the queued prefetches (which follow in order). A queued prefetch for the layer
that has not started by then is dropped (``cancelled_prefetches``); if the layer needs that expert
it is loaded on demand instead. A layer waits for its loads and for any prefetch of its experts
still in flight: that wait is the stall. Prefetches are issued when a layer's routes are known
and overlap its compute. ``predictor_s`` is added per prediction made. Without a cost model
transfers take no time, so nothing is cancelled.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field

from .policies import make_policy
from .predictors import make_predictor
from .traces import RoutingTrace


@dataclass
class CostModel:
    """``expert_bytes``: bytes of one expert; ``bandwidth``: bytes/s of the slow-to-fast link;
    ``compute_s``: seconds one MoE layer computes for one token; ``predictor_s``: seconds per prediction."""

    expert_bytes: float
    bandwidth: float
    compute_s: float
    predictor_s: float = 0.0

    def __post_init__(self):
        for name in ("expert_bytes", "bandwidth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostModel: {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("compute_s", "predictor_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"CostModel: {name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def load_s(self) -> float:
        return self.expert_bytes / self.bandwidth


@dataclass
class SimResult:
    policy: str
    capacity: int
    scope: str
    predictor: str | None
    lookahead: int
    accesses: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    prefetches: int = 0
    wasted_prefetches: int = 0
    cancelled_prefetches: int = 0
    loads: int = 0
    peak_resident: int = 0
    bytes_moved: float | None = None
    stall_s: float | None = None
    compute_s: float | None = None
    per_layer_hit_rate: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return (self.hits + self.prefetch_hits) / self.accesses if self.accesses else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Share of prefetched experts used before eviction."""
        return self.prefetch_hits / self.prefetches if self.prefetches else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(hit_rate=self.hit_rate, prefetch_precision=self.prefetch_precision)
        return out


class _Entry:
    __slots__ = ("prefetched", "start", "ready_at")

    def __init__(self, prefetched: bool, start: float, ready_at: float):
        self.prefetched = prefetched  # brought by a prefetch and not used yet
        self.start = start  # when its transfer starts on the link
        self.ready_at = ready_at


def simulate(trace: RoutingTrace, capacity: int, policy: str = "lru", *, scope: str = "per_layer",
             predictor: str | None = None, lookahead: int = 1, prefetch_k: int | None = None,
             cost: CostModel | None = None, reset_per_request: bool = False) -> SimResult:
    """Replay ``trace`` through a cache of ``capacity`` experts (per layer or global) under ``policy``."""
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"simulate: trace must be a RoutingTrace (see effllm.moe.load_trace), got {type(trace).__name__}")
    if scope not in ("per_layer", "global"):
        raise ValueError(f"simulate: scope must be 'per_layer' or 'global', got {scope!r}")
    T, L, k = trace.experts.shape
    if not isinstance(capacity, int) or capacity < k:
        raise ValueError(f"simulate: capacity must be an int >= top_k={k} (one token's experts of a layer), "
                         f"got {capacity!r}")
    if lookahead < 1:
        raise ValueError(f"simulate: lookahead must be >= 1, got {lookahead}")
    prefetch_k = k if prefetch_k is None else prefetch_k
    routes = [[list(dict.fromkeys(trace.experts[t, c].tolist())) for c in range(L)] for t in range(T)]

    # Belady needs each key's future: the event indices (t * L + c) where it is used, in order.
    future: dict[tuple[int, int], deque] = {}
    if policy == "belady":
        for t in range(T):
            for c in range(L):
                for e in routes[t][c]:
                    future.setdefault((c, e), deque()).append(t * L + c)

    def next_use(key):
        uses = future.get(key)
        return uses[0] if uses else math.inf

    n_caches = L if scope == "per_layer" else 1
    policies = [make_policy(policy, num_layers=L, next_use=next_use) for _ in range(n_caches)]
    caches: list[dict] = [{} for _ in range(n_caches)]
    pred = make_predictor(predictor, L, trace.num_experts) if predictor else None
    res = SimResult(policy, capacity, scope, predictor, lookahead)
    layer_acc = [0] * L
    layer_hit = [0] * L

    load_s = cost.load_s if cost else 0.0
    now = 0.0  # simulated clock (cost model)
    link_free = 0.0
    stall = 0.0
    queue: list[tuple[tuple[int, int], _Entry]] = []  # prefetches on the link, in transfer order

    def cache_of(column):
        i = column if scope == "per_layer" else 0
        return caches[i], policies[i]

    def make_room(cache, pol, protected):
        """Evict one key (not in ``protected``); False if nothing may go."""
        candidates = [key for key in cache if key not in protected]
        if not candidates:
            return False
        nonlocal link_free
        key = pol.victim(candidates)
        gone = cache.pop(key)
        if gone.prefetched and gone.start > now:  # still queued: it never goes on the link
            res.prefetches -= 1
            res.loads -= 1
            res.cancelled_prefetches += 1
            at = next(i for i, (_, entry) in enumerate(queue) if entry is gone)
            for _, later in queue[at + 1:]:  # the transfers queued behind it move up
                later.start -= load_s
                later.ready_at -= load_s
            del queue[at]
            link_free -= load_s
        elif gone.prefetched:
            res.wasted_prefetches += 1
        pol.evicted(key)
        return True

    previous_request = int(trace.request[0]) if T else 0
    for t in range(T):
        request = int(trace.request[t])
        if request != previous_request:
            previous_request = request
            for pol in policies:
                pol.new_request()
            if reset_per_request:
                for cache in caches:
                    res.wasted_prefetches += sum(entry.prefetched for entry in cache.values())
                    cache.clear()
        for c in range(L):
            cache, pol = cache_of(c)
            needed = routes[t][c]
            protected = {(c, e) for e in needed}
            # the link at this layer's start: finished transfers leave the queue; queued (not started)
            # prefetches for this layer are dropped, and the needed ones are loaded on demand instead
            queue = [(key, entry) for key, entry in queue if entry.ready_at > now]
            busy_until = now
            waiting = []
            for key, entry in queue:
                if entry.start <= now:
                    busy_until = entry.ready_at  # the transfer in progress finishes first
                elif key[0] == c and cache.get(key) is entry:
                    del cache[key]
                    pol.evicted(key)
                    res.prefetches -= 1
                    res.loads -= 1
                    res.cancelled_prefetches += 1
                else:
                    waiting.append((key, entry))
            demand = 0
            wait_until = now
            for e in needed:
                key = (c, e)
                res.accesses += 1
                layer_acc[c] += 1
                entry = cache.get(key)
                if entry is not None:
                    if entry.prefetched:
                        res.prefetch_hits += 1
                        entry.prefetched = False
                    else:
                        res.hits += 1
                    layer_hit[c] += 1
                    wait_until = max(wait_until, entry.ready_at)
                else:
                    res.misses += 1
                    if len(cache) >= capacity:
                        make_room(cache, pol, protected)
                    demand += 1
                    ready = busy_until + demand * load_s
                    cache[key] = _Entry(False, ready - load_s, ready)
                    wait_until = max(wait_until, ready)
                    pol.inserted(key, prefetched=False)
                pol.accessed(key, request)
            res.loads += demand
            # on-demand loads go ahead of the queued prefetches, which follow in order
            link_free = busy_until + demand * load_s
            queue = [(key, entry) for key, entry in queue if entry.start <= now]
            for key, entry in waiting:
                if cache_of(key[0])[0].get(key) is not entry:
                    continue  # evicted before its transfer started: it never goes on the link
                entry.start, entry.ready_at = link_free, link_free + load_s
                link_free = entry.ready_at
                queue.append((key, entry))
            if future:
                for e in needed:
                    future[(c, e)].popleft()

            if pred is not None:
                pred.observe(c, needed)
                for ahead in range(1, lookahead + 1):
                    target_t, target_c = divmod(t * L + c + ahead, L)
                    if target_t >= T:
                        break
                    now_pred = cost.predictor_s if cost else 0.0
                    wait_until += now_pred
                    tcache, tpol = cache_of(target_c)
                    shield = set(protected) if tcache is cache else set()
                    for e in pred.predict(target_c, prefetch_k, ahead):
                        key = (target_c, e)
                        shield.add(key)
                        if key in tcache:
                            continue
                        if len(tcache) >= capacity and not make_room(tcache, tpol, shield):
                            break
                        start = max(link_free, now)
                        link_free = start + load_s
                        entry = tcache[key] = _Entry(True, start, link_free)
                        queue.append((key, entry))
                        tpol.inserted(key, prefetched=True)
                        res.prefetches += 1
                        res.loads += 1

            res.peak_resident = max(res.peak_resident, sum(map(len, caches)))
            if cost is not None:
                stall += wait_until - now
                now = wait_until + cost.compute_s

    res.wasted_prefetches += sum(entry.prefetched for cache in caches for entry in cache.values())
    res.per_layer_hit_rate = [h / a if a else 0.0 for h, a in zip(layer_hit, layer_acc)]
    if cost is not None:
        res.bytes_moved = res.loads * cost.expert_bytes
        res.stall_s = stall
        res.compute_s = T * L * cost.compute_s
    return res
