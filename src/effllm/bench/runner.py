"""Run registered cases: refcheck each provider against the reference, time it, emit records."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from ..testing.compare import assert_close_to_reference
from ..testing.tolerances import abs_floor
from .records import describe_device, make_record, shape_label
from .registry import Case, Setup, parse_dtype
from .timers import time_providers


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"a benchmark provider must return a tensor (or a tuple starting with one), got {type(value)}")


def refcheck_all(setup: Setup, providers: list[str]) -> dict[str, dict]:
    """Compare each provider's output with the case's reference; never raises for a mismatch.

    The references are computed once per setup: they are the slow part (fp32, unfused).
    """
    if setup.reference is None:
        return {p: {"max_abs": None, "passed": None, "detail": "case has no reference"} for p in providers}
    ref = setup.reference()
    same = setup.same_dtype_reference() if setup.same_dtype_reference is not None else None
    return {p: _check_one(_first_tensor(setup.providers[p]()), ref, same, p) for p in providers}


def _check_one(out: torch.Tensor, ref: torch.Tensor, same: torch.Tensor | None, provider: str) -> dict:
    max_abs = float((out.double() - ref.double()).abs().max()) if out.numel() else 0.0
    try:
        if same is not None:
            assert_close_to_reference(out, ref, same, name=provider)
        elif not max_abs <= abs_floor(out.dtype):
            raise AssertionError(f"{provider}: max |out - reference| {max_abs:.3e} > floor {abs_floor(out.dtype):.1e}")
    except AssertionError as exc:
        return {"max_abs": max_abs, "passed": False, "detail": str(exc).splitlines()[0]}
    return {"max_abs": max_abs, "passed": True}


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator:
    """A rich progress bar when rich is installed (and wanted), else one line per step on stderr."""
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        Progress = None
    if not enabled:
        yield lambda desc: None
    elif Progress is None:
        count = [0]

        def step(desc: str) -> None:
            count[0] += 1
            print(f"[{count[0]}/{total}] {desc}", file=sys.stderr, flush=True)

        yield step
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task("bench", total=total)
            yield lambda desc: progress.update(task, advance=1, description=desc)


def run_case(
    case: Case,
    *,
    device: torch.device,
    dtypes: list[str] | None = None,
    providers: list[str] | None = None,
    shape_filter: dict[str, int] | None = None,
    do_refcheck: bool = False,
    warmup: int = 3,
    repeats: int = 20,
    progress: bool = True,
) -> list[dict]:
    """Time every (shape, dtype, provider) of ``case`` and return one record for each."""
    dtypes = list(dtypes or case.dtypes)
    candidates = case.shapes_for(device)
    shapes = [s for s in candidates if not shape_filter or all(s.get(k) == v for k, v in shape_filter.items())]
    if not shapes:
        raise ValueError(f"bench case {case.name!r}: no shape matches {shape_filter}; shapes on {device.type} "
                         f"are {candidates}")
    records: list[dict] = []
    device_name = describe_device(device)
    with _progress(len(shapes) * len(dtypes), progress) as step:
        for shape in shapes:
            for dtype_name in dtypes:
                dtype = parse_dtype(dtype_name)
                setup = case.build(shape, dtype, device)
                names = list(setup.providers)
                if providers:
                    unknown = set(providers) - set(names) - set(setup.unavailable)
                    if unknown:
                        raise ValueError(f"bench case {case.name!r}: unknown provider(s) {sorted(unknown)}; have {names}")
                    names = [p for p in names if p in providers]
                checks = refcheck_all(setup, names) if do_refcheck else {n: {"max_abs": None, "passed": None} for n in names}
                timings = time_providers({n: setup.providers[n] for n in names}, device, warmup=warmup, repeats=repeats)
                for name in names:
                    timing = timings[name]
                    seconds = timing["p50"] / 1e3
                    metric = {
                        "latency_ms": {k: timing[k] for k in ("p20", "p50", "p80")},
                        "samples": timing["n"],
                        "tflops": setup.flops / seconds / 1e12 if setup.flops else None,
                        "gbps": setup.bytes_moved / seconds / 1e9 if setup.bytes_moved else None,
                    }
                    if "peak_mem_mb" in timing:
                        metric["peak_mem_mb"] = timing["peak_mem_mb"]
                    records.append(make_record(
                        op=case.name, provider=name, dtype=dtype, shape=shape, metric=metric,
                        refcheck=checks[name], device=device_name, timer=timing["timer"],
                    ))
                for name, why in setup.unavailable.items():
                    if not providers or name in providers:
                        print(f"bench {case.name}: provider {name} skipped: {why}", file=sys.stderr)
                step(f"{case.name} {shape_label(shape)} {dtype_name}")
    return records
