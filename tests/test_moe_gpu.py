"""Tier 1: offload_experts on CUDA (experts in pinned CPU memory or a file, prefetches copied on a
side stream and ordered by events) gives the resident CUDA model's outputs exactly, and the
cache bound holds. Passed on an H200 (session 16)."""

import pytest
import torch

from effllm.moe import offload_experts

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu


def _mixtral(dtype):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg).eval().to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("store, prefetch", [("cpu", None), ("cpu", "cross_layer_gate"), ("disk", "trace_match")])
def test_cuda_offload_is_exact(dtype, store, prefetch):
    model = _mixtral(dtype)
    ids = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        reference = model(ids).logits
    generated = model.generate(ids[:1, :3], max_new_tokens=24, do_sample=False, pad_token_id=0)
    with offload_experts(model, store=store, cache_experts=2, prefetch=prefetch) as handle:
        if store == "cpu":
            assert all(t.is_pinned() for ts in handle.store.columns for t in ts)
        assert all(p.numel() == 0 and p.device.type == "cuda" for p in model.model.layers[0].mlp.experts.parameters())
        with torch.no_grad():
            logits = model(ids).logits
        again = model.generate(ids[:1, :3], max_new_tokens=24, do_sample=False, pad_token_id=0)
        stats = handle.stats()
    assert torch.equal(logits, reference) and torch.equal(again, generated)
    assert stats["peak_cached_experts"] <= 2 * 4
    assert model.model.layers[0].mlp.experts.gate_up_proj.is_cuda
