"""Split-K decode attention over NSNQuant codes (lookup-table scores, codebook-gathered values).

A coded token is ``x_hat = a * H y_hat + b * mu[chunk]``, ``y_hat`` a sum of codebook vectors
picked by its codes (``stages`` codes per ``V``-channel sub-vector). The host gives, per query
row, a lookup table ``LUT[r, slot, k] = <(H q_r) sub-vector of slot, beta^stage * codebook[k]>``
and ``QMU[r, c] = <q_r, mu_c>`` (both small); a program of grid ``(B * H_kv, splits)`` then, per
block of tokens,

- scores ``a_t * sum_slot LUT[r, slot, code[t, slot]] + b_t * QMU[r, chunk(t)]`` (a gather and a
  sum: no key is ever rebuilt),
- accumulates ``sum_t p_t a_t y_hat_t`` (codebook rows gathered by the value codes, one
  ``tl.dot``) and ``sum_t p_t b_t mu[chunk(t)]`` (another) with the online softmax,

and writes unnormalised partials with their running max and sum. An optional ``bias (B, H_kv,
R, T)`` float32 is added to the raw scores first: what the caller computes apart (exact keys'
residuals, ``kv/exact_keys.py``: ``q . r`` of each row and token). The launcher merges the splits
and returns both accumulators; the caller applies ``H`` to the first (once per query row) and
adds the second. ``a``/``b`` are decoded in the kernel from 8-bit log codes and the chunk's grid.

Nothing here imports from ``effllm.kv``: the caller passes raw tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._backend import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _token_scale(SCALES, GRID, base_s, base_g, n, cid, n_ok, stride_st, stride_gc, WHICH: tl.constexpr):
    """``2 ** (lo + step * code)`` of scale ``WHICH`` (0: a, 1: b) for tokens ``n``."""
    code = tl.load(SCALES + base_s + n.to(tl.int64) * stride_st + WHICH, mask=n_ok, other=0).to(tl.float32)
    lo = tl.load(GRID + base_g + cid.to(tl.int64) * stride_gc + WHICH * 2, mask=n_ok, other=0.0)
    step = tl.load(GRID + base_g + cid.to(tl.int64) * stride_gc + WHICH * 2 + 1, mask=n_ok, other=0.0)
    return tl.exp2(lo + step * code)


@triton.jit
def _nsn_codes_split(
    LUT, QMU, KC, KS, KG, VC, VS, VG, VSHIFT, IDS, CB, BIAS, O_ROT, O_MU, M_PART, L_PART,
    stride_lb, stride_lh, stride_lr,
    stride_bb, stride_bh, stride_br,
    stride_qb, stride_qh, stride_qr,
    stride_cb, stride_ch, stride_ct,
    stride_sb, stride_sh, stride_st,
    stride_gb, stride_gh, stride_gc,
    stride_mb, stride_mh, stride_mc,
    stride_ib, stride_ih,
    stride_ob, stride_oh, stride_os, stride_or,
    stride_pb, stride_ph, stride_ps,
    kv_heads, tokens, num_rows, num_splits, first_query, qk_scale, softcap, beta,
    SEQ_Q: tl.constexpr, SLOTS: tl.constexpr, SUBS: tl.constexpr, STAGES: tl.constexpr, V: tl.constexpr,
    K: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    tl.static_assert(BLOCK_R >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // kv_heads).to(tl.int64)
    h = (pid % kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_R)
    r_ok = rows < num_rows
    q_pos = first_query + rows % SEQ_Q
    offs_j = tl.arange(0, BLOCK_J)
    j_ok = offs_j < SLOTS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    per_split = tl.cdiv(tl.cdiv(tokens, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(tokens, start + per_split)

    lut_rows = LUT + b * stride_lb + h * stride_lh + rows.to(tl.int64) * stride_lr
    qmu_rows = QMU + b * stride_qb + h * stride_qh + rows.to(tl.int64) * stride_qr
    base_c = b * stride_cb + h * stride_ch
    base_s = b * stride_sb + h * stride_sh
    base_g = b * stride_gb + h * stride_gh
    base_m = b * stride_mb + h * stride_mh
    base_i = b * stride_ib + h * stride_ih

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_rot = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_mu = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < end
        cid = tl.load(IDS + base_i + n, mask=n_ok, other=0)
        # scores: gather the lookup table by each token's codes, sum over slots
        codes = tl.load(KC + base_c + n.to(tl.int64)[:, None] * stride_ct + offs_j[None, :],
                        mask=n_ok[:, None] & j_ok[None, :], other=0).to(tl.int32)
        lut = tl.load(lut_rows[:, None, None] + (offs_j * K)[None, None, :] + codes[None, :, :],
                      mask=r_ok[:, None, None] & n_ok[None, :, None] & j_ok[None, None, :], other=0.0)
        dots = tl.sum(lut, axis=2)
        qmu = tl.load(qmu_rows[:, None] + cid[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        a_k = _token_scale(KS, KG, base_s, base_g, n, cid, n_ok, stride_st, stride_gc, 0)
        b_k = _token_scale(KS, KG, base_s, base_g, n, cid, n_ok, stride_st, stride_gc, 1)
        s = a_k[None, :] * dots + b_k[None, :] * qmu
        if HAS_BIAS:
            s += tl.load(BIAS + b * stride_bb + h * stride_bh + rows.to(tl.int64)[:, None] * stride_br + n[None, :],
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_SOFTCAP:
            x = s * (qk_scale / softcap)
            s = softcap * (2.0 * tl.sigmoid(2.0 * x) - 1.0) * 1.4426950408889634
        else:
            s = s * (qk_scale * 1.4426950408889634)
        s = tl.where(n_ok[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # values: codebook rows gathered by the value codes (the rotated part), and the shifts
        a_v = _token_scale(VS, VG, base_s, base_g, n, cid, n_ok, stride_st, stride_gc, 0)
        b_v = _token_scale(VS, VG, base_s, base_g, n, cid, n_ok, stride_st, stride_gc, 1)
        y_hat = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        vd_ok = n_ok[:, None] & d_ok[None, :]
        for stage in tl.static_range(STAGES):
            vcode = tl.load(VC + base_c + n.to(tl.int64)[:, None] * stride_ct + stage * SUBS + offs_d[None, :] // V,
                            mask=vd_ok, other=0).to(tl.int32)
            row = tl.load(CB + vcode * V + offs_d[None, :] % V, mask=vd_ok, other=0.0)
            if stage == 0:
                y_hat += row
            else:
                y_hat += beta * row
        mu = tl.load(VSHIFT + base_m + cid.to(tl.int64)[:, None] * stride_mc + offs_d[None, :],
                     mask=vd_ok, other=0.0).to(tl.float32)
        acc_rot = acc_rot * alpha[:, None] + tl.dot(p * a_v[None, :], y_hat, input_precision="ieee")
        acc_mu = acc_mu * alpha[:, None] + tl.dot(p * b_v[None, :], mu, input_precision="ieee")
        m_i = m_new

    out = b * stride_ob + h * stride_oh + split * stride_os + rows.to(tl.int64)[:, None] * stride_or + offs_d[None, :]
    keep = r_ok[:, None] & d_ok[None, :]
    tl.store(O_ROT + out, acc_rot, mask=keep)
    tl.store(O_MU + out, acc_mu, mask=keep)
    part = b * stride_pb + h * stride_ph + split * stride_ps + rows
    tl.store(M_PART + part, m_i, mask=r_ok)
    tl.store(L_PART + part, l_i, mask=r_ok)


def nsn_decode_codes(table, qmu, key_codes, key_scales, key_grid, value_codes, value_scales, value_grid,
                     value_shift, chunk_ids, vectors, beta, *, stages, scale, softcap, first_query, seq_q,
                     num_splits=None, bias=None):
    """Attention of ``R`` query rows (row ``g * seq_q + i`` at position ``first_query + i``)
    over ``T`` coded tokens, given the rows' lookup table ``table (B, H_kv, R, stages * D / V *
    K)`` float32 (slot-major, stage 2's slots already times ``beta``) and ``qmu (B, H_kv, R, C)``
    float32 (each row dotted with each chunk's key shift).

    ``key_codes``/``value_codes (B, H_kv, T, stages * D / V)`` uint8 codebook indices
    (stage-major), ``*_scales (B, H_kv, T, 2)`` uint8 log codes, ``*_grid (B, H_kv, C, 2, 2)``
    float32, ``value_shift (B, H_kv, C, D)``, ``chunk_ids (B, H_kv, T)``, ``vectors (K, V)``
    float32; ``bias (B, H_kv, R, T)`` float32 or None, added to the raw scores. Returns ``((rotated, shifted), lse)``: two ``(B, H_kv, R, D)`` float32 parts of the
    output (the caller applies ``H`` to the first and adds the second) and the natural-log LSE
    ``(B, H_kv, R)`` (``-inf`` for rows that see no token)."""
    batch, kv_heads, num_rows, _ = qmu.shape
    dim = value_shift.shape[-1]
    tokens = key_codes.shape[2]
    size, vdim = vectors.shape
    subs = dim // vdim
    slots = stages * subs
    if key_grid.shape != value_grid.shape or key_codes.shape != value_codes.shape:
        raise ValueError("nsn_decode_codes: keys and values must hold the same tokens and chunks")
    if table.shape != (batch, kv_heads, num_rows, slots * size):
        raise ValueError(f"nsn_decode_codes: table must be {(batch, kv_heads, num_rows, slots * size)}, "
                         f"got {tuple(table.shape)}")
    if bias is not None and (bias.shape != (batch, kv_heads, num_rows, tokens) or bias.dtype != torch.float32):
        raise ValueError(f"nsn_decode_codes: bias must be float32 {(batch, kv_heads, num_rows, tokens)}, got "
                         f"{bias.dtype} {tuple(bias.shape)}")
    table, qmu = table.contiguous(), qmu.contiguous()
    bias_arg = table if bias is None else bias.contiguous()  # a placeholder pointer when unused
    key_codes, key_scales, key_grid = key_codes.contiguous(), key_scales.contiguous(), key_grid.contiguous()
    value_codes, value_scales = value_codes.contiguous(), value_scales.contiguous()
    value_grid, value_shift = value_grid.contiguous(), value_shift.contiguous()
    ids = chunk_ids.to(torch.int32).contiguous()
    splits = num_splits or max(1, min(triton.cdiv(tokens, 256), 16 if not interpreting() else 4))
    block_r = max(16, triton.next_power_of_2(num_rows))
    block_n = 32  # the score gather holds a (rows, BLOCK_N, slots) tile
    o_rot = torch.empty(batch, kv_heads, splits, num_rows, dim, dtype=torch.float32, device=qmu.device)
    o_mu = torch.empty_like(o_rot)
    m_part = torch.empty(batch, kv_heads, splits, num_rows, dtype=torch.float32, device=qmu.device)
    l_part = torch.empty_like(m_part)
    _nsn_codes_split[(batch * kv_heads, splits)](
        table, qmu, key_codes, key_scales, key_grid, value_codes, value_scales, value_grid, value_shift, ids,
        vectors.contiguous(), bias_arg, o_rot, o_mu, m_part, l_part,
        *table.stride()[:3], *bias_arg.stride()[:3], *qmu.stride()[:3], *key_codes.stride()[:3], *key_scales.stride()[:3],
        *key_grid.stride()[:3], *value_shift.stride()[:3], *ids.stride()[:2],
        *o_rot.stride()[:4], *m_part.stride()[:3],
        kv_heads, tokens, num_rows, splits, first_query, float(scale), float(softcap or 1.0), float(beta),
        SEQ_Q=seq_q, SLOTS=slots, SUBS=subs, STAGES=stages, V=vdim, K=size, HEAD_DIM=dim, BLOCK_R=block_r,
        BLOCK_N=block_n, BLOCK_J=max(2, triton.next_power_of_2(slots)), BLOCK_D=max(16, triton.next_power_of_2(dim)),
        HAS_SOFTCAP=softcap is not None, HAS_BIAS=bias is not None, num_warps=4,
    )
    # merge the splits (base-2 running max and sum)
    top = m_part.amax(2, keepdim=True)
    safe = torch.where(top.isinf(), 0.0, top)
    weight = torch.exp2(m_part - safe)  # empty splits: exp2(-inf) = 0
    total = (weight * l_part).sum(2)
    seen = total > 0
    norm = torch.where(seen, total, 1.0)[..., None]
    rot = (weight[..., None] * o_rot).sum(2) / norm
    mu = (weight[..., None] * o_mu).sum(2) / norm
    lse = torch.where(seen, (safe.squeeze(2) + torch.log2(norm[..., 0])) / LOG2E, float("-inf"))
    return (rot, mu), lse

