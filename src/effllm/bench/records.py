"""Benchmark records: one JSON object per line, schema shared with DESIGN.md.

``op, provider, dtype, shape, metric{latency_ms{p20,p50,p80}, tflops, gbps, peak_mem_mb, ...},
refcheck{max_abs, passed}, device, versions, git_sha, timer, time``
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
from pathlib import Path

import torch

from .._version import __version__

REQUIRED_KEYS = ("op", "provider", "dtype", "shape", "metric", "refcheck", "device", "versions", "git_sha", "timer")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def versions() -> dict[str, str | None]:
    return {
        "effllm": __version__,
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "transformers": _dist_version("transformers"),
        "python": platform.python_version(),
    }


@functools.lru_cache(maxsize=None)
def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    return f"cpu:{_cpu_name()} ({threads} thread{'' if threads == 1 else 's'})"


def make_record(*, op, provider, dtype, shape, metric, refcheck, device, timer) -> dict:
    return {
        "op": op,
        "provider": provider,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": dict(shape),
        "metric": metric,
        "refcheck": refcheck,
        "device": device,
        "versions": versions(),
        "git_sha": git_sha(),
        "timer": timer,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_jsonl(path: str | os.PathLike, records: Iterable[dict], *, append: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    return path


def write_result_rows(path: str | os.PathLike, rows: Iterable[dict], *, keep_others: tuple[str, ...] = (),
                      **context) -> Path:
    """Write end-to-end benchmark rows (replacing the file), each stamped with the git sha,
    package versions, date and ``context`` (device, threads, ...). ``keep_others``: fields that
    identify a row; rows already in the file whose identity no new row has are kept (with
    their own stamps), so one case can be re-measured without re-running the rest."""
    stamp = {"git_sha": git_sha(), "versions": versions(), "date": time.strftime("%Y-%m-%d"), **context}
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
            records.append(rec)
    return records


def record_key(rec: dict) -> tuple:
    return (rec["op"], rec["provider"], rec["dtype"], tuple(sorted(rec["shape"].items())))


def shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())
