"""``effllm bench run CASE --baseline-rev REV``: the same case against another commit's code.

The library at REV is exported (``git archive``) into a temporary folder, and today's harness and
cases (``effllm/bench``) are laid over it, so the same benchmark code measures REV's library. Each
side runs in its own subprocess (``python -m effllm.bench run ...``, PYTHONPATH = that tree's
``src``); the sides alternate for ``--rounds`` rounds (A B, B A, ...), so load drift on a shared
machine reaches both. Records of the REV side carry ``rev`` = REV's short sha; every record
carries ``round``.

A case whose code needs an API REV lacks cannot run there: its module fails to import at REV, the
subprocess names the error, and that side of the run is reported as missing (exit status 2); the
current side's records are still written.
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .records import METRICS, read_jsonl, record_key, shape_label, write_jsonl

BENCH_DIR = Path(__file__).resolve().parent  # .../src/effllm/bench
SRC_DIR = BENCH_DIR.parent.parent  # .../src


class BaselineError(RuntimeError):
    pass


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=120, check=False)


def resolve_rev(rev: str) -> str:
    """REV's full commit sha, or a BaselineError saying why not (no checkout, unknown REV)."""
    out = _git("rev-parse", "--show-toplevel", cwd=SRC_DIR)
    if out.returncode != 0:
        raise BaselineError(f"--baseline-rev needs effllm run from a git checkout; {SRC_DIR} is not in one")
    out = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", cwd=SRC_DIR)
    if out.returncode != 0:
        raise BaselineError(f"--baseline-rev: {rev!r} is not a commit of this repository")
    return out.stdout.decode().strip()


def export_rev(sha: str, dest: Path) -> Path:
    """Write REV's ``src/`` into ``dest`` with today's ``effllm/bench`` laid over it; returns the src path."""
    top = Path(_git("rev-parse", "--show-toplevel", cwd=SRC_DIR).stdout.decode().strip())
    rel = SRC_DIR.relative_to(top).as_posix()
    out = _git("archive", "--format=tar", sha, rel, cwd=top)
    if out.returncode != 0:
        raise BaselineError(f"--baseline-rev: git archive of {sha[:12]}:{rel} failed: {out.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        # filter="data" (refuse links out of dest) exists from Python 3.10.12 / 3.11.4 on.
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    src = dest / rel
    if not (src / "effllm" / "__init__.py").exists():
        raise BaselineError(f"--baseline-rev: {sha[:12]} has no {rel}/effllm package")
    bench = src / "effllm" / "bench"
    shutil.rmtree(bench, ignore_errors=True)
    shutil.copytree(BENCH_DIR, bench, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _run_side(src: Path, rev: str | None, run_args: list[str], out: Path, *, round_no: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "EFFLLM_BENCH_EXPECT_ROOT": str(src / "effllm")}
    env.pop("EFFLLM_BENCH_REV", None)
    if rev:
        env["EFFLLM_BENCH_REV"] = rev
    cmd = [sys.executable, "-m", "effllm.bench", "run", *run_args, "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=src.parent, check=False)
    if proc.returncode == 0 and out.exists():
        recs = [{**r, "round": round_no} for r in read_jsonl(out)]
        write_jsonl(out, recs, append=False)
    return proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]


def run_against(rev: str, run_args: list[str], out: str, *, rounds: int = 2, control: str | None = None) -> int:
    """Run ``effllm bench run <run_args>`` on today's code and on REV's, alternating ``rounds``
    times; append every record to ``out``; print REV / today per record and metric."""
    if rounds < 1:
        raise BaselineError(f"--rounds must be >= 1, got {rounds}")
    sha = resolve_rev(rev)
    short = sha[:12]
    status = 0
    with tempfile.TemporaryDirectory(prefix="effllm-bench-rev-") as tmp:
        tmp = Path(tmp)
        rev_src = export_rev(sha, tmp / "rev")
        sides = [(None, SRC_DIR), (short, rev_src)]
        collected: list[dict] = []
        missing: dict[str, str] = {}
        for round_no in range(rounds):
            # A B, then B A: neither side always runs first (warm caches, load trends).
            for label, src in (sides if round_no % 2 == 0 else sides[::-1]):
                if label in missing:
                    continue
                part = tmp / f"part-{round_no}-{label or 'current'}.jsonl"
                print(f"round {round_no + 1}/{rounds}: {label or 'current tree'} ...", file=sys.stderr, flush=True)
                code, last = _run_side(src, label, run_args, part, round_no=round_no)
                if code != 0 or not part.exists():
                    missing[label] = last
                    print(f"effllm bench: the {label or 'current'} side failed (exit {code}): {last}", file=sys.stderr)
                    status = 2
                    continue
                collected.extend(read_jsonl(part))
        write_jsonl(out, collected)
    print(format_rev_comparison(collected, short, control=control))
    for label, why in missing.items():
        print(f"\nno records at {label or 'the current tree'}: {why}")
    print(f"records appended to {out}")
    return status


def format_rev_comparison(records: list[dict], rev: str, *, control: str | None = None) -> str:
    """Per record key and metric: median over rounds at REV, today, and REV / today. With a
    ``control`` provider (one whose code neither side changed), also REV / today divided by the
    control's at the same case, dtype, shape and metric: what is left once the two processes'
    difference in machine load is taken out."""
    by: dict[tuple, dict[str | None, list[dict]]] = {}
    for rec in records:
        by.setdefault(record_key(rec), {}).setdefault(rec.get("rev"), []).append(rec)

    def ratio(key: tuple, metric: str) -> float | None:
        sides = by.get(key, {})
        if None not in sides or rev not in sides:
            return None
        then, now = _median(sides[rev], metric), _median(sides[None], metric)
        return then / now if then is not None and now else None

    header = f"{'case':<24} {'provider':<18} {'dtype':<9} {'shape':<30} {'metric':<22} {'at ' + rev:>14} " \
             f"{'now':>12} {'rev/now':>8}" + (f" {'/ ' + control:>16}" if control else "")
    lines = [header, "-" * len(header)]
    for key, sides in sorted(by.items(), key=lambda kv: str(kv[0])):
        if None not in sides or rev not in sides:
            continue
        op, provider, dtype, shape = key
        for metric in _comparable_metrics(sides[None][0]):
            then, now = _median(sides[rev], metric), _median(sides[None], metric)
            if then is None or now is None:
                continue
            r = then / now if now else float("inf")
            line = (f"{op:<24} {provider:<18} {dtype:<9} {shape_label(dict(shape)):<30} {metric:<22} "
                    f"{then:>14.4g} {now:>12.4g} {r:>8.3f}")
            if control:
                c = ratio((op, control, dtype, shape), metric)
                line += f" {r / c:>16.3f}" if c else f" {'-':>16}"
            lines.append(line)
    return "\n".join(lines)


def _comparable_metrics(rec: dict) -> list[str]:
    return [m for m in rec["metric"] if m != "samples" and m in METRICS]


def _median(recs: list[dict], metric: str) -> float | None:
    values = []
    for r in recs:
        v = r["metric"].get(metric)
        if isinstance(v, dict):
            v = v.get("p50")
        if isinstance(v, (int, float)):
            values.append(float(v))
    return statistics.median(values) if values else None
