"""Cross-entropy over vocabulary-sharded logits, without gathering them.

Each rank holds logits for its vocabulary slice. The softmax needs three numbers per token from
all ranks: the global max (all-reduce MAX, for stability), the sum of exponentials (all-reduce
SUM) and the target's logit (held by one rank; all-reduce SUM of zeros elsewhere). The backward
is local: ``softmax - one_hot(target)`` restricted to this rank's slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._group import check_group, rank_and_size, shard_range


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index):
        logits = logits.float()
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local_target = target - vocab_start
        here = (local_target >= 0) & (local_target < logits.shape[-1])
        safe_target = torch.where(here, local_target, torch.zeros_like(local_target))
        target_logit = shifted.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1) * here
        dist.all_reduce(target_logit, group=group)
        ignored = target == ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), safe_target, here & ~ignored, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, safe_target, hit, ignored = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, safe_target.unsqueeze(-1), -hit.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, target: torch.Tensor, group, *,
                                 vocab_size: int | None = None, ignore_index: int = -100,
                                 reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(full_logits, target)`` from this rank's vocabulary slice of the logits.

    ``local_logits (..., V_local)`` are the columns ``vocab_start:vocab_stop`` that the sharding
    rule gives this rank out of ``vocab_size`` (``ParallelLMHead``'s output); ``target (...)``
    holds global token ids. ``vocab_size`` is found by summing the slices when not given.
    Returns the same loss on every rank; gradients reach only the local logits.
    """
    op = "vocab_parallel_cross_entropy"
    check_group(group, op)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if local_logits.shape[:-1] != target.shape:
        raise ValueError(f"{op}: target shape {tuple(target.shape)} must equal local_logits' leading dims "
                         f"{tuple(local_logits.shape[:-1])}")
    rank, world = rank_and_size(group)
    if vocab_size is None:
        width = torch.tensor([local_logits.shape[-1]], device=local_logits.device)
        dist.all_reduce(width, group=group)
        vocab_size = int(width.item())
    start, stop = shard_range(vocab_size, world, rank)
    if stop - start != local_logits.shape[-1]:
        raise ValueError(f"{op}: rank {rank} of {world} should hold logits {start}:{stop} of a {vocab_size}-token "
                         f"vocabulary ({stop - start} columns), got {local_logits.shape[-1]}")
    losses = _VocabParallelCrossEntropy.apply(local_logits, target, group, start, ignore_index)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (target != ignore_index).sum()
