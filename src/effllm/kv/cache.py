"""``CompressedCache``: a transformers ``Cache`` that stores only the tokens a policy keeps.

Each layer starts *uniform*: ``(B, H_kv, S_kept, D)`` keys and values, every row (batch row,
KV head) keeping the same number of tokens, each KV head its own set. When rows must differ in
length (per-head budgets with ``AdaKV``, a padded batch whose padding is dropped) the layer
turns *ragged*: its keys and values move to a ``RaggedKV`` (``ragged.py``) and are attended
with per-row lengths; with a quantizer, each row gets a quantized store of its own
(``QuantizedRows``, ``quantized_rows.py``). Eviction builds new, smaller tensors either way, so
the memory of dropped tokens is released.

Positions stay right because keys are stored after RoPE and ``get_seq_length()`` reports the
tokens *seen*, which transformers uses for the next positions, while ``get_mask_sizes()``
reports what is *stored*. Policies see every layer through the same *slot* view:
``positions``/``scores (B, H_kv, width)``, ``valid_mask()``, ``evict(ranking, keep)``.

The policy decides what to keep from attention scores that effllm's attention function hands
to the cache (``observe_prefill`` / ``observe_decode``); see ``effllm.kv.compress``.
"""

from __future__ import annotations

import copy
import math

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .exact_keys import head_entropy
from .quantized_rows import QuantizedRows
from .ragged import RaggedKV
from .ranking import per_row, top_indices, top_mask


class CompressedLayer(DynamicLayer):
    """One layer's kept keys/values, the number of tokens seen, and the policy's running scores.

    With a quantizer the layer's tokens live in ``store`` (the quantizer's ``QuantizedStore``)
    and ``keys``/``values`` hold only *staged* tokens: a multi-token step's keys stay in full
    precision until the policy has evicted from them, and enter the store at the layer's next
    update (evict, then quantize: the prompt's dropped tokens are never quantized). Slots are
    the store's tokens, then the staged ones."""

    page_size: int | None = None  # layout if the layer turns ragged (set by the cache)
    # Set by the cache for its layers:
    quantizer = None  # a Quantizer, or None (full precision)
    stage_prefill = False  # a policy may evict a multi-token step's tokens: stage them
    tracks_slots = True  # positions (and scores) per slot: only a policy needs them
    read_buffers = None  # ReadBuffers shared by the cache's layers (with a quantizer)
    reads_codes = False  # the reader attends over the codes (store.attend): return no dequantized copy

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.slots_dropped = False  # the policy is done evicting: positions and scores are gone (forget_slots)
        self.budget: int | None = None  # tokens to keep per row, fixed by the policy at the first prefill
        # each batch row's own budget where they differ (a fractional budget on a left-padded
        # batch: a fraction of each row's prompt); ``budget`` is then their largest
        self.row_budget: list[int] | None = None
        self.scores: torch.Tensor | None = None  # (B, H_kv, width) float32, policy-defined
        self.positions: torch.Tensor | None = None  # (B, H_kv, width) int32 original positions, -1: empty slot
        self.pinned: torch.Tensor | None = None  # original positions no policy may evict (Protected)
        self.padding: torch.Tensor | None = None  # (B, S) True at the first prefill's padding, until dropped
        self.ragged: RaggedKV | QuantizedRows | None = None  # rows of different lengths (QuantizedRows: quantized)
        self.store = None  # the quantizer's store of this layer's tokens (with a quantizer, while uniform)
        # (B, H_kv, staged) the policy's ranking of the staged tokens it kept, for a quantizer
        # that protects the best-ranked (``takes_priority``); handed over at ``settle``
        self.staged_priority: torch.Tensor | None = None
        # (B, H_kv) float32: attention entropy of the prefill's last queries, for a quantizer that
        # keeps exact keys on the sharpest heads (``key_heads``); read by the cache's ``settle``
        self.sharpness: torch.Tensor | None = None
        self._spare: dict = {}  # uniform layer: name -> (buffer with spare capacity, the view handed out)

    # ---- storing ------------------------------------------------------------------------------

    def update(self, key_states, value_states, *args, **kwargs):
        self._check_new(key_states, value_states)
        batch, kv_heads, new, dim = key_states.shape
        # int32: positions are bookkeeping held per kept token and head (half an int64's bytes,
        # which next to 2-bit codes was a fifth of what a token costs)
        new_pos = torch.arange(self.seen, self.seen + new, device=key_states.device,
                               dtype=torch.int32).expand(batch, kv_heads, new)
        if self.ragged is None and self.quantizer is not None:
            keys, values = self._update_quantized(key_states, value_states)
            if self._keeps_slots():
                self._append_slots(new_pos)
        elif self.ragged is None:
            keys, values = self._append_uniform(key_states, value_states)
            if self._keeps_slots():
                self._append_slots(new_pos)
        else:
            # Every row appends at its own length; the attention function reads the ragged store.
            slots = self.ragged.lengths.long().view(batch, kv_heads, 1) + torch.arange(new, device=key_states.device)
            self.ragged.append(key_states.reshape(batch * kv_heads, new, dim),
                               value_states.reshape(batch * kv_heads, new, dim))
            width = self.ragged.width()  # from host lengths: no device sync per layer and step
            if self._keeps_slots():
                self.positions = _put_slots(self.positions, slots, new_pos, -1, width)
            if self.scores is not None:
                self.scores = _put_slots(self.scores, slots, torch.zeros_like(new_pos, dtype=self.scores.dtype), 0.0,
                                         width)
            keys, values = key_states, value_states
        self.seen += new
        return keys, values

    def _check_new(self, key_states, value_states) -> None:
        """Refuse new tokens that do not fit what the layer holds, before anything changes."""
        if (key_states.dim() != 4 or key_states.shape != value_states.shape or key_states.dtype != value_states.dtype
                or key_states.device != value_states.device):
            raise ValueError(f"CompressedCache.update: keys and values must be (B, H_kv, n, D) of one shape, dtype and "
                             f"device, got {tuple(key_states.shape)} {key_states.dtype} on {key_states.device} and "
                             f"{tuple(value_states.shape)} {value_states.dtype} on {value_states.device}")
        if not (self.is_initialized and self.stored()):
            return
        batch, heads = self.batch_heads()
        held = self.keys  # a ragged layer keeps an empty placeholder of the right dtype, device and head dim
        changed = [what for what, now, before in (
            ("batch size", key_states.shape[0], batch), ("KV heads", key_states.shape[1], heads),
            ("head dim", key_states.shape[-1], held.shape[-1]), ("dtype", key_states.dtype, held.dtype),
            ("device", key_states.device, held.device)) if now != before]
        if changed:
            raise ValueError(f"CompressedCache.update: {', '.join(changed)} changed: expected (B, H_kv, n, D) = "
                             f"({batch}, {heads}, n, {held.shape[-1]}) of {held.dtype} on {held.device}, got "
                             f"{tuple(key_states.shape)} of {key_states.dtype} on {key_states.device}")

    def _append_slots(self, new_pos: torch.Tensor) -> None:
        """Positions (and zero scores) of new tokens, written in place like the keys."""
        self.positions = self._append_in_place("positions", self.positions, new_pos)
        if self.scores is not None:
            zeros = self.scores.new_zeros(new_pos.shape)
            self.scores = self._append_in_place("scores", self.scores, zeros)

    def _append_in_place(self, name: str, current: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """``current`` with ``new`` appended along dim 2, written into spare capacity after it.
        transformers' DynamicLayer concatenates instead, copying the whole layer at every decode
        step. Capacity grows by 1/32 when full (a copy every ~32 steps); the first prefill is
        stored exactly. A tensor replaced since (an eviction's gather) starts a new buffer."""
        if current is None:
            current = new.new_empty(*new.shape[:2], 0, *new.shape[3:])
        stored, count = current.shape[2], new.shape[2]
        buffer, view = self._spare.get(name, (None, None))
        if buffer is None or view is not current or buffer.shape[2] < stored + count:
            capacity = stored + count + (max(1, stored // 32) if stored else 0)
            buffer = new.new_empty(*new.shape[:2], capacity, *new.shape[3:])
            if stored:
                buffer[:, :, :stored] = current
        buffer[:, :, stored:stored + count] = new
        view = buffer[:, :, :stored + count]
        self._spare[name] = (buffer, view)
        return view

    def _append_uniform(self, key_states, value_states):
        """Append to the full-precision keys/values in place; return them (views of the buffer)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # transformers' initial placeholder is 1-D: start the buffers afresh
        keys, values = (self.keys, self.values) if self.keys.dim() == 4 else (None, None)
        self.keys = self._append_in_place("keys", keys, key_states)
        self.values = self._append_in_place("values", values, value_states)
        return self.keys, self.values

    # ---- storing with a quantizer ---------------------------------------------------------------

    def _update_quantized(self, key_states, value_states):
        """Store new tokens with a quantizer. Returns the keys/values to attend: every earlier
        token dequantized (into the cache's read buffers) and the step's own tokens as given, or
        only the step's own tokens when the reader attends over the codes (``reads_codes``)."""
        if not self.is_initialized:
            self.quantizer.validate(key_states.shape[-1], key_states.dtype)  # before anything is stored
            store = self.quantizer.new_store()
            self.lazy_initialization(key_states, value_states)
            self.keys = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
            self.values = self.keys
            self.store = store
        self.settle()
        new = key_states.shape[-2]
        if self.stage_prefill and new > 1:
            past = len(self.store)
            keys, values = self._append_uniform(key_states, value_states)  # staged until the policy evicted
            if not past:
                return keys, values
            full_k, full_v = self.read_buffers.take(key_states, past + new)
            self.store.keys(out=full_k[:, :, :past])
            self.store.values(out=full_v[:, :, :past])
            full_k[:, :, past:], full_v[:, :, past:] = keys, values
            return full_k, full_v
        past = len(self.store)
        if self.reads_codes and new == 1:
            # read over the codes: the token is coded at the next step, so this one reads it exactly
            self.store.append(key_states, value_states, defer=True)
            return key_states, value_states
        if not past:  # nothing earlier to dequantize
            self.store.append(key_states, value_states)
            return key_states, value_states
        full_k, full_v = self.read_buffers.take(key_states, past + new)
        self.store.keys(out=full_k[:, :, :past])
        self.store.values(out=full_v[:, :, :past])
        full_k[:, :, past:], full_v[:, :, past:] = key_states, value_states
        self.store.append(key_states, value_states)  # validates before the store changes
        return full_k, full_v

    def settle(self) -> None:
        """Move staged full-precision tokens into the store (after the policy evicted)."""
        if self.store is not None and self.keys is not None and self.keys.shape[-2]:
            priority, self.staged_priority = self.staged_priority, None
            unranked = self.keys.shape[-2] - (0 if priority is None else priority.shape[-1])
            if priority is not None and unranked >= 0:
                if unranked:  # staged after the eviction ranked them
                    priority = torch.cat([priority, priority.new_full((*priority.shape[:2], unranked), float("-inf"))], -1)
                self.store.append(self.keys, self.values, priority=priority)
            else:
                self.store.append(self.keys, self.values)
            self.keys = self.keys.new_empty(*self.keys.shape[:2], 0, self.keys.shape[-1])
            self.values = self.keys
            self._spare.pop("keys", None)
            self._spare.pop("values", None)

    def _keeps_slots(self) -> bool:
        return self.tracks_slots and not self.slots_dropped

    def forget_slots(self) -> None:
        """The policy will never evict from this layer again: drop the per-slot positions and
        scores (4 bytes a kept token and head each, padded to the longest row on a ragged
        layer) and stop tracking them for new tokens (until ``reset``)."""
        self.slots_dropped = True
        self.positions = self.scores = None
        self._spare.pop("positions", None)
        self._spare.pop("scores", None)

    def choose_exact_keys(self, rows: torch.Tensor) -> None:
        """The quantizer keeps exact keys on rows ``rows (B, H_kv)`` bool only (``key_heads``)."""
        if isinstance(self.ragged, QuantizedRows):
            self.ragged.choose_exact_keys(rows.flatten())
        elif self.store is not None:
            self.store.choose_exact_keys(rows)

    def all_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token's keys and values ``(B, H_kv, stored, D)``, dequantized with a
        quantizer (fresh tensors), in slot order; a uniform layer only."""
        if self.store is None or not len(self.store):
            return self.keys, self.values
        keys, values = self.store.keys(), self.store.values()
        if self.keys.shape[-2]:
            keys, values = torch.cat([keys, self.keys], dim=-2), torch.cat([values, self.values], dim=-2)
        return keys, values

    def full_precision_tokens(self) -> tuple[int, int]:
        """Newest keys and values held in full precision (all of them without a quantizer)."""
        if isinstance(self.ragged, QuantizedRows):
            return self.ragged.full_precision_tokens()
        staged = self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0
        if self.store is None:
            return (self.stored(), self.stored())
        keys, values = self.store.full_precision_tokens()
        return keys + staged, values + staged

    def batch_heads(self) -> tuple[int, int]:
        return tuple((self.positions if self.positions is not None else self.keys).shape[:2])

    def stored(self) -> int:
        """Slot width: tokens per row (uniform) or the longest row (ragged)."""
        if self.ragged is not None:
            return self.ragged.width()
        staged = 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]
        return staged if self.store is None else len(self.store) + staged

    def row_lengths(self) -> torch.Tensor:
        """``(B, H_kv)`` tokens stored per row."""
        if self.ragged is not None:
            return self.ragged.lengths_host.view(self.batch_heads())
        return torch.full(self.batch_heads(), self.stored(), dtype=torch.int64)

    def kv_bytes(self) -> int:
        """Bytes of the stored keys and values (a ragged layer: its whole allocation)."""
        if self.ragged is not None:
            return self.ragged.nbytes()
        total = 0 if self.store is None else self.store.nbytes()
        if self.is_initialized and self.keys.numel():
            # the allocation behind the views, spare capacity included
            total += self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()
        return total

    def full_bytes(self) -> int:
        """Bytes an uncompressed cache would hold for the tokens seen."""
        batch, kv_heads = self.batch_heads()
        return 2 * batch * kv_heads * self.seen * self.keys.shape[-1] * self.keys.element_size()

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
        if self.is_initialized:
            self._take_rows(torch.arange(self.batch_heads()[0]).repeat_interleave(repeats))

    def _take_rows(self, index) -> None:
        """Rebuild every per-row tensor from rows ``index`` of the old batch: keys and values
        (or the ragged store's rows), positions, scores and padding. transformers' own layer
        method would move keys and values only and leave the rest describing other rows."""
        if not self.is_initialized:
            return
        device = self.keys.device
        index = torch.arange(self.batch_heads()[0], device=device)[torch.as_tensor(index, device=device)]
        if self.ragged is not None:
            kv_heads = self.batch_heads()[1]
            self.ragged = self.ragged.select_rows((index[:, None] * kv_heads + torch.arange(kv_heads, device=device))
                                                  .flatten())
        if self.store is not None and len(self.store):  # an empty store has no rows to move
            self.store.select_batch(index)
        self._spare.clear()  # every per-row tensor is rebuilt below
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index)
        if self.scores is not None:
            self.scores = self.scores.index_select(0, index)
        if self.padding is not None:
            self.padding = self.padding.index_select(0, index)
        if self.staged_priority is not None:
            self.staged_priority = self.staged_priority.index_select(0, index)
        if self.row_budget is not None:
            self.row_budget = [self.row_budget[i] for i in index.tolist()]

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

    def keeps(self) -> int | list[int]:
        """Tokens each batch row keeps: ``budget``, or the rows' own budgets where they differ."""
        return self.budget if self.row_budget is None else self.row_budget

    def row_keeps(self) -> list[int]:
        """Tokens each batch row keeps, one entry a row."""
        return [self.budget] * self.batch_heads()[0] if self.row_budget is None else self.row_budget

    def real_tokens(self) -> list[int]:
        """Per batch row, the most real tokens (not padding, not empty slots) any of its heads holds."""
        valid = self.valid_mask()
        if valid is None:
            return [self.stored()] * self.batch_heads()[0]
        return valid.sum(dim=-1).amax(dim=-1).tolist()

    def recent_mask(self, count: int | list[int]) -> torch.Tensor:
        """True at the ``count`` most recent tokens of every row (a list: per batch row)."""
        if isinstance(count, int):
            return self.positions >= max(0, self.seen - count)
        return self.positions >= per_row([max(0, self.seen - c) for c in count], self.positions)

    def first_mask(self, count: int | list[int]) -> torch.Tensor:
        """True at the first ``count`` real tokens of every row (a list: per batch row)."""
        valid = self.valid_mask()
        if not isinstance(count, int):
            count = per_row(count, self.positions)
        if valid is None:
            return (torch.arange(self.stored(), device=self.positions.device) < count).expand(self.positions.shape)
        return valid & (valid.cumsum(dim=-1) <= count)

    # ---- evicting -----------------------------------------------------------------------------

    def evict(self, ranking: torch.Tensor, keep: int | list[int], *, share_heads: float | None = None) -> None:
        """Keep the ``keep`` best-ranked tokens of every row (``ranking (B, H_kv, width)``; a
        list: per batch row).

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
        if share_heads is None and valid is None and isinstance(keep, int):
            if keep < width:
                self.keep_index(top_indices(ranked, keep).sort(dim=-1).values, priority=ranked)  # token order kept
            else:
                self.rank_staged(ranked)
            return
        mask = top_mask(ranked, keep) if share_heads is None else _shared_top_mask(ranked, keep, share_heads)
        if valid is not None:
            mask &= valid
            if torch.equal(mask, valid) and self.ragged is not None:
                return
        self.keep_mask(mask, priority=ranked)

    def _wants_priority(self, priority: torch.Tensor | None) -> bool:
        return priority is not None and self.quantizer is not None and getattr(self.quantizer, "takes_priority", False)

    def rank_staged(self, ranking: torch.Tensor) -> None:
        """Hand the policy's ranking ``(B, H_kv, width)`` of every slot to the staged tokens (the
        last slots), for a quantizer that protects the best-ranked: an eviction that keeps them
        all still ranks them. Forced tokens (``+inf``: sinks, recent windows, pinned spans) carry
        no score, so they rank as unscored (``-inf``) here."""
        staged = 0 if not self.is_initialized or self.keys.dim() != 4 else self.keys.shape[-2]
        if not self._wants_priority(ranking) or not staged or self.store is None:
            return
        ranking = ranking[..., ranking.shape[-1] - staged:]
        self.staged_priority = ranking.masked_fill(ranking == float("inf"), float("-inf"))

    def keep_index(self, index: torch.Tensor, priority: torch.Tensor | None = None) -> None:
        """Uniform layer: keep tokens ``index (B, H_kv, n)`` (sorted per row), freeing the rest.
        With a quantizer, once tokens are in the store, the store drops them
        (``QuantizedStore.select_tokens``); staged tokens join the store first. ``priority
        (B, H_kv, width)``: the policy's ranking, kept for staged tokens when the quantizer
        protects the best-ranked ones."""
        self.staged_priority = None
        if priority is not None:
            self.rank_staged(priority)
        if self.store is not None and len(self.store):
            self.settle()  # a later chunk's staged tokens join the store, ranked, then the store evicts
            self.store.select_tokens(index)
        else:
            gather = index.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
            # torch.gather allocates new tensors: the old, larger ones are freed when dropped here.
            self.keys = torch.gather(self.keys, 2, gather)
            self.values = torch.gather(self.values, 2, gather)
            if self.staged_priority is not None:
                self.staged_priority = torch.gather(self.staged_priority, 2, index)
        self.positions = torch.gather(self.positions, 2, index)
        if self.scores is not None:
            self.scores = torch.gather(self.scores, 2, index)
        self._spare.clear()  # the old buffers hold the dropped tokens: let them go

    def keep_mask(self, mask: torch.Tensor, priority: torch.Tensor | None = None) -> None:
        """Keep the slots where ``mask (B, H_kv, width)`` is True; rows may differ in length, so
        the layer becomes ragged (unless every row keeps the same count and it is uniform).
        ``priority``: as for ``keep_index``."""
        counts = mask.sum(dim=-1)
        if self.ragged is None and bool((counts == counts.flatten()[0]).all()):
            self.padding = None
            index = mask.nonzero()[:, 2].view(*mask.shape[:2], -1)  # row-major: sorted per row
            self.keep_index(index, priority)
            return
        self.padding = None
        batch, kv_heads = mask.shape[:2]
        rows = mask.reshape(batch * kv_heads, -1)
        if isinstance(self.ragged, QuantizedRows):
            self.ragged.keep(rows)  # each row's store drops its tokens (NSNQuant: kept codes unchanged)
        elif self.ragged is not None and 2 * int(counts.sum()) >= self.ragged.allocated_slots():
            self.ragged.keep(rows)  # a few tokens of a few rows (decoding): moved within their rows
        else:  # turning ragged, or keeping under half of the memory held: laid out afresh
            ranks = None
            if self._wants_priority(priority):
                ranks = priority.masked_fill(priority == float("inf"), float("-inf")).reshape(rows.shape)
            self.ragged = self._rows_keeping(rows, counts, ranks)
        self.staged_priority = None  # the staged tokens went to the rows, with their ranking
        self._spare.clear()  # the uniform buffers are dead: the tokens live in self.ragged now
        # A placeholder keeps transformers' checks on .keys working; the tokens live in self.ragged.
        self.keys = self.keys.new_empty(batch, kv_heads, 0, self.keys.shape[-1])
        self.values = self.keys
        self.positions = _compact(self.positions, mask, -1)
        if self.scores is not None:
            self.scores = _compact(self.scores, mask, 0.0)

    def drop_padding(self, keys: torch.Tensor, values: torch.Tensor, padding: torch.Tensor) -> None:
        """A quantizer alone, after a left-padded batch's first prefill: code each row's own
        tokens again, from the step's exact ``keys``/``values (B, H_kv, S, D)`` without the
        ``padding (B, S)``, as rows of their own (``QuantizedRows``), so a row is coded as it
        alone would be (the store coded the padding with the first tokens: KIVI's key groups
        and NSNQuant's chunk shifts mixed them)."""
        batch, kv_heads, _, dim = keys.shape
        rows = (~padding)[:, None, :].expand(batch, kv_heads, -1).reshape(batch * kv_heads, -1)
        self.ragged = QuantizedRows.from_padded(self.quantizer, keys.flatten(0, 1), values.flatten(0, 1), rows)
        self.store = None
        self._spare.clear()
        self.keys = self.keys.new_empty(batch, kv_heads, 0, dim)  # a placeholder: the tokens live in self.ragged
        self.values = self.keys

    def _rows_keeping(self, rows: torch.Tensor, counts: torch.Tensor,
                      priority: torch.Tensor | None) -> RaggedKV | QuantizedRows:
        """Per-row storage of the slots where ``rows (B * H_kv, width)`` is True, built from the
        layer's full-precision rows (a ``RaggedKV``'s, or the uniform layer's); ``priority``
        (the same shape, or None) goes with them to the quantizer's stores."""
        if self.ragged is not None:
            keys, values = self.ragged.padded()
        else:
            # With a quantizer: the staged prompt as it came (evict, then quantize), or, once the
            # layer holds codes, every token dequantized (coded again per row: one more rounding
            # of the tokens that stay, the price of turning ragged after quantizing).
            keys, values = (t.flatten(0, 1) for t in self.all_keys_values())
        if self.quantizer is not None:
            chosen = getattr(self.store, "exact_rows", None)  # key_heads, once the cache chose
            self.store = None  # its tokens move to the rows
            stores = QuantizedRows.from_padded(self.quantizer, keys, values, rows, priority)
            if chosen is not None:
                stores.choose_exact_keys(chosen.flatten())
            return stores
        page_size = self.page_size if self.page_size != "auto" else _auto_page_size(counts, keys.is_cuda)
        return RaggedKV.from_padded(keys, values, rows, page_size=page_size)


def _auto_page_size(counts: torch.Tensor, cuda: bool) -> int | None:
    """``page_size="auto"``: 16-token pages on CUDA (the Triton kernel reads pages in place). On
    CPU the torch path gathers pages every step, so rows padded to the longest (one tensor, a
    strided read) are used while that padding stays within 1/8 of the kept tokens, or costs no
    more than the pages would (short rows: a page holds 64 tokens); else 64-token pages, so the
    memory follows the kept tokens."""
    if cuda:
        return 16
    kept = int(counts.sum())
    padded = int(counts.max()) * counts.numel()
    paged = int(((counts + 63) // 64).sum()) * 64
    return None if (padded - kept) * 8 <= kept or padded <= paged else 64


def _shared_top_mask(ranked: torch.Tensor, keep: int | list[int], alpha: float) -> torch.Tensor:
    """AdaKV selection: ``keep * H`` tokens per batch row across its heads, ``ceil(alpha * keep)``
    guaranteed to each head (``keep``: one budget, or one per batch row)."""
    batch, heads, width = ranked.shape
    keeps = [keep] * batch if isinstance(keep, int) else keep
    floors = [min(width, k, math.ceil(alpha * k)) for k in keeps]
    mask = top_mask(ranked, floors)
    rest = [min(heads * k, heads * width) - heads * f for k, f in zip(keeps, floors, strict=True)]
    if max(rest) > 0:
        flat = ranked.masked_fill(mask, float("-inf")).reshape(batch, heads * width)
        mask |= top_mask(flat, [max(0, r) for r in rest]).view(batch, heads, width)
    return mask


def _compact(tensor: torch.Tensor, mask: torch.Tensor, fill) -> torch.Tensor:
    """Move the masked slots of every row to its front, in order: ``(B, H, max kept)``. One
    scatter: the slots not kept go to a spare last column, cut off (no ``nonzero`` and its
    index tensors, which cost more than the move on a decode step's small layers; the width
    still takes one host read)."""
    width = int(mask.sum(dim=-1).max()) if mask.numel() else 0
    slot = torch.where(mask, mask.cumsum(dim=-1) - 1, width)
    out = tensor.new_full((*tensor.shape[:2], width + 1), fill)
    return out.scatter_(-1, slot, tensor)[..., :width].contiguous()


def _put_slots(tensor: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, fill, width: int) -> torch.Tensor:
    """Write ``values (B, H, n)`` at ``slots (B, H, n)``, widening ``tensor`` to ``width`` with ``fill``."""
    if width > tensor.shape[-1]:
        pad = tensor.new_full((*tensor.shape[:2], width - tensor.shape[-1]), fill)
        tensor = torch.cat([tensor, pad], dim=-1)
    return tensor.scatter(-1, slots, values.to(tensor.dtype))


class ReadBuffers:
    """The keys and values a quantized layer returns, dequantized, in buffers shared by all
    layers of a cache: layers attend one after another, so one layer's copy is dead once the
    next layer reads. Fresh multi-MiB tensors per layer and step would be page-faulted in every
    time. (So the tensors ``update`` returns are valid until the next layer's ``update``.)"""

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

    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()


def check_combination(policy, quantizer) -> None:
    """Raise ``ValueError`` naming the setting unless ``policy`` (an effllm.kv policy or None) and
    ``quantizer`` (a ``Quantizer`` or None) can share one cache."""
    from .policies import Policy
    from .quantizers import Quantizer

    if policy is None and quantizer is None:
        raise ValueError("CompressedCache: give a policy, a quantizer, or both")
    if policy is not None and not isinstance(policy, Policy):
        raise ValueError(f"CompressedCache: policy must be an effllm.kv policy (StreamingLLM, SnapKV, H2O, CAKE, "
                         f"AdaKV, KVzip, Protected) or None, got {policy!r}")
    if quantizer is not None and not isinstance(quantizer, Quantizer):
        raise ValueError(f"CompressedCache: quantizer must follow effllm.kv's quantizer protocol (KIVI, ...) or be "
                         f"None, got {quantizer!r}")
    if getattr(quantizer, "chooses_key_heads", False) and policy is None:
        raise ValueError(f"CompressedCache: {quantizer!r} keeps exact keys on the heads that are sharpest in a "
                         f"policy's prefill, so it needs an eviction policy (or key_heads=0, or 'all': every row)")


class CompressedCache(Cache):
    """One KV cache for eviction and quantization: ``policy`` (an ``effllm.kv`` policy, or None)
    decides which tokens each KV head keeps; ``quantizer`` (``KIVI``, or any object following the
    quantizer protocol of ``kv/quantizers.py``, or None) stores them as codes.

    A policy needs scores that only effllm's attention computes: use the cache through
    ``effllm.kv.compress(model, ...)`` / ``effllm.patch(model, kv=...)``, whose
    ``handle.kv.new_cache()`` makes one for manual forward loops; one made directly is wired
    when passed to ``generate()`` of a patched model, and, with a policy, raises at its first
    update anywhere else (it could not compress). A quantizer alone works with any attention:
    each step reads the earlier tokens dequantized; under effllm's attention, decode steps read
    the codes when the quantizer's store can (``attend``). With both, a multi-token step's tokens
    stay in full precision until the policy has evicted, then are quantized (evict, then
    quantize); a token evicted while decoding leaves the quantizer's store
    (``select_tokens``; KIVI regroups the keys that stay and quantizes them again). Batches may
    be left-padded: with a policy, padding is dropped at the first prefill. Rows left with
    different lengths (padding dropped, per-head budgets) and a quantizer get a quantized store
    each (``QuantizedRows``).

    ``page_size``: layout of layers whose rows differ in length: an int pages them (memory
    follows the kept tokens, within one page per row); ``None`` keeps one tensor per layer,
    rows padded to the longest (the fastest CPU decode, but the padding costs memory;
    docs/kv.md, "What is built", has the figures); ``"auto"`` pages by 16 tokens on CUDA and, on CPU, picks
    per layer: one tensor while its padding stays within 1/8 of the kept tokens or costs no
    more than the pages would, else 64-token pages (the CPU torch path gathers pages every step;
    larger pages gather faster).
    ``config``: the model's config, to refuse models with sliding-window or non-attention
    layers (and head dims the quantizer cannot hold) up front.
    ``keep_positions``: each layer's ``positions (B, H_kv, width)``, the original position of every
    kept token, are kept for as long as the policy may evict; a policy that never evicts after
    its first compression (``Policy.evicts_later`` False: SnapKV, KVzip, AdaKV(SnapKV), and
    ``Protected`` around them) has no use for them, so they are dropped then (with the scores)
    unless ``keep_positions=True`` (to inspect which tokens each head kept; 4 bytes a kept token
    and head, padded to the longest row when rows differ in length).
    """

    def __init__(self, policy=None, *, quantizer=None, num_layers: int | None = None,
                 page_size: int | str | None = "auto", config=None, keep_positions: bool = False):
        # Keyword-only after the policy: CompressedCache(SnapKV(0.5), NSNQuant()) once read the
        # quantizer as num_layers.
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                       or num_layers < 1):
            raise ValueError(f"CompressedCache: num_layers must be None or an int >= 1, got {num_layers!r}")
        if page_size is not None and page_size != "auto" and (not isinstance(page_size, int) or page_size < 1):
            raise ValueError(f"CompressedCache: page_size must be None, 'auto' or an int >= 1, got {page_size!r}")
        check_combination(policy, quantizer)
        if not isinstance(keep_positions, bool):
            raise ValueError(f"CompressedCache: keep_positions must be True or False, got {keep_positions!r}")
        if config is not None:
            from .api import check_config

            check_config(config, quantizer)
            if num_layers is None:
                num_layers = getattr(_text_config(config), "num_hidden_layers", None)
        if getattr(quantizer, "chooses_key_heads", False) and num_layers is None:
            raise ValueError(f"CompressedCache: {quantizer!r} chooses its heads across all layers at the end of "
                             f"the prefill: give num_layers= or config= (handle.kv.new_cache() does)")
        super().__init__(layer_class_to_replicate=self._new_layer)
        self.policy = policy
        self.quantizer = quantizer
        self.num_layers = num_layers  # needed by policies that share a budget across layers (CAKE)
        self.page_size = page_size
        self.keep_positions = keep_positions
        self.policy_state: dict = {}  # cross-layer state of such policies
        self.owner = None  # the kv feature of the patched model whose attention reads this cache
        self.read_buffers = ReadBuffers() if quantizer is not None else None
        self._store_attends = quantizer is not None and callable(getattr(quantizer.new_store(), "attend", None))
        self.replaying = False  # True while KVzip replays the context: new keys are read, not stored
        # During a replay of a left-padded batch: (B, stored + replayed) False at padding, the
        # same for every layer (each holds the padded prefill until the replay's eviction).
        self.replay_valid: torch.Tensor | None = None
        # During a replay with KVzip(scoring="chunk"): the kvzip.ReplayChunk scored
        self.replay_scored = None
        # a quantizer that keeps exact keys on the sharpest heads: they are chosen once, at the first settle
        self.chooses_exact_keys = getattr(quantizer, "chooses_key_heads", False)
        self.exact_keys_chosen = False
        self.inference_tensors = False  # a step ran under torch.inference_mode: see writable()

    def _new_layer(self) -> CompressedLayer:
        layer = CompressedLayer()
        layer.page_size = self.page_size
        layer.quantizer = self.quantizer
        layer.stage_prefill = self.policy is not None
        layer.tracks_slots = self.policy is not None
        layer.read_buffers = self.read_buffers
        return layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self._note_mode()
        self.writable()
        if self.replaying:
            # The replay attends to the cache and to itself, and leaves the cache as it was.
            keys, values = self.layers[layer_idx].all_keys_values()
            self.owner.pending = (self, layer_idx)
            return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)
        # A feature whose model was unpatched reads nothing: this cache then acts unwired.
        owner = self.owner if self.owner is not None and self.owner.active else None
        if owner is None and self.policy is not None:
            # Only a patched model's attention hands the policy its scores: unwired, this cache
            # would keep every token while claiming to compress.
            raise ValueError(f"CompressedCache({type(self.policy).__name__}): this cache is not wired to a model "
                             f"patched with kv=..., so nothing would be compressed; pass it to generate() of a "
                             f"patched model, or make it with handle.kv.new_cache() (effllm.patch or "
                             f"effllm.kv.compress)")
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer())
        layer = self.layers[layer_idx]
        # Only effllm's attention (a wired cache) reads the codes; any other reader gets them dequantized.
        layer.reads_codes = self._store_attends and owner is not None
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if owner is not None:
            owner.pending = (self, layer_idx)
        return keys, values

    # ---- called by effllm's attention function ---------------------------------------------

    def forget_first_prefill(self, layer_idx: int) -> None:
        """Undo a first prefill refused by layer ``layer_idx``'s attention after its ``update``
        ran: that layer and the ones before it (which took the same first prefill in this
        forward) are empty again, and the cache as it was before the call."""
        for idx in range(layer_idx + 1):
            self.layers[idx] = self._new_layer()
        self.policy_state = {}
        self.exact_keys_chosen = False
        if self.owner is not None:
            self.owner.pending = None

    def wired(self, owner) -> None:
        """Called by the kv feature of a patched model that adopts this cache."""
        self.owner = owner

    def writable(self) -> None:
        """Outside ``torch.inference_mode``, after the cache's tensors were made under it (a
        prefill there, or a copy, load or beam reorder there: ``inference_tensors``): such
        tensors cannot be written in place outside that mode, and ragged and per-row quantized
        layers write in place at every step (appends into free slots, eviction within a row).
        So the first update outside copies them into normal ones, once per return from that
        mode, a layer at a time (a deep copy keeps views of one buffer views of one copy; the
        layer's old tensors are freed before the next layer is copied)."""
        if not getattr(self, "inference_tensors", False) or torch.is_inference_mode_enabled():
            return
        # shared, not copied: the model's kv feature, the policy, the quantizer; the read
        # buffers are scratch space, started afresh
        fresh = ReadBuffers() if self.read_buffers is not None else None
        shared = {id(obj): obj for obj in (self.owner, self.policy, self.quantizer) if obj is not None}
        if fresh is not None:
            shared[id(self.read_buffers)] = fresh
        for layer in self.layers:
            layer.__dict__.update(copy.deepcopy(layer.__dict__, dict(shared)))
        self.read_buffers = fresh
        self.policy_state = copy.deepcopy(self.policy_state, dict(shared))
        self.inference_tensors = False

    def _note_mode(self) -> None:
        if torch.is_inference_mode_enabled():
            self.inference_tensors = True  # tensors made now are inference tensors: see writable()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # new tensors: made under inference mode if it is on
        self._note_mode()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._note_mode()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._note_mode()

    def __deepcopy__(self, memo) -> CompressedCache:
        """A copy (transformers' recipe for reusing a prompt's cache) wired to the same model: the
        kv feature (and through it the model) is shared, not copied."""
        if self.owner is not None:  # unless an enclosing copy (of the model) already copied it
            memo.setdefault(id(self.owner), self.owner)
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        clone.inference_tensors = torch.is_inference_mode_enabled()  # the copy's tensors are made now
        return clone

    def __getstate__(self) -> dict:
        # pickled without the model it is wired to: the model that next reads it adopts it
        return {**self.__dict__, "owner": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.inference_tensors = torch.is_inference_mode_enabled()  # loaded now: made in this mode

    def observe_prefill(self, layer_idx: int, query: torch.Tensor, scale: float) -> None:
        """After a multi-token step on a uniform layer: let the policy score and evict (queries
        after RoPE); then drop what is left of the padding."""
        layer = self.layers[layer_idx]
        if self.chooses_exact_keys and not self.exact_keys_chosen:
            keys = layer.all_keys_values()[0]  # before the policy evicts: the whole prompt so far
            valid = None if layer.padding is None else ~layer.padding
            layer.sharpness = head_entropy(query, keys, scale, key_valid=valid)
        self.policy.after_prefill(layer, query, scale, cache=self, layer_idx=layer_idx)
        # A policy that replays the context (KVzip) needs the padded layout until its replay;
        # its eviction drops the padding, and it settles the layers itself.
        replays = getattr(self.policy, "replays_context", False)
        if layer.padding is not None and not replays:
            layer.keep_mask(layer.valid_mask())
        if layer_idx == (self.num_layers or 0) - 1 and not replays:
            self.settle()  # the last layer's policy step: no layer evicts again in this forward
            self.compressed()

    def compressed(self) -> None:
        """Called once a policy's compression step is over for every layer (the last layer's
        prefill step, or KVzip's replay): a policy that will never evict again
        (``Policy.evicts_later`` False) leaves nothing for positions and scores to decide, so
        every layer drops them."""
        if self.policy is None or self.policy.evicts_later or self.keep_positions:
            return
        for layer in self.layers:
            layer.forget_slots()

    def settle(self) -> None:
        """Quantize what every layer staged, now that the policy has evicted (without it each
        layer does so at its next update: a cache that does not know its number of layers)."""
        if self.chooses_exact_keys and not self.exact_keys_chosen:
            self._choose_exact_keys()
        for layer in self.layers:
            layer.settle()

    def _choose_exact_keys(self) -> None:
        """``key_heads``: per batch row, the (layer, KV head) rows whose prefill attention was
        sharpest (lowest entropy) keep exact keys. Runs once every layer exists; a layer that
        measured nothing (a first forward of one token: no prompt to measure) means no row keeps
        exact keys, rather than every row keeping them until a choice that never comes."""
        if len(self.layers) != self.num_layers:
            return
        measured = [layer.sharpness for layer in self.layers]
        if any(entropy is None for entropy in measured):
            for layer in self.layers:
                layer.choose_exact_keys(torch.zeros(layer.batch_heads(), dtype=torch.bool,
                                                    device=layer.keys.device))
        else:
            # on the host: layers may sit on different devices and hold different numbers of heads
            entropy = torch.cat([e.float().cpu() for e in measured], dim=1)  # (B, sum of H_kv)
            take = self.quantizer.key_head_count(entropy.shape[1])
            chosen = torch.zeros(entropy.shape, dtype=torch.bool)
            chosen.scatter_(1, top_indices(-entropy, take), True)  # ties: the earlier row, on any device
            for layer, rows in zip(self.layers, chosen.split([e.shape[1] for e in measured], dim=1), strict=True):
                layer.choose_exact_keys(rows.to(layer.keys.device))
        for layer in self.layers:
            layer.sharpness = None
        self.exact_keys_chosen = True

    def observe_decode(self, layer_idx: int, stats: torch.Tensor | None, queries: int = 1) -> None:
        """After a step that followed compression: ``stats (B, H_kv, width)`` is the attention
        mass each stored key received from the step's ``queries`` (None if the policy needs none)."""
        self.policy.after_decode(self.layers[layer_idx], stats, cache=self, layer_idx=layer_idx, queries=queries)
        if layer_idx == (self.num_layers or 0) - 1:
            self.settle()  # a multi-token step whose last layer is ragged comes here, not to observe_prefill

    def observe_replay(self, layer_idx: int, best: torch.Tensor) -> None:
        """During a KVzip replay: ``best (B, H_kv, stored)``, the largest weight each stored key
        got from this chunk; a layer's score is the maximum over chunks."""
        layer = self.layers[layer_idx]
        layer.scores = best if layer.scores is None else torch.maximum(layer.scores, best)

    def reset(self) -> None:
        super().reset()
        self.policy_state = {}
        self.exact_keys_chosen = False

    # ---- reporting -----------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes this cache holds: kept keys and values (codes, scales and full-precision windows
        with a quantizer), positions and scores, and the read buffers."""
        total = 0 if self.read_buffers is None else self.read_buffers.nbytes()
        for layer in self.layers:
            if layer.stored():
                total += layer.kv_bytes()
                total += sum(t.numel() * t.element_size() for t in (layer.positions, layer.scores) if t is not None)
        return total

    def stats(self) -> dict:
        """One schema for every policy/quantizer combination: tokens seen, kept tokens per layer
        (and per batch row and head), bytes of keys and values held (``kv_bytes``) against an
        uncompressed full-precision cache of the tokens seen (``kv_bytes_full``), what the rest
        costs (``bookkeeping_bytes``: positions, scores, read buffers), ``bytes_saved`` (full
        minus everything held), and the newest tokens held in full precision per layer (keys,
        values; None without a quantizer)."""
        layers = [layer for layer in self.layers if layer.stored()]
        stored = sum(layer.kv_bytes() for layer in layers)
        full = sum(layer.full_bytes() for layer in layers)
        per_head = [layer.row_lengths().tolist() for layer in layers]
        held = self.nbytes()
        return {"policy": None if self.policy is None else repr(self.policy),
                "quantizer": None if self.quantizer is None else repr(self.quantizer),
                "tokens_seen": layers[0].seen if layers else 0,
                "kept_per_layer": [round(sum(map(sum, rows)) / sum(map(len, rows))) for rows in per_head],
                "kept_per_head": per_head, "kv_bytes": stored, "kv_bytes_full": full, "bytes_saved": full - held,
                "bookkeeping_bytes": held - stored,
                "full_precision_tokens": (None if self.quantizer is None else
                                          [layer.full_precision_tokens() for layer in layers])}


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config
