"""W4A16 GEMM: ``y = x @ dequant(qweight).T`` with dequantisation fused into the K loop.

Weights are effllm's INT4 layout (``effllm/quant/formats.py``): uint8 ``(N, K/2)``, k = 2j in
the low nibble of byte j; ``w = (q - 8) * scale + zero`` with scales/zeros ``(N, K/G)``.

One kernel, two launch shapes chosen by M (no autotuning at call time):

- M <= 16 (decode): 16-row tiles and split-K over a third grid axis so that even one row of
  activations keeps every SM busy; partial sums are added atomically into a float32 buffer.
- M > 16: one program per output tile, 128x128 where that fills the GPU, else 64x64.

BLOCK_K divides the group size, so each K tile reads one scale and one zero per output row.
"""

from __future__ import annotations

import torch
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
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        packed = tl.load(QW + offs_n[:, None] * stride_qn + (offs_k // 2)[None, :] * stride_qk,
                         mask=n_ok[:, None] & k_ok[None, :], other=0)
        q = (packed >> ((offs_k % 2) * 4).to(tl.uint8)[None, :]) & 0xF
        group = k0 // GROUP
        scale = tl.load(S + offs_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.load(Z + offs_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - 8.0) * scale[:, None] + zero[:, None]  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(x.to(DOT_DT), tl.trans(w.to(DOT_DT)), input_precision=PRECISION)
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


def launch_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> dict:
    """Tile sizes and split-K for one call.

    On a GPU, from the H100 measurements in docs/benchmarks.md (``benchmarks/gpu_tuning.py``'s
    tile sweep and ``effllm bench run quant.linear``; bf16, group 128, Llama shapes):

    - M <= 16: 16x128x128 tiles, split-K 8, 4 stages: the sweep's best over its six shapes
      together, 1.03-1.39x faster than 16x64 tiles with split-K from the SM count.
    - larger M: 128x128x128 tiles with 8 warps where they alone fill the GPU (M=2048: 2.80 ->
      1.40 ms); else 64x64x64, since at M=128 the 128-row tiles leave SMs idle (1.65-1.69x
      slower at two of three shapes, 0.95x at the third).

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
        return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=block_k, SPLIT_K=max(1, min(8, k // block_k)), num_warps=4,
                    num_stages=4)
    if triton.cdiv(m, 128) * triton.cdiv(n, 128) >= parallel_units(device):
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, SPLIT_K=1, num_warps=8, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(64, group_size), SPLIT_K=1, num_warps=4)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, split_k: int | None = None) -> torch.Tensor:
    """``x (M, K)`` float16/bfloat16/float32 -> ``(M, N)`` in x's dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.shape[1] * 2 != k or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"w4a16_matmul: expected qweight ({n}, {k // 2}) and scales/zeros ({n}, {k // group_size}) "
                         f"for x {tuple(x.shape)}, got {tuple(qweight.shape)}, {tuple(scales.shape)}, "
                         f"{tuple(zeros.shape)}")
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
