"""``QuantLinear``: what every quantized drop-in replacement for ``nn.Linear`` shares.

Each module keeps the *portable* format (``formats.py``) in persistent buffers, so its
``state_dict()`` lists the packed tensors and a saved file loads on any device. Backend-specific
layouts (torch's CPU INT4 pack) are derived from those buffers on first use and cached outside
the state dict; the derivation is deterministic, so reloaded modules give bit-identical outputs.
The formats themselves live one per file (``int4.py``, ``int8.py``, ``fp8.py``), each with its
config and registered in ``registry.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._backend import resolve_backend


class QuantLinear(nn.Module):
    """Shared shape checks, bias, flattening to 2-D and ``repr`` of the quantized linears."""

    config: object
    config_type: type  # set by registry.register

    @classmethod
    def shape_error(cls, linear: nn.Linear, config) -> str | None:
        """Why ``linear`` cannot take ``config`` (checked before anything changes), or None."""
        return None

    @classmethod
    def calibration_needs(cls, config) -> frozenset[str]:
        """What ``from_linear`` needs from calibration batches for this config: ``"act_aware"``
        (input statistics for the activation-aware search) and/or ``"gptq"`` (input Hessians)."""
        return frozenset(n for n in ("act_aware", "gptq") if getattr(config, n, False))

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
