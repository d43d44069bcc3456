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
                            eps: float = 1e-6, *, residual_sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = all_reduce(x) + residual`` and ``rms_norm(h) * weight``, computed by token slices.

    ``x (..., hidden)`` is this rank's partial sum (a row-parallel output before its reduction),
    ``residual`` the replicated residual stream of the same shape, ``weight (hidden,)`` the norm's
    weight. Returns ``(normed, h)``, both full and replicated, as Llama's post-attention
    ``residual + norm`` would. Token counts the world size does not divide are padded (and the
    padding dropped). Differentiable with tensor-parallel semantics: ``x``'s gradient is the
    gradient of the sum, ``residual``'s and ``weight``'s are full on every rank.

    ``residual_sharded=True`` keeps the residual stream as TokenWeave does, each rank holding only
    its token slice: ``residual`` is then that slice, ``(ceil(N / P), hidden)`` for ``N`` tokens
    (``shard_sequence(residual.reshape(-1, hidden), group, dim=0)``), the returned ``h`` is the new
    slice, and only ``normed`` is gathered: the same bytes as one all-reduce. Chain the slices
    from layer to layer and ``unshard_sequence(h, group, N, dim=0)`` at the end.
    """
    op = "fused_allreduce_rmsnorm"
    check_group(group, op)
    hidden = x.shape[-1]
    _, world = rank_and_size(group)
    count = x.numel() // hidden if hidden else 0
    local = -(-count // world)
    if residual_sharded and residual.shape != (local, hidden):
        raise ValueError(f"{op}: with residual_sharded=True, residual must be this rank's token slice of shape "
                         f"({local}, {hidden}) ({count} tokens over {world} ranks), got {tuple(residual.shape)}")
    if not residual_sharded and x.shape != residual.shape:
        raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if weight.shape != (hidden,):
        raise ValueError(f"{op}: weight must have shape ({hidden},) to match x's last dim, got {tuple(weight.shape)}")
    pad = local * world - count
    tokens = F.pad(x.reshape(-1, hidden), (0, 0, 0, pad))
    summed = reduce_scatter_sequence(tokens, group, dim=0)
    if residual_sharded:
        h = summed + residual
    else:
        res_tokens = F.pad(residual.reshape(-1, hidden), (0, 0, 0, pad))
        h = summed + scatter_to_group(res_tokens, group, dim=0, sizes=[local] * world)
    # Each rank normalises other tokens: the weight's gradient is the sum over ranks.
    normed = rms_norm(h, copy_to_group(weight, group), eps)
    if residual_sharded:
        return gather_from_group(normed, group, dim=0)[:count].reshape(x.shape), h.to(x.dtype)
    both = gather_from_group(torch.cat([normed, h.to(normed.dtype)], dim=-1), group, dim=0)[:count]
    normed, h = both.split(hidden, dim=-1)
    return normed.reshape(x.shape), h.reshape(x.shape).to(x.dtype)
