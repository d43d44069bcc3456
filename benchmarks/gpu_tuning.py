"""GPU-only measurements behind the Triton launch choices (needs CUDA; writes one JSON file).

    python benchmarks/gpu_tuning.py --out gpu_tuning.json [--parts w4a16,decode]

- ``w4a16``: every tile configuration in a small grid for the fused W4A16 kernel at Llama shapes,
  bf16 activations, group 128, checked against the dequantized product and timed as device time
  (CUDA graphs), next to bf16 ``F.linear`` on the same weight and to dequantise-then-``F.linear``.
  Picks ``launch_config``'s tiles and ``DEQUANT_MIN_ROWS``.
- ``decode``: where a decode call's time goes: ``decode_attention`` with a tensor of lengths (range
  checks read it: a device sync), with an int (no sync), and the kernel launches alone
  (``decode_fwd``), against SDPA.
- ``graphs``: the same calls captured 20 at a time in a CUDA graph, so launch overhead is gone and
  what is left is device time: decode (contiguous and paged, page 16) against SDPA, the INT4 / FP8
  modules against bf16 ``F.linear``.
- ``fp8quant``: per-token FP8 activation quantization, torch ops against the Triton kernel.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F


def _time(fn, repeats=50) -> float:
    """Median ms of ``fn()`` over ``repeats`` back-to-back calls (warm L2, as in a decode loop)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _graph_time(fn, calls: int = 20) -> float:
    """Device ms per call of ``fn``: ``calls`` calls captured in one CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return _time(graph.replay, repeats=20) / calls


def _w4a16_configs(m: int):
    if m <= 16:
        for bn, bk, split, stages in itertools.product((64, 128, 256), (64, 128), (1, 2, 4, 8), (3, 4)):
            yield dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=stages)
    elif m <= 256:
        for bm, bn, split, warps in itertools.product((32, 64, 128), (64, 128), (1, 2, 4), (4, 8)):
            if bm <= max(32, m):
                yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, num_warps=warps, num_stages=3)


def part_w4a16() -> list[dict]:
    from effllm.kernels.triton._common import dot_dtype
    from effllm.kernels.triton.w4a16 import _w4a16_kernel, launch_config, w4a16_matmul
    from effllm.quant import formats

    rows = []
    group = 128
    for (n, k), m in itertools.product(((4096, 4096), (8192, 2048), (2048, 8192)), (1, 16, 32, 64, 128, 256, 2048)):
        gen = torch.Generator().manual_seed(n + k + m)
        w = torch.randn(n, k, generator=gen) * k ** -0.5
        q, scales, zeros = formats.int4_quantize(w, group)
        qweight = formats.int4_pack(q).to("cuda")
        scales, zeros = scales.to("cuda", torch.bfloat16), zeros.to("cuda", torch.bfloat16)
        w_deq = formats.int4_dequantize(q, scales.float().cpu(), zeros.float().cpu(), group).to("cuda", torch.bfloat16)
        x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
        ref = (x.float() @ w_deq.float().t())
        # device time (CUDA graphs): an eager call of any of them is mostly launch overhead at small M
        bf16_ms = _graph_time(lambda: F.linear(x, w_deq))
        dequant_ms = _graph_time(lambda: w4a16_matmul(x, qweight, scales, zeros, group, method="dequant"))

        def launch(cfg):
            grid = (-(-m // cfg["BLOCK_M"]), -(-n // cfg["BLOCK_N"]), cfg["SPLIT_K"])
            atomic = cfg["SPLIT_K"] > 1
            y = (torch.zeros if atomic else torch.empty)(m, n, dtype=torch.float32 if atomic else x.dtype, device="cuda")
            _w4a16_kernel[grid](x, qweight, scales, zeros, y, m, n, k, *x.stride(), *qweight.stride(),
                                *scales.stride(), *y.stride(), GROUP=group, DOT_DT=dot_dtype(x.dtype), PRECISION="tf32", **cfg)
            return y.to(x.dtype)

        current = launch_config(m, n, k, group, x.device)
        for cfg in [current, *_w4a16_configs(m)]:
            try:
                err = (launch(cfg).float() - ref).abs().max().item()
                ms = _graph_time(lambda cfg=cfg: launch(cfg))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
                rows.append(dict(part="w4a16", M=m, N=n, K=k, config=cfg, error=str(exc)[:200]))
                continue
            rows.append(dict(part="w4a16", M=m, N=n, K=k, config=cfg, current=cfg is current, ms=ms,
                             bf16_ms=bf16_ms, dequant_ms=dequant_ms, max_err=err, ref_scale=ref.abs().max().item()))
        best = min((r for r in rows if r.get("M") == m and r.get("N") == n and r.get("K") == k and "ms" in r),
                   key=lambda r: r["ms"])
        now = next(r for r in rows if r.get("current") and r["M"] == m and r["N"] == n and r["K"] == k)
        print(f"w4a16 M={m} N={n} K={k}: bf16 {bf16_ms:.4f} ms, dequant+bf16 {dequant_ms:.4f} ms, "
              f"current {now['ms']:.4f} ms, best {best['ms']:.4f} ms "
              f"{best['config']}", flush=True)
    return rows


DECODE_SHAPES = ((1, 4096), (1, 32768), (64, 4096))  # (batch, cached tokens); Llama-3-8B heads


def _decode_inputs(b: int, length: int):
    """One query token (32 heads) and a ``length``-token cache (8 KV heads), bf16, D 128."""
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(b, 1, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    k, v = (torch.randn(b, length, 8, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    return q, k, v


def _paged(k, v, page_size: int):
    """The contiguous cache ``(B, L, H_kv, D)`` copied into shuffled pages: ``(k_pages, v_pages, table)``."""
    b, length = k.shape[:2]
    per_row = -(-length // page_size)
    table = torch.randperm(b * per_row, generator=torch.Generator().manual_seed(1)).view(b, per_row)
    pages = []
    for cache in (k, v):
        padded = F.pad(cache, (0, 0, 0, 0, 0, per_row * page_size - length))
        paged = torch.empty(b * per_row, page_size, *cache.shape[2:], dtype=cache.dtype, device=cache.device)
        paged[table.flatten().to(cache.device)] = padded.reshape(-1, page_size, *cache.shape[2:])
        pages.append(paged)
    return pages[0], pages[1], table.to(k.device, torch.int32)


def part_decode() -> list[dict]:
    from effllm.kernels import decode_attention
    from effllm.kernels.triton.decode import decode_fwd

    rows = []
    for b, length in DECODE_SHAPES:
        q, k, v = _decode_inputs(b, length)
        lengths = torch.full((b,), length, dtype=torch.int32, device="cuda")
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        timings = {
            "sdpa": _time(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)),
            "tensor_lengths": _time(lambda: decode_attention(q, k, v, lengths, backend="triton")),
            "int_length": _time(lambda: decode_attention(q, k, v, length, backend="triton")),
            "kernels_only": _time(lambda: decode_fwd(q, k, v, lengths, None, scale=None, window=None, softcap=None,
                                                     num_splits=None, return_stats=False)),
        }
        rows.append(dict(part="decode", B=b, L=length, **timings))
        print("decode", b, length, {key: round(val, 4) for key, val in timings.items()}, flush=True)
    return rows


def part_graphs() -> list[dict]:
    from torch import nn

    from effllm.kernels import decode_attention
    from effllm.kernels.decode import decode_attention_unchecked
    from effllm.quant import Fp8, Int4WeightOnly, quantize_

    rows = []
    for b, length in DECODE_SHAPES:
        q, k, v = _decode_inputs(b, length)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k_pages, v_pages, table = _paged(k, v, page_size=16)
        lengths = torch.full((b,), length, dtype=torch.int32, device="cuda")
        timings = {"sdpa": _graph_time(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)),
                   "effllm": _graph_time(lambda: decode_attention(q, k, v, length, backend="triton")),
                   # a tensor of lengths and a block table: the unchecked entry, since the checked
                   # one reads them back (a sync, which a graph cannot capture)
                   "effllm_paged": _graph_time(lambda: decode_attention_unchecked(
                       q, k_pages, v_pages, lengths, table, backend="triton"))}
        rows.append(dict(part="graphs", op="decode", B=b, L=length, **timings))
        print("graphs decode", b, length, {key: round(val, 4) for key, val in timings.items()}, flush=True)
    for (n, kdim), m in itertools.product(((4096, 4096), (8192, 2048)), (1, 16, 2048)):
        gen = torch.Generator().manual_seed(n + m)
        linear = nn.Linear(kdim, n, bias=False, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(m, kdim, generator=gen).to("cuda", torch.bfloat16)
        timings = {"bf16": _graph_time(lambda: linear(x))}
        for name, config in (("int4", Int4WeightOnly(128)), ("fp8-row", Fp8("row", "token"))):
            holder = nn.Sequential(nn.Linear(kdim, n, bias=False, device="cuda", dtype=torch.bfloat16))
            holder[0].weight.data.copy_(linear.weight.data)
            quantize_(holder, config)
            timings[name] = _graph_time(lambda mod=holder[0]: mod(x))
        rows.append(dict(part="graphs", op="linear", M=m, N=n, K=kdim, **timings))
        print("graphs linear", m, n, kdim, {key: round(val, 4) for key, val in timings.items()}, flush=True)
    return rows


def part_fp8quant() -> list[dict]:
    """Per-token FP8 activation quantization: torch's five ops against the one Triton kernel,
    bit-equality with torch on CPU and on CUDA, eager and device time."""
    from effllm.kernels.triton.fp8_quant import fp8_quantize_rows
    from effllm.quant.formats import fp8_quantize_activations

    rows = []
    for kdim, m in itertools.product((4096, 14336), (1, 16, 128, 2048)):
        x = torch.randn(m, kdim, generator=torch.Generator().manual_seed(kdim + m)).to("cuda", torch.bfloat16)
        got = fp8_quantize_rows(x)

        def same(want):
            return (torch.equal(want[0].view(torch.uint8).cpu(), got[0].view(torch.uint8).cpu())
                    and torch.equal(want[1].cpu(), got[1].cpu()))

        # torch on CUDA divides by a scalar as a multiply by its reciprocal (one bit off the
        # division at times); the kernel divides exactly, as torch does on CPU
        exact = {"equal_torch_cpu": same(fp8_quantize_activations(x.cpu(), "token")),
                 "equal_torch_cuda": same(fp8_quantize_activations(x, "token"))}
        timings = {"torch_eager": _time(lambda: fp8_quantize_activations(x, "token")),
                   "triton_eager": _time(lambda: fp8_quantize_rows(x)),
                   "torch": _graph_time(lambda: fp8_quantize_activations(x, "token")),
                   "triton": _graph_time(lambda: fp8_quantize_rows(x))}
        rows.append(dict(part="fp8quant", M=m, K=kdim, **exact, **timings))
        print("fp8quant", m, kdim, exact, {key: round(val, 4) for key, val in timings.items()}, flush=True)
    # the whole FP8 linear (cuBLASLt GEMM) with each quantizer, against bf16
    from torch import nn

    from effllm.quant import Fp8, quantize_
    from effllm.quant.linear import fp8_scaled_mm

    for m in (1, 16, 2048):
        holder = nn.Sequential(nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16))
        x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(m)).to("cuda", torch.bfloat16)
        linear = holder[0]
        timings = {"bf16": _graph_time(lambda: linear(x))}
        quantize_(holder, Fp8("row", "token"))
        mod = holder[0]
        timings["fp8_torch_quant"] = _graph_time(lambda: fp8_scaled_mm(
            *fp8_quantize_activations(x, "token"), mod.qweight, mod.weight_scale, out_dtype=x.dtype))
        timings["fp8_module"] = _graph_time(lambda: mod(x))
        rows.append(dict(part="fp8quant", op="linear", M=m, N=4096, K=4096, **timings))
        print("fp8quant linear", m, {key: round(val, 4) for key, val in timings.items()}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default="decode,w4a16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_tuning.py needs a CUDA device")
    rows = [dict(part="device", name=torch.cuda.get_device_name(), torch=torch.__version__)]
    for part in args.parts.split(","):
        rows += {"w4a16": part_w4a16, "decode": part_decode, "graphs": part_graphs, "fp8quant": part_fp8quant}[part]()
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
