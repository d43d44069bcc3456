"""Parallel benchmarks (issue 18 item 6) on local gloo processes, plus a labelled cost model.

- ``overlap_rows``: one tensor-parallel decoder layer (SmolLM2's widths, random weights, sharded
  by ``tensor_parallel``) with and without ``token_split_overlap`` at several token counts; the
  variants alternate inside every repetition (the machine is shared), the slowest rank's median
  counts. Also the all-reduce alone and each branch's compute alone, which feed the cost model.
- ``bytes_rows``: bytes each scheme hands to the collectives for one layer, counted by wrapping
  the collectives while the layer runs (payload), and the per-rank wire bytes a ring algorithm
  moves for that payload.
- ``decode_rows``: ``tensor_parallel`` SmolLM2-135M greedy decode tokens/s at 1, 2 and 3 ranks.
- ``cost_model_rows``: a MODEL, not a measurement: a Llama-3-8B-shaped layer tensor-parallel over
  8 GPUs on NVLink, sequential vs token-split, from compute rates measured on an H100 by this
  project (benchmarks/results/gpu_h100.jsonl) and published NVLink bandwidth.

``python -m effllm.bench.cases.parallel overlap|bytes|decode|model [--out FILE]``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import time
from pathlib import Path

import torch

# SmolLM2-135M's layer widths; batch split in 8 sequences (token_split_overlap splits the batch)
LAYER = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
             "num_hidden_layers": 1, "vocab_size": 128, "max_position_embeddings": 8192}
BATCH = 8


def machine() -> dict:
    from effllm.bench.records import _cpu_name

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def _timed(fns, group, reps):
    """Median seconds of each fn (slowest rank), the fns alternating within every repetition."""
    import torch.distributed as dist

    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for rep in range(reps):
        order = range(len(fns)) if rep % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            dist.barrier(group)
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    t = torch.tensor([statistics.median(ts) for ts in times], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def _sharded_layer(group):
    """A one-layer Llama with SmolLM2's widths, sharded; returns (decoder layer, rotary module)."""
    from effllm.parallel import tensor_parallel
    from effllm.testing.models import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=0, **LAYER)
    tensor_parallel(model, group)
    return model.model.layers[0], model.model.rotary_emb


def _layer_fns(group, tokens):
    from effllm.parallel import llama_layer_branches, token_split_overlap

    layer, rotary = _sharded_layer(group)
    seq = tokens // BATCH
    h = torch.randn(BATCH, seq, LAYER["hidden_size"])
    pos = torch.arange(seq)[None]
    emb = rotary(h, pos)
    branches = llama_layer_branches(layer, position_embeddings=emb, attention_mask=None)
    return h, branches, token_split_overlap


def _overlap_one(group, tokens, reps):
    import torch.distributed as dist

    h, branches, tso = _layer_fns(group, tokens)
    partial = torch.randn_like(h)

    def all_reduce_only():
        for _ in branches:
            y = partial.clone()
            dist.all_reduce(y, group=group)

    with torch.no_grad():
        seq, split, default, compute, ar = _timed([
            lambda: tso(branches, h, group, chunks=1),
            lambda: tso(branches, h, group, chunks=2, min_tokens=0),
            lambda: tso(branches, h, group),
            lambda: [b(h) for b in branches],
            all_reduce_only], group, reps)
        same = torch.equal(tso(branches, h, group, chunks=1), tso(branches, h, group, chunks=2, min_tokens=0))
    return {"tokens": tokens, "sequential_ms": 1e3 * seq, "split_ms": 1e3 * split, "default_ms": 1e3 * default,
            "compute_only_ms": 1e3 * compute, "all_reduce_only_ms": 1e3 * ar, "speedup_split": seq / split,
            "speedup_default": seq / default, "split_equals_sequential": same}


def _overlap_worker(rank, world, tokens_list, reps):
    import torch.distributed as dist

    return [_overlap_one(dist.group.WORLD, tokens, reps) for tokens in tokens_list]


def overlap_rows(worlds=(2, 3), tokens_list=(256, 512, 1024, 2048, 4096, 8192), reps=15, rounds=2) -> list[dict]:
    from effllm.parallel.launch import run_local

    out = []
    for rnd in range(rounds):
        for world in worlds:
            load = os.getloadavg()
            rows = run_local(_overlap_worker, world, list(tokens_list), reps, deadline_s=1800, timeout_s=300)[0]
            for row in rows:
                out.append(dict(part="overlap", world=world, round=rnd, reps=reps, threads_per_rank=1,
                                layer=dict(LAYER, batch=BATCH, weights="random, SmolLM2-135M widths"),
                                loadavg_before=[round(x, 2) for x in load], **row))
                print(f"world={world} round={rnd} tokens={row['tokens']}: seq {row['sequential_ms']:.1f} ms, "
                      f"split {row['split_ms']:.1f} ({row['speedup_split']:.3f}x), default "
                      f"{row['default_ms']:.1f} ({row['speedup_default']:.3f}x), compute {row['compute_only_ms']:.1f},"
                      f" all-reduce {row['all_reduce_only_ms']:.1f}", flush=True)
    return out


# -- bytes per layer -----------------------------------------------------------------------------------------------


class _Counter:
    """Wrap the collectives effllm.parallel calls; record (kind, payload bytes) per call."""

    def __init__(self):
        import torch.distributed as dist

        from effllm.parallel import _group, collectives, ring

        self.calls = []
        self._saved = []
        wire = {}

        def wrap(owner, name, kind, size_of):
            original = getattr(owner, name)

            def counted(*args, **kwargs):
                self.calls.append((kind, size_of(*args)))
                return original(*args, **kwargs)

            self._saved.append((owner, name, original))
            setattr(owner, name, counted)

        nbytes = lambda t: t.numel() * t.element_size()
        wrap(dist, "all_reduce", "all_reduce", lambda t, *a: nbytes(t))
        wrap(dist, "all_to_all_single", "all_to_all", lambda out, inp, *a: nbytes(inp))
        for mod in (_group, collectives):
            if hasattr(mod, "all_gather_single"):
                wrap(mod, "all_gather_single", "all_gather", lambda out, inp, *a: nbytes(out))
            if hasattr(mod, "reduce_scatter_single"):
                wrap(mod, "reduce_scatter_single", "reduce_scatter", lambda out, inp, *a: nbytes(inp))
        wrap(ring.dist if hasattr(ring, "dist") else dist, "batch_isend_irecv", "p2p_send",
             lambda ops, *a: sum(nbytes(op.tensor) for op in ops if op.op is dist.isend))
        self.wire = wire

    def restore(self):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    @staticmethod
    def wire_bytes(kind, payload, world):
        """Bytes one rank sends for a call with this payload, with ring algorithms."""
        if kind == "all_reduce":
            return 2 * (world - 1) / world * payload
        if kind in ("all_gather", "reduce_scatter", "all_to_all"):
            return (world - 1) / world * payload
        return payload


def _bytes_worker(rank, world, tokens):
    import torch.distributed as dist

    from effllm.parallel import (
        fused_allreduce_rmsnorm,
        ring_attention,
        ulysses_attention,
    )

    group = dist.group.WORLD
    h, branches, tso = _layer_fns(group, tokens)
    hidden = LAYER["hidden_size"]
    heads, kv, dim = LAYER["num_attention_heads"], LAYER["num_key_value_heads"], hidden // LAYER["num_attention_heads"]
    x, res, w = torch.randn(tokens, hidden), torch.randn(tokens, hidden), torch.ones(hidden)
    local = tokens // world
    q = torch.randn(1, local, heads, dim)  # (batch, local tokens, heads, head_dim)
    k, v = torch.randn(1, local, kv, dim), torch.randn(1, local, kv, dim)
    schemes = {
        "tensor_parallel layer (2 all-reduces)": lambda: tso(branches, h, group, chunks=1),
        "tensor_parallel layer, token_split_overlap (2 chunks)": lambda: tso(branches, h, group, chunks=2,
                                                                             min_tokens=0),
        "fused_allreduce_rmsnorm x2 (residual gathered)": lambda: [fused_allreduce_rmsnorm(x, res, w, group)
                                                                  for _ in range(2)],
        "fused_allreduce_rmsnorm x2 (residual_sharded)": lambda: [
            fused_allreduce_rmsnorm(x, res[rank * local:(rank + 1) * local], w, group, residual_sharded=True)
            for _ in range(2)],
        "ulysses_attention (attention only; MLP needs none)": lambda: ulysses_attention(q, k, v, group, causal=True),
        "ring_attention forward (attention only; MLP needs none)": lambda: ring_attention(q, k, v, group, causal=True),
    }
    rows = []
    for name, fn in schemes.items():
        counter = _Counter()
        try:
            with torch.no_grad():
                fn()
        finally:
            counter.restore()
        payload = sum(b for _, b in counter.calls)
        wire = sum(_Counter.wire_bytes(kind, b, world) for kind, b in counter.calls)
        rows.append({"scheme": name, "calls": len(counter.calls), "kinds": sorted({k for k, _ in counter.calls}),
                         "payload_bytes": payload, "wire_bytes_per_rank": wire})
    return rows


def bytes_rows(world=2, tokens=4096) -> list[dict]:
    from effllm.parallel.launch import run_local

    rows = run_local(_bytes_worker, world, tokens, deadline_s=600, timeout_s=120)[0]
    return [dict(part="bytes", world=world, tokens=tokens, dtype="float32",
                 layer=dict(LAYER, batch=BATCH), **row) for row in rows]


# -- tensor-parallel decode ------------------------------------------------------------------------------------------

_DECODE = {}


def _decode_worker(rank, world, shard, new):
    import torch.distributed as dist

    from effllm.parallel import tensor_parallel

    model, ids = _DECODE["model"], _DECODE["ids"]
    if shard:
        tensor_parallel(model, dist.group.WORLD)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
    times, out = [], None
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        times.append(time.perf_counter() - start)
    return {"tokens_per_s": new / statistics.median(times), "best_tokens_per_s": new / min(times),
                "tokens": out[0, -new:].tolist()}


def decode_rows(new=32, rounds=2) -> list[dict]:
    from effllm.parallel.launch import run_local
    from effllm.testing.models import smollm2

    model, tok = smollm2()
    _DECODE.update(model=model, ids=tok("The capital of France is", return_tensors="pt").input_ids)
    settings = [("unsharded, 1 rank x 1 thread", 1, False), ("tensor_parallel, 2 ranks x 1 thread", 2, True),
                ("tensor_parallel, 3 ranks x 1 thread (oversubscribed: 2 cores)", 3, True)]
    results: dict[str, list] = {}
    for rnd in range(rounds):
        for label, world, shard in (settings if rnd % 2 == 0 else settings[::-1]):
            load = os.getloadavg()[0]
            res = run_local(_decode_worker, world, shard, new, threads=1, start_method="fork", deadline_s=900,
                            timeout_s=300)[0]
            res["loadavg_1m"] = round(load, 2)
            results.setdefault(label, []).append(res)
            print(label, f"{res['tokens_per_s']:.2f} tokens/s", flush=True)
    reference = results[settings[0][0]][0]["tokens"]
    rows = []
    for label, world, _ in settings:
        runs = results[label]
        rows.append({"part": "decode", "setting": label, "ranks": world, "model": "SmolLM2-135M-Instruct", "dtype": "float32",
                         "new_tokens": new, "prompt": "The capital of France is",
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                         "same_tokens_as_unsharded": all(r["tokens"] == reference for r in runs),
                         "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs]})
    return rows


# -- cost model (labelled: not a measurement) ------------------------------------------------------------------------

# Llama-3-8B's layer; 8-way tensor parallel
MODEL_LAYER = {"hidden": 4096, "inner": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "bytes_per_element": 2}
# Published: NVLink 4 (H100 SXM), 900 GB/s per GPU in both directions together = 450 GB/s each way.
NVLINK_GBS_PER_DIRECTION = 450.0
ASSUMED = {"link_efficiency": 0.8,  # share of the link a large NCCL ring all-reduce reaches (assumption)
               "all_reduce_latency_us": 15.0,  # fixed cost per all-reduce on 8 GPUs (assumption)
               "overlap_compute_slowdown": 0.10}  # compute slowdown while NCCL runs beside it (SMs shared; assumption)


def _h100_rates(path: Path) -> tuple[list, list]:
    """(M, TFLOP/s) of bf16 GEMMs and (S, TFLOP/s) of SDPA prefill, from this project's H100 records."""
    import json

    gemm, attn = [], []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["op"] == "quant.linear" and r["provider"] == "bf16" and r["metric"].get("tflops"):
            gemm.append((r["shape"]["M"], r["metric"]["tflops"]))
        if r["op"] == "attention.prefill" and r["provider"] == "sdpa" and r["shape"]["D"] == 128:
            attn.append((r["shape"]["S"] * r["shape"]["B"], r["metric"]["tflops"]))
    return sorted(gemm), sorted(attn)


def _interp(points, x):
    """Log-linear interpolation of the best rate at each size, clamped at the ends."""
    best = {}
    for k, v in points:
        best[k] = max(v, best.get(k, 0.0))
    xs = sorted(best)
    if x <= xs[0]:
        return best[xs[0]] * x / xs[0]  # below the smallest measured size: same time, fewer FLOPs
    if x >= xs[-1]:
        return best[xs[-1]]
    for a, b in itertools.pairwise(xs):
        if a <= x <= b:
            f = (math.log(x) - math.log(a)) / (math.log(b) - math.log(a))
            return best[a] + f * (best[b] - best[a])
    return best[xs[-1]]


def _schedule(compute, comm, chunks):
    """Time of ``for branch: h = h + AR(branch(h))`` with ``chunks`` token chunks on two resources
    (compute, link): a chunk's branch k+1 needs its AR of branch k; one AR at a time on the link."""
    n_branches = len(compute)
    comp_free = link_free = 0.0
    ready = [0.0] * chunks  # when each chunk's input is ready
    for b in range(n_branches):
        for c in range(chunks):
            start = max(comp_free, ready[c])
            comp_free = start + compute[b] / chunks
            ar_start = max(link_free, comp_free)
            link_free = ar_start + comm[b][c]
            ready[c] = link_free
    return max(ready)


def cost_model_rows(records: Path = Path("benchmarks/results/gpu_h100.jsonl"), worlds=(2, 4, 8),
                    tokens_list=(256, 512, 1024, 2048, 4096, 8192, 16384)) -> list[dict]:
    gemm, attn = _h100_rates(records)
    return [_model_row(world, tokens, gemm, attn, records) for world in worlds for tokens in tokens_list]


def _model_row(world, tokens, gemm, attn, records) -> dict:
    m = MODEL_LAYER
    bw = NVLINK_GBS_PER_DIRECTION * 1e9 * ASSUMED["link_efficiency"]
    lat = ASSUMED["all_reduce_latency_us"] * 1e-6

    def layer_compute(t):
        qkv = 2 * t * m["hidden"] * (m["heads"] + 2 * m["kv_heads"]) * m["head_dim"] / world
        o = 2 * t * m["heads"] * m["head_dim"] * m["hidden"] / world
        mlp = 2 * t * m["hidden"] * 3 * m["inner"] / world
        att = 4 * t * t * m["heads"] * m["head_dim"] / 2 / world  # causal, one sequence of t tokens
        g = _interp(gemm, t) * 1e12
        a = _interp(attn, t) * 1e12
        return (qkv + o) / g + att / a, mlp / g

    def ar(t):
        payload = t * m["hidden"] * m["bytes_per_element"]
        return lat + 2 * (world - 1) / world * payload / bw

    attn_s, mlp_s = layer_compute(tokens)
    seq = _schedule([attn_s, mlp_s], [[ar(tokens)], [ar(tokens)]], 1)
    # split: each chunk half the tokens (compute rate at half size), compute slowed while overlapped
    a2, m2 = layer_compute(tokens // 2)
    slow = 1 + ASSUMED["overlap_compute_slowdown"]
    split = _schedule([2 * a2 * slow, 2 * m2 * slow], [[ar(tokens // 2)] * 2] * 2, 2)
    return {"part": "cost_model", "label": "MODEL (not measured)", "world": world, "tokens": tokens,
            "layer": dict(MODEL_LAYER, name="Llama-3-8B layer, bf16, one sequence"),
            "compute_ms": 1e3 * (attn_s + mlp_s), "all_reduce_ms": 1e3 * ar(tokens), "sequential_ms": 1e3 * seq,
            "split_ms": 1e3 * split, "speedup": seq / split,
            "inputs": dict(nvlink_gbs_per_direction=NVLINK_GBS_PER_DIRECTION, **ASSUMED,
                           compute_rates=f"H100 bf16 GEMM and SDPA TFLOP/s from {records} "
                                         "(log-interpolated over M and sequence length)")}


def cpu_model_check(overlap: list[dict]) -> list[dict]:
    """The same two-resource schedule fed with this machine's measured compute and all-reduce times:
    how much the model says token-splitting could gain here, next to what was measured."""
    rows = []
    for r in overlap:
        comp = r["compute_only_ms"] / 2  # two branches
        ar = r["all_reduce_only_ms"] / 2
        seq = _schedule([comp, comp], [[ar], [ar]], 1)
        split = _schedule([comp, comp], [[ar / 2] * 2] * 2, 2)
        rows.append({"part": "cpu_model_check", "label": "MODEL fed with measured CPU times", "world": r["world"],
                         "round": r["round"], "tokens": r["tokens"], "model_sequential_ms": seq, "model_split_ms": split,
                         "model_speedup": seq / split, "measured_speedup": r["speedup_split"]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effllm.bench.cases.parallel", description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["overlap", "bytes", "decode", "model"])
    parser.add_argument("--out", default="benchmarks/results/e2e/parallel.jsonl")
    parser.add_argument("--tokens", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--worlds", default="2,3")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    from effllm.bench.records import write_result_rows

    before = machine()
    if args.part == "overlap":
        rows = overlap_rows(tuple(int(w) for w in args.worlds.split(",")),
                            tuple(int(t) for t in args.tokens.split(",")), args.reps, args.rounds)
        rows += cpu_model_check(rows)
        keys = ("part", "world", "round", "tokens")
    elif args.part == "bytes":
        rows = bytes_rows()
        keys = ("part", "scheme")
    elif args.part == "decode":
        rows = decode_rows(rounds=args.rounds)
        keys = ("part", "setting")
    else:
        rows = cost_model_rows()
        keys = ("part", "world", "tokens")
    for row in rows:
        row.setdefault("label", "measured")
    path = write_result_rows(args.out, rows, keep_others=keys, machine_before=before, machine_after=machine())
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# -- cases in the effllm bench harness ------------------------------------------------------------------------------

def _overlap_once(rank, world, schedule, tokens, reps):
    import torch.distributed as dist

    group = dist.group.WORLD
    h, branches, tso = _layer_fns(group, tokens)
    fn = {"sequential": lambda: tso(branches, h, group, chunks=1),
          "token_split": lambda: tso(branches, h, group, chunks=2, min_tokens=0),
          "default": lambda: tso(branches, h, group)}[schedule]
    with torch.no_grad():
        (t,) = _timed([fn], group, reps)
    return t


def _register_cases() -> None:
    from effllm.bench import ModelSetup, model_case

    @model_case("parallel.overlap", params=[{"world": 2, "tokens": t} for t in (512, 2048, 4096, 8192)],
                quick_params=[{"world": 2, "tokens": 512}], baseline="sequential", metrics=("latency_ms",),
                description="one tensor-parallel decoder layer (SmolLM2 widths) on local gloo ranks: sequential vs "
                            "token_split_overlap (always split, and the default threshold)")
    def overlap_case(params, dtype, device):
        from effllm.parallel.launch import run_local

        def run(schedule):
            return lambda: {"latency_ms": 1e3 * run_local(_overlap_once, int(params["world"]), schedule,
                                                          int(params["tokens"]), 5, deadline_s=900, timeout_s=300)[0]}

        return ModelSetup(runs={s: run(s) for s in ("sequential", "token_split", "default")})

    @model_case("parallel.tp_decode", params=[{"new_tokens": 32}], quick_params=[{"new_tokens": 4}],
                baseline="1 rank", metrics=("decode_tokens_per_s",), repeats=2,
                description="tensor_parallel SmolLM2-135M greedy decode on 1, 2 and 3 local gloo ranks (1 thread each)")
    def tp_decode_case(params, dtype, device):
        from effllm.parallel.launch import run_local
        from effllm.testing.models import smollm2

        model, tok = smollm2()
        _DECODE.update(model=model, ids=tok("The capital of France is", return_tensors="pt").input_ids)

        def run(world):
            return lambda: {"decode_tokens_per_s": run_local(_decode_worker, world, world > 1, int(params["new_tokens"]),
                                                             threads=1, start_method="fork", deadline_s=900,
                                                             timeout_s=300)[0]["tokens_per_s"]}

        return ModelSetup(runs={f"{w} rank{'s' if w > 1 else ''}": run(w) for w in (1, 2, 3)})


_register_cases()
