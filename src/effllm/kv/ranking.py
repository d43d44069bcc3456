"""Ranking helpers shared by the cache and the allocators (no other kv imports: no cycles)."""

from __future__ import annotations

import torch


def top_indices(ranking: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best entries of each row of ``ranking`` (last dim). Ties go to the
    earlier token: ``topk`` breaks them differently on CPU and CUDA, and max-pooled scores
    (SnapKV) tie often, so the same prompt would keep other tokens on another device."""
    return torch.sort(ranking, dim=-1, descending=True, stable=True).indices[..., :k]
