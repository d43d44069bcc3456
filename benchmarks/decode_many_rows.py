"""CPU decode over many rows of a paged ragged KV store (a batch of compressed sequences: rows are
(batch row, KV head) pairs of different lengths, pages laid out by effllm): one call per row
against one batched call over the gathered pages, side by side, with and without the per-key
attention mass (H2O's decode-time scores); 3 query heads per row, D 64, fp32, 1 thread. Picks
``IN_PLACE_MIN_MEAN_KEYS``; writes nothing.

    python benchmarks/decode_many_rows.py
"""

from __future__ import annotations

import torch

import effllm.kernels.decode as decode
from effllm.bench.timers import time_cpu_interleaved
from effllm.kv.ragged import RaggedKV

CASES = [(17, 300), (24, 1000), (32, 2000), (48, 500), (96, 250), (256, 100)]  # rows, mean kept keys


def _call(q, args, *, one_by_one: bool, stats: bool):
    def run():
        saved = decode.IN_PLACE_MAX_ROWS, decode.IN_PLACE_MIN_MEAN_KEYS
        decode.IN_PLACE_MAX_ROWS, decode.IN_PLACE_MIN_MEAN_KEYS = (10**9, 0) if one_by_one else (0, 10**9)
        try:
            return decode.decode_attention_unchecked(q, args["k_cache"], args["v_cache"], args["cache_seqlens"],
                                                     args["block_table"], return_stats=stats)
        finally:
            decode.IN_PLACE_MAX_ROWS, decode.IN_PLACE_MIN_MEAN_KEYS = saved
    return run


def main() -> None:
    torch.set_num_threads(1)
    for rows, mean in CASES:
        gen = torch.Generator().manual_seed(rows)
        lengths = (torch.rand(rows, generator=gen) * 0.4 + 0.8) * mean
        keys = torch.randn(rows, int(lengths.max()) + 1, 64, generator=gen)
        keep = torch.arange(keys.shape[1])[None] < lengths[:, None]
        args = RaggedKV.from_padded(keys, -keys, keep, page_size=64).decode_args()
        q = torch.randn(rows, 1, 3, 64, generator=gen)
        for stats in (False, True):
            calls = {"batched": _call(q, args, one_by_one=False, stats=stats),
                     "one by one": _call(q, args, one_by_one=True, stats=stats)}
            torch.testing.assert_close(calls["batched"]()[0], calls["one by one"]()[0], rtol=1e-4, atol=1e-5)
            ms = {name: t["p50"] for name, t in time_cpu_interleaved(calls, repeats=30).items()}
            print(f"rows={rows:3d} mean keys={mean:4d} stats={stats!s:5s}  batched {ms['batched']:6.2f} ms  "
                  f"one by one {ms['one by one']:6.2f} ms  | one by one {ms['batched'] / ms['one by one']:.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
