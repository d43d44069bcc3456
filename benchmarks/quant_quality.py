"""Quantization quality on the real models, fp32 against each format.

    python benchmarks/quant_quality.py            # writes benchmarks/results/quality/quant.jsonl

- all-MiniLM-L6-v2 (fp32 weights): cosine similarity of mean-pooled sentence embeddings to the
  fp32 model on the 64 sentences in ``effllm/data/sentences.txt``.
- SmolLM2-135M-Instruct: perplexity of ``haystack.txt`` (887 tokens).
- Activation-aware INT4 and GPTQ rounding are calibrated on 8 chunks of ``calibration.txt``, disjoint
  from both. SmolLM2's linear weights come from a Q4_1 GGUF (4-bit, group 32), so INT4 g32 on it
  is nearly lossless by construction; hidden size 576 is not a multiple of 128, hence group 64.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from effllm.bench.records import write_result_rows
from effllm.quant import Fp8, Int4WeightOnly, Int8WeightOnly, quantize_
from effllm.testing.models import minilm, smollm2
from effllm.testing.quality import calibration_texts, mean_pooled_embeddings, perplexity, sentences, shipped_text

OUT = Path(__file__).resolve().parent / "results" / "quality" / "quant.jsonl"

MINILM_FORMATS = {
    "int4 g128 rtn": Int4WeightOnly(128),
    "int4 g128 rtn float zeros": Int4WeightOnly(128, integer_zeros=False),
    "int4 g64 rtn": Int4WeightOnly(64),
    "int4 g32 rtn": Int4WeightOnly(32),
    "int4 g128 act-aware": Int4WeightOnly(128, act_aware=True),
    "int4 g64 act-aware": Int4WeightOnly(64, act_aware=True),
    "int4 g128 act-aware float zeros": Int4WeightOnly(128, act_aware=True, integer_zeros=False),
    "int8 weight-only": Int8WeightOnly(),
    "fp8 row, weight-only": Fp8("row", None),
    "fp8 row, token acts": Fp8("row", "token"),
    "fp8 block, block acts": Fp8("block", "block"),
    "int4 g128 gptq": Int4WeightOnly(128, gptq=True),
    "int4 g128 act-aware gptq": Int4WeightOnly(128, act_aware=True, gptq=True),
    "fp8 row, weight-only, gptq": Fp8("row", None, gptq=True),
    "fp8 row, token acts, gptq": Fp8("row", "token", gptq=True),
}
SMOLLM2_FORMATS = {
    "int4 g64 rtn": Int4WeightOnly(64),
    "int4 g64 act-aware": Int4WeightOnly(64, act_aware=True),
    "int4 g64 act-aware float zeros": Int4WeightOnly(64, act_aware=True, integer_zeros=False),
    "int8 weight-only": Int8WeightOnly(),
    "fp8 row, weight-only": Fp8("row", None),
    "fp8 row, token acts": Fp8("row", "token"),
    "int4 g64 gptq": Int4WeightOnly(64, gptq=True),
    "int4 g64 act-aware gptq": Int4WeightOnly(64, act_aware=True, gptq=True),
    "fp8 row, weight-only, gptq": Fp8("row", None, gptq=True),
    "fp8 row, token acts, gptq": Fp8("row", "token", gptq=True),
}


def _calibrated(cfg) -> bool:
    return getattr(cfg, "act_aware", False) or getattr(cfg, "gptq", False)


def _calibration(tok):
    texts = calibration_texts()
    return [dict(tok(texts[i:i + 4], return_tensors="pt", padding=True)) for i in range(0, len(texts), 4)]


def run_minilm() -> list[dict]:
    model, tok = minilm()
    texts = sentences()
    ref = mean_pooled_embeddings(model, tok, texts)
    rows = []
    for name, cfg in MINILM_FORMATS.items():
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        quantize_(quantized, cfg, calibration=_calibration(tok) if _calibrated(cfg) else None)
        seconds = time.perf_counter() - start
        cos = (mean_pooled_embeddings(quantized, tok, texts) * ref).sum(-1)
        rows.append({"model": "all-MiniLM-L6-v2", "format": name, "config": repr(cfg),
                     "metric": "embedding cosine to fp32", "mean": float(cos.mean()), "min": float(cos.min()),
                     "quantize_s": round(seconds, 2)})
        print(f"MiniLM   {name:24s} mean cosine {cos.mean():.4f}  min {cos.min():.4f}  ({seconds:.1f} s)")
    return rows


def run_smollm2() -> list[dict]:
    model, tok = smollm2()
    text = shipped_text("haystack.txt")
    base = perplexity(model, tok, text)
    print(f"SmolLM2  {'fp32':24s} perplexity {base:.3f}")
    rows = [{"model": "SmolLM2-135M-Instruct", "format": "fp32", "metric": "perplexity", "value": base}]
    for name, cfg in SMOLLM2_FORMATS.items():
        quantized = copy.deepcopy(model)
        calib = None
        if _calibrated(cfg):
            calib = [tok(t, return_tensors="pt").input_ids for t in calibration_texts()]
        quantize_(quantized, cfg, calibration=calib)
        ppl = perplexity(quantized, tok, text)
        rows.append({"model": "SmolLM2-135M-Instruct", "format": name, "config": repr(cfg), "metric": "perplexity",
                     "value": ppl, "relative_to_fp32": ppl / base - 1})
        print(f"SmolLM2  {name:24s} perplexity {ppl:.3f}  ({100 * (ppl / base - 1):+.2f}%)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = run_minilm() + run_smollm2()
    write_result_rows(args.out, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
