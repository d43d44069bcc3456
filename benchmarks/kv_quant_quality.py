"""KV-cache quantization (KIVI, ``QuantizedKVCache``) on SmolLM2-135M-Instruct with texts effllm
ships, against the full cache, on ``--threads`` threads (1 unless said; the records say):

(a) pass-key retrieval (``kv_quality.py``'s 8 prompts): answer NLL, key-digit NLL and exact
    match, question in the prompt and question read after the context was cached;
(b) perplexity of 256 tokens of ``calibration.txt`` after its first 768 were cached;
(c) KV bytes held and decode tokens/s at a ~4k-token context;
(d) ``--parts codes-speed``: decode tokens/s at a ~4k-token context with effllm's attention
    reading the codes (``kv.compress(model, quantizer=q)``: KIVI-2, NSNQuant-2, NSNQuant-1),
    KIVI-2 dequantized under the model's own attention, and the full cache, interleaved over
    ``--rounds`` rounds (medians; each round's ratio to that round's full cache);
(d') ``--parts combo-speed``: the same, interleaved, for ``--combos`` at 75% removed (eviction,
    then quantization, under effllm's attention). The kept prompt is quantized in the prefill
    (since session 15; before, at the first update after it, which ``settle_s`` timed apart from
    the decode steps and now reads near zero); no speed figure times the prefill;
(e) ``--parts layer``: one SmolLM2-shaped layer at 4096 tokens (1 query token, 9 query / 3 KV
    heads, head dim 64, float32, random keys/values): SDPA over the full cache against attention
    over KIVI-2 / NSNQuant-2 / NSNQuant-1 codes, interleaved, medians of 9 rounds of 5 calls;
(f) ``--parts prefix``: NLL of the 256 tokens that follow a 4096-token prefix held by each
    quantizer (and by SnapKV at 50% / 75% removed, then NSNQuant-2), on a text effllm does not
    ship (the Python reference's topics, ``pydoc_data.topics``, in sorted order: it changes with
    the Python version, which the records carry); bytes held against an fp16 cache of the
    prefix, as held (float32 windows) and with the windows counted at 2 bytes an element; and
    transformers' ``QuantizedCache`` (quanto backend, its defaults) where optimum-quanto imports;
(g) ``--parts passkey-4k``: pass-key retrieval at a ~4000-token prompt (``build_prompt``, key at
    depths 0.1-0.9), both conventions, through the full cache and SnapKV / KVzip(layer) at 75%
    removed followed by NSNQuant-2 (default window, and a 16-token window; ``--only`` picks
    some): answer NLL, key-digit NLL, exact match,
    and the bytes held after the prompt against an fp16 cache of it (as held, and with the
    windows counted at 2 bytes an element).
(h) ``--parts protect``: how the answer NLL of ``--samples`` ~1000-token pass-key prompts
    (question in the prompt) moves with ``NSNQuant(protect=f)``, the best-ranked fraction ``f``
    of the kept tokens near-exact: KVzip(global) at 75% removed alone, then with NSNQuant-2
    (window 16 / chunk 32) at each ``f`` in ``PROTECT``; bytes as in (g).

Quantizers alone run in a ``QuantizedKVCache`` under the model's own attention; a quantizer
combined with eviction (``--combos``: a policy at 50% and 75% removed, then KIVI, in one
``CompressedCache``) runs under effllm's attention (``kv.compress(model, policy, quantizer)``),
its bytes counting everything the cache holds (``nbytes()``).

    python benchmarks/kv_quant_quality.py    # writes benchmarks/results/e2e/kv_quant_quality.jsonl
    python benchmarks/kv_quant_quality.py --only none --combos "SnapKV+KIVI-2,KVzip(layer)+KIVI-2"
    python benchmarks/kv_quant_quality.py --parts codes-speed --rounds 3 [--codes "NSNQuant-2 codes,NSNQuant-1 codes"]
    python benchmarks/kv_quant_quality.py --parts combo-speed --rounds 3 \
        --combos "SnapKV+NSNQuant-2 (window 16),KVzip(global)+NSNQuant-2 (window 16)"
    python benchmarks/kv_quant_quality.py --parts layer
    python benchmarks/kv_quant_quality.py --parts prefix
    python benchmarks/kv_quant_quality.py --parts passkey-4k --samples 4
    python benchmarks/kv_quant_quality.py --parts protect --samples 4
    python benchmarks/kv_quant_quality.py --parts passkey-4k --samples 8 \
        --only "SnapKV 75% removed + NSNQuant-2 (window 16 / chunk 32),KVzip(layer) 75% removed + NSNQuant-2 (window 16 / chunk 32)"
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import kv_quality as kq
import torch

from effllm.bench.records import describe_device, git_sha, write_result_rows
from effllm.kv import KIVI, KVzip, NSNQuant, QuantizedKVCache, SnapKV
from effllm.kv.quantized_rows import QuantizedRows
from effllm.testing.models import smollm2

OUT = kq.OUT.with_name("kv_quant_quality.jsonl")
CONFIGS = {"KIVI-4 (group 32, residual 128)": KIVI(4, 32, 128), "KIVI-2 (group 32, residual 128)": KIVI(2, 32, 128),
           "KIVI-2 (group 32, residual 32)": KIVI(2, 32, 32), "NSNQuant-2": NSNQuant(bits=2),
           "NSNQuant-1": NSNQuant(bits=1)}
# eviction, then quantization, in one cache: factories of the fraction kept
COMBOS = {"SnapKV+KIVI-4": lambda b, tok: (SnapKV(b), KIVI(4, 32, 128)),
          "SnapKV+KIVI-2": lambda b, tok: (SnapKV(b), KIVI(2, 32, 128)),
          "KVzip(layer)+KIVI-4": lambda b, tok: (KVzip(b, tokenizer=tok, scope="layer"), KIVI(4, 32, 128)),
          "KVzip(layer)+KIVI-2": lambda b, tok: (KVzip(b, tokenizer=tok, scope="layer"), KIVI(2, 32, 128)),
          "SnapKV+NSNQuant-2": lambda b, tok: (SnapKV(b), NSNQuant(bits=2)),
          "KVzip(layer)+NSNQuant-2": lambda b, tok: (KVzip(b, tokenizer=tok, scope="layer"), NSNQuant(bits=2)),
          # the 16-token window of --parts passkey-4k; KVzip's global scope: a quantized store per row
          "SnapKV+NSNQuant-2 (window 16)": lambda b, tok: (SnapKV(b), NSNQuant(bits=2, residual=16, chunk=32)),
          "KVzip(global)+NSNQuant-2 (window 16)": lambda b, tok: (KVzip(b, tokenizer=tok, scope="global"),
                                                                 NSNQuant(bits=2, residual=16, chunk=32))}


# decode over the codes (effllm's attention, a quantizer alone): name -> quantizer
CODES = {"KIVI-2 codes (group 32, residual 128)": KIVI(2, 32, 128), "NSNQuant-2 codes": NSNQuant(bits=2),
         "NSNQuant-1 codes": NSNQuant(bits=1),
         # every key coded twice: a second code's scores added to every row's
         "NSNQuant-2 codes (every key coded twice)": NSNQuant(bits=2, key_heads="all", key_residual="codes"),
         "NSNQuant-2 codes (every key coded twice / second code 1-bit)":
             NSNQuant(bits=2, key_heads="all", key_residual="codes", key_residual_bits=1)}


class CombinedSession(kq.Session):
    """``kv_quality``'s session with a (policy, quantizer) pair; bytes: all the cache holds."""

    def kv_bytes(self) -> int:
        return self.cache.nbytes()


class QuantizedSession(kq.Session):
    """``kv_quality``'s session with a ``QuantizedKVCache`` (``policy``: the KIVI settings)."""

    def __enter__(self):
        self.cache = QuantizedKVCache(self.policy, config=self.model.config)
        return self

    def __exit__(self, *exc):
        return False

    def kv_bytes(self) -> int:
        return self.cache.nbytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--parts", default="pass-key,perplexity,speed")
    parser.add_argument("--only", help="comma-separated quantizer configs to run alone ('none': no config); with "
                                       "--parts passkey-4k, names of passkey_long_runs(); with --parts prefix, of prefix_quality()'s runs "
                                       "(the full cache always runs)")
    parser.add_argument("--conventions", default="question in prompt,question after",
                        help="with --parts passkey-4k: the pass-key conventions to run")
    parser.add_argument("--combos", default="", help=f"comma-separated of {', '.join(COMBOS)}, or 'all'")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --parts codes-speed")
    parser.add_argument("--baseline-from", type=Path,
                        help="with --parts passkey-4k: take the full cache's rows from this record file (same "
                             "--samples and prompts) instead of running them again")
    parser.add_argument("--codes", help="with --parts codes-speed: comma-separated names of its runs (default all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (each record holds its own count)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    configs = {k: v for k, v in CONFIGS.items() if args.only is None or k in args.only.split(",")}
    combos = COMBOS if args.combos == "all" else {k: COMBOS[k] for k in args.combos.split(",") if k}
    torch.set_num_threads(args.threads)
    sha = git_sha()  # the code that runs: stamped even if commits land while this runs
    parts = set(args.parts.split(","))
    model, tok = smollm2()
    rows = []
    for convention in ("question in prompt", "question after") if "pass-key" in parts else ():
        base = kq.run_pass_key(model, tok, kq.Session, None, None, args.samples, convention)
        rows.append({"part": "pass-key", "config": "full cache", "convention": convention, **base})
        print(f"pass-key  {convention:18s} full cache  EM {base['exact_match']:.2f}  NLL {base['answer_nll']:.3f}"
              f"  key NLL {base['key_nll']:.3f}", flush=True)
        runs = [(name, QuantizedSession, lambda _, c=config: c, None) for name, config in configs.items()]
        runs += [(f"{name} {label}", CombinedSession, lambda b, f=factory: f(b, tok), budget)
                 for name, factory in combos.items() for label, budget in kq.BUDGETS.items()]
        for name, session_class, factory, budget in runs:
            res = kq.run_pass_key(model, tok, session_class, factory, budget, args.samples, convention)
            res["nll_increase"] = res["answer_nll"] - base["answer_nll"]
            res["key_nll_increase"] = res["key_nll"] - base["key_nll"]
            rows.append({"part": "pass-key", "config": name, "convention": convention, **res})
            print(f"pass-key  {convention:18s} {name}  EM {res['exact_match']:.2f}  NLL {res['answer_nll']:.3f} "
                  f"({res['nll_increase']:+.3f})  key NLL {res['key_nll']:.3f} ({res['key_nll_increase']:+.3f})",
                  flush=True)
    if "perplexity" in parts:
        base = kq.run_perplexity(model, tok, kq.Session, None)
        rows.append({"part": "perplexity", "config": "full cache", "perplexity": base})
        runs = [(name, QuantizedSession, config) for name, config in configs.items()]
        runs += [(f"{name} {label}", CombinedSession, factory(budget, tok))
                 for name, factory in combos.items() for label, budget in kq.BUDGETS.items()]
        for name, session_class, config in runs:
            ppl = kq.run_perplexity(model, tok, session_class, config)
            rows.append({"part": "perplexity", "config": name, "perplexity": ppl, "relative": ppl / base - 1})
            print(f"perplexity {name}  {ppl:.3f} ({100 * (ppl / base - 1):+.2f}%, full {base:.3f})", flush=True)
    if "speed" in parts:
        full = kq.run_speed(model, tok, kq.Session, None)
        rows.append({"part": "speed", "config": "full cache", **full})
        runs = [(name, QuantizedSession, config) for name, config in configs.items()]
        runs += [(f"{name} {label}", CombinedSession, factory(budget, tok))
                 for name, factory in combos.items() for label, budget in kq.BUDGETS.items()]
        for name, session_class, config in runs:
            res = kq.run_speed(model, tok, session_class, config)
            res["speedup"], res["bytes_ratio"] = res["decode_tok_s"] / full["decode_tok_s"], res["kv_bytes"] / full["kv_bytes"]
            rows.append({"part": "speed", "config": name, **res})
            print(f"speed {name}  {res['decode_tok_s']:.2f} tok/s ({res['speedup']:.2f}x full)  "
                  f"{res['kv_bytes'] / 2**20:.1f} MiB ({res['bytes_ratio']:.3f} of full)", flush=True)
    if "layer" in parts:
        rows += layer_speed()
    if "codes-speed" in parts:
        rows += codes_speed(model, tok, args.rounds, None if args.codes is None else args.codes.split(","))
    if "combo-speed" in parts:
        rows += combo_speed(model, tok, combos, args.rounds)
    if "prefix" in parts:
        rows += prefix_quality(model, tok, only=None if args.only is None else args.only.split(","))
    def record(new_rows):
        write_result_rows(args.out, new_rows, device=describe_device(torch.device("cpu")), threads=args.threads,
                          samples=args.samples, git_sha=sha, keep_others=("part", "config", "convention"))

    if "protect" in parts:
        rows += protect_sweep(model, tok, args.samples)
    if "passkey-4k" in parts:  # slow (minutes a row): each row is recorded as it is measured
        only = None if args.only is None else args.only.split(",")
        baselines = None
        if args.baseline_from is not None:
            baselines = {r["convention"]: {**r, "baseline_from": str(args.baseline_from)}
                         for r in kq.read_rows(args.baseline_from)
                         if r.get("part") == "passkey-4k" and r.get("config") == "full cache"
                         and r.get("samples") == args.samples and r.get("prompt_tokens") == PASSKEY_TOKENS}
        rows += passkey_long(model, tok, args.samples, record=lambda row: record([row]), only=only,
                             conventions=tuple(args.conventions.split(",")), baselines=baselines)
    record(rows)
    print(f"wrote {args.out}")


def layer_speed(tokens: int = 4096, rounds: int = 9, calls: int = 5) -> list[dict]:
    """Milliseconds per call of one layer's decode attention: SDPA over full-precision keys and
    values against attention over each quantizer's codes (same random keys and values)."""
    import time

    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(1, 3, tokens, 64, generator=gen) for _ in range(2))
    query = torch.randn(1, 9, 1, 64, generator=gen)
    stores = {}
    for name, quantizer in CODES.items():
        stores[name] = quantizer.new_store()
        stores[name].append(keys, values)
    runs = {"full cache (SDPA)": lambda: F.scaled_dot_product_attention(query, keys, values, enable_gqa=True),
            **{name: (lambda s=store: s.attend(query, 0.125)) for name, store in stores.items()}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    loads = []
    for fn in runs.values():
        fn()
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        for name, fn in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    full = statistics.median(times["full cache (SDPA)"])
    rows = []
    for name, ms in times.items():
        rows.append({"part": "layer", "config": name, "ms": statistics.median(ms), "ms_range": [min(ms), max(ms)],
                     "vs_sdpa": statistics.median(ms) / full, "context": tokens, "loadavg_1min": [min(loads), max(loads)]})
        print(f"layer {name}  {rows[-1]['ms']:.3f} ms ({rows[-1]['vs_sdpa']:.1f}x SDPA)  load {min(loads):.1f}-"
              f"{max(loads):.1f}", flush=True)
    return rows


def codes_speed(model, tok, rounds: int, only=None) -> list[dict]:
    """Decode tokens/s over the codes against the full cache, configs interleaved per round;
    ``only``: names of ``CODES`` (and of the dequantizing KIVI-2 run) to run, default all."""
    runs = {"KIVI-2 dequantized (group 32, residual 128)": (QuantizedSession, lambda: KIVI(2, 32, 128)),
            **{name: (CombinedSession, lambda q=q: q) for name, q in CODES.items()}}
    runs = {name: run for name, run in runs.items() if only is None or name in only}
    return interleaved_speed(model, tok, runs, rounds, "codes-speed")


def combo_speed(model, tok, combos: dict, rounds: int) -> list[dict]:
    """Decode tokens/s of eviction + quantization at 75% removed against the full cache,
    interleaved per round (``--parts combo-speed``)."""
    runs = {f"{name} 75% removed": (CombinedSession, lambda f=factory: f(kq.BUDGETS["75% removed"], tok))
            for name, factory in combos.items()}
    return interleaved_speed(model, tok, runs, rounds, "combo-speed")


def interleaved_speed(model, tok, runs: dict, rounds: int, part: str) -> list[dict]:
    """``runs``: name -> (session class, factory of its setting), each run against the full cache
    in every round (in order), a fresh setting per run; medians and per-round ratios."""
    runs = {"full cache": (kq.Session, lambda: None), **runs}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    loads = []
    for _ in range(rounds):
        for name, (session_class, factory) in runs.items():
            loads.append(os.getloadavg()[0])
            results[name].append(kq.run_speed(model, tok, session_class, factory()))
            print(f"{part} {name}  {results[name][-1]['decode_tok_s']:.2f} tok/s  load {loads[-1]:.1f}", flush=True)
    full = results["full cache"]
    rows = []
    for name, res in results.items():
        ratios = [r["decode_tok_s"] / f["decode_tok_s"] for r, f in zip(res, full, strict=True)]
        row = {"part": part, "config": name, "decode_tok_s": statistics.median(r["decode_tok_s"] for r in res),
               "decode_tok_s_rounds": [r["decode_tok_s"] for r in res], "speedup": statistics.median(ratios),
               "speedup_rounds": ratios, "kv_bytes": res[-1]["kv_bytes"], "bytes_ratio": res[-1]["kv_bytes"] /
               full[-1]["kv_bytes"], "context": res[-1]["context"], "loadavg_1min": [min(loads), max(loads)],
               "settle_s_rounds": [r["settle_s"] for r in res]}
        rows.append(row)
        print(f"{part} {name}  median {row['decode_tok_s']:.2f} tok/s ({row['speedup']:.2f}x full, rounds "
              f"{', '.join(f'{x:.2f}' for x in ratios)})  {row['bytes_ratio']:.3f} of full bytes", flush=True)
    return rows


def long_text_ids(tok, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the Python reference's topic texts, joined in sorted order:
    prose and grammar effllm does not ship, long enough for a 4k prefix."""
    import sys
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tok(text[:tokens * 8], return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise RuntimeError(f"pydoc_data.topics of Python {sys.version.split()[0]} holds fewer than {tokens} tokens")
    return ids


def _fp16_window_bytes(cache, per_token: int, element_size: int) -> int:
    """Bytes ``cache`` holds with its full-precision tokens (windows, staged tokens) counted at 2
    bytes an element, as an fp16/bf16 model would hold them; ``per_token``: elements of one
    token's keys (batch x KV heads x head dim), ``element_size``: the model's."""
    total = cache.nbytes()
    for layer in cache.layers:
        if not layer.stored():
            continue
        staged = 0 if layer.keys is None else 2 * layer.keys.numel()
        if isinstance(layer.ragged, QuantizedRows):  # a store per (batch row, KV head), each its own window
            window = sum(sum(store.full_precision_tokens()) for store in layer.ragged.stores) * layer.keys.shape[-1]
        elif layer.store is not None:
            window = sum(layer.store.full_precision_tokens()) * per_token
        else:
            window = 0
        total -= (staged + window) * (element_size - 2)
    return total


def _settled_bytes(cache) -> int:
    """``cache.nbytes()`` once a prefill's tokens sit where they stay. The cache settles them at
    the end of the prefill itself; this settles a cache that could not (no number of layers)."""
    if hasattr(cache, "layers") and all(hasattr(layer, "settle") for layer in cache.layers):
        for layer in cache.layers:
            layer.settle()
    return cache.nbytes()


def _quanto_session(nbits: int):
    """A ``kv_quality`` session over transformers' ``QuantizedCache`` (quanto backend, defaults),
    or None where optimum-quanto does not import."""
    try:
        import optimum.quanto  # noqa: F401
        from transformers import QuantizedCache
    except ImportError:
        return None

    class QuantoSession(kq.Session):
        def __enter__(self):
            self.cache = QuantizedCache("quanto", self.model.config, nbits=nbits)
            return self

        def __exit__(self, *exc):
            return False

    return QuantoSession


@torch.inference_mode()
def prefix_quality(model, tok, prefix: int = 4096, cont: int = 256, only=None) -> list[dict]:
    """Continuation NLL after a ``prefix``-token context held by each cache (see (f) above);
    ``only``: the configs to run (the full cache, the reference, always runs)."""
    import torch.nn.functional as F

    ids = long_text_ids(tok, prefix + cont)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    fp16_bytes = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2 * prefix
    runs = {"full cache": (kq.Session, None),
            "KIVI-4 (group 32, residual 128)": (CombinedSession, KIVI(4, 32, 128)),
            "KIVI-2 (group 32, residual 128)": (CombinedSession, KIVI(2, 32, 128)),
            "NSNQuant-2": (CombinedSession, NSNQuant(bits=2)), "NSNQuant-1": (CombinedSession, NSNQuant(bits=1)),
            # session 19: the channel shifts as int8 times a float16 scale a chunk
            "NSNQuant-2 (int8 shifts)": (CombinedSession, NSNQuant(bits=2, shift_bits=8)),
            "NSNQuant-1 (int8 shifts)": (CombinedSession, NSNQuant(bits=1, shift_bits=8)),
            "NSNQuant-2 (least-squares gain)": (CombinedSession, NSNQuant(bits=2, gain="least_squares")),
            "NSNQuant-1 (least-squares gain)": (CombinedSession, NSNQuant(bits=1, gain="least_squares")),
            "SnapKV 50% removed + NSNQuant-2": (CombinedSession, (SnapKV(0.5), NSNQuant(bits=2))),
            "SnapKV 75% removed + NSNQuant-2": (CombinedSession, (SnapKV(0.25), NSNQuant(bits=2)))}
    for nbits in (4, 2):
        session_class = _quanto_session(nbits)
        if session_class is not None:
            runs[f"transformers QuantizedCache (quanto {nbits}-bit, defaults)"] = (session_class, "quanto")
        else:
            print("prefix: transformers QuantizedCache skipped (optimum-quanto does not import)", flush=True)
    runs = {k: v for k, v in runs.items() if only is None or k == "full cache" or k in only}
    rows, base = [], None
    for name, (session_class, config_or_pair) in runs.items():
        with session_class(model, None if config_or_pair == "quanto" else config_or_pair) as session:
            last = session.prefill(ids[:, :prefix])[0, -1:]
            held = _settled_bytes(session.cache) if hasattr(session.cache, "nbytes") else None
            fp16_held = None if held is None else _fp16_window_bytes(
                session.cache, config.num_key_value_heads * head_dim, model.dtype.itemsize)
            if session_class is kq.Session:
                held = fp16_held = fp16_bytes  # the full cache, as an fp16 model holds it
            logits = torch.cat([last, session.step(ids[:, prefix:-1])[0]])
        nll = float(F.cross_entropy(logits.float(), ids[0, prefix:]))
        base = nll if base is None else base
        row = {"part": "prefix", "config": name, "prefix": prefix, "continuation": cont, "nll": nll,
               "relative": nll / base - 1, "bytes_vs_fp16": None if held is None else held / fp16_bytes,
               "bytes_vs_fp16_fp16_window": None if fp16_held is None else fp16_held / fp16_bytes}
        rows.append(row)
        size = "" if held is None else f"  bytes {row['bytes_vs_fp16']:.3f} / {row['bytes_vs_fp16_fp16_window']:.3f} of fp16"
        print(f"prefix {name}  NLL {nll:.4f} ({100 * row['relative']:+.2f}%){size}", flush=True)
    return rows


def passkey_long_runs(tok) -> dict:
    """``--parts passkey-4k``'s settings (name -> factory of a (policy, quantizer) pair). After 75%
    eviction the default 64-127-token full-precision window is a third of what is left, so the
    16-token window (chunk 32) is what reaches a few percent of the fp16 bytes. KVzip's scoring
    is pinned to "cache" where it was recorded so (the default before session 18; at 4000 tokens
    the replay has two chunks, where the scorings differ); the "(chunk scoring)" rows use the
    default since, spelled out."""
    small = dict(bits=2, residual=16, chunk=32)

    def kvzip(budget, scope="global", scoring="cache"):
        return KVzip(budget, tokenizer=tok, scope=scope, scoring=scoring)

    return {"SnapKV 75% removed + NSNQuant-2": lambda: (SnapKV(0.25), NSNQuant(bits=2)),
            "KVzip(layer) 75% removed + NSNQuant-2":
                lambda: (kvzip(0.25, scope="layer"), NSNQuant(bits=2)),
            "SnapKV 75% removed + NSNQuant-2 (window 16 / chunk 32)": lambda: (SnapKV(0.25), NSNQuant(**small)),
            "KVzip(layer) 75% removed + NSNQuant-2 (window 16 / chunk 32)":
                lambda: (kvzip(0.25, scope="layer"), NSNQuant(**small)),
            # the global scope: heads keep different numbers of tokens, a quantized store per row
            "KVzip(global) 75% removed": lambda: kvzip(0.25),
            "KVzip(global) 75% removed + NSNQuant-2 (window 16 / chunk 32)":
                lambda: (kvzip(0.25), NSNQuant(**small)),
            # exact keys on the sharpest 1% / 2% of the (layer, KV head) rows (1 / 2 of SmolLM2's 90)
            **{f"KVzip(global) 75% removed + NSNQuant-2 (window 16 / chunk 32 / exact keys on {p}% of heads)":
               (lambda p=p: (kvzip(0.25),
                             NSNQuant(**small, key_heads=p / 100)))
               for p in (1, 2)},
            # the same residuals coded again (a second 2-bit code: about a sixth of the bytes)
            "KVzip(global) 75% removed + NSNQuant-2 (window 16 / chunk 32 / keys coded twice on 1% of heads)":
                lambda: (kvzip(0.25),
                         NSNQuant(**small, key_heads=0.01, key_residual="codes")),
            # every key coded twice (keys at 4 or 3 bits, values at 2), with more eviction to pay for it
            **{f"KVzip(global) 81% removed + NSNQuant-2 (window 16 / chunk 32 / every key coded twice{label})":
               (lambda b=b: (kvzip(0.19),
                             NSNQuant(**small, key_heads="all", key_residual="codes", key_residual_bits=b)))
               for b, label in ((2, ""), (1, " / second code 1-bit"))},
            # what each part costs: the eviction alone, the values' codes alone (keys near-exact),
            # the keys coded twice at 75% (over the bytes)
            "KVzip(global) 81% removed": lambda: kvzip(0.19),
            # the paper's scoring: each replayed chunk's tokens scored within a softmax over that chunk
            # (a third, "local", each chunk replayed against itself alone, was measured at 9bb628a and removed)
            **{f"KVzip(global) {100 - b}% removed (chunk scoring)":
               (lambda b=b: kvzip(b / 100, scoring="chunk")) for b in (25, 19)},
            "KVzip(global) 75% removed (chunk scoring) + NSNQuant-2 (window 16 / chunk 32)":
                lambda: (kvzip(0.25, scoring="chunk"), NSNQuant(**small)),
            "KVzip(global) 75% removed (chunk scoring) + NSNQuant-2 (window 16 / chunk 32 / every key coded twice / "
            "second code 1-bit)":
                lambda: (kvzip(0.25, scoring="chunk"),
                         NSNQuant(**small, key_heads="all", key_residual="codes", key_residual_bits=1)),
            # session 19: the same with int8 shifts (and the cache's positions dropped after the replay)
            "KVzip(global) 75% removed (chunk scoring) + NSNQuant-2 (window 16 / chunk 32 / every key coded twice / "
            "second code 1-bit / int8 shifts)":
                lambda: (kvzip(0.25, scoring="chunk"),
                         NSNQuant(**small, key_heads="all", key_residual="codes", key_residual_bits=1, shift_bits=8)),
            "KVzip(global) 81% removed + NSNQuant-2 (window 16 / chunk 32 / every key 16-bit)":
                lambda: (kvzip(0.19),
                         NSNQuant(**small, key_heads="all")),
            **{f"KVzip(global) 75% removed + NSNQuant-2 (window 16 / chunk 32 / every key coded twice{label})":
               (lambda b=b: (kvzip(0.25),
                             NSNQuant(**small, key_heads="all", key_residual="codes", key_residual_bits=b)))
               for b, label in ((2, ""), (1, " / second code 1-bit"))},
            # the gain of sessions 12-14 (least squares), side by side with the norm gain
            "KVzip(global) 75% removed + NSNQuant-2 (window 16 / chunk 32 / least-squares gain)":
                lambda: (kvzip(0.25),
                         NSNQuant(**small, gain="least_squares"))}


PROTECT = (0.0, 0.02, 0.1, 0.25, 0.5, 1.0)


@torch.inference_mode()
def protect_sweep(model, tok, samples: int, tokens: int = 1000) -> list[dict]:
    """Part (h): answer NLL and bytes with ``protect`` at each of ``PROTECT``, per prompt."""
    from effllm.demo import build_prompt

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = config.num_key_value_heads * head_dim
    runs = {"KVzip(global) 75% removed": lambda: KVzip(0.25, tokenizer=tok, scope="global"),
            **{f"KVzip(global) 75% removed + NSNQuant-2 (window 16 / chunk 32, protect {f:g})":
               (lambda f=f: (KVzip(0.25, tokenizer=tok, scope="global"),
                             NSNQuant(bits=2, residual=16, chunk=32, protect=f))) for f in PROTECT}}
    prompts = [build_prompt(tok, tokens, seed=i, depth=0.1 + 0.8 * i / max(1, samples - 1)) for i in range(samples)]
    rows = []
    for name, factory in runs.items():
        nlls, ratios16 = [], []
        for prompt in prompts:
            fp16_bytes = config.num_hidden_layers * 2 * per_token * 2 * prompt.input_ids.shape[1]
            with CombinedSession(model, factory()) as session:
                first = session.prefill(prompt.input_ids)[0, -1:]
                ratios16.append(_fp16_window_bytes(session.cache, per_token, model.dtype.itemsize) / fp16_bytes)
                nlls.append(float(kq._answer(session, first, prompt.answer_ids).mean()))
        row = {"part": "protect", "config": name, "convention": "question in prompt", "prompt_tokens": tokens,
               "answer_nll": statistics.mean(nlls), "answer_nlls": nlls,
               "bytes_vs_fp16_fp16_window": statistics.mean(ratios16)}
        rows.append(row)
        print(f"protect {name}  NLL {row['answer_nll']:.3f}  bytes {row['bytes_vs_fp16_fp16_window']:.4f} of fp16 "
              f"(windows at 2 bytes)", flush=True)
    return rows


PASSKEY_TOKENS = 4000  # --parts passkey-4k's prompt length


@torch.inference_mode()
def passkey_long(model, tok, samples: int, tokens: int = PASSKEY_TOKENS, record=None, only=None,
                 conventions=("question in prompt", "question after"), baselines=None) -> list[dict]:
    """Pass-key retrieval at a ``tokens``-token prompt (see (g) above); ``record(row)`` is called
    with each row as it is measured; ``only``: names of ``passkey_long_runs`` to run (the full
    cache always runs: it is the baseline, unless ``baselines`` (convention -> a recorded
    full-cache row of the same prompts) gives it); ``conventions``: which to run."""
    from effllm.demo import build_prompt

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = config.num_key_value_heads * head_dim
    runs = {"full cache": None, **passkey_long_runs(tok)}
    runs = {k: v for k, v in runs.items() if k == "full cache" or only is None or k in only}
    rows = []
    for convention in conventions:
        base = (baselines or {}).get(convention)
        for name, factory in runs.items():
            if name == "full cache" and base is not None:
                continue  # the recorded baseline stands in (not recorded again)
            exact, nlls, key_nlls, ratios, ratios16 = [], [], [], [], []
            for i in range(samples):
                prompt = build_prompt(tok, tokens, seed=i, depth=0.1 + 0.8 * i / max(1, samples - 1))
                ids, answer = prompt.input_ids, prompt.answer_ids
                fp16_bytes = config.num_hidden_layers * 2 * per_token * 2 * ids.shape[1]
                setting = factory() if callable(factory) else factory
                # one prefill a prompt: the cache is copied for the greedy answer after the NLL's
                with (CombinedSession if setting is not None else kq.Session)(model, setting) as session:
                    if convention == "question in prompt":
                        first = session.prefill(ids)[0, -1:]
                    else:
                        end = kq._context_end(tok, prompt)
                        session.prefill(ids[:, :end])
                        first = session.step(ids[:, end:])[0, -1:]
                    if setting is not None:
                        ratios.append(_settled_bytes(session.cache) / fp16_bytes)
                        ratios16.append(_fp16_window_bytes(session.cache, per_token, model.dtype.itemsize) / fp16_bytes)
                    fork = session.fork()
                    per = kq._answer(session, first, answer)
                    nlls.append(float(per.mean()))
                    key_nlls.append(float(per[kq.key_token_mask(tok, answer)].mean()))
                    session.restore(fork)
                    exact.append(prompt.key in tok.decode(kq._greedy(session, first, 12)))
            row = {"part": "passkey-4k", "config": name, "convention": convention, "prompt_tokens": tokens,
                   "exact_match": sum(exact) / len(exact), "exact_matches": exact,
                   "answer_nll": statistics.mean(nlls), "answer_nlls": nlls,
                   "key_nll": statistics.mean(key_nlls), "key_nlls": key_nlls,
                   "bytes_vs_fp16": statistics.mean(ratios) if ratios else 1.0,
                   "bytes_vs_fp16_fp16_window": statistics.mean(ratios16) if ratios16 else 1.0}
            base = row if base is None else base
            row["nll_increase"] = row["answer_nll"] - base["answer_nll"]
            if "baseline_from" in base:
                row["baseline_from"] = base["baseline_from"]
            rows.append(row)
            if record is not None:
                record(row)
            print(f"passkey-4k {convention:18s} {name}  EM {row['exact_match']:.2f}  NLL {row['answer_nll']:.3f} "
                  f"({row['nll_increase']:+.3f})  key NLL {row['key_nll']:.3f}  bytes {row['bytes_vs_fp16']:.3f} / "
                  f"{row['bytes_vs_fp16_fp16_window']:.3f} of fp16", flush=True)
    return rows


if __name__ == "__main__":
    main()
