"""Process-group checks and the one sharding rule every parallel piece uses.

Sharding rule (features, heads, vocabulary): ``n`` items over ``P`` ranks give the first
``n % P`` ranks ``n // P + 1`` items and the rest ``n // P``, in rank order (as
``torch.tensor_split``). Sequences are padded instead (see ``sequence.py``), so ranks exchange
equal blocks.
"""

from __future__ import annotations

import torch.distributed as dist


# torch 2.13 renamed the single-tensor collectives (the old names warn); torch >= 2.5 is supported.
# getattr throughout: builds without distributed support must still import this package.
all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


def check_group(group, op: str):
    """The group itself if torch.distributed is initialised and ``group`` is a process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialised; call torch.distributed.init_process_group "
                           "(or launch with torchrun) and pass a process group")
    if group is None:
        raise ValueError(f"{op}: group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or "
                         "dist.new_group(...)), got None")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{op}: this process (global rank {dist.get_rank()}) is not a member of the group")
    return group


def rank_and_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sizes(n: int, world: int) -> list[int]:
    """Items per rank under the sharding rule: the first ``n % world`` ranks hold one more."""
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank's items among ``n`` under the sharding rule."""
    sizes = shard_sizes(n, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def check_at_least_one_each(op: str, what: str, n: int, world: int) -> None:
    if n < world:
        raise ValueError(f"{op}: {what} ({n}) must be at least the group's world size ({world}) so that every "
                         "rank holds a shard")


def check_same_on_all_ranks(op: str, group, described: dict[str, tuple[int, ...]], device) -> None:
    """Raise on every rank (never hang or abort in a mismatched collective) unless every rank passes
    the same integers for each name, e.g. a tensor's shape. Costs one small all-gather."""
    import torch

    flat = [v for values in described.values() for v in values]
    mine = torch.tensor([len(flat), *flat], dtype=torch.int64, device=device)
    everyone = torch.empty(rank_and_size(group)[1] * mine.numel(), dtype=torch.int64, device=device)
    all_gather_single(everyone, mine, group=group)
    everyone = everyone.view(-1, mine.numel())
    if bool((everyone == mine).all()):
        return
    rows = everyone.tolist()
    lines = []
    for rank, row in enumerate(rows):
        values, at = row[1:], 0
        parts = []
        for name, own in described.items():
            parts.append(f"{name} {tuple(values[at:at + len(own)])}")
            at += len(own)
        lines.append(f"rank {rank}: " + ", ".join(parts))
    raise ValueError(f"{op}: the ranks' inputs disagree (each rank must pass its equal-sized shard):\n"
                     + "\n".join(lines))
