"""Prefill time with KVzip (prefill + replay + eviction) against a plain prefill, SmolLM2.

    python benchmarks/kvzip_cost.py [--tokens 1000]     # prints seconds and the ratio; writes nothing
"""

import argparse
import time

import torch
from transformers import DynamicCache

from effllm.demo import build_prompt
from effllm.kv import KVzip, compress
from effllm.testing.models import smollm2


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = smollm2()
    ids = build_prompt(tok, args.tokens, seed=1).input_ids
    plain, kvzip = [], []
    with compress(model, KVzip(0.25, tokenizer=tok)) as kv:
        for _ in range(3):  # alternate, so drift on a shared machine hits both
            start = time.perf_counter()
            model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            model(ids, past_key_values=kv.new_cache(), use_cache=True)
            kvzip.append(time.perf_counter() - start)
    print(f"{ids.shape[1]} tokens: prefill {min(plain):.2f} s, with KVzip {min(kvzip):.2f} s "
          f"({min(kvzip) / min(plain):.2f}x)")


if __name__ == "__main__":
    main()
