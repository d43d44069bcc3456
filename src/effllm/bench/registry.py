"""Benchmark case registry.

Two kinds of case share one registry, one runner and one record schema (``records.py``):

- ``@case(name, shapes=..., ...)``: a kernel case. Its function maps ``(shape, dtype, device)`` to a
  ``Setup``: providers to time call by call (and a reference to check them against).
- ``@model_case(name, params=..., metrics=..., ...)``: a model-level case. Its function maps
  ``(params, dtype, device)`` to a ``ModelSetup``: per provider, one run (e.g. one ``generate``)
  returning timed metrics, and a one-off measure returning exact ones (quality, bytes).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .records import METRICS

Shape = dict[str, Any]  # parameter name -> int (sizes) or str (a text, a policy name)


@dataclass
class Setup:
    """What one kernel case gives the runner for one (shape, dtype, device)."""

    providers: dict[str, Callable[[], Any]]
    # float32 (or better) result every provider is checked against with --refcheck.
    reference: Callable[[], torch.Tensor] | None = None
    # The same computation done by torch at the case's dtype: scales the allowed error
    # (effllm.testing's "kernel error <= 2x torch's same-dtype error" rule). None: absolute floor.
    same_dtype_reference: Callable[[], torch.Tensor] | None = None
    flops: float | None = None
    bytes_moved: float | None = None
    # Providers that cannot run here, with the reason (recorded, not timed).
    unavailable: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelSetup:
    """What one model-level case gives the runner for one (params, dtype, device).

    ``runs[p]()`` does one timed unit of work for provider ``p`` (one generate, one forward) and
    returns timed metrics (``{"decode_tokens_per_s": ..., "first_token_ms": ...}``); the runner
    calls the providers round-robin ``warmup + repeats`` times and records medians.
    ``measures[p]()`` is called once and returns exact metrics (perplexity, weight_bytes, ...).
    A provider may have either or both.
    """

    runs: dict[str, Callable[[], dict[str, float]]] = field(default_factory=dict)
    measures: dict[str, Callable[[], dict[str, float]]] = field(default_factory=dict)
    # Providers that cannot run here, with the reason (printed, not recorded).
    unavailable: dict[str, str] = field(default_factory=dict)
    # Per-provider dtype when it differs from the case's (e.g. an "fp32" row in a bf16 case).
    dtypes: dict[str, str] = field(default_factory=dict)

    def providers(self) -> list[str]:
        return list(dict.fromkeys([*self.runs, *self.measures]))


@dataclass
class Case:
    name: str
    build: Callable[[Shape, torch.dtype, torch.device], Setup | ModelSetup]
    shapes: list[Shape]
    dtypes: tuple[str, ...]
    description: str
    # Extra shapes timed only on CUDA: sizes a GPU needs to be busy, too slow for a CPU run.
    gpu_shapes: list[Shape] = field(default_factory=list)
    kind: str = "kernel"  # "kernel" | "model"
    # Metric names the case reports (model cases: checked against every result).
    metrics: tuple[str, ...] = ("latency_ms", "samples", "tflops", "gbps", "peak_mem_mb")
    # The provider the others are judged against (README / docs ratios); None: no pairing.
    baseline: str | None = None
    # Timing defaults when the command line gives none.
    warmup: int = 3
    repeats: int = 20
    # Shapes run by ``--quick`` (a smoke run): the first shape unless the case says otherwise.
    quick_shapes: list[Shape] = field(default_factory=list)

    def shapes_for(self, device: torch.device, *, quick: bool = False) -> list[Shape]:
        if quick:
            return self.quick_shapes or self.shapes[:1]
        return self.shapes + (self.gpu_shapes if device.type == "cuda" else [])


CASES: dict[str, Case] = {}

# Case modules that failed to import (name -> error): reported by ``get_case`` instead of hiding
# every case, e.g. when a case needs an API the revision under ``--baseline-rev`` does not have.
LOAD_ERRORS: dict[str, str] = {}


def _one_line(text: str) -> str:
    """First sentence-line of a description, without reST markup (``effllm bench list`` shows it)."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line.replace("``", "").replace("`", "")


def _register(case_obj: Case) -> None:
    if not case_obj.shapes:
        raise ValueError(f"bench case {case_obj.name!r}: shapes/params must not be empty")
    if case_obj.name in CASES:
        raise ValueError(f"bench case {case_obj.name!r} is already registered")
    unknown = [m for m in case_obj.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"bench case {case_obj.name!r}: unknown metric(s) {unknown}; known: {sorted(METRICS)} "
                         "(add one with effllm.bench.define_metric)")
    if not case_obj.description:
        raise ValueError(f"bench case {case_obj.name!r}: give a one-line description (shown by 'effllm bench list')")
    CASES[case_obj.name] = case_obj


def case(name: str, *, shapes: list[Shape], dtypes: tuple[str, ...] = ("float32",), description: str = "",
         gpu_shapes: list[Shape] | None = None, baseline: str | None = None, quick_shapes: list[Shape] | None = None):
    """Register a kernel case. The decorated function maps ``(shape, dtype, device)`` to a ``Setup``."""

    def register(build: Callable[[Shape, torch.dtype, torch.device], Setup]):
        _register(Case(name, build, list(shapes), tuple(dtypes), _one_line(description or build.__doc__),
                       list(gpu_shapes or []), baseline=baseline, quick_shapes=list(quick_shapes or [])))
        return build

    return register


def model_case(name: str, *, params: list[Shape], metrics: tuple[str, ...], description: str = "",
               dtypes: tuple[str, ...] = ("float32",), baseline: str | None = None, warmup: int = 1,
               repeats: int = 3, quick_params: list[Shape] | None = None):
    """Register a model-level case. The decorated function maps ``(params, dtype, device)`` to a
    ``ModelSetup``; ``metrics`` names everything its runs and measures may return."""

    def register(build: Callable[[Shape, torch.dtype, torch.device], ModelSetup]):
        _register(Case(name, build, list(params), tuple(dtypes), _one_line(description or build.__doc__),
                       kind="model", metrics=tuple(metrics), baseline=baseline, warmup=warmup, repeats=repeats,
                       quick_shapes=list(quick_params or [])))
        return build

    return register


def load_builtin_cases() -> dict[str, Case]:
    """Import the cases shipped with effllm (registration happens on import), one module at a
    time: a module that fails to import is noted in ``LOAD_ERRORS`` and the others still load."""
    from . import cases

    for info in pkgutil.iter_modules(cases.__path__):
        module = f"{cases.__name__}.{info.name}"
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - reported per case module, never hidden
            LOAD_ERRORS[info.name] = f"{type(exc).__name__}: {exc}"
    return CASES


def get_case(name: str) -> Case:
    load_builtin_cases()
    if name not in CASES:
        broken = "".join(f"\n  cases/{mod}.py did not load: {err}" for mod, err in sorted(LOAD_ERRORS.items()))
        raise KeyError(f"unknown bench case {name!r}; known cases: {', '.join(sorted(CASES))}{broken}")
    return CASES[name]


def select_cases(patterns: list[str]) -> list[Case]:
    """Cases named by ``patterns``: exact names, shell-style globs (``kv.*``) or ``all``."""
    import fnmatch

    known = load_builtin_cases()
    if patterns == ["all"]:
        return [known[n] for n in sorted(known)]
    out: list[Case] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matched = [known[n] for n in sorted(known) if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise KeyError(f"no bench case matches {pattern!r}; known cases: {', '.join(sorted(known))}")
        else:
            matched = [get_case(pattern)]
        out.extend(c for c in matched if c not in out)
    return out


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use a torch dtype name such as float32, bfloat16, float16")
    return dtype
