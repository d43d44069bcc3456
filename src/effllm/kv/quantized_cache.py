"""``QuantizedKVCache``: the one ``CompressedCache`` with a quantizer and no policy (the name
kept from when it was a cache of its own)."""

from __future__ import annotations

from .cache import CompressedCache, ReadBuffers  # noqa: F401  (ReadBuffers: its old home)


class QuantizedKVCache(CompressedCache):
    """KV cache of a quantizer's codes (``KIVI``, ...), no eviction: pass it to
    ``model.generate(..., past_key_values=cache)`` or a forward loop, with any attention.
    ``config``: the model's config, to refuse models with sliding-window or non-attention layers
    and head dims the quantizer cannot hold, up front. Same as
    ``CompressedCache(quantizer=quantizer, config=config)``."""

    def __init__(self, quantizer, config=None):
        if quantizer is None:
            raise ValueError("QuantizedKVCache: quantizer must be a KV quantizer (KIVI, ...), got None")
        super().__init__(None, quantizer=quantizer, config=config)
