"""W4A16 GEMM: ``y = x @ dequant(qweight).T`` with dequantisation fused into the K loop.

Weights are effllm's INT4 layout (``effllm/quant/formats.py``): uint8 ``(N, K/2)``, k = 2j in
the low nibble of byte j; ``w = (q - 8) * scale + zero`` with scales/zeros ``(N, K/G)``.

Chosen by M (no autotuning at call time):

- M < ``DEQUANT_MIN_ROWS`` (decode, small batches): the fused kernel, with split-K over a third
  grid axis so that even one row of activations keeps every SM busy; partial sums are added
  atomically into a float32 buffer.
- larger M on a GPU: the weight is dequantised once into a transient ``(N, K)`` buffer and the
  product goes to ``F.linear``, whose GEMM the fused tiles do not match there.

BLOCK_K divides the group size, so each K tile lies in one group: the dots take the raw 4-bit
codes and the group's scale and zero are applied to the (M, N) partial product, not to every
weight. Each K tile reads its bytes once, as one contiguous (BLOCK_N, BLOCK_K/2) load, and the
activations are split into their even and odd columns to meet the low and high nibbles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..._backend import interpreting
from ._common import dot_dtype, input_precision, output_buffer_dtype, parallel_units


@triton.jit
def _w4a16_kernel(
    X, QW, S, Z, Y,
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_ym, stride_yn,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        # One contiguous (BLOCK_N, BLOCK_K/2) byte tile: low nibbles hold the even k, high the odd.
        offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(QW + offs_n[:, None] * stride_qn + offs_j[None, :] * stride_qk, mask=n_ok[:, None], other=0)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=m_ok[:, None], other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
        # The dots take the raw codes 0..15 (exact in every dot dtype); the tile lies in one group,
        # so w = (q - 8) * s + z becomes s * (x . q) + (z - 8 s) * sum(x) on the (M, N) result,
        # instead of dequantising all BLOCK_N x BLOCK_K weights.
        part = tl.dot(x_even.to(DOT_DT), tl.trans((packed & 0xF).to(DOT_DT)), input_precision=PRECISION)
        part = tl.dot(x_odd.to(DOT_DT), tl.trans((packed >> 4).to(DOT_DT)), part, input_precision=PRECISION)
        x_sum = tl.sum(x.to(tl.float32), axis=1)
        group = k0 // GROUP
        scale = tl.load(S + offs_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.load(Z + offs_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
        acc += part * scale[None, :] + x_sum[:, None] * (zero - 8.0 * scale)[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


@triton.jit
def _w4_dequantize_kernel(QW, S, Z, W, N, K, stride_qn, stride_qk, stride_sn, stride_sg, stride_wn, stride_wk,
                          GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One (BLOCK_N, BLOCK_K) tile of w = (q - 8) * s + z, written in W's dtype (float32 under
    # the interpreter, where bf16 arithmetic is not emulated).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    n_ok = offs_n < N
    packed = tl.load(QW + offs_n[:, None] * stride_qn + offs_j[None, :] * stride_qk, mask=n_ok[:, None], other=0)
    q = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))  # k = 2j, 2j + 1
    group = tl.program_id(1) * BLOCK_K // GROUP
    scale = tl.load(S + offs_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
    zero = tl.load(Z + offs_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
    w = q.to(tl.float32) * scale[:, None] + (zero - 8.0 * scale)[:, None]
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(W + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, w.to(W.dtype.element_ty),
             mask=n_ok[:, None])


def w4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The whole weight ``(N, K)`` in ``dtype``, dequantised on the device."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    block_k = min(128, group_size)
    w = torch.empty(n, k, dtype=output_buffer_dtype(dtype), device=qweight.device)
    grid = (triton.cdiv(n, 32), k // block_k)
    _w4_dequantize_kernel[grid](qweight, scales, zeros, w, n, k, *qweight.stride(), *scales.stride(), *w.stride(),
                                GROUP=group_size, BLOCK_N=32, BLOCK_K=block_k)
    return w.to(dtype)


def launch_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> dict:
    """Tile sizes and split-K for one fused call.

    On a GPU, chosen from an H100 sweep (bf16, group 128, Llama shapes; the figures are in
    docs/benchmarks.md):

    - M <= 16: split-K 8 with 16x64x128 tiles and 3 stages, or 16x128x128 and 4 stages where
      N >= 8192 (the wider tile wins on wide weights, the narrower one on N <= 4096).
    - 16 < M: 32x128x128, split-K 4, 8 warps (the best measured at M=32); the fused path is
      only the default below ``DEQUANT_MIN_ROWS``. Where 128x128 tiles alone fill the GPU
      (large M, when asked for ``method="fused"``), those with 8 warps.

    Under the interpreter: small tiles, and split-K from a nominal unit count so that tests
    cover the atomic split path.
    """
    if interpreting():
        block_m, block_n, block_k = 16, 32, 32
        split_k = 1
        if m <= 16:
            tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
            split_k = max(1, min(triton.cdiv(2 * parallel_units(device), tiles), k // block_k, 16))
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4)
    block_k = min(128, group_size)
    if m <= 16:
        wide = n >= 8192
        return dict(BLOCK_M=16, BLOCK_N=128 if wide else 64, BLOCK_K=block_k, SPLIT_K=max(1, min(8, k // block_k)),
                    num_warps=4, num_stages=4 if wide else 3)
    if triton.cdiv(m, 128) * triton.cdiv(n, 128) >= parallel_units(device):
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, SPLIT_K=1, num_warps=8, num_stages=4)
    return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=block_k, SPLIT_K=max(1, min(4, k // block_k)), num_warps=8,
                num_stages=3)


# From this many rows on, a GPU dequantises the weight once and hands the product to the bf16
# GEMM (cuBLAS): on the H100 the fused kernel's best tiles lose to that at M=64 (by 6-25% at
# all three swept shapes) and win at M=32 (2 of 3).
DEQUANT_MIN_ROWS = 64


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, split_k: int | None = None, method: str | None = None) -> torch.Tensor:
    """``x (M, K)`` float16/bfloat16/float32 -> ``(M, N)`` in x's dtype.

    ``method``: ``"fused"`` (dequantise inside the GEMM's K loop) or ``"dequant"`` (dequantise
    the whole weight, then ``F.linear``); None picks dequant on a GPU from ``DEQUANT_MIN_ROWS``
    rows on, where the transient weight costs ``N * K`` elements of x's dtype.
    """
    m, k = x.shape
    n = qweight.shape[0]
    if k % group_size:
        raise ValueError(f"w4a16_matmul: in_features {k} must be a multiple of group_size {group_size}")
    if qweight.shape[1] * 2 != k or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"w4a16_matmul: expected qweight ({n}, {k // 2}) and scales/zeros ({n}, {k // group_size}) "
                         f"for x {tuple(x.shape)}, got {tuple(qweight.shape)}, {tuple(scales.shape)}, "
                         f"{tuple(zeros.shape)}")
    if method is None:
        method = "dequant" if m >= DEQUANT_MIN_ROWS and not interpreting() else "fused"
    if method == "dequant":
        return F.linear(x, w4_dequantize(qweight, scales, zeros, group_size, x.dtype))
    if method != "fused":
        raise ValueError(f"w4a16_matmul: method must be 'fused', 'dequant' or None, got {method!r}")
    config = launch_config(m, n, k, group_size, x.device)
    if split_k is not None:
        config["SPLIT_K"] = split_k
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
    atomic = config["SPLIT_K"] > 1
    buffer_dtype = torch.float32 if atomic else output_buffer_dtype(x.dtype)
    y = (torch.zeros if atomic else torch.empty)(m, n, dtype=buffer_dtype, device=x.device)
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, y, m, n, k,
        *x.stride(), *qweight.stride(), *scales.stride(), *y.stride(),
        GROUP=group_size, DOT_DT=dot_dtype(x.dtype), PRECISION=input_precision(x.dtype), **config,
    )
    return y.to(x.dtype)
