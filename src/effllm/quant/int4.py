"""INT4 weight-only (W4A16): the ``Int4WeightOnly`` config and ``Int4Linear``.

Compute: CUDA with Triton -> the W4A16 Triton GEMM (``effllm.kernels.triton.w4a16``); CPU ->
torch's ``_weight_int4pack_mm_for_cpu`` with bf16 activations (output cast back to x's dtype;
out_features must be a multiple of 16); anything else -> dequantize + ``F.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .base import QuantLinear
from .formats import INT4_GROUP_SIZES
from .registry import QuantConfig, register


@dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """W4A16: 4-bit weights in groups of ``group_size`` input channels, activations unchanged.

    ``act_aware=True`` runs an activation-aware search (AWQ-style per-input-channel scales and
    per-group clipping) on calibration batches passed to ``quantize_(..., calibration=...)``.
    ``integer_zeros`` (default) rounds asymmetric zero points to integers, as AWQ/GPTQ
    checkpoints store them: 0 stays exactly representable, which suits bell-shaped weights, and
    export to those layouts is exact. ``False`` maps each group's [min, max] exactly; with
    ``act_aware`` it did better on SmolLM2 (see docs/quantization.md).
    ``gptq=True`` rounds with error compensation (``effllm.quant.gptq``) on the round-to-nearest
    group scales (after the activation-aware search when both are set); it needs calibration too.
    """

    group_size: int = 128
    symmetric: bool = False
    act_aware: bool = False
    integer_zeros: bool = True
    gptq: bool = False
    version: int = 1

    def __post_init__(self):
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"Int4WeightOnly: group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")



@register(Int4WeightOnly)
class Int4Linear(QuantLinear):
    """W4A16 linear: ``y = (x * input_scale) @ dequant(qweight).T + bias``."""

    def __init__(self, in_features, out_features, bias=True, *, config: Int4WeightOnly = Int4WeightOnly(),
                 dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        formats.check_int4_shape(out_features, in_features, config.group_size)
        self.config = config
        groups = in_features // config.group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))
        if config.act_aware:
            # Activation-aware scaling: weights were quantized as W * s, so inputs are divided by s.
            self.register_buffer("input_scale", torch.ones(in_features, dtype=dtype, device=device))
        else:
            self.input_scale = None
        self._cpu_pack = None

    @classmethod
    def shape_error(cls, linear: nn.Linear, config: Int4WeightOnly) -> str | None:
        try:
            formats.check_int4_shape(linear.out_features, linear.in_features, config.group_size)
        except ValueError as err:
            return str(err)
        return None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Int4WeightOnly, *, channel_scale=None, clip=None,
                    hessian=None) -> Int4Linear:
        """Quantize ``linear``. ``channel_scale (K,)`` and ``clip (N, K/G)`` come from the
        activation-aware search (``awq.py``): the weight is quantized as ``W * channel_scale``.
        ``hessian`` (``X^T X / rows`` of the inputs) drives ``config.gptq``."""
        weight = linear.weight.detach()
        module = cls._empty_like(linear, config)
        if config.act_aware and channel_scale is None:
            raise ValueError("Int4WeightOnly(act_aware=True) needs calibration: pass calibration=... to quantize_")
        if config.gptq and hessian is None:
            raise ValueError("Int4WeightOnly(gptq=True) needs calibration: pass calibration=... to quantize_")
        if channel_scale is not None:
            weight = weight * channel_scale.to(weight.dtype)
            module.input_scale.copy_(1.0 / channel_scale)
        q, scales, zeros = formats.int4_quantize(weight, config.group_size, config.symmetric, clip=clip,
                                                 integer_zeros=config.integer_zeros)
        if config.gptq:
            if channel_scale is not None:  # the layer sees x / s: its statistics scale the same way
                inv = 1.0 / channel_scale.float().cpu()
                hessian = hessian * inv[:, None] * inv[None, :]
            q = _int4_gptq(weight, hessian, scales, zeros, config.group_size).to(q.device)
        module.qweight.copy_(formats.int4_pack(q))
        module.scales.copy_(scales)
        module.zeros.copy_(zeros)
        return module

    def dequantize(self, dtype=None):
        w = formats.int4_dequantize(formats.int4_unpack(self.qweight), self.scales, self.zeros,
                                    self.config.group_size, dtype=torch.float32)
        if self.input_scale is not None:
            w = w * self.input_scale.float()
        return w.to(dtype or self.dtype)

    def _invalidate(self):
        self._cpu_pack = None

    def _matmul(self, x2):
        chosen = self._choose(x2)
        if chosen == "triton":
            from ..kernels.triton.w4a16 import w4a16_matmul

            xs = x2 * self.input_scale.to(x2.dtype) if self.input_scale is not None else x2
            return w4a16_matmul(xs, self.qweight, self.scales, self.zeros, self.config.group_size)
        if x2.device.type == "cpu" and self.out_features % 16 == 0:
            return self._cpu_int4pack(x2)
        return F.linear(x2, self.dequantize(x2.dtype))

    def _cpu_int4pack(self, x2):
        if self._cpu_pack is None:
            q = formats.int4_unpack(self.qweight).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            scales_zeros = torch.stack((self.scales.t(), self.zeros.t()), dim=-1).to(torch.bfloat16).contiguous()
            self._cpu_pack = (packed, scales_zeros)
        packed, scales_zeros = self._cpu_pack
        if self.input_scale is not None:
            x2 = x2 * self.input_scale.to(x2.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), packed, self.config.group_size,
                                                          scales_zeros)

    def _format_repr(self):
        kind = "symmetric" if self.config.symmetric else "asymmetric"
        aware = ", act_aware" if self.input_scale is not None else ""
        return f"int4 {kind} group_size={self.config.group_size}{aware}"


def _int4_gptq(weight, hessian, scales, zeros, group_size):
    """INT4 codes from error-compensated rounding on the fixed (RTN) group grid."""
    from .gptq import gptq_round

    n, k = weight.shape
    sc, zc = scales.float().cpu(), zeros.float().cpu()

    def round_column(col, j):
        s, z = sc[:, j // group_size], zc[:, j // group_size]
        return (torch.round((col - z) / s + 8).clamp_(0, 15) - 8) * s + z

    rounded = gptq_round(weight, hessian, round_column).view(n, k // group_size, group_size)
    q = torch.round((rounded - zc.unsqueeze(-1)) / sc.unsqueeze(-1) + 8).clamp_(0, 15)
    return q.reshape(n, k).to(torch.uint8)
