"""One decode step over rows of different lengths, each row its own quantizer store, in one pass.

A ragged quantized layer (``kv/quantized_rows.py``: KVzip's global scope, AdaKV, a left-padded
batch) holds one store of ``(1, 1, T_r, D)`` a row. Each store can attend on its own
(``store.attend``), but that is one call, and its fixed cost, a row: 24 a layer and step for a
batch of 8 on SmolLM2. Here the native loops read every row's codes where they lie, through a
table of their addresses (``native.RowCodes`` for NSNQuant, ``native.RowBlocks`` for KIVI), kept
from step to step and rewritten a row at a time where a flush changed that row's codes; only the
full-precision windows (and NSNQuant's chunk shifts) are padded to the longest row, per step. Scores are laid out in token order (row
``r``'s ``i``-th token in column ``i``), so the attention mass per slot is the probabilities as
they stand. The arithmetic is ``codes_attention``'s native path's, so each row's result equals
its store's own ``attend``.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from .. import native
from .._backend import resolve_backend
from .codebook import codebook
from .codes_attention import _rotate_rows, _softmax
from .nsnquant import NSNCodes, NSNStore, shift_decode
from .quantizers import KIVIStore


def _cpu_decode(query: torch.Tensor, backend: str) -> bool:
    """One query token, on CPU where the native loops build, not the Triton path."""
    return (query.shape[1] == 1 and resolve_backend(backend, query, op="attend_rows") != "triton"
            and native.usable(query, rows=query.shape[2]))


# ---- what each quantizer's rows give the one pass -------------------------------------------------

def _nsn_row(codes: NSNCodes | None):
    if codes is None:
        return None
    counts = None if codes.counts is None else codes.counts[0, 0].contiguous()
    return (codes.codes[0, 0].contiguous(), codes.scales[0, 0].contiguous(),
            codes.grid[0, 0].reshape(-1, 4).contiguous(), counts)


class NSNRows:
    """The rows' NSNQuant codes as the loops read them (addresses, no copy). Kept from step to
    step: ``refresh`` rewrites only the rows whose codes changed since (a flush codes one row's
    window at a time, so most steps change none or a few of a layer's rows)."""

    keeps = True  # holds addresses and views of the codes (no copies): kept from step to step

    def __init__(self, stores: list):
        count = len(stores)
        self.codes = [(None, None)] * count
        self.key_tokens = torch.zeros(count, dtype=torch.int64)
        self.value_tokens = self.key_tokens
        self.keys = self.values = None  # the RowCodes tables, from the first row with codes
        self.vector_dim = self.chunk = self.stages = None  # the quantizer's layout (every row alike)
        self.shift_bits = None
        self._shift_rows = ([None] * count, [None] * count)  # per side and row: (shift, scale or None) views
        self.refresh(stores)

    @staticmethod
    def takes(stores: list) -> bool:
        return all(isinstance(store, NSNStore) and store.key_window is not None and store.protected is None
                   and store.exact_keys is None and store.config.vector_dim == 8 for store in stores)

    def refresh(self, stores: list) -> bool:
        """Bring the reader up to date with ``stores`` (the same rows it was built for; False
        when they are not: build a new one); True when it reads them now."""
        if len(stores) != len(self.codes):
            return False
        changed = [row for row, (store, (keys, values)) in enumerate(zip(stores, self.codes, strict=True))
                   if store.key_codes is not keys or store.value_codes is not values]
        if not changed:
            return True
        rewrite = self.keys is not None  # tables built at an earlier step: rewrite the changed rows
        if not rewrite:  # the first codes (if any row has them now): both tables over every row at once
            held = [(store.key_codes, store.value_codes) for store in stores]
            first = next((keys for keys, _ in held if keys is not None), None)
            if first is not None:
                slots = first.codes.shape[-1]
                tables = (native.RowCodes([_nsn_row(keys) for keys, _ in held], slots=slots),
                          native.RowCodes([_nsn_row(values) for _, values in held], slots=slots))
                self.keys, self.values = tables
                self.vector_dim, self.chunk, self.stages = first.vector_dim, first.chunk, first.stages
                self.shift_bits = first.shift_bits
        for row in changed:
            keys, values = stores[row].key_codes, stores[row].value_codes
            if rewrite:
                self.keys.replace(row, _nsn_row(keys))
                self.values.replace(row, _nsn_row(values))
            self.codes[row] = (keys, values)
            self.key_tokens[row] = 0 if keys is None else keys.tokens()
            for side, codes in enumerate(self.codes[row]):  # views of the codes' own tensors: no copy
                self._shift_rows[side][row] = None if codes is None else (
                    codes.shift[0, 0], None if codes.shift_scale is None else codes.shift_scale[0, 0])
        return True

    @staticmethod
    def windows(stores: list) -> tuple[list, list]:
        return [s.key_window[0, 0] for s in stores], [s.value_window[0, 0] for s in stores]

    def _shifts(self, side: int) -> torch.Tensor:
        """float32 ``(R, most chunks, D)``: each row's chunk shifts (padded as stored, decoded
        each step: a decoded copy kept between steps would be memory the cache does not count)."""
        rows = self._shift_rows[side]
        like = next(row for row in rows if row is not None)
        empty = like[0].new_zeros(0, like[0].shape[-1])
        stored = pad_sequence([empty if row is None else row[0] for row in rows], batch_first=True)
        scale = None
        if like[1] is not None:
            none = like[1].new_zeros(0)
            scale = pad_sequence([none if row is None else row[1] for row in rows], batch_first=True)
        return shift_decode(stored, scale, self.shift_bits)

    def key_scores(self, rows_q: torch.Tensor, out: torch.Tensor) -> None:
        if self.keys is None or not self.keys.tokens:  # no row holds codes (yet, or any more)
            return
        book = codebook(self.vector_dim)
        qmu = rows_q @ self._shifts(0).transpose(1, 2)  # (R, G, C): <q, mu> per chunk
        native.nsn_scores(_rotate_rows(rows_q).contiguous(), book.vectors.to(rows_q.device).contiguous(), self.keys,
                          None, None, None, self.chunk, qmu.contiguous(), book.beta, out)

    def value_sums(self, weights: torch.Tensor) -> torch.Tensor | None:
        if self.values is None or not self.values.tokens:
            return None
        book = codebook(self.vector_dim)
        acc, chunk_weights = native.nsn_values(weights, self.values, None, None, None, self.chunk,
                                               book.vectors.to(weights.device).contiguous(), book.beta, self.stages)
        return _rotate_rows(acc) + chunk_weights @ self._shifts(1)


class KIVIRows:
    """The rows' KIVI blocks (at most one of keys and one of values a row) as the loops read them;
    float32 scales as they are. A lower-precision model's scales and minima are converted to
    float32 copies, which live only for the step (``keeps`` False: not kept to the next)."""

    def __init__(self, stores: list):
        self.blocks = [(tuple(store.key_blocks), tuple(store.value_blocks)) for store in stores]
        self.keeps = all(_float32_scales(blocks) for blocks in self.blocks)
        self.config = cfg = stores[0].config
        self.dim = dim = stores[0].key_residual.shape[-1]

        def rows(side, per_token):
            return native.RowBlocks([_kivi_row(blocks[side]) for blocks in self.blocks], dim=dim, bits=cfg.bits,
                                    group=cfg.group, per_token=per_token)

        self.keys, self.values = rows(0, False), rows(1, True)
        self.key_tokens = self.keys.table[:, 3].clone()
        self.value_tokens = self.values.table[:, 3].clone()

    @staticmethod
    def takes(stores: list) -> bool:
        if not all(isinstance(store, KIVIStore) and store.key_residual is not None for store in stores):
            return False
        cfg, dim = stores[0].config, stores[0].key_residual.shape[-1]
        return cfg.group % 8 == 0 and dim % 8 == 0 and dim <= native.MAX_DIM

    def refresh(self, stores: list) -> bool:
        """Bring the reader up to date with ``stores`` (the rows it was built for), rewriting only
        the rows whose blocks changed; False when it cannot (other rows, or blocks that would
        need float32 copies): build a new one."""
        if len(stores) != len(self.blocks):
            return False
        fresh = [(tuple(store.key_blocks), tuple(store.value_blocks)) for store in stores]
        changed = [row for row, (new, held) in enumerate(zip(fresh, self.blocks, strict=True))
                   if not _same_blocks(new, held)]
        if not all(_float32_scales(fresh[row]) for row in changed):
            return False
        for row in changed:
            self.keys.replace(row, _kivi_row(fresh[row][0]))
            self.values.replace(row, _kivi_row(fresh[row][1]))
            self.blocks[row] = fresh[row]
        if changed:
            self.key_tokens = self.keys.table[:, 3].clone()
            self.value_tokens = self.values.table[:, 3].clone()
        return True

    @staticmethod
    def windows(stores: list) -> tuple[list, list]:
        return [s.key_residual[0, 0] for s in stores], [s.value_residual[0, 0] for s in stores]

    def key_scores(self, rows_q: torch.Tensor, out: torch.Tensor) -> None:
        if self.keys.tokens:
            native.kivi_key_scores(rows_q, self.keys, None, None, self.config.bits, self.config.group, out)

    def value_sums(self, weights: torch.Tensor) -> torch.Tensor | None:
        if not self.values.tokens:
            return None
        out = weights.new_zeros(weights.shape[0], weights.shape[1], self.dim)
        return native.kivi_values(weights, self.values, None, None, self.config.bits, self.config.group, out)


def _same_blocks(a: tuple, b: tuple) -> bool:
    """The same block objects (keys, values) of one row."""
    return all(len(x) == len(y) and all(p is q for p, q in zip(x, y, strict=True)) for x, y in zip(a, b, strict=True))


def _float32_scales(blocks: tuple) -> bool:
    """A row's blocks (keys, values) the loops read as they are (no float32 copies)."""
    return all(block.scale.dtype == torch.float32 and block.minimum.dtype == torch.float32
               for side in blocks for block in side)


def _kivi_row(blocks: tuple):
    if not blocks:
        return None
    (block,) = blocks
    return (block.codes[0, 0].contiguous(), block.scale[0, 0].float().contiguous(),
            block.minimum[0, 0].float().contiguous())


READERS = (NSNRows, KIVIRows)


def reader_for(stores: list, query: torch.Tensor, backend: str, held=None):
    """The reader that attends ``stores`` in one pass for this step (``held``, the one built for
    an earlier step, brought up to date where it can be), or None: then each store attends on
    its own."""
    if not stores or not _cpu_decode(query, backend):
        return None
    if held is not None and held.takes(stores) and held.refresh(stores):
        return held
    for reader in READERS:
        if reader.takes(stores):
            return reader(stores)
    return None


def attend_rows(reader, stores: list, query: torch.Tensor, scale: float, *, softcap: float | None = None,
                need_mass: bool = False):
    """One decode step of ``query (R, 1, G, D)`` over R one-row stores: ``(out (R, 1, G, D),
    mass (R, width) or None)``, mass as each store's ``attend(return_mass=True)`` gives it (slot
    ``i`` a row's ``i``-th token), zero past the row's length."""
    rows_q = query[:, 0].float().contiguous()  # (R, G, D)
    count, group, _ = rows_q.shape
    key_windows, value_windows = reader.windows(stores)
    key_window = torch.tensor([len(w) for w in key_windows])
    value_window = torch.tensor([len(w) for w in value_windows])
    lengths = reader.key_tokens + key_window  # == value_tokens + value_window
    width = int(lengths.max())
    # token order, plus one column the padding of the windows goes to (hidden)
    scores = rows_q.new_empty(count, group, width + 1)
    reader.key_scores(rows_q, scores[:, :, :int(reader.key_tokens.max())])
    window_scores = rows_q @ pad_sequence(key_windows, batch_first=True).float().transpose(1, 2)
    key_columns = _window_columns(reader.key_tokens, key_window, width).expand(-1, group, -1)
    scores.scatter_(2, key_columns, window_scores)
    hide = (torch.arange(width + 1) >= lengths[:, None])[:, None, None].to(scores.device)
    probs = _softmax(scores[:, None], scale, softcap, 1, hide=hide)[:, 0]  # (R, G, width + 1)
    columns = _window_columns(reader.value_tokens, value_window, width).expand(-1, group, -1)
    out = probs.gather(2, columns) @ pad_sequence(value_windows, batch_first=True).float()
    coded = reader.value_sums(probs[:, :, :int(reader.value_tokens.max())])
    if coded is not None:
        out += coded
    mass = probs[:, :, :width].sum(1) if need_mass else None
    return out[:, None].to(query.dtype), mass


def _window_columns(coded: torch.Tensor, window: torch.Tensor, width: int) -> torch.Tensor:
    """``(R, 1, most window)`` int64: the token-order column of each row's window token ``j``
    (``coded + j``), the hidden column ``width`` past the row's window."""
    j = torch.arange(int(window.max()))
    return torch.where(j < window[:, None], coded[:, None] + j, width)[:, None]
