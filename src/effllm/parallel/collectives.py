"""Collectives with the autograd rules tensor and sequence parallelism need.

Convention (Megatron's): a tensor is either *replicated* (every rank holds the same value and
computes the same loss from it) or *sharded* along one dimension. Each function moves between
the two and its backward is the matching move for gradients:

==========================  ====================================  ====================================
function                    forward                               backward
==========================  ====================================  ====================================
``copy_to_group``           identity (replicated input)           all-reduce (sum of partial grads)
``reduce_from_group``       all-reduce (sum of partial results)   identity
``gather_from_group``       all-gather along ``dim``              keep this rank's slice
``scatter_to_group``        keep this rank's slice                all-gather along ``dim``
``gather_sequence``         all-gather along ``dim``              reduce-scatter along ``dim``
``reduce_scatter_sequence`` reduce-scatter along ``dim``          all-gather along ``dim``
``all_to_all``              split ``split_dim``, join             the inverse all-to-all
                            ``join_dim``
==========================  ====================================  ====================================

``torch.distributed.nn.functional`` has differentiable collectives too, but with the other
convention (all-reduce's backward all-reduces again: every rank's output feeds a different
loss), and ``_functional_collectives`` has no differentiable all-reduce, so these are written
as ``autograd.Function``s over plain ``torch.distributed`` calls. ``gather_from_group`` and
``scatter_to_group`` take uneven shards (the sharding rule of ``_group.py``); the sequence
collectives need equal shards.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._group import all_gather_single, check_group, rank_and_size, reduce_scatter_single, shard_sizes


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, group, dim: int, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``; ``sizes`` (per rank) when they differ."""
    _, world = rank_and_size(group)
    if world == 1:
        return x.clone()
    longest = max(sizes) if sizes else x.shape[dim]
    front = x.movedim(dim, 0)
    if front.shape[0] < longest:  # uneven shards travel padded to the longest one
        pad = front.new_zeros((longest - front.shape[0], *front.shape[1:]))
        front = torch.cat([front, pad])
    front = front.contiguous()
    out = front.new_empty((world * longest, *front.shape[1:]))
    all_gather_single(out, front, group=group)
    if sizes and any(s != longest for s in sizes):
        out = torch.cat([block[:size] for block, size in zip(out.split(longest), sizes)])
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    _, world = rank_and_size(group)
    if world == 1:
        return x.clone()
    if x.shape[dim] % world:
        raise ValueError(f"reduce_scatter_sequence: dimension {dim} of length {x.shape[dim]} must be a multiple of "
                         f"the group's world size {world}; pad the sequence first (effllm.parallel.shard_sequence)")
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // world, *front.shape[1:]))
    reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim)


def _own_slice(x: torch.Tensor, group, dim: int, sizes: list[int] | None) -> torch.Tensor:
    rank, world = rank_and_size(group)
    sizes = sizes or shard_sizes(x.shape[dim], world)
    if sum(sizes) != x.shape[dim]:
        raise ValueError(f"scatter_to_group: shard sizes {sizes} do not add up to dimension {dim} of length "
                         f"{x.shape[dim]}")
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank]).contiguous()


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return _all_gather(x, group, dim, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice(grad, ctx.group, ctx.dim, ctx.sizes), None, None, None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return _own_slice(x, group, dim, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim, ctx.sizes), None, None, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


def _all_to_all(x: torch.Tensor, group, split_dim: int, join_dim: int,
                split_sizes: list[int], join_sizes: list[int]) -> torch.Tensor:
    """Send rank j the ``split_sizes[j]`` slice of ``x`` along ``split_dim``; join what arrives along
    ``join_dim``, where rank j's ``x`` is ``join_sizes[j]`` long. Every rank passes the same lists."""
    rank, world = rank_and_size(group)
    if world == 1:
        return x.clone()
    # One flat buffer each way, so blocks of different shapes travel in one all_to_all_single
    # (gloo's list all_to_all wants equal shapes).
    parts = x.split(split_sizes, dim=split_dim)
    send = torch.cat([p.reshape(-1) for p in parts])
    shapes = []
    for j in range(world):
        shape = list(x.shape)
        shape[split_dim], shape[join_dim] = split_sizes[rank], join_sizes[j]
        shapes.append(shape)
    recv_counts = [math.prod(s) for s in shapes]
    recv = send.new_empty(sum(recv_counts))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=[p.numel() for p in parts],
                           group=group)
    return torch.cat([block.view(shape) for block, shape in zip(recv.split(recv_counts), shapes)], dim=join_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, split_dim, join_dim, split_sizes, join_sizes):
        ctx.args = (group, split_dim, join_dim, split_sizes, join_sizes)
        return _all_to_all(x, group, split_dim, join_dim, split_sizes, join_sizes)

    @staticmethod
    def backward(ctx, grad):
        group, split_dim, join_dim, split_sizes, join_sizes = ctx.args
        # The inverse exchange: each block goes home and the split dim is joined again.
        return _all_to_all(grad, group, join_dim, split_dim, join_sizes, split_sizes), None, None, None, None, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduces the gradient (enter a tensor-parallel region)."""
    check_group(group, "copy_to_group")
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) forward; gradient passes through (leave a row-parallel region)."""
    check_group(group, "reduce_from_group")
    return _ReduceFromGroup.apply(x, group)


def gather_from_group(x: torch.Tensor, group, dim: int = -1, sizes: list[int] | None = None) -> torch.Tensor:
    """All-gather along ``dim`` (``sizes``: each rank's length there, when uneven); backward keeps
    this rank's slice."""
    check_group(group, "gather_from_group")
    return _GatherFromGroup.apply(x, group, dim % x.dim(), sizes)


def scatter_to_group(x: torch.Tensor, group, dim: int = -1, sizes: list[int] | None = None) -> torch.Tensor:
    """This rank's slice along ``dim`` (the sharding rule unless ``sizes`` given); backward all-gathers."""
    check_group(group, "scatter_to_group")
    return _ScatterToGroup.apply(x, group, dim % x.dim(), sizes)


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """All-gather equal sequence shards along ``dim``; backward reduce-scatters (sequence parallelism)."""
    check_group(group, "gather_sequence")
    return _GatherSequence.apply(x, group, dim % x.dim())


def reduce_scatter_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sum over ranks and keep this rank's equal shard along ``dim``; backward all-gathers."""
    check_group(group, "reduce_scatter_sequence")
    return _ReduceScatterSequence.apply(x, group, dim % x.dim())


def all_to_all(x: torch.Tensor, group, split_dim: int, join_dim: int, split_sizes: list[int],
               join_sizes: list[int]) -> torch.Tensor:
    """Differentiable all-to-all: rank j receives the ``split_sizes[j]`` slice of ``x`` along
    ``split_dim``; the blocks received join along ``join_dim`` (rank j's block is ``join_sizes[j]``
    long there). Backward is the inverse exchange."""
    check_group(group, "all_to_all")
    return _AllToAll.apply(x, group, split_dim % x.dim(), join_dim % x.dim(), list(split_sizes), list(join_sizes))
