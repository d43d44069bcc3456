"""One-off diagnosis (session 15): where do NSNQuant-2's codes cost the pass key after KVzip?

KVzip(global) at 75% removed, then NSNQuant-2 (window 16 / chunk 32, ``protect=1.0``, so every
kept token has its exact residual), on one ~1000-token pass-key prompt: the answer NLL when
only the listed layers (``--part layers``) or (layer, KV head) rows (``--part heads``) keep
their residuals, every other row read at its codes. Prints one line a group; nothing recorded.

    python benchmarks/kv_codes_diagnosis.py --part layers
    python benchmarks/kv_codes_diagnosis.py --part heads --layers 17,18,19
"""

from __future__ import annotations

import argparse

import kv_quality as kq
import kv_quant_quality as kqq
import torch

from effllm.demo import build_prompt
from effllm.kv import KVzip, NSNQuant
from effllm.kv.cache import CompressedCache, CompressedLayer
from effllm.kv.quantized_rows import QuantizedRows
from effllm.testing.models import smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("layers", "heads"), default="layers")
    parser.add_argument("--layers", default="17,18,19", help="with --part heads")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = smollm2()
    prompt = build_prompt(tok, args.tokens, seed=args.seed, depth=0.1)
    chosen: dict = {"layers": set(), "heads": None}

    update = CompressedCache.update

    def tagged_update(self, keys, values, layer_idx, *rest, **kw):  # which layer a store belongs to
        out = update(self, keys, values, layer_idx, *rest, **kw)
        self.layers[layer_idx].diagnosis_keeps = layer_idx in chosen["layers"]
        return out

    from_padded = QuantizedRows.from_padded.__func__

    def only_chosen(cls, quantizer, keys, values, keep, priority=None):
        if priority is not None and chosen["heads"] is not None:
            heads = priority.shape[0]  # batch 1: one row a KV head
            priority = priority.clone()
            for row in range(heads):
                if row not in chosen["heads"]:
                    priority[row] = float("-inf")
        return from_padded(cls, quantizer, keys, values, keep, priority)

    wants_priority = CompressedLayer._wants_priority
    CompressedLayer._wants_priority = lambda self, p: wants_priority(self, p) and getattr(self, "diagnosis_keeps", False)
    CompressedCache.update = tagged_update
    QuantizedRows.from_padded = classmethod(only_chosen)
    kv_heads = model.config.num_key_value_heads
    if args.part == "layers":
        groups = [(set(range(i, i + 5)), None) for i in range(0, model.config.num_hidden_layers, 5)]
    else:
        groups = [({layer}, {head}) for layer in map(int, args.layers.split(",")) for head in range(kv_heads)]
    for layers, heads in [(set(), None)] + groups:
        chosen["layers"], chosen["heads"] = layers, heads
        setting = (KVzip(0.25, tokenizer=tok, scope="global"), NSNQuant(bits=2, residual=16, chunk=32, protect=1.0))
        with kqq.CombinedSession(model, setting) as session, torch.inference_mode():
            first = session.prefill(prompt.input_ids)[0, -1:]
            nll = float(kq._answer(session, first, prompt.answer_ids).mean())
        print(f"exact: layers {sorted(layers) or 'none'} heads {sorted(heads) if heads else 'all'}  answer NLL {nll:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
