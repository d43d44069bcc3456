"""MoE offload benchmarks (issue 17 item 7): cache simulation on the real routing traces, and
decode speed of a random Mixtral-style model with its experts on disk.

Two parts, each writing result rows (``effllm.bench.records.write_result_rows``):

- ``simulate_rows``: hit rate and modelled stall time per policy and predictor on the shipped
  traces at caches of 1x, 2x and 4x the active experts (``effllm.moe.simulate``; no model, exact
  and deterministic).
- ``decode_rows``: decode tokens/s of one model under several ways of holding its experts
  (all resident; ``offload_experts(store="disk")`` at several cache sizes, with and without
  prefetch; accelerate's ``dispatch_model`` with the experts on disk, what transformers users get
  from ``device_map`` offload), each in a fresh process so that its peak resident memory is its
  own; page cache warm, or cold (``posix_fadvise(DONTNEED)`` of the expert files at decode start,
  checked with ``mincore``). Variants alternate run by run, so load from other jobs hits them alike.

``python -m effllm.bench.cases.moe sim|decode|smol|smol-ab [--out FILE]``; the model and protocol
are recorded in every row. ``smol-ab``: the SmolLM2-derived MoE's prefetch variants, each run a fresh
process, rounds alternating, optionally against another effllm source tree (a before/after A/B).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[4].parent / "shared" / "data"
TRACES = {"olmoe_layer0": "olmoe_layer0_routes.jsonl", "mixtral_humaneval": "mixtral_humaneval_routes.jsonl"}
# Published sizes for the cost model: one expert's bytes in bf16 (OLMoE: 3 x 2048 x 1024; Mixtral:
# 3 x 4096 x 14336), over PCIe 4.0 x16 at 25 GB/s; compute per MoE layer per token as stated.
TRACE_COST = {"olmoe_layer0": {"expert_bytes": 3 * 2048 * 1024 * 2, "bandwidth": 25e9, "compute_s": 0.5e-3},
              "mixtral_humaneval": {"expert_bytes": 3 * 4096 * 14336 * 2, "bandwidth": 25e9, "compute_s": 15e-3}}

# The decode model: Mixtral layout, random weights, fp32; experts big enough that a load costs
# about as much as the layer's compute (one expert: 3 x 768 x 2048 x 4 bytes = 18.9 MB).
MODEL = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 12,
             "num_key_value_heads": 4, "vocab_size": 2048, "num_local_experts": 8, "num_experts_per_tok": 2,
             "max_position_embeddings": 1024}


def machine() -> dict:
    from effllm.bench.records import _cpu_name

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


# -- part 1: simulation on the real traces ----------------------------------------------------------------------


def simulate_rows(data_dir: Path = DATA, multiples=(1, 2, 4), policies=("lru", "lfu", "moe_infinity", "belady"),
                  predictors=(None, "frequency", "transition", "trace_match")) -> list[dict]:
    from effllm.moe import CostModel, load_trace, simulate

    rows = []
    for name, file in TRACES.items():
        trace = load_trace(Path(data_dir) / file)
        tokens, layers, top_k = trace.experts.shape
        cost = CostModel(**TRACE_COST[name])
        for multiple in multiples:
            capacity = multiple * top_k
            for policy in policies:
                for predictor in predictors:
                    start = time.perf_counter()
                    r = simulate(trace, capacity, policy, predictor=predictor, cost=cost)
                    rows.append({
                        "part": "simulate", "trace": name, "tokens": tokens, "layers": layers, "top_k": top_k,
                        "num_experts": trace.num_experts,
                        "cache_multiple": multiple, "cache_experts_per_layer": capacity, "policy": policy,
                        "predictor": predictor or "none", "hit_rate": r.hit_rate,
                        "cached_hit_rate": r.hits / r.accesses, "prefetch_hit_rate": r.prefetch_hits / r.accesses,
                        "prefetch_precision": r.prefetch_precision, "stall_ms_per_token": 1e3 * r.stall_s / tokens,
                        "gib_moved": r.bytes_moved / 2**30, "cost_model": TRACE_COST[name],
                        "sim_seconds": time.perf_counter() - start})
    return rows


# -- part 1b: the SmolLM2-derived MoE (effllm.moe.moefy) -----------------------------------------------------

# Chosen on sentences.txt (calibration on calibration.txt; haystack.txt held out): two thirds of
# each MLP's channels form a resident shared expert, the other 512 are 32 routed experts of 16
# channels, 8 per token (a quarter of the routed experts, as Mixtral's 2 of 8).
SMOL_MOE = {"num_experts": 32, "top_k": 8, "shared_channels": 1024, "route_by": "gate_up"}
SMOL_TEXTS = ("haystack.txt", "sentences.txt")


def _smol_model(config: dict, calib_tokens: int = 512):
    """(dense model, moefied copy, tokenizer, dense perplexities, moefied perplexities)."""
    import copy

    from effllm.moe.moefy import moefy
    from effllm.testing.models import smollm2
    from effllm.testing.quality import calibration_texts, perplexity, shipped_text

    dense, tok = smollm2()
    calib = tok(" ".join(calibration_texts(8)), return_tensors="pt").input_ids[:, :calib_tokens]
    with torch.no_grad():
        moe = moefy(copy.deepcopy(dense), calib, **config)
        ppl = {t: (perplexity(dense, tok, shipped_text(t), max_tokens=512),
                   perplexity(moe, tok, shipped_text(t), max_tokens=512)) for t in SMOL_TEXTS}
    return dense, moe, tok, ppl


def _text_ids(tok, tokens: int) -> dict:
    from effllm.testing.quality import shipped_text

    return {t: tok(shipped_text(t), return_tensors="pt").input_ids[:, :tokens] for t in SMOL_TEXTS}


def _teacher_forced(model, ids: torch.Tensor, on_step=None) -> list[float]:
    """Feed ``ids`` one token at a time with a KV cache (a decode over real text); step seconds."""
    from transformers import DynamicCache

    from effllm._cache_arg import cache_argument_name

    arg, steps = cache_argument_name(model), []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        for i in range(ids.shape[1]):
            start = time.perf_counter()
            model(ids[:, i:i + 1], use_cache=True, **{arg: cache})
            steps.append(time.perf_counter() - start)
    return steps


def smol_rows(config: dict = SMOL_MOE, tokens: int = 512, live_tokens: int = 256, multiples=(1, 2, 4),
              policies=("lru", "lfu", "belady"), predictors=(None, "transition", "trace_match"),
              trace_out: str | None = None, live: bool = True, only: tuple[str, ...] = ()) -> list[dict]:
    """Perplexity of the moefied SmolLM2, hit rates of its real routes (simulated), and live
    offloaded decodes over the shipped texts (``store="disk"``, every predictor, timed)."""
    import tempfile as _tempfile

    from effllm.moe import RouteRecorder, offload_experts, simulate

    dense, moe, tok, ppl = _smol_model(config)
    model_info = {"base": "SmolLM2-135M-Instruct", "dtype": "float32", "moefy": config, "calibration":
                  "calibration.txt, 512 tokens", "layers": dense.config.num_hidden_layers}
    rows = [{"part": "smol_ppl", "text": t, "tokens": 512, "dense_ppl": d, "moe_ppl": m, "model": model_info}
            for t, (d, m) in ppl.items()]
    ids = _text_ids(tok, tokens)
    with RouteRecorder(moe, request=SMOL_TEXTS[0]) as rec, torch.no_grad():
        for n, t in enumerate(SMOL_TEXTS):
            if n:
                rec.new_request(t)
            moe(ids[t])
    trace = rec.trace()
    if trace_out:
        trace.save(trace_out)
    top_k = trace.top_k
    for multiple in multiples:
        for policy in policies:
            for predictor in predictors:
                start = time.perf_counter()
                r = simulate(trace, multiple * top_k, policy, predictor=predictor)
                rows.append({"part": "smol_simulate", "trace": "smollm2_moefied", "tokens": trace.num_tokens,
                             "layers": trace.num_layers, "top_k": top_k, "num_experts": trace.num_experts,
                             "texts": list(SMOL_TEXTS), "cache_multiple": multiple,
                             "cache_experts_per_layer": multiple * top_k, "policy": policy,
                             "predictor": predictor or "none", "hit_rate": r.hit_rate,
                             "cached_hit_rate": r.hits / r.accesses, "prefetch_hit_rate": r.prefetch_hits / r.accesses,
                             "prefetch_precision": r.prefetch_precision, "model": model_info,
                             "sim_seconds": time.perf_counter() - start})
                print("sim", multiple, policy, predictor, round(100 * r.hit_rate, 1), flush=True)
    if not live:
        return rows
    # live: the same texts' first live_tokens tokens decoded one at a time, each variant once, in
    # turn; the predictor runs inside the timed steps
    live_ids = {t: x[:, :live_tokens] for t, x in ids.items()}
    variants = {"resident": None, "disk_1x_on_demand": (1, None, 1), "disk_2x_on_demand": (2, None, 1),
                "disk_2x_cross_layer_gate": (2, "cross_layer_gate", 1),
                "disk_2x_cross_layer_gate_lookahead2": (2, "cross_layer_gate", 2),
                "disk_2x_trace_match": (2, "trace_match", 1)}
    for name, spec in variants.items():
        if only and name not in only:
            continue
        steps, stats = [], None
        load = os.getloadavg()[0]
        with _tempfile.TemporaryDirectory(prefix="effllm-smol-moe-") as work:
            handle = None
            if spec is not None:
                handle = offload_experts(moe, store="disk", path=Path(work) / "experts.safetensors",
                                         cache_experts=spec[0] * top_k, policy="lru", prefetch=spec[1],
                                         lookahead=spec[2])
            try:
                for t in SMOL_TEXTS:
                    steps += _teacher_forced(moe, live_ids[t])
                if handle is not None:
                    stats = handle.stats()
            finally:
                if handle is not None:
                    handle.remove()
        row = {"part": "smol_decode", "variant": name, "tokens": len(steps), "store": "disk" if spec else None,
               "cache_experts_per_layer": spec[0] * top_k if spec else None, "policy": "lru" if spec else None,
               "prefetch": (spec[1] or "none") if spec else None, "lookahead": spec[2] if spec else None,
               "tokens_per_s": len(steps) / sum(steps),
               "median_step_ms": 1e3 * statistics.median(steps), "loadavg_1m_before": round(load, 2),
               "model": model_info}
        if stats is not None:
            row.update({k: stats[k] for k in ("hits", "misses", "prefetch_hits", "wasted_prefetches", "hit_rate",
                                              "prediction_precision", "prediction_recall", "stall_s", "predictor_s",
                                              "bytes_moved", "peak_resident_bytes", "cache_bound_bytes")})
        rows.append(row)
        print("live", name, {k: row.get(k) for k in ("tokens_per_s", "hit_rate", "prediction_precision",
                                                      "predictor_s", "stall_s")}, flush=True)
    return rows


# -- part 1c: prefetch A/B on the SmolLM2-derived MoE, each run a fresh process ----------------------------------

# name -> (cache multiple, prefetch, lookahead, direct_io: every miss a device read); None: all resident
SMOL_AB_VARIANTS = {"resident": None, "disk_2x_on_demand": (2, None, 1, False),
                    "disk_2x_cross_layer_gate": (2, "cross_layer_gate", 1, False),
                    "disk_2x_cross_layer_gate_lookahead2": (2, "cross_layer_gate", 2, False),
                    "disk_2x_trace_match": (2, "trace_match", 1, False),
                    "direct_2x_on_demand": (2, None, 1, True),
                    "direct_2x_cross_layer_gate": (2, "cross_layer_gate", 1, True),
                    "direct_2x_cross_layer_gate_lookahead2": (2, "cross_layer_gate", 2, True),
                    "direct_2x_trace_match": (2, "trace_match", 1, True)}


def smol_ab_child(spec: dict) -> dict:
    """One live decode of the moefied SmolLM2 (weights from ``spec["state"]``) under one variant, run
    as a script so that ``effllm`` may come from another source tree (``--baseline-src``)."""
    import hashlib

    import effllm
    from effllm.moe import offload_experts
    from effllm.moe.moefy import _classes
    from effllm.moe.traces import _decoder_layers
    from effllm.testing.models import smollm2

    torch.set_num_threads(spec["threads"])
    saved = torch.load(spec["state"])
    model, _ = smollm2()
    cfg, block = saved["moefy"], _classes()
    for layer in _decoder_layers(model):
        layer.mlp = block(model.config, cfg["num_experts"], cfg["top_k"], cfg["route_by"], cfg["shared_channels"])
        layer.mlp.experts.config = model.config
    model.config._experts_implementation_internal = "eager"
    model.load_state_dict(saved["state_dict"])
    model.eval()
    vspec = SMOL_AB_VARIANTS[spec["variant"]]
    from transformers import DynamicCache

    from effllm._cache_arg import cache_argument_name

    arg = cache_argument_name(model)
    steps, digest = [], hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="effllm-smol-ab-") as work:
        handle = None
        if vspec is not None:
            handle = offload_experts(model, store="disk", path=Path(work) / "experts.safetensors",
                                     cache_experts=vspec[0] * cfg["top_k"], policy="lru", prefetch=vspec[1],
                                     lookahead=vspec[2],
                                     # named only when set: a --baseline-src tree may predate direct_io
                                     **({"direct_io": True} if vspec[3] else {}))
        load = os.getloadavg()
        cpu, proc = time.thread_time(), time.process_time()
        with torch.no_grad():
            for ids in saved["texts"].values():
                cache = DynamicCache(config=model.config)
                for i in range(ids.shape[1]):
                    start = time.perf_counter()
                    logits = model(ids[:, i:i + 1], use_cache=True, **{arg: cache}).logits
                    steps.append(time.perf_counter() - start)
                    digest.update(logits.numpy().tobytes())  # outputs must be the resident model's bits
        cpu, proc = time.thread_time() - cpu, time.process_time() - proc
        stats = handle.stats() if handle is not None else None
        if handle is not None:
            handle.remove()
    n = len(steps)
    row = {"tokens": n, "tokens_per_s": n / sum(steps), "median_step_ms": 1e3 * statistics.median(steps),
           "forward_thread_cpu_ms_per_token": 1e3 * cpu / n, "process_cpu_ms_per_token": 1e3 * proc / n,
           "logits_sha256": digest.hexdigest(), "loadavg_before": [round(x, 2) for x in load],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "effllm_source": str(Path(effllm.__file__).parent)}
    if stats is not None:
        row.update({k: stats.get(k) for k in ("hits", "misses", "prefetch_hits", "prefetches", "wasted_prefetches",
                                             "hit_rate", "prediction_precision", "stall_s", "predictor_s",
                                             "predictor_cpu_s", "predictor_forward_s", "predictor_wait_s",
                                             "late_predictions",
                                             "peak_resident_bytes", "cache_bound_bytes")})
        row["predictor_ms_per_token"] = 1e3 * stats["predictor_s"] / n
        # what the forward itself spent on prediction (before predictions moved to the loader thread,
        # all of predictor_s was spent in the forward)
        forward_s = stats.get("predictor_forward_s", stats["predictor_s"])
        row["predictor_forward_ms_per_token"] = 1e3 * forward_s / n
        row["stall_ms_per_token"] = 1e3 * stats["stall_s"] / n
    return row


def smol_ab_rows(variants=tuple(SMOL_AB_VARIANTS), rounds: int = 3, live_tokens: int = 64,
                 baseline_src: str | None = None, threads: int = 1, timeout_s: float = 1200) -> list[dict]:
    """Live decodes of the moefied SmolLM2 with ``store="disk"`` at 2x the active experts: every
    variant (and, with ``baseline_src``, every variant under that other effllm source tree: before /
    after a change), ``rounds`` times in alternating order, each in a fresh process; one row per
    (code, variant) with medians, every run's figures and ratios against the same code's on-demand."""
    from effllm.moe.moefy import moefy
    from effllm.testing.models import smollm2
    from effllm.testing.quality import calibration_texts

    dense, tok = smollm2()
    calib = tok(" ".join(calibration_texts(8)), return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        moe = moefy(dense, calib, **SMOL_MOE)
    here = str(Path(__file__).resolve().parents[3])  # this tree's src/
    codes = {"after": here} if baseline_src is None else {"before": str(Path(baseline_src).resolve()), "after": here}
    runs: dict[tuple, list] = {}
    with tempfile.TemporaryDirectory(prefix="effllm-smol-ab-") as tmp:
        state = Path(tmp) / "moe.pt"
        torch.save({"state_dict": moe.state_dict(), "moefy": SMOL_MOE,
                    "texts": {t: x[:, :live_tokens] for t, x in _text_ids(tok, live_tokens).items()}}, state)
        del dense, moe
        order = [(c, v) for v in variants for c in codes if not (c == "before" and v == "resident")]
        for r in range(rounds):
            for code, variant in (order if r % 2 == 0 else order[::-1]):
                spec = {"state": str(state), "variant": variant, "threads": threads}
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=codes[code])
                out = subprocess.run([sys.executable, __file__, "smol-ab-child", json.dumps(spec)], check=False,
                                     capture_output=True, text=True, timeout=timeout_s, env=env)
                res = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                       else {"error": out.stderr[-2000:]})
                res["round"] = r
                runs.setdefault((code, variant), []).append(res)
                print(code, variant, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                                      if k in ("tokens_per_s", "hit_rate", "predictor_ms_per_token",
                                               "predictor_forward_ms_per_token", "stall_ms_per_token",
                                               "forward_thread_cpu_ms_per_token", "process_cpu_ms_per_token",
                                               "error")}, flush=True)
    rows = []
    resident = {x.get("logits_sha256") for x in runs.get(("after", "resident"), [])}
    for (code, variant), results in runs.items():
        ok = [x for x in results if "tokens_per_s" in x]
        row = {"part": "smol_prefetch_ab", "code": code, "variant": variant, "spec": SMOL_AB_VARIANTS[variant],
               "effllm_source": codes[code], "live_tokens_per_text": live_tokens, "texts": list(SMOL_TEXTS),
               "threads": threads, "rounds": rounds, "runs": results,
               "model": {"base": "SmolLM2-135M-Instruct", "dtype": "float32", "moefy": SMOL_MOE}}
        if ok:
            for key in ("tokens_per_s", "hit_rate", "predictor_ms_per_token", "predictor_forward_ms_per_token",
                        "stall_ms_per_token", "forward_thread_cpu_ms_per_token", "process_cpu_ms_per_token"):
                values = [x[key] for x in ok if x.get(key) is not None]
                if values:
                    row[f"median_{key}"] = statistics.median(values)
            row["same_logits_as_resident"] = bool(resident) and all(x["logits_sha256"] in resident for x in ok)
        rows.append(row)
    for row in rows:  # tokens/s against the same code's on-demand (same store), round by round (same load), then the median
        spec = SMOL_AB_VARIANTS[row["variant"]]
        on_demand = "direct_2x_on_demand" if spec is not None and spec[3] else "disk_2x_on_demand"
        row["on_demand_variant"] = on_demand
        base = {x["round"]: x["tokens_per_s"] for x in runs.get((row["code"], on_demand), [])
                if "tokens_per_s" in x}
        ratios = [x["tokens_per_s"] / base[x["round"]] for x in row["runs"] if "tokens_per_s" in x and x["round"] in base]
        if ratios:
            row["tokens_per_s_vs_on_demand_per_round"] = ratios
            row["median_tokens_per_s_vs_on_demand"] = statistics.median(ratios)
    return rows


# -- part 2: decode speed and memory ------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached_fraction(paths: list[Path]) -> float:
    """Share of the files' pages in the page cache (``mincore`` over a read-only mapping)."""
    page = os.sysconf("SC_PAGE_SIZE")
    cached = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
            n = (size + page - 1) // page
            vec = (ctypes.c_ubyte * n)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            _libc.munmap(addr, size)
            cached += sum(b & 1 for b in vec)
            total += n
        finally:
            os.close(fd)
    return cached / total if total else 1.0


def drop_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _status() -> dict:
    """Resident set figures of this process in bytes (VmHWM: peak since the last reset)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


VARIANTS = {
    # name: how the experts are held
    "resident": {"kind": "resident"},
    "disk_1x_on_demand": {"kind": "effllm", "store": "disk", "multiple": 1, "prefetch": None},
    "disk_2x_on_demand": {"kind": "effllm", "store": "disk", "multiple": 2, "prefetch": None},
    "disk_2x_cross_layer_gate": {"kind": "effllm", "store": "disk", "multiple": 2, "prefetch": "cross_layer_gate"},
    "disk_2x_trace_match": {"kind": "effllm", "store": "disk", "multiple": 2, "prefetch": "trace_match"},
    "disk_4x_on_demand": {"kind": "effllm", "store": "disk", "multiple": 4, "prefetch": None},
    # direct_io=True: every miss is a device read (O_DIRECT), as when the experts do not fit in RAM
    "direct_1x_on_demand": {"kind": "effllm", "store": "disk", "multiple": 1, "prefetch": None, "direct": True},
    "direct_2x_on_demand": {"kind": "effllm", "store": "disk", "multiple": 2, "prefetch": None, "direct": True},
    "direct_2x_cross_layer_gate": {"kind": "effllm", "store": "disk", "multiple": 2, "prefetch": "cross_layer_gate",
                                   "direct": True},
    "direct_2x_trace_match": {"kind": "effllm", "store": "disk", "multiple": 2, "prefetch": "trace_match",
                              "direct": True},
    "accelerate_experts_on_disk": {"kind": "accelerate"},
}


def _sample(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The next token, drawn on the CPU (``gen`` is a CPU generator: the same draws on any device)."""
    token = torch.multinomial(torch.softmax(logits[:, -1].float().cpu(), -1), 1, generator=gen)
    return token.to(logits.device)


def run_variant(spec: dict) -> dict:
    """One decode run in this process (called in a fresh child): returns its row. ``spec["device"]``
    ("cpu" by default, or "cuda"): where the model runs; on CUDA the experts' slow tier is pinned
    CPU memory or the disk, the cache on the GPU, and each step is timed after a synchronize."""
    torch.set_num_threads(spec["threads"])
    variant = VARIANTS[spec["variant"]]
    work = Path(spec["work"])
    device = torch.device(spec.get("device", "cpu"))
    from effllm.testing.models import tiny_causal_lm

    if device.type != "cpu" and variant["kind"] == "accelerate":
        return {"skipped": "the accelerate variant is measured on CPU only"}
    # built here, not loaded: a from_pretrained model maps its file and its RSS would hold every weight
    model = tiny_causal_lm("mixtral", seed=spec["model_seed"], **MODEL).to(device)
    cfg = model.config
    gen = torch.Generator().manual_seed(spec["seed"])
    prompt = torch.randint(cfg.vocab_size, (1, spec["prompt"]), generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        model(prompt[:, :4])  # warm-up of the kernels on the resident model
    handle, files, row = None, [], {}
    expert_bytes = 3 * cfg.hidden_size * cfg.intermediate_size * 4
    if variant["kind"] == "effllm":
        from effllm.moe import offload_experts

        path = work / "experts.safetensors"
        handle = offload_experts(model, store=variant["store"], path=path if variant["store"] == "disk" else None,
                                 cache_experts=variant["multiple"] * cfg.num_experts_per_tok,
                                 policy=spec.get("policy", "lru"), prefetch=variant["prefetch"],
                                 direct_io=variant.get("direct", False))
        files = [path] if variant["store"] == "disk" else []
    elif variant["kind"] == "accelerate":
        try:
            import accelerate
        except ImportError:
            return {"skipped": "accelerate is not installed"}
        device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        for i in range(cfg.num_hidden_layers):
            for part in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp.gate"):
                device_map[f"model.layers.{i}.{part}"] = "cpu"
            device_map[f"model.layers.{i}.mlp.experts"] = "disk"
        model = accelerate.dispatch_model(model, device_map=device_map, main_device="cpu",
                                          offload_dir=str(work / "accelerate"))
        files = sorted((work / "accelerate").glob("*.dat"))
        row["accelerate"] = accelerate.__version__
    gc.collect()
    _libc.malloc_trim(0)  # hand freed expert memory back, so RSS shows what is held
    from transformers import DynamicCache

    from effllm._cache_arg import cache_argument_name

    cache_arg = cache_argument_name(model)
    new = spec["new_tokens"]
    tokens, steps = [], []
    with torch.no_grad():
        cache = DynamicCache(config=cfg)
        logits = model(prompt, use_cache=True, **{cache_arg: cache}).logits
        nxt = _sample(logits, gen)
        if files:
            row["cached_before"] = cached_fraction(files)
            if spec["cold"]:
                drop_page_cache(files)
            row["cached_at_start"] = cached_fraction(files)
        if handle is not None:
            handle.reset_stats()
        row["peak_reset"] = _reset_peak_rss()
        rss_start = _status()
        for _ in range(new):
            tokens.append(int(nxt))
            sync()
            start = time.perf_counter()
            logits = model(nxt, use_cache=True, **{cache_arg: cache}).logits
            sync()
            steps.append(time.perf_counter() - start)
            nxt = _sample(logits, gen)
    rss_end = _status()
    row.update({
        "tokens_per_s": new / sum(steps), "median_step_ms": 1e3 * statistics.median(steps),
        "first_step_ms": 1e3 * steps[0], "tokens": tokens, "expert_bytes": expert_bytes,
        "rss_start": rss_start["VmRSS"], "rss_peak": rss_end["VmHWM"], "rss_anon_end": rss_end["RssAnon"],
        "rss_file_end": rss_end["RssFile"],
    })
    if files:
        row["cached_at_end"] = cached_fraction(files)
        row["file_bytes"] = sum(os.path.getsize(f) for f in files)
    if handle is not None:
        s = handle.stats()
        top_k = cfg.num_experts_per_tok
        bound = s["cache_bound_bytes"] + top_k * expert_bytes  # + one layer's prefetch in flight
        row.update({k: s[k] for k in ("hits", "misses", "prefetch_hits", "wasted_prefetches", "overflow_loads",
                                      "bytes_moved", "stall_s", "predictor_s", "peak_resident_bytes", "hit_rate",
                                      "cache_bound_bytes", "prediction_precision")})
        row["bound_plus_prefetch_bytes"] = bound
        row["within_bound"] = s["peak_resident_bytes"] <= bound
        handle.remove()
    return row


def _child(spec: dict, timeout_s: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    out = subprocess.run([sys.executable, "-m", "effllm.bench.cases.moe", "child", json.dumps(spec)],
                         check=False, capture_output=True, text=True, timeout=timeout_s, env=env)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode_rows(variants=tuple(VARIANTS), rounds: int = 3, cold=(False, True), new_tokens: int = 32,
                prompt: int = 8, threads: int = 1, seed: int = 0, timeout_s: float = 600, device: str = "cpu"
                ) -> list[dict]:
    """Every variant, page cache warm and cold, ``rounds`` times in alternating order, each run in a
    fresh process; one row per (variant, warm/cold) with the median tokens/s and every run's figures.
    ``device``: where the model runs (``run_variant``)."""
    runs: dict[tuple, list] = {}
    with tempfile.TemporaryDirectory(prefix="effllm-moe-bench-") as tmp:
        # cold page cache: not for the resident model, nor for reads that bypass the page cache
        order = [(v, c) for v in variants for c in cold
                 if c is False or (VARIANTS[v]["kind"] != "resident" and not VARIANTS[v].get("direct"))]
        for r in range(rounds):
            for variant, is_cold in (order if r % 2 == 0 else order[::-1]):
                work = Path(tempfile.mkdtemp(dir=tmp))
                spec = {"variant": variant, "cold": is_cold, "model_seed": 0, "work": str(work), "seed": seed,
                        "new_tokens": new_tokens, "prompt": prompt, "threads": threads, "device": device}
                load = os.getloadavg()[0]
                res = _child(spec, timeout_s)
                res["loadavg_1m"] = round(load, 2)
                runs.setdefault((variant, is_cold), []).append(res)
                print(variant, "cold" if is_cold else "warm", {k: res.get(k) for k in
                      ("tokens_per_s", "hit_rate", "cached_at_start", "rss_peak", "error", "skipped")}, flush=True)
                for f in work.rglob("*"):
                    if f.is_file():
                        f.unlink()
    rows = []
    reference = None
    for (variant, is_cold), results in runs.items():
        ok = [x for x in results if "tokens_per_s" in x]
        page_cache = "bypassed (O_DIRECT)" if VARIANTS[variant].get("direct") else "cold" if is_cold else "warm"
        row = {"part": "decode", "variant": variant, "page_cache": page_cache,
               "spec": VARIANTS[variant], "model": dict(MODEL, architecture="MixtralForCausalLM", dtype="float32",
                                                       weights="random (effllm.testing.models.tiny_causal_lm)"),
               "new_tokens": new_tokens, "prompt_tokens": prompt, "threads": threads, "device": device,
               "runs": results}
        if ok:
            row["tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in ok)
            tokens = {tuple(x["tokens"]) for x in ok}
            if reference is None and variant == "resident":
                reference = tokens
            row["same_tokens_every_run"] = len(tokens) == 1
        rows.append(row)
    for row in rows:  # every variant must produce the resident model's tokens (same sampling seed)
        ok = [x for x in row["runs"] if "tokens" in x]
        row["same_tokens_as_resident"] = bool(ok) and reference is not None and \
            all((tuple(x["tokens"]),) and tuple(x["tokens"]) in reference for x in ok)
        for x in row["runs"]:
            x.pop("tokens", None)
    return rows


def direct_read_rows(reads: int, experts: int = 24) -> list[dict]:
    """O_DIRECT reads of the decode model's experts (fp32 (2 x 2048, 768) and (768, 2048): 18 MiB),
    ``reads`` random ones, each read twice in alternating order: straight into a page-aligned
    slot of an aligned file, and into an unaligned slot (through the page-aligned buffer, then a
    copy). The same file, the same experts, the same moment: the copy's cost, side by side."""
    import random

    from effllm.moe.store import DiskStore, direct_io_unsupported, slab

    # one thread, as the decode runs: a two-thread copy waits for a second core another job may hold
    torch.set_num_threads(1)
    shapes = ((2 * MODEL["intermediate_size"], MODEL["hidden_size"]), (MODEL["hidden_size"], MODEL["intermediate_size"]))
    names = ("gate_up_proj", "down_proj")
    with tempfile.TemporaryDirectory(prefix="effllm-direct-read-", dir=os.environ.get("EFFLLM_MOE_WORK")) as work:
        why = direct_io_unsupported(work)
        if why is not None:
            return [{"part": "direct_read", "skipped": why}]
        gen = torch.Generator().manual_seed(0)
        path = DiskStore.write(Path(work) / "experts.safetensors", names,
                               [tuple(torch.randn(experts, *shape, generator=gen) for shape in shapes)], align=4096)
        store = DiskStore(path, names, [experts], direct=True)
        try:
            slots = tuple(slab(1, shape, torch.float32, 4096)[0] for shape in shapes)
            # one element past an aligned start: never aligned, so the read takes the buffer
            unaligned = tuple(torch.empty(torch.Size(shape).numel() + 1)[1:].view(shape) for shape in shapes)
            times: dict = {"in_place": [], "buffer_and_copy": []}
            rng = random.Random(0)
            for i in range(reads):
                expert = rng.randrange(experts)
                order = [("in_place", slots), ("buffer_and_copy", unaligned)]
                for mode, out in order if i % 2 == 0 else order[::-1]:
                    start = time.perf_counter()
                    store.load(0, expert, out)
                    times[mode].append(time.perf_counter() - start)
        finally:
            store.close()
    rows = []
    for mode, ts in times.items():
        q1, median, q3 = statistics.quantiles(ts, n=4)
        rows.append({"part": "direct_read", "mode": mode, "reads": reads, "expert_bytes": store.expert_bytes[0],
                     "median_ms": median * 1e3, "p25_ms": q1 * 1e3, "p75_ms": q3 * 1e3})
    rows[1]["median_vs_in_place"] = rows[1]["median_ms"] / rows[0]["median_ms"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effllm.bench.cases.moe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    sim = sub.add_parser("sim")
    sim.add_argument("--data", default=str(DATA))
    sim.add_argument("--out", default="benchmarks/results/e2e/moe_simulate.jsonl")
    dec = sub.add_parser("decode")
    dec.add_argument("--variants", default=",".join(VARIANTS))
    dec.add_argument("--rounds", type=int, default=3)
    dec.add_argument("--new-tokens", type=int, default=32)
    dec.add_argument("--no-cold", action="store_true")
    dec.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda (the cache on the GPU, "
                                                     "the experts' slow tier pinned CPU memory or the disk)")
    dec.add_argument("--out", default="benchmarks/results/e2e/moe_decode.jsonl")
    smol = sub.add_parser("smol")
    smol.add_argument("--tokens", type=int, default=512, help="tokens of each shipped text in the trace")
    smol.add_argument("--live-tokens", type=int, default=256, help="tokens of each text in the live decodes")
    smol.add_argument("--no-live", action="store_true")
    smol.add_argument("--live-variants", default="", help="comma-separated live variants (default: all)")
    smol.add_argument("--trace-out", default=None, help="also save the recorded routes (safetensors)")
    smol.add_argument("--out", default="benchmarks/results/e2e/moe_smollm2.jsonl")
    ab = sub.add_parser("smol-ab", help="prefetch A/B on the SmolLM2 MoE, each run a fresh process")
    ab.add_argument("--variants", default=",".join(SMOL_AB_VARIANTS))
    ab.add_argument("--rounds", type=int, default=3)
    ab.add_argument("--live-tokens", type=int, default=64, help="tokens of each shipped text decoded per run")
    ab.add_argument("--baseline-src", default=None,
                    help="another effllm source tree (its src/), run alongside this one: a before/after A/B")
    ab.add_argument("--out", default="benchmarks/results/e2e/moe_smollm2_prefetch_ab.jsonl")
    direct = sub.add_parser("direct-read", help="O_DIRECT expert reads: into an aligned slot vs through a buffer")
    direct.add_argument("--reads", type=int, default=100)
    direct.add_argument("--out", default="benchmarks/results/e2e/moe_direct_read.jsonl")
    child = sub.add_parser("child")
    child.add_argument("spec")
    ab_child = sub.add_parser("smol-ab-child")
    ab_child.add_argument("spec")
    args = parser.parse_args(argv)
    if args.part == "child":
        print(json.dumps(run_variant(json.loads(args.spec))))
        return 0
    if args.part == "smol-ab-child":
        print(json.dumps(smol_ab_child(json.loads(args.spec))))
        return 0
    from effllm.bench.records import write_result_rows

    before = machine()
    if args.part == "sim":
        rows = simulate_rows(Path(args.data))
        keys = ("part", "trace", "cache_multiple", "policy", "predictor")
    elif args.part == "direct-read":
        rows = direct_read_rows(args.reads)
        keys = ("part", "mode")
    elif args.part == "smol-ab":
        rows = smol_ab_rows(tuple(args.variants.split(",")), rounds=args.rounds, live_tokens=args.live_tokens,
                            baseline_src=args.baseline_src)
        keys = ("part", "code", "variant")
    elif args.part == "smol":
        rows = smol_rows(tokens=args.tokens, live_tokens=args.live_tokens, trace_out=args.trace_out,
                         live=not args.no_live, only=tuple(v for v in args.live_variants.split(",") if v))
        keys = ("part", "text", "cache_multiple", "policy", "predictor", "variant")
    else:
        rows = decode_rows(tuple(args.variants.split(",")), rounds=args.rounds, new_tokens=args.new_tokens,
                           cold=(False,) if args.no_cold else (False, True), device=args.device)
        keys = ("part", "variant", "page_cache")
    path = write_result_rows(args.out, rows, keep_others=keys, machine_before=before, machine_after=machine(),
                             torch_threads=torch.get_num_threads())
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# -- cases in the effllm bench harness ------------------------------------------------------------------------------

def _register_cases() -> None:
    from effllm.bench import ModelSetup, define_metric, model_case

    define_metric("expert_hit_rate", unit="fraction", better="higher",
                  doc="share of expert accesses served without an on-demand load (cache + prefetch hits)")
    define_metric("stall_ms_per_token", unit="ms", better="lower",
                  doc="modelled wait for expert loads per token (effllm.moe.CostModel)")
    define_metric("live_hit_rate", unit="fraction", better="higher", timed=True,
                  doc="expert hit rate of an offloaded model during the timed decode (handle.stats())")
    define_metric("peak_expert_mb", unit="MiB", better="lower", timed=True,
                  doc="peak resident expert bytes by the offload's own accounting")
    define_metric("rss_peak_mb", unit="MiB", better="lower", timed=True,
                  doc="peak resident set of a fresh process during decode (VmHWM reset at decode start)")

    @model_case("moe.simulate", params=[{"trace": t, "cache_multiple": m} for t in TRACES for m in (1, 2, 4)],
                quick_params=[{"trace": "mixtral_humaneval", "cache_multiple": 2}],
                metrics=("expert_hit_rate", "stall_ms_per_token"), baseline="lru+none",
                description="MoE expert cache on the real routing traces: hit rate and modelled stall per policy "
                            "and predictor at 1x/2x/4x the active experts")
    def simulate_case(params, dtype, device):
        from effllm.moe import CostModel, load_trace, simulate

        trace = load_trace(DATA / TRACES[params["trace"]])
        capacity = int(params["cache_multiple"]) * trace.experts.shape[2]
        cost = CostModel(**TRACE_COST[params["trace"]])

        def measure(policy, predictor):
            def run():
                r = simulate(trace, capacity, policy, predictor=predictor, cost=cost)
                return {"expert_hit_rate": r.hit_rate, "stall_ms_per_token": 1e3 * r.stall_s / trace.experts.shape[0]}
            return run

        return ModelSetup(measures={f"{p}+{q or 'none'}": measure(p, q) for p in ("lru", "lfu", "moe_infinity", "belady")
                                    for q in (None, "transition", "trace_match")})

    @model_case("moe.offload", params=[{"page_cache": "warm", "new_tokens": 24}, {"page_cache": "cold", "new_tokens": 24}],
                quick_params=[{"page_cache": "warm", "new_tokens": 4}], repeats=2, warmup=0,
                metrics=("decode_tokens_per_s", "live_hit_rate", "peak_expert_mb", "rss_peak_mb"),
                baseline="disk_1x_on_demand",
                description="random Mixtral-style model (MODEL in cases/moe.py), experts on disk: decode tokens/s "
                            "and memory, each run a fresh process (resident, effllm disk caches, accelerate)")
    def offload_case(params, dtype, device):
        if device.type != "cpu":
            return ModelSetup(unavailable={"all": "the offload benchmark runs on CPU here"})
        cold = params["page_cache"] == "cold"

        def run(variant):
            def once():
                with tempfile.TemporaryDirectory(prefix="effllm-moe-case-") as work:
                    res = _child({"variant": variant, "cold": cold, "model_seed": 0, "work": work, "seed": 0,
                                      "new_tokens": int(params["new_tokens"]), "prompt": 8, "threads": 1}, 900)
                if "tokens_per_s" not in res:
                    raise RuntimeError(f"moe.offload {variant}: {res.get('error') or res.get('skipped')}")
                out = {"decode_tokens_per_s": res["tokens_per_s"], "rss_peak_mb": res["rss_peak"] / 2**20}
                if "hit_rate" in res:
                    out.update(live_hit_rate=res["hit_rate"], peak_expert_mb=res["peak_resident_bytes"] / 2**20)
                return out
            return once

        # a cold page cache means nothing to the resident model or to reads that bypass it
        names = [v for v in VARIANTS if not (cold and (v == "resident" or VARIANTS[v].get("direct")))]
        unavailable = {}
        try:
            import accelerate  # noqa: F401
        except ImportError:
            names.remove("accelerate_experts_on_disk")
            unavailable["accelerate_experts_on_disk"] = "accelerate is not installed (pip install effllm[bench])"
        return ModelSetup(runs={v: run(v) for v in names}, unavailable=unavailable)


_register_cases()
