"""Run registered cases and emit records: kernel cases (refcheck each provider against the
reference, time calls) and model cases (round-robin runs, one-off measures)."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from collections.abc import Callable, Iterator

import torch

from ..testing.compare import assert_close_to_reference
from ..testing.tolerances import abs_floor
from .records import METRICS, describe_device, host_info, make_record, shape_label
from .registry import Case, ModelSetup, Setup, parse_dtype
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


def _loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _matches(shape: dict, shape_filter: dict | None) -> bool:
    # Filter values come from the command line as text: compare as text so int and str params match.
    return not shape_filter or all(str(shape.get(k)) == str(v) for k, v in shape_filter.items())


def run_case(
    case: Case,
    *,
    device: torch.device,
    dtypes: list[str] | None = None,
    providers: list[str] | None = None,
    shape_filter: dict | None = None,
    do_refcheck: bool = False,
    warmup: int | None = None,
    repeats: int | None = None,
    progress: bool = True,
    quick: bool = False,
    sink: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Run every (shape, dtype, provider) of ``case`` and return one record for each.

    ``warmup`` / ``repeats`` default to the case's own; ``quick`` runs only its quick shapes.
    ``sink`` receives each (shape, dtype)'s records as soon as they exist (a long case's finished
    parts are kept if a later part fails or is interrupted).
    """
    dtypes = list(dtypes or case.dtypes)
    candidates = case.shapes_for(device, quick=quick)
    shapes = [s for s in candidates if _matches(s, shape_filter)]
    if not shapes:
        raise ValueError(f"bench case {case.name!r}: no shape matches {shape_filter}; shapes on {device.type} "
                         f"are {candidates}")
    warmup = case.warmup if warmup is None else warmup
    repeats = case.repeats if repeats is None else repeats
    if repeats < 1 or warmup < 0:
        raise ValueError(f"bench case {case.name!r}: repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if case.kind == "model":
        return _run_model_case(case, device=device, dtypes=dtypes, providers=providers, shapes=shapes,
                               warmup=warmup, repeats=repeats, progress=progress, sink=sink)
    records: list[dict] = []
    done = 0
    device_name = describe_device(device)
    with _progress(len(shapes) * len(dtypes), progress) as step:
        for shape in shapes:
            for dtype_name in dtypes:
                dtype = parse_dtype(dtype_name)
                host_before = host_info()
                setup = case.build(shape, dtype, device)
                names = list(setup.providers)
                if providers:
                    unknown = set(providers) - set(names) - set(setup.unavailable)
                    if unknown:
                        raise ValueError(f"bench case {case.name!r}: unknown provider(s) {sorted(unknown)}; have {names}")
                    names = [p for p in names if p in providers]
                checks = refcheck_all(setup, names) if do_refcheck else {n: {"max_abs": None, "passed": None} for n in names}
                timings = time_providers({n: setup.providers[n] for n in names}, device, warmup=warmup, repeats=repeats)
                host = {**host_before, "loadavg_end": _loadavg()}
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
                        baseline=case.baseline if case.baseline in names and case.baseline != name else None,
                        quantiles={"latency_ms": dict(metric["latency_ms"])}, host=host,
                    ))
                for name, why in setup.unavailable.items():
                    if not providers or name in providers:
                        print(f"bench {case.name}: provider {name} skipped: {why}", file=sys.stderr)
                if sink is not None:
                    sink(records[done:])
                done = len(records)
                step(f"{case.name} {shape_label(shape)} {dtype_name}")
    return records


def _quantiles(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return {"p20": float(q[0]), "p50": float(q[1]), "p80": float(q[2])}


def _check_metrics(case: Case, provider: str, values: dict, where: str) -> dict[str, float]:
    unknown = [k for k in values if k not in case.metrics]
    if unknown:
        raise ValueError(f"bench case {case.name!r}: provider {provider!r} {where} returned undeclared metric(s) "
                         f"{unknown}; the case declares {list(case.metrics)}")
    bad = [k for k, v in values.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"bench case {case.name!r}: provider {provider!r} {where}: metric(s) {bad} are not numbers")
    return {k: float(v) for k, v in values.items()}


def _run_model_case(case: Case, *, device, dtypes, providers, shapes, warmup, repeats, progress,
                    sink=None) -> list[dict]:
    """Model-level case: each provider's measures once, then its runs round-robin (warmup, then
    ``repeats`` rounds: drift on a shared machine hits every provider alike); medians recorded."""
    from . import model as model_helpers

    records: list[dict] = []
    done = 0
    device_name = describe_device(device)
    try:
        with _progress(len(shapes) * len(dtypes), progress) as step:
            for shape in shapes:
                for dtype_name in dtypes:
                    dtype = parse_dtype(dtype_name)
                    host_before = host_info()
                    setup = case.build(shape, dtype, device)
                    if not isinstance(setup, ModelSetup):
                        raise TypeError(f"bench case {case.name!r}: a model case must return a ModelSetup, "
                                        f"got {type(setup).__name__}")
                    names = setup.providers()
                    if providers:
                        unknown = set(providers) - set(names) - set(setup.unavailable)
                        if unknown:
                            raise ValueError(f"bench case {case.name!r}: unknown provider(s) {sorted(unknown)}; "
                                             f"have {names}")
                        names = [p for p in names if p in providers]
                    exact = {n: _check_metrics(case, n, setup.measures[n](), "measure")
                             for n in names if n in setup.measures}
                    timed_names = [n for n in names if n in setup.runs]
                    for _ in range(warmup):
                        for n in timed_names:
                            setup.runs[n]()
                    samples: dict[str, list[dict]] = {n: [] for n in timed_names}
                    for _ in range(repeats):
                        for n in timed_names:
                            samples[n].append(_check_metrics(case, n, setup.runs[n](), "run"))
                    host = {**host_before, "loadavg_end": _loadavg()}
                    for n in names:
                        metric, quantiles = dict(exact.get(n, {})), {}
                        if samples.get(n):
                            for key in samples[n][0]:
                                values = [s[key] for s in samples[n] if key in s]
                                if METRICS[key].timed:
                                    metric[key] = statistics.median(values)
                                    quantiles[key] = _quantiles(values)
                                else:
                                    metric[key] = values[-1]  # a count (kv_bytes): the same every run
                            metric["samples"] = len(samples[n])
                        records.append(make_record(
                            kind="model", op=case.name, provider=n, dtype=setup.dtypes.get(n, dtype), shape=shape,
                            metric=metric, quantiles=quantiles, refcheck={"max_abs": None, "passed": None},
                            device=device_name, timer="perf_counter(interleaved runs)" if n in samples else "none",
                            baseline=case.baseline if case.baseline in names and case.baseline != n else None,
                            host=host,
                        ))
                    for name, why in setup.unavailable.items():
                        if not providers or name in providers:
                            print(f"bench {case.name}: provider {name} skipped: {why}", file=sys.stderr)
                    del setup
                    if sink is not None:
                        sink(records[done:])
                    done = len(records)
                    step(f"{case.name} {shape_label(shape)} {dtype_name}")
    finally:
        model_helpers.clear_cache()
    return records
