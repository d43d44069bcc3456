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
from ..model import cached, smollm2, text_ids, time_generate
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


# The random-weight model shaped like Llama-3.2-1B (plain RoPE: the fast path has no llama3 scaling).
LLAMA_1B_SHAPE = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True,
                  "rope_theta": 500000.0, "max_position_embeddings": 4096}
# Providers the 1B-shaped model runs (5 GB of fp32 weights: the others' copies would not fit with them).
_LLAMA_1B_PROVIDERS = ("hf-fp32", "hf-bf16", "effllm-int8", "effllm-int4", "effllm-int4-step", "effllm-int4-eager")


def llama_1b_random(seed: int = 0):
    """A Llama-3.2-1B-shaped causal LM with random weights (no download), fp32, eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**LLAMA_1B_SHAPE)
    return transformers.LlamaForCausalLM(config).eval()


@model_case("fast.decode", params=[{"prompt": 113, "new_tokens": 128},
                                   {"model": "llama-1b-random", "prompt": 113, "new_tokens": 16}],
            quick_params=[{"prompt": 32, "new_tokens": 8}],
            baseline="hf-fp32", metrics=_METRICS, warmup=1, repeats=3,
            description="greedy decode of SmolLM2-135M (and of a random Llama-3.2-1B-shaped model): transformers "
                        "eager fp32/bf16 and static cache + torch.compile vs effllm patch(decode=...) with fp32, INT8 "
                        "and INT4 weights (compiled per layer, whole step, eager) vs llama.cpp on the same GGUF: "
                        "tokens/s, first token, ops per token")
def fast_decode(params, dtype, device) -> ModelSetup:
    if torch.device(device).type != "cpu":
        return ModelSetup(unavailable={"effllm-*": "the fast decode path is CPU-only for now"})
    big = params.get("model") == "llama-1b-random"
    if big:
        fp32 = cached(("llama-1b-random",), llama_1b_random)
        prompt = torch.randint(0, LLAMA_1B_SHAPE["vocab_size"], (1, params["prompt"]),
                               generator=torch.Generator().manual_seed(0))
        pad = 0
    else:
        fp32, tok = smollm2(torch.float32, device)
        prompt = text_ids(tok, params["prompt"]).to(device)
        pad = tok.eos_token_id
    builders = {
        "hf-fp32": lambda: fp32,
        "hf-bf16": lambda: copy.deepcopy(fp32).to(torch.bfloat16),
        "hf-static-compile": lambda: _hf_static_compiled(fp32),
        "effllm-fp32": lambda: _fast(fp32),
        "effllm-int8": lambda: _fast(fp32, Int8WeightOnly()),
        "effllm-int4": lambda: _fast(fp32, Int4WeightOnly(64)),
        "effllm-int4-step": lambda: _fast(fp32, Int4WeightOnly(64), compile="step"),
        "effllm-int4-eager": lambda: _fast(fp32, Int4WeightOnly(64), compile=False),
    }
    unavailable = {}
    if big:
        for name in set(builders) - set(_LLAMA_1B_PROVIDERS):
            del builders[name]
            unavailable[name] = "not run on the 1B-shaped model (its fp32 copy would not fit beside the others)"
    built = {}

    def model(name):
        # Built on first use (a measure or the warm-up round): only the providers a run selects.
        if name not in built:
            built[name] = builders[name]()
        return built[name]

    def run(name):
        return lambda: time_generate(model(name), prompt, params["new_tokens"], device=device, pad_token_id=pad)

    def measure(name):
        return lambda: {"ops_per_token": ops_per_token(model(name), prompt, pad)}

    runs = {n: run(n) for n in builders}
    for name, gguf in llama_cpp_ggufs().items():
        if big:
            unavailable[name] = "no GGUF of the random 1B-shaped model"
            continue
        runs[name], why = llama_cpp_run(gguf, prompt[0].tolist(), params["new_tokens"], torch.get_num_threads())
        if why:
            del runs[name]
            unavailable[name] = why
    return ModelSetup(runs=runs, measures={n: measure(n) for n in builders if n != "hf-static-compile"},
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
