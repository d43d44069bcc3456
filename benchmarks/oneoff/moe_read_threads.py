"""One-off (session 19): a layer's on-demand misses read one after another (read_threads=1) or by
4 threads at once, on the SmolLM2-derived MoE (top-8 of 32, ~110 KB experts), store="disk" with
O_DIRECT (every miss a device read) and through the page cache, cache 2x (16 a layer), no
prefetch; 48 tokens of haystack.txt fed one at a time; rounds alternate the order.

    python benchmarks/oneoff/moe_read_threads.py
"""
import statistics
import tempfile
from pathlib import Path

import torch

from effllm.bench.cases.moe import SMOL_MOE, _smol_model, _teacher_forced
from effllm.moe import offload_experts
from effllm.testing.quality import shipped_text

torch.set_num_threads(1)
_, moe, tok, *_ = _smol_model(SMOL_MOE)
ids = tok(shipped_text("haystack.txt"), return_tensors="pt").input_ids[:, :48]
results = {}
for round_ in range(3):
    for direct in (True, False):
        for threads in ((1, 4) if round_ % 2 == 0 else (4, 1)):
            with tempfile.TemporaryDirectory(dir=".") as work:
                handle = offload_experts(moe, store="disk", path=Path(work) / "experts.safetensors", cache_experts=16,
                                         direct_io=direct, read_threads=threads)
                steps = _teacher_forced(moe, ids)
                stats = handle.stats()
                handle.remove()
            key = ("direct" if direct else "page cache", threads)
            results.setdefault(key, []).append((len(steps) / sum(steps), 1000 * stats["stall_s"] / len(steps),
                                                stats["misses"] / len(steps)))
            print(round_, key, [round(x, 2) for x in results[key][-1]], flush=True)
for key, runs in results.items():
    print(key, "tokens/s", [round(r[0], 2) for r in runs], "median", round(statistics.median(r[0] for r in runs), 2),
          "stall ms/token", [round(r[1], 1) for r in runs], "misses/token", round(runs[0][2], 1))
