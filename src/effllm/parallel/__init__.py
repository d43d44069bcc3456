"""Tensor and sequence parallelism on torch.distributed (gloo on CPU, NCCL on GPU).

- ``tensor_parallel(model, group)``: shard a Hugging Face Llama-family model in place.
- Layers: ``ColumnParallelLinear``, ``RowParallelLinear``, ``VocabParallelEmbedding``,
  ``ParallelLMHead`` + ``vocab_parallel_cross_entropy``.
- Sequence parallelism: ``ulysses_attention``, ``ring_attention`` (zig-zag balanced for causal),
  ``shard_sequence`` / ``unshard_sequence`` (layouts and the padding rule in ``sequence.py``).
- Overlap: ``fused_allreduce_rmsnorm`` (reduce-scatter -> add + RMSNorm on a token slice ->
  all-gather) and ``token_split_overlap`` (one token chunk's all-reduce during the other's compute).
- Collectives with tensor-parallel autograd rules (``collectives.py``).

Every function takes an explicit process group; nothing here initialises one. Importing this
package imports only torch.
"""

from .collectives import (all_to_all, copy_to_group, gather_from_group, gather_sequence, reduce_from_group,
                          reduce_scatter_sequence, scatter_to_group)
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from ._group import shard_sizes
from .fused_norm import fused_allreduce_rmsnorm
from .model import TensorParallelHandle, check_tensor_parallel, tensor_parallel
from .overlap import llama_layer_branches, overlap_min_tokens, token_split_overlap
from .ring import ring_attention
from .sequence import padded_length, shard_sequence, unshard_sequence
from .ulysses import ulysses_attention

__all__ = [
    "tensor_parallel", "TensorParallelHandle", "check_tensor_parallel",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "ParallelLMHead",
    "vocab_parallel_cross_entropy", "shard_sizes",
    "ulysses_attention", "ring_attention", "shard_sequence", "unshard_sequence", "padded_length",
    "fused_allreduce_rmsnorm", "token_split_overlap", "overlap_min_tokens", "llama_layer_branches",
    "copy_to_group", "reduce_from_group", "gather_from_group", "scatter_to_group", "gather_sequence",
    "reduce_scatter_sequence", "all_to_all",
]
