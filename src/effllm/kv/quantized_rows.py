"""Quantized storage for layers whose rows keep different numbers of tokens.

A *row* is one (batch row, KV head) pair, as in ``ragged.py``. When a policy leaves rows of
different lengths (KVzip's global scope, AdaKV's per-head budgets, a left-padded batch whose
padding is dropped) and the cache has a quantizer, each row gets a store of its own: the
quantizer's ``QuantizedStore`` holding ``(1, 1, T_r, D)``. Rows are then appended to and
evicted from one by one, and attended each over its own codes and full-precision window, so no
row's codes are padded to the longest and attention makes no full-precision copy of the layer.
On CPU a decode step attends all rows in one pass (``rows_attention.py``: the native loops read each
row's codes in place; only the small windows, and NSNQuant's chunk shifts, are padded, per
step); otherwise (several queries, NSNQuant's protected tokens or exact keys, no native loops)
each row's store attends on its own. (A layer that already held codes when it turned ragged is
dequantized once, to be coded again per row; see ``CompressedLayer.keep_mask``.) A layer stays
this way once ragged, even if its rows come to the same length again.

``CompressedLayer`` uses this class where it would use a ``RaggedKV`` (``lengths``,
``lengths_host``, ``width()``, ``append``, ``select_rows``, ``nbytes()``); attention goes
through ``attend`` instead of ``decode_attention``. Costs: one store append per row and step
(B x H_kv per layer; as many attends where the one pass does not apply), and each row keeps its
own window (``residual`` to ``residual + chunk - 1`` newest tokens for NSNQuant, and between
steps the last append's tokens too: rows are read over their codes, so their appends defer
coding to the next), as a uniform store keeps one per row.
"""

from __future__ import annotations

import copy

import torch

from .rows_attention import attend_rows, reader_for


class QuantizedRows:
    """R rows, each its own quantizer store; see the module docstring."""

    def __init__(self, stores: list, *, device):
        self.stores = stores
        self.lengths_host = torch.tensor([len(store) for store in stores], dtype=torch.int64)
        self.lengths = self.lengths_host.to(device=device, dtype=torch.int32)
        self.device = device
        self._reader = None  # the loops' view of the rows' codes, kept from step to step (rows_attention)

    def __getstate__(self) -> dict:
        # the reader holds addresses of these stores' tensors: a copy (deepcopy, pickle) builds its own
        return {**self.__dict__, "_reader": None}

    @classmethod
    def from_padded(cls, quantizer, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
                    priority: torch.Tensor | None = None) -> QuantizedRows:
        """Rows from full-precision ``keys/values (R, S, D)``, keeping the slots where ``keep
        (R, S)`` is True, each quantized by a new store of ``quantizer`` (with the policy's
        ranking ``priority (R, S)`` of the slots, for a quantizer that protects the best-ranked)."""
        stores = []
        for row, slots in enumerate(_kept_slots(keep)):
            store = quantizer.new_store()
            if len(slots):
                extra = {} if priority is None else {"priority": priority[row, slots][None, None]}
                store.append(keys[row, slots][None, None], values[row, slots][None, None], **extra)
            stores.append(store)
        return cls(stores, device=keys.device)

    def width(self) -> int:
        """The longest row's length (host lengths: no device sync)."""
        return int(self.lengths_host.max()) if len(self.stores) else 0

    def _set_lengths(self) -> None:
        self.lengths_host = torch.tensor([len(store) for store in self.stores], dtype=torch.int64)
        self.lengths = self.lengths_host.to(device=self.device, dtype=torch.int32)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append ``keys/values (R, n, D)``: row r's n tokens to row r. The layer has checked
        shape, dtype and device against what it holds, so no row's append refuses midway. The
        rows are read over their codes (``attend``): what is due is coded at the next append, so
        this step reads its own tokens exactly."""
        for row, store in enumerate(self.stores):
            store.append(keys[row][None, None], values[row][None, None], defer=True)
        self.lengths_host += keys.shape[1]
        self.lengths += keys.shape[1]

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the slots where ``mask (R, width)`` is True (slot i of row r: its i-th token),
        through each store's ``select_tokens`` (NSNQuant keeps the kept tokens' codes as they are)."""
        within = torch.arange(mask.shape[1], device=mask.device) < self.lengths[:, None]
        for row, (store, slots) in enumerate(zip(self.stores, _kept_slots(mask & within), strict=True)):
            if len(slots) < int(self.lengths_host[row]):
                store.select_tokens(slots.view(1, 1, -1))
        self._reader = None  # holds the evicted codes
        self._set_lengths()

    def choose_exact_keys(self, rows: torch.Tensor) -> None:
        """Rows where ``rows (R,)`` bool is True keep exact keys (a quantizer with ``key_heads``)."""
        for store, chosen in zip(self.stores, rows.tolist(), strict=True):
            store.choose_exact_keys(torch.tensor([[chosen]], device=self.device))

    def select_rows(self, rows: torch.Tensor) -> QuantizedRows:
        """Rows ``rows`` of this layer (a row may repeat: beam search); a repeated row's store is
        copied, so the beams append to their own stores from then on."""
        taken, stores = set(), []
        for row in rows.tolist():
            stores.append(self.stores[row] if row not in taken else copy.deepcopy(self.stores[row]))
            taken.add(row)
        return QuantizedRows(stores, device=self.device)

    def attend(self, query: torch.Tensor, scale: float, *, softcap: float | None, need_stats: bool, backend: str):
        """Attention of ``query (R, Sq, G, D)`` (G query heads per row; the step's ``Sq`` tokens
        already appended) over each row's store: ``(out (R, Sq, G, D), stats (R, width) or
        None)``, stats the float32 mass each slot received, zero past a row's length. A decode
        step runs as one pass over all rows where ``rows_attention.reader_for`` has a reader."""
        held, self._reader = self._reader, None  # a refresh that raises leaves no half-updated reader kept
        reader = reader_for(self.stores, query, backend, held=held)
        # kept for the next step unless it holds converted copies (uncounted memory)
        self._reader = reader if reader is not None and reader.keeps else None
        if reader is not None:
            return attend_rows(reader, self.stores, query, scale, softcap=softcap, need_mass=need_stats)
        out = torch.empty_like(query)
        stats = query.new_zeros(len(self.stores), self.width(), dtype=torch.float32) if need_stats else None
        for row, store in enumerate(self.stores):
            result = store.attend(query[row].transpose(0, 1)[None], scale, softcap=softcap, return_mass=need_stats,
                                  backend=backend)
            if need_stats:
                result, mass = result
                stats[row, :mass.shape[-1]] = mass[0, 0]
            out[row] = result[0]
        return out, stats

    def full_precision_tokens(self) -> tuple[int, int]:
        """The most keys and values any row holds in full precision."""
        counts = [store.full_precision_tokens() for store in self.stores] or [(0, 0)]
        return max(k for k, _ in counts), max(v for _, v in counts)

    def nbytes(self) -> int:
        return sum(store.nbytes() for store in self.stores)


def _kept_slots(keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row of ``keep (R, S)``, the int64 slots where it is True, ascending; one ``nonzero``
    and one host read of the counts for all rows (one device sync, not one a row)."""
    return keep.nonzero()[:, 1].split(keep.sum(dim=-1).tolist())
