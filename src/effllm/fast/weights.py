"""The fast path's copy of a model's linear weights: merged per layer, in the chosen format.

Each layer's q/k/v projections become one matrix and gate/up another, so a decode step runs 4
matmuls per layer instead of 7. A ``PackedLinear`` holds one merged matrix in one of three forms:

- ``dense``: a float weight ``(N, K)`` (the model's dtype, or bf16 with ``weights="bf16"``);
- ``int8``: ``(qweight int8 (N, K), scales bf16 (N,))`` for ``torch._weight_int8pack_mm``;
- ``int4``: ``(packed, scales_and_zeros bf16 (K/G, N, 2))`` for ``_weight_int4pack_mm_for_cpu``.

INT8/INT4 come from effllm's ``Int8Linear``/``Int4Linear`` modules (``patch(quant=...)`` or
``quantize_`` before), whose portable buffers are re-laid out here once. Torch's packed CPU ops
need bf16 activations; ``apply_linear`` casts at the matmul and back, as the modules do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PackedLinear:
    kind: str  # "dense" | "int8" | "int4"
    tensors: tuple[torch.Tensor, ...]
    bias: torch.Tensor | None
    out_features: int
    group_size: int = 0

    def nbytes(self) -> int:
        tensors = self.tensors + ((self.bias,) if self.bias is not None else ())
        return sum(t.numel() * t.element_size() for t in tensors)


class UnsupportedLinear(ValueError):
    """A linear the fast path cannot read (its message names the module and the reason)."""


def linear_kind(module: nn.Module) -> str:
    """"dense", "int8", "int4", or "dequant" (a quantized module whose shape torch's packed CPU
    op rejects: like the module itself, the fast path multiplies by its dequantized weight)."""
    from ..quant.linear import Int4Linear, Int8Linear

    if isinstance(module, Int8Linear):
        return "int8" if module.in_features % 16 == 0 else "dequant"
    if isinstance(module, Int4Linear):
        if module.input_scale is not None:
            raise UnsupportedLinear("Int4Linear with act_aware=True (per-module input scales) is not yet "
                                    "supported by the fast decode path")
        return "int4" if module.out_features % 16 == 0 else "dequant"
    if type(module) is nn.Linear:
        return "dense"
    raise UnsupportedLinear(f"{type(module).__name__} is not nn.Linear, Int8Linear or Int4Linear")


def check_linears(named: dict[str, nn.Module]) -> None:
    """Raise ``UnsupportedLinear`` naming the first module the fast path cannot read."""
    for name, module in named.items():
        try:
            linear_kind(module)
        except UnsupportedLinear as exc:
            raise UnsupportedLinear(f"{name}: {exc}") from None


def _float_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach() if type(module) is nn.Linear else module.dequantize(module.dtype)


def pack(modules: list[nn.Module], weights: str) -> PackedLinear:
    """Merge ``modules`` (same input, outputs concatenated in order) into one ``PackedLinear``.

    ``weights``: "model" keeps float weights in their dtype, "bf16" stores them in bfloat16.
    Quantized modules keep their format when all of them share one packable format; otherwise
    their dequantized weights are multiplied as float weights (what each module would do)."""
    kinds = {linear_kind(m) for m in modules}
    groups = {getattr(getattr(m, "config", None), "group_size", 0) for m in modules}
    kind = kinds.pop() if len(kinds) == 1 and len(groups) == 1 else "dequant"
    out = sum(m.out_features for m in modules)
    biases = [m.bias for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else m.weight.new_zeros(m.out_features)
                          for b, m in zip(biases, modules)])
    with torch.no_grad():
        if kind in ("dense", "dequant"):
            parts = [_float_weight(m) for m in modules]
            w = torch.cat(parts) if len(parts) > 1 else parts[0]
            if weights == "bf16":
                w = w.to(torch.bfloat16)
            return PackedLinear("dense", (w.contiguous(),), bias, out)
        if kind == "int8":
            q = torch.cat([m.qweight for m in modules]).contiguous()
            scales = torch.cat([m.scales for m in modules]).to(torch.bfloat16)
            return PackedLinear("int8", (q, scales), bias, out)
        from ..quant import formats

        group = modules[0].config.group_size
        q = torch.cat([formats.int4_unpack(m.qweight) for m in modules]).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales = torch.cat([m.scales for m in modules])
        zeros = torch.cat([m.zeros for m in modules])
        scales_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).to(torch.bfloat16).contiguous()
        return PackedLinear("int4", (packed, scales_zeros), bias, out, group)


def int8_from_weight(weight: torch.Tensor) -> PackedLinear:
    """INT8 per-channel copy of a float weight (the fast path's own, e.g. a tied ``lm_head``)."""
    from ..quant import formats

    with torch.no_grad():
        q, scales = formats.int8_quantize(weight.detach())
    return PackedLinear("int8", (q.contiguous(), scales.to(torch.bfloat16)), None, weight.shape[0])


def apply_linear(x: torch.Tensor, kind: str, group_size: int, tensors, bias) -> torch.Tensor:
    """``x @ W.T + bias`` for one ``PackedLinear`` (passed as its parts so a compiled step sees
    only tensors); output in x's dtype."""
    if kind == "dense":
        w = tensors[0]
        y = F.linear(x.to(w.dtype), w).to(x.dtype)
    else:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if kind == "int8":
            y2 = torch._weight_int8pack_mm(x2, tensors[0], tensors[1])
        else:
            y2 = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, tensors[0], group_size, tensors[1])
        y = y2.to(x.dtype).reshape(*x.shape[:-1], -1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y
