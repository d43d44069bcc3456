"""Timers: CUDA events with an L2 flush on GPU, perf_counter on CPU; both report p20/p50/p80 ms."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2


def _quantiles(samples_ms: list[float]) -> dict[str, float]:
    t = torch.tensor(samples_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return {"p20": float(q[0]), "p50": float(q[1]), "p80": float(q[2]), "n": len(samples_ms)}


def time_cpu(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20) -> dict:
    """Wall-clock times of ``fn()`` in ms (p20/p50/p80) after ``warmup`` calls."""
    return time_cpu_interleaved({"fn": fn}, warmup=warmup, repeats=repeats)["fn"]


def time_cuda(fn: Callable[[], object], *, warmup: int = 5, repeats: int = 50, flush_l2: bool = True) -> dict:
    """CUDA-event times of ``fn()`` in ms, each run after an L2 flush (cold cache) when asked."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mb = torch.cuda.memory_allocated() / 2**20
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    # Peak beyond what was allocated before the first call (inputs and flush buffer excluded).
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 - base_mb
    return {**_quantiles(samples), "timer": "cuda_event" + ("+l2flush" if flush_l2 else ""), "peak_mem_mb": peak_mb}


def time_cpu_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeats: int = 20) -> dict[str, dict]:
    """Time several providers round-robin, one call each per round.

    On a shared CPU, load drifts over seconds; interleaving exposes every provider to the same
    drift, so their ratios stay meaningful even when absolute times move.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {**_quantiles(s), "timer": "perf_counter(interleaved)"} for name, s in samples.items()}


def time_providers(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int, repeats: int) -> dict[str, dict]:
    """p20/p50/p80 ms per provider: CUDA events one provider at a time, CPU round-robin."""
    if device.type == "cuda":
        return {name: time_cuda(fn, warmup=warmup, repeats=repeats) for name, fn in fns.items()}
    return time_cpu_interleaved(fns, warmup=warmup, repeats=repeats)
