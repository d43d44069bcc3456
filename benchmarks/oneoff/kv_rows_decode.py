"""One-off: decode tokens/s of SmolLM2 over a cache whose layers hold rows of different lengths
under NSNQuant-2 (QuantizedRows), with the rows attended in one pass (``kv/rows_attention.py``) and
one by one (the pass turned off), alternated in one process from copies of one prefilled cache.

    python benchmarks/oneoff/kv_rows_decode.py --case kvzip --threads 1
    python benchmarks/oneoff/kv_rows_decode.py --case batch --threads 2

kvzip: one 4k-token prompt, KVzip's global scope at 75% removed (3 rows a layer). batch: 8
left-padded prompts of 600-950 tokens, AdaKV(SnapKV) at 50% removed (24 rows a layer).
"""

import argparse
import copy
import os
import statistics
import time

import torch

import effllm
from effllm.kv import AdaKV, KVzip, NSNQuant, SnapKV
from effllm.kv import quantized_rows
from effllm.testing.models import smollm2


def text_ids(tok, tokens, start=0):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tok(text[start * 8:(start + tokens) * 8 + 64], return_tensors="pt").input_ids[0, :tokens]
    return ids.tolist()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=["kvzip", "batch"], required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = smollm2()
    if args.case == "kvzip":
        rows = [text_ids(tok, 3980)]
        kv = (KVzip(0.25, tokenizer=tok), NSNQuant(bits=2, residual=16))
    else:
        rows = [text_ids(tok, 600 + 50 * i, start=1000 * i) for i in range(8)]
        kv = (AdaKV(SnapKV(0.5)), NSNQuant(bits=2, residual=16))
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id or 0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    reader_for = quantized_rows.reader_for
    with effllm.patched(model, kv=kv) as handle, torch.inference_mode():
        cache = handle.kv.new_cache()
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        kinds = [type(layer.ragged).__name__ for layer in cache.layers]
        print("layers:", {k: kinds.count(k) for k in set(kinds)}, "rows per layer:",
              len(cache.layers[0].ragged.stores) if hasattr(cache.layers[0].ragged, "stores") else None)

        def decode(one_pass):
            quantized_rows.reader_for = reader_for if one_pass else (lambda *a, **k: None)
            try:
                run_cache, token = copy.deepcopy(cache), first
                run_mask = mask
                tokens = []
                start = time.perf_counter()
                for _ in range(args.steps):
                    run_mask = torch.cat([run_mask, torch.ones(len(rows), 1, dtype=mask.dtype)], 1)
                    logits = model(token, attention_mask=run_mask, past_key_values=run_cache, use_cache=True).logits
                    token = logits[:, -1].argmax(-1, keepdim=True)
                    tokens.append(token)
                return len(rows) * args.steps / (time.perf_counter() - start), torch.cat(tokens, 1)
            finally:
                quantized_rows.reader_for = reader_for

        ratios = []
        for r in range(args.rounds):
            one, tokens_one = decode(True)
            each, tokens_each = decode(False)
            ratios.append(one / each)
            same = bool((tokens_one == tokens_each).all())
            print(f"round {r}: one pass {one:.2f} tok/s, one by one {each:.2f} tok/s, {one / each:.2f}x, "
                  f"same tokens {same}, load {os.getloadavg()[0]:.1f}", flush=True)
        print(f"median {statistics.median(ratios):.2f}x ({args.case}, {args.threads} thread(s), "
              f"{args.steps} steps, rows {len(rows)} x 3 KV heads)")


if __name__ == "__main__":
    main()
