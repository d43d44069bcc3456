"""Weight quantization at model level: SmolLM2-135M with its linears in bf16, INT8 and INT4."""

from __future__ import annotations

import copy

import torch

from ...quant import Int4WeightOnly, Int8WeightOnly, ModuleConfigs, quantize_
from ..model import smollm2, text_ids, text_perplexity, time_generate, weight_bytes
from ..registry import ModelSetup, model_case

_METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s", "first_token_ms", "peak_mem_mb", "kv_bytes",
            "weight_bytes", "perplexity")


def _quantized(bf16_model, config, *, head: bool = True):
    model = copy.deepcopy(bf16_model)
    # lm_head is tied to the embedding; name it so it is quantized too (it is read every step),
    # or leave it in bf16 (None) to see what quantizing it costs in quality.
    quantize_(model, ModuleConfigs({"lm_head": config if head else None, "default": config}))
    return model


@model_case("quant.smollm2", params=[{"prompt": 256, "new_tokens": 32}], quick_params=[{"prompt": 32, "new_tokens": 4}],
            dtypes=("bfloat16",), baseline="bf16", metrics=_METRICS,
            description="SmolLM2-135M greedy decode with weights in fp32, bf16, INT8 and INT4 g64 (bf16 activations; "
                        "lm_head quantized too unless -head-bf16): tokens/s, first token, weight bytes, perplexity")
def quant_smollm2(params, dtype, device) -> ModelSetup:
    fp32, tok = smollm2(torch.float32, device)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    models = {"fp32": fp32, "bf16": bf16, "int8": _quantized(bf16, Int8WeightOnly()),
              "int4-g64": _quantized(bf16, Int4WeightOnly(64)),
              "int4-g64-head-bf16": _quantized(bf16, Int4WeightOnly(64), head=False)}
    prompt = text_ids(tok, params["prompt"], name="calibration.txt").to(device)
    text = text_ids(tok, 887).to(device)  # haystack.txt, as benchmarks and docs quote it

    def run(model):
        return lambda: time_generate(model, prompt, params["new_tokens"], device=device,
                                     pad_token_id=tok.eos_token_id)

    def measure(model):
        return lambda: {"weight_bytes": weight_bytes(model), "perplexity": text_perplexity(model, text)}

    return ModelSetup(runs={n: run(m) for n, m in models.items()}, measures={n: measure(m) for n, m in models.items()},
                      dtypes={"fp32": "float32"})
