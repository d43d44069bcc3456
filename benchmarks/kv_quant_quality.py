"""KV-cache quantization (KIVI, ``QuantizedKVCache``) on SmolLM2-135M-Instruct with texts effllm
ships, against the full cache, 1 thread:

(a) pass-key retrieval (``kv_quality.py``'s 8 prompts): answer NLL, key-digit NLL and exact
    match, question in the prompt and question read after the context was cached;
(b) perplexity of 256 tokens of ``calibration.txt`` after its first 768 were cached;
(c) KV bytes held and decode tokens/s at a ~4k-token context.

    python benchmarks/kv_quant_quality.py    # writes benchmarks/results/e2e/kv_quant_quality.jsonl
"""

from __future__ import annotations

import argparse

import torch

import kv_quality as kq
from effllm.bench.records import describe_device, git_sha, write_result_rows
from effllm.kv import KIVI, QuantizedKVCache
from effllm.testing.models import smollm2

OUT = kq.OUT.with_name("kv_quant_quality.jsonl")
CONFIGS = {"KIVI-4 (group 32, residual 128)": KIVI(4, 32, 128), "KIVI-2 (group 32, residual 128)": KIVI(2, 32, 128),
           "KIVI-2 (group 32, residual 32)": KIVI(2, 32, 32)}


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
    args = parser.parse_args()
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
        for name, config in CONFIGS.items():
            res = kq.run_pass_key(model, tok, QuantizedSession, lambda _: config, None, args.samples, convention)
            res["nll_increase"] = res["answer_nll"] - base["answer_nll"]
            res["key_nll_increase"] = res["key_nll"] - base["key_nll"]
            rows.append({"part": "pass-key", "config": name, "convention": convention, **res})
            print(f"pass-key  {convention:18s} {name}  EM {res['exact_match']:.2f}  NLL {res['answer_nll']:.3f} "
                  f"({res['nll_increase']:+.3f})  key NLL {res['key_nll']:.3f} ({res['key_nll_increase']:+.3f})",
                  flush=True)
    if "perplexity" in parts:
        base = kq.run_perplexity(model, tok, kq.Session, None)
        rows.append({"part": "perplexity", "config": "full cache", "perplexity": base})
        for name, config in CONFIGS.items():
            ppl = kq.run_perplexity(model, tok, QuantizedSession, config)
            rows.append({"part": "perplexity", "config": name, "perplexity": ppl, "relative": ppl / base - 1})
            print(f"perplexity {name}  {ppl:.3f} ({100 * (ppl / base - 1):+.2f}%, full {base:.3f})", flush=True)
    if "speed" in parts:
        full = kq.run_speed(model, tok, kq.Session, None)
        rows.append({"part": "speed", "config": "full cache", **full})
        for name, config in CONFIGS.items():
            res = kq.run_speed(model, tok, QuantizedSession, config)
            res["speedup"], res["bytes_ratio"] = res["decode_tok_s"] / full["decode_tok_s"], res["kv_bytes"] / full["kv_bytes"]
            rows.append({"part": "speed", "config": name, **res})
            print(f"speed {name}  {res['decode_tok_s']:.2f} tok/s ({res['speedup']:.2f}x full)  "
                  f"{res['kv_bytes'] / 2**20:.1f} MiB ({res['bytes_ratio']:.3f} of full)", flush=True)
    write_result_rows(OUT, rows, device=describe_device(torch.device("cpu")), threads=1, samples=args.samples,
                      git_sha=sha, keep_others=("part", "config", "convention"))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
