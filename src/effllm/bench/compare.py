"""``effllm bench compare A.jsonl B.jsonl``: B against A, per matching record and metric.

Kernel records compare their p50 latency; model records every metric both have (timed medians
and exact ones such as perplexity), each judged in its own direction (``records.METRICS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import METRICS, record_key, shape_label


@dataclass
class Comparison:
    key: tuple
    a_ms: float  # A's value of ``metric`` (the name is kept for kernel latencies, its first use)
    b_ms: float
    metric: str = "latency_ms"

    @property
    def ratio(self) -> float:
        """B / A: above 1 means B is larger (slower, for a latency)."""
        return self.b_ms / self.a_ms if self.a_ms > 0 else float("inf")

    @property
    def worse_by(self) -> float:
        """How much worse B is than A in the metric's direction (negative: better)."""
        better = METRICS[self.metric].better if self.metric in METRICS else "lower"
        return self.ratio - 1.0 if better == "lower" else (1.0 / self.ratio - 1.0 if self.ratio else float("inf"))


def _value(rec: dict, metric: str) -> float | None:
    v = rec["metric"].get(metric)
    if isinstance(v, dict):
        v = v.get("p50")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def compare_records(a: list[dict], b: list[dict]) -> tuple[list[Comparison], list[tuple], list[tuple]]:
    """Match records by (op, provider, dtype, shape); the last record of a key wins."""
    a_by = {record_key(r): r for r in a}
    b_by = {record_key(r): r for r in b}
    rows = []
    for k, ra in a_by.items():
        rb = b_by.get(k)
        if rb is None:
            continue
        metrics = ["latency_ms"] if ra.get("kind", "kernel") == "kernel" else \
            [m for m in ra["metric"] if m != "samples" and m in rb["metric"]]
        for m in metrics:
            va, vb = _value(ra, m), _value(rb, m)
            if va is not None and vb is not None:
                rows.append(Comparison(k, va, vb, m))
    only_a = [k for k in a_by if k not in b_by]
    only_b = [k for k in b_by if k not in a_by]
    return rows, only_a, only_b


def format_comparison(rows: list[Comparison], threshold: float) -> tuple[str, int]:
    """Return the table text and the number of regressions (B worse than A by more than threshold)."""
    header = f"{'op':<24} {'provider':<18} {'dtype':<9} {'shape':<32} {'metric':<20} {'A':>10} {'B':>10} {'B/A':>6}"
    lines = [header, "-" * len(header)]
    regressions = 0
    for row in sorted(rows, key=lambda r: (r.key, r.metric)):
        op, provider, dtype, shape = row.key
        flag = ""
        if row.worse_by > threshold:
            flag = "  REGRESSION"
            regressions += 1
        elif row.worse_by < -threshold:
            flag = "  better"
        lines.append(
            f"{op:<24} {provider:<18} {dtype:<9} {shape_label(dict(shape)):<32} {row.metric:<20} "
            f"{row.a_ms:>10.4g} {row.b_ms:>10.4g} {row.ratio:>6.2f}{flag}"
        )
    return "\n".join(lines), regressions
