"""The W4A16 kernel against an earlier version of itself and bf16 ``F.linear``, side by side (CUDA).

    git show 372a10d:src/effllm/kernels/triton/w4a16.py > benchmarks/_w4a16_baseline.py
    python benchmarks/w4a16_ab.py --baseline benchmarks/_w4a16_baseline.py --out ab.json

Both kernels run with their own ``launch_config``; bf16 activations, group 128, Llama shapes.
Each call is timed eagerly (CUDA events) and as device time (20 calls in one CUDA graph), and
checked against the dequantized product.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from ab_baseline import load_baseline_module
from gpu_tuning import _graph_time, _time

SHAPES = ((4096, 4096), (8192, 2048), (2048, 8192), (14336, 4096))
ROWS = (1, 4, 16, 64, 128, 512, 2048)


def load_baseline(path: str):
    return load_baseline_module(path, "effllm.kernels.triton._w4a16_baseline").w4a16_matmul


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from effllm.kernels.triton.w4a16 import w4a16_matmul
    from effllm.quant import formats

    baseline = load_baseline(args.baseline)
    group = 128
    rows = [dict(part="device", name=torch.cuda.get_device_name(), torch=torch.__version__, baseline=args.baseline)]
    for (n, k), m in itertools.product(SHAPES, ROWS):
        gen = torch.Generator().manual_seed(n + k + m)
        q, scales, zeros = formats.int4_quantize(torch.randn(n, k, generator=gen) * k ** -0.5, group)
        qweight = formats.int4_pack(q).to("cuda")
        scales, zeros = scales.to("cuda", torch.bfloat16), zeros.to("cuda", torch.bfloat16)
        w = formats.int4_dequantize(q, scales.float().cpu(), zeros.float().cpu(), group).to("cuda", torch.bfloat16)
        x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
        ref = x.float() @ w.float().t()
        calls = {"bf16": lambda: F.linear(x, w),
                 "baseline": lambda: baseline(x, qweight, scales, zeros, group),
                 "new": lambda: w4a16_matmul(x, qweight, scales, zeros, group)}
        row = dict(M=m, N=n, K=k)
        for name, fn in calls.items():
            row[f"{name}_err"] = (fn().float() - ref).abs().max().item() / ref.abs().max().item()
            row[f"{name}_ms"] = _time(fn)
            row[f"{name}_graph_ms"] = _graph_time(fn)
        rows.append(row)
        print(json.dumps({key: round(val, 5) if isinstance(val, float) else val for key, val in row.items()}),
              flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
