"""tensor_parallel(model) on a tiny random Llama (SmolLM2's head layout: 9 query / 3 KV heads)
over 2 and 3 gloo processes: same logits, same greedy tokens, same gradients as unsharded."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from effllm.parallel import ColumnParallelLinear, check_tensor_parallel, tensor_parallel
from effllm.parallel._group import shard_range
from effllm.parallel.launch import run_checks


def _llama(seed=0, **overrides):
    options = dict(vocab_size=101, hidden_size=72, intermediate_size=100, num_hidden_layers=2, num_attention_heads=9,
                   num_key_value_heads=3, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
    options.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**options)).eval()


def _inputs():
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    return ids, mask


def _assert_logits_close(got, want, what):
    scale = want.abs().max()
    err = (got - want).abs().max()
    assert err <= 1e-5 * scale, f"{what}: max error {err:.3g} > 1e-5 of the output scale {scale:.3g}"


def check_logits_and_greedy_tokens(group):
    world = dist.get_world_size(group)
    ref, tp = _llama(), _llama()
    rng = torch.get_rng_state()
    report = tensor_parallel(tp, group)
    assert torch.equal(torch.get_rng_state(), rng)  # no rank-dependent draws from the global generator
    ids, mask = _inputs()
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask).logits, tp(ids, attention_mask=mask).logits
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want_tokens, got_tokens = ref.generate(ids, **kwargs), tp.generate(ids, **kwargs)

    _assert_logits_close(got, want, "logits")
    assert torch.equal(got_tokens, want_tokens), f"greedy tokens differ:\n{got_tokens}\n{want_tokens}"
    assert report.kv_heads == {2: [2, 1], 3: [1, 1, 1]}[world]
    assert report.query_heads == {2: [6, 3], 3: [3, 3, 3]}[world]
    assert tp.lm_head.weight is tp.model.embed_tokens.weight  # still tied

    bare_ref, bare = _llama(seed=5).model, _llama(seed=5).model  # a decoder without its LM head
    tensor_parallel(bare, group)
    with torch.no_grad():
        got_hidden = bare(ids, attention_mask=mask).last_hidden_state
        want_hidden = bare_ref(ids, attention_mask=mask).last_hidden_state
    _assert_logits_close(got_hidden, want_hidden, "hidden states of a bare decoder")


def check_other_llama_family_models(group):
    from transformers import (MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    common = dict(vocab_size=101, hidden_size=48, intermediate_size=70, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=8, max_position_embeddings=64)
    ids, mask = _inputs()
    for config_cls, model_cls in ((MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM),
                                  (Qwen3Config, Qwen3ForCausalLM)):
        models = []
        for _ in range(2):
            torch.manual_seed(6)
            models.append(model_cls(config_cls(**common)).eval())
        ref, tp = models
        tensor_parallel(tp, group)
        with torch.no_grad():
            _assert_logits_close(tp(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits,
                                 model_cls.__name__)


def check_training_gradients(group):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    options = dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    ref, tp = _llama(seed=2, **options), _llama(seed=2, **options)
    tensor_parallel(tp, group)
    ids, mask = _inputs()
    want = ref(ids, attention_mask=mask, labels=ids)
    want.loss.backward()
    got = tp(ids, attention_mask=mask, labels=ids)
    got.loss.backward()

    torch.testing.assert_close(got.loss, want.loss)
    kv_rows = {2: [(0, 16), (16, 24)], 3: [(0, 8), (8, 16), (16, 24)]}[world][rank]
    q_rows = tuple(3 * r for r in kv_rows)
    mlp = shard_range(100, world, rank)
    vocab = shard_range(101, world, rank)
    every = slice(None)
    layers, ref_layers = tp.model.layers, ref.model.layers
    pairs = [  # (sharded parameter, unsharded parameter, this rank's part of it)
        (layers[0].self_attn.q_proj.weight, ref_layers[0].self_attn.q_proj.weight, slice(*q_rows)),
        (layers[1].self_attn.k_proj.bias, ref_layers[1].self_attn.k_proj.bias, slice(*kv_rows)),
        (layers[0].self_attn.o_proj.weight, ref_layers[0].self_attn.o_proj.weight, (every, slice(*q_rows))),
        (layers[0].self_attn.o_proj.bias, ref_layers[0].self_attn.o_proj.bias, every),
        (layers[1].mlp.up_proj.weight, ref_layers[1].mlp.up_proj.weight, slice(*mlp)),
        (layers[1].mlp.down_proj.weight, ref_layers[1].mlp.down_proj.weight, (every, slice(*mlp))),
        (layers[1].input_layernorm.weight, ref_layers[1].input_layernorm.weight, every),
        (tp.model.embed_tokens.weight, ref.model.embed_tokens.weight, slice(*vocab)),
        (tp.lm_head.weight, ref.lm_head.weight, slice(*vocab)),
    ]
    for index, (mine, theirs, part) in enumerate(pairs):
        torch.testing.assert_close(mine.grad, theirs.grad[part], msg=lambda m: f"parameter pair {index}: {m}")


def check_composes_with_effllm_attention(group):
    import effllm

    ref, tp = _llama(seed=3), _llama(seed=3)
    tensor_parallel(tp, group)
    handle = effllm.patch(tp, attention=True)
    ids, mask = _inputs()
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask).logits, tp(ids, attention_mask=mask).logits
    handle.unpatch()
    _assert_logits_close(got, want, "logits with effllm attention")
    assert any(r.feature == "attention" and r.status == "patched" for r in handle.records), handle.report()


def check_patch_parallel_shards_and_unpatch_restores(group):
    import effllm

    ref, tp = _llama(seed=3), _llama(seed=3)
    before = _snapshot(tp)
    handle = effllm.patch(tp, attention=True, parallel=group)
    assert isinstance(tp.model.layers[0].mlp.up_proj, ColumnParallelLinear) and handle.parallel.world_size > 1
    ids, mask = _inputs()
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask).logits, tp(ids, attention_mask=mask).logits
    _assert_logits_close(got, want, "logits through patch(parallel=...)")
    handle.unpatch()
    _assert_unchanged(tp, before)
    assert handle.parallel is None and tp.config._attn_implementation == ref.config._attn_implementation


def check_restore_gives_back_the_unsharded_model(group):
    for tied in (True, False):
        ref, tp = _llama(seed=4, tie_word_embeddings=tied), _llama(seed=4, tie_word_embeddings=tied)
        before = _snapshot(tp)
        handle = tensor_parallel(tp, group)
        assert handle.active
        handle.restore()
        _assert_unchanged(tp, before)
        assert not handle.active
        assert (tp.lm_head.weight is tp.model.embed_tokens.weight) == tied
        ids, mask = _inputs()
        with torch.no_grad():
            assert torch.equal(tp(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)
    with pytest.raises(RuntimeError, match="already restored"):
        handle.restore()


def check_composes_with_effllm_kv(group):
    import effllm

    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(1))
    for kv in (effllm.kv.SnapKV(budget=0.5), effllm.kv.KIVI(bits=4)):
        options = dict(seed=7, head_dim=32, hidden_size=288)  # KIVI packs head dims by 32
        ref, tp = _llama(**options), _llama(**options)
        tensor_parallel(tp, group)
        with effllm.patched(ref, kv=kv), effllm.patched(tp, kv=kv):
            want = ref.generate(ids, max_new_tokens=6, do_sample=False)
            got = tp.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, want), f"{kv!r}: greedy tokens differ:\n{got}\n{want}"


def check_quantize_after_sharding(group):
    # Quantizing the shards is exact when no block straddles a shard boundary: FP8 128x128 weight
    # blocks with every shard a multiple of 128 wide (CPU: dequantize, multiply in float32).
    from effllm.quant import Fp8, Fp8Linear, quantize_

    world = dist.get_world_size(group)
    options = dict(seed=8, hidden_size=384, num_attention_heads=6, num_key_value_heads=3, head_dim=128,
                   intermediate_size=128 * world, num_hidden_layers=1)
    ref, tp = _llama(**options), _llama(**options)
    handle = tensor_parallel(tp, group)
    config = Fp8(weights="block", activations=None)
    quantize_(ref, config)
    quantize_(tp, config)
    ids, mask = _inputs()
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask).logits, tp(ids, attention_mask=mask).logits
    _assert_logits_close(got, want, "FP8-quantized logits")
    assert isinstance(tp.model.layers[0].mlp.down_proj.local, Fp8Linear)
    assert isinstance(tp.model.layers[0].self_attn.q_proj.local, Fp8Linear)
    with pytest.raises(TypeError, match="hold quantized shards"):
        handle.restore()


def _snapshot(model):
    return [(name, type(module)) for name, module in model.named_modules()], [p.clone() for p in model.parameters()]


def _assert_unchanged(model, snapshot):
    modules, params = snapshot
    assert [(name, type(module)) for name, module in model.named_modules()] == modules
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))


def check_refusals_leave_the_model_unchanged(group):
    world = dist.get_world_size(group)
    model = _llama(num_attention_heads=9, num_key_value_heads=1)
    before = _snapshot(model)
    for fn in (check_tensor_parallel, tensor_parallel):
        with pytest.raises(ValueError, match=rf"num_key_value_heads \(1\) must be at least the group's world size "
                                             rf"\({world}\)"):
            fn(model, group)
    _assert_unchanged(model, before)
    check_tensor_parallel(_llama(), group)  # fine: no error, nothing changed

    model = _llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="group must be a torch.distributed ProcessGroup"):
        tensor_parallel(model, None)
    model.model.layers[1].mlp.down_proj = nn.Sequential(nn.Linear(100, 72))  # e.g. a wrapped or quantized linear
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj is Sequential"):
        tensor_parallel(model, group)
    _assert_unchanged(model, before)

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    before = _snapshot(gpt2)
    with pytest.raises(ValueError, match="unsupported model: GPT2LMHeadModel has no .model.layers"):
        tensor_parallel(gpt2, group)
    _assert_unchanged(gpt2, before)

    model = _llama()
    tensor_parallel(model, group)
    assert isinstance(model.model.layers[0].mlp.up_proj, ColumnParallelLinear)
    with pytest.raises(ValueError, match="already tensor-parallel"):
        tensor_parallel(model, group)


CHECKS = [check_logits_and_greedy_tokens, check_other_llama_family_models, check_training_gradients,
          check_refusals_leave_the_model_unchanged, check_composes_with_effllm_attention, check_composes_with_effllm_kv,
          check_quantize_after_sharding, check_patch_parallel_shards_and_unpatch_restores,
          check_restore_gives_back_the_unsharded_model]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"{p}ranks")
def outcome(request):
    return run_checks(CHECKS, request.param)


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_tensor_parallel_llama_matches_unsharded(outcome, name):
    failures = outcome[name]
    assert not failures, "\n".join(failures)


def test_tensor_parallel_needs_an_initialised_group():
    model = _llama()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        tensor_parallel(model, dist.group.WORLD)
    _assert_unchanged(model, before)


# The real SmolLM2-135M-Instruct: the reference runs once in this process, the ranks are forked
# from it (they inherit the loaded model and the reference, and shard their own copy in place).
_SMOLLM2 = {}


def check_smollm2_logits_and_greedy_tokens(group):
    model, ids, want_logits, want_tokens = (_SMOLLM2[key] for key in ("model", "ids", "logits", "tokens"))
    tensor_parallel(model, group)
    with torch.no_grad():
        got_logits = model(ids).logits
    got_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    _assert_logits_close(got_logits, want_logits, "SmolLM2 logits")
    assert torch.equal(got_tokens, want_tokens), f"greedy tokens differ:\n{got_tokens}\n{want_tokens}"


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    return dict(model=model, ids=ids, logits=logits, tokens=model.generate(ids, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("world", [2, 3])
def test_tensor_parallel_smollm2_matches_unsharded(smollm2_reference, world):
    _SMOLLM2.update(smollm2_reference)
    try:
        outcome = run_checks([check_smollm2_logits_and_greedy_tokens], world, start_method="fork")
    finally:
        _SMOLLM2.clear()
    failures = outcome["check_smollm2_logits_and_greedy_tokens"]
    assert not failures, "\n".join(failures)
