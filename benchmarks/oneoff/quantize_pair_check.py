"""One-off (session 25): was quantize_pair (b64434c, removed in b609c02) equal to two quantize
calls, and what did it do to a prefill flush's peak memory? Run with the library of b64434c:

    PYTHONPATH=<checkout of b64434c>/src python benchmarks/oneoff/quantize_pair_check.py equal
    PYTHONPATH=... python benchmarks/oneoff/quantize_pair_check.py peak pair|two   (one process each)
"""

import resource
import sys

import torch

from effllm.kv.nsnquant import NSNQuant, quantize, quantize_pair

FIELDS = ("codes", "scales", "grid", "shift", "counts", "shift_scale")

if sys.argv[1] == "equal":
    print("cpu capability:", torch.backends.cpu.get_cpu_capability())
    for shape, chunk in [((1, 3, 16, 64), 16), ((1, 1, 24, 64), 24), ((1, 1, 64, 64), 64), ((2, 3, 96, 64), 32)]:
        config, differ = NSNQuant(bits=2, chunk=chunk), 0
        for seed in range(200):
            gen = torch.Generator().manual_seed(seed)
            keys = torch.randn(*shape, generator=gen) * 3 + torch.randn(shape[-1], generator=gen) * 5
            values = torch.randn(*shape, generator=gen)
            alone, paired = (quantize(keys, config), quantize(values, config)), quantize_pair(keys, values, config)
            differ += any(not torch.equal(getattr(a, n), getattr(p, n)) for a, p in zip(alone, paired, strict=True)
                          for n in FIELDS if getattr(a, n) is not None)
        print(f"{shape} chunk {chunk}: seeds where a half differs from its own call: {differ} / 200")
else:
    config = NSNQuant(bits=2)
    keys, values = torch.randn(1, 8, 8192, 128), torch.randn(1, 8, 8192, 128)
    quantize(keys[:, :, :64], config)  # the codebook and the native build first
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.argv[2] == "pair":
        quantize_pair(keys, values, config)
    else:
        quantize(keys, config), quantize(values, config)
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(f"{sys.argv[2]}: peak RSS rise {rise:.0f} MiB (keys and values: {2 * keys.numel() * 4 / 2**20:.0f} MiB)")
