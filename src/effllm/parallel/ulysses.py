"""DeepSpeed-Ulysses attention: all-to-all from sequence shards to head shards and back.

Each rank enters with its block of the sequence for every head, ``(B, S_local, H, D)``. One
all-to-all per tensor gives it the whole sequence for a subset of heads; it runs ordinary
attention (``effllm.kernels.attention``, so any backend, window or softcap works) and a second
all-to-all returns the output to sequence shards. Communication per rank is O(S * H * D / P).

Heads are split by the sharding rule (the first ``n % P`` ranks get one more) and query heads
follow their KV head, so GQA groups stay whole: with ``H_kv >= P`` the KV heads are split and
each rank receives the ``H / H_kv`` query heads of each of its KV heads. With ``H_kv < P`` the KV
heads are repeated to one per query head first (more traffic) and the query heads are split;
that needs ``H >= P``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._group import shard_sizes
from .collectives import all_to_all
from .sequence import _natural_order, check_sharded_qkv


def head_split(heads: int, kv_heads: int, world: int) -> tuple[list[int], list[int], bool]:
    """``(query heads per rank, KV heads per rank, whether KV heads are repeated to query heads first)``."""
    if kv_heads >= world:
        kv_sizes = shard_sizes(kv_heads, world)
        return [n * (heads // kv_heads) for n in kv_sizes], kv_sizes, False
    if heads < world:
        raise ValueError(f"ulysses_attention: {world} ranks need at least {world} query heads to split, got {heads} "
                         f"(with {kv_heads} KV heads)")
    sizes = shard_sizes(heads, world)
    return sizes, sizes, True


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, *, causal: bool = True,
                      seq_len: int | None = None, layout: str = "contiguous", scale: float | None = None,
                      window: int | tuple[int, int] | None = None, softcap: float | None = None,
                      backend: str = "auto", check_inputs: bool = True) -> torch.Tensor:
    """Attention over a sequence sharded on ``group``: ``q (B, S_local, H, D)``, ``k, v (B, S_local, H_kv, D)``
    are this rank's tokens (every rank the same ``S_local``, see ``sequence.py`` for the layouts and the
    padding rule); returns this rank's ``(B, S_local, H, D)`` output. ``seq_len`` is the true sequence
    length (default ``P * S_local``, no padding); padded keys are never attended and padded query rows
    come back as zeros. Other options as in ``effllm.kernels.attention``. Differentiable.
    ``check_inputs`` compares the shapes of all ranks first (one small all-gather), so a mismatch
    raises on every rank instead of failing inside the all-to-all.
    """
    world, seq_len = check_sharded_qkv("ulysses_attention", q, k, v, group, layout=layout, seq_len=seq_len,
                                       causal=causal, check_inputs=check_inputs)
    batch, local_len, heads, _ = q.shape
    kv_heads = k.shape[2]

    q_sizes, kv_sizes, repeat_kv = head_split(heads, kv_heads, world)
    if repeat_kv:
        k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))
    blocks = [local_len] * world
    # Sequence shards -> head shards: (B, S_local, H, D) -> (B, P * S_local, H / P, D).
    qh = all_to_all(q, group, split_dim=2, join_dim=1, split_sizes=q_sizes, join_sizes=blocks)
    kh = all_to_all(k, group, split_dim=2, join_dim=1, split_sizes=kv_sizes, join_sizes=blocks)
    vh = all_to_all(v, group, split_dim=2, join_dim=1, split_sizes=kv_sizes, join_sizes=blocks)
    order = None
    if layout == "zigzag":
        order = _natural_order(world, local_len, layout, q.device)
        qh, kh, vh = (t.index_select(1, order) for t in (qh, kh, vh))
    from ..kernels.attention import attention

    # Only the real tokens take part; the padded rows are restored as zeros.
    out = attention(qh[:, :seq_len], kh[:, :seq_len], vh[:, :seq_len], causal=causal, scale=scale, window=window,
                    softcap=softcap, backend=backend)
    out = F.pad(out, (0, 0, 0, 0, 0, world * local_len - seq_len))
    if order is not None:
        out = out.index_select(1, torch.argsort(order))
    # Head shards -> sequence shards.
    return all_to_all(out, group, split_dim=1, join_dim=2, split_sizes=blocks, join_sizes=q_sizes)
