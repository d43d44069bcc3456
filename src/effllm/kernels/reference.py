"""Pure-torch references: the test oracle for every kernel in this package.

Written for clarity, computed in float32 (or the dtype given), never used on a hot path.
"""

from __future__ import annotations

import math

import torch

from ._masks import attention_keep_mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention on ``(B, S, H, D)`` tensors.

    Returns ``(out, lse)``: ``out`` is ``(B, Sq, H, Dv)`` in ``compute_dtype`` and ``lse`` the
    natural-log sum of exponentials ``(B, H, Sq)``. Rows with no visible key give 0 and -inf.
    """
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale

    qf = q.to(compute_dtype).transpose(1, 2)  # B, H, Sq, D
    kf = k.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)

    scores = (qf @ kf.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keep = attention_keep_mask(seq_q, seq_k, causal=causal, window=window, device=q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(compute_dtype).min))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = (probs @ vf).transpose(1, 2)
    return out, lse


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in float64: ``x / sqrt(mean(x^2) + eps) * weight``."""
    xd = x.to(torch.float64)
    y = xd * torch.rsqrt(xd.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(torch.float64)
    return y
