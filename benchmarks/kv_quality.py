"""KV-cache compression quality and speed on SmolLM2-135M-Instruct, with texts effllm ships.

    python benchmarks/kv_quality.py [--samples 6]     # writes benchmarks/results/e2e/kv_quality.jsonl

For each policy at 50% and 75% of the prompt removed (budget 0.5 and 0.25):

(a) pass-key retrieval (``effllm.demo.build_prompt``: ~1000-token haystack, the key at depths
    0.1-0.9): exact match of a greedy answer and the mean NLL of the reference answer, in two
    conventions: "question in prompt" (the question is compressed with the context) and
    "question after" (the context is compressed first, then the question is read).
(b) perplexity of 256 tokens of ``calibration.txt`` after its first 768 tokens were compressed.
(c) KV bytes and decode tokens/s at a ~4k-token context against the full cache.

kvpress is not compared here: it pins an older transformers. To compare, install it in its own
virtual environment and run its ObservedAttentionPress on the same prompts (``build_prompt``
with the seeds and depths below); this script's numbers are the effllm side of that table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effllm.bench.records import describe_device, write_result_rows
from effllm.demo import build_prompt
from effllm.kv import CAKE, H2O, SnapKV, StreamingLLM, compress
from effllm.testing.models import smollm2
from effllm.testing.quality import shipped_text

OUT = Path(__file__).resolve().parent / "results" / "e2e" / "kv_quality.jsonl"
POLICIES = {"StreamingLLM": lambda b: StreamingLLM(b), "SnapKV": lambda b: SnapKV(b), "H2O": lambda b: H2O(b),
            "CAKE": lambda b: CAKE(b)}
BUDGETS = {"50% removed": 0.5, "75% removed": 0.25}


def _common_prefix(prompt_ids: torch.Tensor, question_free_ids: list[int]) -> int:
    """Index where the question starts: the end of the common prefix with a question-free render."""
    ids = prompt_ids[0].tolist()
    n = 0
    while n < min(len(ids), len(question_free_ids)) and ids[n] == question_free_ids[n]:
        n += 1
    return n


def _context_end(tok, prompt) -> int:
    # Render the same prompt with a different question: the shared prefix is the context.
    text = tok.decode(prompt.input_ids[0])
    other = text.replace("What is the secret pass key? Answer with the number.", "Zebra.")
    return _common_prefix(prompt.input_ids, tok(other, add_special_tokens=False).input_ids)


@torch.inference_mode()
def _answer(model, cache, first_logits, answer_ids):
    """Mean NLL of the reference answer, read by teacher forcing in one multi-token step."""
    logits = model(answer_ids[:, :-1], past_key_values=cache, use_cache=True).logits if answer_ids.shape[1] > 1 else None
    all_logits = first_logits if logits is None else torch.cat([first_logits, logits[0]], dim=0)
    nll = float(F.cross_entropy(all_logits.float(), answer_ids[0]))
    return nll


@torch.inference_mode()
def _greedy(model, cache, first_logits, steps: int) -> list[int]:
    tokens = [int(first_logits[-1].argmax())]
    for _ in range(steps - 1):
        logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def run_pass_key(model, tok, policy_factory, budget, samples, convention) -> dict:
    exact, nlls = [], []
    for i in range(samples):
        prompt = build_prompt(tok, 1000, seed=i, depth=0.1 + 0.8 * i / max(1, samples - 1))
        ids, answer = prompt.input_ids, prompt.answer_ids
        for mode in ("nll", "greedy"):
            policy = policy_factory(budget) if policy_factory else None
            with _maybe_compress(model, policy) as make_cache, torch.inference_mode():
                cache = make_cache()
                if convention == "question in prompt":
                    first = model(ids, past_key_values=cache, use_cache=True).logits[0, -1:]
                else:
                    end = _context_end(tok, prompt)
                    model(ids[:, :end], past_key_values=cache, use_cache=True)
                    first = model(ids[:, end:], past_key_values=cache, use_cache=True).logits[0, -1:]
                if mode == "nll":
                    nlls.append(_answer(model, cache, first, answer))
                else:
                    exact.append(prompt.key in tok.decode(_greedy(model, cache, first, 12)))
    return {"exact_match": sum(exact) / len(exact), "answer_nll": statistics.mean(nlls)}


class _maybe_compress:
    """``compress(model, policy)`` yielding a cache factory; the full DynamicCache when None."""

    def __init__(self, model, policy):
        self.model, self.policy, self.ctx = model, policy, None

    def __enter__(self):
        if self.policy is None:
            from transformers import DynamicCache

            return lambda: DynamicCache(config=self.model.config)
        self.ctx = compress(self.model, self.policy)
        kv = self.ctx.__enter__()
        return kv.new_cache

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


@torch.inference_mode()
def run_perplexity(model, tok, policy) -> float:
    ids = tok(shipped_text("calibration.txt"), return_tensors="pt").input_ids[:, :1024]
    prefix, cont = ids[:, :768], ids[:, 768:]
    with _maybe_compress(model, policy) as make_cache:
        cache = make_cache()
        last = model(prefix, past_key_values=cache, use_cache=True).logits[0, -1:]
        logits = torch.cat([last, model(cont[:, :-1], past_key_values=cache, use_cache=True).logits[0]])
    return float(torch.exp(F.cross_entropy(logits.float(), cont[0])))


@torch.inference_mode()
def run_speed(model, tok, policy, steps: int = 32) -> dict:
    prompt = build_prompt(tok, 4000, seed=99)
    with _maybe_compress(model, policy) as make_cache:
        cache = make_cache()
        first = model(prompt.input_ids, past_key_values=cache, use_cache=True).logits[0, -1:]
        start = time.perf_counter()
        _greedy(model, cache, first, steps)
        seconds = time.perf_counter() - start
        if hasattr(cache, "stats"):
            kv_bytes = cache.stats()["kv_bytes"]
        else:
            kv_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    return {"decode_tok_s": (steps - 1) / seconds, "kv_bytes": kv_bytes, "context": prompt.input_ids.shape[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = smollm2()
    rows = []
    conventions = ("question in prompt", "question after")
    for convention in conventions:
        base = run_pass_key(model, tok, None, None, args.samples, convention)
        rows.append({"part": "pass-key", "policy": "full cache", "budget": "0% removed", "convention": convention, **base})
        print(f"pass-key  {convention:18s} full cache            EM {base['exact_match']:.2f}  NLL {base['answer_nll']:.3f}")
        for name, factory in POLICIES.items():
            for label, budget in BUDGETS.items():
                res = run_pass_key(model, tok, factory, budget, args.samples, convention)
                res["nll_increase"] = res["answer_nll"] - base["answer_nll"]
                rows.append({"part": "pass-key", "policy": name, "budget": label, "convention": convention, **res})
                print(f"pass-key  {convention:18s} {name:12s} {label}  EM {res['exact_match']:.2f}  "
                      f"NLL {res['answer_nll']:.3f} ({res['nll_increase']:+.3f})")
    base_ppl = run_perplexity(model, tok, None)
    rows.append({"part": "perplexity", "policy": "full cache", "budget": "0% removed", "perplexity": base_ppl})
    print(f"perplexity full cache {base_ppl:.3f}")
    for name, factory in POLICIES.items():
        for label, budget in BUDGETS.items():
            ppl = run_perplexity(model, tok, factory(budget))
            rows.append({"part": "perplexity", "policy": name, "budget": label, "perplexity": ppl,
                         "relative": ppl / base_ppl - 1})
            print(f"perplexity {name:12s} {label}  {ppl:.3f} ({100 * (ppl / base_ppl - 1):+.1f}%)")
    full = run_speed(model, tok, None)
    rows.append({"part": "speed", "policy": "full cache", "budget": "0% removed", **full})
    print(f"speed full cache  {full['decode_tok_s']:.2f} tok/s  {full['kv_bytes'] / 2**20:.1f} MiB at {full['context']} tokens")
    for name, factory in POLICIES.items():
        res = run_speed(model, tok, factory(0.25))
        res["speedup"] = res["decode_tok_s"] / full["decode_tok_s"]
        res["bytes_ratio"] = res["kv_bytes"] / full["kv_bytes"]
        rows.append({"part": "speed", "policy": name, "budget": "75% removed", **res})
        print(f"speed {name:12s} 75% removed  {res['decode_tok_s']:.2f} tok/s ({res['speedup']:.2f}x)  "
              f"{res['kv_bytes'] / 2**20:.1f} MiB ({res['bytes_ratio']:.3f} of full)")
    write_result_rows(args.out, rows, device=describe_device(torch.device("cpu")), threads=args.threads,
                      samples=args.samples)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
