"""Benchmark records: one schema for every result effllm measures (timing, memory, quality).

A record is one JSON object per line (JSONL). Every case, kernel or model level, writes the same
fields::

    kind        "kernel" | "model"          what the case builds (one op, or a whole model)
    op          case name                    e.g. "attention.decode", "quant.smollm2"
    provider    what was run                 e.g. "effllm", "sdpa", "int4-g64"
    baseline    provider it is judged against in the same run (None: none)
    dtype       torch dtype name of the inputs / model
    shape       the case's parameters        {name: int | str}, e.g. {"B": 1, "L": 4096}
    metric      {metric name: value}         names from METRICS below; timed values are medians
    quantiles   {metric name: {p20, p50, p80}} for timed metrics (kernel latency_ms too)
    refcheck    {max_abs, passed[, detail]}  kernel output vs the float32 reference (None: not run)
    device      "cpu:<model> (N threads)" | "cuda:<name>"
    host        {cpu, cores, flags, threads, loadavg, loadavg_end}  the machine and its 1-minute
                load average before and after the case ran (None in old records)
    rev         None, or the git revision whose code was run (``--baseline-rev``)
    versions    {effllm, torch, triton, transformers, python}
    git_sha     sha of the tree the harness ran from ("+dirty": the package had uncommitted changes)
    timer       "perf_counter(interleaved)" | "cuda_event+l2flush" | "perf_counter(interleaved runs)" | "none"
    time        UTC timestamp

``metric`` holds numbers only (``latency_ms`` of a kernel record is the one nested value:
``{p20, p50, p80}``, kept for old records). Quality metrics are exact (computed once), timed
metrics are medians over the repeats, with their spread in ``quantiles``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .._version import __version__

REQUIRED_KEYS = ("op", "provider", "dtype", "shape", "metric", "refcheck", "device", "versions", "git_sha", "timer")


@dataclass(frozen=True)
class Metric:
    """A metric name's unit, which direction is better, and what it measures (one line)."""

    unit: str
    better: str  # "higher" | "lower"
    doc: str
    timed: bool = False  # measured per repeat (median + quantiles) rather than once


# Every metric name a record may hold. A case declares the subset it reports; a case that needs a
# new one calls ``effllm.bench.define_metric`` next to its registration.
METRICS: dict[str, Metric] = {
    "latency_ms": Metric("ms", "lower", "wall time of one call (kernel cases: {p20, p50, p80})", timed=True),
    "samples": Metric("count", "higher", "timed repeats behind each median"),
    "tflops": Metric("TFLOP/s", "higher", "useful floating-point work per second at the p50 latency"),
    "gbps": Metric("GB/s", "higher", "bytes the op must move per second at the p50 latency"),
    "peak_mem_mb": Metric("MiB", "lower", "peak memory during the run: CUDA allocator peak, or on CPU "
                          "the rise of the process's peak RSS over its RSS before the run", timed=True),
    "prefill_tokens_per_s": Metric("tokens/s", "higher", "prompt tokens over the time to the first token", timed=True),
    "first_token_ms": Metric("ms", "lower", "time from calling generate to the first new token", timed=True),
    "decode_tokens_per_s": Metric("tokens/s", "higher", "new tokens after the first, per second of decoding",
                                  timed=True),
    "weight_bytes": Metric("bytes", "lower", "bytes of the model's parameters and buffers (tied tensors once)"),
    "kv_bytes": Metric("bytes", "lower", "bytes of the KV cache's tensors after the run"),
    "perplexity": Metric("", "lower", "exp of the mean next-token NLL of a fixed text"),
    "nll": Metric("nats/token", "lower", "mean next-token negative log-likelihood of a reference answer"),
    "exact_match": Metric("fraction", "higher", "share of prompts whose greedy answer matches the reference"),
    "cosine": Metric("", "higher", "mean cosine similarity of outputs to the unmodified model's"),
}


def define_metric(name: str, *, unit: str, better: str, doc: str, timed: bool = False) -> Metric:
    """Add a metric name to the schema (idempotent for an identical definition)."""
    if better not in ("higher", "lower"):
        raise ValueError(f"define_metric({name!r}): better must be 'higher' or 'lower', got {better!r}")
    metric = Metric(unit, better, doc, timed)
    if METRICS.get(name, metric) != metric:
        raise ValueError(f"metric {name!r} is already defined differently: {METRICS[name]}")
    METRICS[name] = metric
    return metric


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def versions() -> dict[str, str | None]:
    return {
        "effllm": __version__,
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "transformers": _dist_version("transformers"),
        "python": platform.python_version(),
    }


@functools.cache
def git_sha() -> str | None:
    # A --baseline-rev run exports its tree without .git: the parent names the rev instead.
    if os.environ.get("EFFLLM_BENCH_REV"):
        return os.environ["EFFLLM_BENCH_REV"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not sha:
        return None
    # Uncommitted changes to the package mean the sha alone does not name the code that ran.
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                                capture_output=True, text=True, timeout=5, check=False,
                                cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.SubprocessError):
        return sha
    return f"{sha}+dirty" if status.returncode == 0 and status.stdout.strip() else sha


def _cpuinfo_field(field: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


# The instruction-set flags that decide which CPU kernels torch can use.
_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "f16c")


def host_info() -> dict:
    """The CPU (model, relevant flags), torch's thread count and the 1-minute load average now."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "flags": [f for f in _FLAGS_OF_INTEREST if f in flags],
        "threads": torch.get_num_threads(),
        "loadavg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    return f"cpu:{_cpu_name()} ({threads} thread{'' if threads == 1 else 's'})"


def make_record(*, op, provider, dtype, shape, metric, refcheck, device, timer, kind="kernel", baseline=None,
                quantiles=None, host=None, rev=None) -> dict:
    return {
        "kind": kind,
        "op": op,
        "provider": provider,
        "baseline": baseline,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": dict(shape),
        "metric": metric,
        "quantiles": quantiles or {},
        "refcheck": refcheck,
        "device": device,
        "host": host,
        "rev": rev or os.environ.get("EFFLLM_BENCH_REV") or None,
        "versions": versions(),
        "git_sha": git_sha(),
        "timer": timer,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def normalise(rec: dict) -> dict:
    """Fill the fields records written before the one schema lacked (kind, baseline, rev, ...)."""
    rec.setdefault("kind", "kernel")
    rec.setdefault("baseline", None)
    rec.setdefault("quantiles", {})
    rec.setdefault("host", None)
    rec.setdefault("rev", None)
    return rec


def write_jsonl(path: str | os.PathLike, records: Iterable[dict], *, append: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    return path


def write_result_rows(path: str | os.PathLike, rows: Iterable[dict], *, keep_others: tuple[str, ...] = (),
                      **context) -> Path:
    """Free-form rows of the end-to-end scripts not yet folded into cases (kv_quality.py,
    kv_quant_quality.py): the file is replaced, each row stamped with the git sha, versions, date,
    host and ``context``. ``keep_others``: fields that identify a row; rows already in the file whose
    identity no new row has are kept (with their own stamps)."""
    stamp = {"git_sha": git_sha(), "versions": versions(), "date": time.strftime("%Y-%m-%d"), "host": host_info(),
             **context}
    new = [{**row, **stamp} for row in rows]
    kept = []
    if keep_others and Path(path).exists():
        ids = {tuple(row.get(k) for k in keep_others) for row in new}
        old = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        kept = [row for row in old if tuple(row.get(k) for k in keep_others) not in ids]
    return write_jsonl(path, kept + new, append=False)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    records = []
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON object: {exc}") from None
            missing = [k for k in REQUIRED_KEYS if k not in rec]
            if missing:
                raise ValueError(f"{path}:{lineno}: benchmark record lacks {missing}")
            records.append(normalise(rec))
    return records


def record_key(rec: dict) -> tuple:
    return (rec["op"], rec["provider"], rec["dtype"], tuple(sorted(rec["shape"].items())))


def shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())
