"""Introspection of transformers caches: how many bytes a KV cache holds."""

from __future__ import annotations

import torch


def _tensors_of_layer(layer) -> list[torch.Tensor]:
    return [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]


def kv_cache_nbytes(cache) -> int:
    """Bytes held by a cache's key and value tensors (effllm caches report their own ``nbytes()``)."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"cannot measure a {type(cache).__name__}: it has no .layers (transformers >= 5 caches do)")
    return sum(t.numel() * t.element_size() for layer in layers for t in _tensors_of_layer(layer))
