"""``QuantizedKVCache``: a ``transformers`` Cache that stores keys and values as KIVI codes.

Each layer keeps a ``KIVIStore`` (``kv/quantizers.py``): the newest tokens in full precision,
older ones as 2- or 4-bit codes. Attention reads the layer dequantized, into two read buffers
all layers share: memory held between steps is the codes plus one layer's full-precision keys
and values, but every step dequantizes the whole cache (time, not memory; a kernel reading the
codes is not yet written).

Not yet: composing with eviction policies (``CompressedCache(..., quantizer=...)``).
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .api import check_full_attention
from .quantizers import KIVI, KIVIStore


class ReadBuffers:
    """The keys and values a layer returns, dequantized, in buffers shared by all layers of a
    cache: layers attend one after another, so one layer's copy is dead once the next layer
    reads. Fresh multi-MiB tensors per layer and step would be page-faulted in every time.
    (So the tensors ``update`` returns are valid until the next layer's ``update``.)"""

    def __init__(self):
        self.keys = self.values = None

    def take(self, like: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, H, tokens, D)`` views for tensors like ``like``, growing the buffers by 1/16."""
        batch, heads, _, dim = like.shape
        if (self.keys is None or self.keys.shape[2] < tokens or self.keys.dtype != like.dtype
                or self.keys.device != like.device or (self.keys.shape[:2], self.keys.shape[3]) != ((batch, heads), dim)):
            capacity = tokens + tokens // 16
            self.keys = like.new_empty(batch, heads, capacity, dim)
            self.values = like.new_empty(batch, heads, capacity, dim)
        return self.keys[:, :, :tokens], self.values[:, :, :tokens]


class QuantizedKVLayer(DynamicLayer):
    """One layer's KIVI store; ``keys``/``values`` stay empty ``(B, H, 0, D)`` placeholders."""

    is_croppable = False

    def __init__(self, quantizer: KIVI, buffers: ReadBuffers | None = None):
        super().__init__()
        self.quantizer = quantizer
        self.buffers = buffers if buffers is not None else ReadBuffers()
        self.store: KIVIStore | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        self.values = self.keys

    def update(self, key_states, value_states, *args, **kwargs):
        """Store the new tokens; return the earlier ones dequantized and the new ones as given
        (a step attends to its own tokens in full precision, as in KIVI)."""
        if not self.is_initialized:
            store = self.quantizer.new_store()
            store.append(key_states, value_states)  # validates before the layer changes
            self.lazy_initialization(key_states, value_states)
            self.store = store
            return key_states, value_states
        past = len(self.store)
        shape = tuple(self.keys.shape[:2])  # the placeholder keeps the first update's (B, H)
        if tuple(key_states.shape[:2]) != shape:
            raise ValueError(f"QuantizedKVCache: batch size or KV heads changed from {shape} to "
                             f"{tuple(key_states.shape[:2])}; use a new cache for another batch")
        keys, values = self.buffers.take(key_states, past + key_states.shape[-2])
        self.store.keys(out=keys[:, :, :past])
        self.store.values(out=values[:, :, :past])
        keys[:, :, past:] = key_states
        values[:, :, past:] = value_states
        self.store.append(key_states, value_states)
        return keys, values

    def get_seq_length(self) -> int:
        return len(self.store) if self.store is not None else 0

    def reset(self) -> None:
        super().reset()
        self.store = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is not None:
            self.store.select_batch(torch.as_tensor(indices, device=self.keys.device))
            self.keys = self.values = self.keys[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            self.batch_select_indices(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("QuantizedKVCache cannot be cropped (tokens inside a quantized group)")


class QuantizedKVCache(Cache):
    """KV cache of KIVI codes; pass it to ``model.generate(..., past_key_values=cache)`` or a
    forward loop. ``config``: the model's config, to refuse models with sliding-window or
    non-attention layers up front (their layers need other caches)."""

    def __init__(self, quantizer: KIVI, config=None):
        if not isinstance(quantizer, KIVI):
            raise ValueError(f"QuantizedKVCache: quantizer must be effllm.kv.KIVI, got {quantizer!r}")
        if config is not None:
            check_full_attention(config)
        super().__init__(layer_class_to_replicate=functools.partial(QuantizedKVLayer, quantizer, ReadBuffers()))
        self.quantizer = quantizer

    def nbytes(self) -> int:
        """Bytes held between steps: codes, scales and minima, the full-precision residuals, and
        the read buffers (one layer's keys and values, shared by all layers)."""
        stores = sum(layer.store.nbytes() for layer in self.layers if layer.store is not None)
        buffers = self.layers[0].buffers if self.layers else None
        if buffers is None or buffers.keys is None:
            return stores
        return stores + 2 * buffers.keys.numel() * buffers.keys.element_size()

    def stats(self) -> dict:
        layers = [layer for layer in self.layers if layer.store is not None]
        batch, heads, _, dim = layers[0].keys.shape if layers else (0, 0, 0, 0)
        full = sum(2 * batch * heads * dim * len(layer.store) * layer.keys.element_size() for layer in layers)
        held = self.nbytes()
        return {"tokens_seen": self.get_seq_length(), "kv_bytes": held, "kv_bytes_full": full, "bytes_saved": full - held,
                "full_precision_tokens": [layer.store.full_precision_tokens() for layer in layers]}
