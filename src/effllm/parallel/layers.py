"""Tensor-parallel layers (Megatron-style): each rank holds a shard of the weight.

- ``ColumnParallelLinear`` splits ``out_features``: a replicated input gives a feature-sharded
  output (or, with ``gather_output``, the full output on every rank).
- ``RowParallelLinear`` splits ``in_features``: a feature-sharded input gives partial sums that
  are all-reduced (or, with ``sequence_parallel``, reduce-scattered along the sequence).
- ``VocabParallelEmbedding`` splits the vocabulary rows; ``ParallelLMHead`` is a column-parallel
  linear over the vocabulary whose sharded logits feed ``vocab_parallel_cross_entropy``.

Sizes that the world size does not divide are split by the rule in ``_group.py`` (the first
``n % P`` ranks hold one more row or column) unless ``out_sizes`` / ``in_sizes`` give each rank's
share (``tensor_parallel`` keeps attention heads whole that way). ``sequence_parallel=True`` means activations
outside the layer pair are sharded along ``sequence_dim`` in equal blocks: the column layer
all-gathers them in, the row layer reduce-scatters them out (Korthikanti et al.).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._group import check_group, rank_and_size, shard_range, shard_sizes
from .collectives import (_all_gather, copy_to_group, gather_from_group, gather_sequence, reduce_from_group,
                          reduce_scatter_sequence, scatter_to_group)


def _init_uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    # nn.Linear's default init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    # with fan_in of the *whole* layer so a sharded layer draws from the same distribution.
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def _linear_like(local: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, old_bias) -> nn.Linear:
    """An ``nn.Linear`` of the gathered weight and bias, with the shard's requires_grad and mode."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=local.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=old_bias.requires_grad)
    return linear.train(local.training)


def _copied(param: torch.Tensor, index) -> nn.Parameter:
    """A new parameter holding a copy of ``param[index]``, with ``param``'s requires_grad."""
    return nn.Parameter(param.detach()[index].clone(), requires_grad=param.requires_grad)


def _check_linear(op: str, linear) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{op}: expected an nn.Linear, got {type(linear).__name__}")


def _sizes(op: str, name: str, sizes, total: int, world: int) -> list[int]:
    """Per-rank sizes: the sharding rule, or the caller's (e.g. whole attention heads)."""
    if sizes is None:
        return shard_sizes(total, world)
    sizes = [int(n) for n in sizes]
    if len(sizes) != world or sum(sizes) != total or min(sizes) < 0:
        raise ValueError(f"{op}: {name} must give one non-negative size per rank ({world}) adding up to {total}, "
                         f"got {sizes}")
    return sizes


class _ParallelModule(nn.Module):
    def __init__(self, group, op: str):
        super().__init__()
        self.group = check_group(group, op)
        self.rank, self.world_size = rank_and_size(group)


class _ShardedLinear(_ParallelModule):
    """Holds this rank's shard as an ordinary ``nn.Linear`` child, ``local``, so that tools that swap
    linears (``effllm.quantize_``) reach it; ``weight`` (and the column layer's ``bias``) read and
    write through to it."""

    _through = ("weight",)

    def __getattr__(self, name):
        local = self.__dict__.get("_modules", {}).get("local")
        if local is not None and name in type(self)._through:
            return getattr(local, name)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        local = self.__dict__.get("_modules", {}).get("local")
        if local is not None and name in type(self)._through:
            setattr(local, name, value)
        else:
            super().__setattr__(name, value)

    def _local_linear(self) -> nn.Linear:
        if not isinstance(self.local, nn.Linear):
            raise TypeError(f"{type(self).__name__}: its shard is a {type(self.local).__name__}, not an nn.Linear; "
                            "gathering quantized shards back is not supported")
        return self.local


class ColumnParallelLinear(_ShardedLinear):
    """``y = x W^T + b`` with ``W``'s rows (output features) split over the group.

    Input: replicated ``(..., in_features)``, or with ``sequence_parallel`` this rank's equal
    shard along ``sequence_dim``. Output: this rank's ``(..., local_out_features)`` slice, or the
    full ``(..., out_features)`` when ``gather_output``.
    """

    def __init__(self, in_features: int, out_features: int, group, *, bias: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False, sequence_dim: int = 1, out_sizes: list[int] | None = None,
                 dtype=None, device=None):
        super().__init__(group, type(self).__name__)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel, self.sequence_dim = gather_output, sequence_parallel, sequence_dim
        self.out_sizes = _sizes(type(self).__name__, "out_sizes", out_sizes, out_features, self.world_size)
        self.out_start = sum(self.out_sizes[:self.rank])
        self.out_stop = self.out_start + self.out_sizes[self.rank]
        # nn.Linear's own init: fan_in is the whole in_features here, as in the unsharded layer.
        self.local = nn.Linear(in_features, self.out_stop - self.out_start, bias=bias, dtype=dtype, device=device)

    _through = ("weight", "bias")

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kwargs) -> ColumnParallelLinear:
        """This rank's shard of ``linear`` (copied; ``linear`` is left as it is)."""
        _check_linear(cls.__name__, linear)
        # Built on the meta device: no random init (which would draw a rank-dependent amount from the
        # global generator) and no memory until the shard is copied in.
        module = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None,
                     dtype=linear.weight.dtype, device="meta", **kwargs)
        rows = slice(module.out_start, module.out_stop)
        module.weight = _copied(linear.weight, rows)
        if linear.bias is not None:
            module.bias = _copied(linear.bias, rows)
        return module

    def to_linear(self) -> nn.Linear:
        """The unsharded ``nn.Linear`` (its weight all-gathered: every rank of the group must call)."""
        local = self._local_linear()
        with torch.no_grad():
            weight = _all_gather(local.weight.detach(), self.group, 0, self.out_sizes)
            bias = _all_gather(local.bias.detach(), self.group, 0, self.out_sizes) if local.bias is not None else None
        return _linear_like(local, weight, bias, local.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_sequence(x, self.group, self.sequence_dim)
        else:
            x = copy_to_group(x, self.group)
        y = self.local(x)
        return gather_from_group(y, self.group, -1, self.out_sizes) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (rows {self.out_start}:"
                f"{self.out_stop} of rank {self.rank}/{self.world_size}), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_ShardedLinear):
    """``y = x W^T + b`` with ``W``'s columns (input features) split over the group.

    Input: this rank's ``(..., local_in_features)`` slice (``input_is_parallel``, the output of a
    ``ColumnParallelLinear``), or the full replicated input, which is then sliced here. Output:
    the full ``(..., out_features)`` on every rank, or with ``sequence_parallel`` this rank's
    equal shard along ``sequence_dim``. The bias is added once, after the reduction. With
    ``reduce_output=False`` the output is this rank's partial sum, left for the caller to reduce
    (``fused_allreduce_rmsnorm``, ``token_split_overlap``); rank 0's partial then carries the bias.
    """

    def __init__(self, in_features: int, out_features: int, group, *, bias: bool = True, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, sequence_dim: int = 1, reduce_output: bool = True,
                 in_sizes: list[int] | None = None, dtype=None, device=None):
        super().__init__(group, type(self).__name__)
        if sequence_parallel and not reduce_output:
            raise ValueError(f"{type(self).__name__}: sequence_parallel=True reduce-scatters the output, so it needs "
                             "reduce_output=True")
        self.reduce_output = reduce_output
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel, self.sequence_dim = (input_is_parallel, sequence_parallel,
                                                                             sequence_dim)
        self.in_sizes = _sizes(type(self).__name__, "in_sizes", in_sizes, in_features, self.world_size)
        self.in_start = sum(self.in_sizes[:self.rank])
        self.in_stop = self.in_start + self.in_sizes[self.rank]
        # The bias is added after the reduction, so the local linear has none.
        self.local = nn.Linear(self.in_stop - self.in_start, out_features, bias=False, dtype=dtype, device=device)
        _init_uniform_(self.local.weight, in_features)
        self.bias = (nn.Parameter(_init_uniform_(torch.empty(out_features, dtype=dtype, device=device), in_features))
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kwargs) -> RowParallelLinear:
        """This rank's shard of ``linear`` (copied; ``linear`` is left as it is)."""
        _check_linear(cls.__name__, linear)
        module = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None,
                     dtype=linear.weight.dtype, device="meta", **kwargs)  # see ColumnParallelLinear.from_linear
        module.weight = _copied(linear.weight, (slice(None), slice(module.in_start, module.in_stop)))
        if linear.bias is not None:
            module.bias = _copied(linear.bias, slice(None))
        return module

    def to_linear(self) -> nn.Linear:
        """The unsharded ``nn.Linear`` (its weight all-gathered: every rank of the group must call)."""
        local = self._local_linear()
        with torch.no_grad():
            weight = _all_gather(local.weight.detach(), self.group, 1, self.in_sizes)
        bias = self.bias.detach().clone() if self.bias is not None else None
        return _linear_like(local, weight, bias, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_group(x, self.group, -1, self.in_sizes)
        local_in = self.in_stop - self.in_start
        if x.shape[-1] != local_in:
            raise ValueError(f"{type(self).__name__}: input's last dimension must be this rank's {local_in} of "
                             f"{self.in_features} input features, got shape {tuple(x.shape)}")
        y = self.local(x)
        if not self.reduce_output:
            return y + self.bias if self.bias is not None and self.rank == 0 else y
        if self.sequence_parallel:
            y = reduce_scatter_sequence(y, self.group, self.sequence_dim)
            bias = copy_to_group(self.bias, self.group) if self.bias is not None else None  # ranks hold other tokens
        else:
            y = reduce_from_group(y, self.group)
            bias = self.bias
        return y + bias if bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (columns {self.in_start}:{self.in_stop} of rank {self.rank}/"
                f"{self.world_size}), out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}, "
                f"reduce_output={self.reduce_output}")


class VocabParallelEmbedding(_ParallelModule):
    """``nn.Embedding`` with its rows (the vocabulary) split over the group.

    Each rank looks up the ids in its range (others give zeros) and the partial results are
    all-reduced, or with ``sequence_parallel`` reduce-scattered along ``sequence_dim``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group, *, padding_idx: int | None = None,
                 sequence_parallel: bool = False, sequence_dim: int = 1, dtype=None, device=None):
        super().__init__(group, type(self).__name__)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.sequence_parallel, self.sequence_dim = padding_idx, sequence_parallel, sequence_dim
        self.vocab_start, self.vocab_stop = shard_range(num_embeddings, self.world_size, self.rank)
        weight = torch.empty(self.vocab_stop - self.vocab_start, embedding_dim, dtype=dtype, device=device)
        with torch.no_grad():
            nn.init.normal_(weight)
            if padding_idx is not None and self.vocab_start <= padding_idx < self.vocab_stop:
                weight[padding_idx - self.vocab_start].zero_()
        self.weight = nn.Parameter(weight)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group, **kwargs) -> VocabParallelEmbedding:
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"{cls.__name__}: expected an nn.Embedding, got {type(embedding).__name__}")
        for option in ("max_norm", "sparse"):
            if getattr(embedding, option):
                raise ValueError(f"{cls.__name__}: nn.Embedding with {option}={getattr(embedding, option)!r} is not "
                                 "supported")
        module = cls(embedding.num_embeddings, embedding.embedding_dim, group, padding_idx=embedding.padding_idx,
                     dtype=embedding.weight.dtype, device="meta", **kwargs)  # see ColumnParallelLinear.from_linear
        module.weight = _copied(embedding.weight, slice(module.vocab_start, module.vocab_stop))
        return module

    def to_embedding(self) -> nn.Embedding:
        """The unsharded ``nn.Embedding`` (its rows all-gathered: every rank of the group must call)."""
        sizes = shard_sizes(self.num_embeddings, self.world_size)
        with torch.no_grad():
            weight = _all_gather(self.weight.detach(), self.group, 0, sizes)
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                 dtype=weight.dtype, device=weight.device)
        embedding.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        return embedding.train(self.training)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_stop)
        local_ids = torch.where(outside, torch.zeros_like(ids), ids - self.vocab_start)
        local_padding = self.padding_idx - self.vocab_start if self.padding_idx is not None else None
        if local_padding is not None and not 0 <= local_padding < self.weight.shape[0]:
            local_padding = None  # another rank's row
        # padding_idx as nn.Embedding: that row gets no gradient.
        out = F.embedding(local_ids, self.weight, padding_idx=local_padding)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence(out, self.group, self.sequence_dim)
        return reduce_from_group(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (rows {self.vocab_start}:{self.vocab_stop} of rank "
                f"{self.rank}/{self.world_size}), sequence_parallel={self.sequence_parallel}")


class ParallelLMHead(ColumnParallelLinear):
    """Column-parallel projection to the vocabulary: this rank's slice of the logits
    (``vocab_start:vocab_stop``), for ``vocab_parallel_cross_entropy``; ``gather_output=True``
    returns full logits (generation). ``from_embedding`` ties it to a ``VocabParallelEmbedding``
    (one shared weight, as with ``tie_word_embeddings``)."""

    def __init__(self, in_features: int, vocab_size: int, group, **kwargs):
        super().__init__(in_features, vocab_size, group, **kwargs)

    @property
    def vocab_start(self) -> int:
        return self.out_start

    @property
    def vocab_stop(self) -> int:
        return self.out_stop

    @classmethod
    def from_embedding(cls, embedding: VocabParallelEmbedding, **kwargs) -> ParallelLMHead:
        if not isinstance(embedding, VocabParallelEmbedding):
            raise TypeError(f"{cls.__name__}.from_embedding: expected a VocabParallelEmbedding, got "
                            f"{type(embedding).__name__}")
        weight = embedding.weight
        module = cls(embedding.embedding_dim, embedding.num_embeddings, embedding.group, bias=False,
                     dtype=weight.dtype, device="meta", **kwargs)
        module.weight = weight  # the same Parameter: tied
        return module
