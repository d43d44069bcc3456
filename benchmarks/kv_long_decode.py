"""Decode speed over a long generation with a paged ragged cache: KVzip (safeguard 0.2) at a 4k
context, 75% removed, SmolLM2, 1 thread, 192 steps in windows of 32: ms/token, and how many
(layer, row) reads had to copy a row because its pages were no longer consecutive in the pool.

    python benchmarks/kv_long_decode.py      # prints; writes nothing
"""

import time

import torch

from effllm.demo import build_prompt
from effllm.kernels import decode
from effllm.kv import KVzip, compress
from effllm.testing.models import smollm2


@torch.inference_mode()
def main(windows: int = 6, steps: int = 32) -> None:
    torch.set_num_threads(1)
    model, tok = smollm2()
    prompt = build_prompt(tok, 4000, seed=99)
    counts = {"rows": 0, "copied": 0}
    in_place = decode._consecutive_pages

    def counting(block_table, lengths, page_size):
        starts = in_place(block_table, lengths, page_size)
        counts["rows"] += len(lengths)
        counts["copied"] += len(lengths) - len(starts)
        return starts

    decode._consecutive_pages = counting
    try:
        with compress(model, KVzip(0.25, tokenizer=tok, safeguard=0.2)) as kv:
            cache = kv.new_cache()
            token = int(model(prompt.input_ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())
            for window in range(windows):
                counts.update(rows=0, copied=0)
                start = time.perf_counter()
                for _ in range(steps):
                    logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits
                    token = int(logits[0, -1].argmax())
                ms = (time.perf_counter() - start) / steps * 1000
                print(f"steps {window * steps}-{window * steps + steps - 1}: {ms:.1f} ms/token, "
                      f"rows copied {counts['copied']}/{counts['rows']}", flush=True)
    finally:
        decode._consecutive_pages = in_place


if __name__ == "__main__":
    main()
