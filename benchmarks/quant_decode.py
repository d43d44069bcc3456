"""CPU decode speed of quantized models: tokens/s of a greedy decode loop, fp32 vs bf16 vs
effllm INT8 / INT4, measured side by side (variants take turns, several rounds, median).

    python benchmarks/quant_decode.py [--threads 1] [--steps 16] [--rounds 3]

Models: SmolLM2-135M-Instruct (real weights) and a random-weight model of Llama-3.2-1B's shape
(hidden 2048, MLP 8192, 16 layers, 32/8 heads, vocab 128256, tied embeddings) where the GEMMs
dominate. Quantized variants run the model in bf16 (torch's CPU INT4/INT8 ops want bf16
activations, so there is no cast per layer); their ``lm_head`` is named explicitly so it is
quantized despite the tie (it is read every step; the embedding is only indexed).
With torchao installed, its CPU INT4 config runs as one more variant.
Writes ``benchmarks/results/e2e/quant_decode.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from effllm.bench.records import describe_device, write_result_rows
from effllm.quant import Int4WeightOnly, Int8WeightOnly, ModuleConfigs, quantize_

OUT = Path(__file__).resolve().parent / "results" / "e2e" / "quant_decode.jsonl"


def llama_1b_shape():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def variants(model, group_size: int):
    """fp32, bf16 and quantized copies of ``model`` (built one at a time to bound memory)."""
    yield "fp32", model
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    yield "bf16", bf16
    for name, cfg in (("int8 (bf16 acts)", Int8WeightOnly()), (f"int4 g{group_size} (bf16 acts)",
                                                                Int4WeightOnly(group_size))):
        quantized = copy.deepcopy(bf16)
        quantize_(quantized, ModuleConfigs({"lm_head": cfg, "default": cfg}))
        yield name, quantized
    if importlib.util.find_spec("torchao") is not None:
        yield from _torchao_variant(bf16, group_size)


def _torchao_variant(bf16, group_size: int):
    """torchao's CPU INT4 (its prototype config: torch's packed CPU op, bf16 activations), on
    every linear including ``lm_head``, as effllm's variants."""
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_ as ao_quantize_
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        print(f"torchao INT4 skipped: {exc}")
        return
    quantized = copy.deepcopy(bf16)
    ao_quantize_(quantized, PrototypeInt4WeightOnlyConfig(group_size=group_size))
    yield f"torchao int4 g{group_size} (bf16 acts)", quantized


@torch.inference_mode()
def decode_seconds_per_token(model, prompt: torch.Tensor, steps: int) -> float:
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(prompt, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


def measure(label: str, model, group_size: int, steps: int, rounds: int) -> list[dict]:
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    models = dict(variants(model, group_size))
    times = {name: [] for name in models}
    for _ in range(rounds):  # variants take turns: machine noise hits them alike
        for name, m in models.items():
            times[name].append(decode_seconds_per_token(m, prompt, steps))
    base = statistics.median(times["fp32"])
    rows = []
    for name, samples in times.items():
        per_token = statistics.median(samples)
        rows.append({"model": label, "variant": name, "tokens_per_s": 1 / per_token,
                     "speedup_vs_fp32": base / per_token, "steps": steps, "rounds": rounds})
        print(f"{label:24s} {name:22s} {1 / per_token:7.2f} tok/s  {base / per_token:5.2f}x fp32")
    del models
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from effllm.testing.models import smollm2

    rows = measure("SmolLM2-135M-Instruct", smollm2()[0], 64, args.steps, args.rounds)
    rows += measure("random Llama-3.2-1B shape", llama_1b_shape(), 128, args.steps, args.rounds)
    write_result_rows(args.out, rows, device=describe_device(torch.device("cpu")), threads=args.threads)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
