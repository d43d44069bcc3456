"""Sharding a sequence over a group, and the padding rule shared by sequence parallelism.

Padding rule: a sequence of ``S`` tokens over ``P`` ranks is padded at its end to ``S_pad``, the
next multiple of ``P`` (layout ``"contiguous"``) or ``2P`` (layout ``"zigzag"``), and every rank
holds ``S_pad / P`` tokens. Ranks therefore exchange equal blocks; functions that mix tokens
(``ulysses_attention``, ``ring_attention``) take the true length as ``seq_len`` and never let a
real query see a padded key; their outputs are zeros at padded positions.

Layouts (rank ``r`` of ``P``):

- ``"contiguous"``: rank r holds tokens ``[r * S_pad / P, (r + 1) * S_pad / P)``.
- ``"zigzag"``: the padded sequence is cut into ``2P`` equal chunks and rank r holds chunks ``r``
  and ``2P - 1 - r``, which gives every rank the same amount of causal attention work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels._checks import check_float_tensors
from ._group import check_group, check_same_on_all_ranks, rank_and_size
from .collectives import gather_from_group

LAYOUTS = ("contiguous", "zigzag")


def check_layout(op: str, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {LAYOUTS}, got {layout!r}")


def padded_length(seq_len: int, world: int, layout: str = "contiguous") -> int:
    """``S_pad``: ``seq_len`` rounded up to a multiple of ``world`` (``2 * world`` for zigzag)."""
    check_layout("padded_length", layout)
    unit = 2 * world if layout == "zigzag" else world
    return -(-seq_len // unit) * unit


def token_positions(world: int, rank: int, local_len: int, layout: str, device=None) -> torch.Tensor:
    """Global positions (in the padded sequence) of a rank's ``local_len`` tokens, in local order."""
    if layout == "contiguous":
        return torch.arange(rank * local_len, (rank + 1) * local_len, device=device)
    chunk = local_len // 2
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last = torch.arange((2 * world - 1 - rank) * chunk, (2 * world - rank) * chunk, device=device)
    return torch.cat([first, last])


def _natural_order(world: int, local_len: int, layout: str, device=None) -> torch.Tensor:
    """Index that sorts the concatenated rank blocks (rank 0 first) into sequence order."""
    positions = torch.cat([token_positions(world, r, local_len, layout, device) for r in range(world)])
    return torch.argsort(positions)


def shard_sequence(x: torch.Tensor, group, *, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """This rank's block of the full sequence ``x`` along ``dim``, after padding with zeros by the
    padding rule (differentiable; no communication)."""
    op = "shard_sequence"
    check_group(group, op)
    check_layout(op, layout)
    rank, world = rank_and_size(group)
    dim = dim % x.dim()
    seq_len = x.shape[dim]
    pad = padded_length(seq_len, world, layout) - seq_len
    if pad:
        spec = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
        x = F.pad(x, spec)
    local_len = x.shape[dim] // world
    if layout == "contiguous":
        return x.narrow(dim, rank * local_len, local_len)
    return x.index_select(dim, token_positions(world, rank, local_len, layout, x.device))


def unshard_sequence(x: torch.Tensor, group, seq_len: int, *, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """The full sequence (``seq_len`` long along ``dim``) on every rank, from each rank's block: the
    inverse of ``shard_sequence``. Differentiable: the gradient keeps this rank's block."""
    op = "unshard_sequence"
    check_group(group, op)
    check_layout(op, layout)
    _, world = rank_and_size(group)
    dim = dim % x.dim()
    local_len = x.shape[dim]
    check_seq_len(op, seq_len, local_len, world, layout)
    full = gather_from_group(x, group, dim)
    if layout == "zigzag":
        full = full.index_select(dim, _natural_order(world, local_len, layout, x.device))
    return full.narrow(dim, 0, seq_len)


def check_seq_len(op: str, seq_len: int, local_len: int, world: int, layout: str) -> None:
    """``seq_len`` pads (by the padding rule) to exactly ``world`` blocks of ``local_len``."""
    if layout == "zigzag" and local_len % 2:
        raise ValueError(f"{op}: the zigzag layout holds two equal chunks per rank, so the local sequence length must "
                         f"be even, got {local_len}")
    if not isinstance(seq_len, int) or seq_len < 1 or padded_length(seq_len, world, layout) != world * local_len:
        raise ValueError(f"{op}: seq_len={seq_len!r} does not match the shards: {world} ranks x {local_len} local "
                         f"tokens hold a sequence padded to {world * local_len}, while seq_len pads to "
                         f"{padded_length(seq_len, world, layout) if isinstance(seq_len, int) and seq_len > 0 else '?'}"
                         f" ({layout} layout pads to a multiple of {2 * world if layout == 'zigzag' else world})")


def check_sharded_qkv(op: str, q, k, v, group, *, layout: str, seq_len: int | None, causal: bool,
                      check_inputs: bool, value_dim_is_head_dim: bool = False) -> tuple[int, int]:
    """The input checks ``ring_attention`` and ``ulysses_attention`` share: this rank's
    ``q (B, S_local, H, D)``, ``k, v (B, S_local, H_kv, .)`` and, with ``check_inputs``, the same
    shapes and options on every rank. Returns ``(world size, seq_len)`` (default ``P * S_local``)."""
    check_group(group, op)
    check_layout(op, layout)
    check_float_tensors(op, {"q": q, "k": k, "v": v}, ndim=4, layout="(batch, seqlen_local, heads, head_dim)")
    _, world = rank_and_size(group)
    batch, local_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    value_ok = v.shape == k.shape and k.shape[3] == dim if value_dim_is_head_dim else v.shape[:3] == k.shape[:3]
    if k.shape[:2] != (batch, local_len) or not value_ok:
        value_dim = dim if value_dim_is_head_dim else "D_v"
        raise ValueError(f"{op}: k and v must be (batch, seqlen_local, H_kv, {dim}) and (.., H_kv, {value_dim}) "
                         f"with q's batch and local length {(batch, local_len)}, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{op}: kv heads ({kv_heads}) must divide query heads ({heads})")
    seq_len = world * local_len if seq_len is None else seq_len
    if check_inputs:
        check_same_on_all_ranks(op, group, {"q": q.shape, "k": k.shape, "v": v.shape, "seq_len": (seq_len,),
                                            "causal, zigzag": (int(causal), int(layout == "zigzag"))}, q.device)
    check_seq_len(op, seq_len, local_len, world, layout)
    return world, seq_len
