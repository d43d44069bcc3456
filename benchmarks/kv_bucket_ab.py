"""A/B in one process: decoding over a ragged compressed cache (KVzip, one budget shared by all
layers and heads), SmolLM2 at a 4k context, 75% removed, three ways: the torch path as shipped
(each row attended alone by one SDPA call, over a view of its pages while they are consecutive;
session 6), with every row's pages gathered (a copy) into length buckets (session 5's path
measured the same), and with all rows gathered and padded to the longest (before session 5).

    python benchmarks/kv_bucket_ab.py [--rounds 3]     # ms/token of each arm per round; writes nothing
"""

import argparse
import copy
import time

import torch
import effllm.kernels.decode as decode
from effllm.demo import build_prompt
from effllm.kv import KVzip, compress
from effllm.testing.models import smollm2


def _ms_per_token(model, cache, token: int, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits
        token = int(logits[0, -1].argmax())
    return (time.perf_counter() - start) / steps * 1000


@torch.inference_mode()
def main(steps: int = 24) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the arms")
    rounds = parser.parse_args().rounds
    torch.set_num_threads(1)
    model, tok = smollm2()
    prompt = build_prompt(tok, 4000, seed=99)
    shipped = (decode.BUCKET_WASTE, decode.IN_PLACE_MAX_ROWS)
    arms = {"shipped": shipped, "buckets": (shipped[0], 0), "padded": (float("inf"), 0)}
    times = {name: [] for name in arms}
    with compress(model, KVzip(0.25, tokenizer=tok, safeguard=0.2)) as kv:
        cache = kv.new_cache()
        first = int(model(prompt.input_ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())
        lengths = [layer.row_lengths().flatten().tolist() for layer in cache.layers]
        try:
            for _ in range(rounds):
                for name, (decode.BUCKET_WASTE, decode.IN_PLACE_MAX_ROWS) in arms.items():
                    times[name].append(_ms_per_token(model, copy.deepcopy(cache), first, steps))
        finally:
            decode.BUCKET_WASTE, decode.IN_PLACE_MAX_ROWS = shipped
    longest = sum(max(row) * len(row) for row in lengths)
    print(f"kept keys {sum(map(sum, lengths))}, padded to each layer's longest {longest}")
    for name, values in times.items():
        print(f"{name:12s} " + " ".join(f"{v:.1f}" for v in values) + " ms/token")


if __name__ == "__main__":
    main()
