"""Weight formats: quantize, pack, unpack and dequantize. Pure torch, no module state.

INT4 (effllm layout, read by the Triton W4A16 kernel and converted once for torch's CPU op):

- ``qweight``: uint8 ``(N, K / 2)``; byte ``j`` of row ``n`` holds ``k = 2j`` in its low nibble
  and ``k = 2j + 1`` in its high nibble (K-packed, so a K-tile of the kernel reads whole bytes).
- ``scales``, ``zeros``: ``(N, K / G)`` in the weight's float dtype, one per output channel and
  group of G consecutive input channels.
- ``w = (q - 8) * scale + zero`` for q in 0..15. Symmetric quantization is ``zero = 0``
  (q - 8 in -8..7); asymmetric uses an integer zero point z (``zero = (8 - z) * scale``) as
  AWQ/GPTQ do, which also makes export to their layouts exact, or (``integer_zeros=False``) maps
  each group's [min, max] onto 0..15 (``zero = min + 8 * scale``). This is also torch's CPU (tinygemm)
  convention, so converting for the CPU op is a transpose of scales and zeros.

INT8 weight-only: int8 ``(N, K)``, symmetric, one scale per output channel: ``w = q * scale``.

FP8 e4m3: ``float8_e4m3fn`` weights with float32 scales per tensor ``(1, 1)``, per output row
``(N, 1)`` or per 128x128 block ``(ceil(N/128), ceil(K/128))``: ``w = q * scale``. Each scale is
chosen by a small search (``FP8_CLIP_RATIOS``) for the smallest squared error of its group.
"""

from __future__ import annotations

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_BLOCK = 128


def _check_weight(w: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{name} must be a 2-D float tensor (out_features, in_features), got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")


def check_int4_shape(n: int, k: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}; choose a group size "
                         f"that divides it (e.g. {max((g for g in INT4_GROUP_SIZES if k % g == 0), default=None)})")


# ---- INT4 -------------------------------------------------------------------------------------

def int4_quantize(w: torch.Tensor, group_size: int, symmetric: bool = False,
                  clip: torch.Tensor | None = None, integer_zeros: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest INT4: ``(q uint8 (N, K) in 0..15, scales (N, K/G), zeros (N, K/G))``.

    Asymmetric groups use an integer zero point by default, as AWQ/GPTQ store it: the grid
    then contains 0 exactly, which matters for bell-shaped weights (round-to-nearest INT4 g128
    on MiniLM: mean cosine 0.961 against 0.946 with a float zero). ``integer_zeros=False``
    maps each group's [min, max] onto 0..15 exactly instead. ``clip`` (optional, ``(N, K/G)`` in (0, 1]) shrinks each group's
    range before rounding, as the activation-aware search does.
    """
    _check_weight(w)
    n, k = w.shape
    check_int4_shape(n, k, group_size)
    groups = w.float().reshape(n, k // group_size, group_size)
    if symmetric:
        amax = groups.abs().amax(-1)
        if clip is not None:
            amax = amax * clip
        scales = (amax / 7.5).clamp_min(1e-12)  # -8..7 around 0; 7.5 centres the rounding range
        zeros = torch.zeros_like(scales)
    else:
        lo, hi = groups.amin(-1), groups.amax(-1)
        if clip is not None:
            mid = (hi + lo) / 2
            lo, hi = mid - (mid - lo) * clip, mid + (hi - mid) * clip
        scales = ((hi - lo) / 15).clamp_min(1e-12)
        if integer_zeros:  # as AWQ/GPTQ: w = (q - z) * s = (q - 8) * s + (8 - z) * s
            zeros = (8 - torch.round(-lo / scales).clamp_(0, 15)) * scales
        else:  # q = (w - lo) / s exactly
            zeros = lo + 8 * scales
    q = torch.round((groups - zeros.unsqueeze(-1)) / scales.unsqueeze(-1) + 8).clamp_(0, 15)
    return q.reshape(n, k).to(torch.uint8), scales.to(w.dtype), zeros.to(w.dtype)


def int4_dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(q - 8) * scale + zero`` for unpacked ``q (N, K)``."""
    n, k = q.shape
    groups = q.float().reshape(n, k // group_size, group_size)
    w = (groups - 8) * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)
    return w.reshape(n, k).to(dtype or scales.dtype)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, K)`` values 0..15 -> uint8 ``(N, K/2)``: even k low nibble, odd k high nibble."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"int4_pack needs a 2-D tensor with an even number of columns, got {tuple(q.shape)}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``int4_pack``: uint8 ``(N, K/2)`` -> uint8 ``(N, K)``."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


# ---- INT8 -------------------------------------------------------------------------------------

def int8_quantize(w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: ``(q int8 (N, K), scales (N,))``, ``w = q * scale``;
    the scales in ``scale_dtype`` (default: the weight's dtype)."""
    _check_weight(w)
    # The stored scale (in its dtype) is the divisor, so every weight decodes within half
    # a step of it (dividing by the float32 scale and storing it rounded adds up to 127 times the
    # rounding: a quarter step in bfloat16). Rounded to nearest, and one step up where that would
    # code the largest weight past 127.5 (a scale rounded down to 0 or a coarse subnormal); an
    # all-zero row gets 1 (its codes are 0).
    amax = w.float().abs().amax(dim=1)
    scales = (amax / 127).to(scale_dtype or w.dtype)
    low = scales.float() * 127.5 < amax
    if low.any():
        scales = torch.where(low, torch.nextafter(scales, torch.full_like(scales, float("inf"))), scales)
    scales = torch.where(amax == 0, torch.ones_like(scales), scales)
    q = torch.round(w.float() / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def int8_dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype or scales.dtype)


# ---- FP8 --------------------------------------------------------------------------------------

FP8_WEIGHT_GRANULARITIES = ("tensor", "row", "block")


def fp8_quantize(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weights and float32 scales (see the module docstring for the scale shapes)."""
    _check_weight(w)
    n, k = w.shape
    wf = w.float()
    if granularity == "tensor":
        amax = wf.abs().amax().reshape(1, 1)
    elif granularity == "row":
        amax = wf.abs().amax(dim=1, keepdim=True)
    elif granularity == "block":
        amax = _block_amax(wf)
    else:
        raise ValueError(f"fp8 weight granularity must be one of {FP8_WEIGHT_GRANULARITIES}, got {granularity!r}")
    best_q, best_scales, best_err = None, None, None
    for ratio in FP8_CLIP_RATIOS:
        scales = (amax * ratio / FP8_MAX).clamp_min(1e-12)
        expanded = expand_scales(scales, n, k)
        q = (wf / expanded).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        err = _scale_group_error((q.float() * expanded - wf).pow_(2), scales.shape)
        if best_q is None:
            best_q, best_scales, best_err = q, scales, err
            continue
        better = err < best_err
        best_scales = torch.where(better, scales, best_scales)
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(expand_scales(better, n, k), q, best_q)
    return best_q, best_scales


# Scales below amax / 448 clip the few largest weights but refine every other one; the search
# keeps, per scale group, the ratio with the smallest squared error.
FP8_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)


def _scale_group_error(sq: torch.Tensor, scale_shape) -> torch.Tensor:
    n, k = sq.shape
    if scale_shape == (1, 1):
        return sq.sum().reshape(1, 1)
    if scale_shape == (n, 1):
        return sq.sum(dim=1, keepdim=True)
    rows, cols = scale_shape
    padded = torch.zeros(rows * FP8_BLOCK, cols * FP8_BLOCK, dtype=sq.dtype, device=sq.device)
    padded[:n, :k] = sq
    return padded.view(rows, FP8_BLOCK, cols, FP8_BLOCK).sum(dim=(1, 3))


def fp8_dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = q.shape
    return (q.float() * expand_scales(scales, n, k)).to(dtype)


def _block_amax(wf: torch.Tensor) -> torch.Tensor:
    n, k = wf.shape
    rows, cols = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    padded = torch.zeros(rows * FP8_BLOCK, cols * FP8_BLOCK, dtype=wf.dtype, device=wf.device)
    padded[:n, :k] = wf.abs()
    return padded.view(rows, FP8_BLOCK, cols, FP8_BLOCK).amax(dim=(1, 3))


def expand_scales(scales: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Broadcast (1,1) / (N,1) scales, or repeat 128x128 block scales to (N, K)."""
    if scales.shape[0] in (1, n) and scales.shape[1] == 1:
        return scales
    return scales.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]


def fp8_quantize_activations(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of ``x (M, K)``: per token ``(M, 1)`` or per 1x128 block
    ``(M, ceil(K/128))`` float32 scales."""
    m, k = x.shape
    xf = x.float()
    if granularity == "token":
        amax = xf.abs().amax(dim=1, keepdim=True)
        expand = lambda s: s
    elif granularity == "block":
        cols = -(-k // FP8_BLOCK)
        padded = torch.zeros(m, cols * FP8_BLOCK, dtype=xf.dtype, device=x.device)
        padded[:, :k] = xf.abs()
        amax = padded.view(m, cols, FP8_BLOCK).amax(-1)
        expand = lambda s: s.repeat_interleave(FP8_BLOCK, 1)[:, :k]
    else:
        raise ValueError(f"fp8 activation granularity must be 'token' or 'block', got {granularity!r}")
    scales = (amax / FP8_MAX).clamp_min(1e-12)
    return (xf / expand(scales)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales
