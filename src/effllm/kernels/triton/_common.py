"""Shared launcher helpers: dtype policy under the interpreter, block sizes."""

from __future__ import annotations

import torch
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


def input_precision(dtype: torch.dtype) -> str:
    # Only fp32 operands read this: keep full precision (no TF32) so fp32 results match the
    # reference. fp16/bf16 operands are exact products whatever it says.
    return "ieee" if dtype == torch.float32 else "tf32"
