"""``torch.library`` custom ops around the attention paths, so ``torch.compile(fullgraph=True)``
traces through effllm attention instead of graph-breaking on a Triton launch.

- ``effllm::attention`` always returns ``(out, lse)``, lse float32 ``(B, H, Sq)``: one schema,
  and the LSE is what the backward needs anyway.
- Its fake implementation gives shapes and dtypes without running anything.
- Autograd: the backward recomputes the forward with the differentiable torch path and takes
  its vector-Jacobian product. The Triton backward kernel will replace it.

Eager calls of ``effllm.kernels.attention`` skip the op wrapper (it costs a few microseconds per
call, which matters for decode); under ``torch.compile`` they go through it.
"""

from __future__ import annotations

import torch

_WINDOW_NONE = (-1, -1)


def _window(left: int, right: int):
    return None if (left, right) == _WINDOW_NONE else (left, right)


@torch.library.custom_op("effllm::attention", mutates_args=())
def attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
    window_left: int, window_right: int, softcap: float | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .attention import _run

    out, lse = _run(q, k, v, causal=causal, scale=scale, window=_window(window_left, window_right),
                    softcap=softcap, return_lse=True, backend=backend)
    return out.contiguous(), lse.contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, causal, scale, window_left, window_right, softcap, backend):
    batch, seq_q, heads, _ = q.shape
    out = q.new_empty(batch, seq_q, heads, v.shape[-1])
    lse = q.new_empty(batch, heads, seq_q, dtype=torch.float32)
    return out, lse


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, window_left, window_right, softcap, _ = inputs
    ctx.save_for_backward(q, k, v)
    ctx.options = dict(causal=causal, scale=scale, window=_window(window_left, window_right), softcap=softcap)


def _backward(ctx, grad_out, grad_lse):
    from .attention import _attention_torch

    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out, lse = _attention_torch(*leaves, return_lse=True, **ctx.options)
        # Rows with no visible key have lse = -inf and no gradient.
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse), allow_unused=True)
    return (*grads, None, None, None, None, None, None)


attention_op.register_autograd(_backward, setup_context=_setup_context)
