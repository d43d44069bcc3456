"""One-off (session 20): does cutting kv/native's loops across threads pay on this machine?

Run at the commit that added the cut (f74ba38 and this script's own commit):
    python benchmarks/oneoff/kv_native_threads.py
(a) one store's attention (1 query token, 9 query / 3 KV heads, D=64, 4000 coded tokens),
    torch at 1 or 2 threads, the loops' work cut in parts or not;
(b) NSNQuant key scores over 16000 tokens x 4 KV heads: one call, two independent calls at once on
    two Python threads (the machine's own scaling), the call cut in 2 parts with torch at 2
    threads (its OpenMP workers spinning between ops) and at 1 thread."""

import platform
import threading
import time

import torch

from effllm.kv import KIVI, NSNQuant, native
from effllm.kv import codes_attention as ca


def timed(fn, repeats):
    for _ in range(max(5, repeats // 10)):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def filled(config, tokens, kv_heads):
    gen = torch.Generator().manual_seed(0)
    store = config.new_store()
    store.append(torch.randn(1, kv_heads, tokens, 64, generator=gen), torch.randn(1, kv_heads, tokens, 64, generator=gen))
    return store


def main():
    print(platform.processor() or platform.machine(), "native:", native.available())
    query = torch.randn(1, 9, 1, 64)
    for name, config in (("NSNQuant-2", NSNQuant(bits=2)), ("KIVI-2", KIVI(bits=2, group=32, residual=128))):
        store = filled(config, 4000, 3)
        for threads, cut in ((1, True), (2, False), (2, True)) * 2:
            torch.set_num_threads(threads)
            native.MIN_PART_TOKENS = 1024 if cut else 10**9
            ms = timed(lambda: store.attend(query, 0.125), 200)
            print(f"(a) {name} attend, torch threads {threads}, {'cut' if cut and threads > 1 else 'not cut'}: {ms:.3f} ms")
    store = filled(NSNQuant(bits=2), 16000, 4)
    rows = ca._rows(torch.randn(1, 12, 1, 64), 4)
    out = rows.new_empty(4, rows.shape[2], store.key_codes.tokens())

    def scores():
        ca._native_scores_into(rows, store.key_codes, out)

    torch.set_num_threads(1)
    native.MIN_PART_TOKENS = 10**9
    one = timed(scores, 20)
    print(f"(b) one call: {one:.2f} ms")
    start = time.perf_counter()
    pair = [threading.Thread(target=lambda: [scores() for _ in range(20)]) for _ in range(2)]
    for thread in pair:
        thread.start()
    for thread in pair:
        thread.join()
    print(f"(b) two calls at once: {(time.perf_counter() - start) / 20 * 1e3:.2f} ms a pair (one after the other: {2 * one:.2f})")
    native.MIN_PART_TOKENS = 1024
    torch.set_num_threads(2)
    print(f"(b) cut in 2, torch at 2 threads: {timed(scores, 20):.2f} ms")
    torch.set_num_threads(1)
    split = native.split_work
    native.split_work = lambda heads, units, unit_tokens, threads=None: split(heads, units, unit_tokens, 2)
    print(f"(b) cut in 2, torch at 1 thread: {timed(scores, 20):.2f} ms")
    native.split_work = split


if __name__ == "__main__":
    main()
