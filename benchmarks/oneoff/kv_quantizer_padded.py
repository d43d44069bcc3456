"""One-off: a quantizer alone (no policy) on a left-padded SmolLM2 batch, at the code on
PYTHONPATH (run it at two commits to compare: before and after the padding is dropped).

    python benchmarks/oneoff/kv_quantizer_padded.py --part quality
    python benchmarks/oneoff/kv_quantizer_padded.py --part speed --threads 1

quality: 4 prompts of 96-900 tokens, each row's teacher-forced NLL of its next 32 tokens in the
padded batch and alone, per quantizer; prints the largest |batch - alone| per row.
speed: 8 left-padded prompts of 600-950 tokens, 32 greedy decode steps, tokens/s (median of 3).
"""

import argparse
import os
import statistics
import time

import torch

import effllm
from effllm.kv import KIVI, NSNQuant
from effllm.testing.models import smollm2


def text_ids(tok, tokens, start=0):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return tok(text[start * 8:(start + tokens) * 8 + 64], return_tensors="pt").input_ids[0, :tokens].tolist()


def left_pad(rows, pad):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


def forced_nll(model, handle, prompts, follow, pad):
    """Per row, the mean NLL of ``follow[r]`` fed one token a step after ``prompts``."""
    ids, mask = left_pad(prompts, pad)
    cache = handle.kv.new_cache()
    # each row's own positions, as generate() gives them (RoPE keys are coded after rotation)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True).logits[:, -1]
    nll = torch.zeros(len(prompts))
    for step in range(len(follow[0])):
        target = torch.tensor([f[step] for f in follow])
        nll += torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
        logits = model(target[:, None], attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    return nll / len(follow[0])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["quality", "speed"], required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = smollm2()
    pad = tok.pad_token_id or 0
    quantizers = {"NSNQuant-2": NSNQuant(bits=2, residual=16), "KIVI-2": KIVI(2)}
    if args.part == "quality":
        lengths = [96, 250, 500, 900]
        texts = [text_ids(tok, n + 32, start=1000 * i) for i, n in enumerate(lengths)]
        prompts, follow = [t[:-32] for t in texts], [t[-32:] for t in texts]
        for name, q in quantizers.items():
            with effllm.patched(model, kv=q) as handle, torch.inference_mode():
                batch = forced_nll(model, handle, prompts, follow, pad)
                alone = torch.cat([forced_nll(model, handle, [p], [f], pad) for p, f in zip(prompts, follow)])
            print(f"{name}: rows of {lengths} tokens, NLL of the next 32 in the batch {batch.tolist()}, alone "
                  f"{alone.tolist()}, |batch - alone| {(batch - alone).abs().tolist()}", flush=True)
        return
    rows = [text_ids(tok, 600 + 50 * i, start=1000 * i) for i in range(8)]
    ids, mask = left_pad(rows, pad)
    for name, q in quantizers.items():
        rates = []
        with effllm.patched(model, kv=q) as handle, torch.inference_mode():
            for _ in range(3):
                out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                            past_key_values=(cache := handle.kv.new_cache()), use_cache=True)
                token, run_mask = out.logits[:, -1].argmax(-1, keepdim=True), mask
                start = time.perf_counter()
                for _ in range(32):
                    run_mask = torch.cat([run_mask, torch.ones(len(rows), 1, dtype=mask.dtype)], 1)
                    logits = model(token, attention_mask=run_mask, position_ids=run_mask.sum(1, keepdim=True) - 1,
                                   past_key_values=cache, use_cache=True).logits
                    token = logits[:, -1].argmax(-1, keepdim=True)
                rates.append(len(rows) * 32 / (time.perf_counter() - start))
        print(f"{name}: batch of 8 left-padded prompts (600-950 tokens), 32 decode steps, {args.threads} thread(s): "
              f"median {statistics.median(rates):.2f} tok/s ({', '.join(f'{r:.2f}' for r in rates)}), "
              f"load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
