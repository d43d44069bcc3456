"""The one tolerance table of effllm.

Attention-like ops follow flash-attn's rule: a kernel's max error against a float32 reference
may be at most ``ATTENTION_ERROR_RATIO`` times the error of the same computation done in torch
at the kernel's dtype. ``ABS_FLOOR`` keeps the rule meaningful when torch's own error is ~0
(fp32): it is a few ulps of the dtype at unit scale, never a fudge factor for a failing test.

Quantized GEMMs are judged by SQNR (dB) against the float32 product, with one floor per format.
"""

from __future__ import annotations

import torch

ATTENTION_ERROR_RATIO = 2.0

ABS_FLOOR: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
    torch.float64: 1e-10,
}

# Signal-to-quantisation-noise floors (dB) of a quantized linear's output vs the float32 product,
# on Gaussian weights and activations.
SQNR_FLOOR_DB: dict[str, float] = {
    "int8_weight_only": 38.0,
    "fp8_e4m3_row": 28.0,
    "fp8_e4m3_block": 28.0,
    "fp8_e4m3_tensor": 25.0,
    "int4_g32": 19.0,
    "int4_g64": 18.0,
    "int4_g128": 17.0,
}


def abs_floor(dtype: torch.dtype) -> float:
    try:
        return ABS_FLOOR[dtype]
    except KeyError:
        raise ValueError(f"no tolerance floor for dtype {dtype}; known: {sorted(map(str, ABS_FLOOR))}") from None
