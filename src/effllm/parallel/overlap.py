"""Token-split overlap: while one half of the tokens is being all-reduced, the other half computes.

A tensor-parallel decoder layer is a chain of residual branches (attention, then MLP) whose
outputs are partial sums over the group: ``h = h + all_reduce(branch(h))``. Splitting the tokens
into two independent chunks A and B lets each chunk's all-reduce run (asynchronously) while the
other chunk computes its branch (TokenWeave's schedule, arXiv 2505.11329):

    branch1(A) | AR(A) + branch1(B) | AR(B) + branch2(A) | AR(A) + branch2(B) | AR(B)

Chunks must not see each other inside a branch: split along the batch (``dim=0``, separate
sequences) or along tokens only when every branch is token-wise. Under autograd the same
schedule runs with synchronous, differentiable all-reduces (no overlap): the overlap is an
inference optimisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ._group import check_group, rank_and_size
from .collectives import reduce_from_group
from .layers import RowParallelLinear


def overlap_min_tokens(world_size: int) -> int:
    """Fewest tokens from which ``token_split_overlap`` splits by default at this world size.

    From the two-resource schedule in ``effllm.bench.cases.parallel`` (an 8B-class layer on NVLink
    with compute rates measured on an H100): the split pays once the all-reduce of half the tokens
    hides more than splitting costs, from 4096 tokens at 2 ranks, 2048 at 4 and 1024 at 8 (where
    TokenWeave also starts). The all-reduce's share of a layer grows with the world size (the
    compute per rank shrinks by ``P``, the bytes per rank do not), hence the lower thresholds. On
    CPU with gloo the measured gain was positive from 4096 tokens at 2 ranks (docs/parallel.md)."""
    if world_size <= 2:
        return 4096
    if world_size <= 4:
        return 2048
    return 1024


def token_split_overlap(branches: Sequence[Callable[[torch.Tensor], torch.Tensor]], hidden: torch.Tensor, group, *,
                        dim: int = 0, chunks: int = 2, min_tokens: int | None = None) -> torch.Tensor:
    """``for branch in branches: hidden = hidden + all_reduce(branch(hidden))``, with ``hidden`` split
    into ``chunks`` pieces along ``dim`` so that one piece's all-reduce overlaps the next piece's
    branch. Each ``branch`` returns this rank's partial sum (e.g. ending in
    ``RowParallelLinear(..., reduce_output=False)``), shaped like its input.

    Below ``min_tokens`` tokens (all dims but the last) the layer runs in one piece, where the
    split costs more than it hides; None takes ``overlap_min_tokens(world_size)`` (4096 tokens
    at 2 ranks, 2048 at 3-4, 1024 from 5; see docs/parallel.md). ``min_tokens=0`` always splits."""
    op = "token_split_overlap"
    check_group(group, op)
    if not branches:
        raise ValueError(f"{op}: branches must hold at least one callable")
    if chunks < 1:
        raise ValueError(f"{op}: chunks must be >= 1, got {chunks}")
    if min_tokens is not None and (not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0):
        raise ValueError(f"{op}: min_tokens must be None or an int >= 0, got {min_tokens!r}")
    dim = dim % hidden.dim()
    _, world = rank_and_size(group)
    if min_tokens is None:
        min_tokens = overlap_min_tokens(world)
    if hidden.numel() < min_tokens * hidden.shape[-1]:
        chunks = 1
    if hidden.shape[dim] < chunks:
        raise ValueError(f"{op}: dimension {dim} of length {hidden.shape[dim]} cannot be split into {chunks} chunks")
    pieces = list(hidden.tensor_split(chunks, dim=dim))
    if torch.is_grad_enabled() or world == 1:
        for branch in branches:
            pieces = [piece + reduce_from_group(_checked(branch(piece), piece, op), group) for piece in pieces]
        return torch.cat(pieces, dim=dim)
    in_flight: list = [None] * len(pieces)  # (partial sum being reduced, its work handle) per chunk
    for branch in branches:
        for i, piece in enumerate(pieces):
            if in_flight[i] is not None:  # this chunk's previous all-reduce ran during the last chunk's compute
                partial, work = in_flight[i]
                work.wait()
                piece = pieces[i] = piece + partial
            partial = _checked(branch(piece), piece, op).contiguous().clone()
            in_flight[i] = (partial, dist.all_reduce(partial, group=group, async_op=True))
    for i, (partial, work) in enumerate(in_flight):
        work.wait()
        pieces[i] = pieces[i] + partial
    return torch.cat(pieces, dim=dim)


def _checked(partial: torch.Tensor, piece: torch.Tensor, op: str) -> torch.Tensor:
    if partial.shape != piece.shape:
        raise ValueError(f"{op}: a branch must return a partial sum shaped like its input {tuple(piece.shape)}, "
                         f"got {tuple(partial.shape)}")
    return partial


@contextlib.contextmanager
def _partial_sums(*layers: RowParallelLinear):
    """Let row-parallel layers return their partial sums for a while (the caller reduces)."""
    saved = [layer.reduce_output for layer in layers]
    try:
        for layer in layers:
            layer.reduce_output = False
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.reduce_output = value


def llama_layer_branches(layer, **attention_kwargs) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The two residual branches of a ``tensor_parallel``-sharded Llama-family decoder layer
    (``input_layernorm -> self_attn`` and ``post_attention_layernorm -> mlp``), each returning this
    rank's partial sum, for ``token_split_overlap(llama_layer_branches(layer, position_embeddings=...),
    hidden, group)``. ``attention_kwargs`` go to ``self_attn`` for every chunk, so tensors among them
    must broadcast over the batch (batch dimension 1, e.g. rotary ``position_embeddings`` of shared
    positions); a causal layer without padding needs no mask."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    o_proj, down_proj = getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)
    if not isinstance(o_proj, RowParallelLinear) or not isinstance(down_proj, RowParallelLinear):
        raise ValueError("llama_layer_branches: expected a decoder layer sharded by tensor_parallel (self_attn.o_proj "
                         f"and mlp.down_proj RowParallelLinear), got {type(o_proj).__name__} and "
                         f"{type(down_proj).__name__}")
    for name, value in _tensors(attention_kwargs):
        if value.dim() and value.shape[0] != 1:
            raise ValueError(f"llama_layer_branches: attention argument {name} has batch dimension {value.shape[0]}; "
                             "every chunk receives it whole, so it must be 1 (broadcast over the batch)")

    def attention_branch(hidden: torch.Tensor) -> torch.Tensor:
        with _partial_sums(o_proj):
            return attn(hidden_states=layer.input_layernorm(hidden), **attention_kwargs)[0]

    def mlp_branch(hidden: torch.Tensor) -> torch.Tensor:
        with _partial_sums(down_proj):
            return mlp(layer.post_attention_layernorm(hidden))

    return [attention_branch, mlp_branch]


def _tensors(kwargs: dict, prefix: str = ""):
    for key, value in kwargs.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, (tuple, list)):
            yield from _tensors({f"[{i}]": v for i, v in enumerate(value)}, name)
