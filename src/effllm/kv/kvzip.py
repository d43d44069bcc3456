"""KVzip (Kim et al., 2025): query-agnostic eviction scored by replaying the context.

After the prompt is prefilled, the model reads a "repeat the previous context" prompt followed
by the context itself, in chunks, against the full cache. Each cached token is scored by the
largest attention a replay query (of its KV head's group) pays it: by default (the paper's) the
queries replaying its own chunk, within a softmax over that chunk, the first tokens and the
replay's own; a token the model must look at to reproduce the context is one a later question
may need, whatever the question is. The replay's own keys are never stored; then every layer
keeps its best tokens.

Other policies score with the prompt's last queries, so with the question read *after*
compression they guess what matters from filler; KVzip does not depend on where the question is.
It costs a second pass over the context once per prompt, the scores from an explicit float32
attention (its cost on CPU: docs/kv.md, "What is built", KVzip).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._cache_arg import cache_argument_name
from ..kernels.scores import SCORE_ELEMS, softmax_attention
from .allocation import evict_global
from .policies import Policy

DEFAULT_INSTRUCTION = "\n\nRepeat the previous context exactly."
SCORING = ("cache", "chunk")


def repeat_prompt_ids(tokenizer, instruction: str = DEFAULT_INSTRUCTION) -> list[int]:
    """Token ids of the replay prompt: ``instruction``, then whatever the tokenizer's chat
    template puts between a user message and the assistant's answer (nothing without one)."""
    suffix = ""
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00KVZIP\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)
        suffix = text.split(marker, 1)[1]
    return tokenizer(instruction + suffix, add_special_tokens=False).input_ids


def replay_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                     stored: int, key_valid: torch.Tensor | None = None,
                     scored: ReplayChunk | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of replay queries over the cache and themselves, with KVzip's scores.

    ``query (B, H, Sq, D)``; ``keys``/``values (B, H_kv, stored + Sq, D)``: the ``stored``
    cached tokens, all in the queries' past, then the queries' own (causal): the queries are the
    last Sq keys, which is ``softmax_attention``'s bottom-right causal layout. ``key_valid
    (B, stored + Sq)``: False at padding (a left-padded batch), which no query attends to and
    whose queries score nothing. Returns ``out (B, Sq, H, D)`` and ``best (B, H_kv, stored)``
    float32: the largest softmax weight each cached token received from any query of its group.
    ``scored`` (a ``ReplayChunk``): score only the chunk's slots, with a softmax over them, each
    row's first ``sinks`` tokens and the queries' own; the other slots score 0; the output still
    attends to everything (through SDPA). ``None``: a softmax over the whole cache, every slot
    scored. The explicit float32 passes are computed in query chunks.
    """
    seq_q = query.shape[2]
    query_valid = None if key_valid is None else key_valid[:, stored:stored + seq_q]
    if scored is not None:
        batch, kv_heads, _, dim = keys.shape
        slots, valid = _chunk_slots(scored, batch, stored, seq_q, key_valid, keys.device)
        index = slots[:, None, :, None].expand(batch, kv_heads, -1, dim)
        peak = softmax_attention(query, keys.gather(2, index), scale=scale, causal=True, key_valid=valid,
                                 query_valid=query_valid, need_out=False, need_peak=True).peak
        # each row's chunk slots get their peaks (a row's padding places, clamped onto a slot,
        # carry 0: the maximum keeps the real peak)
        span = slots.shape[1] - scored.sinks - seq_q
        chunk_slots = slots[:, None, scored.sinks:scored.sinks + span].expand(batch, kv_heads, span)
        best = peak.new_zeros(batch, kv_heads, stored).scatter_reduce_(
            2, chunk_slots, peak[..., scored.sinks:scored.sinks + span], reduce="amax")
        return _sdpa_over_cache(query, keys, values, scale, stored, key_valid), best
    result = softmax_attention(query, keys, values, scale=scale, causal=True, key_valid=key_valid,
                               query_valid=query_valid, need_peak=True)
    out = result.out.transpose(1, 2).to(query.dtype).contiguous()
    return out, result.peak[..., :stored].contiguous()


def _sdpa_over_cache(query, keys, values, scale, stored, key_valid) -> torch.Tensor:
    """``(B, Sq, H, D)``: the replay's output over the whole cache, when its scores come from
    elsewhere (SDPA, not the explicit float32 pass the whole-cache scores need). In query
    chunks: with a mask and grouped heads SDPA may fall back to its math kernel, whose score
    matrix is then bounded as the explicit pass's is."""
    batch, heads, seq_q, _ = query.shape
    seq_k = stored + seq_q
    step = max(1, SCORE_ELEMS // max(1, batch * heads * seq_k))
    out = query.new_empty(batch, seq_q, heads, values.shape[-1])
    for first in range(0, seq_q, step):
        last = min(seq_q, first + step)
        rows = torch.arange(first, last, device=query.device)
        mask = torch.arange(seq_k, device=query.device) <= stored + rows[:, None]  # bottom-right causal
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, :]
            # every query sees itself: a padding query with no key left would make SDPA return NaN
            mask[..., rows - first, stored + rows] = True
        part = F.scaled_dot_product_attention(query[:, :, first:last], keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=heads != keys.shape[1])
        out[:, first:last] = part.transpose(1, 2)
    return out


@dataclass(frozen=True)
class ReplayChunk:
    """The chunk a replay pass scores: row ``b``'s cached slots ``[start[b], start[b] + count[b])``
    (its own tokens: a left-padded row's chunks start at its first token), with the row's first
    ``sinks`` tokens in its softmax. ``start``/``count``: ``(B,)`` long, or ints for every row;
    ``span``: the largest count, given when it is known on the host (no device sync to find it)."""

    start: torch.Tensor | int
    count: torch.Tensor | int
    sinks: int
    span: int | None = None


def _chunk_slots(chunk: ReplayChunk, batch: int, stored: int, seq_q: int, key_valid,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, sinks + span + Sq)`` slots a chunk's replay reads (each row's first ``sinks``
    valid tokens before its chunk, its chunk left-padded to the longest row's, ``span``, the
    queries' own) and which of them are real."""
    start = torch.as_tensor(chunk.start, device=device).expand(batch)
    count = torch.as_tensor(chunk.count, device=device).expand(batch)
    span = chunk.span if chunk.span is not None else int(count.max())
    first = (torch.zeros(batch, dtype=torch.long, device=device) if key_valid is None
             else (~key_valid[:, :stored]).sum(dim=1))  # left padding: each row's first token
    sink_slots = first[:, None] + torch.arange(chunk.sinks, device=device)
    sink_ok = sink_slots < start.clamp(max=stored)[:, None]  # not inside the chunk, not past the cache
    place = torch.arange(span, device=device) - (span - count)[:, None]  # < 0: the chunk's padding
    last = max(stored - 1, 0)
    slots = torch.cat([sink_slots.clamp(max=last), (start[:, None] + place).clamp(0, last),
                       torch.arange(stored, stored + seq_q, device=device).expand(batch, -1)], dim=1)
    valid = torch.cat([sink_ok, place >= 0, torch.ones(batch, seq_q, dtype=torch.bool, device=device)], dim=1)
    if key_valid is not None:
        valid &= key_valid.gather(1, slots)
    return slots, valid


class KVzip(Policy):
    """KVzip: keep the tokens the model attends to most while reconstructing the context.

    ``prompt_ids``: the replay prompt's token ids, or ``tokenizer=`` to build them
    (``repeat_prompt_ids``: "Repeat the previous context exactly." in the chat template).
    ``chunk``: context tokens replayed per pass.
    ``sinks``: first tokens always kept. ``scope="global"`` (the paper's default): all layers
    and heads of a sequence share ``budget * layers * H_kv`` tokens and the best scores
    anywhere win; rows then differ in length and are stored ragged (slower CPU decode than
    uniform layers). ``scope="layer"``: every KV head keeps ``budget`` tokens (uniform layers,
    the fastest decode, much weaker at 75% removed: see docs/kv.md).
    ``safeguard`` (global scope only): every KV head of every layer first keeps its best
    ``ceil(safeguard * budget)`` tokens, the rest is shared (Ada-KV's safeguard; 0 is the
    paper's pure global selection, which can leave a head with a dozen tokens).
    ``scoring``: which softmax a replay query's weights come from once the context is longer
    than one chunk: ``"chunk"`` (the paper's) over its own chunk, the sinks and the replay's
    tokens; ``"cache"`` over the whole cache (effllm's default before session 18), which
    favours the context's end (docs/kv.md, "KVzip's position bias at 4k").
    ``kernel``: each head's scores max-pooled over ``kernel`` neighbouring tokens before the
    budget is shared (SnapKV's pooling; 1, the paper's, pools nothing), so a kept token keeps
    the words around it (docs/kv.md, "Pooled KVzip scores").
    Compresses once, after the first prefill; later steps (a question) are appended as read.
    Runs the replay through ``effllm.kv.compress``/``effllm.patch(kv=...)``, which call
    ``replay`` after that prefill. Left-padded batches: the padding is hidden from the replay,
    scores nothing, and is dropped with the eviction; each row's replay continues after its own
    last position when the prefill passed ``position_ids`` (``generate()`` does).
    """

    replays_context = True
    compress_once = True  # scored and evicted once, after the replay; later steps are appended

    def __init__(self, budget: float | int, prompt_ids=None, *, tokenizer=None, chunk: int = 2048, sinks: int = 4,
                 scope: str = "global", safeguard: float = 0.0, scoring: str = "chunk", kernel: int = 1):
        super().__init__(budget)
        if (prompt_ids is None) == (tokenizer is None):
            raise ValueError("KVzip: pass exactly one of prompt_ids (the replay prompt's token ids) or tokenizer")
        ids = repeat_prompt_ids(tokenizer) if tokenizer is not None else prompt_ids
        ids = torch.as_tensor(ids).flatten().tolist()
        if not ids or any(not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"KVzip: prompt_ids must be non-negative token ids, got {prompt_ids!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"KVzip: chunk must be an int >= 1, got {chunk!r}")
        if sinks < 0:
            raise ValueError(f"KVzip: sinks must be >= 0, got {sinks}")
        if scope not in ("layer", "global"):
            raise ValueError(f"KVzip: scope must be 'layer' or 'global', got {scope!r}")
        if isinstance(safeguard, bool) or not isinstance(safeguard, (int, float)) or not 0.0 <= safeguard <= 1.0:
            raise ValueError(f"KVzip: safeguard must lie in [0, 1], got {safeguard!r}")
        if safeguard and scope != "global":
            raise ValueError("KVzip: safeguard shares a budget across heads, so it needs scope='global'")
        if scoring not in SCORING:
            raise ValueError(f"KVzip: scoring must be one of {', '.join(map(repr, SCORING))}, got {scoring!r}")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"KVzip: kernel must be an odd int >= 1 (1: no pooling), got {kernel!r}")
        self.scoring, self.kernel = scoring, kernel
        self.prompt_ids, self.chunk, self.sinks, self.scope = ids, chunk, sinks, scope
        self.safeguard = float(safeguard)

    def after_prefill(self, layer, query, scale, **context):
        self._fix_budget(layer)  # the first prefill sets the budget; eviction waits for the replay

    # no_grad, not inference_mode: the storage eviction builds here is written in place by the
    # decode steps that follow, which inference tensors forbid outside inference mode.
    @torch.no_grad()
    def replay(self, decoder, cache, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> None:
        """Score every cached token by replaying ``input_ids`` (the prefilled context) through
        ``decoder`` (the model's base, without the LM head) against ``cache``, then evict.

        ``position_ids``: the prefill's (as ``generate()`` passes them for a left-padded
        batch); each row's replay continues after its own last position."""
        batch, width = input_ids.shape
        device = input_ids.device
        padding = cache.layers[0].padding  # (B, width), True at left padding; None without
        pad = torch.zeros(batch, dtype=torch.long, device=device) if padding is None else padding.sum(dim=1)
        first = (position_ids[:, -1:] + 1 if position_ids is not None
                 else torch.full((batch, 1), width, device=device))
        for layer in cache.layers:
            layer.scores = None
            self._fix_budget(layer)  # a one-token prompt came as a decode step: no prefill set it
        # Each row's chunks are cut from its own first token, as if it were alone: in a pass a
        # row replays [padding, prompt, its chunk], padded on the left as far as its chunk is
        # shorter than the longest, its prompt at the position after its context.
        source = torch.cat([torch.tensor(self.prompt_ids, device=device).expand(batch, -1), input_ids], dim=1)
        length = len(self.prompt_ids)
        longest = width - int(pad.min())
        # one chunk covering every row's context: its softmax is the whole cache's, the cheaper pass
        scored = self.scoring == "chunk" and longest > self.chunk
        cache.replaying = True
        try:
            for offset in range(0, longest, self.chunk):
                start = pad + offset
                count = (width - start).clamp(0, self.chunk)
                span = min(self.chunk, longest - offset)  # the longest row's count, known here
                place = torch.arange(length + span, device=device) - (span - count)[:, None]  # < 0: padding
                chunk_ids = source.gather(1, torch.where(place < length, place, start[:, None] + place).clamp(min=0))
                if padding is not None:  # hidden from every layer: cached, then replayed padding
                    cache.replay_valid = torch.cat([~padding, place >= 0], dim=1)
                cache.replay_scored = ReplayChunk(start, count, self.sinks, span) if scored else None
                decoder(input_ids=chunk_ids, position_ids=(first + place).clamp(min=0), use_cache=True,
                        **{cache_argument_name(decoder): cache})
        finally:
            cache.replaying, cache.replay_valid, cache.replay_scored = False, None, None
        self._evict(cache)
        cache.settle()  # the kept context goes to the quantizer now, not at the next step
        cache.compressed()

    def _pooled(self, layer) -> torch.Tensor:
        """``(B, H_kv, S)``: each token's replay score replaced by the largest within
        ``kernel // 2`` tokens of it in its row and head. The sinks lend nothing (they are kept
        anyway; their large scores would otherwise keep their neighbours whatever those scored),
        nor does padding (its score is 0; the allocation then ranks padding last). Pooling makes
        a peak's neighbours tie with it: each token that is its own window's peak is raised by
        one ulp, so a tie cut by the budget keeps the peak rather than the earliest tokens."""
        scores = layer.scores
        if self.kernel == 1:
            return scores
        if self.sinks:
            scores = scores.masked_fill(layer.first_mask(self._per_row(layer, lambda keep: min(self.sinks, keep))), 0.0)
        flat = scores.flatten(0, 1).unsqueeze(1)
        pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=self.kernel // 2).view_as(scores)
        return torch.where(pooled == scores, torch.nextafter(pooled, pooled.new_tensor(float("inf"))), pooled)

    def _evict(self, cache) -> None:
        """After the replay: each layer's scores, sinks first, to the framework's allocation."""
        rankings = [self.protect(self._pooled(layer), layer, decoding=False) for layer in cache.layers]
        for layer in cache.layers:
            layer.scores = None
        if self.scope == "layer":
            for layer, ranking in zip(cache.layers, rankings):
                if layer.stored() > layer.budget or layer.padding is not None:  # evict drops padding
                    layer.evict(ranking, layer.keeps())
            return
        evict_global(cache, rankings, floor=self.safeguard)
