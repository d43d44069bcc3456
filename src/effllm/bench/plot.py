"""``effllm bench plot``: p50 latency per shape, one bar per provider, one panel per (op, dtype)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .records import shape_label


def plot_records(records: list[dict], out: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("effllm bench plot needs matplotlib: pip install 'effllm[bench]'") from exc
    records = [r for r in records if r.get("kind", "kernel") == "kernel"]
    if not records:
        raise ValueError("no kernel benchmark records to plot (model records are tabulated by 'effllm bench render')")

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
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
