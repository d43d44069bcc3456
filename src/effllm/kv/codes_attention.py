"""Attention that reads quantized KV codes directly, never building full-precision keys/values.

NSNQuant (``kv/nsnquant.py``): a coded token is ``x_hat = a * H y_hat + b * mu`` with ``y_hat``
made of codebook vectors, so for a query ``q``

- score: ``q . x_hat = a * <H q, y_hat> + b * <q, mu>``. ``H q`` is split into sub-vectors and
  dotted with the codebook once (a lookup table of ``D / vector_dim`` x 256 entries a query row);
  a token's ``<H q, y_hat>`` is then a sum of table entries gathered by its codes (stage 2 reads
  the same table times ``beta``), and ``<q, mu>`` is one number per chunk.
- output: ``sum_t p_t x_hat_t = H (sum_t p_t a_t y_hat_t) + sum_c (sum_{t in c} p_t b_t) mu_c``;
  the first sum adds each token's weight ``p_t a_t`` into a histogram over (sub-vector, code),
  multiplied by the codebook once at the end, then rotated back with one ``H``.

KIVI (``kv/quantizers.py``): keys are ``code * scale + min`` per channel over groups of tokens, so
``q . k = (q * scale_g) . code + q . min_g``: the scales fold into the query once per group and
the codes are multiplied as they are. Values are per token over groups of channels: the
attention weight folds into each token's scales the same way.

Both take the protocol's ``attend`` arguments: ``query (B, H, Sq, D)``, the queries of the last
``Sq`` tokens held (causal among themselves), GQA when ``H`` is a multiple of the store's heads.
They return ``out (B, Sq, H, D)`` in the query's dtype, and with ``return_mass`` the float32
``(B, H_kv, T)`` probability each held token received, summed over queries and heads of a group.
"""

from __future__ import annotations

import functools

import torch

from .. import native
from .._backend import resolve_backend
from ..kernels.scores import softmax, softmax_attention, visible_keys
from .codebook import codebook
from .hadamard import fwht, hadamard_matrix
from .nsnquant import NSNCodes, NSNStore, log_decode
from .quantizers import KIVIStore, unpack


def _rows(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, H, Sq, D)`` -> float32 ``(B, H_kv, G * Sq, D)``: row ``g * Sq + i`` is query head
    ``h * G + g``, token ``i``."""
    batch, heads, seq_q, dim = query.shape
    return query.float().reshape(batch, kv_heads, (heads // kv_heads) * seq_q, dim)


def _unrows(rows: torch.Tensor, heads: int, seq_q: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``_rows``, to the protocol's ``(B, Sq, H, D)``."""
    batch, _, _, dim = rows.shape
    return rows.reshape(batch, heads, seq_q, dim).transpose(1, 2).to(dtype)


def _check_query(query: torch.Tensor, kv_heads: int, dim: int, held: int, where: str) -> None:
    if not isinstance(query, torch.Tensor) or query.dim() != 4 or not query.is_floating_point():
        raise ValueError(f"{where}: query must be a float (B, H, Sq, D) tensor, got {getattr(query, 'shape', query)!r}")
    _batch, heads, seq_q, qdim = query.shape
    if qdim != dim or heads % kv_heads or seq_q > held or seq_q < 1:
        raise ValueError(f"{where}: query must be (B, H, Sq, {dim}) with H a multiple of {kv_heads} and "
                         f"1 <= Sq <= {held} (tokens held), got {tuple(query.shape)}")


def _softmax(scores: torch.Tensor, scale: float, softcap: float | None, seq_q: int,
             hide: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities from raw dot products ``(B, H_kv, G * Sq, T)`` with the masks and NaN
    convention of ``kernels/scores.py`` (the scale goes on the products here, which come from codes,
    where ``scores.logits`` puts it on the queries): scale, softcap, and the causal mask among the last
    ``Sq`` keys (row ``g * Sq + i`` sees keys ``<= T - Sq + i``); ``hide`` (broadcast against
    the scores): keys no row sees (padding), masked after the softcap."""
    scores = scores * scale
    if softcap is not None:
        scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    if hide is not None:
        scores.masked_fill_(hide, float("-inf"))
    batch, heads, rows, tokens = scores.shape
    keep = visible_keys(slice(0, seq_q), seq_q, tokens, causal=True, window=None, device=scores.device)
    if keep is not None:  # (1, Sq, T), broadcast over the query heads of a group
        grouped = scores.view(batch, heads, rows // seq_q, seq_q, tokens)
        scores = grouped.masked_fill_(~keep, float("-inf")).view(batch, heads, rows, tokens)
    return softmax(scores, may_be_empty=False)[0]  # every query sees at least its own key


# ---- NSNQuant -------------------------------------------------------------------------------------

def _slot_index(codes: NSNCodes, book_size: int) -> torch.Tensor:
    """``(B, H, T, slots)`` int64: each code's entry in a row of ``slots * K`` table entries
    (slot ``j``'s code ``k`` at ``j * K + k``)."""
    indices = codes.indices()  # a fresh int64 tensor: add in place (uint8 + int64 with type
    offsets = torch.arange(indices.shape[-1], device=indices.device) * book_size  # promotion ran ~10x slower)
    return indices.add_(offsets)


@functools.lru_cache(maxsize=16)
def _hadamard(dim: int, device: torch.device) -> torch.Tensor:
    """``fwht``'s matrix, float32: a handful of query rows are rotated by one small matmul
    (``fwht``'s butterflies cost a dozen torch calls whatever the size)."""
    return hadamard_matrix(dim).to(device)


def _rotate_rows(rows: torch.Tensor) -> torch.Tensor:
    """``fwht(rows)`` for the few float32 rows of one decode step (symmetric: its own inverse)."""
    return rows @ _hadamard(rows.shape[-1], rows.device)


def _scales(codes: NSNCodes) -> torch.Tensor:
    """``(B, H, T, 2)`` float32: each token's ``(a, b)`` (``NSNCodes.token_scales``). While every
    chunk holds ``chunk`` tokens, the scale grid broadcasts over each chunk's tokens (no gather)."""
    if codes.counts is not None:
        return torch.stack(codes.token_scales(), dim=-1)
    batch, heads, chunks = codes.grid.shape[:3]
    grid = codes.grid[:, :, :, None]  # (B, H, C, 1, 2, 2)
    scales = codes.scales.view(batch, heads, chunks, codes.chunk, 2)
    return log_decode(scales, grid[..., 0], grid[..., 1]).view(batch, heads, -1, 2)


def _per_token(per_chunk: torch.Tensor, codes: NSNCodes) -> torch.Tensor:
    """``(B, H, R, C)`` -> ``(B, H, R, T)``: each token gets its chunk's value."""
    batch, heads, num_rows, _chunks = per_chunk.shape
    if codes.counts is None:
        return per_chunk[..., None].expand(-1, -1, -1, -1, codes.chunk).reshape(batch, heads, num_rows, -1)
    ids = codes.chunk_ids()
    return per_chunk.gather(3, ids[:, :, None, :].expand(batch, heads, num_rows, ids.shape[-1]))


def _chunk_sums(per_token: torch.Tensor, codes: NSNCodes) -> torch.Tensor:
    """``(B, H, R, T)`` -> ``(B, H, R, C)``: the sum over each chunk's tokens."""
    batch, heads, num_rows, tokens = per_token.shape
    chunks = codes.shift.shape[2]
    if codes.counts is None:
        return per_token.view(batch, heads, num_rows, chunks, codes.chunk).sum(-1)
    ids = codes.chunk_ids()
    sums = per_token.new_zeros(batch, heads, num_rows, chunks)
    return sums.scatter_add_(3, ids[:, :, None, :].expand(batch, heads, num_rows, tokens), per_token)


def nsn_lookup_table(rows: torch.Tensor, codes: NSNCodes) -> torch.Tensor:
    """``(B, H_kv, R, slots, K)`` float32: each query row's rotated sub-vectors dotted with the
    codebook; slots are stage-major (stage 2's entries times ``beta``), as the codes are."""
    book = codebook(codes.vector_dim)
    batch, heads, num_rows, dim = rows.shape
    subs = dim // codes.vector_dim
    table = _rotate_rows(rows).view(batch, heads, num_rows, subs, codes.vector_dim) @ book.vectors.to(rows.device).T
    return torch.cat([table, book.beta * table], dim=3) if codes.stages == 2 else table


def nsn_code_scores(rows: torch.Tensor, codes: NSNCodes) -> torch.Tensor:
    """Raw dot products ``(B, H_kv, R, T)`` of query rows ``(B, H_kv, R, D)`` float32 with
    every coded token, from per-query lookup tables.

    One ``gather`` reads every (row, token, slot) entry from the row's table (an expanded view:
    no copy of the table per token) and a sum over slots adds them: on CPU, faster than
    ``embedding_bag`` over a table with the rows innermost (docs/kv.md, "Speed on CPU")."""
    batch, heads, num_rows, _dim = rows.shape
    tokens = codes.tokens()
    table = nsn_lookup_table(rows, codes)
    size = table.shape[-1]
    table = table.reshape(batch, heads, num_rows, 1, -1)
    index = _slot_index(codes, size)  # (B, H, T, slots)
    dots = table.expand(-1, -1, -1, tokens, -1).gather(
        4, index[:, :, None].expand(-1, -1, num_rows, -1, -1)).sum(-1)  # (B, H, R, T)
    scales = _scales(codes)
    shifts = _per_token(rows @ codes.shift_values().transpose(2, 3), codes)  # <q, mu> of each token's chunk
    return scales[:, :, None, :, 0] * dots + scales[:, :, None, :, 1] * shifts


def nsn_code_values(weights: torch.Tensor, codes: NSNCodes) -> torch.Tensor:
    """``sum_t weights[..., t] * x_hat_t``: ``(B, H_kv, R, D)`` float32 from attention weights
    ``(B, H_kv, R, T)`` over the coded tokens, through a histogram over (slot, code).

    The histogram is one ``scatter_add_`` along each row's last dim: on CPU, several times faster
    than ``index_add_`` into a table with the rows innermost (docs/kv.md, "Speed on CPU")."""
    book = codebook(codes.vector_dim)
    vectors = book.vectors.to(weights.device)
    batch, heads, num_rows, tokens = weights.shape
    dim = codes.shift.shape[-1]
    subs = dim // codes.vector_dim
    scales = _scales(codes)
    index = _slot_index(codes, book.size)  # (B, H, T, slots)
    slots = index.shape[-1]
    per_token = (weights * scales[:, :, None, :, 0])[..., None].expand(-1, -1, -1, -1, slots)  # (B, H, R, T, slots)
    hist = weights.new_zeros(batch, heads, num_rows, slots * book.size)
    hist.scatter_add_(3, index.view(batch, heads, 1, tokens * slots).expand(-1, -1, num_rows, -1),
                      per_token.reshape(batch, heads, num_rows, tokens * slots))
    hist = hist.view(batch, heads, num_rows, codes.stages, subs, book.size)
    hist = hist[:, :, :, 0] + book.beta * hist[:, :, :, 1] if codes.stages == 2 else hist[:, :, :, 0]
    out = _rotate_rows((hist @ vectors).reshape(batch, heads, num_rows, dim))  # (B, H, R, subs, vd) -> D
    chunk_weights = _chunk_sums(weights * scales[:, :, None, :, 1], codes)  # (B, H, R, C)
    return out + chunk_weights @ codes.shift_values()


def nsn_attend(store: NSNStore, query: torch.Tensor, scale: float, *, softcap: float | None = None,
               return_mass: bool = False, backend: str = "auto"):
    """Attention of ``query (B, H, Sq, D)`` over every token of ``store`` (codes and window);
    ``backend="triton"`` runs the coded part in ``kernels/triton/decode_codes.py``, exact keys'
    residuals (``kv/exact_keys.py``) as a score bias computed apart; not with ``return_mass``,
    which the torch path computes, nor yet with protected tokens, whose value residuals need the
    weights of those tokens (``kv/protected.py``: the torch path adds both corrections). On CPU the coded part runs ``native``'s
    fused loops where they build (8-dim sub-vectors, at most ``native.MAX_ROWS`` query rows a
    head group), else torch ops; both give the same result."""
    window_k = store.key_window
    if window_k is None:
        raise ValueError("nsn_attend: the store is empty")
    _batch, kv_heads, _, dim = window_k.shape
    held = len(store)
    _check_query(query, kv_heads, dim, held, "nsn_attend")
    heads, seq_q = query.shape[1], query.shape[2]
    chosen = resolve_backend(backend, query, op="nsn_attend")
    rows = _rows(query, kv_heads)
    codes_k = store.key_codes
    if chosen == "triton" and codes_k is not None and not return_mass and store.protected is None:
        return _unrows(_nsn_attend_triton(rows, store, scale, softcap, seq_q), heads, seq_q, query.dtype)
    if codes_k is not None and codes_k.vector_dim == 8 and native.usable(rows, rows=rows.shape[2]):
        out, probs = _nsn_attend_native(rows, store, scale, softcap, seq_q)
    else:
        out, probs = _nsn_attend_torch(rows, store, scale, softcap, seq_q)
    out = _unrows(out, heads, seq_q, query.dtype)
    return (out, probs.sum(2)) if return_mass else out


def _nsn_attend_torch(rows, store, scale, softcap, seq_q):
    """``(out (B, H_kv, R, D), probs (B, H_kv, R, T))`` float32, through torch ops."""
    window_k, window_v = store.key_window, store.value_window
    codes_k, codes_v = store.key_codes, store.value_codes
    parts = []
    if codes_k is not None:
        parts.append(nsn_code_scores(rows, codes_k))
    parts.append(rows @ window_k.float().transpose(2, 3))
    scores = torch.cat(parts, dim=-1)
    _correct_scores(store, rows, scores)
    probs = _softmax(scores, scale, softcap, seq_q)
    coded = store.coded_tokens()
    out = probs[..., coded:] @ window_v.float()
    if coded:
        out = out + nsn_code_values(probs[..., :coded], codes_v)
    if store.protected is not None:
        out += store.protected.value_correction(probs)
    return out, probs


def _correct_scores(store, rows, scores):
    """Add the residuals' share of the raw scores: protected tokens, then exact keys."""
    if store.protected is not None:
        store.protected.correct_scores(rows, scores)
    if store.exact_keys is not None:
        store.exact_keys.correct_scores(rows, scores)


def _native_codes(codes: NSNCodes, flat: int) -> tuple:
    """``codes``' tensors as ``native`` takes them: ``(codes, scales, grid, counts)`` with
    batch and heads flattened."""
    tokens, chunks = codes.tokens(), codes.shift.shape[2]
    counts = None if codes.counts is None else codes.counts.reshape(flat, chunks).contiguous()
    return (codes.codes.reshape(flat, tokens, -1).contiguous(), codes.scales.reshape(flat, tokens, 2).contiguous(),
            codes.grid.reshape(flat, chunks, 4).contiguous(), counts)


def code_scores(rows: torch.Tensor, codes: NSNCodes) -> torch.Tensor:
    """``(B, H_kv, R, T)`` float32: each row of ``rows (B, H_kv, R, D)`` dotted with each coded
    token, through ``native``'s loop where it applies (CPU, 8-dim sub-vectors), else
    ``nsn_code_scores``; the same result either way."""
    batch, heads, num_rows, _ = rows.shape
    if codes.vector_dim != 8 or not native.usable(rows, rows=num_rows):
        return nsn_code_scores(rows, codes)
    out = rows.new_empty(batch, heads, num_rows, codes.tokens())
    _native_scores_into(rows, codes, out.view(batch * heads, num_rows, -1))
    return out


def _native_scores_into(rows: torch.Tensor, codes: NSNCodes, out: torch.Tensor) -> None:
    """``native.nsn_scores`` of ``rows (B, H, R, D)`` over ``codes`` into ``out (B * H, R, T)``."""
    batch, heads, num_rows, dim = rows.shape
    flat = batch * heads
    book = codebook(codes.vector_dim)
    qmu = rows @ codes.shift_values().transpose(2, 3)  # (B, H, R, C): <q, mu> per chunk
    native.nsn_scores(_rotate_rows(rows).reshape(flat, num_rows, dim), book.vectors.to(rows.device).contiguous(),
                      *_native_codes(codes, flat), codes.chunk, qmu.reshape(flat, num_rows, -1), book.beta, out)


def _nsn_attend_native(rows, store, scale, softcap, seq_q):
    """``_nsn_attend_torch``'s result through ``native``'s fused loops: one pass over the
    key codes (table lookups, token scales and chunk shifts folded in), one over the value
    codes (weights times codebook vectors)."""
    codes_k, codes_v = store.key_codes, store.value_codes
    window_k, window_v = store.key_window, store.value_window
    batch, heads, num_rows, dim = rows.shape
    coded, flat = codes_k.tokens(), batch * heads
    book = codebook(codes_k.vector_dim)
    vectors = book.vectors.to(rows.device).contiguous()
    chunks = codes_k.shift.shape[2]
    scores = rows.new_empty(batch, heads, num_rows, coded + window_k.shape[2])
    _native_scores_into(rows, codes_k, scores.view(flat, num_rows, -1)[:, :, :coded])
    scores[..., coded:] = rows @ window_k.float().transpose(2, 3)
    _correct_scores(store, rows, scores)
    probs = _softmax(scores, scale, softcap, seq_q)
    out = probs[..., coded:] @ window_v.float()
    acc, chunk_weights = native.nsn_values(probs.view(flat, num_rows, -1)[:, :, :coded], *_native_codes(codes_v, flat),
                                           codes_v.chunk, vectors, book.beta, codes_v.stages)
    out += _rotate_rows(acc.view(batch, heads, num_rows, dim))
    out += chunk_weights.view(batch, heads, num_rows, chunks) @ codes_v.shift_values()
    if store.protected is not None:
        out += store.protected.value_correction(probs)
    return out, probs


def _nsn_attend_triton(rows, store, scale, softcap, seq_q):
    """Coded part in the Triton kernel, window part in torch, merged by log-sum-exp."""
    from ..kernels.triton.decode_codes import nsn_decode_codes

    codes_k, codes_v = store.key_codes, store.value_codes
    book = codebook(codes_k.vector_dim)
    held = len(store)
    batch, heads, num_rows, _ = rows.shape
    table = nsn_lookup_table(rows, codes_k).reshape(batch, heads, num_rows, -1)
    qmu = rows @ codes_k.shift_values().transpose(2, 3)
    key_idx, value_idx = codes_k.codes, codes_v.codes
    if codes_k.vector_dim != 8:  # the kernel reads one index a byte
        key_idx, value_idx = codes_k.indices().to(torch.uint8), codes_v.indices().to(torch.uint8)
    bias = None
    if store.exact_keys is not None:  # q . r of the chosen rows (zeros elsewhere), added to the raw scores
        bias = rows.new_zeros(batch, heads, num_rows, codes_k.tokens())
        store.exact_keys.correct_scores(rows, bias)
    coded_out, coded_lse = nsn_decode_codes(
        table, qmu, key_idx, codes_k.scales, codes_k.grid, value_idx, codes_v.scales, codes_v.grid,
        codes_v.shift_values(), codes_k.chunk_ids(), book.vectors.to(rows.device), book.beta,
        stages=codes_k.stages, scale=scale, softcap=softcap, first_query=held - seq_q, seq_q=seq_q, bias=bias)
    coded_out = fwht(coded_out[0]) + coded_out[1]
    window_out, window_lse = _dense_partial(rows, store.key_window, store.value_window, scale, softcap, seq_q)
    top = torch.maximum(coded_lse, window_lse)
    wc, ww = torch.exp(coded_lse - top), torch.exp(window_lse - top)
    return (coded_out * wc[..., None] + window_out * ww[..., None]) / (wc + ww)[..., None]


def _dense_partial(rows, keys, values, scale, softcap, seq_q):
    """Attention of rows over the full-precision keys that end the store: ``(out, lse)``, rows
    that see none of them getting zeros and ``-inf`` (``kernels/scores.py``'s convention)."""
    batch, heads, num_rows, dim = rows.shape
    queries = rows.view(batch, heads * (num_rows // seq_q), seq_q, dim)  # the query heads back
    result = softmax_attention(queries, keys, values, scale=scale, softcap=softcap, causal=True, need_lse=True)
    return result.out.view(batch, heads, num_rows, -1), result.lse.view(batch, heads, num_rows)


# ---- KIVI -----------------------------------------------------------------------------------------

def kivi_attend(store: KIVIStore, query: torch.Tensor, scale: float, *, softcap: float | None = None,
                return_mass: bool = False):
    """Attention of ``query (B, H, Sq, D)`` over every token of a ``KIVIStore``: key codes
    times the query with the per-channel scales folded in, value codes times the attention
    weights with the per-token scales folded in (no dequantized copy of the cache)."""
    if store.key_residual is None:
        raise ValueError("kivi_attend: the store is empty")
    _batch, kv_heads, _, dim = store.key_residual.shape
    held = len(store)
    _check_query(query, kv_heads, dim, held, "kivi_attend")
    heads, seq_q = query.shape[1], query.shape[2]
    rows = _rows(query, kv_heads)
    if store.key_blocks and _kivi_native_fits(store, rows):
        out, probs = _kivi_attend_native(rows, store, scale, softcap, seq_q)
    else:
        out, probs = _kivi_attend_torch(rows, store, scale, softcap, seq_q)
    out = _unrows(out, heads, seq_q, query.dtype)
    return (out, probs.sum(2)) if return_mass else out


def _kivi_attend_torch(rows, store, scale, softcap, seq_q):
    """``(out (B, H_kv, R, D), probs (B, H_kv, R, T))`` float32, through torch ops."""
    parts = [_kivi_key_scores(rows, block) for block in store.key_blocks]
    parts.append(rows @ store.key_residual.float().transpose(2, 3))
    probs = _softmax(torch.cat(parts, dim=-1), scale, softcap, seq_q)
    out = torch.zeros_like(rows)
    start = 0
    for block in store.value_blocks:
        out += _kivi_values(probs[..., start:start + block.tokens()], block)
        start += block.tokens()
    out += probs[..., start:] @ store.value_residual.float()
    return out, probs


def _kivi_native_fits(store: KIVIStore, rows: torch.Tensor) -> bool:
    """The native loops take 1/2/4/8-bit codes, head dims a multiple of 8 up to ``MAX_DIM`` and
    value groups a multiple of 8."""
    config, dim = store.config, rows.shape[-1]
    return (config.bits in (1, 2, 4, 8) and dim % 8 == 0 and dim <= native.MAX_DIM and config.group % 8 == 0
            and native.usable(rows, rows=rows.shape[2]))


def _kivi_attend_native(rows, store, scale, softcap, seq_q):
    """``_kivi_attend_torch``'s result through ``native``'s fused loops: each block's codes
    are read once, unpacked into registers (no float copy of a block)."""
    batch, heads, num_rows, dim = rows.shape
    flat = batch * heads
    scores = rows.new_empty(batch, heads, num_rows, len(store))
    flat_scores = scores.view(flat, num_rows, -1)
    flat_rows = rows.reshape(flat, num_rows, dim)
    start = 0
    for block in store.key_blocks:
        tokens = block.tokens()
        native.kivi_key_scores(flat_rows, block.codes.reshape(flat, tokens, -1).contiguous(),
                               block.scale.float().reshape(flat, tokens // block.group, dim).contiguous(),
                               block.minimum.float().reshape(flat, tokens // block.group, dim).contiguous(),
                               block.bits, block.group, flat_scores[:, :, start:start + tokens])
        start += tokens
    scores[..., start:] = rows @ store.key_residual.float().transpose(2, 3)
    probs = _softmax(scores, scale, softcap, seq_q)
    flat_probs = probs.view(flat, num_rows, -1)
    out = rows.new_zeros(flat, num_rows, dim)
    start = 0
    for block in store.value_blocks:
        tokens = block.tokens()
        native.kivi_values(flat_probs[:, :, start:start + tokens], block.codes.reshape(flat, tokens, -1).contiguous(),
                           block.scale.float().reshape(flat, tokens, dim // block.group).contiguous(),
                           block.minimum.float().reshape(flat, tokens, dim // block.group).contiguous(),
                           block.bits, block.group, out)
        start += tokens
    out = out.view(batch, heads, num_rows, dim)
    out += probs[..., start:] @ store.value_residual.float()
    return out, probs


def _kivi_key_scores(rows: torch.Tensor, block) -> torch.Tensor:
    """``(B, H, R, Tb)`` dot products with one key block (per channel, ``group`` tokens a scale)."""
    batch, heads, num_rows, dim = rows.shape
    codes = unpack(block.codes, block.bits).float()  # (B, H, Tb, D)
    groups = codes.shape[2] // block.group
    folded = rows[:, :, :, None, :] * block.scale.float()[:, :, None]  # (B, H, R, groups, D)
    dots = torch.einsum("bhrnd,bhngd->bhrng", folded, codes.view(batch, heads, groups, block.group, dim))
    offsets = rows @ block.minimum.float().transpose(2, 3)  # (B, H, R, groups)
    return (dots + offsets[..., None]).reshape(batch, heads, num_rows, -1)


def _kivi_values(weights: torch.Tensor, block) -> torch.Tensor:
    """``(B, H, R, D)``: weights ``(B, H, R, Tb)`` times one value block (per token, ``group``
    channels a scale)."""
    batch, heads, num_rows, tokens = weights.shape
    codes = unpack(block.codes, block.bits).float()  # (B, H, Tb, D)
    dim = codes.shape[-1]
    groups = dim // block.group
    folded = weights[..., None] * block.scale.float()[:, :, None]  # (B, H, R, Tb, groups)
    out = torch.einsum("bhrtn,bhtnc->bhrnc", folded, codes.view(batch, heads, tokens, groups, block.group))
    offsets = weights @ block.minimum.float()  # (B, H, R, groups)
    return (out + offsets[..., None]).reshape(batch, heads, num_rows, dim)


def dense_attend(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor, scale: float, *,
                 softcap: float | None = None, return_mass: bool = False):
    """The same attention over full-precision ``keys``/``values (B, H_kv, T, D)`` through
    ``kernels.scores.softmax_attention``: the dequantize-then-attend reference the code paths
    are checked against."""
    result = softmax_attention(query, keys, values, scale=scale, softcap=softcap, causal=True, need_mass=return_mass)
    out = result.out.transpose(1, 2).to(query.dtype)
    return (out, result.mass) if return_mass else out
