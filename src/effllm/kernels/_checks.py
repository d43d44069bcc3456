"""Input checks shared by the kernel entry points: one wording for every op's errors."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def check_float_tensors(op: str, tensors: dict[str, torch.Tensor], *, ndim: int, layout: str = "") -> None:
    """Each tensor is a float16/bfloat16/float32 ``ndim``-D tensor; all share dtype and device."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{op}: {name} must be {ndim}-D{' ' + layout if layout else ''}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.shape[-1] == 0:
            raise ValueError(f"{op}: {name}'s last dimension (head_dim) must be >= 1, got shape {tuple(t.shape)}")
    names, values = ", ".join(tensors), list(tensors.values())
    if len({t.dtype for t in values}) > 1:
        raise ValueError(f"{op}: {names} must share one dtype, got {', '.join(str(t.dtype) for t in values)}")
    if len({t.device for t in values}) > 1:
        raise ValueError(f"{op}: {names} must be on one device, got {', '.join(str(t.device) for t in values)}")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``attention``'s padded layout: ``q (B, Sq, H, D)``, ``k, v (B, Sk, H_kv, D)``, H_kv | H."""
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


def check_positive_scalar(op: str, name: str, value) -> None:
    """``value`` must be None or a finite number > 0 (not a bool): ``inf`` softcaps and ``nan``
    scales would otherwise pass a ``> 0`` test or turn every output into NaN."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{op}: {name} must be a finite positive number or None, got {value!r}")


def can_sync(q: torch.Tensor) -> bool:
    """Whether reading a tensor value on the host is possible here (not while torch.compile traces
    or a CUDA graph captures)."""
    if torch.compiler.is_compiling():
        return False
    return not (q.is_cuda and torch.cuda.is_current_stream_capturing())


def nan_query_rows(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` with the rows of queries that hold NaN set to NaN, the convention of every attention
    path (SDPA's CPU kernels return zeros there). One scalar sum read on the host decides whether
    any row needs it, so the common case costs one reduction (a mask on every call costs several
    times more). Skipped where the host cannot read values."""
    if not can_sync(q) or not math.isnan(q.sum().item()):
        return out
    return out.masked_fill(q.isnan().any(-1, keepdim=True), float("nan"))
