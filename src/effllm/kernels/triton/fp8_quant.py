"""Per-token FP8 (e4m3) quantization of activations in one kernel.

``fp8_quantize_rows(x)`` gives what ``effllm.quant.formats.fp8_quantize_activations(x, "token")``
gives: ``scale = max(amax(|row|) / 448, 1e-12)`` and ``q = clamp(x / scale, +-448)`` in e4m3.
In torch that is five passes over x, with a float32 copy; here each row is read twice (its
absolute maximum, then the quantized write), the float32 values never leave registers.

``Fp8Linear`` uses it for per-token activations on CUDA. Its output is bit for bit torch's on
CPU (tested under the interpreter and on an H100). torch on CUDA can differ by one bit in a
scale: it divides by the scalar 448 as a multiply by the reciprocal. Its speed against the torch
ops is in docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_to_e4m3(q):
    """Round float32 ``q`` (|q| <= 448) to the nearest e4m3 value, ties to even, in float32:
    the cast that follows is then exact, on a GPU and under the interpreter alike (whose own
    fp32 -> fp8 cast gets values just below a power of two wrong by a factor of 2)."""
    bits = q.to(tl.int32, bitcast=True)
    # normal range: keep 3 mantissa bits, round half to even (a carry moves into the exponent)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = bits.to(tl.float32, bitcast=True)
    # subnormal range (|q| < 2^-6): multiples of 2^-9; adding 1.5 * 2^23 rounds to an integer;
    # the sign goes back on as a bit, so that -0.0 stays -0.0 as in torch's cast
    sub = ((tl.abs(q) * 512.0 + 12582912.0) - 12582912.0) / 512.0
    sub = (sub.to(tl.int32, bitcast=True) | (bits & -0x80000000)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(q) < 0.015625, sub, normal)


@triton.jit
def _fp8_rows_kernel(X, Q, S, K, stride_xm, stride_xk, stride_qm, stride_qk, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + row * stride_xm + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    # div_rn: a plain '/' compiles to an approximate division on GPUs (1 ulp off torch's scales)
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 448.0), 1e-12)
    tl.store(S + row, scale)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + row * stride_xm + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0)
        # e4m3 casts do not saturate: clamp first (a rounded division, not a reciprocal, as torch does)
        q = _round_to_e4m3(tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -448.0, 448.0))
        tl.store(Q + row * stride_qm + (k0 + offs) * stride_qk, q.to(Q.dtype.element_ty), mask=k0 + offs < K)


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, K)`` float16/bfloat16/float32 -> ``(q float8_e4m3fn (M, K), scales float32 (M, 1))``."""
    if x.dim() != 2:
        raise ValueError(f"fp8_quantize_rows: x must be (M, K), got shape {tuple(x.shape)}")
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(max(k, 1)), 2048)
        _fp8_rows_kernel[(m,)](x, q, scales, k, *x.stride(), *q.stride(), BLOCK_K=block)
    return q, scales
