"""Fast decode at model level: SmolLM2-135M greedy generate() through ``patch(decode=...)``
against transformers eager (fp32, bf16), transformers' static cache + ``torch.compile`` and
llama.cpp (llama-cpp-python in a worker process, on the GGUF the model ships as)."""

from __future__ import annotations

import copy

import torch

from ... import patch
from ...fast import FastDecode
from ...quant import Int4WeightOnly, Int8WeightOnly
from ...testing.models import SMOLLM2_GGUF, cache_dir, smollm2_dir
from ..llama_cpp_provider import llama_cpp_run
from ..model import smollm2, text_ids, time_generate
from ..records import define_metric
from ..registry import ModelSetup, model_case

define_metric("ops_per_token", unit="ops", better="lower", doc="dispatcher (aten::) ops per decoded token, nested "
              "included, from torch.profiler (Inductor's fused C++ loops are not dispatcher ops)")

_METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s", "first_token_ms", "peak_mem_mb", "kv_bytes",
            "ops_per_token")


def _fast(model, quant=None, **options):
    fast = copy.deepcopy(model)
    patch(fast, quant=quant, decode=FastDecode(**options))
    return fast


def _hf_static_compiled(model):
    """What a transformers user tries first: a static cache and a compiled forward."""
    hf = copy.deepcopy(model)
    hf.generation_config.cache_implementation = "static"
    hf.forward = torch.compile(hf.forward)
    return hf


def ops_per_token(model, prompt, pad) -> float:
    """aten:: events of a 9-token generate minus a 1-token one, per decoded token."""
    def count(n):
        with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        return sum(1 for e in prof.events() if e.name.startswith("aten::"))

    return (count(9) - count(1)) / 8


@model_case("fast.decode", params=[{"prompt": 113, "new_tokens": 128}], quick_params=[{"prompt": 32, "new_tokens": 8}],
            baseline="hf-fp32", metrics=_METRICS, warmup=1, repeats=3,
            description="SmolLM2-135M greedy decode: transformers eager fp32/bf16 and static cache + torch.compile vs "
                        "effllm patch(decode=...) with fp32, INT8 and INT4 weights (compiled per layer, whole step, "
                        "eager): tokens/s, first token, ops per token")
def fast_decode(params, dtype, device) -> ModelSetup:
    if torch.device(device).type != "cpu":
        return ModelSetup(unavailable={"effllm-*": "the fast decode path is CPU-only for now"})
    fp32, tok = smollm2(torch.float32, device)
    models = {
        "hf-fp32": fp32,
        "hf-bf16": copy.deepcopy(fp32).to(torch.bfloat16),
        "hf-static-compile": _hf_static_compiled(fp32),
        "effllm-fp32": _fast(fp32),
        "effllm-int8": _fast(fp32, Int8WeightOnly()),
        "effllm-int4": _fast(fp32, Int4WeightOnly(64)),
        "effllm-int4-step": _fast(fp32, Int4WeightOnly(64), compile="step"),
        "effllm-int4-eager": _fast(fp32, Int4WeightOnly(64), compile=False),
    }
    prompt = text_ids(tok, params["prompt"]).to(device)
    pad = tok.eos_token_id

    def run(model):
        return lambda: time_generate(model, prompt, params["new_tokens"], device=device, pad_token_id=pad)

    def measure(model):
        return lambda: {"ops_per_token": ops_per_token(model, prompt, pad)}

    runs = {n: run(m) for n, m in models.items()}
    unavailable = {}
    for name, gguf in llama_cpp_ggufs().items():
        runs[name], why = llama_cpp_run(gguf, prompt[0].tolist(), params["new_tokens"], torch.get_num_threads())
        if why:
            del runs[name]
            unavailable[name] = why
    return ModelSetup(runs=runs, measures={n: measure(m) for n, m in models.items() if n != "hf-static-compile"},
                      dtypes={"hf-bf16": "bfloat16", **{n: n.rsplit("-", 1)[1] for n in llama_cpp_ggufs()}},
                      unavailable=unavailable)


def llama_cpp_ggufs() -> dict:
    """llama.cpp providers and their GGUF files: Q4_1 is the file SmolLM2 ships as (the one every
    other provider's weights were dequantised from); Q8_0 and F32 are made from it
    (benchmarks/install_llama_cpp.sh)."""
    try:
        q4_1 = smollm2_dir() / SMOLLM2_GGUF
    except RuntimeError:
        q4_1 = SMOLLM2_GGUF
    made = cache_dir() / "gguf"
    return {"llama.cpp-q4_1": q4_1, "llama.cpp-q8_0": made / "SmolLM2-135M-Instruct.Q8_0.gguf",
            "llama.cpp-f32": made / "SmolLM2-135M-Instruct.F32.gguf"}
