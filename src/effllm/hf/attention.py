"""Route a Hugging Face model's attention through ``effllm.kernels.attention`` (prefill) and
``effllm.kernels.decode_attention`` (one new token against the cache).

transformers looks attention functions up by ``config._attn_implementation`` in its
``AttentionInterface``; effllm adds an ``"effllm"`` entry (and the matching mask function) the
first time ``patch(attention=...)`` runs, never at import. Models that do not select the key are
unaffected.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .. import kernels  # module reference: one attribute lookup per call, no import on the hot path
from ..kernels.decode import MAX_QUERIES as DECODE_MAX_QUERIES
from ..kernels.decode import decode_attention_unchecked
from ..kv.kvzip import replay_attention

ATTENTION_KEY = "effllm"
# What a patched model's attention modules carry (instance attributes, so the state dies with
# the model and a deep copy gets its own): the backend, and the kv feature that hands scores to
# its caches. patch() sets them, unpatch() deletes them.
BACKEND_ATTR = "_effllm_attention_backend"
KV_ATTR = "_effllm_kv"
_registered = False
_lock = threading.Lock()


def effllm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention signature: ``query (B, H, Sq, D)``, returns ``(B, Sq, H, D)``."""
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q_len, kv_len = query.shape[2], key.shape[2]
    attrs = module.__dict__  # plain dict reads: nn.Module.__getattr__ is slow on a miss
    backend = attrs.get(BACKEND_ATTR, "auto")
    kv = attrs.get(KV_ATTR)
    cache = kv.take_pending(module.layer_idx) if kv is not None else None
    if cache is not None:
        return _attention_with_compression(cache, module, query, key, value, attention_mask, scaling, softcap,
                                           backend)

    if attention_mask is not None or dropout > 0.0:
        # transformers built an explicit mask (padding, chunked prefill): apply it exactly as sdpa does.
        if softcap is not None:
            raise ValueError("effllm attention: softcap together with an explicit attention mask is not supported yet")
        return _sdpa(query, key, value, attention_mask, scaling, dropout=dropout,
                     is_causal=bool(causal and attention_mask is None and q_len > 1)), None

    window = (sliding_window - 1, 0) if (sliding_window and causal) else None
    # (B, H, S, D) -> (B, S, H, D) views: no copy, the kernels take strided tensors.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if causal and q_len == 1 and not _needs_grad(query, key, value):
        # A decode step: the new token is the last of the kv_len cached keys.
        out = kernels.decode_attention(q, k, v, kv_len, scale=scaling, window=window, softcap=softcap,
                                       backend=backend)
        return out, None
    if causal and q_len > 1 and kv_len > q_len:
        # No mask with more keys than queries means a prefill into an empty static cache: the
        # real keys are the first q_len slots (transformers relies on top-left alignment here).
        k, v = k[:, :q_len], v[:, :q_len]
    out = kernels.attention(q, k, v, causal=bool(causal and q_len > 1), scale=scaling, window=window,
                            softcap=softcap, backend=backend)
    return out, None


def _sdpa(query, key, value, attention_mask, scale, *, dropout: float = 0.0, is_causal: bool = False):
    """transformers' explicit-mask attention, exactly as its sdpa path runs it: ``(B, Sq, H, D)``."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scale,
                                         is_causal=is_causal, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


def _attention_with_compression(cache, module, query, key, value, attention_mask, scaling, softcap, backend):
    """Attention for a layer whose keys live in a ``CompressedCache``; then let its policy evict.

    The stored keys are no longer at consecutive positions, so transformers' mask does not
    describe them: every stored key is in the past of the new queries, which are causal among
    themselves (the last ``q_len`` tokens of every row). The mask is read once, at the first
    prefill, to find left padding, which the cache drops after scoring.
    """
    layer = cache.layers[module.layer_idx]
    q_len = query.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if cache.replaying:  # KVzip: score the cached tokens, store nothing
        if softcap is not None:
            raise NotImplementedError("effllm.kv: KVzip with attention softcapping is not supported yet")
        out, best = replay_attention(query, key, value, scale, layer.stored(), key_valid=cache.replay_valid)
        cache.observe_replay(module.layer_idx, best)
        return out, None
    if layer.ragged is not None:
        out, stats = _ragged_attention(layer, query, scale, softcap, backend, cache.policy.needs_decode_stats)
        cache.observe_decode(module.layer_idx, stats)
        return out, None
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if q_len == 1:
        stats = None
        if cache.policy.needs_decode_stats:
            out, stats = kernels.decode_attention(q, k, v, key.shape[2], scale=scale, softcap=softcap,
                                                  return_stats=True, backend=backend)
            stats = stats[..., : layer.stored()]
        else:
            out = kernels.decode_attention(q, k, v, key.shape[2], scale=scale, softcap=softcap, backend=backend)
        cache.observe_decode(module.layer_idx, stats)
        return out, None
    padding = _left_padding(attention_mask) if layer.seen == q_len else None
    if padding is not None:
        if softcap is not None:
            raise NotImplementedError("effllm.kv: softcap with a padded batch is not supported yet")
        layer.padding = padding
        out = _sdpa(query, key, value, attention_mask, scale)
    else:
        out = kernels.attention(q, k, v, causal=True, scale=scale, softcap=softcap, backend=backend)
    cache.observe_prefill(module.layer_idx, query, scale)
    return out, None


def _left_padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, S)`` True at padding keys of a first prefill's boolean mask; None without padding."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        raise NotImplementedError("effllm.kv: expected a boolean attention mask (the effllm mask function)")
    seen = attention_mask[:, 0].any(dim=1)  # (B, S): keys some query attends to
    if bool(seen.all()):
        return None
    if bool((seen[:, 1:] < seen[:, :-1]).any()):
        raise ValueError("effllm.kv: batches must be left-padded (padding_side='left'); padding after a token "
                         "would be attended by the tokens generated next")
    return ~seen


def _ragged_attention(layer, query, scale, softcap, backend, need_stats):
    """Attention of ``query (B, H, Sq, D)`` over a ragged layer (rows of different lengths, the
    step's own keys already appended): ``(out (B, Sq, H, D), stats (B, H_kv, width) or None)``."""
    batch, heads, q_len, dim = query.shape
    kv_heads = layer.batch_heads()[1]
    group = heads // kv_heads
    # Each (batch row, KV head) is one sequence with one KV head and `group` query heads.
    q = query.view(batch, kv_heads, group, q_len, dim).permute(0, 1, 3, 2, 4).reshape(batch * kv_heads, q_len,
                                                                                       group, dim)
    width = layer.stored()
    if q_len <= DECODE_MAX_QUERIES:
        # The cache built this layout itself: skip decode_attention's per-call input checks.
        result = decode_attention_unchecked(q, **layer.ragged.decode_args(), scale=scale, softcap=softcap,
                                            return_stats=need_stats, backend=backend)
        out, stats = result if need_stats else (result, None)
    else:
        out, stats = _ragged_attention_torch(layer, q, scale, softcap)
        stats = stats if need_stats else None
    out = out.view(batch, kv_heads, q_len, group, dim).permute(0, 2, 1, 3, 4).reshape(batch, q_len, heads, dim)
    if stats is not None:
        stats = stats[..., :width].reshape(batch, kv_heads, width)
    return out, stats


def _ragged_attention_torch(layer, q, scale, softcap):
    """Explicit float32 attention for more queries than the decode kernel takes (a question
    appended after compression): rows padded to the longest, each query sees its row's past."""
    rows, q_len, group, dim = q.shape
    keys, values = layer.ragged.padded()
    lengths = layer.ragged.lengths.long()
    scores = torch.einsum("rqgd,rkd->rgqk", q.float(), keys.float()) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = lengths[:, None] - q_len + torch.arange(q_len, device=q.device)  # (R, Sq)
    visible = torch.arange(keys.shape[1], device=q.device) <= q_pos[:, :, None]  # (R, Sq, width)
    probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    out = torch.einsum("rgqk,rkd->rqgd", probs, values.float()).to(q.dtype)
    return out, probs.sum(dim=(1, 2)).unsqueeze(1)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def ensure_registered() -> str:
    """Register the ``effllm`` attention and mask functions with transformers (idempotent)."""
    global _registered
    with _lock:
        if not _registered:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(ATTENTION_KEY, effllm_attention_forward)
            # Same boolean masks as sdpa (None when causal alone suffices).
            AttentionMaskInterface.register(ATTENTION_KEY, sdpa_mask)
            _registered = True
    return ATTENTION_KEY
