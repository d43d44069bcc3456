"""Rebuild the README's results table from the committed benchmark records.

    python benchmarks/render_readme.py            # rewrites the block between the markers
    python benchmarks/render_readme.py --check    # exits 1 when the README is stale

For every (op, dtype, shape) the table shows effllm's p50 latency, the baseline provider's and
the ratio baseline / effllm measured in the same run (above 1: effllm is faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effllm.bench.records import read_jsonl, shape_label

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
# Per op: (effllm's provider, the provider it is measured against) pairs.
PAIRS = {
    "attention.prefill": [("effllm", "sdpa")],
    "attention.prefill_fwd_bwd": [("effllm", "sdpa")],
    "attention.decode": [("effllm", "hf-sdpa")],
    "attention.decode_paged": [("effllm-paged", "effllm-contiguous")],
    "quant.linear": [("effllm-int4", "fp32"), ("effllm-int8", "fp32"), ("effllm-int4-bf16x", "torchao-int4-bf16x"),
                     ("effllm-int8", "torchao-int8"), ("effllm-int4-bf16x", "bf16"), ("effllm-fp8-row", "bf16")],
    "rms_norm": [("effllm", "hf-eager")],
}


def render() -> str:
    lines = [
        "| op | dtype | shape | device | effllm | p50 ms | baseline | baseline p50 ms | baseline / effllm | refcheck |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("*.jsonl")):
        records = read_jsonl(path)
        latest = {}
        for rec in records:  # last record of a key wins
            latest[(rec["op"], rec["dtype"], shape_label(rec["shape"]), rec["provider"])] = rec
        for (op, dtype, shape, provider), rec in sorted(latest.items()):
            for ours_name, base_name in PAIRS.get(op, []):
                base = latest.get((op, dtype, shape, base_name))
                if ours_name != provider or base is None:
                    continue
                ours, theirs = rec["metric"]["latency_ms"]["p50"], base["metric"]["latency_ms"]["p50"]
                check = {True: "pass", False: "FAIL", None: "-"}[rec["refcheck"].get("passed")]
                lines.append(
                    f"| {op} | {dtype} | {shape} | {path.stem} | {provider} | {ours:.3f} | {base_name} | "
                    f"{theirs:.3f} | {theirs / ours:.2f}x | {check} |"
                )
    for path in sorted(RESULTS.glob("*.jsonl")):
        devices = sorted({r["device"] for r in read_jsonl(path)})
        lines.append(f"\n`{path.stem}`: {'; '.join(devices)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md lacks the {START} / {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render()}\n{END}{tail}"
    if args.check:
        return 0 if new == text else 1
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
