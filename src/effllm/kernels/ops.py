"""``torch.library`` custom ops around the attention and decode implementations, so
``torch.compile(fullgraph=True)`` traces through effllm attention instead of graph-breaking on a
Triton launch.

- ``effllm::attention`` always returns ``(out, lse)``, lse float32 ``(B, H, Sq)``: one schema,
  and the LSE is what the backward needs anyway.
- Fake implementations give shapes and dtypes without running anything.
- ``effllm::decode_attention`` always returns ``(out, lse, stats)``; stats is empty unless
  ``with_stats``. It is inference-only (no autograd); its body plans the step and runs it.
- Autograd of ``effllm::attention``: the Triton backward kernels when the op ran on Triton;
  otherwise the torch path's forward is recomputed and differentiated.

The bodies call the same implementations (``_attention_impl``, ``_decode_impl``) as eager calls
of the public functions, which skip the op wrapper (it costs a few microseconds per call, which
matters for decode) and go through it only under ``torch.compile``.
"""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from . import _decode_impl
from ._attention_impl import attention_impl, attention_torch, attention_varlen_impl

_WINDOW_NONE = (-1, -1)


def _window(left: int, right: int):
    return None if (left, right) == _WINDOW_NONE else (left, right)


@torch.library.custom_op("effllm::attention", mutates_args=())
def attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
    window_left: int, window_right: int, softcap: float | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = attention_impl(q, k, v, causal=causal, scale=scale, window=_window(window_left, window_right),
                              softcap=softcap, backend=resolve_backend(backend, q, k, v, op="attention"),
                              return_lse=True)
    return out.contiguous(), lse.contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, causal, scale, window_left, window_right, softcap, backend):
    batch, seq_q, heads, _ = q.shape
    out = q.new_empty(batch, seq_q, heads, v.shape[-1])
    lse = q.new_empty(batch, heads, seq_q, dtype=torch.float32)
    return out, lse


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, window_left, window_right, softcap, backend = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.backend = backend
    ctx.options = {"causal": causal, "scale": scale, "window": _window(window_left, window_right), "softcap": softcap}


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if resolve_backend(ctx.backend, q, k, v, op="attention") == "triton":
        from .triton.attention_bwd import attention_bwd

        return (*attention_bwd(grad_out, grad_lse, q, k, v, out, lse, **ctx.options), *[None] * 6)
    # The torch path: recompute the forward differentiably and take its vector-Jacobian product.
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out, lse = attention_torch(*leaves, return_lse=True, **ctx.options)
        # Rows with no visible key have lse = -inf and no gradient.
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse), allow_unused=True)
    return (*grads, *[None] * 6)


attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("effllm::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None, scale: float | None, window_left: int, softcap: float | None,
    num_splits: int | None, with_stats: bool, backend: str, with_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = resolve_backend(backend, q, k_cache, v_cache, cache_seqlens, block_table, op="decode_attention")
    plan = _decode_impl.make_plan(cache_seqlens, block_table, num_queries=q.shape[1],
                                  window=None if window_left < 0 else (window_left, 0), slots=k_cache.shape[1],
                                  backend=chosen)
    out, lse, stats = _decode_impl.run(q, k_cache, v_cache, plan, scale=scale, softcap=softcap, num_splits=num_splits,
                                       need_lse=with_lse, need_stats=with_stats)
    # Outputs not asked for are empty tensors (an op returns a fixed tuple).
    if stats is None:
        stats = q.new_empty(0, dtype=torch.float32)
    lse = lse.contiguous() if with_lse else q.new_empty(0, dtype=torch.float32)
    return out.contiguous(), lse, stats


@decode_attention_op.register_fake
def _decode_attention_fake(q, k_cache, v_cache, cache_seqlens, block_table, scale, window_left, softcap,
                           num_splits, with_stats, backend, with_lse):
    batch, seq_q, heads, _ = q.shape
    kv_heads = k_cache.shape[2]
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    out = torch.empty_like(q)
    lse = q.new_empty(batch, heads, seq_q, dtype=torch.float32) if with_lse else q.new_empty(0, dtype=torch.float32)
    stats = q.new_empty(batch, kv_heads, capacity, dtype=torch.float32) if with_stats else q.new_empty(0, dtype=torch.float32)
    return out, lse, stats


@torch.library.custom_op("effllm::attention_varlen", mutates_args=())
def attention_varlen_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float | None, window_left: int, window_right: int,
    softcap: float | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = resolve_backend(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, op="attention")
    out, lse = attention_varlen_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                     scale=scale, window=_window(window_left, window_right), softcap=softcap,
                                     backend=chosen)
    return out.contiguous(), lse.contiguous()


@attention_varlen_op.register_fake
def _attention_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                           window_left, window_right, softcap, backend):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_left, window_right, softcap, backend = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, *output)
    ctx.backend = backend
    ctx.options = {"causal": causal, "scale": scale, "window": _window(window_left, window_right), "softcap": softcap}
    ctx.maxima = (max_q, max_k)


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
    max_q, max_k = ctx.maxima
    if resolve_backend(ctx.backend, q, k, v, op="attention") == "triton":
        from .triton.attention_bwd import attention_bwd

        grads = attention_bwd(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              max_seqlen_q=max_q, max_seqlen_k=max_k, **ctx.options)
    else:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out, lse = attention_varlen_impl(*leaves, cu_q, cu_k, max_q, max_k, backend="torch", **ctx.options)
            lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
            grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse), allow_unused=True)
    return (*grads, *[None] * 10)


attention_varlen_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)
