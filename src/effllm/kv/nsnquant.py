"""NSNQuant (Son, Choi & Yoo, NeurIPS 2025, arXiv 2505.18231): 1- or 2-bit KV codes against one
fixed codebook, with no calibration.

Every key or value token ``x`` of one head (``D`` channels) is turned into something that looks
like a standard-normal sample, then vector-quantized in ``vector_dim``-channel pieces:

1. **N**ormalize per token: ``s1 = |x| / sqrt(D)`` (kept as an 8-bit log code, see below),
   ``x1 = x / s1``.
2. **S**hift per channel: ``x2 = x1 - mu``, ``mu`` the mean of ``x1`` over a *chunk* of
   ``chunk`` consecutive tokens of that head (one per channel and chunk, stored in float16, or
   with ``shift_bits=8`` as int8 times one float16 scale a chunk; the stored value is the one
   subtracted, so its rounding only leaves the chunk less well centred).
   Keys are stored after RoPE, which turns a channel pair by an angle that grows with the
   position: over a whole sequence the mean of a fast-turning pair averages away, over a short
   chunk the slow pairs (where keys' outlier channels sit) keep their offset, so the shift is
   taken per chunk, not per sequence.
3. **N**ormalize per token again: ``s2 = |x2| / sqrt(D)``, ``x3 = x2 / s2``.
4. Rotate: ``y = H x3`` (``kv/hadamard.py``), entries close to i.i.d. N(0, 1).
5. Split ``y`` into ``D / vector_dim`` sub-vectors and code each against the fixed codebook of
   ``2 ** vector_dim`` vectors (``kv/codebook.py``): 1 bit an element is one index a
   sub-vector; 2 bits is two (the second codes what the first left, with the same codebook
   scaled by ``beta``).
6. Per token, a gain ``g`` of the decoded ``y_hat``: ``gain="norm"`` (the default) keeps the
   token's norm, ``g = |y| / |y_hat|``; ``gain="least_squares"`` minimises the error,
   ``g = <y, y_hat> / |y_hat|^2``, which shrinks every token by its cosine to the code. Attention
   reads keys through ``exp(q . k)``: shrunk keys flatten every head's attention and shrunk
   values its output, and on SmolLM2 pass-key prompts after eviction the norm gain gives back
   about 40% of what 2-bit codes cost, for ~3% more squared error at 2 bits (the error ratio is
   ``2 / (1 + cos)``); docs/kv.md, "Session 15: the norm gain".

The token comes back as ``x_hat = a * H y_hat + b * mu`` with ``a = s1 * s2 * g`` and ``b = s1``:
two scales a token, stored as 8-bit codes of ``log2`` on a per-chunk grid (``lo``, ``step``
float32 per chunk, at most ``SPAN`` octaves below the chunk's largest scale). ``s1`` is rounded
to its code *before* the shift is taken, so that rounding costs nothing.

``NSNStore`` keeps one layer's keys and values: the newest ``residual`` to ``residual + chunk -
1`` tokens in full precision, older ones as codes, ``chunk`` tokens at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..quant.formats import int8_quantize
from .codebook import Codebook, codebook, decode, encode
from .hadamard import fwht
from .exact_keys import ExactKeys
from .protected import ProtectedTokens

KEY_RESIDUALS = ("16-bit", "codes")  # how exact keys' residuals are held (NSNQuant(key_residual=))
SPAN = 24.0  # octaves a chunk's scale codes cover; smaller scales are raised to the floor
LEVELS = 255  # 8-bit scale codes
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GAINS = ("norm", "least_squares")
SHIFT_BITS = (16, 8)  # the channel shift: float16, or int8 times a float16 scale a chunk


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class NSNQuant:
    """NSNQuant settings: ``bits`` 1 or 2 per element, ``vector_dim`` 8 (or 4) channels a
    codebook vector, ``residual`` newest tokens always kept in full precision, ``chunk``
    tokens quantized at a time (and sharing one channel shift).

    Head dims must be a multiple of ``vector_dim``; a head dim that is not a power of two is
    rotated by a block-diagonal Hadamard (blocks of its largest power-of-two divisor, see
    ``kv/hadamard.py``), which spreads outlier channels less.

    ``gain``: ``"norm"`` (default) or ``"least_squares"``, the per-token gain of step 6 above.

    ``protect`` (0 to 1, default 0): mixed precision by importance. Of the tokens an eviction
    policy ranked before they were coded, the best-ranked fraction ``protect`` also keep their
    coding error as a 16-bit residual and read back near-exact (``kv/protected.py``); tokens
    coded without a ranking (decode steps, a quantizer alone) are never protected. Each
    protected token costs ``4 * D + 4`` bytes more (keys and values).

    ``key_heads`` (default 0): exact keys on the sharpest heads. A float in (0, 1) is a fraction
    of the cache's (layer, KV head) rows, an int >= 1 a count of them (at least one row when
    positive): per batch row, the rows whose attention over the prompt is sharpest (lowest
    entropy of the last 32 prompt queries, measured in the prefill before eviction) keep every
    coded key's coding error as a 16-bit residual (``kv/exact_keys.py``), ``2 * D`` bytes a coded
    key of such a row; their values stay at their codes. ``key_residual="codes"`` codes that
    residual again instead (a second code of ``key_residual_bits``, default ``bits``, with these
    settings otherwise: ``key_residual_bits * D / 8`` bytes and its scales a key; no longer
    near-exact, but at the second code's error of the first one's). Chosen once, at the end of
    the first prefill, across all layers; needs an eviction policy's prefill (the cache of a
    patched model, or one built with the model's config). ``key_heads="all"`` is every row: nothing
    is measured or chosen, so it needs neither (with ``key_residual="codes"``: every key coded
    twice, keys at ``bits + key_residual_bits`` bits an element, values at ``bits``).

    ``shift_bits`` (16 or 8; default 16): how each chunk's channel shift is stored: float16, or
    symmetric int8 times one float16 scale per chunk, batch row and KV head (the shift is
    ``16 / chunk`` of the bits an element at 16: 0.5 of 2.81 at ``chunk=32``; 0.26 at 8). The
    rounded shift is the one the transform subtracts, so it costs centring, not consistency
    (4 bits was tried and dropped: with an outlier channel setting the scale, the other
    channels' offsets round away and the error nearly triples). A second key code
    (``key_residual="codes"``) stores its shifts the same way."""

    evicts_exactly = True

    def __init__(self, bits: int = 2, vector_dim: int = 8, residual: int = 64, chunk: int = 64,
                 protect: float = 0.0, gain: str = "norm", key_heads: float | int | str = 0,
                 key_residual: str = "16-bit", key_residual_bits: int | None = None, shift_bits: int = 16):
        if type(bits) is not int or bits not in (1, 2):  # 2.0 or True would pass `in (1, 2)`
            raise ValueError(f"NSNQuant: bits must be 1 or 2 (an int), got {bits!r}")
        if type(vector_dim) is not int or vector_dim not in (4, 8):
            raise ValueError(f"NSNQuant: vector_dim must be 8 or 4 (an int), got {vector_dim!r}")
        if not _is_int(residual) or residual < 0:
            raise ValueError(f"NSNQuant: residual must be an int >= 0, got {residual!r}")
        if not _is_int(chunk) or chunk < 1:
            raise ValueError(f"NSNQuant: chunk must be an int >= 1, got {chunk!r}")
        if isinstance(protect, bool) or not isinstance(protect, (int, float)) or not 0 <= protect <= 1:
            raise ValueError(f"NSNQuant: protect must be a fraction in [0, 1], got {protect!r}")
        self.bits, self.vector_dim, self.residual, self.chunk = bits, vector_dim, residual, chunk
        if gain not in GAINS:
            raise ValueError(f"NSNQuant: gain must be one of {', '.join(map(repr, GAINS))}, got {gain!r}")
        self.protect, self.gain = float(protect), gain
        fraction = isinstance(key_heads, float) and 0 < key_heads < 1
        if not (fraction or key_heads in (0, "all") or (_is_int(key_heads) and key_heads >= 1)):
            # 1.0 is refused rather than read as every row: next to key_heads=1 (one row) it is a trap
            raise ValueError(f"NSNQuant: key_heads must be 0, a fraction in (0, 1), an int >= 1 (a count of (layer, "
                             f"KV head) rows) or 'all' (every row), got {key_heads!r}")
        if key_heads and self.protect:
            # both would keep a residual of the same protected keys (read back as k_hat + 2 r)
            raise ValueError("NSNQuant: protect and key_heads together are not supported yet; use one of them")
        self.key_heads = key_heads
        if key_residual not in KEY_RESIDUALS:
            raise ValueError(f"NSNQuant: key_residual must be one of {', '.join(map(repr, KEY_RESIDUALS))}, got "
                             f"{key_residual!r}")
        self.key_residual = key_residual
        if key_residual != "16-bit" and not key_heads:
            raise ValueError(f"NSNQuant: key_residual={key_residual!r} applies to the rows key_heads keeps; "
                             f"key_heads is 0")
        if key_residual_bits is not None and key_residual != "codes":
            raise ValueError(f"NSNQuant: key_residual_bits applies to key_residual='codes', got it with "
                             f"key_residual={key_residual!r}")
        if key_residual_bits is not None and (type(key_residual_bits) is not int or key_residual_bits not in (1, 2)):
            raise ValueError(f"NSNQuant: key_residual_bits must be 1 or 2 (an int) or None, got {key_residual_bits!r}")
        self.key_residual_bits = bits if key_residual_bits is None else key_residual_bits
        if type(shift_bits) is not int or shift_bits not in SHIFT_BITS:
            raise ValueError(f"NSNQuant: shift_bits must be one of {SHIFT_BITS} (an int), got {shift_bits!r}")
        self.shift_bits = shift_bits

    def __repr__(self) -> str:
        return (f"NSNQuant(bits={self.bits}, vector_dim={self.vector_dim}, residual={self.residual}, "
                f"chunk={self.chunk}" + (f", protect={self.protect:g}" if self.protect else "")
                + (f", key_heads={self.key_heads!r}" if self.key_heads else "")
                + (f", key_residual={self.key_residual!r}" if self.key_residual != "16-bit" else "")
                + (f", key_residual_bits={self.key_residual_bits}"
                   if self.key_residual == "codes" and self.key_residual_bits != self.bits else "")
                + (f", shift_bits={self.shift_bits}" if self.shift_bits != 16 else "")
                + (f", gain={self.gain!r})" if self.gain != "norm" else ")"))

    @property
    def takes_priority(self) -> bool:
        """Whether stores want the policy's ranking of the tokens they code (``protect > 0``)."""
        return self.protect > 0

    def residual_coder(self) -> NSNQuant:
        """The quantizer that codes exact keys' residuals again (``key_residual="codes"``)."""
        return NSNQuant(bits=self.key_residual_bits, vector_dim=self.vector_dim, residual=0, chunk=self.chunk,
                        gain=self.gain, shift_bits=self.shift_bits)

    @property
    def chooses_key_heads(self) -> bool:
        """Whether the cache must measure and choose the rows that keep exact keys (``key_heads``
        set, and not every row)."""
        return bool(self.key_heads) and not self.every_key_row

    @property
    def every_key_row(self) -> bool:
        """``key_heads="all"``: every row keeps its keys' residuals, nothing to choose."""
        return self.key_heads == "all"

    def key_head_count(self, rows: int) -> int:
        """How many of ``rows`` (layer, KV head) rows keep exact keys (``key_heads``)."""
        if not self.key_heads:
            return 0
        if self.every_key_row:
            return rows
        if isinstance(self.key_heads, float):
            return min(rows, max(1, round(self.key_heads * rows)))
        return min(rows, int(self.key_heads))

    def validate(self, head_dim: int, dtype: torch.dtype) -> None:
        """Raise ``ValueError`` unless keys/values of ``head_dim`` channels in ``dtype`` fit."""
        if not _is_int(head_dim) or head_dim < self.vector_dim or head_dim % self.vector_dim:
            raise ValueError(f"NSNQuant: head dim must be a positive multiple of vector_dim "
                             f"({self.vector_dim}), got {head_dim!r}")
        if dtype not in DTYPES:
            raise ValueError(f"NSNQuant: keys and values must be float16, bfloat16 or float32, got {dtype}")
        # 4-dim sub-vectors index a 16-entry codebook: two 4-bit indices a byte, so a token's
        # count of them (sub-vectors times stages) must be even; 1 bit (the codes', or a second
        # key code's) at a head dim of 4 mod 8 is odd
        second = self.key_residual_bits if self.key_heads and self.key_residual == "codes" else 2
        if self.vector_dim == 4 and head_dim % 8 and 1 in (self.bits, second):
            raise ValueError(f"NSNQuant: with vector_dim=4, a 1-bit code of head dim {head_dim} has an odd number "
                             f"of 4-bit indices a token ({head_dim // 4}); use a head dim that is a multiple of 8, "
                             f"vector_dim=8, or 2 bits")

    def new_store(self) -> NSNStore:
        return NSNStore(self)

    def codebook(self) -> Codebook:
        return codebook(self.vector_dim)

    def bits_per_element(self, head_dim: int) -> float:
        """Storage per quantized element, everything counted: the codes, two 8-bit scale codes a
        token, a ``shift_bits`` shift per channel (and below 16 a float16 scale) and four float32
        scale-grid numbers per chunk."""
        shift = self.shift_bits / self.chunk + (16 / (self.chunk * head_dim) if self.shift_bits < 16 else 0)
        return self.bits + 16 / head_dim + shift + 4 * 32 / (self.chunk * head_dim)


# ---- packing ------------------------------------------------------------------------------------

def pack_indices(indices: torch.Tensor, index_bits: int) -> torch.Tensor:
    """Codebook indices ``(..., n)`` below ``2 ** index_bits`` -> uint8 bytes: one a byte at 8
    bits; at 4 bits two a byte in planes (index ``j`` in byte ``j % (n / 2)``, high nibble for
    the second half), so unpacking is one shift and mask over contiguous bytes."""
    if index_bits == 8:
        return indices.to(torch.uint8)
    if index_bits != 4 or indices.shape[-1] % 2:
        raise ValueError(f"pack_indices: index_bits must be 8, or 4 with an even count; got {index_bits} "
                         f"bits, {indices.shape[-1]} indices")
    half = indices.shape[-1] // 2
    codes = indices.to(torch.uint8)
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_indices(packed: torch.Tensor, index_bits: int) -> torch.Tensor:
    """Inverse of ``pack_indices``, as int64."""
    if index_bits == 8:
        return packed.long()
    return torch.cat([packed & 15, packed >> 4], dim=-1).long()


def log_encode(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit codes of positive ``scales (..., L)`` on a ``log2`` grid per row: returns
    ``(codes uint8 (..., L), lo, step (...) float32)`` with ``scale ~ 2 ** (lo + step * code)``,
    relative error at most ``2 ** (step / 2) - 1`` (under 1.1% for a span of 8 octaves).
    Scales more than ``SPAN`` octaves below the row's largest come back as that floor."""
    logs = scales.float().clamp_min(torch.finfo(torch.float32).tiny).log2()
    hi = logs.amax(-1)
    lo = torch.maximum(logs.amin(-1), hi - SPAN)
    step = (hi - lo) / LEVELS
    codes = ((logs - lo[..., None]) / step.clamp_min(1e-30)[..., None]).round_().clamp_(0, LEVELS)
    return codes.to(torch.uint8), lo, step


def log_decode(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Scales from ``log_encode``'s codes; ``lo``/``step`` broadcast against ``codes``."""
    return torch.exp2(lo + step * codes.float())


def shift_encode(mu: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored form of the channel shifts ``mu (..., D)`` float32: float16 at 16 bits (no scale),
    int8 in ``[-127, 127]`` times a float16 scale per row (the largest ``|mu|`` over 127) at 8.
    Returns ``(stored, scale (...) or None)``."""
    if bits == 16:
        return mu.to(torch.float16), None
    # float32 shifts, float16 scales (the divisor: half a step at most); an all-zero row's scale is 1
    q, scale = int8_quantize(mu.reshape(-1, mu.shape[-1]), scale_dtype=torch.float16)
    return q.view(mu.shape), scale.view(mu.shape[:-1])


def shift_decode(stored: torch.Tensor, scale: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``mu (..., D)`` float32 from ``shift_encode``'s output."""
    if bits == 16:
        return stored.float()
    return stored.float() * scale.float()[..., None]


# ---- the transform --------------------------------------------------------------------------------

def _norm(x: torch.Tensor) -> torch.Tensor:
    """``|x| / sqrt(D)`` over the last dim, kept, floored at the smallest normal float32."""
    return (x.square().mean(-1, keepdim=True).sqrt()).clamp_min(torch.finfo(torch.float32).tiny)


def nsn_forward(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact transform of ``x (B, H, T, D)`` (``T`` a multiple of ``chunk``), in float32:
    ``(y, s1, s2, mu)`` with ``y (B, H, T, D)`` rotated, ``s1``/``s2 (B, H, T, 1)`` and
    ``mu (B, H, T // chunk, D)``. ``nsn_inverse`` undoes it."""
    batch, heads, tokens, dim = x.shape
    x = x.float().view(batch, heads, tokens // chunk, chunk, dim)
    s1 = _norm(x)
    x1 = x / s1
    mu = x1.mean(3)
    x2 = x1 - mu[:, :, :, None]
    s2 = _norm(x2)
    y = fwht(x2 / s2)
    flat = (batch, heads, tokens)
    return y.reshape(*flat, dim), s1.reshape(*flat, 1), s2.reshape(*flat, 1), mu


def nsn_inverse(y: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``x = s1 * (s2 * H y + mu)``, the inverse of ``nsn_forward``."""
    batch, heads, tokens, dim = y.shape
    chunks = mu.shape[2]
    x = s2 * fwht(y)
    x = x.view(batch, heads, chunks, tokens // chunks, dim) + mu[:, :, :, None]
    return s1 * x.view(batch, heads, tokens, dim)


# ---- codes ----------------------------------------------------------------------------------------

@dataclass
class NSNCodes:
    """One layer's quantized keys (or values): ``T`` tokens of ``(B, H, T, D)``.

    - ``codes (B, H, T, n)`` uint8: each token's codebook indices, stage-major (all sub-vectors'
      first codes, then their second codes), packed by ``pack_indices``.
    - ``scales (B, H, T, 2)`` uint8: 8-bit log codes of ``a`` and ``b``.
    - ``grid (B, H, C, 2, 2)`` float32: per chunk, ``(lo, step)`` of ``a`` then of ``b``.
    - ``shift (B, H, C, D)`` float16 (``shift_bits=16``) or int8 (8): per chunk, the channel
      shift ``mu`` (``shift_values()``), with ``shift_scale (B, H, C)`` float16 at 8 bits
      (``shift_encode``).
    - ``counts (B, H, C)`` int32 or None: tokens of each chunk a row still holds after an
      eviction; None while every chunk holds its ``chunk`` tokens (token ``t`` is in chunk
      ``t // chunk``)."""

    codes: torch.Tensor
    scales: torch.Tensor
    grid: torch.Tensor
    shift: torch.Tensor
    counts: torch.Tensor | None
    stages: int
    vector_dim: int
    chunk: int
    shift_scale: torch.Tensor | None = None
    shift_bits: int = 16

    def tokens(self) -> int:
        return self.codes.shape[2]

    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.grid, self.shift, self.counts, self.shift_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def shift_values(self) -> torch.Tensor:
        """``(B, H, C, D)`` float32: each chunk's channel shift, as the transform subtracted it."""
        return shift_decode(self.shift, self.shift_scale, self.shift_bits)

    def indices(self) -> torch.Tensor:
        """``(B, H, T, stages * D / vector_dim)`` int64 codebook indices."""
        return unpack_indices(self.codes, self.vector_dim)

    def chunk_ids(self) -> torch.Tensor:
        """``(B, H, T)`` int64: the chunk (shift, scale grid) each token belongs to."""
        batch, heads, tokens = self.codes.shape[:3]
        if self.counts is None:
            ids = torch.arange(tokens, device=self.codes.device) // self.chunk
            return ids.expand(batch, heads, tokens)
        ends = self.counts.long().cumsum(-1)
        positions = torch.arange(tokens, device=self.codes.device).expand(batch, heads, tokens).contiguous()
        return torch.searchsorted(ends, positions, right=True)

    def token_scales(self, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)``, each ``(B, H, T)`` float32: ``x_hat = a * H y_hat + b * shift``."""
        ids = self.chunk_ids() if ids is None else ids
        grid = self.grid.gather(2, ids[..., None, None].expand(*ids.shape, 2, 2))  # (B, H, T, 2, 2)
        scales = log_decode(self.scales, grid[..., 0], grid[..., 1])
        return scales[..., 0], scales[..., 1]

    def select_batch(self, index: torch.Tensor) -> None:
        for name in ("codes", "scales", "grid", "shift", "counts", "shift_scale"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index))

    def cat(self, other: NSNCodes) -> NSNCodes:
        """These tokens followed by ``other``'s."""
        counts = None
        if self.counts is not None or other.counts is not None:
            counts = torch.cat([_counts(self), _counts(other)], dim=-1)
        return replace(self, codes=torch.cat([self.codes, other.codes], 2),
                       scales=torch.cat([self.scales, other.scales], 2), grid=torch.cat([self.grid, other.grid], 2),
                       shift=torch.cat([self.shift, other.shift], 2), counts=counts,
                       shift_scale=None if self.shift_scale is None else torch.cat([self.shift_scale,
                                                                                    other.shift_scale], 2))

    def select_tokens(self, index: torch.Tensor) -> NSNCodes:
        """Tokens ``index (B, H, n)`` (sorted per row) of each row; chunks every row emptied go."""
        ids = self.chunk_ids().gather(2, index)
        counts = torch.zeros(self.shift.shape[:3], dtype=torch.int32, device=index.device)
        counts.scatter_add_(2, ids, torch.ones_like(ids, dtype=torch.int32))
        alive = (counts > 0).flatten(0, 1).any(0).nonzero().squeeze(1)

        def tokens(t):
            return t.gather(2, index[..., None].expand(*index.shape, t.shape[-1]))

        return replace(self, codes=tokens(self.codes), scales=tokens(self.scales),
                       grid=self.grid.index_select(2, alive), shift=self.shift.index_select(2, alive),
                       counts=counts.index_select(2, alive),
                       shift_scale=None if self.shift_scale is None else self.shift_scale.index_select(2, alive))


def _counts(codes: NSNCodes) -> torch.Tensor:
    if codes.counts is not None:
        return codes.counts
    return torch.full(codes.shift.shape[:3], codes.chunk, dtype=torch.int32, device=codes.shift.device)


def quantize(x: torch.Tensor, config: NSNQuant) -> NSNCodes:
    """Codes of ``x (B, H, T, D)``, ``T`` a multiple of ``config.chunk``."""
    batch, heads, tokens, dim = x.shape
    chunk = config.chunk
    if tokens % chunk:
        raise ValueError(f"nsnquant.quantize: tokens ({tokens}) must be a multiple of chunk ({chunk})")
    chunks = tokens // chunk
    book = config.codebook()
    x = x.float().view(batch, heads, chunks, chunk, dim)
    # s1 rounded to its code first: the shift and s2 then absorb that rounding
    b_codes, b_lo, b_step = log_encode(_norm(x)[..., 0])
    s1 = log_decode(b_codes, b_lo[..., None], b_step[..., None])[..., None]
    x1 = x / s1
    shift, shift_scale = shift_encode(x1.mean(3), config.shift_bits)
    x2 = x1 - shift_decode(shift, shift_scale, config.shift_bits)[:, :, :, None]
    s2 = _norm(x2)
    y = fwht(x2 / s2)
    sub = y.reshape(-1, config.vector_dim)
    indices = encode(sub, book, config.bits)  # (N, stages)
    y_hat = decode(indices, book).view(y.shape)
    decoded = y_hat.square().sum(-1, keepdim=True).clamp_min(1e-30)
    if config.gain == "norm":
        gain = (y.square().sum(-1, keepdim=True) / decoded).sqrt()
    else:
        gain = (y * y_hat).sum(-1, keepdim=True) / decoded
    a_codes, a_lo, a_step = log_encode((s1 * s2 * gain.clamp_min(1e-30))[..., 0])
    # (N, stages) -> (B, H, T, stages * subs), stage-major
    indices = indices.view(batch, heads, tokens, dim // config.vector_dim, config.bits).transpose(-1, -2)
    packed = pack_indices(indices.reshape(batch, heads, tokens, -1), config.vector_dim)
    scales = torch.stack([a_codes, b_codes], dim=-1).view(batch, heads, tokens, 2)
    grid = torch.stack([torch.stack([a_lo, a_step], -1), torch.stack([b_lo, b_step], -1)], dim=-2)
    return NSNCodes(packed, scales, grid, shift, None, config.bits, config.vector_dim, chunk, shift_scale,
                    config.shift_bits)


def rotated(codes: NSNCodes) -> torch.Tensor:
    """``y_hat (B, H, T, D)`` float32: the decoded rotated tokens (before ``H``, scales, shift)."""
    batch, heads, tokens = codes.codes.shape[:3]
    book = codebook(codes.vector_dim)
    indices = codes.indices().view(batch, heads, tokens, codes.stages, -1).transpose(-1, -2)
    return decode(indices, book).reshape(batch, heads, tokens, -1)


def dequantize(codes: NSNCodes, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, T, D)`` in ``dtype`` (written into ``out`` when given)."""
    ids = codes.chunk_ids()
    a, b = codes.token_scales(ids)
    mu = codes.shift_values()
    shift = mu.gather(2, ids[..., None].expand(*ids.shape, mu.shape[-1]))
    x = torch.addcmul(b[..., None] * shift, fwht(rotated(codes)), a[..., None])
    if out is None:
        return x.to(dtype)
    out.copy_(x)
    return out


# ---- one layer's store ----------------------------------------------------------------------------

class NSNStore:
    """One layer's keys and values ``(B, H_kv, T, D)`` under NSNQuant (the ``QuantizedStore``
    protocol of ``kv/quantizers.py``).

    Tokens arrive in a full-precision window; once it holds ``residual + chunk`` tokens, its
    oldest whole chunks are quantized, so the newest ``residual`` to ``residual + chunk - 1``
    tokens stay exact (``residual + chunk`` between a deferred append and the next: ``append``).
    Keys and values are quantized together (the same tokens are codes).

    Eviction (``select_tokens``) keeps the codes of the tokens that stay as they are. Rows may
    keep different numbers of coded tokens; all rows keep as many codes as the row that keeps
    the fewest, and the others' extra kept tokens move to the window dequantized (their values
    unchanged up to the window's dtype; they are coded again when the window next flushes).

    With ``protect > 0``, ``append(..., priority=)`` takes the policy's ranking of the tokens,
    and each flush keeps residuals for the best-ranked fraction of the tokens it codes
    (``protected``, a ``kv/protected.ProtectedTokens``).

    With ``key_heads``, every coded key of the chosen rows keeps its residual (``exact_keys``, a
    ``kv/exact_keys.ExactKeys``). Until the cache chooses (``choose_exact_keys``, at the end of
    the first prefill) every row keeps them; then only the chosen rows do."""

    def __init__(self, config: NSNQuant):
        self.config = config
        self.key_codes: NSNCodes | None = None
        self.value_codes: NSNCodes | None = None
        self.key_window: torch.Tensor | None = None
        self.value_window: torch.Tensor | None = None
        self.priority_window: torch.Tensor | None = None  # (B, H, n) float32, -inf: no ranking
        self.protected: ProtectedTokens | None = None
        self.exact_keys: ExactKeys | None = None
        self.exact_rows: torch.Tensor | None = None  # (B, H) bool once chosen; None: every row, for now

    def coded_tokens(self) -> int:
        return 0 if self.key_codes is None else self.key_codes.tokens()

    def __len__(self) -> int:
        return self.coded_tokens() + (0 if self.key_window is None else self.key_window.shape[2])

    def _check(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        tensors = isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
        if not tensors or keys.dim() != 4 or keys.shape != values.shape or keys.dtype != values.dtype:
            raise ValueError(f"NSNStore.append: keys and values must be (B, H, n, D) tensors of one shape and dtype, "
                             f"got {getattr(keys, 'shape', type(keys))} {getattr(keys, 'dtype', '')} and "
                             f"{getattr(values, 'shape', type(values))} {getattr(values, 'dtype', '')}")
        self.config.validate(keys.shape[-1], keys.dtype)
        held = self.key_window
        if held is not None and (keys.shape[:2] != held.shape[:2] or keys.shape[-1] != held.shape[-1]
                                 or keys.dtype != held.dtype or keys.device != held.device):
            raise ValueError(f"NSNStore.append: expected (B, H, n, D) = ({held.shape[0]}, {held.shape[1]}, n, "
                             f"{held.shape[-1]}) of {held.dtype} on {held.device}, got {tuple(keys.shape)} of "
                             f"{keys.dtype} on {keys.device}")

    def append(self, keys: torch.Tensor, values: torch.Tensor, priority: torch.Tensor | None = None, *,
               defer: bool = False) -> None:
        """Append ``keys``/``values (B, H, n, D)``, and with ``protect`` the policy's ranking
        ``priority (B, H, n)`` of them (higher: more important; ``-inf``: none); validated before
        anything changes. ``defer``: code whole chunks at the next append, not now, so the step
        that reads the store over its codes (``attend``) reads its own tokens exactly."""
        self._check(keys, values)
        if priority is not None and (not isinstance(priority, torch.Tensor) or priority.shape != keys.shape[:3]):
            raise ValueError(f"NSNStore.append: priority must be a (B, H, n) = {tuple(keys.shape[:3])} tensor, got "
                             f"{tuple(getattr(priority, 'shape', ())) or type(priority).__name__}")
        if self.key_window is not None:
            self._flush()  # what an earlier step deferred, before the window grows
        if self.config.protect:
            ranks = (priority.float() if priority is not None else
                     keys.new_full(keys.shape[:3], float("-inf"), dtype=torch.float32))
            self.priority_window = ranks if self.priority_window is None else torch.cat([self.priority_window, ranks], 2)
        if self.key_window is None:
            self.key_window, self.value_window = keys, values
        else:
            self.key_window = torch.cat([self.key_window, keys], dim=2)
            self.value_window = torch.cat([self.value_window, values], dim=2)
        if not defer:
            self._flush()

    def _flush(self) -> None:
        cfg = self.config
        excess = self.key_window.shape[2] - cfg.residual
        take = excess // cfg.chunk * cfg.chunk if excess >= cfg.chunk else 0
        if not take:
            return
        new_keys = quantize(self.key_window[:, :, :take], cfg)
        new_values = quantize(self.value_window[:, :, :take], cfg)
        if cfg.key_heads:
            self._keep_exact_keys(new_keys, take)
        if self.priority_window is not None:
            self._protect(new_keys, new_values, self.priority_window[:, :, :take], take)
            self.priority_window = self.priority_window[:, :, take:].clone()
        self.key_codes = new_keys if self.key_codes is None else self.key_codes.cat(new_keys)
        self.value_codes = new_values if self.value_codes is None else self.value_codes.cat(new_values)
        # clones: the window's old storage (and the caller's tensors) are not kept alive
        self.key_window = self.key_window[:, :, take:].clone()
        self.value_window = self.value_window[:, :, take:].clone()

    def _keep_exact_keys(self, new_keys: NSNCodes, take: int) -> None:
        """Residuals of the ``take`` keys just coded (``new_keys``) on the rows that keep them."""
        starts = self.exact_keys is None and not self.coded_tokens()  # the first tokens coded
        if self.exact_keys is None and not (starts and (self.exact_rows is None or bool(self.exact_rows.any()))):
            return  # no row of this store keeps them: nothing to decode
        exact, decoded = self.key_window[:, :, :take], dequantize(new_keys, torch.float32)
        if self.exact_keys is not None:
            self.exact_keys = self.exact_keys.extend(exact, decoded)
        else:  # the first tokens coded: residuals from here on
            rows = self.exact_rows if self.exact_rows is not None else torch.ones(
                exact.shape[:2], dtype=torch.bool, device=exact.device)
            coder = self.config.residual_coder() if self.config.key_residual == "codes" else None
            self.exact_keys = ExactKeys.of(rows, exact, decoded, coder)

    def choose_exact_keys(self, rows: torch.Tensor) -> None:
        """Only the rows where ``rows (B, H)`` is True keep exact keys from now on (the cache
        calls this once, with the sharpest heads)."""
        batch_heads = self.key_window.shape[:2] if self.key_window is not None else None
        if not isinstance(rows, torch.Tensor) or rows.dtype != torch.bool or rows.dim() != 2 or (
                batch_heads is not None and tuple(rows.shape) != tuple(batch_heads)):
            raise ValueError(f"NSNStore.choose_exact_keys: rows must be a (B, H) = {tuple(batch_heads or ())} bool "
                             f"tensor, got {getattr(rows, 'dtype', type(rows))} {tuple(getattr(rows, 'shape', ()))}")
        self.exact_rows = rows.clone()
        if self.exact_keys is not None:
            self.exact_keys = self.exact_keys.restrict(self.exact_rows)
        elif self.coded_tokens():
            self.exact_rows = torch.zeros_like(self.exact_rows)  # coded earlier without residuals: none to add

    def _protect(self, new_keys: NSNCodes, new_values: NSNCodes, priority: torch.Tensor, take: int) -> None:
        """Residuals for the best-ranked of the ``take`` tokens just coded (``new_*``)."""
        if not bool((priority > float("-inf")).any()):
            return  # decode steps: nothing ranked, nothing to decode
        keys, values = self.key_window[:, :, :take], self.value_window[:, :, :take]
        chosen = ProtectedTokens.choose(priority, self.config.protect, keys, values,
                                        dequantize(new_keys, torch.float32), dequantize(new_values, torch.float32))
        if chosen is None:
            return
        # the new tokens follow the ones already coded
        chosen = ProtectedTokens(chosen.index + self.coded_tokens(), chosen.keys, chosen.values)
        self.protected = chosen if self.protected is None else self.protected.cat(chosen)

    def keys(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """All keys ``(B, H, T, D)`` in the dtype appended, the coded ones dequantized (protected
        ones with their residuals)."""
        return self._gather(self.key_codes, self.key_window, out, "keys")

    def values(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._gather(self.value_codes, self.value_window, out, "values")

    def _gather(self, codes, window, out, which):
        if window is None:
            raise ValueError("NSNStore: nothing appended yet")
        if out is None:
            out = window.new_empty(*window.shape[:2], len(self), window.shape[-1])
        coded = self.coded_tokens()
        if coded:
            dequantize(codes, window.dtype, out=out[:, :, :coded])
            if self.protected is not None:
                self.protected.add_to(out[:, :, :coded], which)
            if which == "keys" and self.exact_keys is not None:
                self.exact_keys.add_to(out[:, :, :coded])
        out[:, :, coded:] = window
        return out

    def nbytes(self) -> int:
        """Bytes held: codes, scale codes, scale grids, shifts, chunk counts, protected tokens'
        residuals, exact keys' residuals and the windows (the windows' rankings are the policy's
        working state, not counted, as the policies' scores are not)."""
        parts = (self.key_codes, self.value_codes, self.protected, self.exact_keys)
        total = sum(c.nbytes() for c in parts if c is not None)
        if self.exact_rows is not None:
            total += self.exact_rows.numel() * self.exact_rows.element_size()
        for window in (self.key_window, self.value_window):
            if window is not None:
                total += window.numel() * window.element_size()
        return total

    def full_precision_tokens(self) -> tuple[int, int]:
        held = 0 if self.key_window is None else self.key_window.shape[2]
        return held, held

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search, batch selection; a row may repeat); nothing to
        do before the first ``append``."""
        if self.key_window is None:
            return
        for codes in (self.key_codes, self.value_codes, self.protected, self.exact_keys):
            if codes is not None:
                codes.select_batch(index)
        if self.exact_rows is not None:
            self.exact_rows = self.exact_rows.index_select(0, index)
        if self.exact_keys is not None and not bool(self.exact_keys.rows.any()):
            self.exact_keys = None  # no chosen row left: the Triton kernel may read this store again
        self.key_window = self.key_window.index_select(0, index)
        self.value_window = self.value_window.index_select(0, index)
        if self.priority_window is not None:
            self.priority_window = self.priority_window.index_select(0, index)

    def select_tokens(self, index: torch.Tensor) -> None:
        """Keep tokens ``index (B, H, n)`` (int64, sorted per row, every row the same ``n``)."""
        if self.key_window is None:
            raise ValueError("NSNStore.select_tokens: nothing appended yet")
        batch, heads = self.key_window.shape[:2]
        total = len(self)
        if (not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 3
                or tuple(index.shape[:2]) != (batch, heads)):
            raise ValueError(f"NSNStore.select_tokens: index must be int64 ({batch}, {heads}, n), got "
                             f"{getattr(index, 'dtype', type(index))} {tuple(getattr(index, 'shape', ()))}")
        if index.numel() and (index.min() < 0 or index.max() >= total or (index.diff(dim=-1) <= 0).any()):
            raise ValueError(f"NSNStore.select_tokens: index must be increasing per row, within [0, {total})")
        coded = self.coded_tokens()
        keep_codes = int((index < coded).sum(-1).min()) if coded else 0
        keys, values = self.keys(), self.values()  # dequantized: the kept coded tokens that move
        pick = index[..., None].expand(*index.shape, keys.shape[-1])
        keys, values = keys.gather(2, pick), values.gather(2, pick)
        if self.priority_window is not None:
            # a protected token that moves to the window stays first in line to be protected again
            coded_ranks = torch.full(index.shape[:2] + (coded,), float("-inf"), device=index.device)
            if self.protected is not None:
                coded_ranks.masked_fill_(self.protected.mask(coded), float("inf"))
            ranks = torch.cat([coded_ranks, self.priority_window], dim=2).gather(2, index)
            self.priority_window = ranks[:, :, keep_codes:].contiguous()
        if coded:
            head = index[..., :keep_codes]
            self.key_codes = self.key_codes.select_tokens(head) if keep_codes else None
            self.value_codes = self.value_codes.select_tokens(head) if keep_codes else None
            if self.protected is not None:
                self.protected = self.protected.select_tokens(head)
            if self.exact_keys is not None and keep_codes:
                self.exact_keys.select_tokens(head)
            elif self.exact_keys is not None:  # no code left: the next flush starts them again
                self.exact_keys = None
        self.key_window = keys[:, :, keep_codes:].contiguous()
        self.value_window = values[:, :, keep_codes:].contiguous()

    def attend(self, query: torch.Tensor, scale: float, *, softcap: float | None = None,
               return_mass: bool = False, backend: str = "auto"):
        """Attention of the last ``Sq`` tokens' ``query (B, H, Sq, D)`` over every token held,
        reading the codes (``kv/codes_attention.py``)."""
        from .codes_attention import nsn_attend

        return nsn_attend(self, query, scale, softcap=softcap, return_mass=return_mass, backend=backend)


__all__ = [
    "NSNCodes",
    "NSNQuant",
    "NSNStore",
    "dequantize",
    "log_decode",
    "log_encode",
    "nsn_forward",
    "nsn_inverse",
    "pack_indices",
    "quantize",
    "unpack_indices",
]
