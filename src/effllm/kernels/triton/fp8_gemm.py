"""FP8 (e4m3) W8A8 GEMM with scales applied in the epilogue or per K block.

``y = (xq * x_scale) @ (wq * w_scale).T`` where

- ``x_scale``: per token ``(M, 1)`` or per 1x128 block ``(M, ceil(K/128))``;
- ``w_scale``: per tensor ``(1, 1)``, per output row ``(N, 1)`` or per 128x128 block
  ``(ceil(N/128), ceil(K/128))``.

Per-token and per-row/tensor scales factor out of the K sum, so they multiply the float32
accumulator once in the epilogue. Block scales change along K, so each K tile's partial product
is scaled before it is added (BLOCK_K divides 128, so a tile lies in one scale block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._backend import interpreting
from ._common import output_buffer_dtype

_BLOCK = 128


@triton.jit
def _fp8_gemm_kernel(
    XQ, XS, WQ, WS, Y,
    M, N, K,
    stride_xm, stride_xk, stride_xsm, stride_xsk, stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_ym, stride_yn,
    X_BLOCKWISE: tl.constexpr, W_MODE: tl.constexpr,  # W_MODE: 0 tensor, 1 row, 2 block
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(XQ + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(WQ + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        # Hopper's fp8 tensor cores sum products in less than fp32, and Triton lets a whole K
        # loop accumulate that way by default on sm_90; 0 adds every MMA's result into the fp32
        # accumulator (what cuBLAS does without fast accumulation).
        part = tl.dot(x, tl.trans(w), max_num_imprecise_acc=0)
        if X_BLOCKWISE or W_MODE == 2:
            kb = k0 // 128
            if X_BLOCKWISE:
                part = part * tl.load(XS + offs_m * stride_xsm + kb * stride_xsk, mask=m_ok, other=0.0)[:, None]
            if W_MODE == 2:
                part = part * tl.load(WS + (offs_n // 128) * stride_wsn + kb * stride_wsk, mask=n_ok, other=0.0)[None, :]
        acc += part
    if not X_BLOCKWISE:
        acc = acc * tl.load(XS + offs_m * stride_xsm, mask=m_ok, other=0.0)[:, None]
    if W_MODE == 1:
        acc = acc * tl.load(WS + offs_n * stride_wsn, mask=n_ok, other=0.0)[None, :]
    if W_MODE == 0:
        acc = acc * tl.load(WS)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``xq (M, K)``, ``wq (N, K)`` float8_e4m3fn with float32 scales (shapes in the module doc)."""
    m, k = xq.shape
    n = wq.shape[0]
    blocks_k = triton.cdiv(k, _BLOCK)
    if x_scale.shape == (m, 1):
        x_blockwise = False
    elif x_scale.shape == (m, blocks_k):
        x_blockwise = True
    else:
        raise ValueError(f"fp8_matmul: x_scale must be ({m}, 1) or ({m}, {blocks_k}), got {tuple(x_scale.shape)}")
    if w_scale.shape == (1, 1):
        w_mode = 0
    elif w_scale.shape == (n, 1):
        w_mode = 1
    elif w_scale.shape == (triton.cdiv(n, _BLOCK), blocks_k):
        w_mode = 2
    else:
        raise ValueError(f"fp8_matmul: w_scale must be (1, 1), ({n}, 1) or ({triton.cdiv(n, _BLOCK)}, {blocks_k}), "
                         f"got {tuple(w_scale.shape)}")
    if interpreting():
        block_m, block_n, block_k = 16, 32, 32
    else:
        block_m, block_n, block_k = (16 if m <= 16 else 64), 128, 128
    y = torch.empty(m, n, dtype=output_buffer_dtype(out_dtype), device=xq.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](
        xq, x_scale, wq, w_scale, y, m, n, k,
        *xq.stride(), *x_scale.stride(), *wq.stride(), *w_scale.stride(), *y.stride(),
        X_BLOCKWISE=x_blockwise, W_MODE=w_mode, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4 if block_m == 16 else 8,
    )
    return y.to(out_dtype)
