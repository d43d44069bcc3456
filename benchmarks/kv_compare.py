"""Side-by-side table of effllm's policies and kvpress's presses from the two kv_quality runs.

    python benchmarks/kv_compare.py [--metric key]   # reads results/e2e/kv_quality.jsonl and kv_quality_kvpress.jsonl
    python benchmarks/kv_compare.py --set retrieval2   # the second retrieval set: kv_quality*_set2.jsonl
    python benchmarks/kv_compare.py --set retrieval3   # the third: kv_quality*_set3.jsonl

Each cell is the increase of the reference answer's mean NLL (``--metric key``: of the key's
digit tokens only) over the full cache of the same run (same prompts, same model; the two full-cache baselines are printed to show they agree),
with the exact-match rate after the slash; "± s" is the standard error of the per-prompt increase
(paired with the same run's full cache) where the run kept per-prompt NLLs. The last rows give
each provider's best per cell.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "e2e"
# row fields per metric: mean NLL, per-prompt NLLs, increase over the full cache
METRICS = {"answer": ("answer_nll", "answer_nlls", "nll_increase"),
           "key": ("key_nll", "key_nlls", "key_nll_increase")}
CELLS = [(c, b) for c in ("question in prompt", "question after") for b in ("50% removed", "75% removed")]

# each retrieval set's record files: kv_quality{suffix}.jsonl, kv_quality_kvpress{suffix}.jsonl
SET_SUFFIX = {"passkey": "", "retrieval2": "_set2", "retrieval3": "_set3"}


def pass_key_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("part") == "pass-key"]


def _paired_error(row: dict, base: dict, per_prompt: str) -> str:
    """" ± s": the standard error of the per-prompt NLL increase, when both runs kept them."""
    if per_prompt not in row or per_prompt not in base or len(row[per_prompt]) < 2:
        return ""
    diffs = [a - b for a, b in zip(row[per_prompt], base[per_prompt])]
    return f" ± {statistics.stdev(diffs) / len(diffs) ** 0.5:.3f}"


def table(providers: dict[str, list[dict]], metric: str = "answer") -> str:
    mean, per_prompt, increase = METRICS[metric]
    header = "| provider | policy | " + " | ".join(f"{c}, {b}" for c, b in CELLS) + " |"
    lines = [header, "|" + "---|" * (2 + len(CELLS))]
    best = {}
    for provider, rows in providers.items():
        base = {r["convention"]: r for r in rows if r["policy"] == "full cache"}
        mixed = sorted({f"{r['policy']} ({r.get('samples')})" for r in rows
                        if r.get("samples") != base[r["convention"]].get("samples")})
        if mixed:  # other prompts: neither the increases nor the pairing would mean anything
            raise SystemExit(f"{provider}: rows measured on a different number of prompts than the full cache "
                             f"({base[CELLS[0][0]].get('samples')}): {', '.join(mixed)}")
        lines.append(f"| {provider} | full cache | " + " | ".join(
            f"NLL {base[c][mean]:.3f} / {base[c]['exact_match']:.2f}" for c, _ in CELLS) + " |")
        names = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full cache"))
        for name in names:
            cells = []
            for convention, budget in CELLS:
                match = [r for r in rows if r["policy"] == name and r["convention"] == convention
                         and r["budget"] == budget]
                if not match or "error" in match[0]:
                    cells.append("crashed" if match else "-")
                    continue
                r = match[0]
                cells.append(f"{r[increase]:+.3f}{_paired_error(r, base[convention], per_prompt)} / "
                             f"{r['exact_match']:.2f}")
                key = (provider, convention, budget)
                if key not in best or r[increase] < best[key][1]:
                    best[key] = (name, r[increase])
            lines.append(f"| {provider} | {name} | " + " | ".join(cells) + " |")
    for provider in providers:
        lines.append(f"| **{provider} best** | | " + " | ".join(
            f"{best[(provider, c, b)][1]:+.3f} ({best[(provider, c, b)][0]})" if (provider, c, b) in best else "-"
            for c, b in CELLS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metric", choices=tuple(METRICS), default="answer")
    parser.add_argument("--set", dest="prompt_set", choices=tuple(SET_SUFFIX), default="passkey")
    args = parser.parse_args()
    suffix = SET_SUFFIX[args.prompt_set]
    providers = {"effllm": pass_key_rows(RESULTS / f"kv_quality{suffix}.jsonl")}
    kvpress = RESULTS / f"kv_quality_kvpress{suffix}.jsonl"
    if kvpress.exists():
        providers["kvpress"] = pass_key_rows(kvpress)
    print(table(providers, args.metric))


if __name__ == "__main__":
    main()
