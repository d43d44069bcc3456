"""Small fused ops for the decode path: fewer, larger torch calls where ``torch.compile`` is not used.

On CPU a one-token decode step of a small model is bound by per-op dispatch, not arithmetic:
every op saved per layer is saved 30 times per token on a 30-layer model. Under
``torch.compile`` Inductor fuses the same math into a few loops, so these functions are written
as plain torch code that both the eager path and the compiler read well.

- ``add_rms_norm``: the residual add and the next RMSNorm in one call (Llama order: statistics
  in float32, cast back, then scale by the weight).
- ``rope_qk``: rotary embedding applied to the query and key heads of one tensor at once (the
  merged q/k/v projection's output), using a roll and a sign-folded sine table.
- ``swiglu``: ``silu(gate) * up`` on the merged gate/up projection's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rms_norm(x + residual) * weight, x + residual)``; ``residual=None`` skips the add."""
    hidden = x if residual is None else x + residual
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps).to(hidden.dtype)
    return normed * weight, hidden


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, signed_sin)`` for ``rope_qk`` from a model's ``(..., D)`` cos/sin tables, where
    ``signed_sin`` has the first half negated: ``rotate_half(x) * sin == roll(x, D/2) * signed_sin``."""
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope_qk(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on every head of ``x (B, S, H, D)`` (query and key heads together).

    ``cos`` and ``signed_sin`` are ``(B or 1, S, 1, D)`` (from ``rope_tables``). Equal to
    transformers' ``x * cos + rotate_half(x) * sin`` with half-split (non-interleaved) rotation."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up (..., 2 * I)`` holds gate then up (one merged matmul)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
