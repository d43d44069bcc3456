"""``CompressedCache``: a transformers ``Cache`` that stores only the tokens a policy keeps.

Each layer starts *uniform*: ``(B, H_kv, S_kept, D)`` keys and values, every row (batch row,
KV head) keeping the same number of tokens, each KV head its own set. When rows must differ in
length (per-head budgets with ``AdaKV``, a padded batch whose padding is dropped) the layer
turns *ragged*: its keys and values move to a ``RaggedKV`` (``ragged.py``) and are attended
with per-row lengths. Eviction builds new, smaller tensors either way, so the memory of dropped
tokens is released.

Positions stay right because keys are stored after RoPE and ``get_seq_length()`` reports the
tokens *seen*, which transformers uses for the next positions, while ``get_mask_sizes()``
reports what is *stored*. Policies see every layer through the same *slot* view:
``positions``/``scores (B, H_kv, width)``, ``valid_mask()``, ``evict(ranking, keep)``.

The policy decides what to keep from attention scores that effllm's attention function hands
to the cache (``observe_prefill`` / ``observe_decode``); see ``effllm.kv.compress``.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .policies import top_indices
from .ragged import RaggedKV


class CompressedLayer(DynamicLayer):
    """One layer's kept keys/values, the number of tokens seen, and the policy's running scores."""

    page_size: int | None = None  # layout if the layer turns ragged (set by the cache)

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.budget: int | None = None  # tokens to keep per row, fixed by the policy at the first prefill
        self.scores: torch.Tensor | None = None  # (B, H_kv, width) float32, policy-defined
        self.positions: torch.Tensor | None = None  # (B, H_kv, width) int64 original positions, -1: empty slot
        self.pinned: torch.Tensor | None = None  # original positions no policy may evict (Protected)
        self.padding: torch.Tensor | None = None  # (B, S) True at the first prefill's padding, until dropped
        self.ragged: RaggedKV | None = None
        self._buffers: tuple | None = None  # uniform layer: (key buffer, value buffer, keys view)

    # ---- storing ------------------------------------------------------------------------------

    def update(self, key_states, value_states, *args, **kwargs):
        if self.is_initialized and self.stored() and key_states.shape[0] != self.batch_heads()[0]:
            raise ValueError(f"CompressedCache: batch size changed from {self.batch_heads()[0]} to "
                             f"{key_states.shape[0]}")
        batch, kv_heads, new, dim = key_states.shape
        new_pos = torch.arange(self.seen, self.seen + new, device=key_states.device).expand(batch, kv_heads, new)
        if self.ragged is None:
            keys, values = self._append_uniform(key_states, value_states)
            self.positions = new_pos.clone() if self.positions is None else torch.cat([self.positions, new_pos], -1)
            if self.scores is not None:
                self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, kv_heads, new)], dim=-1)
        else:
            # Every row appends at its own length; the attention function reads the ragged store.
            slots = self.ragged.lengths.long().view(batch, kv_heads, 1) + torch.arange(new, device=key_states.device)
            self.ragged.append(key_states.reshape(batch * kv_heads, new, dim),
                               value_states.reshape(batch * kv_heads, new, dim))
            width = self.ragged.width()  # from host lengths: no device sync per layer and step
            self.positions = _put_slots(self.positions, slots, new_pos, -1, width)
            if self.scores is not None:
                self.scores = _put_slots(self.scores, slots, torch.zeros_like(new_pos, dtype=self.scores.dtype), 0.0,
                                         width)
            keys, values = key_states, value_states
        self.seen += new
        return keys, values

    def _append_uniform(self, key_states, value_states):
        """Write new tokens into spare capacity after the stored ones; ``keys``/``values`` are
        views of that buffer. transformers' DynamicLayer concatenates instead, copying the whole
        layer at every decode step. Capacity grows by 1/32 when full (a copy every ~32 steps); the
        first prefill is stored exactly. An eviction gathers into new, exact tensors."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stored, new = self.stored(), key_states.shape[-2]
        buffers = self._buffers
        if buffers is None or buffers[2] is not self.keys or buffers[0].shape[-2] < stored + new:
            capacity = stored + new + (max(1, stored // 32) if stored else 0)
            batch, kv_heads, _, dim = key_states.shape
            kbuf = key_states.new_empty(batch, kv_heads, capacity, dim)
            vbuf = value_states.new_empty(batch, kv_heads, capacity, dim)
            if stored:
                kbuf[:, :, :stored] = self.keys
                vbuf[:, :, :stored] = self.values
            buffers = (kbuf, vbuf, None)
        kbuf, vbuf = buffers[:2]
        kbuf[:, :, stored:stored + new] = key_states
        vbuf[:, :, stored:stored + new] = value_states
        self.keys, self.values = kbuf[:, :, :stored + new], vbuf[:, :, :stored + new]
        self._buffers = (kbuf, vbuf, self.keys)  # the view handed out: replaced keys mean a new buffer
        return self.keys, self.values

    def batch_heads(self) -> tuple[int, int]:
        return tuple(self.positions.shape[:2])

    def stored(self) -> int:
        """Slot width: tokens per row (uniform) or the longest row (ragged)."""
        if self.ragged is not None:
            return self.ragged.width()
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def row_lengths(self) -> torch.Tensor:
        """``(B, H_kv)`` tokens stored per row."""
        if self.ragged is not None:
            return self.ragged.lengths_host.view(self.batch_heads())
        return torch.full(self.batch_heads(), self.stored(), dtype=torch.int64)

    def kv_bytes(self) -> int:
        """Bytes of the stored keys and values (a ragged layer: its whole allocation)."""
        if self.ragged is not None:
            return self.ragged.nbytes()
        if not self.stored():
            return 0
        # the allocation behind the views, spare capacity included
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def full_bytes(self) -> int:
        """Bytes an uncompressed cache would hold for the tokens seen."""
        batch, kv_heads = self.batch_heads()
        sample = self.keys if self.ragged is None else self.ragged.k
        return 2 * batch * kv_heads * self.seen * sample.shape[-1] * sample.element_size()

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The query's own keys are appended before attention: stored + new. (A ragged layer's
        # attention ignores transformers' mask; it is only sized consistently.)
        return self.stored() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CompressedCache layers cannot be cropped (tokens were already evicted)")

    def reset(self) -> None:
        """Forget everything, budget and scores included, so the cache can take a new prompt."""
        super().reset()
        self.__init__()

    # ---- batch rows: beam search and batch selection ---------------------------------------------

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch row b takes the state of row ``beam_idx[b]``."""
        self._take_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._take_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.positions is not None:
            self._take_rows(torch.arange(self.batch_heads()[0]).repeat_interleave(repeats))

    def _take_rows(self, index) -> None:
        """Rebuild every per-row tensor from rows ``index`` of the old batch: keys and values
        (or the ragged store's rows), positions, scores and padding. transformers' own layer
        method would move keys and values only and leave the rest describing other rows."""
        if self.positions is None:
            return
        device = self.positions.device
        index = torch.arange(self.positions.shape[0], device=device)[torch.as_tensor(index, device=device)]
        if self.ragged is not None:
            kv_heads = self.positions.shape[1]
            self.ragged = self.ragged.select_rows((index[:, None] * kv_heads + torch.arange(kv_heads, device=device))
                                                  .flatten())
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self._buffers = None  # new tensors: the next append allocates its spare capacity again
        self.positions = self.positions.index_select(0, index)
        if self.scores is not None:
            self.scores = self.scores.index_select(0, index)
        if self.padding is not None:
            self.padding = self.padding.index_select(0, index)

    # ---- the slot view policies use ----------------------------------------------------------

    def valid_mask(self) -> torch.Tensor | None:
        """``(B, H_kv, width)`` True at slots holding a real token; None when all do."""
        if self.ragged is not None:
            return self.positions >= 0
        if self.padding is not None:
            return ~self.padding[:, None, :].expand(self.positions.shape)
        return None

    def pinned_mask(self) -> torch.Tensor | None:
        """``(B, H_kv, width)`` True where the stored token is pinned; None when nothing is."""
        if self.pinned is None:
            return None
        return torch.isin(self.positions, self.pinned)

    def recent_mask(self, count: int) -> torch.Tensor:
        """True at the ``count`` most recent tokens of every row."""
        return self.positions >= max(0, self.seen - count)

    def first_mask(self, count: int) -> torch.Tensor:
        """True at the first ``count`` real tokens of every row (attention sinks)."""
        valid = self.valid_mask()
        if valid is None:
            return (torch.arange(self.stored(), device=self.positions.device) < count).expand(self.positions.shape)
        return valid & (valid.cumsum(dim=-1) <= count)

    # ---- evicting -----------------------------------------------------------------------------

    def evict(self, ranking: torch.Tensor, keep: int, *, share_heads: float | None = None) -> None:
        """Keep the ``keep`` best-ranked tokens of every row (``ranking (B, H_kv, width)``).

        Pinned tokens rank first, empty slots and padding never stay. With
        ``share_heads=alpha`` the heads of a batch row share ``keep * H_kv`` tokens instead
        (AdaKV): each head gets its best ``ceil(alpha * keep)``, the rest go to the best
        remaining tokens of any head.
        """
        ranked = ranking.float()
        pinned = self.pinned_mask()
        if pinned is not None:
            # Pinned tokens outrank everything, the policy's own protected ones included.
            ranked = torch.where(pinned, torch.full_like(ranked, float("inf")),
                                 ranked.clamp(max=torch.finfo(ranked.dtype).max))
        valid = self.valid_mask()
        if valid is not None:
            ranked = ranked.masked_fill(~valid, float("-inf"))
        width = ranked.shape[-1]
        if share_heads is None and valid is None:
            if keep < width:
                self.keep_index(top_indices(ranked, keep).sort(dim=-1).values)  # token order preserved
            return
        mask = _top_mask(ranked, min(keep, width)) if share_heads is None else _shared_top_mask(ranked, keep, share_heads)
        if valid is not None:
            mask &= valid
            if torch.equal(mask, valid) and self.ragged is not None:
                return
        self.keep_mask(mask)

    def keep_index(self, index: torch.Tensor) -> None:
        """Uniform layer: keep tokens ``index (B, H_kv, n)`` (sorted per row), freeing the rest."""
        gather = index.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        # torch.gather allocates new tensors: the old, larger ones are freed when dropped here.
        self.keys = torch.gather(self.keys, 2, gather)
        self.values = torch.gather(self.values, 2, gather)
        self.positions = torch.gather(self.positions, 2, index)
        if self.scores is not None:
            self.scores = torch.gather(self.scores, 2, index)

    def keep_mask(self, mask: torch.Tensor) -> None:
        """Keep the slots where ``mask (B, H_kv, width)`` is True; rows may differ in length, so
        the layer becomes ragged (unless every row keeps the same count and it is uniform)."""
        counts = mask.sum(dim=-1)
        self.padding = None
        if self.ragged is None and bool((counts == counts.flatten()[0]).all()):
            index = mask.nonzero()[:, 2].view(*mask.shape[:2], -1)  # row-major: sorted per row
            self.keep_index(index)
            return
        batch, kv_heads = mask.shape[:2]
        if self.ragged is None:
            keys, values = self.keys, self.values
        else:
            keys, values = (t.view(batch, kv_heads, *t.shape[1:]) for t in self.ragged.padded())
        dim = keys.shape[-1]
        page_size = self.page_size if self.page_size != "auto" else _auto_page_size(counts, keys.is_cuda)
        self.ragged = RaggedKV.from_padded(keys.reshape(batch * kv_heads, -1, dim),
                                           values.reshape(batch * kv_heads, -1, dim),
                                           mask.reshape(batch * kv_heads, -1), page_size=page_size)
        # A placeholder keeps transformers' checks on .keys working; the tokens live in self.ragged.
        self.keys = keys.new_empty(batch, kv_heads, 0, dim)
        self.values = values.new_empty(batch, kv_heads, 0, dim)
        self.positions = _compact(self.positions, mask, -1)
        if self.scores is not None:
            self.scores = _compact(self.scores, mask, 0.0)


def _auto_page_size(counts: torch.Tensor, cuda: bool) -> int | None:
    """``page_size="auto"``: 16-token pages on CUDA (the Triton kernel reads pages in place). On
    CPU the torch path gathers pages every step, so rows padded to the longest (one tensor, a
    strided read) are used while that padding stays within 1/8 of the kept tokens; else
    64-token pages, so the memory follows the kept tokens."""
    if cuda:
        return 16
    kept = int(counts.sum())
    padding = int(counts.max()) * counts.numel() - kept
    return None if padding * 8 <= kept else 64


def _top_mask(ranked: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros_like(ranked, dtype=torch.bool)
    return mask.scatter_(-1, top_indices(ranked, keep), True)


def _shared_top_mask(ranked: torch.Tensor, keep: int, alpha: float) -> torch.Tensor:
    """AdaKV selection: ``keep * H`` tokens per batch row across its heads, ``ceil(alpha * keep)``
    guaranteed to each head."""
    batch, heads, width = ranked.shape
    floor = min(width, keep, math.ceil(alpha * keep))
    mask = _top_mask(ranked, floor) if floor else torch.zeros_like(ranked, dtype=torch.bool)
    rest = min(heads * keep, heads * width) - heads * floor
    if rest > 0:
        flat = ranked.masked_fill(mask, float("-inf")).reshape(batch, heads * width)
        extra = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top_indices(flat, rest), True)
        mask |= extra.view(batch, heads, width)
    return mask


def _compact(tensor: torch.Tensor, mask: torch.Tensor, fill) -> torch.Tensor:
    """Move the masked slots of every row to its front, in order: ``(B, H, max kept)``."""
    slot = mask.cumsum(dim=-1) - 1
    out = tensor.new_full((*tensor.shape[:2], int(mask.sum(dim=-1).max())), fill)
    b, h, s = mask.nonzero(as_tuple=True)
    out[b, h, slot[b, h, s]] = tensor[b, h, s]
    return out


def _put_slots(tensor: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, fill, width: int) -> torch.Tensor:
    """Write ``values (B, H, n)`` at ``slots (B, H, n)``, widening ``tensor`` to ``width`` with ``fill``."""
    if width > tensor.shape[-1]:
        pad = tensor.new_full((*tensor.shape[:2], width - tensor.shape[-1]), fill)
        tensor = torch.cat([tensor, pad], dim=-1)
    return tensor.scatter(-1, slots, values.to(tensor.dtype))


class CompressedCache(Cache):
    """A KV cache compressed by ``policy`` (``effllm.kv`` policies).

    Use through ``effllm.kv.compress(model, policy)``, which routes attention through effllm
    so the cache receives the scores it needs; ``compress(...).new_cache()`` makes one for manual
    forward loops; one made directly is wired when passed to ``generate()`` of a patched model, and
    raises at its first update anywhere else (it could not compress). Batches may be left-padded:
    padding is dropped at the first prefill.

    ``page_size``: layout of layers whose rows differ in length: an int pages them (memory
    follows the kept tokens, within one page per row); ``None`` keeps one tensor per layer,
    rows padded to the longest (the fastest CPU decode, but the padding costs memory: AdaKV
    holds 0.37 of the full cache instead of 0.27 at 75% removed on SmolLM2,
    ``benchmarks/kv_page_size.py``); ``"auto"`` pages by 16 tokens on CUDA and, on CPU, picks
    per layer: one tensor while its padding stays within 1/8 of the kept tokens, else
    64-token pages (the CPU torch path gathers pages every step; larger pages gather faster).
    """

    def __init__(self, policy, num_layers: int | None = None, page_size: int | str | None = "auto"):
        if page_size is not None and page_size != "auto" and (not isinstance(page_size, int) or page_size < 1):
            raise ValueError(f"CompressedCache: page_size must be None, 'auto' or an int >= 1, got {page_size!r}")
        super().__init__(layer_class_to_replicate=CompressedLayer)
        self.policy = policy
        self.num_layers = num_layers  # needed by policies that share a budget across layers (CAKE)
        self.page_size = page_size
        self.policy_state: dict = {}  # cross-layer state of such policies
        self.owner = None  # the compression context that routes scores to this cache
        self.replaying = False  # True while KVzip replays the context: new keys are read, not stored
        # During a replay of a left-padded batch: (B, stored + replayed) False at padding, the
        # same for every layer (each holds the padded prefill until the replay's eviction).
        self.replay_valid: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.replaying:
            # The replay attends to the cache and to itself, and leaves the cache as it was.
            layer = self.layers[layer_idx]
            self.owner.pending = (self, layer_idx)
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
        if self.owner is None:
            # Only a patched model's attention hands the policy its scores: unwired, this cache
            # would keep every token while claiming to compress.
            raise ValueError(f"CompressedCache({type(self.policy).__name__}): this cache is not wired to a model "
                             f"patched with kv=..., so nothing would be compressed; pass it to generate() of a "
                             f"patched model, or make it with handle.kv.new_cache() (effllm.patch or "
                             f"effllm.kv.compress)")
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.layers[layer_idx].page_size = self.page_size
        self.owner.pending = (self, layer_idx)
        return keys, values

    # ---- called by effllm's attention function ---------------------------------------------

    def observe_prefill(self, layer_idx: int, query: torch.Tensor, scale: float) -> None:
        """After a multi-token step on a uniform layer: let the policy score and evict (queries
        after RoPE); then drop what is left of the padding."""
        layer = self.layers[layer_idx]
        self.policy.after_prefill(layer, query, scale, cache=self, layer_idx=layer_idx)
        # A policy that replays the context (KVzip) needs the padded layout until its replay;
        # its eviction drops the padding.
        if layer.padding is not None and not getattr(self.policy, "replays_context", False):
            layer.keep_mask(layer.valid_mask())

    def observe_decode(self, layer_idx: int, stats: torch.Tensor | None) -> None:
        """After a step that followed compression: ``stats (B, H_kv, width)`` is the attention
        mass each stored key received from the step's queries (None if the policy needs none)."""
        self.policy.after_decode(self.layers[layer_idx], stats, cache=self, layer_idx=layer_idx)

    def observe_replay(self, layer_idx: int, best: torch.Tensor) -> None:
        """During a KVzip replay: ``best (B, H_kv, stored)``, the largest weight each stored key
        got from this chunk; a layer's score is the maximum over chunks."""
        layer = self.layers[layer_idx]
        layer.scores = best if layer.scores is None else torch.maximum(layer.scores, best)

    def reset(self) -> None:
        super().reset()
        self.policy_state = {}

    # ---- reporting -----------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes this cache holds: kept keys and values plus positions and scores."""
        total = 0
        for layer in self.layers:
            if layer.stored():
                total += layer.kv_bytes()
                total += sum(t.numel() * t.element_size() for t in (layer.positions, layer.scores) if t is not None)
        return total

    def stats(self) -> dict:
        """Kept tokens per layer (and per batch row and head), tokens seen, bytes saved."""
        layers = [layer for layer in self.layers if layer.stored()]
        stored = sum(layer.kv_bytes() for layer in layers)
        full = sum(layer.full_bytes() for layer in layers)
        per_head = [layer.row_lengths().tolist() for layer in layers]
        return {"tokens_seen": layers[0].seen if layers else 0,
                "kept_per_layer": [round(sum(map(sum, rows)) / sum(map(len, rows))) for rows in per_head],
                "kept_per_head": per_head, "kv_bytes": stored, "kv_bytes_full": full, "bytes_saved": full - stored,
                "bookkeeping_bytes": self.nbytes() - stored}
