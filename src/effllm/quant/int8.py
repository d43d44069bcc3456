"""INT8 weight-only (W8A16): the ``Int8WeightOnly`` config and ``Int8Linear``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .base import QuantLinear
from .registry import QuantConfig, register


@dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """W8A16: symmetric 8-bit weights, one scale per output channel."""

    version: int = 1



@register(Int8WeightOnly)
class Int8Linear(QuantLinear):
    """W8A16 linear: symmetric INT8 weights with one scale per output channel.

    Compute: on CPU (in_features a multiple of 16), torch's ``_weight_int8pack_mm`` with bf16
    activations, output cast back to x's dtype. Everywhere else, CUDA included, there is no
    INT8 kernel yet: every call dequantizes the *whole* weight to x's dtype and runs
    ``F.linear``, so it saves memory but costs time against the float layer.
    """

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
