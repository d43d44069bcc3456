"""One-off: time to the first token (prefill, plus KVzip's replay) of SmolLM2 under KV eviction
policies, at the code on PYTHONPATH (run it at two commits, alternating processes, to compare).

    python benchmarks/oneoff/kv_prefill_speed.py --batch padded|one --threads 2 [--only full,H2O] [--reps 3]

padded: 8 left-padded prompts of 600-950 tokens; one: one prompt of 2048 tokens. Each policy at
0.5; ``generate(max_new_tokens=1)`` timed (median of --reps), the full cache in the same run.
"""

import argparse
import os
import statistics
import time

import torch

import effllm
from effllm.kv import CAKE, H2O, KVzip, SnapKV
from effllm.testing.models import smollm2


def text_ids(tok, tokens, start=0):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return tok(text[start * 8:(start + tokens) * 8 + 64], return_tensors="pt").input_ids[0, :tokens].tolist()


def left_pad(rows, pad):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


def first_token_s(model, ids, mask, pad):
    start = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=pad)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", choices=["padded", "one"], required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated case names (default: every case)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = smollm2()
    pad = tok.pad_token_id or 0
    lengths = [600 + 50 * i for i in range(8)] if args.batch == "padded" else [2048]
    ids, mask = left_pad([text_ids(tok, n, start=1000 * i) for i, n in enumerate(lengths)], pad)
    cases = {"full": None, "SnapKV": SnapKV(0.5), "H2O": H2O(0.5), "CAKE": CAKE(0.5),
             "KVzip": KVzip(0.5, tokenizer=tok)}
    only = [name for name in args.only.split(",") if name]
    for name, policy in cases.items():
        if only and name not in only:
            continue
        with torch.inference_mode():
            if policy is None:
                times = [first_token_s(model, ids, mask, pad) for _ in range(args.reps)]
            else:
                with effllm.patched(model, kv=policy):
                    times = [first_token_s(model, ids, mask, pad) for _ in range(args.reps)]
        print(f"{name}: {args.batch} ({lengths[0]}-{lengths[-1]} tokens), {args.threads} thread(s): first token "
              f"median {statistics.median(times):.3f} s ({', '.join(f'{t:.3f}' for t in times)}), "
              f"load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
