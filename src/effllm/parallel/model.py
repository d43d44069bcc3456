"""``tensor_parallel(model, group)``: shard a Hugging Face Llama-family model in place (Megatron layout).

Per decoder layer: q/k/v projections column-parallel by whole heads, o_proj row-parallel (one
all-reduce), gate/up column-parallel, down row-parallel (one all-reduce). The token embedding is
vocabulary-parallel and the LM head column-parallel over the vocabulary with gathered logits, so
``generate()`` and HF's loss see full logits; tied embeddings stay tied (one shared shard).

Head split: KV heads by the sharding rule (the first ``H_kv % P`` ranks get one more) and every
rank holds the query heads of its KV heads, so GQA groups stay whole and the local attention is an
ordinary GQA attention: SmolLM2's 9 query / 3 KV heads over 2 ranks become 6 + 3 query heads and
2 + 1 KV heads (exact, unbalanced); over 3 ranks 3 + 3 + 3 and 1 + 1 + 1. ``H_kv < P`` is refused.
The MLP width and the vocabulary follow the sharding rule.

Quantize after sharding (``effllm.quantize_`` reaches each shard's ``local`` ``nn.Linear``): the
result equals quantizing the unsharded model when no quantization group or block straddles a
shard boundary (tested: FP8 128x128 blocks with 128-multiple shards).

Supported: causal LMs (``model.model.layers``) and bare decoders (``model.layers``) whose decoder
layers have ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj`` as ``nn.Linear`` (tested: Llama, SmolLM2, Mistral, Qwen2, Qwen3). Quantized
linears are not ``nn.Linear``: shard first, quantize after. Every check runs before the first
module is replaced, so a refused model is left unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ._group import check_group, rank_and_size, shard_sizes
from .layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class TensorParallelHandle:
    """What ``tensor_parallel`` did on this rank, and ``restore()`` to undo it."""

    rank: int
    world_size: int
    query_heads: list[int]  # per rank
    kv_heads: list[int]  # per rank
    intermediate: list[int]  # MLP width per rank
    vocab: list[int]  # vocabulary rows per rank
    replaced: list[str] = field(default_factory=list)  # qualified names of the replaced modules
    _swaps: list = field(default_factory=list, repr=False)  # (owner, attribute name) per replaced module
    _tied: bool = field(default=False, repr=False)

    @property
    def active(self) -> bool:
        return bool(self._swaps)

    def restore(self) -> None:
        """Put the unsharded ``nn.Linear`` / ``nn.Embedding`` modules back (weights all-gathered, equal to
        the originals; tied embeddings tied again). Every rank of the group must call it together."""
        if not self._swaps:
            raise RuntimeError("TensorParallelHandle.restore: already restored")
        quantized = [qualified for (owner, name), qualified in zip(self._swaps, self.replaced)
                     if _holds_quantized_shard(getattr(owner, name))]
        if quantized:  # checked first, so that nothing is half restored
            raise TypeError(f"TensorParallelHandle.restore: {quantized[0]} (and {len(quantized) - 1} more) hold "
                            "quantized shards; gathering quantized shards back is not supported")
        embedding = None
        for owner, name in self._swaps:  # the same order on every rank: the gathers pair up
            module = getattr(owner, name)
            if isinstance(module, VocabParallelEmbedding):
                embedding = module.to_embedding()
                setattr(owner, name, embedding)
            elif self._tied and isinstance(module, ParallelLMHead):
                head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
                head.weight = embedding.weight
                setattr(owner, name, head.train(module.training))
            else:
                setattr(owner, name, module.to_linear())
        self._swaps = []


def _holds_quantized_shard(module: nn.Module) -> bool:
    local = getattr(module, "local", None)  # the parallel linears' shard; embeddings have none
    return local is not None and not isinstance(local, nn.Linear)


def _unsupported(what: str) -> ValueError:
    return ValueError(f"tensor_parallel: unsupported model: {what}; expected a Hugging Face Llama-family causal LM "
                      "(model.layers[i].self_attn.{q,k,v,o}_proj and .mlp.{gate,up,down}_proj as nn.Linear, "
                      "model.embed_tokens as nn.Embedding, lm_head as nn.Linear)")


def _find(model: nn.Module):
    """``(decoder, layers, lm_head)`` of a causal LM (or of a bare decoder, ``lm_head`` None), or a clear error."""
    decoder = model if isinstance(getattr(model, "layers", None), nn.ModuleList) else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or not isinstance(layers, nn.ModuleList):
        raise _unsupported(f"{type(model).__name__} has no .model.layers")
    if not isinstance(getattr(decoder, "embed_tokens", None), nn.Embedding):
        raise _unsupported(f"{type(decoder).__name__}.embed_tokens is "
                           f"{type(getattr(decoder, 'embed_tokens', None)).__name__}")
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and not isinstance(lm_head, nn.Linear):
        raise _unsupported(f"lm_head is {type(lm_head).__name__}")
    for index, layer in enumerate(layers):
        for parent, names in (("self_attn", _ATTENTION), ("mlp", _MLP)):
            owner = getattr(layer, parent, None)
            for name in names:
                module = getattr(owner, name, None)
                if not isinstance(module, nn.Linear):
                    raise _unsupported(f"model.layers.{index}.{parent}.{name} is {type(module).__name__} "
                                       "(quantize after sharding, not before)")
    return decoder, layers, lm_head


def _head_counts(model: nn.Module, layers) -> tuple[int, int, int]:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads:
        raise _unsupported("config.num_attention_heads is missing")
    attn = layers[0].self_attn
    head_dim = getattr(attn, "head_dim", None) or attn.q_proj.out_features // heads
    for index, layer in enumerate(layers):
        a = layer.self_attn
        if (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features) != (
                heads * head_dim, kv_heads * head_dim, kv_heads * head_dim):
            raise _unsupported(f"layer {index}'s q/k/v widths {a.q_proj.out_features}/{a.k_proj.out_features}/"
                               f"{a.v_proj.out_features} do not match {heads} query and {kv_heads} KV heads of "
                               f"dimension {head_dim}")
    return heads, kv_heads, head_dim


def _plan(model: nn.Module, group, op: str):
    """Every check ``tensor_parallel`` makes, nothing changed: ``(decoder, layers, lm_head, head_dim, handle)``."""
    check_group(group, op)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)) for m in model.modules()):
        raise ValueError(f"{op}: the model is already tensor-parallel")
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ValueError(f"{op}: the model holds DTensor parameters (loaded with tp_plan?); load it unsharded")
    decoder, layers, lm_head = _find(model)
    heads, kv_heads, head_dim = _head_counts(model, layers)
    rank, world = rank_and_size(group)
    if kv_heads < world:
        raise ValueError(f"{op}: num_key_value_heads ({kv_heads}) must be at least the group's world size ({world}): "
                         "every rank needs one whole KV head and its query heads")
    embed = decoder.embed_tokens
    if lm_head is not None and lm_head.weight is not embed.weight and lm_head.out_features != embed.num_embeddings:
        raise _unsupported(f"lm_head has {lm_head.out_features} outputs for a {embed.num_embeddings}-token vocabulary")
    kv_split = shard_sizes(kv_heads, world)
    q_split = [n * (heads // kv_heads) for n in kv_split]
    intermediate = layers[0].mlp.gate_proj.out_features
    handle = TensorParallelHandle(rank, world, q_split, kv_split, shard_sizes(intermediate, world),
                                  shard_sizes(embed.num_embeddings, world))
    return decoder, layers, lm_head, head_dim, handle


def check_tensor_parallel(model: nn.Module, group) -> None:
    """Raise what ``tensor_parallel(model, group)`` would raise, changing nothing (for callers that
    validate several features before applying any)."""
    _plan(model, group, "tensor_parallel")


def tensor_parallel(model: nn.Module, group) -> TensorParallelHandle:
    """Shard ``model`` (a Hugging Face Llama-family causal LM, the same weights on every rank) over
    ``group`` in place. Afterwards each rank holds its shards; calls on the model (forward, loss,
    backward, ``generate()``) must run on every rank of the group together, with the same inputs,
    and give every rank the same full logits. Returns a ``TensorParallelHandle``; its ``restore()``
    gathers the shards back into the unsharded modules.
    """
    decoder, layers, lm_head, head_dim, handle = _plan(model, group, "tensor_parallel")
    q_split, kv_split = handle.query_heads, handle.kv_heads
    embed = decoder.embed_tokens

    # Build every replacement first; the model is changed only once all of them exist.
    swaps: list[tuple[nn.Module, str, nn.Module, str]] = []
    for index, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"{'' if decoder is model else 'model.'}layers.{index}"
        for name, split in (("q_proj", q_split), ("k_proj", kv_split), ("v_proj", kv_split)):
            new = ColumnParallelLinear.from_linear(getattr(attn, name), group, out_sizes=[n * head_dim for n in split])
            swaps.append((attn, name, new, f"{prefix}.self_attn.{name}"))
        new = RowParallelLinear.from_linear(attn.o_proj, group, in_sizes=[n * head_dim for n in q_split])
        swaps.append((attn, "o_proj", new, f"{prefix}.self_attn.o_proj"))
        for name in ("gate_proj", "up_proj"):
            swaps.append((mlp, name, ColumnParallelLinear.from_linear(getattr(mlp, name), group),
                          f"{prefix}.mlp.{name}"))
        swaps.append((mlp, "down_proj", RowParallelLinear.from_linear(mlp.down_proj, group), f"{prefix}.mlp.down_proj"))
    new_embed = VocabParallelEmbedding.from_embedding(embed, group)
    swaps.append((decoder, "embed_tokens", new_embed, f"{'' if decoder is model else 'model.'}embed_tokens"))
    if lm_head is not None:
        if lm_head.weight is embed.weight:
            new_head = ParallelLMHead.from_embedding(new_embed, gather_output=True)
        else:
            new_head = ParallelLMHead.from_linear(lm_head, group, gather_output=True)
        swaps.append((model, "lm_head", new_head, "lm_head"))

    for owner, name, new, qualified in swaps:
        setattr(owner, name, new)
        handle.replaced.append(qualified)
        handle._swaps.append((owner, name))
    handle._tied = lm_head is not None and lm_head.weight is embed.weight
    return handle
