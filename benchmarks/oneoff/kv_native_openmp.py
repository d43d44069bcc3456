"""One-off (session 20): a store's attention over its codes with the fused loops serial or shared
across torch's OpenMP threads, side by side in one process.

    python benchmarks/oneoff/kv_native_openmp.py

For each store (1 query token, 3 query rows a KV head, D=64: 3 KV heads x 4000 coded tokens, and
4 x 16000), interleaved rounds of: torch on 1 thread; torch on 2 threads with the loops serial
(MIN_PARALLEL_TOKENS out of reach); torch on 2 threads with the loops shared. Medians of 5
rounds of 200 (50 for the long store) calls."""

import statistics
import time

import torch

from effllm.kv import KIVI, NSNQuant, native

SETTINGS = (("1 thread", 1, True), ("2 threads, loops serial", 2, False), ("2 threads, loops shared", 2, True))


def filled(config, tokens, kv_heads):
    gen = torch.Generator().manual_seed(0)
    store = config.new_store()
    store.append(torch.randn(1, kv_heads, tokens, 64, generator=gen), torch.randn(1, kv_heads, tokens, 64, generator=gen))
    return store


def main():
    default = native.MIN_PARALLEL_TOKENS
    print("native:", native.available(), "openmp:", native.openmp())
    for name, config in (("NSNQuant-2", NSNQuant(bits=2)), ("KIVI-2", KIVI(bits=2, group=32, residual=128))):
        for tokens, kv_heads, calls in ((4000, 3, 200), (16000, 4, 50)):
            store = filled(config, tokens, kv_heads)
            query = torch.randn(1, 3 * kv_heads, 1, 64)
            times = {label: [] for label, _, _ in SETTINGS}
            for _ in range(5):
                for label, threads, shared in SETTINGS:
                    torch.set_num_threads(threads)
                    native.MIN_PARALLEL_TOKENS = default if shared else 10**12
                    for _ in range(10):
                        store.attend(query, 0.125)
                    start = time.perf_counter()
                    for _ in range(calls):
                        store.attend(query, 0.125)
                    times[label].append((time.perf_counter() - start) / calls * 1e3)
            one = statistics.median(times["1 thread"])
            for label, values in times.items():
                ms = statistics.median(values)
                print(f"{name} {tokens} tokens x {kv_heads} heads, {label}: {ms:.3f} ms ({one / ms:.2f}x 1 thread)")
    native.MIN_PARALLEL_TOKENS = default


if __name__ == "__main__":
    main()
