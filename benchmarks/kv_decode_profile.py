"""Where a decode step's time goes: cProfile of 10 steps at a 4k context, 75% removed, SnapKV
(uniform layers) against KVzip with safeguard 0.2 (ragged layers), SmolLM2, 1 thread.

    python benchmarks/kv_decode_profile.py      # ms/token and the top functions by own time; writes nothing
"""

import cProfile
import pstats
import sys
import time

import torch

from effllm.demo import build_prompt
from effllm.kv import KVzip, SnapKV, compress
from effllm.testing.models import smollm2


SORT, LIMIT = (sys.argv[1], 40) if len(sys.argv) > 1 else ("tottime", 14)


@torch.inference_mode()
def main(steps: int = 10) -> None:
    torch.set_num_threads(1)
    model, tok = smollm2()
    prompt = build_prompt(tok, 4000, seed=99)
    for name, policy in (("SnapKV", SnapKV(0.25)), ("KVzip(safeguard=0.2)", KVzip(0.25, tokenizer=tok, safeguard=0.2))):
        with compress(model, policy) as kv:
            cache = kv.new_cache()
            token = int(model(prompt.input_ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())
            for _ in range(3):  # warm-up steps
                token = int(model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1].argmax())
            profile = cProfile.Profile()
            start = time.perf_counter()
            profile.enable()
            for _ in range(steps):
                token = int(model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1].argmax())
            profile.disable()
            print(f"{name}: {(time.perf_counter() - start) / steps * 1000:.1f} ms/token (profiled)")
            pstats.Stats(profile).sort_stats(SORT).print_stats(LIMIT)


if __name__ == "__main__":
    main()
