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

ATTENTION_KEY = "effllm"
# Backend chosen per patched model, read at call time. Keyed by id(config): transformers configs
# are per model instance and not hashable. patch() adds entries, unpatch() removes them.
ATTENTION_BACKEND_BY_CONFIG: dict[int, str] = {}
# KV compression (effllm.kv.api.KVCompression) per patched model, keyed the same way.
KV_COMPRESSION_BY_CONFIG: dict[int, object] = {}
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
    config_key = id(getattr(module, "config", None))
    kv = KV_COMPRESSION_BY_CONFIG.get(config_key)
    cache = kv.take_pending(module.layer_idx) if kv is not None else None
    if cache is not None:
        return _attention_with_compression(cache, module, query, key, value, attention_mask, scaling, softcap,
                                           ATTENTION_BACKEND_BY_CONFIG.get(config_key, "auto"))

    if attention_mask is not None or dropout > 0.0:
        # transformers built an explicit mask (padding, chunked prefill): apply it exactly as sdpa does.
        if softcap is not None:
            raise ValueError("effllm attention: softcap together with an explicit attention mask is not supported yet")
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            is_causal=bool(causal and attention_mask is None and q_len > 1),
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None

    backend = ATTENTION_BACKEND_BY_CONFIG.get(config_key, "auto")
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


def _attention_with_compression(cache, module, query, key, value, attention_mask, scaling, softcap, backend):
    """Attention for a layer whose keys live in a ``CompressedCache``; then let its policy evict.

    The stored keys are no longer at consecutive positions, so no positional mask applies: every
    stored key is in the past of the new queries, which are causal among themselves (the last
    ``q_len`` stored tokens).
    """
    if attention_mask is not None and attention_mask.dtype == torch.bool and not bool(attention_mask.all()):
        raise NotImplementedError("effllm.kv: batches with padding are not supported yet (the padding mask "
                                  "refers to positions the cache may have evicted)")
    q_len, kv_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if q_len == 1:
        stats = None
        if cache.policy.needs_decode_stats:
            out, stats = kernels.decode_attention(q, k, v, kv_len, scale=scale, softcap=softcap, return_stats=True,
                                                  backend=backend)
        else:
            out = kernels.decode_attention(q, k, v, kv_len, scale=scale, softcap=softcap, backend=backend)
        cache.observe_decode(module.layer_idx, stats)
        return out, None
    out = kernels.attention(q, k, v, causal=True, scale=scale, softcap=softcap, backend=backend)
    cache.observe_prefill(module.layer_idx, query, scale)
    return out, None


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
