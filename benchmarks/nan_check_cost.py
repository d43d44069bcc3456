"""What the NaN-query-row convention costs on the CPU torch path: the check as shipped
(``effllm.kernels._checks.nan_query_rows``: one scalar sum read on the host) and a per-call
mask (the first version), against the attention call they follow. 1 thread, medians of 5.

    python benchmarks/nan_check_cost.py
"""

import platform
import time

import torch

import effllm
from effllm.kernels._checks import nan_query_rows


def median_seconds(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls)
    return sorted(runs)[2]


def per_call_mask(q, out):
    return out.masked_fill(q.isnan().any(-1, keepdim=True), float("nan"))


def main() -> None:
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, fp32, H 9/3, D 64")
    cases = [("decode", n, 300) for n in (128, 1024)] + [("prefill", n, 5) for n in (512, 2048)]
    for kind, n, calls in cases:
        q = torch.randn(1, 1 if kind == "decode" else n, 9, 64)
        k, v = torch.randn(1, n, 3, 64), torch.randn(1, n, 3, 64)
        if kind == "decode":
            call = median_seconds(lambda: effllm.kernels.decode_attention(q, k, v, n, backend="torch"), calls)
        else:
            call = median_seconds(lambda: effllm.kernels.attention(q, k, v, causal=True, backend="torch"), calls)
        out = torch.randn_like(q)
        shipped = median_seconds(lambda: nan_query_rows(q, out), 300)
        mask = median_seconds(lambda: per_call_mask(q, out), 300 if kind == "decode" else 20)
        print(f"{kind} length {n}: call {call * 1e6:9.1f} us; shipped check {shipped / call:6.1%}; "
              f"per-call mask {mask / call:6.1%}")


if __name__ == "__main__":
    main()
