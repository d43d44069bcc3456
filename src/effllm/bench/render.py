"""``effllm bench render``: the README's and docs' result tables, generated from records.

- README.md, between ``<!-- results:start -->`` and ``<!-- results:end -->``: one short table per
  feature, from the model-level records (``kind == "model"``), each provider next to its
  baseline measured in the same run. A feature without records yet shows a marked placeholder.
- docs/benchmarks.md, between ``<!-- kernels:start -->`` and ``<!-- kernels:end -->``: the
  kernel records, grouped by device and op, with effllm's speed against the case's baseline and
  the word "slower" wherever effllm is.

Records are read from ``benchmarks/results/*.jsonl``; for a repeated key the last record wins.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .records import METRICS, read_jsonl, shape_label

README_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")
DOCS_MARKERS = ("<!-- kernels:start -->", "<!-- kernels:end -->")


@dataclass(frozen=True)
class Feature:
    title: str
    prefix: str  # model cases whose name starts with this belong to the feature
    command: str  # what fills it


# The README's sections, in order. A feature's cases are registered by whoever builds it.
FEATURES = (
    Feature("Weight quantization", "quant.", "effllm bench run 'quant.*' --threads 1"),
    Feature("Attention kernels in a model", "attention.", "effllm bench run attention.smollm2 --threads 1"),
    Feature("KV-cache compression and quantization", "kv.", "effllm bench run 'kv.*' --threads 1"),
    Feature("Fast decode", "fast.", "effllm bench run 'fast.*' --threads 1"),
    Feature("MoE expert offload", "moe.", "effllm bench run 'moe.*' --threads 1"),
    Feature("Tensor / sequence parallel", "parallel.", "effllm bench run 'parallel.*' --threads 1"),
)


def load_results(results: Path) -> list[dict]:
    records = []
    for path in sorted(results.glob("*.jsonl")):
        records.extend(read_jsonl(path))
    return records


def _latest(records: list[dict]) -> dict[tuple, dict]:
    out = {}
    for rec in records:
        if rec.get("rev"):
            continue  # --baseline-rev records compare commits; the tables show the current code
        out[(rec["op"], rec["device"], rec["dtype"], shape_label(rec["shape"]), rec["provider"])] = rec
    return out


def _fmt(metric: str, value: float) -> str:
    unit = METRICS[metric].unit if metric in METRICS else ""
    if unit == "bytes":
        return f"{value / 1e6:.1f}"
    if unit == "fraction":
        return f"{value:.2f}"
    if metric == "cosine":
        return f"{value:.4f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


_TITLES = {
    "decode_tokens_per_s": "decode tokens/s", "prefill_tokens_per_s": "prefill tokens/s",
    "first_token_ms": "first token ms", "peak_mem_mb": "peak memory rise MiB", "weight_bytes": "weights MB",
    "kv_bytes": "KV cache MB", "latency_ms": "latency ms", "exact_match": "exact match", "nll": "NLL",
}


def _column_title(metric: str) -> str:
    if metric in _TITLES:
        return _TITLES[metric]
    unit = METRICS[metric].unit if metric in METRICS else ""
    name = metric.replace("_", " ")
    return f"{name} ({'MB' if unit == 'bytes' else unit})" if unit and unit != "count" else name


def _ratio(metric: str, value: float, base: float) -> str:
    """value / baseline, with 'better' / 'worse' by the metric's direction (quality: +x% change)."""
    if base == 0 or metric not in METRICS:
        return ""
    better = METRICS[metric].better
    r = value / base
    if metric in ("perplexity", "nll", "cosine", "exact_match"):
        change = 100 * (r - 1)
        if abs(change) < 0.005:
            return " (same)"
        worse = change > 0 if better == "lower" else change < 0
        return f" ({change:+.2f}%{', worse' if worse else ''})"
    if abs(r - 1) < 0.005:
        return " (1.00x)"
    worse = r > 1 if better == "lower" else r < 1
    return f" ({r:.2f}x{', worse' if worse else ''})"


def _host_line(recs: list[dict]) -> str:
    first = recs[0]
    host = first.get("host") or {}
    loads = [x for r in recs for x in ((r.get("host") or {}).get("loadavg"), (r.get("host") or {}).get("loadavg_end"))
             if x is not None]
    parts = [first["device"]]
    if host.get("flags"):
        parts.append("flags " + " ".join(host["flags"]))
    if host.get("cores"):
        parts.append(f"{host['cores']} cores")
    if loads:
        parts.append(f"load average {min(loads):.1f}-{max(loads):.1f} during the runs")
    dates = sorted(r["time"][:10] for r in recs if r.get("time"))
    shas = sorted({r["git_sha"] for r in recs if r.get("git_sha")})
    parts.append(f"{dates[0] if dates else '?'}, effllm {', '.join(shas) or '?'}, torch {first['versions'].get('torch')}")
    return "; ".join(parts)


def render_features(records: list[dict], descriptions: dict[str, str] | None = None) -> str:
    latest = _latest([r for r in records if r.get("kind") == "model"])
    by_case: dict[str, list[dict]] = defaultdict(list)
    for rec in latest.values():
        by_case[rec["op"]].append(rec)
    out = []
    for feature in FEATURES:
        cases = sorted(name for name in by_case if name.startswith(feature.prefix))
        out.append(f"### {feature.title}\n")
        if not cases:
            out.append("| not measured yet |\n|---|\n"
                       f"| _placeholder: no model-level records yet; `{feature.command}` fills this table_ |\n")
            continue
        for name in cases:
            out.append(_case_table(name, by_case[name], (descriptions or {}).get(name)))
    return "\n".join(out).rstrip() + "\n"


def _case_table(name: str, recs: list[dict], description: str | None = None) -> str:
    """One table per parameter set of the case (in the order they were run), baseline row first."""
    groups: dict[str, list[dict]] = {}
    for rec in recs:
        groups.setdefault(shape_label(rec["shape"]), []).append(rec)
    out = [f"`{name}`{': ' + description if description else ''}.\n"]
    for label, group in groups.items():
        out.append(_params_table(label, group))
    samples = sorted({r["metric"].get("samples") for r in recs if r["metric"].get("samples")})
    note = f"Timed columns: median of {'/'.join(str(int(s)) for s in samples)} runs, providers interleaved. " \
        if samples else ""
    out.append(f"{note}{_host_line(recs)}.\n")
    return "\n".join(out)


def _params_table(label: str, recs: list[dict]) -> str:
    # A column that rounds to zero everywhere says nothing (e.g. a peak-RSS rise of a few KiB).
    metrics = [m for m in METRICS if m != "samples" and any(abs(r["metric"].get(m) or 0) >= 0.05 for r in recs)]
    order = {p: i for i, p in enumerate(dict.fromkeys(r["provider"] for r in recs))}
    rows = sorted(recs, key=lambda r: (r["baseline"] is not None, order[r["provider"]]))
    index = {r["provider"]: r for r in recs}
    head = ["provider", *(_column_title(m) for m in metrics)]
    lines = [f"{label}:\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in rows:
        base = index.get(rec["baseline"]) if rec["baseline"] else None
        cells = [rec["provider"] + (" (baseline)" if rec["baseline"] is None and _is_baseline(rec, recs) else "")]
        for m in metrics:
            value = rec["metric"].get(m)
            if value is None:
                cells.append("-")
                continue
            ratio = _ratio(m, value, base["metric"][m]) if base and m in base["metric"] else ""
            cells.append(_fmt(m, value) + ratio)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_baseline(rec: dict, recs: list[dict]) -> bool:
    return any(r["baseline"] == rec["provider"] for r in recs)


def render_kernels(records: list[dict], *, case_baselines: dict[str, str | None] | None = None) -> str:
    latest = _latest([r for r in records if r.get("kind", "kernel") == "kernel"])
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in latest.values():
        groups[(rec["device"], rec["op"])].append(rec)
    out = []
    for device in sorted({d for d, _ in groups}):
        device_recs = [r for (d, _), recs in groups.items() if d == device for r in recs]
        out.append(f"### {device}\n\n{_host_line(device_recs)}.\n")
        for (d, op), recs in sorted(groups.items()):
            if d != device:
                continue
            out.append(_kernel_table(op, recs, (case_baselines or {}).get(op)))
    return "\n".join(out).rstrip() + "\n"


def _kernel_table(op: str, recs: list[dict], fallback_baseline: str | None) -> str:
    index = {(r["dtype"], shape_label(r["shape"]), r["provider"]): r for r in recs}
    lines = [f"**{op}**\n", "| dtype | shape | provider | p50 ms | baseline | baseline p50 ms | speed vs baseline | refcheck |",
             "|---|---|---|---|---|---|---|---|"]
    slower = total = 0
    # effllm's providers are judged by speed against the baseline; a case without one (a cost
    # measurement, e.g. a check next to the call it guards) shows each provider's share of it.
    has_effllm = any(r["provider"].startswith("effllm") for r in recs)
    for rec in sorted(recs, key=lambda r: (r["dtype"], shape_label(r["shape"]), r["provider"])):
        base_name = rec.get("baseline") or (fallback_baseline if rec["provider"] != fallback_baseline else None)
        base = index.get((rec["dtype"], shape_label(rec["shape"]), base_name)) if base_name else None
        if base is None or (has_effllm and not rec["provider"].startswith("effllm")):
            continue
        ours, theirs = rec["metric"]["latency_ms"]["p50"], base["metric"]["latency_ms"]["p50"]
        speed = theirs / ours
        if has_effllm:
            total += 1
            slower += speed < 0.995
            verdict = f"{speed:.2f}x" + (" (slower)" if speed < 0.995 else "")
        else:
            verdict = f"costs {100 / speed:.1f}% of {base_name}"
        check = {True: "pass", False: "FAIL", None: "-"}[rec["refcheck"].get("passed")]
        lines.append(f"| {rec['dtype']} | {shape_label(rec['shape'])} | {rec['provider']} | {ours:.3f} | {base_name} | "
                     f"{theirs:.3f} | {verdict} | {check} |")
    if len(lines) == 3:
        return ""
    lines.append(f"\neffllm slower than the baseline in {slower} of {total} rows.\n" if total else "")
    return "\n".join(lines)


def _replace_block(text: str, markers: tuple[str, str], body: str, path: Path) -> str:
    start, end = markers
    if start not in text or end not in text:
        raise ValueError(f"{path} lacks the {start} / {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def default_root() -> Path:
    return Path(__file__).resolve().parents[3]


def render_all(*, root: str | Path | None = None, check: bool = False) -> int:
    from .registry import load_builtin_cases

    root = Path(root) if root else default_root()
    results = root / "benchmarks" / "results"
    if not results.is_dir():
        print(f"effllm bench render: no {results} (run it from a checkout of effllm)", file=sys.stderr)
        return 2
    records = load_results(results)
    cases = load_builtin_cases()
    baselines = {name: c.baseline for name, c in cases.items()}
    descriptions = {name: c.description for name, c in cases.items()}
    stale, updates = [], []
    for rel, markers, body in (("README.md", README_MARKERS, render_features(records, descriptions)),
                               ("docs/benchmarks.md", DOCS_MARKERS, render_kernels(records, case_baselines=baselines))):
        path = root / rel
        text = path.read_text()
        try:
            new = _replace_block(text, markers, body, path)
        except ValueError as exc:  # before anything is written: both pages change or neither
            print(f"effllm bench render: {exc}", file=sys.stderr)
            return 2
        if new != text:
            stale.append(rel)
            updates.append((path, new))
    if not check:
        for path, new in updates:
            path.write_text(new)
    if check:
        if stale:
            print(f"stale: {', '.join(stale)} (run 'effllm bench render')", file=sys.stderr)
            return 1
        print("README.md and docs/benchmarks.md match the records")
        return 0
    print(f"rewrote {', '.join(stale)}" if stale else "already up to date")
    return 0
