"""Attention over a ``CompressedCache`` layer: where effllm's attention goes when a layer's
keys live in one of effllm's caches (``hf/attention.py`` routes here).

The stored keys of a compressed layer are no longer at consecutive positions, so transformers'
mask does not describe them: every stored key is in the past of the new queries, which are
causal among themselves (the last ``q_len`` tokens of every row). The mask is read once, at the
first prefill, to find left padding, which the cache drops after scoring. A cache with a
quantizer and no policy evicts nothing, so transformers' mask stays right and is applied; but
it too drops a left-padded batch's padding after the first prefill (each row then coded as it
alone would be, and read over its own codes like an evicted layer's rows).
After attending, the policy sees the step (``observe_prefill`` / ``observe_decode``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels, native
from .._backend import resolve_backend
from ..kernels.decode import MAX_QUERIES as DECODE_MAX_QUERIES
from ..kernels.decode import decode_attention_unchecked
from ..kernels.scores import softmax_attention
from .kvzip import replay_attention
from .quantized_rows import QuantizedRows


def attend_cache(cache, layer_idx: int, query, key, value, attention_mask, scaling, softcap, backend):
    """Attention of ``query (B, H, Sq, D)`` for layer ``layer_idx`` of ``cache``, whose ``update``
    returned ``key``/``value``; then let its policy evict. Returns ``(B, Sq, H, D)``."""
    layer = cache.layers[layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if cache.replaying:  # KVzip: score the cached tokens, store nothing
        if softcap is not None:
            raise NotImplementedError("effllm.kv: KVzip with attention softcapping is not supported yet")
        out, best = replay_attention(query, key, value, scale, layer.stored(), key_valid=cache.replay_valid,
                                     scored=cache.replay_scored)
        cache.observe_replay(layer_idx, best)
        return out
    if cache.policy is None:
        if layer.ragged is not None:  # a left-padded batch's rows, without their padding
            return _ragged_attention(layer, query, scale, softcap, backend, False)[0]
        if attention_mask is not None and softcap is not None:
            _refuse(cache, layer_idx, query, ValueError(
                "effllm attention: softcap together with an explicit attention mask is not supported yet"))
        out = _attend_unevicted(layer, query, key, value, attention_mask, scale, softcap, backend)
        if layer.seen == query.shape[2] > 1:  # a first prefill: key/value are its exact tokens
            padding = _padding_if_left(attention_mask)
            # rows are read over their codes, so only a store that attends over them
            # (reads_codes); and not while a row has no token yet (a prompt fed in chunks whose
            # padding runs into the next forward: the mask must stay in use)
            if padding is not None and layer.reads_codes and not bool(padding.all(dim=1).any()):
                layer.drop_padding(key, value, padding)
        return out
    if layer.ragged is not None:
        out, stats = _ragged_attention(layer, query, scale, softcap, backend, cache.policy.needs_decode_stats)
        cache.observe_decode(layer_idx, stats, queries=query.shape[2])
        return out
    q_len = query.shape[2]
    if q_len == 1:
        out, stats = _decode(layer, query, key, value, scale, softcap, backend, cache.policy.needs_decode_stats)
        cache.observe_decode(layer_idx, stats)
        return out
    try:
        padding = _left_padding(attention_mask) if layer.seen == q_len else None
    except (ValueError, NotImplementedError) as exc:
        _refuse(cache, layer_idx, query, exc)
    if padding is not None:
        if softcap is not None:
            _refuse(cache, layer_idx, query, NotImplementedError(
                "effllm.kv: softcap with a padded batch is not supported yet"))
        if bool(padding.all(dim=1).any()):
            # the policy budgets the first forward as the prompt; the rest of such a row's
            # padding would come in the next forward, unmasked, as its tokens
            rows = padding.all(dim=1).nonzero().flatten().tolist()
            _refuse(cache, layer_idx, query, ValueError(
                f"effllm.kv: batch row(s) {rows} of the first forward are all padding (a prompt fed in chunks "
                f"shorter than its padding?): with a policy, feed the left-padded prompt in one forward"))
        layer.padding = padding
        out = sdpa(query, key, value, attention_mask, scale)
    else:
        out = kernels.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=True,
                                scale=scale, softcap=softcap, backend=backend)
    try:
        cache.observe_prefill(layer_idx, query, scale)
    except ValueError as exc:  # a policy's check of this prompt (prepare): the first layer refuses
        _refuse(cache, layer_idx, query, exc)
    return out


def _refuse(cache, layer_idx: int, query: torch.Tensor, error: Exception):
    """Raise ``error``; on a first prefill, first undo what update() staged in this layer and the
    ones before it, so that the refused call leaves the cache as it found it."""
    layer = cache.layers[layer_idx]
    if layer.seen == query.shape[2]:
        cache.forget_first_prefill(layer_idx)
    raise error


def _decode(layer, query, key, value, scale, softcap, backend, need_stats):
    """One query per row over a uniform layer (the step's own key stored last):
    ``(out (B, 1, H, D), stats (B, H_kv, stored) or None)``."""
    if layer.reads_codes:
        # The quantizer's store attends over its codes; update returned only the new token.
        result = layer.store.attend(query, scale, softcap=softcap, return_mass=need_stats, backend=backend)
        return result if need_stats else (result, None)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if not need_stats:
        return kernels.decode_attention(q, k, v, key.shape[2], scale=scale, softcap=softcap, backend=backend), None
    out, stats = kernels.decode_attention(q, k, v, key.shape[2], scale=scale, softcap=softcap, return_stats=True,
                                          backend=backend)
    return out, stats[..., : layer.stored()]


def _attend_unevicted(layer, query, key, value, attention_mask, scale, softcap, backend):
    """A quantized layer without a policy: every token seen is stored, so transformers' mask
    (left padding) describes the keys as they are."""
    q_len = query.shape[2]
    if attention_mask is None and q_len == 1:
        return _decode(layer, query, key, value, scale, softcap, backend, False)[0]
    if layer.reads_codes and q_len == 1:
        key, value = layer.all_keys_values()  # a mask to apply: read the layer dequantized
    if attention_mask is not None:
        return sdpa(query, key, value, attention_mask, scale)
    return kernels.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=True,
                             scale=scale, softcap=softcap, backend=backend)


def sdpa(query, key, value, attention_mask, scale, *, dropout: float = 0.0, is_causal: bool = False):
    """transformers' explicit-mask attention, exactly as its sdpa path runs it: ``(B, Sq, H, D)``."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scale,
                                         is_causal=is_causal, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


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


def _padding_if_left(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``_left_padding``, or None where the mask is not one of left padding: a quantizer alone
    stores every token, so transformers' mask keeps describing any other padding correctly."""
    try:
        return _left_padding(attention_mask)
    except (ValueError, NotImplementedError):
        return None


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
    if isinstance(layer.ragged, QuantizedRows):  # each row's store attends over its own codes
        out, stats = layer.ragged.attend(q, scale, softcap=softcap, need_stats=need_stats, backend=backend)
    elif _native_rows(layer.ragged, q, backend):
        # CPU: one loop reads each row where it lies (pages in place): no padded copy, no
        # per-row calls, the mass in the same pass
        out, stats = native.rows_decode(q[:, 0].float().contiguous(), **layer.ragged.native_args(), scale=scale,
                                        softcap=softcap, need_mass=need_stats)
        out, stats = out[:, None].to(q.dtype), None if stats is None else stats[:, None]
    elif q_len <= DECODE_MAX_QUERIES:
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


def _native_rows(ragged, q, backend) -> bool:
    """One float32 query token a row on CPU, where the native loops build (``native``)."""
    return (q.shape[1] == 1 and ragged.k.dtype == torch.float32 and q.shape[-1] % 8 == 0
            and resolve_backend(backend, q, op="attend_rows") != "triton" and native.usable(q, ragged.k, rows=1))


def _ragged_attention_torch(layer, q, scale, softcap):
    """Explicit float32 attention for more queries than the decode kernel takes (a question
    appended after compression): rows padded to the longest, each query sees its row's past.
    ``q (R, Sq, G, D)`` -> ``(out (R, Sq, G, D), mass (R, 1, width))``."""
    keys, values = layer.ragged.padded()
    result = softmax_attention(q.transpose(1, 2), keys.unsqueeze(1), values.unsqueeze(1), scale=scale,
                               softcap=softcap, causal=True, key_lengths=layer.ragged.lengths, need_mass=True)
    return result.out.transpose(1, 2).to(q.dtype), result.mass
