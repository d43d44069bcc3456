"""NSNQuant's fixed vector codebook, rebuilt identically in every process.

One codebook of ``2 ** vector_dim`` vectors (256 for 8-dim sub-vectors) quantizes every model's
keys and values: after the NSN transform and the Hadamard rotation they look like i.i.d.
standard normals, so the codebook is fitted once to standard-normal samples, never to a model.

Construction (deterministic): ``2 ** 15`` samples from ``N(0, I)`` drawn by a CPU
``torch.Generator`` seeded with ``SEED``; Lloyd's k-means in float64 (Euclidean, 20 iterations,
the first ``2 ** vector_dim`` samples as the start); the result cast to float32. Float64 makes
the assignment ties that could differ between BLAS builds vanishingly unlikely; a test rebuilds
it in a fresh process and compares bytes.

Two codes per sub-vector (NSNQuant-2): the second stage quantizes what the first left, with the
*same* codebook scaled by ``beta`` (``y ~ c[i] + beta * c[j]``). ``beta`` is fitted at build time
(least squares, alternated with the stage-2 assignment). One codebook means one lookup table per
query serves both stages (see ``kv/codes_attention.py``). On standard-normal samples (one-off
comparison, same training set) the squared error per element is 0.104 against 0.097 for a sign
mask plus an index into a positive-orthant codebook (the other 16-bit reading), which cannot be
scored by a per-query lookup table of 256 entries (its 65536 sign/index pairs would each need one),
and 0.109 for a second, separately fitted codebook (encoded greedily; ours greedily: 0.110).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import native

SEED = 20250524
SAMPLES = 1 << 15
ITERATIONS = 20
BEAM = 2  # stage-1 candidates tried when encoding two stages


@dataclass(frozen=True)
class Codebook:
    """``vectors (K, vector_dim)`` float32 and the stage-2 scale ``beta``."""

    vectors: torch.Tensor
    beta: float

    @property
    def size(self) -> int:
        return self.vectors.shape[0]

    @property
    def vector_dim(self) -> int:
        return self.vectors.shape[1]


def _nearest(x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Index of each row of ``x (N, v)``'s nearest vector (argmax of x.c - |c|^2 / 2)."""
    return (x @ vectors.T - 0.5 * (vectors * vectors).sum(1)).argmax(1)


def _kmeans(samples: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    centers = samples[:k].clone()
    for _ in range(iterations):
        assign = _nearest(samples, centers)
        sums = torch.zeros_like(centers).index_add_(0, assign, samples)
        counts = torch.bincount(assign, minlength=k).to(samples.dtype)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
    return centers


def _fit_beta(samples: torch.Tensor, vectors: torch.Tensor, rounds: int = 6) -> float:
    residual = samples - vectors[_nearest(samples, vectors)]
    beta = 0.5
    for _ in range(rounds):  # assign stage 2 at this beta, then the least-squares beta for it
        chosen = vectors[_nearest(residual / beta, vectors)]
        beta = float((residual * chosen).sum() / (chosen * chosen).sum())
    return beta


def build_codebook(vector_dim: int) -> Codebook:
    """Build the codebook for ``vector_dim``-dim sub-vectors from scratch (seconds; use
    ``codebook()``, which builds it once per process)."""
    generator = torch.Generator().manual_seed(SEED + vector_dim)
    samples = torch.randn(SAMPLES, vector_dim, generator=generator, dtype=torch.float64)
    centers = _kmeans(samples, 2**vector_dim, ITERATIONS)
    beta = _fit_beta(samples[: SAMPLES // 4], centers)
    return Codebook(centers.to(torch.float32), beta)


@functools.cache
def codebook(vector_dim: int) -> Codebook:
    """The shared codebook for ``vector_dim``-dim sub-vectors (built on first use)."""
    return build_codebook(vector_dim)


def encode(y: torch.Tensor, book: Codebook, stages: int, rows_per_pass: int = 8192) -> torch.Tensor:
    """Codes ``(N, stages)`` int64 of sub-vectors ``y (N, v)`` float32: stage 1 the nearest
    vector; with two stages, the best of ``BEAM`` stage-1 candidates each followed by the
    nearest ``beta``-scaled vector to what is left (a few candidates lower the squared error
    on standard normals below greedy's at a few times its cost; docs/kv.md, NSNQuant).

    Stage 2 needs no second product with the data: with ``c1`` chosen, the nearest ``beta * c``
    to ``y - c1`` maximises ``y.c - c1.c - beta |c|^2 / 2``, where ``y.c`` is stage 1's product
    and ``c1.c`` a row of the codebook's Gram matrix; the pair's squared error is
    ``|y|^2 - 2 (stage-1 score + beta * stage-2 score)``. ``rows_per_pass`` bounds the memory."""
    vectors = book.vectors.to(y.device)
    if vectors.shape == (256, 8) and y.dim() == 2 and y.dtype == torch.float32 and native.usable(y, rows=0):
        # one fused pass on CPU (effllm/native): the torch ops materialise (n, BEAM, K) scores
        return native.nsn_encode(y.contiguous(), vectors.contiguous(), book.beta, stages, BEAM)
    return encode_torch(y, book, stages, rows_per_pass)


def encode_torch(y: torch.Tensor, book: Codebook, stages: int, rows_per_pass: int = 8192) -> torch.Tensor:
    """``encode`` through torch ops (any device; the CPU path when the native loops are off)."""
    vectors = book.vectors.to(y.device)
    half_norms = 0.5 * (vectors * vectors).sum(1)
    gram = vectors @ vectors.T if stages == 2 else None
    out = []
    for part in y.split(rows_per_pass):
        products = part @ vectors.T  # (n, K)
        scores = products - half_norms
        if stages == 1:
            out.append(scores.argmax(1, keepdim=True))
            continue
        top, first = scores.topk(min(BEAM, book.size), dim=1)  # (n, beam)
        second_scores = products[:, None, :] - gram[first] - book.beta * half_norms  # (n, beam, K)
        best_second, second = second_scores.max(-1)
        best = (top + book.beta * best_second).argmax(1, keepdim=True)
        out.append(torch.cat([first.gather(1, best), second.gather(1, best)], dim=1))
    return torch.cat(out) if out else y.new_zeros(0, stages, dtype=torch.int64)


def decode(codes: torch.Tensor, book: Codebook) -> torch.Tensor:
    """Sub-vectors ``(..., v)`` float32 from codes ``(..., stages)``."""
    vectors = book.vectors.to(codes.device)
    out = vectors[codes[..., 0]]
    if codes.shape[-1] > 1:
        out = out + book.beta * vectors[codes[..., 1]]
    return out
