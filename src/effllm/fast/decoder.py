"""A functional Llama-family decoder over a ``StaticKVCache``: the fast path's forward.

``FastDecoder`` reads a transformers Llama / Mistral / Qwen2 model's weights once (merged and
re-laid out by ``weights.py``) and runs two functions that hold no Python state between calls:

- ``prefill(ids)``: the prompt, eagerly, attention through ``effllm.kernels.attention``
  (causal); keys and values are written into the static cache; returns the last logits.
- ``decode(token, pos)``: one token per row at position ``pos`` (a 1-element tensor, so every
  position runs the same code and a compiled step never specialises on it); attention reads all
  ``capacity`` slots of the cache and masks the slots past ``pos``.

The residual adds, norms, RoPE and SwiGLU go through ``effllm.kernels.fused`` (fewer ops per
layer when eager; one fused loop each under ``torch.compile``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.fused import add_rms_norm, rope_qk, rope_tables, swiglu
from .static_cache import StaticKVCache
from .weights import (
    PackedLinear,
    apply_linear,
    check_linears,
    int8_from_weight,
    pack,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LinearSpec:
    kind: str
    group_size: int
    count: int  # tensors of the packed form
    has_bias: bool


@dataclass(frozen=True)
class DecoderSpec:
    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float
    qkv: LinearSpec
    o: LinearSpec
    gate_up: LinearSpec
    down: LinearSpec
    lm_head: LinearSpec


def _spec_of(p: PackedLinear) -> LinearSpec:
    return LinearSpec(p.kind, p.group_size, len(p.tensors), p.bias is not None)


def _flat(p: PackedLinear) -> tuple[torch.Tensor, ...]:
    return p.tensors + ((p.bias,) if p.bias is not None else ())


def _linear(x, spec: LinearSpec, parts, at: int):
    """Apply the linear whose parts start at ``parts[at]``; return ``(y, next index)``."""
    end = at + spec.count
    bias = parts[end] if spec.has_bias else None
    return apply_linear(x, spec.kind, spec.group_size, parts[at:end], bias), end + spec.has_bias


class UnsupportedModel(ValueError):
    """The fast decode path cannot run this model (the message says why)."""


def check_model(model: nn.Module, *, skip_linears: bool = False) -> None:
    """Raise ``UnsupportedModel`` unless the fast path can read this model exactly
    (``skip_linears``: the caller checked the linears' formats already)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"model_type {model_type!r} is not supported by the fast decode path "
                               f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(model, "lm_head"):
        raise UnsupportedModel(f"{type(model).__name__} is not a *ForCausalLM with .model.layers and .lm_head")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config.hidden_act!r}: the fast path implements SwiGLU (silu) only")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModel(f"layer_types {sorted(set(layer_types))}: sliding-window layers are not yet "
                               "supported by the fast decode path")
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_norm", "k_norm"):
            if getattr(attn, name, None) is not None:
                raise UnsupportedModel(f"layer {i} has {name} (Qwen3/OLMo-style): not supported by the fast path")
        if skip_linears:
            continue
        try:
            check_linears({f"model.layers.{i}.self_attn.{n}": getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")})
            check_linears({f"model.layers.{i}.self_attn.o_proj": attn.o_proj})
            check_linears({f"model.layers.{i}.mlp.{n}": getattr(mlp, n) for n in ("gate_proj", "up_proj")})
            check_linears({f"model.layers.{i}.mlp.down_proj": mlp.down_proj})
            check_linears({"lm_head": model.lm_head})
        except ValueError as exc:
            raise UnsupportedModel(str(exc)) from None


def sliding_window(model: nn.Module) -> int | None:
    """The model's attention window (Mistral), or None. Generation beyond it is refused."""
    config = model.config
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


class FastDecoder:
    """The fast path's weights and its prefill / decode functions for one model."""

    def __init__(self, model: nn.Module, *, weights: str = "model", lm_head: str = "auto"):
        check_model(model)
        body = model.model
        config = model.config
        first = body.layers[0].self_attn
        self.model_dtype = body.embed_tokens.weight.dtype
        self.device = body.embed_tokens.weight.device
        self.rotary = body.rotary_emb
        self.window = sliding_window(model)
        layers, specs = [], None
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            packed = (pack([attn.q_proj, attn.k_proj, attn.v_proj], weights), pack([attn.o_proj], weights),
                      pack([mlp.gate_proj, mlp.up_proj], weights), pack([mlp.down_proj], weights))
            layer_specs = tuple(_spec_of(p) for p in packed)
            if specs is not None and layer_specs != specs:
                raise UnsupportedModel("layers differ in their linears' formats; the fast path needs one format "
                                       "for every layer")
            specs = layer_specs
            qkv, o, gate_up, down = packed
            layers.append((layer.input_layernorm.weight.detach(), *_flat(qkv), *_flat(o),
                           layer.post_attention_layernorm.weight.detach(), *_flat(gate_up), *_flat(down)))
        if lm_head == "auto":  # a float head dominates the bytes per token once the body is quantized
            quantized = specs[0].kind != "dense" and type(model.lm_head) is nn.Linear
            lm_head = "int8" if quantized and model.lm_head.in_features % 16 == 0 else "model"
        if lm_head == "int8" and model.lm_head.in_features % 16:
            raise UnsupportedModel(f"lm_head='int8' needs in_features % 16 == 0 (torch's CPU INT8 op), got "
                                   f"{model.lm_head.in_features}")
        head = int8_from_weight(model.lm_head.weight) if lm_head == "int8" else pack([model.lm_head], weights)
        self.head_kind = head.kind
        self.layers = layers
        self.embed = body.embed_tokens.weight.detach()
        self.norm = body.norm.weight.detach()
        self.head = _flat(head)
        self.spec = DecoderSpec(
            num_layers=len(layers), q_heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
            head_dim=getattr(first, "head_dim", config.hidden_size // config.num_attention_heads),
            eps=float(body.norm.variance_epsilon), scale=float(first.scaling),
            qkv=specs[0], o=specs[1], gate_up=specs[2], down=specs[3], lm_head=_spec_of(head))
        # Bytes a decode step reads (the embedding contributes one row per token, left out).
        self.step_bytes = sum(t.numel() * t.element_size() for t in [self.norm, *self.head, *(t for lt in layers for t in lt)])

    def new_cache(self, batch: int, capacity: int) -> StaticKVCache:
        s = self.spec
        return StaticKVCache(s.num_layers, batch, s.kv_heads, s.head_dim, capacity, dtype=self.model_dtype,
                             device=self.device)

    def rope(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, signed_sin)`` for positions ``0 .. capacity-1`` from the model's own rotary module."""
        positions = torch.arange(capacity, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.model_dtype, device=self.device)
        with torch.no_grad():
            cos, sin = self.rotary(probe, positions)
        return rope_tables(cos[0].to(self.model_dtype), sin[0].to(self.model_dtype))

    # -- the two forwards ---------------------------------------------------------------------------

    def prefill(self, ids: torch.Tensor, cache: StaticKVCache, tables) -> torch.Tensor:
        """Run the prompt ``ids (B, S)`` from position 0; fill the cache; return ``(B, V)`` logits."""
        from ..kernels.attention import attention

        s = self.spec
        seq = ids.shape[1]
        positions = torch.arange(seq, device=ids.device)
        cos, ssin = (t[:seq][None, :, None, :] for t in tables)
        h = torch.nn.functional.embedding(ids, self.embed)
        residual = None
        for index, parts in enumerate(self.layers):
            def attend(q, k, v, index=index):
                cache.write(index, k.transpose(1, 2), v.transpose(1, 2), positions)
                return attention(q, k, v, causal=True, scale=s.scale)

            h, residual = _layer(s, h, residual, parts, cos, ssin, attend)
        cache.length = seq
        return self._logits(h[:, -1:], residual[:, -1:])[:, 0]

    def _logits(self, h, residual):
        s = self.spec
        x, _ = add_rms_norm(h, residual, self.norm, s.eps)
        logits, _ = _linear(x, s.lm_head, self.head, 0)
        return logits


def _layer(s: DecoderSpec, h, residual, parts, cos, ssin, attend):
    """One decoder layer; ``h`` is the previous layer's output before its residual add."""
    x, residual = add_rms_norm(h, residual, parts[0], s.eps)
    batch, seq, _ = x.shape
    qkv, at = _linear(x, s.qkv, parts, 1)
    qkv = qkv.view(batch, seq, s.q_heads + 2 * s.kv_heads, s.head_dim)
    qk = rope_qk(qkv[:, :, : s.q_heads + s.kv_heads], cos, ssin)
    q, k, v = qk[:, :, : s.q_heads], qk[:, :, s.q_heads:], qkv[:, :, s.q_heads + s.kv_heads:]
    out = attend(q, k, v).reshape(batch, seq, s.q_heads * s.head_dim)
    a, at = _linear(out, s.o, parts, at)
    x, residual = add_rms_norm(a, residual, parts[at], s.eps)
    gate_up, at = _linear(x, s.gate_up, parts, at + 1)
    m, _ = _linear(swiglu(gate_up), s.down, parts, at)
    return m, residual


def decode_step(s: DecoderSpec, window: int | None, token, pos, embed, layers, norm, head, keys, values, cos_t, ssin_t,
                layer_fn=None):
    """One token per row at position ``pos (1,)``: write its keys in place, return ``(B, V)`` logits.

    Pure function of its tensors (the unit ``torch.compile`` sees): shapes depend only on the
    batch and the cache's capacity, never on ``pos``. ``layer_fn`` replaces ``decode_layer``
    (a compiled copy of it, when only layers are compiled)."""
    layer_fn = layer_fn or decode_layer
    capacity = keys[0].shape[2]
    cos = cos_t.index_select(0, pos)[None, :, None, :]
    ssin = ssin_t.index_select(0, pos)[None, :, None, :]
    slots = torch.arange(capacity, device=token.device)
    visible = slots <= pos
    if window is not None:
        visible = visible & (slots > pos - window)
    h = torch.nn.functional.embedding(token, embed)
    # A zero residual (adding it is exact) rather than None: every layer then has the same
    # signature, so a compiled layer is one graph, not two.
    residual = torch.zeros_like(h)
    for index, parts in enumerate(layers):
        h, residual = layer_fn(s, h, residual, parts, cos, ssin, keys[index], values[index], pos, visible)
    x, _ = add_rms_norm(h, residual, norm, s.eps)
    logits, _ = _linear(x, s.lm_head, head, 0)
    return logits[:, 0]


def decode_layer(s: DecoderSpec, h, residual, parts, cos, ssin, k_cache, v_cache, pos, visible):
    """One layer of ``decode_step``: attention over every slot of the cache, masked by ``visible``."""
    batch = h.shape[0]
    group = s.q_heads // s.kv_heads

    def attend(q, k, v):
        k_cache.index_copy_(2, pos, k.transpose(1, 2))
        v_cache.index_copy_(2, pos, v.transpose(1, 2))
        qg = q.reshape(batch, s.kv_heads, group, s.head_dim)
        scores = torch.matmul(qg, k_cache.transpose(-1, -2)) * s.scale
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v_cache.dtype)
        return torch.matmul(probs, v_cache)

    return _layer(s, h, residual, parts, cos, ssin, attend)
