"""``effllm bench compare A.jsonl B.jsonl``: B's latency over A's, per matching record."""

from __future__ import annotations

from dataclasses import dataclass

from .records import record_key, shape_label


@dataclass
class Comparison:
    key: tuple
    a_ms: float
    b_ms: float

    @property
    def ratio(self) -> float:
        """B / A latency: above 1 means B is slower."""
        return self.b_ms / self.a_ms if self.a_ms > 0 else float("inf")


def compare_records(a: list[dict], b: list[dict]) -> tuple[list[Comparison], list[tuple], list[tuple]]:
    """Match records by (op, provider, dtype, shape); the last record of a key wins."""
    a_by = {record_key(r): r for r in a}
    b_by = {record_key(r): r for r in b}
    rows = [
        Comparison(k, a_by[k]["metric"]["latency_ms"]["p50"], b_by[k]["metric"]["latency_ms"]["p50"])
        for k in a_by
        if k in b_by
    ]
    only_a = [k for k in a_by if k not in b_by]
    only_b = [k for k in b_by if k not in a_by]
    return rows, only_a, only_b


def format_comparison(rows: list[Comparison], threshold: float) -> tuple[str, int]:
    """Return the table text and the number of regressions (B slower than A by more than threshold)."""
    header = f"{'op':<24} {'provider':<14} {'dtype':<9} {'shape':<36} {'A ms':>9} {'B ms':>9} {'B/A':>6}"
    lines = [header, "-" * len(header)]
    regressions = 0
    for row in sorted(rows, key=lambda r: r.key):
        op, provider, dtype, shape = row.key
        flag = ""
        if row.ratio > 1.0 + threshold:
            flag = "  REGRESSION"
            regressions += 1
        elif row.ratio < 1.0 - threshold:
            flag = "  faster"
        lines.append(
            f"{op:<24} {provider:<14} {dtype:<9} {shape_label(dict(shape)):<36} "
            f"{row.a_ms:>9.3f} {row.b_ms:>9.3f} {row.ratio:>6.2f}{flag}"
        )
    return "\n".join(lines), regressions
