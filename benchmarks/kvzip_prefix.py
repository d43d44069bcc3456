"""Diagnostic: does scoring the chat template's prefix 0 (as kvpress's KVzipPress does) explain
its edge over effllm's KVzip with the question read after compression?

    python benchmarks/kvzip_prefix.py      # exact match and answer-NLL increase at 50% / 75% removed

A one-off check behind a sentence in docs/kv.md (result: -0.000 / +0.037, so no); writes nothing.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_quality import Session, run_pass_key, smollm2  # noqa: E402

from effllm.kv import KVzip  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model, tok = smollm2()
    text = tok.apply_chat_template([{"role": "user", "content": "\x00X"}], add_generation_prompt=True, tokenize=False)
    prefix_len = len(tok(text.split("\x00X")[0], add_special_tokens=False).input_ids)

    class PrefixFirst(KVzip):
        """KVzip whose chat-prefix tokens (sinks aside) score 0, so they are evicted first."""

        def _evict(self, cache):
            for layer in cache.layers:
                drop = (layer.positions >= self.sinks) & (layer.positions < prefix_len)
                layer.scores = layer.scores.masked_fill(drop, 0.0)
            super()._evict(cache)

    full = run_pass_key(model, tok, Session, None, None, 8, "question after")["answer_nll"]
    print(f"prefix {prefix_len} tokens, full-cache answer NLL {full:.3f}")
    for budget in (0.5, 0.25):
        res = run_pass_key(model, tok, Session, lambda b: PrefixFirst(b, tokenizer=tok), budget, 8, "question after")
        print(f"kept {budget}: EM {res['exact_match']:.2f}  NLL increase {res['answer_nll'] - full:+.3f}")


if __name__ == "__main__":
    main()
