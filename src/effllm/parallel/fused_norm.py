"""All-reduce + residual add + RMSNorm as reduce-scatter -> local add and norm -> all-gather.

TokenWeave's restructuring (arXiv 2505.11329): instead of all-reducing the whole activation and
having every rank normalise every token, each rank reduces only its ``1/P`` of the tokens, adds
the residual and normalises that slice, and one all-gather returns the normalised activation and
the new residual together. The bytes on the wire equal an all-reduce's (a reduce-scatter plus an
all-gather), but the norm's work per rank drops by ``P``. On GPUs TokenWeave fuses this into a
few-SM multimem kernel; here the local part is effllm's ``rms_norm`` (torch path) between gloo or
NCCL collectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.norm import rms_norm
from ._group import check_group, rank_and_size
from .collectives import copy_to_group, gather_from_group, reduce_scatter_sequence, scatter_to_group


def fused_allreduce_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, group,
                            eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = all_reduce(x) + residual`` and ``rms_norm(h) * weight``, computed by token slices.

    ``x (..., hidden)`` is this rank's partial sum (a row-parallel output before its reduction),
    ``residual`` the replicated residual stream of the same shape, ``weight (hidden,)`` the norm's
    weight. Returns ``(normed, h)``, both full and replicated, as Llama's post-attention
    ``residual + norm`` would. Token counts the world size does not divide are padded (and the
    padding dropped). Differentiable with tensor-parallel semantics: ``x``'s gradient is the
    gradient of the sum, ``residual``'s and ``weight``'s are full on every rank.
    """
    op = "fused_allreduce_rmsnorm"
    check_group(group, op)
    if x.shape != residual.shape:
        raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"{op}: weight must have shape ({hidden},) to match x's last dim, got {tuple(weight.shape)}")
    _, world = rank_and_size(group)
    tokens = x.reshape(-1, hidden)
    count = tokens.shape[0]
    pad = -count % world
    if pad:
        tokens = F.pad(tokens, (0, 0, 0, pad))
        res_tokens = F.pad(residual.reshape(-1, hidden), (0, 0, 0, pad))
    else:
        res_tokens = residual.reshape(-1, hidden)
    local = (count + pad) // world
    summed = reduce_scatter_sequence(tokens, group, dim=0)
    h = summed + scatter_to_group(res_tokens, group, dim=0, sizes=[local] * world)
    # Each rank normalises other tokens: the weight's gradient is the sum over ranks.
    normed = rms_norm(h, copy_to_group(weight, group), eps)
    both = gather_from_group(torch.cat([normed, h.to(normed.dtype)], dim=-1), group, dim=0)[:count]
    normed, h = both.split(hidden, dim=-1)
    return normed.reshape(x.shape), h.reshape(x.shape).to(x.dtype)
