"""Ragged KV layout on CPU: decode time and memory of AdaKV's per-head budgets for each page size.

    python benchmarks/kv_page_size.py [--threads 1]

AdaKV(SnapKV) with 75% of a ~4k-token SmolLM2 prompt removed leaves heads of different lengths.
``page_size=None`` stores them in one tensor padded to the longest head; an int pages them.
The layouts decode in turns (4 rounds of 4 tokens, median), side by side in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from effllm.demo import build_prompt
from effllm.kv import AdaKV, SnapKV, compress
from effllm.testing.models import smollm2

PAGE_SIZES = (None, 16, 64)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = smollm2()
    prompt = build_prompt(tok, 4000, seed=99)
    with compress(model, AdaKV(SnapKV(0.25))) as kv:
        caches = {}
        for page_size in PAGE_SIZES:
            caches[page_size] = kv.new_cache(page_size=page_size)
            model(prompt.input_ids, past_key_values=caches[page_size], use_cache=True)
        times = {page_size: [] for page_size in PAGE_SIZES}
        for _ in range(4):  # layouts take turns: machine noise hits them alike
            for page_size, cache in caches.items():
                start = time.perf_counter()
                for _ in range(4):
                    model(torch.tensor([[5]]), past_key_values=cache, use_cache=True)
                times[page_size].append((time.perf_counter() - start) / 4)
    base = statistics.median(times[None])
    for page_size, cache in caches.items():
        stats = cache.stats()
        step = statistics.median(times[page_size])
        print(f"page_size={page_size!s:5s} {step * 1e3:7.1f} ms/token ({step / base:.2f}x the one-tensor layout)  "
              f"KV {stats['kv_bytes'] / stats['kv_bytes_full']:.3f} of the full cache")


if __name__ == "__main__":
    main()
