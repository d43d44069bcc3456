"""KV-cache quantization (KIVI, ``QuantizedKVCache``) on SmolLM2-135M-Instruct with texts effllm
ships, against the full cache, 1 thread:

(a) pass-key retrieval (``kv_quality.py``'s 8 prompts): answer NLL, key-digit NLL and exact
    match, question in the prompt and question read after the context was cached;
(b) perplexity of 256 tokens of ``calibration.txt`` after its first 768 were cached;
(c) KV bytes held and decode tokens/s at a ~4k-token context.

Quantizers alone run in a ``QuantizedKVCache`` under the model's own attention; a quantizer
combined with eviction (``--combos``: a policy at 50% and 75% removed, then KIVI, in one
``CompressedCache``) runs under effllm's attention (``kv.compress(model, policy, quantizer)``),
its bytes counting everything the cache holds (``nbytes()``).

    python benchmarks/kv_quant_quality.py    # writes benchmarks/results/e2e/kv_quant_quality.jsonl
    python benchmarks/kv_quant_quality.py --only none --combos "SnapKV+KIVI-2,KVzip(layer)+KIVI-2"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kv_quality as kq
import torch

from effllm.bench.records import describe_device, git_sha, write_result_rows
from effllm.kv import KIVI, KVzip, QuantizedKVCache, SnapKV
from effllm.testing.models import smollm2

OUT = kq.OUT.with_name("kv_quant_quality.jsonl")
CONFIGS = {"KIVI-4 (group 32, residual 128)": KIVI(4, 32, 128), "KIVI-2 (group 32, residual 128)": KIVI(2, 32, 128),
           "KIVI-2 (group 32, residual 32)": KIVI(2, 32, 32)}
# eviction, then quantization, in one cache: factories of the fraction kept
COMBOS = {"SnapKV+KIVI-4": lambda b, tok: (SnapKV(b), KIVI(4, 32, 128)),
          "SnapKV+KIVI-2": lambda b, tok: (SnapKV(b), KIVI(2, 32, 128)),
          "KVzip(layer)+KIVI-4": lambda b, tok: (KVzip(b, tokenizer=tok, scope="layer"), KIVI(4, 32, 128)),
          "KVzip(layer)+KIVI-2": lambda b, tok: (KVzip(b, tokenizer=tok, scope="layer"), KIVI(2, 32, 128))}


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
    parser.add_argument("--only", help="comma-separated quantizer configs to run alone ('none': no config)")
    parser.add_argument("--combos", default="", help=f"comma-separated of {', '.join(COMBOS)}, or 'all'")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    configs = {k: v for k, v in CONFIGS.items() if args.only is None or k in args.only.split(",")}
    combos = COMBOS if args.combos == "all" else {k: COMBOS[k] for k in args.combos.split(",") if k}
    torch.set_num_threads(1)
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
    write_result_rows(args.out, rows, device=describe_device(torch.device("cpu")), threads=1, samples=args.samples,
                      git_sha=sha, keep_others=("part", "config", "convention"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
