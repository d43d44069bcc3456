"""A/B in one process: a uniform compressed layer appending in place (effllm) against
transformers' concatenation (``DynamicLayer.update``), SnapKV at a 4k context, 75% removed.

    python benchmarks/kv_append_ab.py      # ms/token of each, three alternations; writes nothing
"""

import copy
import time

import torch
from transformers.cache_utils import DynamicLayer

from effllm.demo import build_prompt
from effllm.kv import SnapKV, compress
from effllm.kv.cache import CompressedLayer
from effllm.testing.models import smollm2


def concatenate(layer, keys, values):
    return DynamicLayer.update(layer, keys, values)


@torch.inference_mode()
def main(steps: int = 24) -> None:
    torch.set_num_threads(1)
    model, tok = smollm2()
    prompt = build_prompt(tok, 4000, seed=99)
    in_place = CompressedLayer._append_uniform
    times = {"in place": [], "concatenate": []}
    with compress(model, SnapKV(0.25)) as kv:
        cache = kv.new_cache()
        first = int(model(prompt.input_ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())
        try:
            for _ in range(3):
                for name, append in (("in place", in_place), ("concatenate", concatenate)):
                    CompressedLayer._append_uniform = append
                    trial, token = copy.deepcopy(cache), first
                    start = time.perf_counter()
                    for _ in range(steps):
                        logits = model(torch.tensor([[token]]), past_key_values=trial, use_cache=True).logits
                        token = int(logits[0, -1].argmax())
                    times[name].append((time.perf_counter() - start) / steps * 1000)
        finally:
            CompressedLayer._append_uniform = in_place
    for name, values in times.items():
        print(f"{name:12s} " + " ".join(f"{v:.1f}" for v in values) + " ms/token")


if __name__ == "__main__":
    main()
