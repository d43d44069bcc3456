"""effllm's attention at model level: SmolLM2-135M patched with ``patch(attention=True)`` against
transformers' own SDPA attention, same weights, greedy decode."""

from __future__ import annotations

import copy

from ...hf import patch
from ..model import smollm2, text_ids, text_perplexity, time_generate
from ..registry import ModelSetup, model_case

_METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s", "first_token_ms", "peak_mem_mb", "kv_bytes", "perplexity")


@model_case("attention.smollm2", params=[{"prompt": 1024, "new_tokens": 32}],
            quick_params=[{"prompt": 32, "new_tokens": 4}], dtypes=("float32",), baseline="hf-sdpa", metrics=_METRICS,
            description="SmolLM2-135M greedy decode with patch(attention=True) vs transformers' SDPA: tokens/s, "
                        "first token, perplexity (should match)")
def attention_smollm2(params, dtype, device) -> ModelSetup:
    base, tok = smollm2(dtype, device)
    patched = copy.deepcopy(base)
    patch(patched, attention=True, strict=True)
    models = {"hf-sdpa": base, "effllm": patched}
    prompt = text_ids(tok, params["prompt"], name="calibration.txt").to(device)
    text = text_ids(tok, 887).to(device)

    def run(model):
        return lambda: time_generate(model, prompt, params["new_tokens"], device=device,
                                     pad_token_id=tok.eos_token_id)

    return ModelSetup(runs={n: run(m) for n, m in models.items()},
                      measures={n: (lambda m=m: {"perplexity": text_perplexity(m, text)}) for n, m in models.items()})
