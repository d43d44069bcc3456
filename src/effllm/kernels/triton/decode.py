"""Split-K (flash-decoding) attention over a contiguous or paged KV cache.

Three kernels:

1. ``_decode_split``: grid ``(B * H_kv, splits)``. One program takes one KV head of one sequence
   and one contiguous slice of its keys. The ``G * Sq`` query rows that read this KV head
   (G = H / H_kv query heads, Sq new tokens) form one ``(BLOCK_H, D)`` tile, so every KV byte is
   read once per KV head and both products are ``tl.dot``. It writes a partial output and a
   base-2 LSE per row and split.
2. ``_decode_merge``: grid ``(B * H * Sq,)``. Combines the splits by LSE rescaling.
3. ``_decode_stats`` (only for ``return_stats``): grid ``(B * H_kv, key blocks)``. Recomputes the
   scores of one key block and turns them into probabilities with the final LSE, summed over the
   rows: the mass each key received, without ever storing the attention matrix.

Paged caches are read token by token through the block table (``page = table[b, n // P]``,
slot ``n % P``), so any page size works with any ``BLOCK_N``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._backend import interpreting
from ._common import dot_dtype, input_precision, parallel_units

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _key_offsets(b, k_pos, k_ok, BT, stride_bt_b, stride_bt_p, stride_page, stride_tok, PAGE_SIZE: tl.constexpr):
    """Offsets of tokens ``k_pos`` of sequence ``b``: page lookup when paged, else a plain row."""
    if PAGE_SIZE > 0:
        page = tl.load(BT + b * stride_bt_b + (k_pos // PAGE_SIZE) * stride_bt_p, mask=k_ok, other=0)
        return page.to(tl.int64) * stride_page + (k_pos % PAGE_SIZE) * stride_tok
    else:
        return b.to(tl.int64) * stride_page + k_pos.to(tl.int64) * stride_tok


@triton.jit
def _scores(q, k, k_pos, k_ok, q_pos, qk_scale, softcap, window_left,
            HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 logits ``(BLOCK_H, BLOCK_N)`` with causal, window and length masks applied."""
    s = tl.dot(q, k, input_precision=PRECISION)
    if HAS_SOFTCAP:
        # softcap * tanh(x), tanh via sigmoid (no libdevice under the interpreter)
        x = s * (qk_scale / softcap)
        s = softcap * (2.0 * tl.sigmoid(2.0 * x) - 1.0) * 1.4426950408889634
    else:
        s = s * (qk_scale * 1.4426950408889634)
    keep = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
    keep = keep & ((window_left < 0) | (k_pos[None, :] >= q_pos[:, None] - window_left))
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _load_query_rows(Q, b, kv_h, stride_qb, stride_qs, stride_qh, stride_qd, length,
                     SEQ_Q: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DT: tl.constexpr):
    """The (BLOCK_H, BLOCK_D) query tile of one KV head; row r is head ``kv_h*G + r // Sq``,
    token ``r % Sq``. Returns the tile, each row's head and token, its position and validity."""
    rows = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP * SEQ_Q
    head = kv_h * GROUP + rows // SEQ_Q
    tok = rows % SEQ_Q
    q = tl.load(Q + b.to(tl.int64) * stride_qb + tok[:, None] * stride_qs + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0).to(DOT_DT)
    q_pos = length - SEQ_Q + tok
    return q, head, tok, q_pos, row_ok


@triton.jit
def _decode_split(
    Q, K, V, SEQLENS, BT, O_PART, L_PART,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vp, stride_vt, stride_vh, stride_vd,
    stride_bt_b, stride_bt_p,
    stride_ob, stride_oh, stride_oq, stride_os, stride_od,
    stride_lb, stride_lh, stride_lq, stride_ls,
    kv_heads, num_splits, qk_scale, softcap, window_left,
    SEQ_Q: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // kv_heads
    kv_h = pid % kv_heads
    length = tl.load(SEQLENS + b).to(tl.int32)
    q, head, tok, q_pos, row_ok = _load_query_rows(Q, b, kv_h, stride_qb, stride_qs, stride_qh, stride_qd, length,
                                                   SEQ_Q, GROUP, HEAD_DIM, BLOCK_H, BLOCK_D, DOT_DT)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # Keys any query can see: a left window drops the prefix; splits share the rest evenly.
    lo = length * 0
    if window_left >= 0:
        lo = tl.maximum(lo, length - SEQ_Q - window_left)
    per_split = tl.cdiv(tl.cdiv(length - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(length, start + per_split)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        k_pos = start_n + offs_n
        k_ok = k_pos < end
        k_off = _key_offsets(b, k_pos, k_ok, BT, stride_bt_b, stride_bt_p, stride_kp, stride_kt, PAGE_SIZE)
        k = tl.load(K + k_off[None, :] + kv_h * stride_kh + offs_d[:, None] * stride_kd,
                    mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        s = _scores(q, k.to(DOT_DT), k_pos, k_ok, q_pos, qk_scale, softcap, window_left, HAS_SOFTCAP, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: avoid inf - inf
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = _key_offsets(b, k_pos, k_ok, BT, stride_bt_b, stride_bt_p, stride_vp, stride_vt, PAGE_SIZE)
        v = tl.load(V + v_off[:, None] + kv_h * stride_vh + offs_d[None, :] * stride_vd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), v.to(DOT_DT), input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    part = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    o_row = O_PART + b.to(tl.int64) * stride_ob + head * stride_oh + tok * stride_oq + split * stride_os
    tl.store(o_row[:, None] + offs_d[None, :] * stride_od, part, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(L_PART + b.to(tl.int64) * stride_lb + head * stride_lh + tok * stride_lq + split * stride_ls,
             lse2, mask=row_ok)


@triton.jit
def _decode_merge(
    O_PART, L_PART, OUT, LSE,
    stride_ob, stride_oh, stride_oq, stride_os, stride_od,
    stride_lb, stride_lh, stride_lq, stride_ls,
    stride_outb, stride_outq, stride_outh, stride_outd,
    stride_eb, stride_eh, stride_eq,
    heads, num_splits,
    SEQ_Q: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // (heads * SEQ_Q)
    h = (pid // SEQ_Q) % heads
    i = pid % SEQ_Q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    lse2 = tl.load(L_PART + b.to(tl.int64) * stride_lb + h * stride_lh + i * stride_lq + offs_s * stride_ls,
                   mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, 0)  # finite: every query sees at least its own key
    w = tl.exp2(lse2 - m)  # empty splits (-inf) weigh 0
    o = tl.load(O_PART + b.to(tl.int64) * stride_ob + h * stride_oh + i * stride_oq
                + offs_s[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / total
    tl.store(OUT + b.to(tl.int64) * stride_outb + i * stride_outq + h * stride_outh + offs_d * stride_outd,
             out.to(OUT.dtype.element_ty), mask=d_ok)
    tl.store(LSE + b.to(tl.int64) * stride_eb + h * stride_eh + i * stride_eq, (m + tl.log2(total)) * 0.6931471805599453)


@triton.jit
def _decode_stats(
    Q, K, SEQLENS, BT, LSE, STATS,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_bt_b, stride_bt_p,
    stride_eb, stride_eh, stride_eq,
    stride_sb, stride_sh, stride_sn,
    kv_heads, capacity, qk_scale, softcap, window_left,
    SEQ_Q: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // kv_heads
    kv_h = pid % kv_heads
    length = tl.load(SEQLENS + b).to(tl.int32)
    q, head, tok, q_pos, row_ok = _load_query_rows(Q, b, kv_h, stride_qb, stride_qs, stride_qh, stride_qd, length,
                                                   SEQ_Q, GROUP, HEAD_DIM, BLOCK_H, BLOCK_D, DOT_DT)
    lse2 = tl.load(LSE + b.to(tl.int64) * stride_eb + head * stride_eh + tok * stride_eq, mask=row_ok, other=0.0)
    lse2 = lse2 * 1.4426950408889634
    k_pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k_pos < length
    offs_d = tl.arange(0, BLOCK_D)
    k_off = _key_offsets(b, k_pos, k_ok, BT, stride_bt_b, stride_bt_p, stride_kp, stride_kt, PAGE_SIZE)
    k = tl.load(K + k_off[None, :] + kv_h * stride_kh + offs_d[:, None] * stride_kd,
                mask=k_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
    s = _scores(q, k.to(DOT_DT), k_pos, k_ok, q_pos, qk_scale, softcap, window_left, HAS_SOFTCAP, PRECISION)
    p = tl.where(row_ok[:, None], tl.exp2(s - lse2[:, None]), 0.0)
    tl.store(STATS + b.to(tl.int64) * stride_sb + kv_h * stride_sh + k_pos * stride_sn, tl.sum(p, 0),
             mask=k_pos < capacity)


def choose_num_splits(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """Splits per sequence: enough programs for about two waves over the device, but at least
    256 keys per split (shorter splits cost more in merging than they gain in parallelism)."""
    units = parallel_units(device)
    wanted = triton.cdiv(2 * units, batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(capacity, 256), 64))


def _blocks() -> tuple[int, int]:
    """(BLOCK_N, num_warps): the interpreter prefers fewer, larger tiles."""
    return (32, 4) if interpreting() else (64, 4)


def decode_fwd(q, k_cache, v_cache, seqlens, block_table, *, scale, window, softcap, num_splits, return_stats):
    """Launch split, merge (and stats). Inputs are validated by ``effllm.kernels.decode_attention``."""
    batch, seq_q, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    splits = num_splits or choose_num_splits(batch, kv_heads, capacity, q.device)
    qk_scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    cap = float(softcap) if softcap is not None else 1.0
    left = window[0] if window is not None else -1
    table = block_table if paged else seqlens  # a placeholder pointer when contiguous
    bt_strides = block_table.stride() if paged else (0, 0)
    block_n, warps = _blocks()
    common = dict(SEQ_Q=seq_q, GROUP=group, HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
                  BLOCK_H=max(16, triton.next_power_of_2(group * seq_q)), BLOCK_N=block_n,
                  PAGE_SIZE=k_cache.shape[1] if paged else 0, HAS_SOFTCAP=softcap is not None,
                  DOT_DT=dot_dtype(q.dtype), PRECISION=input_precision(q.dtype))

    o_part = torch.empty(batch, heads, seq_q, splits, dim, dtype=torch.float32, device=q.device)
    l_part = torch.empty(batch, heads, seq_q, splits, dtype=torch.float32, device=q.device)
    _decode_split[(batch * kv_heads, splits)](
        q, k_cache, v_cache, seqlens, table, o_part, l_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *bt_strides, *o_part.stride(), *l_part.stride(),
        kv_heads, splits, qk_scale, cap, left, **common, num_warps=warps, num_stages=2,
    )
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    _decode_merge[(batch * heads * seq_q,)](
        o_part, l_part, out, lse, *o_part.stride(), *l_part.stride(), *out.stride(), *lse.stride(),
        heads, splits, SEQ_Q=seq_q, HEAD_DIM=dim, BLOCK_D=common["BLOCK_D"],
        BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=2,
    )
    stats = None
    if return_stats:
        stats = torch.empty(batch, kv_heads, capacity, dtype=torch.float32, device=q.device)
        _decode_stats[(batch * kv_heads, triton.cdiv(capacity, block_n))](
            q, k_cache, seqlens, table, lse, stats,
            *q.stride(), *k_cache.stride(), *bt_strides, *lse.stride(), *stats.stride(),
            kv_heads, capacity, qk_scale, cap, left, **common, num_warps=warps,
        )
    return out, lse, stats
