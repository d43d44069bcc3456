"""The normalised Walsh-Hadamard transform NSNQuant rotates keys and values with.

``fwht(x)`` multiplies the last dim by ``H / sqrt(n)`` (Sylvester order), an orthogonal and
symmetric matrix, so the same call undoes it. It spreads every channel over all ``n`` outputs:
after NSN normalisation an outlier channel no longer stands out, and the entries look like
i.i.d. standard normals, which is what lets one fixed codebook serve every model.

Head dims that are not a power of two are rotated in blocks: ``H`` becomes block-diagonal with
blocks of the largest power of two dividing the dim (80 -> 5 blocks of 16, 96 -> 3 of 32). Still
orthogonal, so nothing is lost, but a channel is spread over one block only.
"""

from __future__ import annotations

import torch


def hadamard_block(dim: int) -> int:
    """Size of the Hadamard blocks for a last dim ``dim``: its largest power-of-two divisor."""
    if dim < 1:
        raise ValueError(f"hadamard_block: dim must be >= 1, got {dim}")
    return dim & -dim


def fwht(x: torch.Tensor) -> torch.Tensor:
    """``x @ H / sqrt(n)`` over the last dim in ``O(n log n)`` butterflies (blocks of
    ``hadamard_block(dim)``); floating inputs keep their dtype. Its own inverse."""
    dim = x.shape[-1]
    block = hadamard_block(dim)
    y = x.reshape(-1, dim // block, block)
    h = 1
    while h < block:  # pairs (j, j + h) inside every run of 2h: (a, b) -> (a + b, a - b)
        pairs = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = pairs[:, :, :, 0], pairs[:, :, :, 1]
        y = torch.stack((a + b, a - b), dim=3).view(y.shape)
        h *= 2
    return (y * block**-0.5).view(x.shape)


def hadamard_matrix(dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(dim, dim)`` matrix ``fwht`` multiplies by (for tests and small folds)."""
    return fwht(torch.eye(dim, dtype=dtype))
