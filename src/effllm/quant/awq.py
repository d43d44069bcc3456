"""Activation-aware INT4 (AWQ-style): per-input-channel scales and per-group clipping, chosen to
minimise each linear's output error on calibration activations.

1. ``collect_inputs`` runs the float model once over the calibration batches with forward hooks
   and keeps, per linear, the mean |x| of every input channel and a random sample of input rows.
2. ``search_scales``: for alpha in [0, 1], ``s = mean|x|^alpha / mean|w|^(1 - alpha)``
   (normalised), quantize ``W * s`` and measure ``|| x W^T - (x / s) Q(W s)^T ||`` on the
   sample; keep the best, with ``s = 1`` (plain round-to-nearest) among the candidates, so the
   search never does worse than RTN on the sample.
3. ``search_clip``: with those scales, shrink each group's range by a ratio in [0.5, 1] and keep,
   per (output channel, group), the ratio with the smallest output error on the sample.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import formats
from .calibration import feed_inputs

ALPHAS = torch.linspace(0, 1, 21).tolist()
CLIP_RATIOS = [1.0 - 0.025 * i for i in range(21)]  # 1.0 ... 0.5
_N_CHUNK = 256  # output channels per step of the clip search (bounds its memory)


@dataclass
class InputStats:
    mean_abs: torch.Tensor  # (K,) float32
    sample: torch.Tensor  # (rows, K) float32


@torch.no_grad()
def collect_inputs(model: nn.Module, modules: dict[str, nn.Linear], batches: Iterable, *, max_rows: int = 512,
                   seed: int = 0) -> dict[str, InputStats]:
    """Run ``model`` on ``batches`` (tensors, or dicts of keyword arguments) and gather inputs."""
    gen = torch.Generator().manual_seed(seed)
    sums = {name: None for name in modules}
    counts = dict.fromkeys(modules, 0)
    samples = {name: [] for name in modules}

    def record(name, x):
        total = x.abs().sum(0)
        sums[name] = total if sums[name] is None else sums[name] + total
        counts[name] += x.shape[0]
        take = torch.randperm(x.shape[0], generator=gen)[: max_rows]
        samples[name].append(x[take.to(x.device)].cpu())

    feed_inputs(model, modules, batches, record)
    stats = {}
    for name in modules:
        rows = torch.cat(samples[name])
        rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]
        stats[name] = InputStats(mean_abs=(sums[name] / counts[name]).cpu(), sample=rows)
    return stats


def _qdq(w: torch.Tensor, config, clip=None) -> torch.Tensor:
    q, scales, zeros = formats.int4_quantize(w, config.group_size, config.symmetric, clip=clip,
                                             integer_zeros=config.integer_zeros)
    return formats.int4_dequantize(q, scales, zeros, config.group_size, dtype=torch.float32)


@torch.no_grad()
def search_scales(weight: torch.Tensor, stats: InputStats, config) -> torch.Tensor:
    """Per-input-channel scales ``s (K,)``: the weight is quantized as ``W * s``.

    Candidates: ``s = 1`` (round-to-nearest) and, for each alpha, ``x^alpha / w^(1 - alpha)``
    with x the mean |input| and w the mean relative |weight| of each input channel ("duo"
    scaling: channels that carry large activations get finer steps, channels whose weights are
    already large need less help). On MiniLM INT4 g128 this reaches mean cosine 0.981 against
    0.976 with the activation term alone.
    """
    w = weight.float().cpu()
    x = stats.sample
    ref = x @ w.t()
    act = stats.mean_abs.clamp_min(1e-6)
    wgt = (w.abs() / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)).mean(dim=0).clamp_min(1e-6)
    best = torch.ones(w.shape[1])
    best_err = ((x @ _qdq(w, config).t()) - ref).pow(2).mean().item()
    for alpha in ALPHAS:
        s = (act.pow(alpha) / wgt.pow(1 - alpha)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out = (x / s) @ _qdq(w * s, config).t()
        err = (out - ref).pow(2).mean().item()
        if err < best_err:
            best_err, best = err, s
    return best


@torch.no_grad()
def search_clip(weight: torch.Tensor, stats: InputStats, scales: torch.Tensor, config) -> torch.Tensor:
    """Per (output channel, group) range ratio ``(N, K/G)`` minimising that group's output error."""
    group_size = config.group_size
    w = weight.float().cpu() * scales
    x = (stats.sample / scales).view(stats.sample.shape[0], -1, group_size)  # rows, groups, G
    n, groups = w.shape[0], w.shape[1] // group_size
    best = torch.ones(n, groups)
    for start in range(0, n, _N_CHUNK):
        wc = w[start:start + _N_CHUNK]
        best_err = torch.full((wc.shape[0], groups), float("inf"))
        for ratio in CLIP_RATIOS:
            clip = torch.full((wc.shape[0], groups), ratio)
            delta = (wc - _qdq(wc, config, clip=clip)).view(wc.shape[0], groups, group_size)
            err = torch.einsum("sgk,ngk->sng", x, delta).pow(2).mean(0)  # output error per (channel, group)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[start:start + _N_CHUNK] = torch.where(better, ratio, best[start:start + _N_CHUNK])
    return best
