"""Eviction policies: which cached tokens each KV head keeps.

A policy sees one layer at a time (``CompressedLayer``: keys after RoPE, original positions,
running scores) after a multi-token step (``after_prefill``, with that step's queries) and after
each decode step (``after_decode``, with the attention mass each stored key just received,
from ``decode_attention(..., return_stats=True)``). It evicts by calling ``layer.keep(index)``.

``budget``: a float in (0, 1] is the fraction of the prompt to keep (0.25 = 75% removed), an
int the number of tokens. The budget is fixed per layer at the first prefill and held during
decode by the policies that evict while decoding (StreamingLLM, H2O).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Scores of (B, H_kv, rows, S) are computed in query chunks bounded by this many elements.
_SCORE_ELEMS = 16 * 1024 * 1024


class Policy:
    """Budget handling and top-k selection shared by the policies."""

    needs_decode_stats = False

    def __init__(self, budget: float | int):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"{type(self).__name__}: budget must be a float in (0, 1] or an int >= 1, got {budget!r}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(f"{type(self).__name__}: a fractional budget must lie in (0, 1], got {budget}")
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"{type(self).__name__}: a token budget must be >= 1, got {budget}")
        self.budget = budget

    def tokens(self, prompt_tokens: int) -> int:
        if isinstance(self.budget, float):
            return max(1, math.ceil(self.budget * prompt_tokens))
        return self.budget

    def _fix_budget(self, layer) -> int:
        if layer.budget is None:
            layer.budget = self.tokens(layer.seen)
        return layer.budget

    def after_prefill(self, layer, query: torch.Tensor, scale: float) -> None:
        raise NotImplementedError

    def after_decode(self, layer, stats: torch.Tensor | None) -> None:
        """Default: decoding grows the cache (no eviction)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _keep_top(layer, scores: torch.Tensor, keep: int, protected: torch.Tensor) -> None:
    """Keep the ``keep`` best-scoring tokens per head, always including ``protected`` (S,) bool."""
    ranked = scores.masked_fill(protected, float("inf"))
    index = ranked.topk(keep, dim=-1).indices.sort(dim=-1).values  # token order preserved
    layer.keep(index)


def _recent(n: int, count: int, device) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if count > 0:
        mask[-count:] = True
    return mask


def attention_mass(query: torch.Tensor, keys: torch.Tensor, scale: float, rows: slice | None = None) -> torch.Tensor:
    """Summed softmax attention of query rows onto each stored key, per KV head: ``(B, H_kv, S)``.

    ``query (B, H, Sq, D)`` holds the step's queries, which are the last Sq positions of the
    stored keys (causal). Computed in query chunks: the full attention matrix never exists.
    """
    batch, heads, seq_q, dim = query.shape
    kv_heads, seq_k = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    rows = rows or slice(0, seq_q)
    start, stop = rows.start, rows.stop
    kf = keys.float()
    mass = torch.zeros(batch, kv_heads, seq_k, dtype=torch.float32, device=query.device)
    chunk = max(1, _SCORE_ELEMS // max(1, batch * heads * seq_k))
    key_pos = torch.arange(seq_k, device=query.device)
    for s in range(start, stop, chunk):
        e = min(stop, s + chunk)
        q = query[:, :, s:e].float().reshape(batch, kv_heads, group * (e - s), dim)
        scores = (q @ kf.transpose(-1, -2)) * scale
        q_pos = (seq_k - seq_q + torch.arange(s, e, device=query.device)).repeat(group)
        scores = scores.masked_fill(key_pos[None, :] > q_pos[:, None], float("-inf"))
        mass += torch.softmax(scores, dim=-1).sum(dim=2)
    return mass


class StreamingLLM(Policy):
    """Attention sinks + a recent window (Xiao et al., StreamingLLM): keep the first ``sinks``
    tokens and the most recent ``budget - sinks``, at prefill and while decoding."""

    def __init__(self, budget: float | int, sinks: int = 4):
        super().__init__(budget)
        if sinks < 0:
            raise ValueError(f"StreamingLLM: sinks must be >= 0, got {sinks}")
        self.sinks = sinks

    def _trim(self, layer) -> None:
        n, keep = layer.stored(), self._fix_budget(layer)
        if n <= keep:
            return
        sinks = min(self.sinks, keep)
        index = torch.cat([torch.arange(sinks), torch.arange(n - (keep - sinks), n)]).to(layer.keys.device)
        layer.keep(index.expand(layer.keys.shape[0], layer.keys.shape[1], -1))

    def after_prefill(self, layer, query, scale):
        self._trim(layer)

    def after_decode(self, layer, stats):
        self._trim(layer)


class SnapKV(Policy):
    """SnapKV (Li et al.): the last ``window`` prompt queries vote, per KV head, for the keys
    they attend to; votes are max-pooled over ``kernel`` neighbours so kept tokens come with
    context. The window itself is always kept. Prefill only: decoding grows the cache."""

    def __init__(self, budget: float | int, window: int = 32, kernel: int = 7, pooling: str = "max"):
        super().__init__(budget)
        if window < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"SnapKV: window must be >= 1 and kernel an odd int >= 1, got {window}, {kernel}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"SnapKV: pooling must be 'max' or 'avg', got {pooling!r}")
        self.window, self.kernel, self.pooling = window, kernel, pooling

    def after_prefill(self, layer, query, scale):
        if layer.budget is not None:
            return  # compress the prompt once
        n, keep = layer.stored(), self._fix_budget(layer)
        if self.window > query.shape[2]:
            raise ValueError(f"SnapKV: window={self.window} is larger than the prompt ({query.shape[2]} tokens)")
        if n <= keep:
            return
        votes = attention_mass(query, layer.keys, scale, rows=slice(query.shape[2] - self.window, query.shape[2]))
        flat = votes.flatten(0, 1).unsqueeze(1)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(flat, self.kernel, stride=1, padding=self.kernel // 2).view_as(votes)
        _keep_top(layer, pooled, keep, _recent(n, min(self.window, keep), votes.device))


class H2O(Policy):
    """Heavy-hitter oracle (Zhang et al.): keep the ``recent`` newest tokens and the tokens with
    the largest attention accumulated over all queries so far, per KV head (GQA: summed over
    the group). Applied at prefill and at every decode step, holding the budget."""

    needs_decode_stats = True

    def __init__(self, budget: float | int, recent: float | int = 0.5):
        super().__init__(budget)
        if isinstance(recent, float) and not 0.0 <= recent <= 1.0 or isinstance(recent, int) and recent < 0:
            raise ValueError(f"H2O: recent must be a fraction of the budget in [0, 1] or an int >= 0, got {recent!r}")
        self.recent = recent

    def _recent_count(self, keep: int) -> int:
        return min(keep, round(self.recent * keep) if isinstance(self.recent, float) else self.recent)

    def after_prefill(self, layer, query, scale):
        mass = attention_mass(query, layer.keys, scale)
        n = layer.stored()
        layer.scores = mass if layer.scores is None else layer.scores + mass
        keep = self._fix_budget(layer)
        if n > keep:
            _keep_top(layer, layer.scores, keep, _recent(n, self._recent_count(keep), mass.device))

    def after_decode(self, layer, stats):
        n = layer.stored()
        if layer.scores is None:
            layer.scores = torch.zeros(stats.shape[0], stats.shape[1], n, device=stats.device)
        layer.scores += stats[..., :n]
        keep = self._fix_budget(layer)
        if n > keep:
            _keep_top(layer, layer.scores, keep, _recent(n, self._recent_count(keep), stats.device))
