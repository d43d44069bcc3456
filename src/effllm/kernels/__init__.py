"""Attention and small fused ops: Triton kernels, their launchers and the torch path.

Layout is ``(batch, seqlen, heads, head_dim)`` as in flash-attn; GQA uses fewer KV heads.
"""

from .attention import attention
from .decode import decode_attention
from .norm import rms_norm
from .reference import attention_reference, decode_reference, rms_norm_reference

__all__ = ["attention", "decode_attention", "rms_norm", "attention_reference", "decode_reference", "rms_norm_reference"]
