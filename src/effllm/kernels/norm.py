"""``effllm.kernels.rms_norm``: RMSNorm with float32 statistics, as Llama-family models compute it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import resolve_backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight``, statistics in float32, output in x's dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("rms_norm: x must be a tensor with at least one dimension")
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != x.shape[-1]):
        raise ValueError(
            f"rms_norm: weight must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(weight.shape)}"
        )
    resolve_backend(backend, x, weight, op="rms_norm", has_triton_kernel=False)
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    # Llama/HF order: cast the normalised value first, then scale by the weight.
    return y * weight if weight is not None else y
