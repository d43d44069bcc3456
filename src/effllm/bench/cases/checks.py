"""What input checks cost on the CPU torch path, next to the attention call they guard."""

from __future__ import annotations

import torch

from ...kernels import attention, decode_attention
from ...kernels._checks import nan_query_rows
from ..registry import Setup, case

# SmolLM2's heads (9 query, 3 KV, D 64): decode against 128 / 1024 keys, prefill of 512 / 2048 tokens.
_SHAPES = [{"call": "decode", "L": 128}, {"call": "decode", "L": 1024},
           {"call": "prefill", "L": 512}, {"call": "prefill", "L": 2048}]


@case("checks.nan_query_rows", shapes=_SHAPES, dtypes=("float32",), baseline="attention",
      description="cost of the NaN-query-row convention (one host read) and of a per-call mask, vs the attention "
                  "call itself (torch path)")
def nan_check(shape, dtype, device) -> Setup:
    gen = torch.Generator(device="cpu").manual_seed(0)
    n = shape["L"]
    q = torch.randn(1, 1 if shape["call"] == "decode" else n, 9, 64, generator=gen).to(device, dtype)
    k, v = (torch.randn(1, n, 3, 64, generator=gen).to(device, dtype) for _ in range(2))
    if shape["call"] == "decode":
        def call():
            return decode_attention(q, k, v, n, backend="torch")
    else:
        def call():
            return attention(q, k, v, causal=True, backend="torch")
    out = torch.randn_like(q)
    return Setup(providers={
        "attention": call,
        "nan-check": lambda: nan_query_rows(q, out),
        "per-call-mask": lambda: out.masked_fill(q.isnan().any(-1, keepdim=True), float("nan")),
    })
