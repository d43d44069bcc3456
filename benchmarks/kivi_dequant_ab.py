"""A KIVI layer's read (``KIVIStore.keys()`` and ``values()``: what ``QuantizedKVCache`` does
for every layer at every step) against an earlier ``quantizers.py``, side by side, 1 thread, at
a SmolLM2 layer of 4096 tokens (3 KV heads, D 64); each arm quantizes the same tensors its own
way and must return the same values. Writes nothing.

    git show 2e498ab:src/effllm/kv/quantizers.py > benchmarks/_quantizers_baseline.py
    python benchmarks/kivi_dequant_ab.py --baseline benchmarks/_quantizers_baseline.py
"""

from __future__ import annotations

import argparse

import torch

from ab_baseline import load_baseline_module
from effllm.bench.timers import time_cpu_interleaved
from effllm.kv import quantizers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    baseline = load_baseline_module(args.baseline, "effllm.kv._quantizers_baseline")
    for dtype in (torch.float32, torch.bfloat16):
        for bits in (2, 4):
            gen = torch.Generator().manual_seed(bits)
            keys, values = (torch.randn(1, 3, 4096, 64, generator=gen).to(dtype) for _ in range(2))
            stores = {}
            for name, module in (("baseline", baseline), ("new", quantizers)):
                stores[name] = module.KIVI(bits, 32, 128).new_store()
                stores[name].append(keys, values)
            for read in ("keys", "values"):  # fused multiply-add vs two roundings: an ulp apart at most
                tol = 1e-6 if dtype == torch.float32 else 2**-7
                torch.testing.assert_close(getattr(stores["new"], read)(), getattr(stores["baseline"], read)(),
                                           rtol=tol, atol=tol)
            calls = {name: (lambda s=store: (s.keys(), s.values())) for name, store in stores.items()}
            ms = {name: t["p50"] for name, t in time_cpu_interleaved(calls, repeats=args.rounds).items()}
            print(f"{str(dtype)[6:]:8s} {bits} bits  baseline {ms['baseline']:.2f} ms  new {ms['new']:.2f} ms  "
                  f"| {ms['baseline'] / ms['new']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
