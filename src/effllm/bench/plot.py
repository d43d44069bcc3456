"""``effllm bench plot``: kernel records as p50 latency per shape (one bar per provider, one panel
per (op, dtype)); model records as one panel per (case, metric), one bar per provider, with the
p20-p80 spread of timed metrics."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .records import shape_label


def _save(fig, out, dpi: int) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    _pyplot().close(fig)
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("effllm bench plot needs matplotlib: pip install 'effllm[bench]'") from exc
    return plt


def plot_records(records: list[dict], out: str | Path) -> Path:
    if records and all(r.get("kind") == "model" for r in records):
        return plot_model_records(records, out)
    records = [r for r in records if r.get("kind", "kernel") == "kernel"]
    if not records:
        raise ValueError("no benchmark records to plot")
    plt = _pyplot()

    panels: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in records:
        panels[(rec["op"], rec["dtype"])].append(rec)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, ((op, dtype), recs) in zip(axes[:, 0], sorted(panels.items())):
        shapes = list(dict.fromkeys(shape_label(r["shape"]) for r in recs))
        providers = list(dict.fromkeys(r["provider"] for r in recs))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            by_shape = {shape_label(r["shape"]): r["metric"]["latency_ms"] for r in recs if r["provider"] == provider}
            xs = [j + i * width for j, s in enumerate(shapes) if s in by_shape]
            p50 = [by_shape[s]["p50"] for s in shapes if s in by_shape]
            err = [
                [by_shape[s]["p50"] - by_shape[s]["p20"] for s in shapes if s in by_shape],
                [by_shape[s]["p80"] - by_shape[s]["p50"] for s in shapes if s in by_shape],
            ]
            ax.bar(xs, p50, width, yerr=err, label=provider, capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes, fontsize=7)
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(f"{op} [{dtype}] on {recs[0]['device']}", fontsize=9)
        ax.legend(fontsize=8)
    return _save(fig, out, dpi=110)


# The headline metrics a model plot shows (the tables have the rest).
MODEL_PLOT_METRICS = ("decode_tokens_per_s", "latency_ms", "weight_bytes", "kv_bytes", "perplexity", "cosine", "nll",
                      "exact_match")


def plot_model_records(records: list[dict], out: str | Path) -> Path:
    """One panel per (case, params, headline metric) whose providers differ: a bar per provider,
    the baseline first and gray."""
    from .records import METRICS

    plt = _pyplot()
    latest: dict[tuple, dict] = {}
    for rec in records:
        if rec.get("kind") == "model" and not rec.get("rev"):
            latest[(rec["op"], shape_label(rec["shape"]), rec["provider"])] = rec
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for (op, shape, _), rec in latest.items():
        groups[(op, shape)].append(rec)
    panels = []
    for (op, shape), recs in sorted(groups.items()):
        recs.sort(key=lambda r: r["baseline"] is not None)  # the baseline first
        for metric in MODEL_PLOT_METRICS:
            have = [r for r in recs if metric in r["metric"]]
            if len(have) > 1 and len({round(r["metric"][metric], 6) for r in have}) > 1:
                panels.append((op, shape, metric, have))
    if not panels:
        raise ValueError("no model records to plot")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (op, shape, metric, recs) in zip(axes.flat, panels):
        names = [r["provider"] for r in recs]
        values = [r["metric"][metric] for r in recs]
        spread = [r.get("quantiles", {}).get(metric) for r in recs]
        err = None
        if all(spread):
            err = [[v - q["p20"] for v, q in zip(values, spread)], [q["p80"] - v for v, q in zip(values, spread)]]
        bars = ax.bar(range(len(names)), values, yerr=err, capsize=2, color="tab:blue")
        for bar, rec in zip(bars, recs):
            if rec["baseline"] is None:
                bar.set_color("tab:gray")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        better = METRICS[metric].better
        ax.set_title(f"{op} ({shape})\n{metric} ({better} is better)", fontsize=8)
    device = records[0]["device"]
    fig.suptitle(f"{device}; gray: baseline; whiskers: p20-p80 of the runs", fontsize=8)
    return _save(fig, out, dpi=100)
