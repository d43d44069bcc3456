"""One ragged layer's decode attention on CPU, as effllm's compressed caches call it: 3 rows
(KV heads) of 850 / 1050 / 1150 kept keys, 3 query heads each, D 64, fp32, 1 thread; stored as
one tensor of rows and as 64-token pages, with and without the per-key attention mass (H2O's
decode-time scores).

    python benchmarks/decode_ragged_layer.py      # mean us per call of each arm; writes nothing
"""

import time

import torch

from effllm.kernels.decode import decode_attention_unchecked
from effllm.kv.ragged import RaggedKV

LENGTHS, DIM = [850, 1050, 1150], 64


def _us_per_call(fn, repeats: int = 300) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    width = max(LENGTHS)
    keys, values = torch.randn(3, width, DIM), torch.randn(3, width, DIM)
    keep = torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]
    q = torch.randn(3, 1, 3, DIM)
    for page_size in (None, 64):
        args = RaggedKV.from_padded(keys, values, keep, page_size=page_size).decode_args()
        layout = "rows" if page_size is None else f"pages of {page_size}"
        for stats in (False, True):
            us = _us_per_call(lambda: decode_attention_unchecked(q, **args, return_stats=stats))
            print(f"{layout:12s} stats={stats!s:5s} {us:6.0f} us per call")


if __name__ == "__main__":
    main()
