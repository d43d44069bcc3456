"""Quantized drop-in replacements for ``nn.Linear``.

Each module keeps the *portable* format (``formats.py``) in persistent buffers, so its
``state_dict()`` lists the packed tensors and a saved file loads on any device. Backend-specific
layouts (torch's CPU INT4 pack) are derived from those buffers on first use and cached outside
the state dict; the derivation is deterministic, so reloaded modules give bit-identical outputs.

Compute per backend:

- CUDA with Triton: the W4A16 / FP8 Triton GEMMs (``effllm.kernels.triton``); FP8 with
  per-token activations, tensor or row weight scales and bf16 activations goes to
  ``torch._scaled_mm`` (cuBLASLt) instead, which the H100 measurements favour.
- CPU: INT4 -> ``_weight_int4pack_mm_for_cpu`` and INT8 -> ``_weight_int8pack_mm``, both with
  bf16 activations (their fast paths need bf16; the output is cast back to x's dtype).
  FP8 on CPU is a storage format: weights (and, if configured, activations) are quantized
  exactly as on GPU, then dequantized and multiplied in float32. It saves memory, not time.
- Anything else (or shapes the CPU ops reject: INT4 with out_features, INT8 with in_features not a
  multiple of 16):
  dequantize and ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._backend import resolve_backend
from . import formats
from .config import Fp8, Int4WeightOnly, Int8WeightOnly


class QuantLinear(nn.Module):
    """Shared shape checks, bias, flattening to 2-D and ``repr`` of the quantized linears."""

    config: object

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype  # the float dtype of the original weight
        self.backend = "auto"
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input's last dimension must be in_features="
                             f"{self.in_features}, got shape {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)
        y = self._matmul(x2).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight this module multiplies by, ``(out_features, in_features)``."""
        raise NotImplementedError

    @classmethod
    def _empty_like(cls, linear: nn.Linear, config) -> QuantLinear:
        """An unfilled module shaped like ``linear`` (same dtype and device), its bias copied."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, config=config,
                     dtype=weight.dtype, device=weight.device)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def _choose(self, x2: torch.Tensor) -> str:
        return resolve_backend(self.backend, x2, op=type(self).__name__)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._format_repr()}")

    def _format_repr(self) -> str:
        return ""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._invalidate()

    def _invalidate(self) -> None:
        """Drop derived (backend-specific) layouts: the buffers changed."""


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


class Int8Linear(QuantLinear):
    """W8A16 linear: symmetric INT8 weights with one scale per output channel."""

    def __init__(self, in_features, out_features, bias=True, *, config: Int8WeightOnly = Int8WeightOnly(),
                 dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.config = config
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self._bf16_scales = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Int8WeightOnly) -> Int8Linear:
        module = cls._empty_like(linear, config)
        q, scales = formats.int8_quantize(linear.weight.detach())
        module.qweight.copy_(q)
        module.scales.copy_(scales)
        return module

    def dequantize(self, dtype=None):
        return formats.int8_dequantize(self.qweight, self.scales, dtype=dtype or self.dtype)

    def _invalidate(self):
        self._bf16_scales = None

    def _matmul(self, x2):
        # torch's CPU int8 kernel reads K in blocks of 16 with no tail: other K crash or give garbage.
        if x2.device.type == "cpu" and self.in_features % 16 == 0 and self._choose(x2) == "torch":
            if self._bf16_scales is None:
                self._bf16_scales = self.scales.to(torch.bfloat16)
            return torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self._bf16_scales)
        return F.linear(x2, self.dequantize(x2.dtype))

    def _format_repr(self):
        return "int8 per-channel"


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


class Fp8Linear(QuantLinear):
    """FP8 e4m3 linear (W8A8 with dynamic activation scales, or weight-only)."""

    def __init__(self, in_features, out_features, bias=True, *, config: Fp8 = Fp8(), dtype=torch.float32,
                 device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.config = config
        block = formats.FP8_BLOCK
        scale_shape = {"tensor": (1, 1), "row": (out_features, 1),
                       "block": (-(-out_features // block), -(-in_features // block))}[config.weights]
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=formats.FP8_DTYPE,
                                                    device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Fp8, *, hessian: torch.Tensor | None = None) -> Fp8Linear:
        """``hessian``: the input statistics ``X^T X / rows`` for ``config.gptq``."""
        if config.gptq and hessian is None:
            raise ValueError("Fp8(gptq=True) needs calibration: pass calibration=... to quantize_")
        module = cls._empty_like(linear, config)
        q, scales = formats.fp8_quantize(linear.weight.detach(), config.weights)
        if config.gptq:
            from .gptq import gptq_round

            n, k = q.shape
            grid = formats.expand_scales(scales, n, k).expand(n, k).cpu()  # the RTN scales: the grid stays

            def round_column(col, j):
                s = grid[:, j]
                return (col / s).clamp_(-formats.FP8_MAX, formats.FP8_MAX).to(formats.FP8_DTYPE).float() * s

            rounded = gptq_round(linear.weight, hessian, round_column)
            q = (rounded / grid).to(formats.FP8_DTYPE).to(q.device)
        module.qweight.copy_(q)
        module.weight_scale.copy_(scales)
        return module

    def dequantize(self, dtype=None):
        return formats.fp8_dequantize(self.qweight, self.weight_scale, dtype=dtype or self.dtype)

    def _matmul(self, x2):
        if self._choose(x2) == "triton" and self.config.activations is not None:
            from ..kernels.triton.fp8_gemm import fp8_matmul

            if x2.is_cuda and self.config.activations == "token":
                # one kernel instead of five torch passes over x (bit-exact with them)
                from ..kernels.triton.fp8_quant import fp8_quantize_rows

                xq, xs = fp8_quantize_rows(x2)
            else:
                xq, xs = formats.fp8_quantize_activations(x2, self.config.activations)
            if x2.is_cuda:
                out = fp8_scaled_mm(xq, xs, self.qweight, self.weight_scale, out_dtype=x2.dtype)
                if out is not None:
                    return out
            return fp8_matmul(xq, xs, self.qweight, self.weight_scale, out_dtype=x2.dtype)
        # Storage format: quantize activations as the GPU kernel would, multiply dequantized in fp32.
        if self.config.activations is not None:
            xq, xs = formats.fp8_quantize_activations(x2, self.config.activations)
            x2 = _dequantize_activations(xq, xs)
        return F.linear(x2.float(), self.dequantize(torch.float32))

    def _format_repr(self):
        acts = f"activations={self.config.activations}" if self.config.activations else "weight-only"
        return f"fp8 e4m3 weights={self.config.weights} {acts}"


def fp8_scaled_mm(xq: torch.Tensor, x_scales: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, *,
                  out_dtype: torch.dtype) -> torch.Tensor | None:
    """``torch._scaled_mm`` (cuBLASLt's FP8 GEMM on CUDA) for per-token activation scales
    ``(M, 1)`` with per-tensor or per-row weight scales, or None where it does not apply: block
    scales, K or N not a multiple of 16 (cuBLASLt's alignment), an output other than bf16 (its
    row-wise scaling writes bf16 only; fp32/fp16 callers keep effllm's Triton kernel)."""
    m, k = xq.shape
    n = qweight.shape[0]
    if out_dtype != torch.bfloat16 or x_scales.shape != (m, 1) or weight_scale.shape not in ((1, 1), (n, 1)):
        return None
    if k % 16 or n % 16:
        return None
    scale_b = weight_scale.reshape(1, -1).expand(1, n).contiguous()
    return torch._scaled_mm(xq, qweight.t(), scale_a=x_scales.contiguous(), scale_b=scale_b, out_dtype=out_dtype)


def _dequantize_activations(xq: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    k = xq.shape[1]
    if scales.shape[1] != 1:
        scales = scales.repeat_interleave(formats.FP8_BLOCK, 1)[:, :k]
    return xq.float() * scales


MODULE_FOR_CONFIG = {Int4WeightOnly: Int4Linear, Int8WeightOnly: Int8Linear, Fp8: Fp8Linear}
