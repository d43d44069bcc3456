"""NSNQuant's encoder: the fused CPU loop (kv/native) against the torch ops, on the sub-vectors
of one SmolLM2 layer's keys (8-dim sub-vectors of T tokens x 3 KV heads x head dim 64)."""

from __future__ import annotations

import torch

from ...kv import codebook as cb
from ...kv import native
from ..registry import Setup, case

_SHAPES = [{"T": 1024, "stages": 2}, {"T": 4096, "stages": 2}, {"T": 4096, "stages": 1}]


@case("kv.nsn_encode", shapes=_SHAPES, baseline="torch", quick_shapes=_SHAPES[:1],
      description="NSNQuant codes of T tokens x 3 heads x 64 dims: the fused loop vs torch ops")
def nsn_encode_case(shape, dtype, device) -> Setup:
    gen = torch.Generator(device="cpu").manual_seed(0)
    y = torch.randn(shape["T"] * 3 * 64 // 8, 8, generator=gen).to(device, dtype)
    book, stages = cb.codebook(8), shape["stages"]
    providers = {"torch": lambda: cb.encode_torch(y, book, stages)}
    unavailable = {}
    if device.type == "cpu" and native.available():
        vectors = book.vectors.contiguous()
        providers["effllm"] = lambda: native.nsn_encode(y, vectors, book.beta, stages, cb.BEAM)
    else:
        unavailable["effllm"] = "the fused loops are CPU-only" if device.type != "cpu" else native.why_unavailable()
    return Setup(providers=providers, bytes_moved=y.numel() * y.element_size(), unavailable=unavailable)
