"""FlashAttention-2-style backward: dq, dk, dv from the forward's output and LSE.

Two kernels, both recomputing probabilities ``p = exp(s - lse)`` tile by tile instead of
storing the attention matrix:

- ``_attn_bwd_dkdv``: grid ``(key blocks, B * H_kv)``. One program owns BLOCK_N keys of one KV
  head and loops over the GROUP query heads that read them (GQA: dk/dv are reduced over the
  group inside the program, no atomics) and over the query blocks that can see those keys.
- ``_attn_bwd_dq``: grid ``(query blocks, B * H)``, the forward's loop with ``dq += ds @ k``.

``delta = rowsum(dO * O) - dLSE`` is precomputed in torch; a gradient flowing into the LSE
output folds into it, since ``d lse / d s = p``. With a softcap the chain rule adds
``1 - tanh^2`` per logit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._backend import interpreting
from ._common import dot_dtype, input_precision, sequence_bounds


@triton.jit
def _probs(q, k_t, q_pos, k_pos, m_ok, k_ok, lse2, qk_scale, softcap, window_left, window_right,
           CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputed probabilities of a (BLOCK_M, BLOCK_N) tile and d(logit)/d(q.k) / scale."""
    s = tl.dot(q, k_t, input_precision=PRECISION)
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * (s * (qk_scale / softcap))) - 1.0  # tanh
        logit2 = softcap * t * 1.4426950408889634
        slope = 1.0 - t * t
    else:
        logit2 = s * (qk_scale * 1.4426950408889634)
        slope = tl.full(s.shape, 1.0, tl.float32)
    keep = m_ok[:, None] & k_ok[None, :]
    if CAUSAL:
        keep = keep & (k_pos[None, :] <= q_pos[:, None])
    keep = keep & ((window_left < 0) | (k_pos[None, :] >= q_pos[:, None] - window_left))
    keep = keep & ((window_right < 0) | (k_pos[None, :] <= q_pos[:, None] + window_right))
    # lse2 is +inf for rows that saw no key, so their p is 0.
    p = tl.where(keep, tl.exp2(logit2 - lse2[:, None]), 0.0)
    return p, slope


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE2, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_lb, stride_lh, stride_ls,
    stride_kgb, stride_kgs, stride_kgh, stride_kgd,
    stride_vgb, stride_vgs, stride_vgh, stride_vgd,
    seq_q, seq_k, kv_heads, qk_scale, softcap, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_DT: tl.constexpr,
    PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    kv_h = pid_bh % kv_heads
    q_start, k_start, seq_q, seq_k = sequence_bounds(CU_Q, CU_K, b, seq_q, seq_k, VARLEN)
    if pid_n * BLOCK_N >= seq_k:  # varlen: the grid covers the longest sequence
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_ok = offs_n < seq_k
    d_ok = offs_d < HEAD_DIM
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + k_start * stride_ks + kv_h * stride_kh
                + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0).to(DOT_DT)
    v = tl.load(V + b.to(tl.int64) * stride_vb + k_start * stride_vs + kv_h * stride_vh
                + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0).to(DOT_DT)
    k_t = tl.trans(k)
    v_t = tl.trans(v)

    # Queries (bottom-right aligned, query i at key position i + shift) that see any key here.
    shift = seq_k - seq_q
    first = pid_n * BLOCK_N
    last = tl.minimum(first + BLOCK_N, seq_k) - 1
    lo = shift * 0
    hi = seq_q + lo
    if CAUSAL:
        lo = tl.maximum(lo, first - shift)
    if window_right >= 0:
        lo = tl.maximum(lo, first - window_right - shift)
    if window_left >= 0:
        hi = tl.minimum(hi, last + window_left - shift + 1)
    lo = (lo // BLOCK_M) * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + q_start * stride_qs + h * stride_qh
        do_base = DO + b.to(tl.int64) * stride_db + q_start * stride_ds + h * stride_dh
        row_base = b.to(tl.int64) * stride_lb + q_start * stride_ls + h * stride_lh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < seq_q
            row_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                        mask=row_mask, other=0.0).to(DOT_DT)
            do = tl.load(do_base + offs_m[:, None] * stride_ds + offs_d[None, :] * stride_dd,
                         mask=row_mask, other=0.0).to(DOT_DT)
            lse2 = tl.load(LSE2 + row_base + offs_m * stride_ls, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m * stride_ls, mask=m_ok, other=0.0)
            p, slope = _probs(q, k_t, offs_m + shift, offs_n, m_ok, k_ok, lse2, qk_scale, softcap,
                              window_left, window_right, CAUSAL, HAS_SOFTCAP, PRECISION)
            dv += tl.dot(tl.trans(p.to(DOT_DT)), do, input_precision=PRECISION)
            dp = tl.dot(do, v_t, input_precision=PRECISION)
            ds = p * (dp - delta[:, None]) * slope
            dk += tl.dot(tl.trans(ds.to(DOT_DT)), q, input_precision=PRECISION)
    dk = dk * qk_scale
    tl.store(DK + b.to(tl.int64) * stride_kgb + k_start * stride_kgs + kv_h * stride_kgh
             + offs_n[:, None] * stride_kgs + offs_d[None, :] * stride_kgd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_vgb + k_start * stride_vgs + kv_h * stride_vgh
             + offs_n[:, None] * stride_vgs + offs_d[None, :] * stride_vgd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE2, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_lb, stride_lh, stride_ls,
    stride_gb, stride_gs, stride_gh, stride_gd,
    seq_q, seq_k, num_heads, qk_scale, softcap, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_DT: tl.constexpr,
    PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // GROUP
    q_start, k_start, seq_q, seq_k = sequence_bounds(CU_Q, CU_K, b, seq_q, seq_k, VARLEN)
    if pid_m * BLOCK_M >= seq_q:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    row_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + q_start * stride_qs + h * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0).to(DOT_DT)
    do = tl.load(DO + b.to(tl.int64) * stride_db + q_start * stride_ds + h * stride_dh + offs_m[:, None] * stride_ds
                 + offs_d[None, :] * stride_dd, mask=row_mask, other=0.0).to(DOT_DT)
    row_base = b.to(tl.int64) * stride_lb + q_start * stride_ls + h * stride_lh
    lse2 = tl.load(LSE2 + row_base + offs_m * stride_ls, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m * stride_ls, mask=m_ok, other=0.0)

    # Keys any query of the tile may see (as in the forward).
    shift = seq_k - seq_q
    first = pid_m * BLOCK_M + shift
    last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, seq_q) - 1 + shift
    lo = shift * 0
    hi = seq_k + lo
    if CAUSAL:
        hi = tl.minimum(hi, last + 1)
    if window_left >= 0:
        lo = tl.maximum(lo, first - window_left)
    if window_right >= 0:
        hi = tl.minimum(hi, last + window_right + 1)
    lo = (lo // BLOCK_N) * BLOCK_N

    k_base = K + b.to(tl.int64) * stride_kb + k_start * stride_ks + kv_h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + k_start * stride_vs + kv_h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ok = offs_n < seq_k
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0).to(DOT_DT)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0).to(DOT_DT)
        p, slope = _probs(q, tl.trans(k), offs_m + shift, offs_n, m_ok, k_ok, lse2, qk_scale, softcap,
                          window_left, window_right, CAUSAL, HAS_SOFTCAP, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * slope
        dq += tl.dot(ds.to(DOT_DT), k, input_precision=PRECISION)
    dq = dq * qk_scale
    tl.store(DQ + b.to(tl.int64) * stride_gb + q_start * stride_gs + h * stride_gh + offs_m[:, None] * stride_gs
             + offs_d[None, :] * stride_gd, dq.to(DQ.dtype.element_ty), mask=row_mask)


def _blocks(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): the backward holds more tiles live than the forward."""
    if interpreting():
        return 32, 32, 4
    if head_dim <= 64:
        return 64, 64, 4
    return 64, 32, 8 if head_dim > 128 else 4


def attention_bwd(dout, dlse, q, k, v, out, lse, *, causal, scale, window, softcap,
                  cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0):
    """Gradients ``(dq, dk, dv)`` of ``attention_fwd``'s ``(out, lse)`` (lse natural-log).

    Padded ``(B, S, H, D)`` tensors with lse ``(B, H, Sq)``, or packed varlen ``(total, H, D)``
    with lse ``(H, total_q)`` when ``cu_seqlens_*`` are given.
    """
    varlen = cu_seqlens_q is not None
    if varlen:  # one "batch" row with zero batch strides; programs find their sequence
        q, k, v, dout, out = (t.unsqueeze(0) for t in (q, k, v, dout, out))
        lse = lse.unsqueeze(0)
        dlse = dlse.unsqueeze(0) if dlse is not None else None
        batch, seq_q, seq_k = cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k
    else:
        batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
    heads, dim, kv_heads = q.shape[2], q.shape[3], k.shape[2]
    qk_scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    left, right = window if window is not None else (-1, -1)
    # Base-2 LSE; rows that saw no key get +inf so every p of theirs is 0.
    lse2 = torch.where(torch.isfinite(lse), lse * 1.4426950408889634, torch.full_like(lse, float("inf")))
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # B, H, Sq
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
    delta = delta.contiguous()
    lse2 = lse2.contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    unpack = (lambda *t: tuple(x[0] for x in t)) if varlen else (lambda *t: t)
    if q.numel() == 0 or k.numel() == 0 or batch == 0:
        return unpack(dq, dk, dv)
    bstride = lambda t: (0, *t.stride()[1:]) if varlen else t.stride()
    block_m, block_n, warps = _blocks(dim)
    common = dict(GROUP=heads // kv_heads, HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
                  BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal), HAS_SOFTCAP=softcap is not None,
                  DOT_DT=dot_dtype(q.dtype), PRECISION=input_precision(q.dtype), VARLEN=varlen)
    cap = float(softcap) if softcap is not None else 1.0
    cu_q, cu_k = (cu_seqlens_q, cu_seqlens_k) if varlen else (lse2, lse2)  # placeholders when padded
    strides = (*bstride(q), *bstride(k), *bstride(v), *bstride(dout), *bstride(lse2))
    _attn_bwd_dkdv[(triton.cdiv(seq_k, block_n), batch * kv_heads)](
        q, k, v, dout, lse2, delta, dk, dv, cu_q, cu_k, *strides, *bstride(dk), *bstride(dv),
        seq_q, seq_k, kv_heads, qk_scale, cap, left, right, **common, num_warps=warps, num_stages=1,
    )
    _attn_bwd_dq[(triton.cdiv(seq_q, block_m), batch * heads)](
        q, k, v, dout, lse2, delta, dq, cu_q, cu_k, *strides, *bstride(dq),
        seq_q, seq_k, heads, qk_scale, cap, left, right, **common, num_warps=warps, num_stages=1,
    )
    return unpack(dq, dk, dv)
