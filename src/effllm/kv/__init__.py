"""KV-cache compression: a transformers Cache that keeps only what a policy selects, and frees
the rest.

Built: ``CompressedCache`` (uniform or ragged layers, left-padded batches), ``StreamingLLM``,
``SnapKV``, ``H2O``, ``CAKE`` (per-layer budgets), ``AdaKV`` (per-head budgets), ``KVzip``
(query-agnostic, scored by replaying the context), ``Protected``
spans, ``compress(model, policy)`` and ``effllm.patch(model, kv=policy)``. Not yet: KV
quantization composed with eviction; ``QuantizedKVCache`` (KIVI codes) stands alone so far.
"""

from .api import KVCompression, compress
from .kvzip import KVzip, repeat_prompt_ids
from .policies import CAKE, H2O, AdaKV, Policy, Protected, SnapKV, StreamingLLM
from .quantizers import KIVI


def __getattr__(name):
    # The cache subclasses transformers' Cache: import transformers only when it is asked for.
    if name in ("CompressedCache", "CompressedLayer"):
        from . import cache

        return getattr(cache, name)
    if name == "QuantizedKVCache":
        from .quantized_cache import QuantizedKVCache

        return QuantizedKVCache
    raise AttributeError(f"module 'effllm.kv' has no attribute {name!r}")


__all__ = ["compress", "KVCompression", "CompressedCache", "CompressedLayer", "Policy", "StreamingLLM", "SnapKV",
           "H2O", "CAKE", "AdaKV", "Protected", "KVzip", "repeat_prompt_ids", "KIVI", "QuantizedKVCache"]
