"""Route a Hugging Face model's attention through ``effllm.kernels.attention`` (prefill) and
``effllm.kernels.decode_attention`` (one new token against the cache).

transformers looks attention functions up by ``config._attn_implementation`` in its
``AttentionInterface``; effllm adds an ``"effllm"`` entry (and the matching mask function) the
first time ``patch(attention=...)`` runs, never at import. Models that do not select the key are
unaffected. A layer whose keys live in one of effllm's KV caches goes to ``effllm.kv.attention``
(this module only routes).
"""

from __future__ import annotations

import threading

import torch

# module reference: one attribute lookup per call, no import on the hot path
from .. import kernels
from ..kv.attention import attend_cache, sdpa

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
        return attend_cache(cache, module.layer_idx, query, key, value, attention_mask, scaling, softcap,
                            backend), None

    if attention_mask is not None or dropout > 0.0:
        # transformers built an explicit mask (padding, chunked prefill): apply it exactly as sdpa does.
        if softcap is not None:
            raise ValueError("effllm attention: softcap together with an explicit attention mask is not supported yet")
        return sdpa(query, key, value, attention_mask, scaling, dropout=dropout,
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
