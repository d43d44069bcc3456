"""The one implementation of ``attention`` and of its packed variable-length form.

Inputs arrive validated and with a resolved backend (``"triton"`` or ``"torch"``); both the eager
public function (``attention.py``) and the ``torch.library`` op bodies (``ops.py``) call the
functions here, so an eager call and a compiled one run the same code.

- Triton: the FlashAttention-2-style forward (``triton/attention_fwd.py``); when an input needs
  a gradient, forward and backward (``triton/attention_bwd.py``) behind ``TritonAttention``.
- torch: ``scaled_dot_product_attention`` whenever it can express the request (causal top-left
  == bottom-right when ``Sq == Sk``; GQA via ``enable_gqa``), else the explicit float32 softmax
  of ``scores.py`` (logit softcap, LSE output, rows that see no key). Varlen runs the padded
  path once per sequence (each call vectorised over heads and tokens; sequences are few
  compared with tokens).

Triton modules are imported inside the functions that launch them: ``triton`` is only imported
once a Triton backend has been chosen.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ._checks import nan_query_rows
from ._masks import attention_keep_mask, has_rows_without_keys
from .scores import softmax_attention


def attention_impl(q, k, v, *, causal, scale, window, softcap, backend, return_lse):
    """``(out, lse or None)`` of validated ``(B, S, H, D)`` inputs on ``backend`` ("triton"/"torch")."""
    if backend == "triton":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            out, lse = TritonAttention.apply(q, k, v, {"causal": causal, "scale": scale, "window": window, "softcap": softcap})
        else:
            from .triton.attention_fwd import attention_fwd

            out, lse = attention_fwd(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                                     return_lse=return_lse)
        return out, (lse if return_lse else None)
    return attention_torch(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                           return_lse=return_lse)


def attention_varlen_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, scale, window,
                          softcap, backend):
    """``(out, lse (H, total_q))`` of validated packed ``(total, H, D)`` inputs on ``backend``."""
    options = {"causal": causal, "scale": scale, "window": window, "softcap": softcap}
    if backend == "triton":
        options |= {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k, "max_seqlen_q": max_seqlen_q,
                        "max_seqlen_k": max_seqlen_k}
        return TritonAttention.apply(q, k, v, options)
    outs, lses = [], []
    spans_q, spans_k = _spans(cu_seqlens_q.tolist()), _spans(cu_seqlens_k.tolist())
    for (q0, q1), (k0, k1) in zip(spans_q, spans_k):
        out, lse = attention_torch(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], return_lse=True, **options)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, dim=1) if lses else q.new_full((q.shape[1], 0), float("-inf"), dtype=torch.float32)
    return out, lse


def _spans(offsets):
    """(start, end) of each sequence from cu_seqlens values."""
    return list(itertools.pairwise(offsets))


def attention_torch(q, k, v, *, causal, scale, window, softcap, return_lse):
    """The torch path: ``(out, lse or None)``; differentiable (the ops' torch backward recomputes it)."""
    seq_q, seq_k, dim = q.shape[1], k.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    # SDPA gives NaN for rows that see no key; those (rare) cases go through the explicit path.
    empty_rows = has_rows_without_keys(seq_q, seq_k, causal=causal, window=window)
    if softcap is None and not return_lse and not empty_rows:
        return nan_query_rows(q, _sdpa(q, k, v, causal=causal, window=window, scale=scale)), None
    batch, _, heads, _ = q.shape
    out = torch.empty(batch, seq_q, heads, v.shape[-1], dtype=torch.float32, device=q.device)
    result = softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, softcap=softcap,
                               causal=causal, window=window, need_lse=return_lse, out=out.transpose(1, 2))
    return nan_query_rows(q, out.to(q.dtype)), result.lse


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


class TritonAttention(torch.autograd.Function):
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
