"""One-off diagnosis (session 16; to be removed once read, as earlier one-offs were): after
KVzip(global) 75% removed + NSNQuant-2 (16-token window), how much of the codes' pass-key cost
comes back when only the keys of the sharpest heads are kept exact.

A head's sharpness is the mean entropy of its attention over the last 32 prefill queries (the
prompt's own, no tuning), read by an eager forward before the cached run. The cached run codes
every kept token with ``protect=1`` (forced tokens included, by treating their ``+inf`` rank as
a finite one), then zeroes every residual except the keys of the chosen (layer, KV head) rows:
the codes plus exact keys on those rows. Bytes are those a real implementation would hold: the
store without residuals, plus 2 bytes a key element on the chosen rows' coded tokens.

    python benchmarks/kv_codes_heads.py --samples 8 --heads 0,1,3 --conventions "question in prompt"
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import kv_quality as kq
import torch
from kv_quant_quality import CombinedSession, _fp16_window_bytes

from effllm.bench.records import describe_device, write_result_rows
from effllm.demo import build_prompt
from effllm.kv import KVzip, NSNQuant
from effllm.kv import protected as protected_module
from effllm.testing.models import smollm2

OUT = Path(__file__).parent / "results" / "e2e" / "kv_codes_heads.jsonl"


def head_entropy(model, ids, last=32) -> torch.Tensor:
    """``(layers, kv_heads)``: mean attention entropy of the last ``last`` queries of ``ids``."""
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    out, hooks = [], []
    for layer in model.model.layers:
        def grab(_module, _args, output):
            weights = output[1][0, :, -last:].float()  # (H, last, S)
            entropy = -(weights.clamp_min(1e-12).log() * weights).sum(-1).mean(-1)
            out.append(entropy.view(-1, groups).mean(-1))
        hooks.append(layer.self_attn.register_forward_hook(grab))
    model.set_attn_implementation("eager")
    try:
        model(ids)
    finally:
        model.set_attn_implementation("sdpa")
        for hook in hooks:
            hook.remove()
    return torch.stack(out)


def keep_head_keys(cache, chosen: torch.Tensor, head_dim: int) -> int:
    """Zero every residual but the keys of ``chosen (layers, kv_heads)`` rows; bytes they take."""
    kv_heads, extra = chosen.shape[1], 0
    for index, layer in enumerate(cache.layers):
        stores = layer.ragged.stores if getattr(layer, "ragged", None) is not None else None
        assert stores is not None, "KVzip(global) leaves every layer ragged"
        for row, store in enumerate(stores):
            if store.protected is None:
                continue
            store.protected.values.zero_()
            if chosen[index, row % kv_heads]:
                extra += store.key_codes.codes.shape[2] * store.key_codes.codes.shape[0] * head_dim * 2
            else:
                store.protected.keys.zero_()
    return extra


def _residual_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for store in layer.ragged.stores:
            if store.protected is not None:
                total += store.protected.nbytes()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--heads", default="0,1,3", help="numbers of sharpest heads whose keys stay exact")
    parser.add_argument("--conventions", default="question in prompt,question after")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    original = protected_module.ProtectedTokens.choose.__func__

    def choose(cls, priority, fraction, *rest):  # forced tokens (+inf) protected too
        return original(cls, priority.nan_to_num(neginf=-1e30, posinf=1e30), fraction, *rest)

    protected_module.ProtectedTokens.choose = classmethod(choose)
    model, tok = smollm2()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = config.num_key_value_heads * head_dim
    device = describe_device(torch.device("cpu"))
    rows = []
    for convention in args.conventions.split(","):
        for count in (int(h) for h in args.heads.split(",")):
            exact, nlls, ratios, heads_seen = [], [], [], []
            for i in range(args.samples):
                prompt = build_prompt(tok, args.tokens, seed=i, depth=0.1 + 0.8 * i / max(1, args.samples - 1))
                ids, answer = prompt.input_ids, prompt.answer_ids
                end = ids.shape[1] if convention == "question in prompt" else kq._context_end(tok, prompt)
                with torch.inference_mode():
                    entropy = head_entropy(model, ids[:, :end])
                chosen = torch.zeros(entropy.numel(), dtype=torch.bool)
                chosen[(-entropy).flatten().topk(count).indices] = True
                chosen = chosen.view(entropy.shape)
                heads_seen.append([[int(x) for x in pair] for pair in chosen.nonzero().tolist()])
                setting = (KVzip(0.25, tokenizer=tok, scope="global"),
                           NSNQuant(bits=2, residual=16, chunk=32, protect=1.0))
                with torch.inference_mode(), CombinedSession(model, setting) as session:
                    if convention == "question in prompt":
                        first = session.prefill(ids)[0, -1:]
                    else:
                        session.prefill(ids[:, :end])
                    extra = keep_head_keys(session.cache, chosen, head_dim)
                    held = (_fp16_window_bytes(session.cache, per_token, model.dtype.itemsize)
                            - _residual_bytes(session.cache) + extra)
                    ratios.append(held / (config.num_hidden_layers * 2 * per_token * 2 * ids.shape[1]))
                    if convention != "question in prompt":
                        first = session.step(ids[:, end:])[0, -1:]
                    fork = session.fork()
                    nlls.append(float(kq._answer(session, first, answer).mean()))
                    session.restore(fork)
                    exact.append(prompt.key in tok.decode(kq._greedy(session, first, 12)))
            row = {"part": "codes-heads", "config": f"KVzip(global) 75% removed + NSNQuant-2 (window 16 / chunk 32), "
                   f"keys exact on the {count} sharpest heads", "convention": convention, "prompt_tokens": args.tokens,
                   "sharp_heads": count, "exact_match": sum(exact) / len(exact), "exact_matches": exact,
                   "answer_nll": statistics.mean(nlls), "answer_nlls": nlls, "chosen_heads": heads_seen,
                   "bytes_vs_fp16_fp16_window": statistics.mean(ratios)}
            rows.append(row)
            write_result_rows(args.out, rows, device=device, threads=1)
            print(f"{convention:18s} sharpest {count}: EM {row['exact_match']:.2f} NLL {row['answer_nll']:.3f} "
                  f"bytes {row['bytes_vs_fp16_fp16_window']:.4f} heads {heads_seen[0]}", flush=True)


if __name__ == "__main__":
    main()
