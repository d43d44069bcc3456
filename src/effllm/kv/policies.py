"""Eviction policies as scorers: a policy says how much each cached token is worth; the framework
(``Policy``'s methods, ``allocation.py``, ``CompressedLayer.evict``) decides what that costs.

A policy's job is ``score(view) -> (B, H_kv, S)`` (higher: keep), over a ``LayerView`` of one
layer after a multi-token step (its queries after RoPE), and ``decode_score(view)`` after a
decode step (the attention mass each stored key just received, from ``decode_attention(...,
return_stats=True)``). It declares the rest as settings, which the framework applies the same
way for every policy:

- ``budget``: a float in (0, 1] is the fraction of the prompt to keep (0.25 = 75% removed), an
  int the number of tokens; fixed per layer at the first prefill. In a left-padded batch a
  fraction is of each row's own prompt, and every count below is then per batch row.
- ``sinks`` (first tokens) and ``recent_tokens(keep)`` (newest tokens) always kept; pinned
  spans (``Protected``) kept before anything; padding and empty slots never kept.
- ``compress_once``: score and evict at the first prefill only (later steps are appended).
- ``evict_while_decoding``: hold the budget while decoding. Evictions are batched: once
  ``slack`` tokens beyond the budget have arrived (default 1/32 of the budget), back down to the
  budget (each batch row on its own where rows differ in length). Each eviction copies the
  layer's cache, so evicting one token per step would cost as much as the attention itself; the
  cache never exceeds the budget by more than 3%.
- ``accumulates``: scores add up over steps (H2O's running attention).
- allocation: per layer (default), ``share_heads`` (Ada-KV: the heads of a sequence share
  ``budget * H_kv``), ``layer_weight(view)`` (CAKE: layers share one total in proportion to a
  weight, cascading), or global after a replay (KVzip: ``allocation.evict_global``).

Attention probabilities for every scorer come from one function, ``kernels.scores.
softmax_attention`` (explicit float32 softmax, chunked over queries).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kernels.scores import softmax_attention
from .allocation import cascade
from .ranking import top_indices, top_mask

__all__ = ["CAKE", "H2O", "AdaKV", "LayerView", "Policy", "Protected", "SnapKV", "StreamingLLM", "attention_mass",
           "top_indices", "window_attention"]


@dataclass
class LayerView:
    """What a scorer sees of one layer (every tensor in the layer's slot order).

    - ``positions (B, H_kv, S)`` int32: original position of each stored token (-1: empty slot).
    - ``keys`` / ``values`` ``(B, H_kv, S, D)``: after RoPE; dequantized when the cache holds
      codes (read on first use).
    - ``query (B, H, Sq, D)``: the step's queries after RoPE (a multi-token step), else None;
      ``scale`` their softmax scale. The queries are the last ``Sq`` stored tokens.
    - ``mass (B, H_kv, S)`` float32: attention each stored key received from a decode step's
      query, summed over the query heads of its KV head (None when the policy asks for none).
    - ``padding (B, S)``: True at keys no query may see (a left-padded prompt), else None.
    - ``seen``: tokens seen; ``budget``: tokens to keep per row (None before it is fixed; where
      batch rows keep different numbers, the largest: ``layer.keeps()`` has each row's).
    - ``layer_idx``, ``num_layers``: where the layer sits (None outside a model).
    """

    layer: object = field(repr=False)
    query: torch.Tensor | None = None
    scale: float | None = None
    mass: torch.Tensor | None = None
    layer_idx: int | None = None
    num_layers: int | None = None

    @property
    def positions(self) -> torch.Tensor:
        return self.layer.positions

    @property
    def keys(self) -> torch.Tensor:
        return self._keys_values()[0]

    @property
    def values(self) -> torch.Tensor:
        return self._keys_values()[1]

    def _keys_values(self):
        if "_kv" not in self.__dict__:
            self.__dict__["_kv"] = self.layer.all_keys_values()
        return self.__dict__["_kv"]

    @property
    def padding(self) -> torch.Tensor | None:
        return self.layer.padding

    @property
    def seen(self) -> int:
        return self.layer.seen

    @property
    def budget(self) -> int | None:
        return self.layer.budget


def attention_mass(query: torch.Tensor, keys: torch.Tensor, scale: float, rows: slice | None = None,
                   padding: torch.Tensor | None = None) -> torch.Tensor:
    """Summed softmax attention of query rows onto each stored key, per KV head: ``(B, H_kv, S)``.

    ``query (B, H, Sq, D)`` holds the step's queries, which are the last Sq positions of the
    stored keys (causal); ``rows`` picks some of them (positions stay those of the whole step).
    ``padding (B, S)``: keys no query sees (a padding query, which sees nothing, adds nothing).
    """
    seq_q = query.shape[2]
    rows = rows or slice(0, seq_q)
    # the rows stay the last of the keys they can see: keys after them are cut off, then get 0
    keys_seen = keys[:, :, : keys.shape[2] - (seq_q - rows.stop)]
    mass = softmax_attention(query[:, :, rows], keys_seen, scale=scale, causal=True,
                             key_valid=_valid(padding, keys_seen), need_out=False, need_mass=True).mass
    if keys_seen.shape[2] < keys.shape[2]:
        mass = F.pad(mass, (0, keys.shape[2] - keys_seen.shape[2]))
    return mass


def _valid(padding: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor | None:
    return None if padding is None else ~padding[:, : keys.shape[2]]


def window_attention(query: torch.Tensor, keys: torch.Tensor, scale: float, window: int,
                     padding: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries onto the stored keys, per query head:
    ``(B, H, window, S)`` float32, causal inside the window (the queries are the last positions).
    ``padding (B, S)``: keys no query may see."""
    return softmax_attention(query[:, :, query.shape[2] - window:], keys, scale=scale, causal=True,
                             key_valid=_valid(padding, keys), need_out=False, need_probs=True).probs


class Policy:
    """A scorer plus its settings; the methods here are the framework that applies them (see the
    module docstring). Subclasses implement ``score`` (and ``decode_score`` if they evict while
    decoding)."""

    needs_decode_stats = False  # decode views carry ``mass``
    compress_once = False
    evict_while_decoding = False
    accumulates = False
    decode_needs_prefill = False  # skip decode steps until a prefill fixed the budget
    share_heads: float | None = None  # Ada-KV: the heads of a sequence share their budgets
    sinks = 0
    slack: int | None = None
    replays_context = False

    def __init__(self, budget: float | int):
        if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
            budget = int(budget)  # numpy's integers too (its floats are floats already)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"{type(self).__name__}: budget must be a float in (0, 1] or an int >= 1, got {budget!r}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(f"{type(self).__name__}: a fractional budget must lie in (0, 1], got {budget}")
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"{type(self).__name__}: a token budget must be >= 1, got {budget}")
        self.budget = budget

    # ---- what a policy defines ----------------------------------------------------------------

    def score(self, view: LayerView) -> torch.Tensor:
        """``(B, H_kv, S)``: worth of each stored token after a multi-token step (higher: keep)."""
        raise NotImplementedError

    def decode_score(self, view: LayerView) -> torch.Tensor:
        """``(B, H_kv, S)``: the same after a decode step (default: the decode step's attention)."""
        return view.mass

    def recent_tokens(self, keep: int, decoding: bool) -> int:
        """Newest tokens always kept, for a budget of ``keep``."""
        return 0

    def layer_weight(self, view: LayerView) -> list[float] | None:
        """Weights to divide one total budget across layers by, one a batch row (None: equal
        budgets)."""
        return None

    # ---- the framework --------------------------------------------------------------------------

    @property
    def evicts_later(self) -> bool:
        """Whether the policy may evict after its first compression (when False, the cache drops
        the per-slot positions and scores that only an eviction reads). Read from the settings:
        a policy that sets ``compress_once`` but evicts in its own ``after_decode`` overrides it."""
        return not self.compress_once or self.evict_while_decoding or self.accumulates

    def tokens(self, prompt_tokens: int) -> int:
        if isinstance(self.budget, float):
            return max(1, math.ceil(self.budget * prompt_tokens))
        return self.budget

    def _fix_budget(self, layer) -> int:
        """The layer's budget, fixed at its first prefill: of each row's own prompt for a
        fractional budget on a left-padded batch (``layer.row_budget``; ``budget`` the largest),
        so a row keeps what it would alone."""
        if layer.budget is None:
            layer.budget = self.tokens(layer.seen)
            if isinstance(self.budget, float) and layer.padding is not None:
                rows = [self.tokens(n) for n in layer.real_tokens()]  # the first prefill's own tokens
                layer.budget = max(rows)
                layer.row_budget = rows if len(set(rows)) > 1 else None
        return layer.budget

    def _per_row(self, layer, count) -> int | list[int]:
        """``count(budget)`` for the layer's budget, or for each row's where rows differ."""
        keeps = layer.keeps()
        return count(keeps) if isinstance(keeps, int) else [count(k) for k in keeps]

    def _slack_tokens(self, keep: int) -> int:
        return self.slack if self.slack is not None else max(1, math.ceil(keep / 32))

    def _decode_keeps(self, layer, slack: bool = True) -> int | list[int] | None:
        """While decoding: None until a row holds ``slack`` tokens beyond its budget (per row, or
        per sequence when heads share budgets; ``slack=False``: any token beyond it, as a
        multi-token step evicts); then what each batch row keeps: its budget where it is over,
        all it holds where not, so each row evicts when it would alone."""
        keep = self._fix_budget(layer)
        beyond = self._slack_tokens if slack else (lambda keep: 1)
        if layer.ragged is None and layer.row_budget is None:  # uniform: every row alike
            return keep if layer.stored() >= keep + beyond(keep) else None
        lengths = layer.row_lengths()  # (B, H_kv)
        longest = lengths.amax(dim=-1).tolist()
        held, heads = (longest, 1) if self.share_heads is None else (lengths.sum(dim=-1).tolist(), lengths.shape[1])
        keeps = layer.row_keeps()
        over = [n >= (k + beyond(k)) * heads for n, k in zip(held, keeps, strict=True)]
        if not any(over):
            return None
        return [k if o else n for k, o, n in zip(keeps, over, longest, strict=True)]

    def _scored(self, view: LayerView, decoding: bool) -> torch.Tensor:
        """The scorer's output; accumulated into the layer's running scores if the policy says so."""
        new = self.decode_score(view) if decoding else self.score(view)
        if not self.accumulates:
            return new
        layer = view.layer
        if layer.scores is None:
            layer.scores = new.clone() if decoding else new
        else:
            layer.scores = layer.scores.add_(new) if decoding else layer.scores + new
        return layer.scores

    def protect(self, ranking: torch.Tensor, layer, decoding: bool) -> torch.Tensor:
        """``ranking`` with the sinks and the recent tokens ranked first (counted from each
        row's budget, ``layer.keeps()``)."""
        recent = self._per_row(layer, lambda keep: self.recent_tokens(keep, decoding))
        if recent:  # an int, or a list of them (not empty)
            ranking = ranking.masked_fill(layer.recent_mask(recent), float("inf"))
        if self.sinks:
            ranking = ranking.masked_fill(layer.first_mask(self._per_row(layer, lambda keep: min(self.sinks, keep))),
                                          float("inf"))
        return ranking

    def _evict(self, layer, ranking: torch.Tensor, keep: int | list[int] | None = None) -> None:
        """Evict down to ``keep`` (default: the layer's budget, per row where rows differ)."""
        layer.evict(ranking, layer.keeps() if keep is None else keep, share_heads=self.share_heads)

    def view(self, layer, **context) -> LayerView:
        cache = context.get("cache")
        return LayerView(layer, query=context.get("query"), scale=context.get("scale"), mass=context.get("mass"),
                         layer_idx=context.get("layer_idx"), num_layers=getattr(cache, "num_layers", None))

    def after_prefill(self, layer, query: torch.Tensor, scale: float, **context) -> None:
        """After a multi-token step on a uniform layer (``context``: ``cache``, ``layer_idx``)."""
        if self.compress_once and layer.budget is not None:
            return
        self.prepare(layer, query)
        keep = self._fix_budget(layer)
        view = self.view(layer, query=query, scale=scale, **context)
        ranking = self.protect(self._scored(view, decoding=False), layer, decoding=False)
        weight = self.layer_weight(view)
        if weight is not None:
            layer.scores = ranking  # the cascade re-evicts earlier layers by their stored ranking
            cascade(context["cache"], context["layer_idx"], weight, self.recent_tokens(keep, False))
        elif layer.stored() > keep or layer.row_budget is not None:
            self._evict(layer, ranking)
        else:
            layer.rank_staged(ranking)  # nothing to evict: the ranking still says what matters most

    def prepare(self, layer, query: torch.Tensor) -> None:
        """Checks before scoring a prefill (settings that cannot work for this prompt)."""

    def after_decode(self, layer, stats: torch.Tensor | None, **context) -> None:
        """After a decode step (or any step on a ragged layer; ``context["queries"]``: its
        tokens): ``stats`` is its attention mass."""
        if not (self.evict_while_decoding or self.accumulates):
            return
        # a later multi-token step (a question), as after_prefill treats it on a uniform layer: a
        # compress-once policy appends it, any other evicts down to the budget with no slack
        multi = context.get("queries", 1) > 1
        if multi and self.compress_once and not self.accumulates:
            return
        if self.decode_needs_prefill and layer.budget is None:
            return
        view = self.view(layer, mass=stats, **context)
        scores = self._scored(view, decoding=True) if self.accumulates else None
        if multi and not self.compress_once:
            keeps = self._decode_keeps(layer, slack=False)
        else:
            keeps = self._decode_keeps(layer) if self.evict_while_decoding else None
        if keeps is not None:
            if scores is None:
                scores = self.decode_score(view)
            self._evict(layer, self.protect(scores, layer, decoding=True), keeps)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _apportion(keep: int, seen: int, lengths: list[int], room: int | None = None) -> list[int]:
    """Whole-token shares ``keep * length / seen`` of spans of ``lengths`` (of ``seen`` tokens),
    scaled down to fit ``room`` places (default ``keep``) where they would not, rounded down,
    then one more to the largest remainders (ties to the smaller share) while the rounded-up
    total of the exact shares allows (so they never add up past ``room``)."""
    room = keep if room is None else max(0, room)
    exact = [keep * n / seen for n in lengths]
    if sum(exact) > room:
        exact = [x * room / sum(exact) for x in exact]
    quotas = [math.floor(x + 1e-9) for x in exact]
    spare = min(room, math.ceil(sum(exact) - 1e-9)) - sum(quotas)
    # largest remainder first; on a tie (to rounding) the span with fewer tokens so far
    for i in sorted(range(len(exact)), key=lambda i: (round(quotas[i] - exact[i], 9), quotas[i]))[:max(0, spare)]:
        quotas[i] += 1
    return quotas


def _delegate(name: str) -> property:
    """A wrapper policy's setting: the wrapped policy's."""
    return property(lambda self: getattr(self.policy, name))


def _check_slack(slack):
    if slack is not None and (isinstance(slack, bool) or not isinstance(slack, int) or slack < 1):
        raise ValueError(f"slack must be None (1/32 of the budget) or an int >= 1, got {slack!r}")
    return slack


class StreamingLLM(Policy):
    """Attention sinks + a recent window (Xiao et al., StreamingLLM): keep the first ``sinks``
    tokens and the most recent ``budget - sinks``, at prefill and while decoding. Score: recency."""

    evict_while_decoding = True

    def __init__(self, budget: float | int, sinks: int = 4, slack: int | None = None):
        super().__init__(budget)
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"StreamingLLM: sinks must be an int >= 0, got {sinks!r}")
        self.sinks, self.slack = sinks, _check_slack(slack)

    def score(self, view):
        # Pinned tokens (Protected) displace the oldest recent ones.
        return view.positions.float()

    decode_score = score


class SnapKV(Policy):
    """SnapKV (Li et al.): the last ``window`` prompt queries vote, per KV head, for the keys
    they attend to; votes are max-pooled over ``kernel`` neighbours so kept tokens come with
    context. The window itself is always kept (its newest ``budget`` tokens where the budget is
    smaller). Prefill only: decoding grows the cache."""

    compress_once = True

    def __init__(self, budget: float | int, window: int = 32, kernel: int = 7, pooling: str = "max"):
        super().__init__(budget)
        if any(isinstance(x, bool) or not isinstance(x, int) for x in (window, kernel)) \
                or window < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"SnapKV: window must be an int >= 1 and kernel an odd int >= 1, got {window!r}, "
                             f"{kernel!r}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"SnapKV: pooling must be 'max' or 'avg', got {pooling!r}")
        self.window, self.kernel, self.pooling = window, kernel, pooling

    def prepare(self, layer, query):
        if self.window > query.shape[2]:
            raise ValueError(f"SnapKV: window={self.window} is larger than the prompt ({query.shape[2]} tokens)")

    def score(self, view):
        """Pooled votes of the window queries."""
        self.prepare(view.layer, view.query)
        seq_q = view.query.shape[2]
        votes = attention_mass(view.query, view.keys, view.scale, rows=slice(seq_q - self.window, seq_q),
                               padding=view.padding)
        flat = votes.flatten(0, 1).unsqueeze(1)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        return pool(flat, self.kernel, stride=1, padding=self.kernel // 2).view_as(votes)

    def recent_tokens(self, keep, decoding):
        return min(self.window, keep)


class H2O(Policy):
    """Heavy-hitter oracle (Zhang et al.): keep the ``recent`` newest tokens and the tokens with
    the largest attention accumulated over all queries so far, per KV head (GQA: summed over
    the group). Applied at prefill and at every decode step, holding the budget."""

    needs_decode_stats = True
    evict_while_decoding = True
    accumulates = True

    def __init__(self, budget: float | int, recent: float | int = 0.5, slack: int | None = None):
        super().__init__(budget)
        if isinstance(recent, bool) or not isinstance(recent, (int, float)) \
                or isinstance(recent, float) and not 0.0 <= recent <= 1.0 or isinstance(recent, int) and recent < 0:
            raise ValueError(f"H2O: recent must be a fraction of the budget in [0, 1] or an int >= 0, got {recent!r}")
        self.recent, self.slack = recent, _check_slack(slack)

    def score(self, view):
        """This step's attention, every query onto every stored key (added to the running scores)."""
        return attention_mass(view.query, view.keys, view.scale, padding=view.padding)

    def recent_tokens(self, keep, decoding):
        return min(keep, round(self.recent * keep) if isinstance(self.recent, float) else self.recent)


class CAKE(Policy):
    """CAKE (Qin et al., ICLR 2025): cascading, preference-based layer budgets.

    At prefill, each layer's window attention (last ``window`` queries) gives its preference
    ``P_l = H_l^(1/tau1) * V_l^(1/tau2)`` (H: entropy of the attention over the prefix, V: its
    variance across the window queries): the layer weight by which the framework divides one total
    budget across layers, re-divided after every layer, so earlier layers only shrink and peak
    memory stays near the total. Tokens are scored per KV head by ``mean + gamma * variance`` of
    their window attention (average-pooled over ``kernel``, averaged over the GQA group); the
    window is always kept. While decoding, each layer holds its budget, ranking the prefix by the
    newest token's attention.

    ``budget`` is the average per-layer size including the window.
    """

    needs_decode_stats = True
    compress_once = True
    evict_while_decoding = True
    decode_needs_prefill = True

    def __init__(self, budget: float | int, window: int = 32, tau1: float = 1.0, tau2: float = 1.0,
                 gamma: float = 200.0, kernel: int = 5, slack: int | None = None):
        super().__init__(budget)
        if any(isinstance(x, bool) or not isinstance(x, int) for x in (window, kernel)) \
                or window < 2 or kernel < 1 or kernel % 2 == 0:
            # window >= 2: tokens are ranked by the variance of their attention across the window's queries
            raise ValueError(f"CAKE: window must be an int >= 2 and kernel an odd int >= 1, got {window!r}, "
                             f"{kernel!r}")
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in (tau1, tau2, gamma)) \
                or tau1 <= 0 or tau2 <= 0 or gamma < 0:
            raise ValueError(f"CAKE: tau1, tau2 must be > 0 and gamma >= 0, got {tau1}, {tau2}, {gamma}")
        self.window, self.tau1, self.tau2, self.gamma, self.kernel = window, tau1, tau2, gamma, kernel
        self.slack = _check_slack(slack)

    def prepare(self, layer, query):
        # each batch row as it would be alone (a left-padded row: its own tokens)
        w, lengths = self.window, layer.real_tokens()  # the first prefill: each row's own tokens
        row = min(range(len(lengths)), key=lambda b: (lengths[b], b))
        where = "" if len(lengths) == 1 else f" of batch row {row}"
        if w > lengths[row]:
            raise ValueError(f"CAKE: window={w} is larger than the prompt{where} ({lengths[row]} tokens)")
        size = self.tokens(lengths[row])
        if size <= w:
            raise ValueError(f"CAKE: the budget{where} ({size} tokens per layer) must exceed window={w}")

    def _window_attention(self, view) -> torch.Tensor:
        if "_cake_attn" not in view.__dict__:
            if view.num_layers is None:
                raise ValueError("CAKE needs the number of layers: create the cache with effllm.kv.compress")
            n, w = view.keys.shape[2], self.window
            view.__dict__["_cake_attn"] = window_attention(view.query, view.keys, view.scale, w,
                                                           view.padding)[..., : n - w]  # (B, H, w, prefix)
        return view.__dict__["_cake_attn"]

    def score(self, view):
        attn = self._window_attention(view)
        indicator = attn.mean(dim=2) + self.gamma * attn.var(dim=2)
        if view.padding is None:
            indicator = self._pool(indicator)
        else:  # averaged over each row's own tokens, as alone (the padding's indicator is 0)
            real = (~view.padding[:, None, : indicator.shape[-1]]).float().expand_as(indicator)
            indicator = self._pool(indicator) / self._pool(real).clamp(min=1e-6)
        batch, heads = indicator.shape[:2]
        kv_heads = view.positions.shape[1]
        indicator = indicator.view(batch, kv_heads, heads // kv_heads, -1).mean(dim=2)
        return torch.cat([indicator, indicator.new_zeros(batch, kv_heads, self.window)], dim=-1)  # window: protected

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool1d(x.flatten(0, 1).unsqueeze(1), self.kernel, stride=1, padding=self.kernel // 2,
                            count_include_pad=False).view_as(x)

    def layer_weight(self, view):
        attn = self._window_attention(view).flatten(1)  # per batch row: padding's attention is 0
        entropy = -(attn * torch.log(attn + 1e-10)).sum(dim=1)
        variance = self._window_attention(view).var(dim=2).flatten(1).sum(dim=1)
        return [e ** (1 / self.tau1) * v ** (1 / self.tau2) for e, v in zip(entropy.tolist(), variance.tolist())]

    def recent_tokens(self, keep, decoding):
        return self.window


class _Wrapper(Policy):
    """A policy around another (``self.policy``): its scores and decode-time settings by default."""

    needs_decode_stats = _delegate("needs_decode_stats")
    accumulates = _delegate("accumulates")
    evict_while_decoding = _delegate("evict_while_decoding")
    slack = _delegate("slack")

    def prepare(self, layer, query):
        self.policy.prepare(layer, query)

    def score(self, view):
        return self.policy.score(view)

    def decode_score(self, view):
        return self.policy.decode_score(view)

    def recent_tokens(self, keep, decoding):
        return self.policy.recent_tokens(keep, decoding)


class AdaKV(_Wrapper):
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

    compress_once = True
    decode_needs_prefill = True

    def __init__(self, policy: Policy, alpha_safeguard: float = 0.2):
        if not isinstance(policy, (SnapKV, H2O)):
            raise ValueError(f"AdaKV: policy must be SnapKV or H2O (a per-token score at prefill), got {policy!r}")
        if isinstance(alpha_safeguard, bool) or not isinstance(alpha_safeguard, (int, float)) \
                or not 0.0 <= alpha_safeguard <= 1.0:
            raise ValueError(f"AdaKV: alpha_safeguard must lie in [0, 1], got {alpha_safeguard!r}")
        self.policy, self.alpha_safeguard = policy, float(alpha_safeguard)
        self.budget = policy.budget

    # the wrapped scorer and its settings; the heads share the budget
    share_heads = property(lambda self: self.alpha_safeguard)


class Protected(_Wrapper):
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
        def pair(span) -> bool:
            return (isinstance(span, (tuple, list)) and len(span) == 2
                    and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in span)
                    and 0 <= span[0] < span[1])

        if not isinstance(spans, (list, tuple)) or not spans or not all(map(pair, spans)):
            raise ValueError(f"Protected: spans must be a list of (start, end) int pairs with 0 <= start < end, "
                             f"e.g. [(0, 4)], got {spans!r}")
        if fair and not isinstance(policy, (SnapKV, H2O)):
            raise ValueError(f"Protected(fair=True): the policy must score tokens at prefill (SnapKV or H2O), "
                             f"got {type(policy).__name__}")
        self.policy, self.spans, self.fair = policy, [(int(a), int(b)) for a, b in spans], fair
        self.budget = policy.budget

    # the wrapped scorer and all its settings
    compress_once = _delegate("compress_once")
    decode_needs_prefill = _delegate("decode_needs_prefill")
    share_heads = _delegate("share_heads")
    sinks = _delegate("sinks")

    def layer_weight(self, view):
        return self.policy.layer_weight(view)

    def prepare(self, layer, query):
        self.policy.prepare(layer, query)
        if not self.fair and layer.pinned is None:
            positions = torch.cat([torch.arange(a, b) for a, b in self.spans]).unique()
            pinned = positions[positions < layer.seen].to(layer.positions.device)
            # per batch row: the pinned tokens that are its own (not its left padding), its budget
            for row, length in enumerate(layer.real_tokens()):
                count, budget = int((pinned >= layer.seen - length).sum()), self.policy.tokens(length)
                if count >= budget:
                    where = "" if layer.batch_heads()[0] == 1 else f" of batch row {row}"
                    raise ValueError(f"Protected: the spans pin {count} tokens{where}, the budget keeps {budget}")
            layer.pinned = pinned

    def protect(self, ranking, layer, decoding):
        ranking = self.policy.protect(ranking, layer, decoding)
        if not self.fair or decoding:
            return ranking
        # Every span is guaranteed the budget's share of its own tokens, its best by the score;
        # the shares are whole tokens adding up to at most the budget (largest remainders), and
        # rank below the policy's own forced tokens (sinks, recent window: +inf), which stay.
        # Per batch row: its own budget, prompt (left padding is no span's) and the places its
        # own forced tokens leave.
        batch = ranking.shape[0]
        pads = [0] * batch if layer.padding is None else layer.padding.sum(dim=1).tolist()
        valid = layer.valid_mask()
        real = torch.ones_like(ranking, dtype=torch.bool) if valid is None else valid
        inside = [(layer.positions >= start) & (layer.positions < end) & real for start, end in self.spans]
        forced = (ranking == float("inf")) & ~torch.stack(inside).any(dim=0) & real  # kept anyway, in no span
        keeps = layer.row_keeps()
        rooms = (torch.tensor(keeps) - forced.sum(-1).amax(-1).cpu()).tolist()
        quotas = [_apportion(keep, layer.seen - pad, [max(0, min(end, layer.seen) - max(start, pad))
                                                      for start, end in self.spans], room)
                  for keep, room, pad in zip(keeps, rooms, pads, strict=True)]
        guaranteed = torch.zeros_like(ranking, dtype=torch.bool)
        for span, in_span in enumerate(inside):
            # no more than the row's head with the fewest of the span's tokens holds
            held = in_span.sum(-1).amin(-1).tolist()
            counts = [min(row[span], n) for row, n in zip(quotas, held, strict=True)]
            if max(counts) > 0:
                guaranteed |= top_mask(ranking.masked_fill(~in_span, float("-inf")), counts)
        below_forced = torch.finfo(ranking.dtype).max if ranking.is_floating_point() else torch.iinfo(ranking.dtype).max
        return ranking.masked_fill(guaranteed & (ranking != float("inf")), below_forced)
