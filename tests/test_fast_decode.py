"""effllm.fast: the static cache, the fast decoder and patch(decode=...).

The equality tests use the eager fast path (compile=False) on SmolLM2 and the tiny random
models; the compiled path (torch.compile, tens of seconds per graph on a small CPU) runs on the
tiny Llama only, where it must give the same tokens and compile once per capacity bucket.
"""

from __future__ import annotations

import copy

import pytest
import torch

import effllm
from effllm.fast import FastDecode, StaticKVCache, bucket_capacity
from effllm.quant import Fp8, Int4WeightOnly, Int8WeightOnly
from effllm.testing.models import tiny_causal_lm


def _greedy(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def _ids(batch, seq, vocab=101, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_eager_fast_path_gives_hf_greedy_tokens(kind):
    model = tiny_causal_lm(kind)
    ids = _ids(2, 7)
    want = _greedy(model, ids, 24, eos_token_id=None)
    with effllm.patched(model, decode=FastDecode(compile=False)) as handle:
        got = _greedy(model, ids, 24, eos_token_id=None)
        assert handle.decode.steps == 23  # the first token comes from the prefill
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_smollm2_greedy_tokens_equal_fp32():
    from effllm.testing.models import smollm2

    model, tok = smollm2()
    ids = tok("Write a short note about the sea and the wind, in plain words.", return_tensors="pt").input_ids
    want = _greedy(model, ids, 40)
    with effllm.patched(model, decode=FastDecode(compile=False)):
        got = _greedy(model, ids, 40)
    assert got.tolist() == want.tolist()


def test_static_cache_holds_the_dynamic_cache_contents():
    from transformers import DynamicCache

    model = tiny_causal_lm("llama")
    ids = _ids(2, 6)
    with effllm.patched(model, decode=FastDecode(compile=False)) as handle:
        out = _greedy(model, ids, 10, eos_token_id=None)
        cache = handle.decode.last_cache
    assert cache.capacity == 256 and cache.length == out.shape[1] - 1  # the last token is never fed back
    from effllm._cache_arg import cache_argument_name

    dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        model(out[:, :-1], **{cache_argument_name(model): dynamic})
    for i in range(model.config.num_hidden_layers):
        keys, values = cache.layer(i)
        torch.testing.assert_close(keys, dynamic.layers[i].keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(values, dynamic.layers[i].values, rtol=1e-5, atol=1e-6)
        assert not cache.keys[i][:, :, cache.length:].any()  # nothing written past the length


def test_static_cache_writes_in_place_and_grows():
    cache = StaticKVCache(2, 1, 2, 4, 8)
    before = cache.keys[0].data_ptr()
    k = torch.randn(1, 2, 3, 4)
    cache.write(0, k, -k, torch.tensor([0, 1, 2]))
    cache.length = 3
    assert cache.keys[0].data_ptr() == before
    cache.grow(16)
    assert cache.capacity == 16
    torch.testing.assert_close(cache.layer(0)[0], k)
    torch.testing.assert_close(cache.layer(0)[1], -k)
    assert [bucket_capacity(n, 256) for n in (1, 256, 257, 1000)] == [256, 256, 512, 1024]


@pytest.mark.parametrize("config", [Int8WeightOnly(), Int4WeightOnly(group_size=32)], ids=["int8", "int4"])
def test_quantized_fast_path_gives_the_quantized_models_tokens(config):
    model = tiny_causal_lm("llama")
    ids = _ids(1, 9)
    with effllm.patched(model, quant=config):
        want = _greedy(model, ids, 16, eos_token_id=None)
    # lm_head="model": the head as the quant patch made it, so both sides multiply the same weights.
    with effllm.patched(model, quant=config, decode=FastDecode(compile=False, lm_head="model")) as handle:
        got = _greedy(model, ids, 16, eos_token_id=None)
        assert handle.decode.decoder.spec.qkv.kind == ("int8" if isinstance(config, Int8WeightOnly) else "int4")
    assert got.tolist() == want.tolist()


def test_compiled_step_compiles_once_per_bucket_across_100_steps():
    model = tiny_causal_lm("llama")
    with effllm.patched(model, quant=Int8WeightOnly(), decode=FastDecode(compile="layer", lm_head="model")) as handle:
        got = _greedy(model, _ids(1, 5), 101, eos_token_id=None)  # 100 decode steps, capacity 256
        runner = handle.decode
        assert runner.steps == 100 and runner.graphs == 1
        _greedy(model, _ids(1, 40, seed=2), 60, eos_token_id=None)  # another length, same bucket
        assert runner.graphs == 1
        _greedy(model, _ids(1, 200, seed=3), 100, eos_token_id=None)  # 300 tokens: the 512 bucket
        assert runner.graphs == 2 and sorted(runner.buckets) == [(1, 256), (1, 512)]
        assert "2 graph(s) compiled" in runner.report()
    # INT8 through the compiled step gives the same tokens as the unpatched quantized model's
    # eager forward (both multiply with _weight_int8pack_mm in bf16).
    with effllm.patched(model, quant=Int8WeightOnly()):
        want = _greedy(model, _ids(1, 5), 101, eos_token_id=None)
    assert got.tolist() == want.tolist()


def test_a_bucket_past_dynamos_recompile_limit_is_a_clear_error(monkeypatch):
    import torch._dynamo

    model = tiny_causal_lm("llama")
    torch._dynamo.reset()  # other tests' graphs must not count against the limit
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    with effllm.patched(model, decode=FastDecode(compile="layer", min_capacity=16)) as handle:
        _greedy(model, _ids(1, 5), 4, eos_token_id=None)
        assert handle.decode.graphs == 1
        with pytest.raises(RuntimeError, match="recompile_limit"):
            _greedy(model, _ids(1, 5), 20, eos_token_id=None)  # the 32-slot bucket: a second graph
        assert handle.decode.graphs == 1
    torch._dynamo.reset()


def test_undo_restores_the_model():
    model = tiny_causal_lm("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids(1, 5)
    want = _greedy(model, ids, 8)
    handle = effllm.patch(model, quant=Int4WeightOnly(group_size=32), decode=True)
    assert "generate" in vars(model) and handle.decode is not None
    handle.unpatch()
    assert "generate" not in vars(model) and handle.decode is None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert set(state) == set(model.state_dict())
    torch.testing.assert_close(_greedy(model, ids, 8), want, rtol=0, atol=0)


# -- bad input: refused before anything changes -----------------------------------------------------


def _unchanged(model):
    return "generate" not in vars(model) and getattr(model, "_effllm_patch_handle", None) is None


@pytest.mark.parametrize("decode, error, words", [
    ("fast", TypeError, "decode"),
    (FastDecode, TypeError, "decode"),
])
def test_patch_refuses_a_bad_decode_value(decode, error, words):
    model = tiny_causal_lm("llama")
    with pytest.raises(error, match=words):
        effllm.patch(model, decode=decode)
    assert _unchanged(model)


@pytest.mark.parametrize("kwargs, words", [
    ({"compile": "max"}, "compile"), ({"weights": "fp8"}, "weights"), ({"lm_head": "int4"}, "lm_head"),
    ({"min_capacity": 0}, "min_capacity"),
])
def test_fast_decode_refuses_bad_options(kwargs, words):
    with pytest.raises(ValueError, match=words):
        FastDecode(**kwargs)


def test_patch_refuses_what_does_not_compose():
    model = tiny_causal_lm("llama")
    linears = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="kv"):
        effllm.patch(model, kv=effllm.kv.StreamingLLM(budget=32), decode=True)
    with pytest.raises(ValueError, match="Fp8"):
        effllm.patch(model, quant=Fp8(), decode=True)
    with pytest.raises(ValueError, match="act_aware|Int4WeightOnly"):
        effllm.patch(model, quant=Int4WeightOnly(group_size=32, act_aware=True), decode=True)
    assert _unchanged(model) and {n: type(m) for n, m in model.named_modules()} == linears
    moe = tiny_causal_lm("mixtral")
    with pytest.raises(ValueError, match="model_type 'mixtral'"):
        effllm.patch(moe, decode=True)
    assert _unchanged(moe)
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):  # the model is checked before the quant plan
        effllm.patch(gpt2, quant=Int8WeightOnly(), decode=True)


@pytest.mark.parametrize("kwargs, words", [
    ({"do_sample": True}, "greedy"),
    ({"num_beams": 2}, "greedy"),
    ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"attention_mask": torch.tensor([[0, 1, 1, 1, 1]])}, "attention_mask"),
    ({"max_new_tokens": 600}, "max_position_embeddings"),
    ({"streamer": object()}, "streamer"),
])
def test_generate_refuses_what_the_fast_path_cannot_do(kwargs, words):
    model = tiny_causal_lm("llama")
    ids = _ids(1, 5)
    with effllm.patched(model, decode=FastDecode(compile=False)) as handle:
        with pytest.raises(ValueError, match=words):
            model.generate(ids, **kwargs)
        assert handle.decode.steps == 0
        with pytest.raises(ValueError, match="input_ids"):
            model.generate(ids[0])


def test_a_decode_patched_model_refuses_copies():
    model = tiny_causal_lm("llama")
    with effllm.patched(model, decode=FastDecode(compile=False)), pytest.raises(TypeError, match="unpatch"):
        copy.deepcopy(model)


def test_fused_ops_match_the_unfused_math():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from effllm.kernels.fused import add_rms_norm, rope_qk, rope_tables, swiglu
    from effllm.kernels.reference import rms_norm_reference

    g = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(2, 3, 40, generator=g), torch.randn(2, 3, 40, generator=g), torch.randn(40, generator=g)
    normed, hidden = add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(hidden, x + r)
    torch.testing.assert_close(normed, rms_norm_reference(x + r, w, 1e-6).float(), rtol=1e-5, atol=1e-5)
    q, k = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g)  # (B, H, S, D)
    angles = torch.randn(1, 3, 8, generator=g)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    c, s = rope_tables(cos, sin)
    both = rope_qk(torch.cat((q, k), 1).transpose(1, 2), c[:, :, None], s[:, :, None]).transpose(1, 2)
    torch.testing.assert_close(both, torch.cat((want_q, want_k), 1), rtol=1e-6, atol=1e-6)
    gate_up = torch.randn(5, 12, generator=g)
    torch.testing.assert_close(swiglu(gate_up), torch.nn.functional.silu(gate_up[:, :6]) * gate_up[:, 6:])


def test_bf16_fast_path_logits_are_within_the_tolerance_table():
    # flash-attn's rule (effllm.testing.tolerances): against the float32 model, the bf16 fast
    # path may err at most ATTENTION_ERROR_RATIO times as much as transformers' own bf16 forward.
    from effllm.fast.compiled import FastRunner
    from effllm.fast.decoder import FastDecoder
    from effllm.testing.tolerances import ATTENTION_ERROR_RATIO, abs_floor

    reference = tiny_causal_lm("llama")
    prompt = 7
    seq = _greedy(reference, _ids(2, prompt), 12, eos_token_id=None)  # the tokens every path is fed
    model = copy.deepcopy(reference).to(torch.bfloat16)
    with torch.no_grad():
        want = reference(seq).logits[:, prompt - 1:-1]
        hf = model(seq).logits[:, prompt - 1:-1].float()
        runner = FastRunner(FastDecoder(model), FastDecode(compile=False))
        cache = runner.new_cache(2, seq.shape[1])
        tables = runner.decoder.rope(cache.capacity)
        steps = [runner.decoder.prefill(seq[:, :prompt], cache, tables)]
        steps += [runner._decode(seq[:, t:t + 1], cache, tables) for t in range(prompt, seq.shape[1] - 1)]
    got = torch.stack([s.reshape(2, -1).float() for s in steps], dim=1)
    assert got.shape == want.shape and steps[0].dtype == torch.bfloat16
    hf_error = (hf - want).abs().max().item()
    assert 0 < hf_error  # bf16 really rounds here, so the bound is not the floor alone
    assert (got - want).abs().max().item() <= ATTENTION_ERROR_RATIO * hf_error + abs_floor(torch.bfloat16)
