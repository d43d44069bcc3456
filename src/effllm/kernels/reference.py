"""Pure-torch references: the test oracle for every kernel in this package.

Written for clarity, computed in float32 (or the dtype given), never used on a hot path.
"""

from __future__ import annotations

import math

import torch

from ._masks import attention_keep_mask, normalize_window


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
    # Rows with no visible key give 0; NaN from the inputs themselves propagates (the convention
    # every path keeps: a NaN in a query row, or in a key/value it sees, makes its row NaN).
    probs = probs.masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0)
    out = (probs @ vf).transpose(1, 2)
    return out, lse


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in float64: ``x / sqrt(mean(x^2) + eps) * weight``."""
    xd = x.to(torch.float64)
    y = xd * torch.rsqrt(xd.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(torch.float64)
    return y


def decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | tuple[int, int] | None = None,
    softcap: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``decode_attention`` one sequence at a time: ``(out, lse, stats)``.

    Each sequence's keys are gathered token by token from its pages, then attended with
    ``attention_reference`` (bottom-right causal); ``stats`` sums the explicit probabilities
    over the queries and the query heads of each KV head.
    """
    batch, seq_q, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    window = normalize_window(window, causal=True)
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    outs, lses = [], []
    stats = torch.zeros(batch, kv_heads, capacity, dtype=torch.float32, device=q.device)
    for b in range(batch):
        length = int(cache_seqlens[b])
        if block_table is None:
            k, v = k_cache[b, :length], v_cache[b, :length]
        else:
            page_size = k_cache.shape[1]
            rows = [(int(block_table[b, n // page_size]), n % page_size) for n in range(length)]
            k = torch.stack([k_cache[p, s] for p, s in rows])
            v = torch.stack([v_cache[p, s] for p, s in rows])
        out, lse = attention_reference(q[b : b + 1], k[None], v[None], causal=True, scale=scale, window=window,
                                       softcap=softcap, compute_dtype=compute_dtype)
        outs.append(out)
        lses.append(lse)
        # Probabilities from the LSE, recomputed explicitly (not taken from the kernel under test).
        kf = k.to(compute_dtype).transpose(0, 1).repeat_interleave(group, dim=0)  # H, L, D
        scores = (q[b].to(compute_dtype).transpose(0, 1) @ kf.transpose(-1, -2)) * scale  # H, Sq, L
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        keep = attention_keep_mask(seq_q, length, causal=True, window=window, device=q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1)
        stats[b, :, :length] = probs.view(kv_heads, group, seq_q, length).sum(dim=(1, 2))
    return torch.cat(outs), torch.cat(lses), stats
