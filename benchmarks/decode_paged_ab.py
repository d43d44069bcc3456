"""CPU paged decode against an earlier version of the torch path and the contiguous cache, side by
side: the shapes of ``effllm bench run attention.decode_paged`` (one query token, 16-token pages
shuffled across the pool), 1 thread.

    git show 080cb45:src/effllm/kernels/decode.py > benchmarks/_decode_baseline.py
    python benchmarks/decode_paged_ab.py --baseline benchmarks/_decode_baseline.py

Prints the median ms per call of each arm (``time_cpu_interleaved``: round-robin, so drift on a shared machine hits every
arm alike) and checks each output against the float32 reference; writes nothing.
"""

from __future__ import annotations

import argparse

import torch

from ab_baseline import load_baseline_module
from effllm.bench.timers import time_cpu_interleaved
from effllm.kernels import decode_attention, decode_reference

SHAPES = [(1, 4096, 9, 3, 64), (1, 4096, 32, 8, 128), (8, 1024, 32, 8, 128)]  # B, L, H, H_kv, D
PAGE = 16


def load_baseline(path: str):
    return load_baseline_module(path, "effllm.kernels._decode_baseline").decode_attention


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--rounds", type=int, default=45)
    args = parser.parse_args()
    torch.set_num_threads(1)
    baseline = load_baseline(args.baseline)
    for (b, n, h, hkv, d), dtype in ((s, t) for s in SHAPES for t in (torch.float32, torch.bfloat16)):
        gen = torch.Generator().manual_seed(0)
        pages = b * n // PAGE
        q = torch.randn(b, 1, h, d, generator=gen).to(dtype)
        k, v = (torch.randn(pages, PAGE, hkv, d, generator=gen).to(dtype) for _ in range(2))
        table = torch.randperm(pages, generator=gen).view(b, -1).to(torch.int32)
        seqlens = torch.full((b,), n, dtype=torch.int32)
        # the same tokens in a contiguous cache, in transformers' (B, H_kv, S, D) layout
        k_hf, v_hf = (c[table.flatten().long()].view(b, n, hkv, d).transpose(1, 2).contiguous() for c in (k, v))
        calls = {"contiguous": lambda: decode_attention(q, k_hf.transpose(1, 2), v_hf.transpose(1, 2), seqlens),
                 "paged, baseline": lambda: baseline(q, k, v, seqlens, block_table=table),
                 "paged, new": lambda: decode_attention(q, k, v, seqlens, block_table=table)}
        ref = decode_reference(q, k, v, seqlens, block_table=table)[0]
        for name, call in calls.items():
            error = float((call().float() - ref).abs().max())
            assert error < 2e-2, f"{name}: max error {error}"
        ms = {name: t["p50"] for name, t in time_cpu_interleaved(calls, repeats=args.rounds).items()}
        new = ms["paged, new"]
        print(f"B={b} L={n} H={h} Hkv={hkv} D={d} {str(dtype)[6:]:8s} "
              + "  ".join(f"{name} {t:.2f}" for name, t in ms.items())
              + f"  | new vs baseline {ms['paged, baseline'] / new:.2f}x, vs contiguous {ms['contiguous'] / new:.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
