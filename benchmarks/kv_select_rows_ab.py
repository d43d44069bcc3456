"""``RaggedKV.select_rows`` (beam reorder, page relayout) against an earlier ``ragged.py``, side by
side, 1 thread: rows of kept tokens at SmolLM2-like and larger shapes, paged (64-token pages) and
rows layouts. Checks that both give the same rows; writes nothing.

    git show 9c9b98e:src/effllm/kv/ragged.py > benchmarks/_ragged_baseline.py
    python benchmarks/kv_select_rows_ab.py --baseline benchmarks/_ragged_baseline.py
"""

from __future__ import annotations

import argparse

import torch

from ab_baseline import load_baseline_module
from effllm.bench.timers import time_cpu_interleaved
from effllm.kv.ragged import RaggedKV

SHAPES = [(3, 2000, 64, torch.float32), (12, 1000, 64, torch.float32), (32, 1000, 128, torch.bfloat16)]  # R, S, D


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    baseline = load_baseline_module(args.baseline, "effllm.kv._ragged_baseline").RaggedKV
    for page_size in (64, None):
        for rows, seq, dim, dtype in SHAPES:
            gen = torch.Generator().manual_seed(0)
            keys = torch.randn(rows, seq, dim, generator=gen).to(dtype)
            keep = torch.rand(rows, seq, generator=gen) < torch.linspace(0.2, 0.6, rows)[:, None]
            new, old = (cls.from_padded(keys, -keys, keep, page_size=page_size) for cls in (RaggedKV, baseline))
            order = torch.arange(rows).flip(0)
            room = (new.lengths_host / 16).long() + 1  # what a relayout reserves
            got, want = new.select_rows(order, room), old.select_rows(order, room)
            assert torch.equal(got.lengths_host, want.lengths_host)
            for a, b in zip(got.padded(), want.padded()):
                assert all(torch.equal(a[r, :n], b[r, :n]) for r, n in enumerate(got.lengths_host.tolist()))
            ms = {name: t["p50"] for name, t in time_cpu_interleaved(
                {"baseline": lambda: old.select_rows(order, room), "new": lambda: new.select_rows(order, room)},
                repeats=args.rounds).items()}
            print(f"page_size={page_size} R={rows} S={seq} D={dim} {str(dtype)[6:]:8s} baseline {ms['baseline']:.2f} ms"
                  f"  new {ms['new']:.2f} ms  | {ms['baseline'] / ms['new']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
