"""Error-compensating rounding (GPTQ, Frantar et al. 2022) for a fixed scale grid.

Rounding weight column j moves the layer's output by ``x_j * (w_j - q_j)``; GPTQ cancels that,
as far as the calibration inputs allow, by adjusting the columns not yet rounded, using the
inverse Hessian ``H = X^T X`` of the layer's inputs. The scales stay those of plain
round-to-nearest (after effllm's per-group scale search), so the result is stored in the same
format and read by the same kernels; only which code each weight gets changes.

``accumulate_hessians`` gathers ``H`` per linear with forward hooks in one pass over the
calibration batches (``K * K`` float32 per module: 9 MB for K = 1536); ``gptq_round`` runs the
column loop in blocks of 128 with the lazy batch update of the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .calibration import feed_inputs

_BLOCK = 128


@torch.no_grad()
def accumulate_hessians(model: nn.Module, modules: dict[str, nn.Linear], batches: Iterable) -> dict[str, torch.Tensor]:
    """``{name: H (K, K) float32}``, the mean of ``x^T x`` over every input row."""
    hessians = {name: torch.zeros(mod.in_features, mod.in_features) for name, mod in modules.items()}
    rows = dict.fromkeys(modules, 0)

    def record(name, x):
        x = x.cpu()
        hessians[name].addmm_(x.t(), x)
        rows[name] += x.shape[0]

    feed_inputs(model, modules, batches, record)
    return {name: hessians[name] / rows[name] for name in modules}


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, round_column: Callable[[torch.Tensor, int], torch.Tensor],
               *, damp: float = 0.01) -> torch.Tensor:
    """Round ``weight (N, K)`` column by column with ``round_column(w (N,), j) -> w_q (N,)``
    (quantize-dequantize on the fixed grid of column j), compensating each column's error on
    the columns after it. Returns the rounded weight, float32.

    ``damp`` (fraction of the mean diagonal added to ``H``) keeps the inverse stable when the
    calibration rows do not span every input direction.
    """
    w = weight.detach().float().cpu().clone()
    h = hessian.float().clone()
    k = w.shape[1]
    dead = torch.diagonal(h) == 0  # inputs that never fired: nothing to compensate with
    h[dead, dead] = 1.0
    h += torch.eye(k) * (damp * torch.diagonal(h).mean())
    # Upper Cholesky factor of H^-1: row j holds the update coefficients for columns >= j.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for start in range(0, k, _BLOCK):
        stop = min(start + _BLOCK, k)
        block = w[:, start:stop].clone()
        errors = torch.empty_like(block)
        hb = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = block[:, i]
            rounded = round_column(col, start + i)
            out[:, start + i] = rounded
            err = (col - rounded) / hb[i, i]
            block[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return out
