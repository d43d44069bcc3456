"""Benchmark case registry: ``@effllm.bench.case(...)`` registers a function that builds inputs
for one shape and dtype and returns the providers to time, plus the reference to check them against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Shape = dict[str, int]


@dataclass
class Setup:
    """What one case gives the runner for one (shape, dtype, device)."""

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
class Case:
    name: str
    build: Callable[[Shape, torch.dtype, torch.device], Setup]
    shapes: list[Shape]
    dtypes: tuple[str, ...]
    description: str
    # Extra shapes timed only on CUDA: sizes a GPU needs to be busy, too slow for a CPU run.
    gpu_shapes: list[Shape] = field(default_factory=list)

    def shapes_for(self, device: torch.device) -> list[Shape]:
        return self.shapes + (self.gpu_shapes if device.type == "cuda" else [])


CASES: dict[str, Case] = {}


def case(name: str, *, shapes: list[Shape], dtypes: tuple[str, ...] = ("float32",), description: str = "",
         gpu_shapes: list[Shape] | None = None):
    """Register a benchmark case. The decorated function maps ``(shape, dtype, device)`` to a ``Setup``."""
    if not shapes:
        raise ValueError(f"bench case {name!r}: shapes must not be empty")

    def register(build: Callable[[Shape, torch.dtype, torch.device], Setup]):
        if name in CASES:
            raise ValueError(f"bench case {name!r} is already registered")
        CASES[name] = Case(name, build, list(shapes), tuple(dtypes), description or (build.__doc__ or "").strip(),
                           list(gpu_shapes or []))
        return build

    return register


def load_builtin_cases() -> dict[str, Case]:
    """Import the cases shipped with effllm (registration happens on import)."""
    from . import cases  # noqa: F401

    return CASES


def get_case(name: str) -> Case:
    load_builtin_cases()
    if name not in CASES:
        raise KeyError(f"unknown bench case {name!r}; known cases: {', '.join(sorted(CASES))}")
    return CASES[name]


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use a torch dtype name such as float32, bfloat16, float16")
    return dtype
