"""Weight quantization quality on the real models, each format against the fp32 model.

- SmolLM2-135M-Instruct: perplexity of ``haystack.txt`` (887 tokens).
- all-MiniLM-L6-v2 (fp32 weights): mean cosine similarity of mean-pooled sentence embeddings to
  the fp32 model's, on the 64 sentences of ``sentences.txt``.

Activation-aware INT4 and GPTQ are calibrated on 8 chunks of ``calibration.txt``, disjoint from
both texts. SmolLM2's linear weights come from a Q4_1 GGUF (4-bit, group 32), so INT4 g32 on it
is nearly lossless by construction; its hidden size 576 is not a multiple of 128, hence group 64.
"""

from __future__ import annotations

import copy

from ...quant import Fp8, Int4WeightOnly, Int8WeightOnly, quantize_
from ..model import cached
from ..registry import ModelSetup, model_case

SMOLLM2_FORMATS = {
    "int8": Int8WeightOnly(),
    "int4-g64": Int4WeightOnly(64),
    "int4-g64-act-aware": Int4WeightOnly(64, act_aware=True),
    "int4-g64-act-aware-float-zeros": Int4WeightOnly(64, act_aware=True, integer_zeros=False),
    "int4-g64-gptq": Int4WeightOnly(64, gptq=True),
    "fp8-row-weight-only": Fp8("row", None),
    "fp8-row-token-acts": Fp8("row", "token"),
    "fp8-row-weight-only-gptq": Fp8("row", None, gptq=True),
}
MINILM_FORMATS = {
    "int8": Int8WeightOnly(),
    "int4-g128": Int4WeightOnly(128),
    "int4-g32": Int4WeightOnly(32),
    "int4-g128-act-aware": Int4WeightOnly(128, act_aware=True),
    "int4-g128-gptq": Int4WeightOnly(128, gptq=True),
    "fp8-row-weight-only": Fp8("row", None),
    "fp8-row-token-acts": Fp8("row", "token"),
    "fp8-block-block-acts": Fp8("block", "block"),
}


def _calibrated(cfg) -> bool:
    return getattr(cfg, "act_aware", False) or getattr(cfg, "gptq", False)


def _smollm2(formats):
    from ...testing.models import smollm2
    from ...testing.quality import calibration_texts, perplexity, shipped_text

    model, tok = cached(("smollm2", "float32", "cpu"), smollm2)
    text = shipped_text("haystack.txt")
    calibration = [tok(t, return_tensors="pt").input_ids for t in calibration_texts()]

    def measure(cfg):
        def run():
            quantized = model
            if cfg is not None:
                quantized = copy.deepcopy(model)
                quantize_(quantized, cfg, calibration=calibration if _calibrated(cfg) else None)
            return {"perplexity": perplexity(quantized, tok, text)}
        return run

    return ModelSetup(measures={"fp32": measure(None), **{n: measure(c) for n, c in formats.items()}})


def _minilm(formats):
    from ...testing.models import minilm
    from ...testing.quality import calibration_texts, mean_pooled_embeddings, sentences

    model, tok = cached(("minilm",), minilm)
    texts = sentences()
    chunks = calibration_texts()
    calibration = [dict(tok(chunks[i:i + 4], return_tensors="pt", padding=True)) for i in range(0, len(chunks), 4)]
    ref = mean_pooled_embeddings(model, tok, texts)

    def measure(cfg):
        def run():
            quantized = copy.deepcopy(model)
            quantize_(quantized, cfg, calibration=calibration if _calibrated(cfg) else None)
            return {"cosine": float((mean_pooled_embeddings(quantized, tok, texts) * ref).sum(-1).mean())}
        return run

    return ModelSetup(measures={"fp32": lambda: {"cosine": 1.0}, **{n: measure(c) for n, c in formats.items()}})


@model_case("quant.quality", params=[{"model": "smollm2", "formats": "all"}, {"model": "minilm", "formats": "all"}],
            quick_params=[{"model": "smollm2", "formats": "rtn"}], metrics=("perplexity", "cosine"), baseline="fp32",
            description="weight-quantization quality per format: SmolLM2 perplexity of haystack.txt, MiniLM "
                        "embedding cosine to fp32")
def quant_quality(params, dtype, device) -> ModelSetup:
    formats = SMOLLM2_FORMATS if params["model"] == "smollm2" else MINILM_FORMATS
    if params["formats"] == "rtn":
        formats = {n: c for n, c in formats.items() if not _calibrated(c)}
    return _smollm2(formats) if params["model"] == "smollm2" else _minilm(formats)
