"""Helpers for model-level cases: time a ``generate`` call, count weight and KV bytes, score a text.

A model case typically builds its model(s) once with ``cached``, then returns a ``ModelSetup``
whose runs call ``time_generate`` and whose measures call ``weight_bytes`` / ``text_perplexity``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .memory import PeakMemory

_CACHE: dict[Any, Any] = {}


def cached(key: Any, build: Callable[[], Any]) -> Any:
    """``build()`` once per process per ``key`` (a model shared by several parameter sets)."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def clear_cache() -> None:
    """Drop the models ``cached`` holds (the runner calls it after each case)."""
    _CACHE.clear()


_WALK_DEPTH = 64  # guards only against runaway nesting: cycles and shared objects are walked once


def _unique_tensors(obj: Any, seen: set, depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (lists, dicts, attributes).
    ``seen`` holds the storages counted and the objects walked, so an object reached twice (or
    through a cycle) is walked once; a ragged quantized layer's codes lie 7 levels below the
    cache (cache, layers, layer, rows, stores, store, codes)."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return 0
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    walkable = isinstance(obj, (list, tuple, set, dict)) or (
        hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)))
    # marked walked only when its children are walked too, so a second way in is not cut short
    if not walkable or depth >= _WALK_DEPTH or ("object", id(obj)) in seen:
        return 0
    seen.add(("object", id(obj)))
    if isinstance(obj, dict):
        children = obj.values()
    else:
        children = obj if isinstance(obj, (list, tuple, set)) else vars(obj).values()
    return sum(_unique_tensors(x, seen, depth + 1) for x in children)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights)."""
    seen: set = set()
    return sum(_unique_tensors(t, seen) for t in [*model.parameters(), *model.buffers()])


def kv_bytes(cache: Any) -> int:
    """Bytes of the tensors a KV cache object holds (any cache class: its attributes are walked)."""
    return _unique_tensors(cache, set())


class _Stamps:
    """A logits processor that only notes when each new token's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def time_generate(model, input_ids: torch.Tensor, new_tokens: int, *, device: torch.device | str = "cpu",
                  **generate_kwargs) -> dict[str, float]:
    """One greedy ``model.generate`` of exactly ``new_tokens`` tokens, timed per token.

    Returns ``first_token_ms`` (call to first token: the prefill), ``prefill_tokens_per_s``,
    ``decode_tokens_per_s`` (tokens after the first over their time), ``peak_mem_mb`` (CUDA
    only) and ``kv_bytes`` of the cache generate returns. Works through any ``generate`` wrapper a patch
    installs: the times come from a logits processor, called once per new token.
    """
    if new_tokens < 2:
        raise ValueError(f"time_generate: new_tokens must be >= 2 to time decoding, got {new_tokens}")
    from transformers import LogitsProcessorList

    stamps = _Stamps()
    with torch.inference_mode(), PeakMemory(device) as mem:
        start = time.perf_counter()
        out = model.generate(
            input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            logits_processor=LogitsProcessorList([stamps]), return_dict_in_generate=True, **generate_kwargs,
        )
    t = stamps.times
    first = t[0] - start
    result = {
        "first_token_ms": first * 1e3,
        "prefill_tokens_per_s": input_ids.shape[-1] * input_ids.shape[0] / first,
        "decode_tokens_per_s": (len(t) - 1) * input_ids.shape[0] / (t[-1] - t[0]),
    }
    # On CPU the peak-RSS rise misses memory the allocator reuses (a warmed-up generate shows a few
    # KiB): only the CUDA allocator's peak is reported; CPU cases report weight and KV bytes instead.
    if torch.device(device).type == "cuda" and mem.rise_mb is not None:
        result["peak_mem_mb"] = mem.rise_mb
    # transformers 5.24 returns the cache as ``cache`` (``past_key_values`` before, now deprecated).
    cache = next((out[k] for k in ("cache", "past_key_values") if k in out and out[k] is not None), None)
    if cache is not None:
        result["kv_bytes"] = kv_bytes(cache)
    return result


@torch.inference_mode()
def text_perplexity(model, input_ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) of ``input_ids`` (shape (1, T)) under ``model``, one forward."""
    logits = model(input_ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:].to(logits.device))
    return float(torch.exp(nll))


def smollm2(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (embedded; no download), cached per dtype."""
    from ..testing.models import smollm2 as load

    def build():
        model, tok = load(dtype=dtype)
        return model.to(device), tok

    return cached(("smollm2", str(dtype), str(device)), build)


def text_ids(tokenizer, tokens: int, *, name: str = "haystack.txt") -> torch.Tensor:
    """The first ``tokens`` tokens of a text effllm ships (repeated when it is shorter), shape (1, tokens)."""
    from ..testing.quality import shipped_text

    ids = tokenizer(shipped_text(name), return_tensors="pt").input_ids
    while ids.shape[1] < tokens:
        ids = torch.cat([ids, ids], dim=1)
    return ids[:, :tokens]
