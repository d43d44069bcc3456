"""``FastRunner``: greedy generation over a ``FastDecoder`` with a compiled decode step.

Compilation happens per shape bucket ``(batch, capacity)``: the static cache of one generate()
call is sized once, to the bucket of prompt + new tokens, so its decode steps all share one
graph and a new length inside a bucket compiles nothing. Every graph Inductor builds is counted
(``graphs``) through a counting backend, and the first step of each bucket is timed (compilation
included), so ``report()`` states the compile cost and a test can prove a run did not recompile.
"""

from __future__ import annotations

import time

import torch

from .config import FastDecode
from .decoder import FastDecoder, decode_layer, decode_step
from .static_cache import StaticKVCache, bucket_capacity


def _recompile_limit_hit(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is dynamo refusing to compile past its recompile limit."""
    limit_hit = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())
    while exc is not None:
        if (limit_hit and isinstance(exc, limit_hit)) or "recompile limit" in str(exc):
            return True
        exc = exc.__cause__
    return False


class FastRunner:
    def __init__(self, decoder: FastDecoder, config: FastDecode):
        self.decoder = decoder
        self.config = config
        self.graphs = 0  # graphs compiled (all buckets)
        self.buckets: dict[tuple[int, int], float] = {}  # (batch, capacity) -> first step's seconds
        self.steps = 0
        self.last_cache: StaticKVCache | None = None
        self._step, self._layer = decode_step, None
        if config.compile == "layer":
            self._layer = torch.compile(decode_layer, dynamic=False, fullgraph=True, backend=self._backend())
        elif config.compile == "step":
            self._step = torch.compile(decode_step, dynamic=False, fullgraph=True, backend=self._backend())

    def _backend(self):
        from torch._dynamo.backends.registry import lookup_backend

        inductor = lookup_backend("inductor")

        def counting_inductor(gm, example_inputs):
            self.graphs += 1
            return inductor(gm, example_inputs)

        return counting_inductor

    def new_cache(self, batch: int, total: int) -> StaticKVCache:
        capacity = bucket_capacity(total, self.config.min_capacity)
        return self.decoder.new_cache(batch, capacity)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos: set[int], pad: int | None, *,
                 min_new_tokens: int = 0, processors=None) -> torch.Tensor:
        """Greedy continuation of ``ids (B, S)`` by up to ``max_new_tokens`` tokens; rows that
        produced an ``eos`` token continue with ``pad`` until every row has finished. ``eos`` is
        masked for the first ``min_new_tokens``; ``processors(ids, scores)`` (transformers'
        logits processors) may rewrite the scores of every step."""
        d = self.decoder
        batch, seq = ids.shape
        if max_new_tokens == 0:
            return ids
        cache = self.new_cache(batch, seq + max_new_tokens)
        self.last_cache = cache
        tables = d.rope(cache.capacity)
        out = [ids]
        logits = d.prefill(ids, cache, tables)
        done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        eos_ids = torch.tensor(sorted(eos), dtype=ids.dtype, device=ids.device) if eos else None
        for step in range(max_new_tokens):
            scores = logits.float()
            if eos_ids is not None and step < min_new_tokens:
                scores = scores.index_fill(1, eos_ids, float("-inf"))
            if processors is not None:
                scores = processors(torch.cat(out, dim=1), scores)
            token = scores.argmax(-1)
            if pad is not None:
                token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token[:, None])
            if eos_ids is not None:
                done = done | torch.isin(token, eos_ids)
                if bool(done.all()):
                    break
            if step == max_new_tokens - 1:
                break
            logits = self._decode(token[:, None], cache, tables)
        return torch.cat(out, dim=1)

    def _decode(self, token: torch.Tensor, cache: StaticKVCache, tables) -> torch.Tensor:
        d = self.decoder
        pos = torch.tensor([cache.length], device=token.device)
        key = (token.shape[0], cache.capacity)
        first = key not in self.buckets
        start = time.perf_counter()
        try:
            logits = self._step(d.spec, d.window, token, pos, d.embed, d.layers, d.norm, d.head, cache.keys,
                                cache.values, *tables, layer_fn=self._layer)
        except Exception as exc:
            if not _recompile_limit_hit(exc):
                raise
            # fullgraph=True: past its recompile limit (one count for every model in the process)
            # dynamo refuses instead of running eagerly; say what to change.
            raise RuntimeError(
                f"effllm fast decode: torch.compile's recompile limit "
                f"(torch._dynamo.config.recompile_limit={torch._dynamo.config.recompile_limit}) was reached by the "
                f"bucket batch={key[0]} x {key[1]} slots; raise the limit, use fewer buckets (a larger "
                "FastDecode(min_capacity=...)), or FastDecode(compile=False)") from exc
        if first:
            self.buckets[key] = time.perf_counter() - start
        cache.length += 1
        self.steps += 1
        return logits

    def report(self) -> str:
        c = self.config
        parts = [(f"compile={c.compile!r}, weights={c.weights!r}, lm_head={self.decoder.head_kind}, "
                  f"{self.decoder.step_bytes / 2**20:.1f} MiB of weights read per step")]
        if self.buckets:
            done = ", ".join(f"batch {b} x {cap} slots: first step {sec:.1f} s" for (b, cap), sec in self.buckets.items())
            parts.append(f"{self.graphs} graph(s) compiled; buckets: {done}")
        return "; ".join(parts)
