"""Exact keys on the sharpest heads: full-precision keys for a few (batch row, KV head) rows.

On SmolLM2 with KVzip (global) at 75% removed and NSNQuant-2, a few heads carry an outsized share
of what the 2-bit codes cost a pass-key answer, and the one whose attention over the prompt is the
sharpest (lowest entropy) is the same on every prompt tried, with the question in the prompt or
after it (layer 18's third KV head): a sharp head's softmax turns a small error in a key's score
into a large change of its weight. Its keys exact take back about a fifth of the codes' cost on
~1000-token prompts and raise the keys found at 4k from 5 to 7 of 8 (question in the prompt;
docs/kv.md, "Exact keys on the sharpest heads", has the records and what did not move).

``ExactKeys`` holds, for the chosen rows of one quantizer store, the coding error ``k - k_hat``
of every coded key as a 16-bit residual (bfloat16 for float32 keys, as ``kv/protected.py``), so
those keys read back within 16-bit rounding of exact. Attention over codes adds ``q . r`` to the
scores of those rows before the softmax; values stay at their codes.

Rows are a ``(B, H)`` bool mask; the residuals ``(R, T, D)`` are the chosen rows' in row-major
order (``R`` = chosen rows, ``T`` = coded tokens), so rows that are not chosen cost nothing.

``coder``: an ``NSNQuant`` to code the residuals again (``NSNQuant(key_residual="codes")``): the
residual is held as NSNQuant codes ``(R, 1, T, D)`` of the store's settings at
``key_residual_bits`` (default the store's bits), so a chosen key costs two codes (3 or 4 bits
an element at 2 bits) instead of 16 bits, and reads back at the second code's error of the
first one's error. With every row chosen (``key_heads="all"``) ``every_row`` lets the scores be
corrected through views, without gathering rows.
"""

from __future__ import annotations

import copy

import torch

from .protected import residual_dtype


class ExactKeys:
    """See the module docstring. ``rows (B, H)`` bool; ``keys``: the residuals, ``(R, T, D)``
    16-bit, or with a ``coder`` their ``NSNCodes`` ``(R, 1, T, D)``."""

    def __init__(self, rows: torch.Tensor, keys, coder=None, every_row: bool | None = None):
        self.rows, self.keys, self.coder = rows, keys, coder
        # every row chosen (key_heads="all"): scores are corrected without gathering the rows
        self.every_row = bool(rows.all()) if every_row is None else every_row

    @classmethod
    def of(cls, rows: torch.Tensor, exact: torch.Tensor, decoded: torch.Tensor, coder=None) -> ExactKeys | None:
        """Residuals of ``rows (B, H)`` from keys ``exact`` and their codes ``decoded``, both
        ``(B, H, n, D)``; None when no row is chosen."""
        if not bool(rows.any()):
            return None
        return cls(rows, _residuals(rows, exact, decoded, coder), coder)

    def extend(self, exact: torch.Tensor, decoded: torch.Tensor) -> ExactKeys:
        """These residuals, then those of ``n`` newly coded tokens (``(B, H, n, D)`` each)."""
        new = _residuals(self.rows, exact, decoded, self.coder)
        keys = torch.cat([self.keys, new], dim=1) if self.coder is None else self.keys.cat(new)
        return ExactKeys(self.rows, keys, self.coder, self.every_row)

    def restrict(self, rows: torch.Tensor) -> ExactKeys | None:
        """Only the rows also in ``rows (B, H)``; None when none is left."""
        rows = rows & self.rows
        if not bool(rows.any()):
            return None
        return ExactKeys(rows, self._take_rows(rows[self.rows].nonzero().squeeze(1)), self.coder)

    def _take_rows(self, index: torch.Tensor):
        if self.coder is None:
            return self.keys.index_select(0, index)
        taken = copy.copy(self.keys)
        taken.select_batch(index)
        return taken

    def tokens(self) -> int:
        return self.keys.shape[1] if self.coder is None else self.keys.tokens()

    def nbytes(self) -> int:
        held = self.keys.numel() * self.keys.element_size() if self.coder is None else self.keys.nbytes()
        return held + self.rows.numel() * self.rows.element_size()

    def residuals(self) -> torch.Tensor:
        """``(R, T, D)`` float32: the residuals as they read back."""
        if self.coder is None:
            return self.keys.float()
        from .nsnquant import dequantize  # nsnquant imports this module

        return dequantize(self.keys, torch.float32)[:, 0]

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (a row may repeat: its residuals are copied)."""
        slot = torch.full(self.rows.shape, -1, dtype=torch.int64, device=self.rows.device)
        slot[self.rows] = torch.arange(int(self.rows.sum()), device=self.rows.device)
        self.rows = self.rows.index_select(0, index)
        self.keys = self._take_rows(slot.index_select(0, index)[self.rows])

    def select_tokens(self, kept: torch.Tensor) -> None:
        """Keep the coded tokens ``kept (B, H, n)`` (int64, sorted per row) of every row."""
        index = kept[self.rows]  # (R, n)
        if self.coder is None:
            self.keys = self.keys.gather(1, index[..., None].expand(*index.shape, self.keys.shape[-1]))
        else:
            self.keys = self.keys.select_tokens(index[:, None])

    def add_to(self, decoded: torch.Tensor) -> None:
        """Add the residuals into ``decoded (B, H, T, D)``, the coded keys dequantized, in place."""
        decoded[self.rows] += self.residuals().to(decoded.dtype)

    def correct_scores(self, queries: torch.Tensor, scores: torch.Tensor) -> None:
        """Add ``queries (B, H, Rq, D) . r`` to the raw dot products ``scores (B, H, Rq, >= T)``
        (the coded tokens first) of the chosen rows, in place, before the softmax."""
        if self.every_row:
            chosen = queries.float().reshape(-1, *queries.shape[2:])  # (B * H, Rq, D), row-major as the residuals
        else:
            batch, head = self.rows.nonzero(as_tuple=True)
            chosen = queries[batch, head].float()  # (R, Rq, D)
        if self.coder is None:
            extra = chosen @ self.residuals().transpose(1, 2)  # (R, Rq, T)
        else:  # from the codes' lookup tables, as the first code's scores: nothing dequantized
            from .codes_attention import code_scores

            extra = code_scores(chosen[:, None].contiguous(), self.keys)[:, 0]
        if self.every_row:
            scores[..., : self.tokens()] += extra.view(*scores.shape[:3], -1)
        else:
            scores[batch, head, :, : self.tokens()] += extra


def _residuals(rows: torch.Tensor, exact: torch.Tensor, decoded: torch.Tensor, coder=None):
    error = exact[rows].float() - decoded[rows].float()  # (R, n, D)
    if coder is None:
        return error.to(residual_dtype(exact.dtype))
    from .nsnquant import quantize  # nsnquant imports this module

    return quantize(error[:, None], coder)


def head_entropy(query: torch.Tensor, keys: torch.Tensor, scale: float, *, window: int = 32,
                 key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H_kv)`` float32: the mean entropy (nats) of the attention of the last ``window``
    queries of ``query (B, H, Sq, D)`` over ``keys (B, H_kv, S, D)`` (the queries are the last
    ``Sq`` keys; causal), over those queries and the query heads of each KV head. Lower is
    sharper. ``key_valid (B, S)``: False at padding."""
    from ..kernels.scores import SCORE_ELEMS, softmax_attention

    batch, heads, seq_q = query.shape[:3]
    seq_k, window = keys.shape[2], min(window, seq_q)
    step = max(1, SCORE_ELEMS // max(1, batch * heads * seq_k))  # probabilities within the scores' bound
    total = query.new_zeros(batch, heads, dtype=torch.float32)
    for end in range(seq_q, seq_q - window, -step):  # query chunks, newest first
        start = max(seq_q - window, end - step)
        # the chunk's queries are the last ones of the keys up to its last query (bottom-right)
        visible = seq_k - (seq_q - end)
        probs = softmax_attention(query[:, :, start:end], keys[:, :, :visible], scale=scale, causal=True,
                                  key_valid=None if key_valid is None else key_valid[:, :visible],
                                  need_out=False, need_probs=True).probs  # (B, H, chunk, visible)
        total += -(probs * probs.clamp_min(1e-30).log()).sum(-1).sum(-1)
    return (total / window).view(batch, keys.shape[1], -1).mean(-1)
