"""FlashAttention-2-style forward kernel (online softmax) for (B, S, H, D) tensors.

One program owns BLOCK_M queries of one (batch, query head) and streams K/V of the matching KV
head (GQA: ``kv_head = head // GROUP``, no repeat) in BLOCK_N tiles. Keys are visited in up to
three ranges: blocks that are partly visible (masked), blocks visible to every query of the
tile (no mask work), and partly visible again; causal masks are bottom-right aligned (query i
sits at key position ``i + Sk - Sq``), as are sliding windows.

Softmax runs in base 2 (``exp2``) in float32; the LSE output is natural-log.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._backend import interpreting
from ._common import dot_dtype, input_precision, sequence_bounds

LOG2E = 1.4426950408889634


@triton.jit
def _tile(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    start, end, q_pos, seq_k, qk_scale, softcap, window_left, window_right,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        k_pos = start_n + offs_n
        k_ok = k_pos < seq_k
        k = tl.load(k_base + k_pos[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k.to(DOT_DT), input_precision=PRECISION)  # fp32 accumulate
        if HAS_SOFTCAP:
            # softcap * tanh(s * scale / softcap), tanh via sigmoid (no libdevice in the interpreter)
            x = s * (qk_scale / softcap)
            s = softcap * (2.0 * tl.sigmoid(2.0 * x) - 1.0) * 1.4426950408889634
        else:
            s = s * (qk_scale * 1.4426950408889634)
        if MASKED:
            keep = k_ok[None, :]
            if CAUSAL:
                keep = keep & (k_pos[None, :] <= q_pos[:, None])
            keep = keep & ((window_left < 0) | (k_pos[None, :] >= q_pos[:, None] - window_left))
            keep = keep & ((window_right < 0) | (k_pos[None, :] <= q_pos[:, None] + window_right))
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no key yet keep m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + k_pos[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), v.to(DOT_DT), input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    seq_q, seq_k, num_heads, qk_scale, softcap, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    STORE_LSE: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // GROUP
    q_start, k_start, seq_q, seq_k = sequence_bounds(CU_Q, CU_K, b, seq_q, seq_k, VARLEN)
    if pid_m * BLOCK_M >= seq_q:  # varlen: the grid covers the longest sequence
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b.to(tl.int64) * stride_qb + q_start * stride_qs + h * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DT)
    k_base = K + b.to(tl.int64) * stride_kb + k_start * stride_ks + kv_h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + k_start * stride_vs + kv_h * stride_vh

    # Absolute (bottom-right aligned) positions of this tile's first and last real query.
    shift = seq_k - seq_q
    q_pos = offs_m + shift
    first = pid_m * BLOCK_M + shift
    last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, seq_q) - 1 + shift

    # Keys any query of the tile may see: [any_lo, any_hi); keys all of them see: [all_lo, all_hi).
    zero = seq_k * 0  # typed scalars: branches below reassign them
    any_lo = zero
    any_hi = seq_k + zero
    all_lo = zero
    all_hi = seq_k + zero
    if CAUSAL:
        any_hi = tl.minimum(any_hi, last + 1)
        all_hi = tl.minimum(all_hi, first + 1)
    if window_left >= 0:
        any_lo = tl.maximum(any_lo, first - window_left)
        all_lo = tl.maximum(all_lo, last - window_left)
    if window_right >= 0:
        any_hi = tl.minimum(any_hi, last + window_right + 1)
        all_hi = tl.minimum(all_hi, first + window_right + 1)
    any_lo = (any_lo // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(all_lo, BLOCK_N) * BLOCK_N
    full_hi = (all_hi // BLOCK_N) * BLOCK_N
    if full_hi <= full_lo:  # no block is fully visible: one masked sweep
        full_lo = any_lo
        full_hi = any_lo
    any_hi = tl.maximum(any_hi, full_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                          any_lo, full_lo, q_pos, seq_k, qk_scale, softcap, window_left, window_right,
                          offs_n, offs_d, HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_SOFTCAP, DOT_DT, PRECISION)
    acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                          full_lo, full_hi, q_pos, seq_k, qk_scale, softcap, window_left, window_right,
                          offs_n, offs_d, HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_SOFTCAP, DOT_DT, PRECISION)
    acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                          full_hi, any_hi, q_pos, seq_k, qk_scale, softcap, window_left, window_right,
                          offs_n, offs_d, HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_SOFTCAP, DOT_DT, PRECISION)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_base = O + b.to(tl.int64) * stride_ob + q_start * stride_os + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + b.to(tl.int64) * stride_lb + h * stride_lh + (q_start + offs_m) * stride_ls, lse, mask=m_ok)


def _blocks(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). The interpreter runs each program as numpy code, so it
    prefers fewer, larger tiles; on GPU these sizes fit the register file up to D=256."""
    if interpreting():
        return 32, 32, 4
    if head_dim <= 64:
        return 128, 64, 4
    if head_dim <= 128:
        return 128, 32, 8
    return 64, 32, 8


def attention_fwd(q, k, v, *, causal: bool, scale: float | None, window, softcap, return_lse: bool,
                  cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0):
    """Launch the forward kernel. Inputs are validated by ``effllm.kernels.attention``.

    Padded batches: ``q (B, Sq, H, D)`` -> ``out`` like q, ``lse (B, H, Sq)``. Packed varlen
    (``cu_seqlens_*`` given): ``q (total_q, H, D)`` -> ``out`` like q, ``lse (H, total_q)``.
    """
    varlen = cu_seqlens_q is not None
    if varlen:  # one "batch" row; sequences are found through cu_seqlens
        q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        batch, seq_q, seq_k = cu_seqlens_q.shape[0] - 1, max_seqlen_q, 0
    else:
        q4, k4, v4 = q, k, v
        batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
    heads, dim = q4.shape[2], q4.shape[3]
    kv_heads = k4.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    # A right window beyond the causal limit is harmless: the kernel intersects both masks.
    left, right = window if window is not None else (-1, -1)
    out = torch.empty_like(q)
    lse = torch.empty(q4.shape[0], heads, q4.shape[1], dtype=torch.float32, device=q.device)
    lse_out = lse[0] if varlen else lse
    if out.numel() == 0 or batch == 0:
        return out, lse_out.fill_(float("-inf"))
    out4 = out.unsqueeze(0) if varlen else out
    # Varlen: batch strides are 0, each program adds its sequence's start offset.
    bstride = lambda t: (0, *t.stride()[1:]) if varlen else t.stride()
    block_m, block_n, warps = _blocks(dim)
    grid = (triton.cdiv(seq_q, block_m), batch * heads)
    _attn_fwd[grid](
        q4, k4, v4, out4, lse, cu_seqlens_q if varlen else lse, cu_seqlens_k if varlen else lse,
        *bstride(q4), *bstride(k4), *bstride(v4), *bstride(out4), *bstride(lse),
        seq_q, seq_k, heads, scale, float(softcap) if softcap is not None else 1.0, left, right,
        GROUP=heads // kv_heads, HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal), HAS_SOFTCAP=softcap is not None,
        STORE_LSE=bool(return_lse), DOT_DT=dot_dtype(q.dtype), PRECISION=input_precision(q.dtype),
        VARLEN=varlen, num_warps=warps, num_stages=2,
    )
    return out, lse_out
