"""One-off: decode speed of eviction policies on a SmolLM2 batch of 8, at the code on PYTHONPATH
(run it at two commits to compare: before and after per-row budgets made such layers ragged).

    python benchmarks/oneoff/kv_policy_batch_speed.py --batch padded|even --threads 2 [--only full,H2O] [--reps 3]

padded: 8 left-padded prompts of 600-950 tokens; even: 8 prompts of 800 tokens. Each policy
at 0.5, 32 greedy decode steps after the prefill, tokens/s (median of --reps), the full cache in
the same run as the reference. To compare two commits, alternate processes of each.
"""

import argparse
import os
import statistics
import time

import torch

import effllm
from effllm.kv import CAKE, H2O, AdaKV, SnapKV
from effllm.testing.models import smollm2


def text_ids(tok, tokens, start=0):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return tok(text[start * 8:(start + tokens) * 8 + 64], return_tensors="pt").input_ids[0, :tokens].tolist()


def left_pad(rows, pad):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


def rate(model, cache_factory, ids, mask, steps=32):
    out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                past_key_values=(cache := cache_factory()), use_cache=True)
    token, run_mask = out.logits[:, -1].argmax(-1, keepdim=True), mask
    start = time.perf_counter()
    for _ in range(steps):
        run_mask = torch.cat([run_mask, torch.ones(len(ids), 1, dtype=mask.dtype)], 1)
        logits = model(token, attention_mask=run_mask, position_ids=run_mask.sum(1, keepdim=True) - 1,
                       past_key_values=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
    return len(ids) * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", choices=["padded", "even"], required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated case names (default: every case)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = smollm2()
    pad = tok.pad_token_id or 0
    lengths = [600 + 50 * i for i in range(8)] if args.batch == "padded" else [800] * 8
    ids, mask = left_pad([text_ids(tok, n, start=1000 * i) for i, n in enumerate(lengths)], pad)
    from transformers import DynamicCache
    cases = {"full": None, "SnapKV": SnapKV(0.5), "H2O": H2O(0.5), "CAKE": CAKE(0.5),
             "AdaKV(SnapKV)": AdaKV(SnapKV(0.5))}
    only = [name for name in args.only.split(",") if name]
    for name, policy in cases.items():
        if only and name not in only:
            continue
        with torch.inference_mode():
            if policy is None:
                rates = [rate(model, DynamicCache, ids, mask) for _ in range(args.reps)]
            else:
                with effllm.patched(model, kv=policy) as handle:
                    rates = [rate(model, handle.kv.new_cache, ids, mask) for _ in range(args.reps)]
        print(f"{name}: {args.batch} batch of 8 ({lengths[0]}-{lengths[-1]} tokens), 32 decode steps, "
              f"{args.threads} thread(s): median {statistics.median(rates):.2f} tok/s "
              f"({', '.join(f'{r:.2f}' for r in rates)}), load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
