"""Converters between effllm's INT4 layout and the AWQ and GPTQ (v1) checkpoint layouts.

Both store the transposed weight (``in_features x out_features``) as int32 words of 8 nibbles and
integer zero points ``z`` with ``w = (q - z) * s``; effllm stores ``zero = (8 - z) * s``
(see ``formats.py``). Conversion happens once, at load or export time.

- AWQ: ``qweight int32 (K, N/8)`` packed along N; nibble i of word c holds column
  ``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``. ``qzeros int32 (K/G, N/8)`` packed the same way,
  ``scales (K/G, N)``.
- GPTQ v1: ``qweight int32 (K/8, N)`` packed along K, nibble i of row r holds ``k = 8r + i``;
  ``qzeros int32 (K/G, N/8)`` packed along N in order, storing ``z - 1``; ``scales (K/G, N)``;
  ``g_idx (K,)`` maps each input channel to its group. Only ``g_idx[k] == k // G`` (no act-order
  reordering) converts to a contiguous-group layout.
"""

from __future__ import annotations

import torch

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack_words(values: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """int values 0..15 ``(R, 8C)`` -> int32 ``(R, C)``: nibble i holds column ``8c + order[i]``."""
    rows, cols = values.shape
    v = values.to(torch.int64).view(rows, cols // 8, 8)
    word = torch.zeros(rows, cols // 8, dtype=torch.int64, device=values.device)
    for i, col in enumerate(order):
        word |= v[:, :, col] << (4 * i)
    return _to_int32(word)


def _unpack_words(words: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """Inverse of ``_pack_words``: int32 ``(R, C)`` -> int64 ``(R, 8C)``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*words.shape, 8, dtype=torch.int64, device=words.device)
    for i, col in enumerate(order):
        out[:, :, col] = (w >> (4 * i)) & 0xF
    return out.reshape(words.shape[0], words.shape[1] * 8)


def _to_int32(word: torch.Tensor) -> torch.Tensor:
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _zeros_to_points(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """effllm ``zero = (8 - z) * s`` -> integer z, checked to be representable."""
    z = 8 - zeros.float() / scales.float()
    z_int = torch.round(z)
    if (z_int - z).abs().max() > 1e-2 or z_int.min() < 0 or z_int.max() > 15:
        raise ValueError("these INT4 zeros are not integer zero points in 0..15 (quantized with float zeros?); "
                         "they cannot be written in the AWQ/GPTQ layouts without loss")
    return z_int.to(torch.int64)


def _check_packed(name, t, shape):
    if t.dtype != torch.int32 or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be int32 of shape {shape}, got {t.dtype} {tuple(t.shape)}")


def from_awq(qweight, qzeros, scales, group_size: int):
    """AWQ tensors -> effllm ``(q uint8 (N, K), scales (N, K/G), zeros (N, K/G))``."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    _check_packed("qweight", qweight, (k, n // 8))
    _check_packed("qzeros", qzeros, (k // group_size, n // 8))
    q = _unpack_words(qweight, _AWQ_ORDER).t().to(torch.uint8).contiguous()
    z = _unpack_words(qzeros, _AWQ_ORDER).t()
    s = scales.t().contiguous()
    return q, s, ((8 - z) * s.float()).to(s.dtype)


def to_awq(q, scales, zeros):
    """effllm ``(q (N, K), scales, zeros)`` -> AWQ ``(qweight, qzeros, scales)``."""
    z = _zeros_to_points(scales, zeros)
    return _pack_words(q.t(), _AWQ_ORDER), _pack_words(z.t(), _AWQ_ORDER), scales.t().contiguous()


def from_gptq(qweight, qzeros, scales, group_size: int, g_idx: torch.Tensor | None = None):
    """GPTQ v1 tensors -> effllm ``(q uint8 (N, K), scales (N, K/G), zeros (N, K/G))``."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    _check_packed("qweight", qweight, (k // 8, n))
    _check_packed("qzeros", qzeros, (k // group_size, n // 8))
    if g_idx is not None:
        expected = torch.arange(k, device=g_idx.device) // group_size
        if not torch.equal(g_idx.to(torch.int64), expected):
            raise ValueError("g_idx reorders input channels (act-order / desc_act): effllm's INT4 layout needs "
                             "contiguous groups; re-export the checkpoint without act-order")
    q = _unpack_words(qweight.t().contiguous()).to(torch.uint8)  # (N, K): word row r of column n
    z = (_unpack_words(qzeros).t() + 1) & 0xF  # v1 stores z - 1 (z = 0 wraps to 15)
    s = scales.t().contiguous()
    return q, s, ((8 - z) * s.float()).to(s.dtype)


def to_gptq(q, scales, zeros):
    """effllm -> GPTQ v1 ``(qweight, qzeros, scales, g_idx)``."""
    n, k = q.shape
    group_size = k // scales.shape[1]
    z = _zeros_to_points(scales, zeros)
    qweight = _pack_words(q).t().contiguous()
    g_idx = torch.arange(k, dtype=torch.int32, device=q.device) // group_size
    return qweight, _pack_words((z - 1).t() & 0xF), scales.t().contiguous(), g_idx
