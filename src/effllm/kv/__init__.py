"""KV-cache compression: one transformers Cache (``CompressedCache``) that keeps only what a
policy selects, frees the rest, and stores what it keeps as a quantizer's codes.

Built: ``CompressedCache(policy, quantizer=...)`` (uniform or ragged layers, left-padded
batches, beam search), policies ``StreamingLLM``, ``SnapKV``, ``H2O``, ``CAKE`` (per-layer
budgets), ``AdaKV`` (per-head budgets), ``KVzip`` (query-agnostic, scored by replaying the
context), ``Protected`` spans; the quantizers ``KIVI`` and ``NSNQuant`` (any object following
the quantizer protocol of ``kv/quantizers.py`` fits); ``QuantizedKVCache`` (a quantizer, no policy);
``compress(model, policy, quantizer)`` and ``effllm.patch(model, kv=policy | quantizer |
(policy, quantizer))``. Attention over the cache: ``kv/attention.py``.
"""

from .api import KVCompression, compress
from .kvzip import KVzip, repeat_prompt_ids
from .nsnquant import NSNQuant
from .policies import (
    CAKE,
    H2O,
    AdaKV,
    LayerView,
    Policy,
    Protected,
    SnapKV,
    StreamingLLM,
)
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


__all__ = [
    "CAKE",
    "H2O",
    "KIVI",
    "AdaKV",
    "CompressedCache",
    "CompressedLayer",
    "KVCompression",
    "KVzip",
    "LayerView",
    "NSNQuant",
    "Policy",
    "Protected",
    "QuantizedKVCache",
    "SnapKV",
    "StreamingLLM",
    "compress",
    "repeat_prompt_ids",
]
