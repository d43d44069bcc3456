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
        best = peak.new_zeros(batch, kv_heads, stored)
        best[..., scored.start:scored.end] = peak[..., scored.sinks:scored.sinks + scored.end - scored.start]
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
    """The chunk a replay pass scores: cached slots ``[start, end)``, with each row's first
    ``sinks`` tokens in its softmax."""

    start: int
    end: int
    sinks: int


def _chunk_slots(chunk: ReplayChunk, batch: int, stored: int, seq_q: int, key_valid,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, sinks + chunk + Sq)`` slots a chunk's replay reads (each row's first ``sinks``
    valid tokens before the chunk, the chunk, the queries' own) and which of them are real."""
    first = (torch.zeros(batch, dtype=torch.long, device=device) if key_valid is None
             else (~key_valid[:, :stored]).sum(dim=1))  # left padding: each row's first token
    sink_slots = first[:, None] + torch.arange(chunk.sinks, device=device)
    sink_ok = sink_slots < min(chunk.start, stored)  # not inside the chunk, not past the cache
    slots = torch.cat([sink_slots.clamp(max=max(stored - 1, 0)),
                       torch.arange(chunk.start, chunk.end, device=device).expand(batch, -1),
                       torch.arange(stored, stored + seq_q, device=device).expand(batch, -1)], dim=1)
    valid = torch.cat([sink_ok, torch.ones(batch, chunk.end - chunk.start + seq_q, dtype=torch.bool,
                                           device=device)], dim=1)
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
    Compresses once, after the first prefill; later steps (a question) are appended as read.
    Runs the replay through ``effllm.kv.compress``/``effllm.patch(kv=...)``, which call
    ``replay`` after that prefill. Left-padded batches: the padding is hidden from the replay,
    scores nothing, and is dropped with the eviction; each row's replay continues after its own
    last position when the prefill passed ``position_ids`` (``generate()`` does).
    """

    replays_context = True
    compress_once = True  # scored and evicted once, after the replay; later steps are appended

    def __init__(self, budget: float | int, prompt_ids=None, *, tokenizer=None, chunk: int = 2048, sinks: int = 4,
                 scope: str = "global", safeguard: float = 0.0, scoring: str = "chunk"):
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
        self.scoring = scoring
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
        prompt = torch.tensor(self.prompt_ids, device=input_ids.device).expand(batch, -1)
        padding = cache.layers[0].padding  # (B, width), True at left padding; None without
        first = (position_ids[:, -1:] + 1 if position_ids is not None
                 else torch.full((batch, 1), width, device=input_ids.device))
        for layer in cache.layers:
            layer.scores = None
        cache.replaying = True
        try:
            for start in range(0, width, self.chunk):
                end = min(width, start + self.chunk)
                chunk_ids = torch.cat([prompt, input_ids[:, start:end]], dim=1)
                if padding is not None:  # hidden from every layer: cached, then replayed padding
                    cache.replay_valid = torch.cat([~padding, torch.ones_like(prompt, dtype=torch.bool),
                                                    ~padding[:, start:end]], dim=1)
                # one chunk covering the whole context: its softmax is the whole cache's, the cheaper pass
                whole = start == 0 and end == width
                cache.replay_scored = ReplayChunk(start, end, self.sinks) if self.scoring == "chunk" and not whole else None
                positions = first + torch.arange(chunk_ids.shape[1], device=input_ids.device)
                decoder(input_ids=chunk_ids, position_ids=positions, use_cache=True,
                        **{cache_argument_name(decoder): cache})
        finally:
            cache.replaying, cache.replay_valid, cache.replay_scored = False, None, None
        self._evict(cache)
        cache.settle()  # the kept context goes to the quantizer now, not at the next step
        cache.compressed()

    def _evict(self, cache) -> None:
        """After the replay: each layer's scores, sinks first, to the framework's allocation."""
        rankings = [self.protect(layer.scores, layer, layer.budget, decoding=False) for layer in cache.layers]
        for layer in cache.layers:
            layer.scores = None
        if self.scope == "layer":
            for layer, ranking in zip(cache.layers, rankings):
                if layer.stored() > layer.budget or layer.padding is not None:  # evict drops padding
                    layer.evict(ranking, layer.budget)
            return
        evict_global(cache, rankings, floor=self.safeguard)
