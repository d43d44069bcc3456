"""Protected tokens: the few coded tokens a policy ranks highest, kept near-exact.

Mixed precision by importance (the idea of MiKV and ZipCache): an eviction policy's ranking says
which tokens matter most, and 2-bit codes lose part of each token. A quantizer store with
``protect=f`` keeps, for the best-ranked fraction ``f`` of the tokens it codes with a priority,
the coding error ``x - x_hat`` as a 16-bit *residual* (the window's dtype, bfloat16 for float32
windows). The token then reads back as ``x_hat + residual``, within 16-bit rounding of the
residual (a few 1e-4 of the token at 2 bits), while every other token stays at its code.

Attention over codes adds the residuals as a sparse correction, so nothing is dequantized:
``q . k = q . k_hat + q . r_k`` for the scores of the protected tokens (before the softmax) and
``sum_t p_t v_t = sum_t p_t v_hat_t + sum_protected p_t r_v`` for the output.

``ProtectedTokens`` holds one layer's ``(B, H, P)`` entries: ``index`` (int32, the coded token
each belongs to) and the key and value residuals ``(B, H, P, D)``. Every row holds ``P``
entries; a row with fewer real ones pads with index 0 and zero residuals (adding zero changes
nothing, so padding needs no mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ranking import top_indices


def residual_dtype(dtype: torch.dtype) -> torch.dtype:
    """The residuals' dtype for keys/values of ``dtype``: 16-bit, bfloat16 for float32 (its
    range is float32's, so no residual overflows)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


def count(fraction: float, tokens: int) -> int:
    """How many of ``tokens`` coded at once are protected: ``fraction`` of them, rounded, at
    least one when ``fraction > 0``."""
    return max(1, round(fraction * tokens)) if fraction > 0 and tokens else 0


@dataclass
class ProtectedTokens:
    """See the module docstring. ``index (B, H, P)`` int32, ``keys``/``values (B, H, P, D)``."""

    index: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def choose(cls, priority: torch.Tensor, fraction: float, keys: torch.Tensor, values: torch.Tensor,
               decoded_keys: torch.Tensor, decoded_values: torch.Tensor) -> ProtectedTokens | None:
        """Entries for the best ``fraction`` of ``priority (B, H, n)`` per row (``-inf``: never
        protected) among ``n`` just-coded tokens: ``keys``/``values`` as given and as decoded,
        all ``(B, H, n, D)``. None when no row has a token with a priority."""
        finite = priority > float("-inf")
        if not bool(finite.any()):
            return None
        take = count(fraction, int(finite.sum(-1).max()))  # a fraction of the ranked tokens
        # (B, H, P); ties to the earlier token on any device (topk breaks them differently on
        # CPU and CUDA, and pooled scores, KVzip(kernel=k), tie often)
        best = top_indices(priority, take)
        real = finite.gather(2, best)
        index = torch.where(real, best, torch.zeros_like(best))
        pick = index[..., None].expand(*index.shape, keys.shape[-1])
        dtype = residual_dtype(keys.dtype)

        def residual(exact, decoded):
            error = exact.gather(2, pick).float() - decoded.gather(2, pick).float()
            return error.masked_fill_(~real[..., None], 0.0).to(dtype)

        return cls(index.to(torch.int32), residual(keys, decoded_keys), residual(values, decoded_values))

    def tokens(self) -> int:
        return self.index.shape[-1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.keys, self.values))

    def real(self) -> torch.Tensor:
        """``(B, H, P)`` bool: the entries that are not padding."""
        return self.keys.ne(0).any(-1) | self.values.ne(0).any(-1)

    def mask(self, tokens: int) -> torch.Tensor:
        """``(B, H, tokens)`` bool: the coded tokens that have an entry (padding excluded)."""
        out = torch.zeros(*self.index.shape[:2], tokens, dtype=torch.int8, device=self.index.device)
        return out.scatter_reduce_(2, self.index.long(), self.real().to(torch.int8), "amax").bool()

    def cat(self, other: ProtectedTokens) -> ProtectedTokens:
        """These entries, then ``other``'s."""
        return ProtectedTokens(torch.cat([self.index, other.index], dim=2),
                               torch.cat([self.keys, other.keys], dim=2), torch.cat([self.values, other.values], dim=2))

    def select_batch(self, index: torch.Tensor) -> None:
        self.index, self.keys, self.values = (t.index_select(0, index) for t in (self.index, self.keys, self.values))

    def select_tokens(self, kept: torch.Tensor) -> ProtectedTokens | None:
        """The entries of the coded tokens ``kept (B, H, n)`` (sorted per row) that stay coded,
        renumbered to their new places; None when none stays."""
        if not kept.shape[-1]:
            return None
        position = torch.searchsorted(kept.contiguous(), self.index.long()).clamp_(max=kept.shape[-1] - 1)
        stays = kept.gather(2, position) == self.index.long()
        stays &= self.real()  # padding goes
        width = int(stays.sum(-1).max())
        if not width:
            return None
        # each row's staying entries first (a stable sort keeps their order), then as many
        # columns as the row that keeps the most: rows do not carry each other's dropped entries
        order = stays.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :width]
        stays = stays.gather(2, order)
        dims = order[..., None].expand(*order.shape, self.keys.shape[-1])
        keep = stays[..., None]
        return ProtectedTokens(torch.where(stays, position.gather(2, order), 0).to(torch.int32),
                               self.keys.gather(2, dims) * keep, self.values.gather(2, dims) * keep)

    def add_to(self, decoded: torch.Tensor, which: str) -> None:
        """Add the key (``which="keys"``) or value residuals into ``decoded (B, H, T, D)``, the
        coded tokens dequantized, in place."""
        residuals = self.keys if which == "keys" else self.values
        index = self.index.long()[..., None].expand(*self.index.shape, decoded.shape[-1])
        decoded.scatter_add_(2, index, residuals.to(decoded.dtype))

    def correct_scores(self, rows: torch.Tensor, scores: torch.Tensor) -> None:
        """Add ``rows (B, H, R, D) . r_k`` to the protected tokens' raw dot products in
        ``scores (B, H, R, >= T)`` (the coded tokens first), in place, before the softmax."""
        extra = rows @ self.keys.float().transpose(2, 3)  # (B, H, R, P)
        index = self.index.long()[:, :, None].expand(-1, -1, rows.shape[2], -1)
        scores.scatter_add_(3, index, extra)

    def value_correction(self, probs: torch.Tensor) -> torch.Tensor:
        """``sum_protected p_t r_v``: ``(B, H, R, D)`` float32 from the probabilities ``(B, H, R,
        >= T)`` (the coded tokens first)."""
        index = self.index.long()[:, :, None].expand(-1, -1, probs.shape[2], -1)
        return probs.gather(3, index) @ self.values.float()
