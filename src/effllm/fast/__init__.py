"""Fast end-to-end decoding: a static KV cache, a compiled decode step, fused ops, packed weights.

``effllm.patch(model, decode=effllm.fast.FastDecode(...))`` (or ``decode=True``) makes the
model's ``generate()`` run greedy decoding through ``FastDecoder`` over a ``StaticKVCache``,
with the decode step under ``torch.compile``. See docs/fast_decode.md.
"""

from __future__ import annotations

from .config import FastDecode
from .static_cache import StaticKVCache, bucket_capacity

__all__ = ["FastDecode", "FastDecoder", "FastRunner", "StaticKVCache", "bucket_capacity"]


def __getattr__(name):
    if name == "FastDecoder":
        from .decoder import FastDecoder

        return FastDecoder
    if name == "FastRunner":
        from .compiled import FastRunner

        return FastRunner
    raise AttributeError(f"module 'effllm.fast' has no attribute {name!r}")
