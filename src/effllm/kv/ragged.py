"""Per-row KV storage for layers whose rows keep different numbers of tokens.

A *row* is one (batch row, KV head) pair. Rows differ in length when budgets are per head
(``AdaKV``) or when a padded batch drops each sequence's padding. Token ``i`` of a row is its
*slot* ``i`` (slots ``[0, lengths[r])`` hold tokens, in their original order). Two layouts:

- ``page_size=None`` (*rows*): one ``(R, capacity, D)`` tensor. Fastest on CPU (decode reads a
  plain strided tensor) but every row is as long as the longest one.
- ``page_size=int`` (*paged*): a pool of ``(pages, page_size, D)`` pages and a
  ``block_table (R, max_pages)``, as in paged attention. Memory is what the rows use, plus less
  than one page per row, whatever the spread of lengths.

Both are read by ``decode_attention`` as R sequences with one KV head each
(``decode_args``), so per-row lengths need no mask; a float32 decode step on CPU by one native
loop over the rows where they lie (``native.rows_decode``, ``native_args``). Capacity grows in chunks: appending one
token per decode step copies nothing most of the time. Evicting (``keep``) moves only the rows
that lose tokens, within their own slots or pages.
"""

from __future__ import annotations

import torch

_GROWTH = 1 / 16  # grow capacity (slots or pages) by at least this fraction when full


class RaggedKV:
    """Keys and values of R rows of different lengths; see the module docstring."""

    def __init__(self, rows: int, dim: int, *, dtype, device, page_size: int | None):
        if page_size is not None and (not isinstance(page_size, int) or page_size < 1):
            raise ValueError(f"RaggedKV: page_size must be None or an int >= 1, got {page_size!r}")
        self.page_size = page_size
        self.rows, self.dim = rows, dim
        self.lengths_host = torch.zeros(rows, dtype=torch.int64)  # host copy: allocation needs no device sync
        self.lengths = torch.zeros(rows, dtype=torch.int32, device=device)
        self.row_ids = torch.arange(rows, device=device)
        self.room = 0  # free slots in the fullest row: appends within it need no allocation
        if page_size is None:
            self.k = torch.empty(rows, 0, dim, dtype=dtype, device=device)
        else:
            self.k = torch.empty(0, page_size, dim, dtype=dtype, device=device)
            self.pages_used = 0
            self.pages_host = torch.zeros(rows, dtype=torch.int64)  # pages owned per row
            self.scattered = torch.zeros(rows, dtype=torch.bool)  # rows that took pages elsewhere
            self.block_table = torch.zeros(rows, 0, dtype=torch.int32, device=device)
        self.v = torch.empty_like(self.k)

    # ---- building ----------------------------------------------------------------------------

    @classmethod
    def from_padded(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, *,
                    page_size: int | None, room: int | torch.Tensor = 0) -> RaggedKV:
        """Rows from ``keys/values (R, S, D)``, keeping the slots where ``keep (R, S)`` is True;
        each row laid out with capacity for ``room`` (an int, or host int64 ``(R,)``) more tokens."""
        rows, _, dim = keys.shape
        store = cls(rows, dim, dtype=keys.dtype, device=keys.device, page_size=page_size)
        counts = keep.sum(dim=-1)
        store._reserve(counts.cpu() + room)
        row, src = keep.nonzero(as_tuple=True)
        slot = (keep.cumsum(dim=-1) - 1)[row, src]
        store._write(row, slot, keys[row, src], values[row, src])
        store.lengths_host = counts.cpu().to(torch.int64)
        store.lengths = counts.to(torch.int32)
        store._update_room()
        return store

    def select_rows(self, rows: torch.Tensor, room: int | torch.Tensor = 0) -> RaggedKV:
        """A new store holding rows ``rows`` (a row may repeat), laid out afresh, one after
        another, with ``room`` free slots each (an int, or host int64 per new row). Whole pages
        (or row prefixes) are copied in one gather: no padded copy of the layer in between."""
        rows_host = rows.cpu()
        lengths = self.lengths_host[rows_host]
        store = RaggedKV(len(rows_host), self.dim, dtype=self.k.dtype, device=self.k.device, page_size=self.page_size)
        store._reserve(lengths + room)
        if self.page_size is None:
            width = int(lengths.max()) if len(rows_host) else 0
            store.k[:, :width] = self.k.index_select(0, rows)[:, :width]
            store.v[:, :width] = self.v.index_select(0, rows)[:, :width]
        else:
            # the new store numbers its pages row after row: row r's used pages come first
            used = (lengths + self.page_size - 1) // self.page_size
            row = torch.arange(len(rows_host)).repeat_interleave(used)
            col = torch.arange(int(used.sum())) - (torch.cumsum(used, 0) - used)[row]
            device = self.k.device
            src = self.block_table[rows[row.to(device)], col.to(device)].long()
            dst = store.block_table[row.to(device), col.to(device)].long()
            store.k.index_copy_(0, dst, self.k.index_select(0, src))
            store.v.index_copy_(0, dst, self.v.index_select(0, src))
        store.lengths_host = lengths.clone()
        store.lengths = store.lengths_host.to(device=self.k.device, dtype=torch.int32)
        store._update_room()
        return store

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append ``keys/values (R, n, D)``: n new tokens at the end of every row."""
        rows, n, _ = keys.shape
        new_lengths = self.lengths_host + n
        if n > self.room:  # a decode step usually fits: no host arithmetic per step
            # only on CPU: the GPU kernel reads shuffled pages almost as fast as a contiguous
            # cache (docs/benchmarks.md), so a relayout there would cost copies and host syncs
            if self.page_size is not None and self.k.device.type == "cpu" and self._would_scatter(new_lengths):
                self._relayout(room=n + (self.lengths_host * _GROWTH).long())
            else:
                self._reserve(new_lengths)
            self.lengths_host = new_lengths
            self._update_room()
        else:
            self.lengths_host = new_lengths
            self.room -= n
        if n == 1:
            row, slot = self.row_ids, self.lengths.long()
        else:
            row = self.row_ids.repeat_interleave(n)
            slot = (self.lengths.long()[:, None] + torch.arange(n, device=keys.device)).flatten()
        self._write(row, slot, keys.reshape(rows * n, -1), values.reshape(rows * n, -1))
        self.lengths = self.lengths + n

    def keep(self, keep: torch.Tensor) -> None:
        """Keep the slots where ``keep (R, width)`` is True (slot i of row r: its i-th token), in
        place: each row that loses tokens moves the ones it keeps to its first slots, in order;
        other rows are not touched, and no row gives back its slots or pages (a decoding row
        refills them). Decode-time eviction on a ragged layer drops a few tokens of a few rows at
        a time; laying the whole layer out again for that copied every row every step."""
        within = torch.arange(keep.shape[1], device=keep.device) < self.lengths[:, None]
        keep = keep & within
        counts = keep.sum(dim=-1).cpu()
        losing = (counts < self.lengths_host).nonzero().flatten()
        if not len(losing):
            return
        index = losing.to(keep.device)
        sub = keep.index_select(0, index)
        row, src = sub.nonzero(as_tuple=True)
        dst = sub.cumsum(dim=-1)[row, src] - 1
        moved = src != dst  # the kept tokens before a row's first evicted one stay where they are
        row, src, dst = index[row[moved]], src[moved], dst[moved]
        k, v = self._read(row, src)  # advanced indexing copies: the writes cannot clobber a read
        self._write(row, dst, k, v)
        self.lengths_host = self.lengths_host.clone()
        self.lengths_host[losing] = counts[losing]
        self.lengths = self.lengths_host.to(device=self.k.device, dtype=torch.int32)
        self._update_room()

    def allocated_slots(self) -> int:
        """Token slots the store holds memory for (every row's capacity, or every page)."""
        return self.k.shape[0] * self.k.shape[1]

    def _would_scatter(self, lengths: torch.Tensor) -> bool:
        """True when growing to ``lengths`` would leave most rows' pages scattered in the pool.
        New pages go to the end of the pool, so a row that takes one is no longer one run of
        consecutive pages, which the CPU decode path reads in place (others it copies)."""
        growing = (lengths + self.page_size - 1) // self.page_size > self.pages_host
        return int((self.scattered | growing).sum()) * 2 > self.rows

    def _relayout(self, room: torch.Tensor) -> None:
        """Lay every row out again, one after another, row r with ``room[r]`` free slots (1/16
        of its length, as capacity grows elsewhere, plus the tokens being appended): a copy of
        the layer every few dozen decode steps instead of a copy of each scattered row at every
        step."""
        fresh = self.select_rows(torch.arange(self.rows, device=self.k.device), room=room)
        self.k, self.v, self.block_table = fresh.k, fresh.v, fresh.block_table
        self.pages_used, self.pages_host, self.scattered = fresh.pages_used, fresh.pages_host, fresh.scattered

    def _update_room(self) -> None:
        capacity = self.k.shape[1] if self.page_size is None else self.pages_host * self.page_size
        self.room = int((capacity - self.lengths_host).min()) if self.rows else 0

    def _reserve(self, lengths: torch.Tensor) -> None:
        """Make room for rows of ``lengths`` (host int64) tokens."""
        if self.page_size is None:
            need = int(lengths.max()) if lengths.numel() else 0
            if need > self.k.shape[1]:
                capacity = max(need, int(self.k.shape[1] * (1 + _GROWTH)))
                self.k = _grow(self.k, 1, capacity)
                self.v = _grow(self.v, 1, capacity)
            return
        size = self.page_size
        want = (lengths + size - 1) // size
        extra = (want - self.pages_host).clamp(min=0)
        total = int(extra.sum())
        if total == 0:
            return
        if self.pages_used + total > self.k.shape[0]:
            capacity = max(self.pages_used + total, int(self.k.shape[0] * (1 + _GROWTH)))
            self.k = _grow(self.k, 0, capacity)
            self.v = _grow(self.v, 0, capacity)
        width = int(want.max())
        if width > self.block_table.shape[1]:
            self.block_table = _grow(self.block_table, 1, width)
        # New pages are numbered in row order, each row's after the ones it owns.
        row = torch.arange(self.rows).repeat_interleave(extra)
        first = torch.cumsum(extra, 0) - extra
        col = self.pages_host[row] + torch.arange(total) - first[row]
        ids = self.pages_used + torch.arange(total)
        device = self.block_table.device
        self.block_table[row.to(device), col.to(device)] = ids.to(device=device, dtype=torch.int32)
        self.scattered |= (extra > 0) & (self.pages_host > 0)  # the new pages follow the pool, not the row
        self.pages_used += total
        self.pages_host = self.pages_host + extra

    def _write(self, row: torch.Tensor, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.page_size is None:
            self.k[row, slot] = k
            self.v[row, slot] = v
            return
        page = self.block_table[row, slot // self.page_size].long()
        offset = slot % self.page_size
        self.k[page, offset] = k
        self.v[page, offset] = v

    def _read(self, row: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.page_size is None:
            return self.k[row, slot], self.v[row, slot]
        page = self.block_table[row, slot // self.page_size].long()
        offset = slot % self.page_size
        return self.k[page, offset], self.v[page, offset]

    # ---- reading -----------------------------------------------------------------------------

    def width(self) -> int:
        """Length of the longest row."""
        return int(self.lengths_host.max()) if self.rows else 0

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys, values (R, width, D)``; slots past a row's length hold stale values."""
        width = self.width()
        if self.page_size is None:
            return self.k[:, :width], self.v[:, :width]
        pages = self.block_table[:, : (width + self.page_size - 1) // self.page_size].flatten()
        return tuple(t.index_select(0, pages).view(self.rows, -1, self.dim)[:, :width] for t in (self.k, self.v))

    def decode_args(self) -> dict:
        """``k_cache``, ``v_cache``, ``cache_seqlens`` and ``block_table`` for ``decode_attention``
        with R sequences of one KV head."""
        return {"k_cache": self.k.unsqueeze(2), "v_cache": self.v.unsqueeze(2), "cache_seqlens": self.lengths,
                "block_table": None if self.page_size is None else self.block_table}

    def native_args(self) -> dict:
        """``k``, ``v``, ``table``, ``lengths`` and ``width`` for ``native.rows_decode``."""
        return {"k": self.k, "v": self.v, "table": self.block_table if self.page_size is not None else None,
                "lengths": self.lengths, "width": self.width()}

    def nbytes(self) -> int:
        total = 2 * self.k.numel() * self.k.element_size() + self.lengths.numel() * self.lengths.element_size()
        if self.page_size is not None:
            total += self.block_table.numel() * self.block_table.element_size()
        return total


def _grow(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
