"""KV-cache quantization: the quantizer protocol every quantizer of ``CompressedCache`` follows,
and KIVI (Liu et al., ICML 2024).

KIVI: asymmetric min-max codes at 2 or 4 bits, packed into bytes. **Keys per channel**: a group
is ``group`` consecutive tokens of one channel (keys have outlier channels, so a channel's range
is its own). **Values per token**: a group is ``group`` consecutive channels of one token. The
newest tokens stay in full precision (``residual``), since they are attended the most.
``KIVIStore`` holds one layer's keys and values that way and gives them back dequantized.

Quantizer protocol
------------------
``CompressedCache(policy=..., quantizer=q)`` asks only this of ``q`` (``Quantizer`` and
``QuantizedStore`` below spell it out as ``typing.Protocol`` classes):

- ``q.validate(head_dim, dtype)``: raise ``ValueError`` naming the setting when the quantizer
  cannot hold keys/values of that head dim and dtype. Called at ``patch()`` (from the model's
  config) and at a layer's first update, before anything is stored.
- ``q.new_store()``: an empty ``QuantizedStore`` for one layer.
- ``q.evicts_exactly`` (bool): whether ``store.select_tokens`` drops tokens without touching the
  codes of the others (token-wise codes: True; KIVI's per-channel key groups: False, documented
  below). Informational: ``stats()`` reports it.

A ``QuantizedStore`` holds one layer's keys and values ``(B, H_kv, T, D)`` in token order, post
RoPE (the cache sees keys after RoPE):

- ``append(keys, values)``: add ``(B, H_kv, n, D)`` tokens at the end, keeping a window of the
  newest tokens in full precision as the method prescribes. Validates shape, dtype and batch
  against what it holds *before* changing anything (``ValueError`` naming the expected shape).
- ``len(store)``: tokens held; ``nbytes()``: every byte held (codes, scales, shifts, residual
  window; read buffers are the cache's and counted there).
- ``keys(out=None)`` / ``values(out=None)``: all tokens dequantized, ``(B, H_kv, T, D)`` in the
  dtype appended, written into ``out`` (a slice of a larger buffer) when given. This is the
  dequantize-then-attend fallback used when the reader is not effllm's attention.
- ``select_batch(index)``: keep batch rows ``index`` (a row may repeat): beam search, batch
  selection.
- ``select_tokens(index)``: keep tokens ``index (B, H_kv, n)`` int64, sorted per row, every row
  the same ``n``: decode-time eviction composed with quantization.
- ``full_precision_tokens()``: ``(keys, values)`` newest tokens held in full precision.
- optional ``attend(query, scale, *, softcap=None, return_mass=False, backend="auto")``: attention of ``query
  (B, H, Sq, D)`` (the queries of the last ``Sq`` tokens held: already appended, causal among
  themselves; GQA when ``H > H_kv``) over every token held, reading the codes without a
  full-precision copy of the cache. Returns ``out (B, Sq, H, D)`` in ``query.dtype``, and with
  ``return_mass`` also float32 ``(B, H_kv, T)``: the probability each held token received,
  summed over the ``Sq`` queries and the query heads of its KV head (eviction policies that
  score while decoding need it). effllm's attention calls it for decode steps (``Sq <= 16``)
  when present; without it the cache dequantizes into read buffers shared by all layers and
  runs ``decode_attention``.

KIVI with eviction: ``select_tokens`` dequantizes the layer, keeps the tokens, and appends them
to a fresh store: value codes (per token) come back the same up to rounding, keys are regrouped
over the kept tokens and quantized again, so a decode-time eviction adds one more rounding to the
keys of the tokens that stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class QuantizedStore(Protocol):
    """One layer's quantized keys and values; see "Quantizer protocol" in the module docstring."""

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None: ...  # a store with attend: also defer=
    def __len__(self) -> int: ...
    def nbytes(self) -> int: ...
    def keys(self, out: torch.Tensor | None = None) -> torch.Tensor: ...
    def values(self, out: torch.Tensor | None = None) -> torch.Tensor: ...
    def select_batch(self, index: torch.Tensor) -> None: ...
    def select_tokens(self, index: torch.Tensor) -> None: ...
    def full_precision_tokens(self) -> tuple[int, int]: ...


@runtime_checkable
class Quantizer(Protocol):
    """A KV quantizer ``CompressedCache`` can hold; see "Quantizer protocol" above."""

    evicts_exactly: bool

    def validate(self, head_dim: int, dtype: torch.dtype) -> None: ...
    def new_store(self) -> QuantizedStore: ...


@dataclass
class QuantizedKV:
    """Codes of a ``(..., T, D)`` tensor, packed along D, with each group's scale and minimum.

    ``axis=-2`` (keys): a group is ``group`` tokens of one channel; ``scale``/``minimum`` are
    ``(..., T // group, D)``. ``axis=-1`` (values): ``group`` channels of one token;
    ``(..., T, D // group)``."""

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    group: int
    axis: int
    dim: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))

    def tokens(self) -> int:
        return self.codes.shape[-2]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes (..., D)`` uint8 below ``2**bits`` -> ``(..., D * bits // 8)`` uint8, in planes:
    with ``n = D * bits // 8``, code ``j`` sits in byte ``j % n`` at bits ``(j // n) * bits``
    upwards. Unpacking is then a shift and a mask over contiguous bytes per plane, which torch's
    CPU loops run several times faster than codes packed next to each other (runs of 2-4)."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"pack: the last dim ({codes.shape[-1]}) must be a multiple of {per_byte} at {bits} bits")
    n = codes.shape[-1] // per_byte
    packed = codes[..., :n].clone()
    for plane in range(1, per_byte):
        packed |= codes[..., plane * n:(plane + 1) * n] << (plane * bits)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``."""
    mask = 2**bits - 1
    return torch.cat([(packed >> (plane * bits)) & mask for plane in range(8 // bits)], dim=-1)


def quantize_groups(x: torch.Tensor, bits: int, group: int, axis: int) -> QuantizedKV:
    """Asymmetric min-max quantization of ``x (..., T, D)`` in groups of ``group`` along ``axis``
    (-2: tokens, -1: channels); the code is ``round((x - min) / scale)``, ``scale = (max - min) /
    (2**bits - 1)``. Scales and minima keep ``x``'s dtype (or float32 for float32)."""
    if axis not in (-1, -2):
        raise ValueError(f"quantize_groups: axis must be -2 (tokens) or -1 (channels), got {axis}")
    if x.shape[axis] % group:
        raise ValueError(f"quantize_groups: x.shape[{axis}] ({x.shape[axis]}) must be a multiple of group ({group})")
    tokens, dim = x.shape[-2:]
    xf = x.float()
    if axis == -2:
        grouped = xf.view(*x.shape[:-2], tokens // group, group, dim)  # reduce over dim -2
        lo, hi = grouped.amin(dim=-2, keepdim=True), grouped.amax(dim=-2, keepdim=True)
    else:
        grouped = xf.view(*x.shape[:-1], dim // group, group)  # reduce over dim -1
        lo, hi = grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((grouped - lo) / scale).round_().clamp_(0, levels).to(torch.uint8).view(x.shape)
    keep = torch.float32 if x.dtype == torch.float32 else x.dtype
    return QuantizedKV(pack(codes, bits), scale.squeeze(axis).to(keep), lo.squeeze(axis).to(keep), bits, group,
                       axis, dim)


def dequantize(q: QuantizedKV, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(..., T, D)`` in ``dtype`` from ``q``, written into ``out`` when given (a slice of a
    larger buffer: no copy afterwards)."""
    codes = unpack(q.codes, q.bits)
    tokens, dim = codes.shape[-2:]
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if q.axis == -2:
        # code * scale + minimum in one pass, the uint8 codes converted on the fly
        split = (*codes.shape[:-2], tokens // q.group, q.group, dim)
        torch.addcmul(q.minimum.unsqueeze(-2), codes.view(split), q.scale.unsqueeze(-2), out=out.view(split))
    else:
        # scales spelled out per channel first: a scale broadcast over runs of `group` channels
        # along the innermost dim is much slower in bf16 in torch's CPU loops
        scale, minimum = (t.repeat_interleave(q.group, dim=-1) for t in (q.scale, q.minimum))
        torch.addcmul(minimum, codes.to(scale.dtype), scale, out=out)
    return out


def _merged(blocks: list[QuantizedKV], new: QuantizedKV) -> list[QuantizedKV]:
    """``blocks`` (at most one) with ``new``'s tokens appended, as one block: a reader then
    makes a few calls per layer, not a few per flushed block (at 4k tokens and residual 128,
    31 blocks a layer). Groups never straddle a flush, so codes, scales and minima
    concatenate along the tokens as they are; the copy happens once per flush."""
    if not blocks:
        return [new]
    (old,) = blocks
    return [QuantizedKV(*(torch.cat([a, b], dim=-2) for a, b in ((old.codes, new.codes), (old.scale, new.scale),
                                                                (old.minimum, new.minimum))),
                        old.bits, old.group, old.axis, old.dim)]


class KIVI:
    """KIVI settings: ``bits`` 2 or 4, ``group`` tokens (keys) or channels (values) per scale,
    ``residual`` newest tokens kept in full precision (a multiple of ``group``; the paper's
    LongBench runs use group 32, residual 128)."""

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128):
        if type(bits) is not int or bits not in (2, 4):  # 2.0 or True would pass `in (2, 4)`
            raise ValueError(f"KIVI: bits must be 2 or 4 (an int), got {bits!r}")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"KIVI: group must be an int >= 1, got {group!r}")
        if isinstance(residual, bool) or not isinstance(residual, int) or residual < group or residual % group:
            raise ValueError(f"KIVI: residual must be a positive multiple of group ({group}), got {residual!r}")
        self.bits, self.group, self.residual = bits, group, residual

    evicts_exactly = False  # keys share scales over groups of tokens: an eviction regroups them

    def __repr__(self) -> str:
        return f"KIVI(bits={self.bits}, group={self.group}, residual={self.residual})"

    def validate(self, head_dim: int, dtype: torch.dtype) -> None:
        """Raise ``ValueError`` unless keys/values of ``head_dim`` and ``dtype`` can be held."""
        if head_dim % self.group or head_dim * self.bits % 8:
            raise ValueError(f"KIVI: head dim {head_dim} must be a multiple of group ({self.group}) and of "
                             f"{8 // self.bits} (codes per byte)")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"KIVI: keys and values must be float32, float16 or bfloat16, got {dtype}")

    def new_store(self) -> KIVIStore:
        return KIVIStore(self)


class KIVIStore:
    """One layer's keys and values ``(B, H, T, D)`` under KIVI.

    Keys: once ``residual`` full-precision tokens have gathered, they are quantized as a block
    (per channel, ``group`` tokens a scale), so 0 to ``residual - 1`` of the newest keys are
    full precision, as in KIVI. Values: when ``2 * residual`` have gathered, the oldest
    ``residual`` are quantized (per token), so the newest ``residual`` to ``2 * residual - 1``
    stay full precision. (KIVI's code quantizes the oldest value at every step; flushing
    ``residual`` at a time makes that one quantize call per ``residual`` steps, not a copy of
    the value codes at every step.)
    """

    def __init__(self, config: KIVI):
        self.config = config
        # the coded tokens, as one block each (a list: empty until the first flush)
        self.key_blocks: list[QuantizedKV] = []
        self.value_blocks: list[QuantizedKV] = []
        self.key_residual: torch.Tensor | None = None
        self.value_residual: torch.Tensor | None = None

    def __len__(self) -> int:
        quantized = sum(block.tokens() for block in self.key_blocks)
        return quantized + (0 if self.key_residual is None else self.key_residual.shape[-2])

    def append(self, keys: torch.Tensor, values: torch.Tensor, *, defer: bool = False) -> None:
        """Append ``keys``/``values (B, H, n, D)``. ``defer``: quantize what is due at the next
        append, not now, so the step that reads the store over its codes (``attend``) reads its
        own tokens exactly (as KIVI does)."""
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(f"KIVIStore.append: keys and values must be (B, H, n, D) of one shape, got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        try:
            self.config.validate(keys.shape[-1], keys.dtype)
        except ValueError as exc:
            raise ValueError(f"KIVIStore.append: {exc}") from None
        if self.key_residual is not None and (keys.shape[:2] != self.key_residual.shape[:2]
                                              or keys.shape[-1] != self.key_residual.shape[-1]
                                              or keys.dtype != self.key_residual.dtype):
            raise ValueError(f"KIVIStore.append: expected (B, H, n, D) = ({', '.join(map(str, self.key_residual.shape[:2]))}"
                             f", n, {self.key_residual.shape[-1]}) of {self.key_residual.dtype}, got "
                             f"{tuple(keys.shape)} of {keys.dtype}")
        if self.key_residual is not None:
            self._flush()  # what an earlier step deferred, before the window grows
        self.key_residual = keys if self.key_residual is None else torch.cat([self.key_residual, keys], dim=-2)
        self.value_residual = values if self.value_residual is None else torch.cat([self.value_residual, values], -2)
        if not defer:
            self._flush()

    def _flush(self) -> None:
        """Quantize every whole ``residual`` of keys held in full precision, and the values past
        the newest ``residual``, in blocks of ``residual``."""
        cfg = self.config
        full = self.key_residual.shape[-2] // cfg.residual * cfg.residual
        if full:
            self.key_blocks = _merged(self.key_blocks,
                                      quantize_groups(self.key_residual[..., :full, :], cfg.bits, cfg.group, axis=-2))
            self.key_residual = self.key_residual[..., full:, :].clone()  # drop the quantized tokens' storage
        old = (self.value_residual.shape[-2] - cfg.residual) // cfg.residual * cfg.residual
        if old > 0:
            self.value_blocks = _merged(self.value_blocks, quantize_groups(self.value_residual[..., :old, :], cfg.bits,
                                                                           cfg.group, axis=-1))
            self.value_residual = self.value_residual[..., old:, :].clone()

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search, batch selection; a row may repeat)."""
        if self.key_residual is None:
            return  # nothing appended yet
        for block in self.key_blocks + self.value_blocks:
            block.codes, block.scale, block.minimum = (t.index_select(0, index)
                                                       for t in (block.codes, block.scale, block.minimum))
        self.key_residual = self.key_residual.index_select(0, index)
        self.value_residual = self.value_residual.index_select(0, index)

    def select_tokens(self, index: torch.Tensor) -> None:
        """Keep tokens ``index (B, H, n)`` (sorted per row): the kept tokens, dequantized, are
        appended to an emptied store (values come back with the same codes up to rounding; keys
        are regrouped over the kept tokens and quantized again)."""
        gather = index.unsqueeze(-1).expand(-1, -1, -1, self.key_residual.shape[-1])
        keys, values = torch.gather(self.keys(), 2, gather), torch.gather(self.values(), 2, gather)
        self.key_blocks, self.value_blocks = [], []
        self.key_residual = self.value_residual = None
        self.append(keys, values)

    def attend(self, query: torch.Tensor, scale: float, *, softcap: float | None = None, return_mass: bool = False,
               backend: str = "auto"):
        """Attention of the last ``Sq`` tokens' ``query (B, H, Sq, D)`` over every token held,
        reading the codes: keys' per-channel scales folded into the query, values' per-token
        scales into the weights (``kv/codes_attention.py::kivi_attend``). One torch path
        serves every ``backend`` (no KIVI kernel yet)."""
        from .codes_attention import kivi_attend

        return kivi_attend(self, query, scale, softcap=softcap, return_mass=return_mass)

    def keys(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """All keys ``(B, H, T, D)``, the quantized ones dequantized (into ``out`` if given)."""
        return self._gather(self.key_blocks, self.key_residual, out)

    def values(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._gather(self.value_blocks, self.value_residual, out)

    def _gather(self, blocks, residual, out):
        if residual is None:
            raise ValueError("KIVIStore: nothing appended yet")
        if out is None:
            tokens = sum(block.tokens() for block in blocks) + residual.shape[-2]
            out = residual.new_empty(*residual.shape[:-2], tokens, residual.shape[-1])
        start = 0
        for block in blocks:  # each block dequantized straight into its slice
            dequantize(block, residual.dtype, out=out[..., start:start + block.tokens(), :])
            start += block.tokens()
        out[..., start:, :] = residual
        return out

    def nbytes(self) -> int:
        """Bytes held: codes, scales and minima, and the full-precision residuals."""
        total = sum(block.nbytes() for block in self.key_blocks + self.value_blocks)
        for residual in (self.key_residual, self.value_residual):
            if residual is not None:
                total += residual.numel() * residual.element_size()
        return total

    def full_precision_tokens(self) -> tuple[int, int]:
        """How many of the newest keys and values are held in full precision."""
        return tuple(0 if t is None else t.shape[-2] for t in (self.key_residual, self.value_residual))


def bits_per_element(config: KIVI, dtype: torch.dtype) -> float:
    """Storage per quantized element: its code, plus a scale and a minimum per group."""
    return config.bits + 2 * torch.finfo(dtype).bits / config.group
