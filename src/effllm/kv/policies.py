"""Eviction policies: which cached tokens each KV head keeps.

A policy sees one layer at a time (``CompressedLayer``: keys after RoPE, original positions,
running scores) after a multi-token step (``after_prefill``, with that step's queries) and after
each decode step (``after_decode``, with the attention mass each stored key just received,
from ``decode_attention(..., return_stats=True)``; after any step on a ragged layer). It ranks
the layer's slots and calls ``layer.evict(ranking, keep)``, which handles pinned tokens,
padding and the storage layout.

``budget``: a float in (0, 1] is the fraction of the prompt to keep (0.25 = 75% removed), an
int the number of tokens. The budget is fixed per layer at the first prefill and held during
decode by the policies that evict while decoding (StreamingLLM, H2O). Those evict in batches:
once ``slack`` tokens beyond the budget have arrived (default: 1/32 of the budget), back down
to the budget. Each eviction copies the layer's cache, so evicting one token per step would
cost as much as the attention itself; the cache never exceeds the budget by more than 3%.
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
    slack: int | None = None

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

    def _slack_tokens(self, keep: int) -> int:
        return self.slack if self.slack is not None else max(1, math.ceil(keep / 32))

    def _over_budget(self, layer) -> bool:
        """While decoding: True once ``slack`` tokens beyond the budget are stored."""
        keep = self._fix_budget(layer)
        return layer.stored() >= keep + self._slack_tokens(keep)

    def after_prefill(self, layer, query: torch.Tensor, scale: float, **context) -> None:
        """``context``: ``cache`` and ``layer_idx``, for policies that coordinate layers."""
        raise NotImplementedError

    def after_decode(self, layer, stats: torch.Tensor | None, **context) -> None:
        """Default: decoding grows the cache (no eviction)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def top_indices(ranking: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best entries of each row of ``ranking`` (last dim). Ties go to the
    earlier token: ``topk`` breaks them differently on CPU and CUDA, and max-pooled scores
    (SnapKV) tie often, so the same prompt would keep other tokens on another device."""
    return torch.sort(ranking, dim=-1, descending=True, stable=True).indices[..., :k]


def _check_slack(slack):
    if slack is not None and (not isinstance(slack, int) or slack < 1):
        raise ValueError(f"slack must be None (1/32 of the budget) or an int >= 1, got {slack!r}")
    return slack


def window_attention(query: torch.Tensor, keys: torch.Tensor, scale: float, window: int,
                     padding: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries onto the stored keys, per query head:
    ``(B, H, window, S)`` float32, causal inside the window (the queries are the last positions).
    ``padding (B, S)``: keys no query may see."""
    batch, heads, seq_q, dim = query.shape
    kv_heads, seq_k = keys.shape[1], keys.shape[2]
    q = query[:, :, seq_q - window:].float()
    k = keys.float().repeat_interleave(heads // kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    q_pos = seq_k - window + torch.arange(window, device=query.device)
    scores = scores.masked_fill(torch.arange(seq_k, device=query.device)[None, :] > q_pos[:, None], float("-inf"))
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def attention_mass(query: torch.Tensor, keys: torch.Tensor, scale: float, rows: slice | None = None,
                   padding: torch.Tensor | None = None) -> torch.Tensor:
    """Summed softmax attention of query rows onto each stored key, per KV head: ``(B, H_kv, S)``.

    ``query (B, H, Sq, D)`` holds the step's queries, which are the last Sq positions of the
    stored keys (causal). ``padding (B, S)``: keys no query sees (a padding query, which sees
    nothing, adds nothing). Computed in query chunks: the full attention matrix never exists.
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
        if padding is not None:
            scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if padding is not None:
            probs = probs.nan_to_num_(0.0)  # a padding query sees no key: its NaN row adds nothing
        mass += probs.sum(dim=2)
    return mass


class StreamingLLM(Policy):
    """Attention sinks + a recent window (Xiao et al., StreamingLLM): keep the first ``sinks``
    tokens and the most recent ``budget - sinks``, at prefill and while decoding."""

    def __init__(self, budget: float | int, sinks: int = 4, slack: int | None = None):
        super().__init__(budget)
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"StreamingLLM: sinks must be an int >= 0, got {sinks!r}")
        self.sinks, self.slack = sinks, _check_slack(slack)

    def _trim(self, layer) -> None:
        keep = self._fix_budget(layer)
        if layer.stored() <= keep:
            return
        # Rank by recency; sinks first. Pinned tokens (Protected) displace the oldest recent ones.
        recency = layer.positions.float().masked_fill(layer.first_mask(min(self.sinks, keep)), float("inf"))
        layer.evict(recency, keep)

    def after_prefill(self, layer, query, scale, **context):
        self._trim(layer)

    def after_decode(self, layer, stats, **context):
        if self._over_budget(layer):
            self._trim(layer)


class SnapKV(Policy):
    """SnapKV (Li et al.): the last ``window`` prompt queries vote, per KV head, for the keys
    they attend to; votes are max-pooled over ``kernel`` neighbours so kept tokens come with
    context. The window itself is always kept. Prefill only: decoding grows the cache."""

    def __init__(self, budget: float | int, window: int = 32, kernel: int = 7, pooling: str = "max"):
        super().__init__(budget)
        if any(isinstance(x, bool) or not isinstance(x, int) for x in (window, kernel)) \
                or window < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"SnapKV: window must be an int >= 1 and kernel an odd int >= 1, got {window!r}, "
                             f"{kernel!r}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"SnapKV: pooling must be 'max' or 'avg', got {pooling!r}")
        self.window, self.kernel, self.pooling = window, kernel, pooling

    def prefill_ranking(self, layer, query, scale) -> torch.Tensor:
        """``(B, H_kv, S)``: pooled votes of the window queries; the window ranks first."""
        if self.window > query.shape[2]:
            raise ValueError(f"SnapKV: window={self.window} is larger than the prompt ({query.shape[2]} tokens)")
        votes = attention_mass(query, layer.all_keys_values()[0], scale, rows=slice(query.shape[2] - self.window, query.shape[2]),
                               padding=layer.padding)
        flat = votes.flatten(0, 1).unsqueeze(1)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(flat, self.kernel, stride=1, padding=self.kernel // 2).view_as(votes)
        return pooled.masked_fill(layer.recent_mask(min(self.window, self._fix_budget(layer))), float("inf"))

    def after_prefill(self, layer, query, scale, **context):
        if layer.budget is not None:
            return  # compress the prompt once
        ranking = self.prefill_ranking(layer, query, scale)
        if layer.stored() > layer.budget:
            layer.evict(ranking, layer.budget)


class H2O(Policy):
    """Heavy-hitter oracle (Zhang et al.): keep the ``recent`` newest tokens and the tokens with
    the largest attention accumulated over all queries so far, per KV head (GQA: summed over
    the group). Applied at prefill and at every decode step, holding the budget."""

    needs_decode_stats = True

    def __init__(self, budget: float | int, recent: float | int = 0.5, slack: int | None = None):
        super().__init__(budget)
        if isinstance(recent, float) and not 0.0 <= recent <= 1.0 or isinstance(recent, int) and recent < 0:
            raise ValueError(f"H2O: recent must be a fraction of the budget in [0, 1] or an int >= 0, got {recent!r}")
        self.recent, self.slack = recent, _check_slack(slack)

    def _recent_count(self, keep: int) -> int:
        return min(keep, round(self.recent * keep) if isinstance(self.recent, float) else self.recent)

    def ranking(self, layer) -> torch.Tensor:
        """``(B, H_kv, S)``: the running scores, the recent tokens ranked first."""
        return layer.scores.masked_fill(layer.recent_mask(self._recent_count(layer.budget)), float("inf"))

    def add_decode_scores(self, layer, stats: torch.Tensor) -> None:
        """A decode step's attention per key (``decode_attention``'s stats) joins the running
        scores; every step, evicting or not."""
        layer.scores = stats.clone() if layer.scores is None else layer.scores.add_(stats)

    def prefill_ranking(self, layer, query, scale) -> torch.Tensor:
        """``(B, H_kv, S)``: attention accumulated so far (this step's queries added to the
        running scores); the recent tokens rank first."""
        mass = attention_mass(query, layer.all_keys_values()[0], scale, padding=layer.padding)
        layer.scores = mass if layer.scores is None else layer.scores + mass
        self._fix_budget(layer)
        return self.ranking(layer)

    def after_prefill(self, layer, query, scale, **context):
        ranking = self.prefill_ranking(layer, query, scale)
        if layer.stored() > layer.budget:
            layer.evict(ranking, layer.budget)

    def after_decode(self, layer, stats, **context):
        self.add_decode_scores(layer, stats)
        if self._over_budget(layer):
            layer.evict(self.ranking(layer), layer.budget)


class CAKE(Policy):
    """CAKE (Qin et al., ICLR 2025): cascading, preference-based layer budgets.

    At prefill, each layer's window attention (last ``window`` queries) gives its preference
    ``P_l = H_l^(1/tau1) * V_l^(1/tau2)`` (H: entropy of the attention over the prefix, V: its
    variance across the window queries). The total budget of all layers is re-divided in
    proportion to the preferences known so far after every layer, so earlier layers only
    shrink and peak memory stays near the total. Tokens are ranked per KV head by
    ``mean + gamma * variance`` of their window attention (average-pooled over ``kernel``,
    averaged over the GQA group); the window is always kept. While decoding, each layer holds
    its budget, ranking the prefix by the newest token's attention.

    ``budget`` is the average per-layer size including the window.
    """

    needs_decode_stats = True

    def __init__(self, budget: float | int, window: int = 32, tau1: float = 1.0, tau2: float = 1.0,
                 gamma: float = 200.0, kernel: int = 5, slack: int | None = None):
        super().__init__(budget)
        if window < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"CAKE: window must be >= 1 and kernel an odd int >= 1, got {window}, {kernel}")
        if tau1 <= 0 or tau2 <= 0 or gamma < 0:
            raise ValueError(f"CAKE: tau1, tau2 must be > 0 and gamma >= 0, got {tau1}, {tau2}, {gamma}")
        self.window, self.tau1, self.tau2, self.gamma, self.kernel = window, tau1, tau2, gamma, kernel
        self.slack = _check_slack(slack)

    def after_prefill(self, layer, query, scale, *, cache, layer_idx, **context):
        if layer.budget is not None:
            return
        n, w = layer.stored(), self.window
        if w > query.shape[2]:
            raise ValueError(f"CAKE: window={w} is larger than the prompt ({query.shape[2]} tokens)")
        size = self.tokens(n)  # average per-layer size including the window
        if size <= w:
            raise ValueError(f"CAKE: the budget ({size} tokens per layer) must exceed window={w}")
        if cache.num_layers is None:
            raise ValueError("CAKE needs the number of layers: create the cache with effllm.kv.compress")
        attn = window_attention(query, layer.all_keys_values()[0], scale, w, layer.padding)[..., : n - w]  # (B, H, w, prefix)
        entropy = -(attn * torch.log(attn + 1e-10)).sum()
        variance = attn.var(dim=2).sum()
        preference = float(entropy) ** (1 / self.tau1) * float(variance) ** (1 / self.tau2)
        indicator = attn.mean(dim=2) + self.gamma * attn.var(dim=2)
        indicator = F.avg_pool1d(indicator.flatten(0, 1).unsqueeze(1), self.kernel, stride=1,
                                 padding=self.kernel // 2, count_include_pad=False).view_as(indicator)
        batch, heads = indicator.shape[:2]
        kv_heads = layer.batch_heads()[1]
        indicator = indicator.view(batch, kv_heads, heads // kv_heads, -1).mean(dim=2)
        layer.scores = torch.cat([indicator, indicator.new_full((batch, kv_heads, w), float("inf"))], dim=-1)

        state = cache.policy_state
        state.setdefault("preferences", {})[layer_idx] = preference
        total = (size - w) * cache.num_layers
        prefs = state["preferences"]
        weight = sum(prefs.values()) or 1.0
        for idx, pref in prefs.items():  # cascade: re-divide the total over the layers seen so far
            target = cache.layers[idx]
            prefix_budget = min(target.stored() - w, max(1, int(total * pref / weight)))
            target.budget = prefix_budget + w
            if target.stored() > target.budget:
                target.evict(target.scores, target.budget)

    def after_decode(self, layer, stats, **context):
        if layer.budget is None or not self._over_budget(layer):
            return
        layer.evict(stats.masked_fill(layer.recent_mask(self.window), float("inf")), layer.budget)  # window kept


class AdaKV(Policy):
    """Ada-KV (Feng et al., 2024): per-head budgets on top of a scoring policy.

    The wrapped policy (``SnapKV`` or ``H2O``) scores each KV head's tokens at prefill; instead
    of ``budget`` tokens per head, the heads of a sequence share ``budget * H_kv`` and the best
    tokens of any head win, so concentrated heads give budget to diffuse ones. Each head keeps
    at least ``ceil(alpha_safeguard * budget)`` (the paper's safeguard, 0.2). Heads then hold
    different numbers of tokens: the layer stores them ragged (``CompressedCache(page_size=)``),
    so the memory saved is real. While decoding, ``AdaKV(H2O)`` holds the shared budget: H2O's
    scores keep accumulating the new tokens' attention, and once every row of a sequence has
    grown by the slack, the heads share ``budget * H_kv`` again (recent tokens kept per head).
    ``AdaKV(SnapKV)`` has no decode-time score: decoding grows every head by one token.
    """

    def __init__(self, policy: Policy, alpha_safeguard: float = 0.2):
        if not isinstance(policy, (SnapKV, H2O)):
            raise ValueError(f"AdaKV: policy must be SnapKV or H2O (a per-token score at prefill), got {policy!r}")
        if isinstance(alpha_safeguard, bool) or not 0.0 <= alpha_safeguard <= 1.0:
            raise ValueError(f"AdaKV: alpha_safeguard must lie in [0, 1], got {alpha_safeguard!r}")
        self.policy, self.alpha_safeguard = policy, float(alpha_safeguard)
        self.budget = policy.budget

    ragged_rows = True  # heads keep different numbers of tokens

    @property
    def needs_decode_stats(self) -> bool:
        return self.policy.needs_decode_stats

    @property
    def slack(self) -> int | None:
        return self.policy.slack

    def after_prefill(self, layer, query, scale, **context):
        if layer.budget is not None:
            return  # compress the prompt once
        ranking = self.policy.prefill_ranking(layer, query, scale)
        if layer.stored() > layer.budget:
            layer.evict(ranking, layer.budget, share_heads=self.alpha_safeguard)

    def after_decode(self, layer, stats, **context):
        # a policy with decode-time scores (H2O) keeps them running; others have none to share
        if not hasattr(self.policy, "add_decode_scores") or layer.budget is None:
            return
        self.policy.add_decode_scores(layer, stats)
        keep = layer.budget
        # the heads of a sequence share keep * H_kv tokens: compare the sequence's total
        if int(layer.row_lengths().sum(dim=-1).max()) >= (keep + self._slack_tokens(keep)) * layer.batch_heads()[1]:
            layer.evict(self.policy.ranking(layer), keep, share_heads=self.alpha_safeguard)


class Protected(Policy):
    """Wrap a policy to shield ``spans`` (``(start, end)`` positions, end exclusive, e.g. the
    system prompt or each instruction) from eviction ("The Pitfalls of KV Cache Compression":
    instructions are what eviction removes first).

    ``fair=False``: the spans' tokens are pinned, never evicted; they count against the budget
    and the wrapped policy chooses the rest. ``fair=True`` (fair per-span eviction, for spans
    too long to pin): every span keeps at least the budget's share of its own tokens (the best
    by the wrapped policy's score), so eviction cannot wipe out one span while sparing another;
    the remaining budget goes to the best tokens anywhere. Fair eviction needs a policy that
    scores tokens at prefill (SnapKV, H2O). Positions count from the start of the (padded) input.
    """

    def __init__(self, policy: Policy, spans: list[tuple[int, int]], fair: bool = False):
        if not isinstance(policy, Policy) or isinstance(policy, Protected) or getattr(policy, "replays_context", False):
            raise ValueError(f"Protected: policy must be an effllm.kv policy (not Protected or KVzip), got {policy!r}")
        if not spans or any(not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b) for a, b in spans):
            raise ValueError(f"Protected: spans must be (start, end) int pairs with 0 <= start < end, got {spans!r}")
        if fair and not isinstance(policy, (SnapKV, H2O)):
            raise ValueError(f"Protected(fair=True): the policy must score tokens at prefill (SnapKV or H2O), "
                             f"got {type(policy).__name__}")
        self.policy, self.spans, self.fair = policy, [tuple(span) for span in spans], fair
        self.budget = policy.budget
        self.ragged_rows = getattr(policy, "ragged_rows", False)
        self.needs_decode_stats = policy.needs_decode_stats
        self.slack = policy.slack

    def _pin(self, layer) -> None:
        if layer.pinned is None:
            positions = torch.cat([torch.arange(a, b) for a, b in self.spans]).unique()
            layer.pinned = positions[positions < layer.seen].to(layer.keys.device)
            budget = self.policy.tokens(layer.seen)
            if layer.pinned.numel() >= budget:
                raise ValueError(f"Protected: the spans pin {layer.pinned.numel()} tokens, the budget keeps {budget}")

    def after_prefill(self, layer, query, scale, **context):
        if not self.fair:
            self._pin(layer)
            self.policy.after_prefill(layer, query, scale, **context)
            return
        if layer.budget is not None and isinstance(self.policy, SnapKV):
            return  # SnapKV compresses the prompt once
        ranking = self.policy.prefill_ranking(layer, query, scale)
        if layer.stored() <= layer.budget:
            return
        share = layer.budget / layer.seen
        guaranteed = torch.zeros_like(ranking, dtype=torch.bool)
        for start, end in self.spans:
            inside = (layer.positions >= start) & (layer.positions < end)
            quota = min(math.ceil(share * (min(end, layer.seen) - start)), int(inside.sum(-1).min()))
            if quota > 0:
                best = top_indices(ranking.masked_fill(~inside, float("-inf")), quota)
                guaranteed.scatter_(-1, best, True)
        layer.evict(ranking.masked_fill(guaranteed, float("inf")), layer.budget)

    def after_decode(self, layer, stats, **context):
        self.policy.after_decode(layer, stats, **context)
