"""One-off (session 18): one layer's KVzip replay attention (kv/kvzip.replay_attention) per
scoring, at a 4000-token cache and a 2068-token replay chunk (9 query / 3 KV heads, head dim 64,
float32, 1 thread; random tensors), three calls each; SDPA with the same causal mask alongside.

    python benchmarks/oneoff/kvzip_replay_speed.py
"""
import os
import time

import torch

from effllm.bench.records import host_info
from effllm.kv.kvzip import ReplayChunk, replay_attention

torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
stored, replayed, heads, kv_heads, dim = 4000, 2068, 9, 3, 64
q = torch.randn(1, heads, replayed, dim, generator=gen)
k = torch.randn(1, kv_heads, stored + replayed, dim, generator=gen)
v = torch.randn(1, kv_heads, stored + replayed, dim, generator=gen)
print(host_info(), "loadavg", os.getloadavg())
for name, scored in [("cache", None), ("chunk", ReplayChunk(2048, 4000, 4, False)),
                     ("local", ReplayChunk(2048, 4000, 4, True))]:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        replay_attention(q, k, v, 0.125, stored, scored=scored)
        times.append(time.perf_counter() - start)
    print(name, "s per call:", [round(t, 2) for t in times], flush=True)
mask = torch.ones(replayed, stored + replayed, dtype=torch.bool).tril(diagonal=stored)
start = time.perf_counter()
torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
print("sdpa (output only) s:", round(time.perf_counter() - start, 2))
