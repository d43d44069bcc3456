"""Expert-cache eviction policies: which resident expert to drop when a new one must come in.

A policy sees keys (one per (layer, expert) the cache can hold) and the events of one cache:
``accessed`` (the model needed the expert), ``inserted`` (it became resident, by a miss or a
prefetch) and ``evicted``. ``victim(candidates)`` picks the key to evict among the resident keys
the cache may drop. Keys are ``(layer_column, expert)`` tuples.

Conventions (the same in the simulator and the offloaded model):
- LRU: recency of use; a prefetched expert counts as used when it arrives.
- LFU: use counts over the whole history (kept after eviction), ties broken by recency.
- MoE-Infinity: MoE-Infinity's activation-aware priority (see ``MoEInfinity``).
- Belady: evicts the expert whose next use is furthest away; needs the future, so only the
  simulator offers it (it is the bound for caching alone).
"""

from __future__ import annotations

from collections import defaultdict


class Policy:
    name = "policy"

    def __init__(self):
        self.clock = 0
        self.last_use: dict = {}

    def accessed(self, key, request_index: int = 0) -> None:
        self.clock += 1
        self.last_use[key] = self.clock

    def inserted(self, key, prefetched: bool) -> None:
        self.clock += 1
        self.last_use[key] = self.clock

    def evicted(self, key) -> None:
        pass

    def new_request(self) -> None:
        pass

    def victim(self, candidates):
        return min(candidates, key=self.priority)

    def priority(self, key):
        raise NotImplementedError


class LRU(Policy):
    """Least recently used."""

    name = "lru"

    def priority(self, key):
        return self.last_use[key]

    def victim(self, candidates):
        return min(candidates, key=self.last_use.__getitem__)  # priority() without a call per key


class LFU(Policy):
    """Least frequently used: counts over the whole history, ties broken by recency."""

    name = "lfu"

    def __init__(self):
        super().__init__()
        self.count: dict = defaultdict(int)

    def accessed(self, key, request_index: int = 0) -> None:
        super().accessed(key)
        self.count[key] += 1

    def priority(self, key):
        return (self.count[key], self.last_use[key])


class MoEInfinity(Policy):
    """MoE-Infinity's activation-aware caching priority (its ``priority_score``):

    ``score(l, e) = (1 - l/L) * S_req[l, e] / sum_e' S_req[l, e'] * F[l, e] / sum F``

    where ``S_req`` counts the current request's uses of expert e at layer l, ``F`` counts uses over
    the whole history, and ``1 - l/L`` keeps early layers (hardest to prefetch in time) longer.
    The lowest score is evicted; ties by recency.
    """

    name = "moe_infinity"

    def __init__(self, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        self.request: dict = defaultdict(int)
        self.request_row: dict = defaultdict(int)
        self.total: dict = defaultdict(int)
        self.total_sum = 0

    def accessed(self, key, request_index: int = 0) -> None:
        super().accessed(key)
        self.request[key] += 1
        self.request_row[key[0]] += 1
        self.total[key] += 1
        self.total_sum += 1

    def new_request(self) -> None:
        self.request.clear()
        self.request_row.clear()

    def priority(self, key):
        layer = key[0]
        row = self.request_row[layer]
        s_req = self.request[key] / row if row else 0.0
        freq = self.total[key] / self.total_sum if self.total_sum else 0.0
        return ((1.0 - layer / self.num_layers) * s_req * freq, self.last_use[key])


class Belady(Policy):
    """Belady's MIN: evict the resident expert whose next use is furthest in the future.

    ``next_use(key)`` is supplied by the simulator, which knows the trace.
    """

    name = "belady"

    def __init__(self, next_use):
        super().__init__()
        self.next_use = next_use

    def priority(self, key):
        # min() evicts the smallest: furthest next use first, then least recent.
        return (-self.next_use(key), self.last_use[key])


POLICIES = ("lru", "lfu", "moe_infinity", "belady")


def make_policy(name: str, *, num_layers: int = 1, next_use=None) -> Policy:
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU()
    if name == "moe_infinity":
        return MoEInfinity(num_layers)
    if name == "belady":
        if next_use is None:
            raise ValueError("policy 'belady' needs the future: only the trace simulator offers it")
        return Belady(next_use)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")

