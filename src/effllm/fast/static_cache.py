"""``StaticKVCache``: preallocated per-layer key/value buffers written in place.

A dynamic cache concatenates every step's keys onto the old ones (a fresh, larger tensor per
layer per token); this one allocates ``capacity`` slots once and writes each step's keys at
their positions with ``index_copy_``. Shapes stay fixed for a whole capacity bucket, which is
what lets the compiled decode step run without recompiling: attention reads all ``capacity``
slots and masks the ones past the current position.

Capacities are bucketed to powers of two (at least ``min_capacity``), so a sequence that grows
past its bucket costs one copy into the next bucket and one compilation per bucket, and the
number of buckets stays logarithmic in the context length.
"""

from __future__ import annotations

import torch


def bucket_capacity(length: int, min_capacity: int = 256) -> int:
    """The smallest power of two >= ``length`` and >= ``min_capacity``."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"bucket_capacity: length must be a positive int, got {length!r}")
    cap = max(int(min_capacity), 1)
    cap = 1 << (cap - 1).bit_length()
    while cap < length:
        cap *= 2
    return cap


class StaticKVCache:
    """Keys and values of ``num_layers`` layers, each ``(batch, kv_heads, capacity, head_dim)``.

    ``length`` counts the positions written so far (the same for every row: the fast path takes
    unpadded batches). ``write`` stores a step's keys at ``positions`` in place.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        for name, value in (("num_layers", num_layers), ("batch", batch), ("kv_heads", kv_heads),
                            ("head_dim", head_dim), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StaticKVCache: {name} must be a positive int, got {value!r}")
        shape = (batch, kv_heads, capacity, head_dim)
        # One tensor per layer (not views of one block): a compiled step sees the same
        # storage offset for every layer, so it never specialises on the layer.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.keys[0].shape)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store ``keys``/``values (batch, kv_heads, S, head_dim)`` at ``positions (S,)`` in place."""
        self.keys[layer].index_copy_(2, positions, keys)
        self.values[layer].index_copy_(2, positions, values)

    def grow(self, capacity: int) -> None:
        """Move the cache into buffers of ``capacity`` slots (only ever larger), keeping the content."""
        if capacity <= self.capacity:
            return
        batch, heads, _, dim = self.shape
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(batch, heads, capacity, dim)
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid part of one layer: ``(keys, values)`` of shape ``(batch, kv_heads, length, head_dim)``."""
        return self.keys[index][:, :, : self.length], self.values[index][:, :, : self.length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def __repr__(self) -> str:
        batch, heads, cap, dim = self.shape
        return (f"StaticKVCache(layers={len(self.keys)}, batch={batch}, kv_heads={heads}, head_dim={dim}, "
                f"capacity={cap}, length={self.length}, dtype={self.keys[0].dtype})")
