"""``CompressedCache``: a transformers ``Cache`` that stores only the tokens a policy keeps.

Each layer keeps ``(B, H_kv, S_kept, D)`` keys and values, where every KV head may keep a
different set of tokens (same count per layer). Eviction builds new, smaller tensors, so the
memory of dropped tokens is released. Positions stay right because keys are stored after RoPE
and ``get_seq_length()`` reports the tokens *seen*, which transformers uses for the next
positions, while ``get_mask_sizes()`` reports what is *stored*.

The policy decides what to keep from attention scores that effllm's attention function hands
to the cache (``observe_prefill`` / ``observe_decode``); see ``effllm.kv.compress``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class CompressedLayer(DynamicLayer):
    """One layer's kept keys/values, the number of tokens seen, and the policy's running scores."""

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.budget: int | None = None  # tokens to keep, fixed by the policy at the first prefill
        self.scores: torch.Tensor | None = None  # (B, H_kv, S_kept) float32, policy-defined
        self.positions: torch.Tensor | None = None  # (B, H_kv, S_kept) int64 original positions
        self.pinned: torch.Tensor | None = None  # original positions no policy may evict (Protected)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.is_initialized and self.keys.numel() and key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(f"CompressedCache: batch size changed from {self.keys.shape[0]} to {key_states.shape[0]}")
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        batch, kv_heads, new = key_states.shape[0], key_states.shape[1], key_states.shape[2]
        new_pos = torch.arange(self.seen, self.seen + new, device=key_states.device).expand(batch, kv_heads, new)
        self.positions = new_pos.clone() if self.positions is None else torch.cat([self.positions, new_pos], dim=-1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, kv_heads, new)], dim=-1)
        self.seen += new
        return keys, values

    def stored(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def token_bytes(self) -> int:
        """Bytes of keys and values per stored token (all batch rows and KV heads)."""
        batch, kv_heads, _, dim = self.keys.shape
        return 2 * batch * kv_heads * dim * self.keys.element_size()

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The query's own keys are appended before attention: stored + new.
        return self.stored() + query_length, 0

    def pinned_mask(self) -> torch.Tensor | None:
        """``(B, H_kv, S_kept)`` True where the stored token is pinned; None when nothing is."""
        if self.pinned is None:
            return None
        return torch.isin(self.positions, self.pinned)

    def keep(self, index: torch.Tensor) -> None:
        """Keep tokens ``index (B, H_kv, n)`` (sorted per head) and drop the rest, freeing memory."""
        gather = index.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        # torch.gather allocates new tensors: the old, larger ones are freed when dropped here.
        self.keys = torch.gather(self.keys, 2, gather)
        self.values = torch.gather(self.values, 2, gather)
        self.positions = torch.gather(self.positions, 2, index)
        if self.scores is not None:
            self.scores = torch.gather(self.scores, 2, index)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CompressedCache layers cannot be cropped (tokens were already evicted)")


class CompressedCache(Cache):
    """A KV cache compressed by ``policy`` (``effllm.kv`` policies).

    Use through ``effllm.kv.compress(model, policy)``, which routes attention through effllm
    so the cache receives the scores it needs; ``compress(...).new_cache()`` makes one for manual
    forward loops. Supports batch size 1 and batches without padding.
    """

    def __init__(self, policy, num_layers: int | None = None):
        super().__init__(layer_class_to_replicate=CompressedLayer)
        self.policy = policy
        self.num_layers = num_layers  # needed by policies that share a budget across layers (CAKE)
        self.policy_state: dict = {}  # cross-layer state of such policies
        self.owner = None  # the compression context that routes scores to this cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.owner is not None:
            self.owner.pending = (self, layer_idx)
        return keys, values

    # ---- called by effllm's attention function ---------------------------------------------

    def observe_prefill(self, layer_idx: int, query: torch.Tensor, scale: float) -> None:
        """After a multi-token step: let the policy score and evict (queries after RoPE)."""
        self.policy.after_prefill(self.layers[layer_idx], query, scale, cache=self, layer_idx=layer_idx)

    def observe_decode(self, layer_idx: int, stats: torch.Tensor | None) -> None:
        """After a one-token step: ``stats (B, H_kv, S)`` is the attention mass per stored key."""
        self.policy.after_decode(self.layers[layer_idx], stats, cache=self, layer_idx=layer_idx)

    # ---- reporting -----------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes this cache holds: kept keys and values plus positions and scores."""
        total = 0
        for layer in self.layers:
            if layer.stored():
                total += layer.stored() * layer.token_bytes()
                total += sum(t.numel() * t.element_size() for t in (layer.positions, layer.scores) if t is not None)
        return total

    def stats(self) -> dict:
        """Kept tokens per layer, tokens seen, and bytes saved against an uncompressed cache."""
        layers = [layer for layer in self.layers if layer.stored()]
        seen = layers[0].seen if layers else 0
        stored = sum(layer.stored() * layer.token_bytes() for layer in layers)
        full = sum(seen * layer.token_bytes() for layer in layers)
        return {"tokens_seen": seen, "kept_per_layer": [layer.stored() for layer in self.layers], "kv_bytes": stored,
                "kv_bytes_full": full, "bytes_saved": full - stored, "bookkeeping_bytes": self.nbytes() - stored}
