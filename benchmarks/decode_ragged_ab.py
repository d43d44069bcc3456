"""Op-level A/B of the torch decode path over ragged rows: one layer's rows after a budget shared
across heads (lengths 60 to 8000 tokens, 64-token pages laid out row after row, as effllm's
compressed caches store them), fp32, one query token, 3 query heads per KV head, D 64, 1 thread.

    python benchmarks/decode_ragged_ab.py      # median ms per call of each arm; writes nothing

Arms: as shipped (rows on consecutive pages read in place, one call each); every row's pages
gathered into length buckets; all rows gathered and padded to the longest (the path before
session 5).
"""

import time

import torch

import effllm.kernels.decode as decode

LENGTHS = [8000, 6000, 300, 150, 4000, 90, 60, 2500]
PAGE, DIM, GROUP = 64, 64, 3


def main(repeats: int = 30) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    pages = [-(-n // PAGE) for n in LENGTHS]
    k, v = (torch.randn(sum(pages), PAGE, 1, DIM, generator=gen) for _ in range(2))
    table = torch.zeros(len(LENGTHS), max(pages), dtype=torch.int32)
    first = 0
    for row, n in enumerate(pages):
        table[row, :n] = torch.arange(first, first + n)
        first += n
    q = torch.randn(len(LENGTHS), 1, GROUP, DIM, generator=gen)
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32)
    shipped = (decode.BUCKET_WASTE, decode.IN_PLACE_MAX_ROWS)
    arms = {"shipped": shipped, "gathered, buckets": (shipped[0], 0), "gathered, padded": (float("inf"), 0)}
    times = {name: [] for name in arms}
    outs = {}
    try:
        for _ in range(repeats):  # round-robin: drift on a shared machine hits every arm
            for name, (decode.BUCKET_WASTE, decode.IN_PLACE_MAX_ROWS) in arms.items():
                start = time.perf_counter()
                outs[name] = decode.decode_attention_unchecked(q, k, v, seqlens, table, backend="torch")
                times[name].append(time.perf_counter() - start)
    finally:
        decode.BUCKET_WASTE, decode.IN_PLACE_MAX_ROWS = shipped
    for name, values in times.items():
        err = (outs[name] - outs["shipped"]).abs().max().item()
        print(f"{name:18s} {sorted(values)[len(values) // 2] * 1e3:7.3f} ms   max |diff| vs shipped {err:.1e}")
    print(f"keys {sum(LENGTHS)}, padded {max(LENGTHS) * len(LENGTHS)}")


if __name__ == "__main__":
    main()
