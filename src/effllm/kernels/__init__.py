"""Attention and small fused ops: Triton kernels, their launchers and the torch path.

Layout is ``(batch, seqlen, heads, head_dim)`` as in flash-attn; GQA uses fewer KV heads.
``decode_attention`` takes a ``DecodePlan`` from ``plan_decode`` to check and plan a decode step
once for all its layers. The package is a stack (checks -> Triton launchers and the explicit
softmax of ``scores`` -> one implementation per op -> ``ops`` -> public functions); see
docs/architecture.md.
"""

from .attention import attention
from .decode import DecodePlan, decode_attention, plan_decode
from .norm import rms_norm
from .reference import attention_reference, decode_reference, rms_norm_reference

__all__ = [
    "DecodePlan",
    "attention",
    "attention_reference",
    "decode_attention",
    "decode_reference",
    "plan_decode",
    "rms_norm",
    "rms_norm_reference",
]
