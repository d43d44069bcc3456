"""KV cache at model level: SmolLM2-135M with its cache compressed (eviction), quantized, or both,
against the full cache.

Timed: greedy decode after a long prompt (tokens/s, first token, peak memory, and the bytes of
every tensor the cache holds after it: ``kv_bytes``). Measured once per provider: the pass-key
answer NLL and exact match on the shipped pass-key prompts (``effllm.demo.build_prompt``, the
question in the prompt, so it is compressed with the context), and the perplexity of
``calibration.txt``'s tokens 768-1023 after the first 768 were compressed. The figures in
docs/kv.md come from ``benchmarks/kv_quality.py`` / ``kv_quant_quality.py`` (8 prompts, both
question conventions, kvpress side by side); this case tracks the same measures over time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import patched
from ...kv import CAKE, H2O, KIVI, AdaKV, KVzip, SnapKV
from ..model import smollm2, text_ids, time_generate
from ..registry import ModelSetup, model_case

_METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s", "first_token_ms", "peak_mem_mb", "kv_bytes", "nll",
            "exact_match", "perplexity")


def _providers(tok) -> dict:
    """name -> ``kv=`` of ``effllm.patch`` (None: the full cache)."""
    providers = {"full": None, "snapkv-50%": SnapKV(0.5), "h2o-50%": H2O(0.5),
                 "kvzip-50%": KVzip(0.5, tokenizer=tok, safeguard=0.2), "kivi-4": KIVI(4), "kivi-2": KIVI(2),
                 "snapkv-50%+kivi-2": (SnapKV(0.5), KIVI(2))}
    try:  # NSNQuant, where this effllm has it
        from ...kv import NSNQuant
    except ImportError:
        return providers
    providers.update({"nsnquant-2": NSNQuant(bits=2), "nsnquant-1": NSNQuant(bits=1),
                      "snapkv-50%+nsnquant-2": (SnapKV(0.5), NSNQuant(bits=2))})
    return providers


def _cache(model, handle):
    if handle is None or handle.kv is None:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    return handle.kv.new_cache()


@torch.inference_mode()
def _pass_key(model, tok, kv, samples: int, haystack: int) -> dict:
    """Mean answer NLL and exact match of a 12-token greedy answer over ``samples`` prompts (key
    depths 0.1-0.9)."""
    from ...demo import build_prompt

    nlls, hits = [], []
    for seed in range(samples):
        prompt = build_prompt(tok, haystack, seed=seed, depth=0.1 + 0.8 * seed / max(1, samples - 1))
        with patched(model, kv=kv) if kv is not None else _nothing() as handle:
            cache = _cache(model, handle)
            logits = model(prompt.input_ids, past_key_values=cache, use_cache=True).logits[:, -1:]
            answer = prompt.answer_ids
            steps = model(answer[:, :-1], past_key_values=cache, use_cache=True).logits
            nlls.append(float(F.cross_entropy(torch.cat([logits, steps], 1)[0].float(), answer[0])))
            out = model.generate(prompt.input_ids, max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
            hits.append(prompt.key in tok.decode(out[0, prompt.input_ids.shape[1]:]))
    return {"nll": sum(nlls) / len(nlls), "exact_match": sum(hits) / len(hits)}


@torch.inference_mode()
def _perplexity(model, tok, kv, prefix: int, cont: int) -> float:
    """Perplexity of ``cont`` tokens of calibration.txt read after ``prefix`` tokens were cached."""
    ids = text_ids(tok, prefix + cont, name="calibration.txt")
    with patched(model, kv=kv) if kv is not None else _nothing() as handle:
        cache = _cache(model, handle)
        last = model(ids[:, :prefix], past_key_values=cache, use_cache=True).logits[:, -1:]
        logits = torch.cat([last, model(ids[:, prefix:-1], past_key_values=cache, use_cache=True).logits], 1)
    return float(torch.exp(F.cross_entropy(logits[0].float(), ids[0, prefix:])))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@model_case("kv.smollm2", params=[{"prompt": 2048, "new_tokens": 32, "samples": 8, "haystack": 1000}],
            quick_params=[{"prompt": 96, "new_tokens": 4, "samples": 1, "haystack": 200}],
            baseline="full", metrics=_METRICS,
            description="SmolLM2-135M with its KV cache evicted (SnapKV, H2O, KVzip at 50%), quantized (KIVI, "
                        "NSNQuant) or both, vs the full cache: decode tokens/s, KV bytes held, pass-key answer NLL "
                        "and exact match, perplexity after compression")
def kv_smollm2(params, dtype, device) -> ModelSetup:
    model, tok = smollm2(dtype, device)
    providers = _providers(tok)
    prompt = text_ids(tok, params["prompt"], name="calibration.txt").to(device)
    prefix = 768 if params["prompt"] >= 1024 else params["prompt"] // 2

    def run(kv):
        def once():
            with patched(model, kv=kv) if kv is not None else _nothing():
                return time_generate(model, prompt, params["new_tokens"], device=device, pad_token_id=tok.eos_token_id)
        return once

    def measure(kv):
        def once():
            result = _pass_key(model, tok, kv, params["samples"], params["haystack"])
            result["perplexity"] = _perplexity(model, tok, kv, prefix, 256 if prefix == 768 else prefix // 2)
            return result
        return once

    return ModelSetup(runs={name: run(kv) for name, kv in providers.items()},
                      measures={name: measure(kv) for name, kv in providers.items()})


def _batch_providers() -> dict:
    """name -> ``kv=``: the policies whose budgets differ per row on a left-padded batch, alone and
    with a quantizer (None: the full cache)."""
    from ...kv import NSNQuant

    return {"full": None, "snapkv-50%": SnapKV(0.5), "h2o-50%": H2O(0.5), "cake-50%": CAKE(0.5),
            "adakv-50%": AdaKV(SnapKV(0.5)), "adakv-50%+nsnquant-2": (AdaKV(SnapKV(0.5)), NSNQuant(bits=2, residual=16)),
            "adakv-50%+kivi-2": (AdaKV(SnapKV(0.5)), KIVI(2))}


def _left_padded_batch(tok, batch: int, shortest: int, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``batch`` left-padded prompts, lengths spread evenly from
    ``shortest`` to ``longest``, each a window of the shipped texts from its own start."""
    text = text_ids(tok, longest + 97 * batch, name="calibration.txt")[0]
    lengths = torch.linspace(shortest, longest, batch).round().long().tolist()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((batch, longest), pad, dtype=torch.long)
    mask = torch.zeros(batch, longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, longest - length:] = text[97 * row:97 * row + length]
        mask[row, longest - length:] = 1
    return ids, mask


@model_case("kv.batch", params=[{"batch": 8, "shortest": 600, "longest": 950, "new_tokens": 32}],
            quick_params=[{"batch": 2, "shortest": 96, "longest": 128, "new_tokens": 4}],
            baseline="full", metrics=("decode_tokens_per_s", "prefill_tokens_per_s", "first_token_ms", "kv_bytes"),
            description="SmolLM2-135M greedy decode of a left-padded batch (prompts of different lengths) under "
                        "SnapKV, H2O, CAKE and AdaKV (per-row budgets: ragged layers), AdaKV also with NSNQuant-2 / "
                        "KIVI-2, vs the full cache: tokens/s, KV bytes held")
def kv_batch(params, dtype, device) -> ModelSetup:
    model, tok = smollm2(dtype, device)
    ids, mask = _left_padded_batch(tok, params["batch"], params["shortest"], params["longest"])
    ids, mask = ids.to(device), mask.to(device)

    def run(kv):
        def once():
            with patched(model, kv=kv) if kv is not None else _nothing():
                return time_generate(model, ids, params["new_tokens"], device=device, attention_mask=mask,
                                     pad_token_id=tok.eos_token_id)
        return once

    return ModelSetup(runs={name: run(kv) for name, kv in _batch_providers().items()})
