"""``effllm.kernels.attention``: prefill / full-sequence attention on ``(B, S, H, D)`` tensors.

The torch path (CPU and fallback) uses ``scaled_dot_product_attention`` whenever it can express
the request (causal top-left == bottom-right when Sq == Sk, GQA via ``enable_gqa``) and an
explicit, query-chunked softmax when it cannot (logit softcap, LSE output). The Triton path is
a FlashAttention-2-style forward kernel (``triton/attention_fwd.py``) with a Triton backward
(``triton/attention_bwd.py``) behind ``torch.autograd.Function``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._backend import resolve_backend
from ._checks import check_float_tensors, check_positive_scalar, nan_query_rows
from ._masks import attention_keep_mask, has_rows_without_keys, normalize_window

# The explicit path materialises (B, H, chunk, Sk) scores; this bounds that to ~64 MiB in fp32.
_EXPLICIT_SCORE_ELEMS = 16 * 1024 * 1024


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_float_tensors("attention", {"q": q, "k": k, "v": v}, ndim=4, layout="(batch, seqlen, heads, head_dim)")
    batch, _, heads, dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"attention: batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"attention: k and v must have the same (seqlen, kv_heads), got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if k.shape[3] != dim or v.shape[3] != dim:
        raise ValueError(
            f"attention: k and v head_dim must equal q head_dim {dim}, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    kv_heads = k.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"attention: kv heads ({kv_heads}) must divide query heads ({heads}); expected k of shape "
            f"(batch, seqlen_k, H_kv, {dim}) with {heads} % H_kv == 0"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | tuple[int, int] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over ``q (B, Sq, H, D)``, ``k, v (B, Sk, H_kv, D)``, or over packed
    variable-length sequences.

    - ``causal``: bottom-right aligned (query i sees keys up to ``i + Sk - Sq``), as in flash-attn.
    - GQA/MQA: ``H_kv`` divides ``H``; query head h reads kv head ``h // (H // H_kv)``.
    - ``window``: ``(left, right)`` keys around each query's position (-1 = unbounded); an int
      ``w`` means ``(w, 0)`` when causal and ``(w, w)`` otherwise.
    - ``softcap``: logits become ``softcap * tanh(logits / softcap)``.
    - ``return_lse``: also return the natural-log LSE, float32 ``(B, H, Sq)``.
    - Varlen: ``q (total_q, H, D)``, ``k, v (total_k, H_kv, D)`` with int32/int64
      ``cu_seqlens_q/k`` of shape ``(num_seqs + 1,)`` (0, then cumulative lengths); sequence i is
      ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` against its own keys, with every option applied
      per sequence. ``max_seqlen_*`` (computed when None) size the Triton grid. The LSE is then
      ``(H, total_q)``.

    Returns ``out`` shaped like q in q's dtype (and ``lse`` when asked). Rows that see no key
    give zeros (LSE -inf).
    """
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        from ._varlen import attention_varlen

        return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                scale=scale, window=window, softcap=softcap, return_lse=return_lse, backend=backend)
    _validate(q, k, v)
    check_positive_scalar("attention", "softcap", softcap)
    check_positive_scalar("attention", "scale", scale)
    window = normalize_window(window, causal)
    if torch.compiler.is_compiling():
        from .ops import attention_op

        # The op's body only runs after tracing: check the backend now, with the reason.
        resolve_backend(backend, q, k, v, op="attention")

        left, right = window if window is not None else (-1, -1)
        out, lse = attention_op(q, k, v, causal, scale, left, right, softcap, backend)
        return (out, lse) if return_lse else out
    return _run(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, return_lse=return_lse,
                backend=backend)


def _run(q, k, v, *, causal, scale, window, softcap, return_lse, backend):
    """Dispatch validated inputs to the Triton kernel or the torch path."""
    chosen = resolve_backend(backend, q, k, v, op="attention")
    if chosen == "triton":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            out, lse = _TritonAttention.apply(q, k, v, dict(causal=causal, scale=scale, window=window,
                                                             softcap=softcap))
        else:
            from .triton.attention_fwd import attention_fwd

            out, lse = attention_fwd(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                                     return_lse=return_lse)
        return (out, lse) if return_lse else out
    return _attention_torch(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, return_lse=return_lse)


def _attention_torch(q, k, v, *, causal, scale, window, softcap, return_lse):
    seq_q, seq_k, dim = q.shape[1], k.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    # SDPA gives NaN for rows that see no key; those (rare) cases go through the explicit path.
    empty_rows = has_rows_without_keys(seq_q, seq_k, causal=causal, window=window)
    if softcap is None and not return_lse and not empty_rows:
        return nan_query_rows(q, _sdpa(q, k, v, causal=causal, window=window, scale=scale))
    keep = attention_keep_mask(seq_q, seq_k, causal=causal, window=window, device=q.device)
    out, lse = _explicit(q, k, v, keep=keep, scale=scale, softcap=softcap)
    out = nan_query_rows(q, out)
    return (out, lse) if return_lse else out



def _sdpa(q, k, v, *, causal, window, scale):
    seq_q, seq_k = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if window is None and (not causal or seq_q == 1):
        # One query at the end of the keys sees all of them, causal or not.
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=gqa)
    elif window is None and seq_q == seq_k:
        # Top-left and bottom-right alignment agree here: let SDPA pick its flash kernel.
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        keep = attention_keep_mask(seq_q, seq_k, causal=causal, window=window, device=q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def _explicit(q, k, v, *, keep, scale, softcap):
    """Chunked explicit softmax in float32: softcap, LSE and rows with no visible key."""
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # Queries of one KV group are stacked so K/V are read once per KV head, never repeated.
    qg = q.float().view(batch, seq_q, kv_heads, group, dim).permute(0, 2, 3, 1, 4)  # B, Hkv, G, Sq, D
    kf = k.float().permute(0, 2, 1, 3).unsqueeze(2)  # B, Hkv, 1, Sk, D
    vf = v.float().permute(0, 2, 1, 3).unsqueeze(2)
    out = torch.empty(batch, kv_heads, group, seq_q, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, kv_heads, group, seq_q, dtype=torch.float32, device=q.device)
    chunk = max(1, _EXPLICIT_SCORE_ELEMS // max(1, batch * heads * seq_k))
    for start in range(0, seq_q, chunk):
        stop = min(seq_q, start + chunk)
        scores = (qg[:, :, :, start:stop] @ kf.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if keep is not None:
            scores = scores.masked_fill(~keep[start:stop], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        finite = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        probs = torch.exp(scores - finite.unsqueeze(-1))
        out[:, :, :, start:stop] = probs @ vf
        lse[:, :, :, start:stop] = row_lse
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, seq_q, heads, v.shape[-1]).to(q.dtype)
    return out, lse.reshape(batch, heads, seq_q)


class _TritonAttention(torch.autograd.Function):
    """Triton forward (always with LSE, which the backward needs) and Triton backward.

    ``options`` are the keyword arguments of both launchers (including the varlen ones).
    """

    @staticmethod
    def forward(ctx, q, k, v, options):
        from .triton.attention_fwd import attention_fwd

        fwd_options = {key: val for key, val in options.items() if key != "max_seqlen_k"}
        out, lse = attention_fwd(q, k, v, return_lse=True, **fwd_options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = options
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from .triton.attention_bwd import attention_bwd

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(dout, dlse, q, k, v, out, lse, **ctx.options)
        return dq, dk, dv, None
