"""Ranking helpers shared by the cache and the allocators (no other kv imports: no cycles)."""

from __future__ import annotations

import torch


def top_indices(ranking: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best entries of each row of ``ranking`` (last dim). Ties go to the
    earlier token: ``topk`` breaks them differently on CPU and CUDA, and max-pooled scores
    (SnapKV) tie often, so the same prompt would keep other tokens on another device."""
    return torch.sort(ranking, dim=-1, descending=True, stable=True).indices[..., :k]


def per_row(counts: list[int], like: torch.Tensor) -> torch.Tensor:
    """Per-batch-row ``counts`` as a tensor that broadcasts against ``like (B, ...)``."""
    return torch.tensor(counts, device=like.device).view(-1, *[1] * (like.dim() - 1))


def top_mask(ranked: torch.Tensor, keep: int | list[int]) -> torch.Tensor:
    """True at the ``keep`` best entries of each row of ``ranked`` (last dim; ties to the
    earlier); a list: a count per batch row (dim 0)."""
    mask = torch.zeros_like(ranked, dtype=torch.bool)
    if isinstance(keep, int):
        return mask.scatter_(-1, top_indices(ranked, keep), True)
    best = top_indices(ranked, max(keep))
    taken = torch.arange(best.shape[-1], device=ranked.device) < per_row(keep, best)
    return mask.scatter_(-1, best, taken.expand(best.shape))
