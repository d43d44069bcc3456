"""``effllm.kernels.attention``: prefill / full-sequence attention on ``(B, S, H, D)`` tensors.

The public function: it checks the input, resolves the backend once, and runs the one
implementation (``_attention_impl``) directly when eager or through the ``effllm::attention``
custom op (``ops.py``) under ``torch.compile``. The paths themselves (Triton kernels, SDPA, the
explicit float32 softmax of ``scores.py``) are described in ``_attention_impl``.
"""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from . import ops
from ._attention_impl import attention_impl, attention_varlen_impl
from ._checks import check_attention_inputs, check_positive_scalar
from ._masks import normalize_window
from ._varlen import check_cu_seqlens, check_packed_qkv, checked_maxima


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
        return _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                 scale=scale, window=window, softcap=softcap, return_lse=return_lse, backend=backend)
    check_attention_inputs(q, k, v)
    check_positive_scalar("attention", "softcap", softcap)
    check_positive_scalar("attention", "scale", scale)
    window = normalize_window(window, causal)
    chosen = resolve_backend(backend, q, k, v, op="attention")  # the one backend check, eager or compiled
    if torch.compiler.is_compiling():
        left, right = window if window is not None else (-1, -1)
        out, lse = ops.attention_op(q, k, v, causal, scale, left, right, softcap, chosen)
    else:
        out, lse = attention_impl(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                                  backend=chosen, return_lse=return_lse)
    return (out, lse) if return_lse else out


def _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, scale, window,
                      softcap, return_lse, backend):
    check_packed_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k)
    check_positive_scalar("attention", "softcap", softcap)
    check_positive_scalar("attention", "scale", scale)
    window = normalize_window(window, causal)
    check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        max_seqlen_q, max_seqlen_k = checked_maxima(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    elif max_seqlen_q is None or max_seqlen_k is None:  # cu_seqlens cannot be read while tracing
        raise ValueError("attention: pass max_seqlen_q and max_seqlen_k with varlen input under torch.compile")
    chosen = resolve_backend(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, op="attention")
    if compiling:
        left, right = window if window is not None else (-1, -1)
        out, lse = ops.attention_varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                           scale, left, right, softcap, chosen)
    else:
        out, lse = attention_varlen_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         causal=causal, scale=scale, window=window, softcap=softcap, backend=chosen)
    return (out, lse) if return_lse else out
