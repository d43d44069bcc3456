"""effllm.patch on tiny random transformers models: per instance, reversible, validated first."""

import warnings

import pytest
import torch
from torch import nn

import effllm
import effllm.kernels
from effllm.hf import find_layout
from effllm.testing.models import tiny_causal_lm


def _tiny(kind: str, seed: int = 0, **extra):
    return tiny_causal_lm(kind, seed, max_position_embeddings=256, **extra)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls that reach effllm.kernels.attention (prefill) and decode_attention (decode)."""
    calls = []
    for name in ("attention", "decode_attention"):
        real = getattr(effllm.kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(effllm.kernels, name, counted)
    return calls


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@torch.inference_mode()
def test_patched_logits_and_generate_match(kind, spy):
    model = _tiny(kind)
    ids = torch.randint(0, 101, (2, 23), generator=torch.Generator().manual_seed(1))
    base = model(ids).logits
    base_gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    with effllm.patched(model, attention=True) as handle:
        assert model.config._attn_implementation == "effllm"
        torch.testing.assert_close(model(ids).logits, base, rtol=1e-5, atol=1e-5)
        assert spy == ["attention"] * 2  # one call per layer went through effllm
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert torch.equal(gen, base_gen)
        # 5 decode steps x 2 layers went through the decode kernel's entry point.
        assert spy.count("decode_attention") == 10
        assert "attention  patched" in handle.report()
    assert model.config._attn_implementation == "sdpa"
    n = len(spy)
    model(ids)
    assert len(spy) == n  # unpatched: effllm no longer called


@torch.inference_mode()
def test_left_padded_batch_matches_baseline():
    model = _tiny("llama")
    ids = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    base = model(ids, attention_mask=mask).logits
    with effllm.patched(model, attention="torch"):
        out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], base[mask.bool()], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_sliding_window_model_matches_baseline():
    model = _tiny("mistral", sliding_window=8)
    ids = torch.randint(0, 101, (1, 30), generator=torch.Generator().manual_seed(3))
    base = model(ids).logits
    with effllm.patched(model, attention=True):
        torch.testing.assert_close(model(ids).logits, base, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_two_models_are_independent(spy):
    a, b = _tiny("llama", seed=0), _tiny("llama", seed=1)
    ids = torch.randint(0, 101, (1, 9))
    handle = effllm.patch(a, attention=True)
    try:
        b(ids)
        assert spy == [] and b.config._attn_implementation == "sdpa"
        a(ids)
        assert len(spy) == 2
    finally:
        handle.unpatch()


def test_unpatch_restores_every_setting():
    model = _tiny("llama")
    model.set_attn_implementation("eager")
    before = {id(m): m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = effllm.patch(model, attention=True)
    handle.unpatch()
    after = {id(m): m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    assert before == after and set(before.values()) == {"eager"}
    assert not hasattr(model, "_effllm_patch_handle")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="already unpatched"):
        handle.unpatch()


def test_patching_twice_is_an_error_and_leaves_first_patch_intact():
    model = _tiny("llama")
    handle = effllm.patch(model, attention=True)
    with pytest.raises(RuntimeError, match="already patched"):
        effllm.patch(model, attention=True)
    assert handle.active and model.config._attn_implementation == "effllm"
    handle.unpatch()
    effllm.patch(model, attention=True).unpatch()  # patchable again after unpatch


def test_parallel_patch_refuses_before_any_change():
    model = _tiny("llama")
    for value in (object(), "group"):  # no process group initialised here either
        with pytest.raises((ValueError, TypeError, RuntimeError), match="parallel"):
            effllm.patch(model, attention=True, parallel=value)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_effllm_patch_handle")


@torch.inference_mode()
def test_quant_patch_is_reversible_and_combines_with_attention():
    from effllm.quant import Int4Linear, Int4WeightOnly, ModuleConfigs

    model = _tiny("llama")
    ids = torch.randint(0, 101, (1, 17), generator=torch.Generator().manual_seed(2))
    base = model(ids).logits
    original_q = model.model.layers[0].self_attn.q_proj
    config = ModuleConfigs({"re:.*lm_head": None, "default": Int4WeightOnly(32)})
    with effllm.patched(model, attention=True, quant=config) as handle:
        assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)
        assert "patched  14 linear modules: Int4WeightOnly(group_size=32" in handle.report()
        assert "lm_head: config is None" in handle.report()
        logits = model(ids).logits
        assert not torch.equal(logits, base)
        assert torch.nn.functional.cosine_similarity(logits.flatten(), base.flatten(), dim=0) > 0.99
    assert model.model.layers[0].self_attn.q_proj is original_q
    assert torch.equal(model(ids).logits, base)


def test_quant_patch_errors_change_nothing():
    from effllm.quant import Int4WeightOnly

    model = _tiny("llama")
    with pytest.raises(ValueError, match="not a multiple of group_size 128"):
        effllm.patch(model, attention=True, quant=Int4WeightOnly(128))  # hidden size 64
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_effllm_patch_handle")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with pytest.raises(ValueError, match="act_aware configs need calibration"):
        effllm.patch(model, quant=Int4WeightOnly(32, act_aware=True))


def test_triton_attention_where_it_cannot_run_is_refused_at_patch_time(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU model, no interpreter
    model = _tiny("llama")
    with pytest.raises(ValueError, match=r"attention='triton'.*TRITON_INTERPRET=1.*model is on cpu; nothing was"):
        effllm.patch(model, attention="triton")
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_effllm_patch_handle")
    monkeypatch.setattr("effllm._backend.triton_installed", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'effllm\[triton\]'"):
        effllm.patch(model, attention="triton")


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> bytes of the distinct storages behind ``tensors``."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@pytest.mark.parametrize("where", ["disk", "memory"])
@torch.inference_mode()
def test_quant_patch_frees_the_float_weights_unless_asked_and_unpatches_exactly(where):
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    from effllm.quant import Int8WeightOnly

    model = _tiny("llama")
    ids = torch.randint(0, 101, (1, 17), generator=torch.Generator().manual_seed(2))
    base = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bytes_before = sum(_storages([*model.parameters(), *model.buffers()]).values())
    q_proj = model.model.layers[0].self_attn.q_proj
    weight = q_proj.weight
    watched = [StorageWeakRef(m.weight.untyped_storage()) for m in model.modules() if type(m) is nn.Linear]
    handle = effllm.patch(model, quant=Int8WeightOnly(), quant_originals=where)
    gc.collect()
    bytes_after = sum(_storages([*model.parameters(), *model.buffers()]).values())
    assert bytes_after < 0.45 * bytes_before  # int8 linears + fp32 embeddings and norms
    freed = [ref.expired() for ref in watched]
    assert all(freed) if where == "disk" else not any(freed)
    assert ("float originals in" in handle.report()) == (where == "disk")
    model(ids)
    handle.unpatch()
    assert model.model.layers[0].self_attn.q_proj is q_proj and q_proj.weight is weight
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert torch.equal(model(ids).logits, base)


@torch.inference_mode()
def test_quant_patch_of_a_tied_lm_head_keeps_the_embedding(tmp_path, monkeypatch):
    import copy

    from effllm.quant import Int8WeightOnly, ModuleConfigs

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the originals go
    monkeypatch.setattr("tempfile.tempdir", None)
    model = _tiny("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 101, (1, 9), generator=torch.Generator().manual_seed(3))
    base = model(ids).logits
    handle = effllm.patch(model, quant=ModuleConfigs({"lm_head": Int8WeightOnly(), "default": Int8WeightOnly()}))
    assert model.model.embed_tokens.weight.numel() == 101 * 64  # still used: not offloaded
    assert len(list(tmp_path.iterdir())) == 1
    twin = copy.deepcopy(model)  # a copy gets its own file
    assert len(list(tmp_path.iterdir())) == 2
    quantized = model(ids).logits
    handle.unpatch()
    assert torch.equal(model(ids).logits, base) and len(list(tmp_path.iterdir())) == 1
    assert torch.equal(twin(ids).logits, quantized)
    twin._effllm_patch_handle.unpatch()
    assert torch.equal(twin(ids).logits, base) and not list(tmp_path.iterdir())


def test_quant_originals_must_be_disk_or_memory():
    from effllm.quant import Int8WeightOnly

    model = _tiny("llama")
    with pytest.raises(ValueError, match="quant_originals must be one of"):
        effllm.patch(model, quant=Int8WeightOnly(), quant_originals="gpu")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_bad_backend_name_changes_nothing():
    model = _tiny("llama")
    with pytest.raises(ValueError, match="backend must be one of"):
        effllm.patch(model, attention="fast")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        effllm.patch("model", attention=True)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))
        self.norm = type("MyRMSNorm", (nn.Module,), {})()


def test_non_hf_model_is_reported_or_rejected_when_strict():
    model = nn.Sequential(_Block(), _Block())
    handle = effllm.patch(model, attention=True)
    report = handle.report()
    assert "attention  skipped" in report and "not a transformers PreTrainedModel" in report
    assert "structural" in report
    handle.unpatch()
    with pytest.raises(ValueError, match="cannot patch Sequential"):
        effllm.patch(model, attention=True, strict=True)
    assert not hasattr(model, "_effllm_patch_handle")


def test_structural_layout_finds_modules():
    layout = find_layout(nn.Sequential(_Block(), _Block()))
    assert layout.source == "structural"
    assert layout.attention == ["0", "1"]


def test_spec_layout_on_llama():
    layout = find_layout(_tiny("llama"))
    assert layout.source == "spec"
    assert layout.attention == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert layout.summary() == "llama (spec): 2 attention modules"


def test_context_manager_unpatches_on_error():
    model = _tiny("llama")
    with pytest.raises(KeyError):
        with effllm.patched(model, attention=True):
            raise KeyError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_failure_while_applying_rolls_back(monkeypatch):
    model = _tiny("llama")

    def explode(self, impl, *a, **k):
        raise RuntimeError("set_attn_implementation failed")

    monkeypatch.setattr(type(model), "set_attn_implementation", explode)
    with pytest.raises(RuntimeError, match="set_attn_implementation failed"):
        effllm.patch(model, attention=True)
    monkeypatch.undo()
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_effllm_patch_handle")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        effllm.patch(model, attention=True).unpatch()


@pytest.mark.parametrize("moe", ["not an Offload", "dense model"])
def test_moe_patch_refuses_before_any_change(moe):
    from effllm.moe import Offload

    model = _tiny("llama")
    error = TypeError if moe == "not an Offload" else ValueError
    with pytest.raises(error):
        effllm.patch(model, attention=True, moe={"cache_experts": 2} if moe == "not an Offload" else Offload())
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_effllm_patch_handle")


@torch.inference_mode()
def test_moe_patch_offloads_exactly_and_unpatches():
    from effllm.moe import Offload

    model = tiny_causal_lm("mixtral")
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits
    implementation = model.config._experts_implementation
    handle = effllm.patch(model, attention=True, moe=Offload(cache_experts=2))
    assert torch.equal(model(ids).logits, expected)
    assert handle.moe.stats()["misses"] > 0 and "moe" in handle.report()
    handle.unpatch()
    assert handle.moe is None and model.config._experts_implementation == implementation
    assert torch.equal(model(ids).logits, expected)


def _greedy(model, ids, n=4):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("features", [dict(attention=True), dict(kv="snapkv"), dict(attention=True, kv="kivi")],
                         ids=["attention", "kv-policy", "kv-quantizer"])
def test_deep_copy_of_a_patched_model_is_independent(features, how):
    import copy
    import io

    def duplicate(model):
        if how == "deepcopy":
            return copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    from effllm.kv import KIVI, SnapKV

    kv = {"snapkv": SnapKV(0.5, window=4), "kivi": KIVI(bits=4, group=16, residual=16)}.get(features.get("kv"))
    features = dict(features, **({"kv": kv} if kv is not None else {}))
    model = _tiny("llama")
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(2))
    handle = effllm.patch(model, **features)
    expected = _greedy(model, ids)
    twin = duplicate(model)
    twin_handle = twin._effllm_patch_handle
    assert twin_handle is not handle and twin_handle.model is twin
    assert torch.equal(_greedy(twin, ids), expected)
    if kv is not None:  # the copy's generate() filled the copy's cache, not the original's
        assert twin_handle.kv.model is twin and twin_handle.kv.last_cache is not handle.kv.last_cache
        assert twin.generate.generate.__self__ is twin
    twin_handle.unpatch()
    assert handle.active and model.config._attn_implementation == ("effllm" if "attention" in features
                                                                   or isinstance(kv, SnapKV) else "sdpa")
    assert ("generate" in vars(model)) == (kv is not None) and "generate" not in vars(twin)
    assert torch.equal(_greedy(model, ids), expected)
    handle.unpatch()
    effllm.patch(twin, **features).unpatch()  # the copy is patchable again


@pytest.mark.parametrize("features", [dict(attention=True), dict(kv="snapkv"), dict(quant="int8")])
def test_a_dropped_patched_model_is_freed(features):
    import gc
    import weakref

    from effllm.kv import SnapKV
    from effllm.quant import Int8WeightOnly

    value = {"snapkv": SnapKV(0.5, window=4), "int8": Int8WeightOnly()}.get(next(iter(features.values())), True)
    model = _tiny("llama")
    effllm.patch(model, **{next(iter(features)): value})
    _greedy(model, torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(0)), n=2)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "a patched model dropped without unpatch() is still referenced"


def test_a_moe_patched_model_refuses_to_be_copied_clearly():
    import copy

    from effllm.moe import Offload

    model = tiny_causal_lm("mixtral")
    with effllm.patched(model, moe=Offload(cache_experts=2)):
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            copy.deepcopy(model)
    copy.deepcopy(model)  # fine once unpatched
