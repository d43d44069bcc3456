"""Shared launcher helpers: dtype policy under the interpreter, block sizes."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._backend import interpreting

TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """Operand dtype for ``tl.dot``: the input's, except bf16 under the interpreter.

    The interpreter stores bf16 as raw uint16 bits and multiplies them as integers, so bf16
    operands are upcast to float32 there (loads and stores of bf16 are fine).
    """
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return TORCH_TO_TL[dtype]


def output_buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of a kernel's output buffer: float32 for bf16 under the interpreter, whose
    fp32 -> bf16 cast truncates instead of rounding; the launcher then casts in torch."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def input_precision(dtype: torch.dtype) -> str:
    # Only fp32 operands read this: keep full precision (no TF32) so fp32 results match the
    # reference. fp16/bf16 operands are exact products whatever it says.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def sequence_bounds(CU_Q, CU_K, b, seq_q, seq_k, VARLEN: tl.constexpr):
    """``(q_start, k_start, seq_q, seq_k)`` of sequence b: read from ``cu_seqlens`` for packed
    varlen input, else the padded batch's own (starts 0, lengths shared by all sequences)."""
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seq_q = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
        seq_k = (tl.load(CU_K + b + 1) - k_start).to(tl.int32)
    else:
        q_start = (b * 0).to(tl.int64)
        k_start = (b * 0).to(tl.int64)
    return q_start, k_start, seq_q, seq_k


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def parallel_units(device: torch.device) -> int:
    """Programs that run at once: the SM count on CUDA, a nominal 4 for the interpreter (split
    heuristics then still produce several splits, so tests cover the merge paths)."""
    return _sm_count(device.index or 0) if device.type == "cuda" else 4
