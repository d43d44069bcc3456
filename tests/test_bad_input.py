"""Bad input at every public entry point: a ValueError/TypeError that names the argument, and no
change to the inputs, model, cache or file. hypothesis draws one corruption of a valid call at a
time (wrong dtype, rank, shape, device; non-finite, boolean and out-of-range scalars)."""

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import effllm
from effllm.kv import CAKE, H2O, KIVI, SnapKV, StreamingLLM
from effllm.quant import Fp8, Int4WeightOnly, Int8WeightOnly, quantize_

BAD_SCALARS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, True, False, "1", None]


def _snapshot(*tensors):
    return [t.clone() for t in tensors]


def _unchanged(tensors, before):
    return all(torch.equal(t, b) for t, b in zip(tensors, before))


# ---- kernels ---------------------------------------------------------------------------------

ATTENTION_CORRUPTIONS = {
    "q dtype": lambda a: a.update(q=a["q"].to(torch.int32)) or "q",
    "k dtype": lambda a: a.update(k=a["k"].double()) or "k",
    "v rank": lambda a: a.update(v=a["v"][0]) or "v",
    "q rank": lambda a: a.update(q=a["q"].unsqueeze(0)) or "q",
    "k head_dim": lambda a: a.update(k=torch.randn(*a["k"].shape[:-1], a["k"].shape[-1] + 1)) or "k",
    "v length": lambda a: a.update(v=a["v"][:, :-1]) or "v",
    "k batch": lambda a: a.update(k=torch.cat([a["k"], a["k"]])) or "k",
    "kv heads not dividing": lambda a: a.update(k=a["k"][:, :, :1].expand(-1, -1, 3, -1).contiguous(),
                                                v=a["v"][:, :, :1].expand(-1, -1, 3, -1).contiguous()) or "head",
    "q not a tensor": lambda a: a.update(q=a["q"].tolist()) or "q",
    "zero head_dim": lambda a: a.update(q=a["q"][..., :0], k=a["k"][..., :0], v=a["v"][..., :0]) or "head_dim",
}


@given(corruption=st.sampled_from(sorted(ATTENTION_CORRUPTIONS)), batch=st.integers(1, 2), seq=st.integers(1, 9),
       dim=st.sampled_from([8, 16]), causal=st.booleans())
def test_attention_bad_tensors(corruption, batch, seq, dim, causal):
    args = dict(q=torch.randn(batch, seq, 4, dim), k=torch.randn(batch, seq, 2, dim), v=torch.randn(batch, seq, 2, dim))
    name = ATTENTION_CORRUPTIONS[corruption](args)
    tensors = [t for t in args.values() if isinstance(t, torch.Tensor)]
    before = _snapshot(*tensors)
    with pytest.raises((ValueError, TypeError), match=name):
        effllm.kernels.attention(args["q"], args["k"], args["v"], causal=causal)
    assert _unchanged(tensors, before)


@given(name=st.sampled_from(["scale", "softcap", "window"]), value=st.sampled_from(BAD_SCALARS + [(1,), (1, 2, 3),
                                                                                                  -2, 1.5]))
def test_attention_bad_scalars(name, value):
    if value is None or (name != "window" and value == 1.5):
        return  # None is the default; 1.5 is a fine scale or softcap (but no window width)
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises((ValueError, TypeError), match=name):
        effllm.kernels.attention(q, q, q, causal=True, **{name: value})


@given(value=st.sampled_from([True, 0, 7, -1, 2.0, "3", torch.tensor([3, 3]), torch.tensor([3.0]),
                              torch.tensor([9], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)]))
def test_decode_bad_cache_seqlens(value):
    q, cache = torch.randn(1, 1, 2, 8), torch.randn(1, 6, 2, 8)
    before = _snapshot(q, cache)
    with pytest.raises((ValueError, TypeError), match="cache_seqlens"):
        effllm.kernels.decode_attention(q, cache, cache, value)
    assert _unchanged([q, cache], before)


@given(table=st.sampled_from(["float", "rank", "page out of range", "negative page", "rows"]))
def test_decode_bad_block_table(table):
    q, pool = torch.randn(2, 1, 2, 8), torch.randn(4, 4, 2, 8)
    block_table = {
        "float": torch.zeros(2, 2),
        "rank": torch.zeros(2, dtype=torch.int32),
        "page out of range": torch.tensor([[0, 1], [2, 9]], dtype=torch.int32),
        "negative page": torch.tensor([[0, 1], [-1, 2]], dtype=torch.int32),
        "rows": torch.zeros(3, 2, dtype=torch.int32),
    }[table]
    with pytest.raises((ValueError, TypeError), match="block_table"):
        effllm.kernels.decode_attention(q, pool, pool, torch.tensor([5, 6], dtype=torch.int32), block_table=block_table)


# ---- quantization ----------------------------------------------------------------------------

@given(config=st.sampled_from(["int4", None, 4, Int4WeightOnly, nn.Linear(2, 2), {"default": Int8WeightOnly()}]))
def test_quantize_bad_config_changes_nothing(config):
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises((ValueError, TypeError), match="config"):
        quantize_(net, config)
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@given(in_features=st.integers(1, 200), group=st.sampled_from([32, 64, 128]))
def test_quantize_int4_shapes_refused_before_any_change(in_features, group):
    net = nn.Sequential(nn.Linear(in_features, 32), nn.Linear(32, 32))
    if in_features % group == 0 and 32 % group == 0:
        return
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="nothing was changed"):
        quantize_(net, Int4WeightOnly(group))
    assert all(type(m) in (nn.Linear, nn.Sequential) for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@given(field=st.sampled_from(["group_size", "weights", "activations"]), value=st.sampled_from([0, 33, "row ", None,
                                                                                                1.5, True]))
def test_quant_configs_refuse_bad_fields(field, value):
    make = {"group_size": lambda: Int4WeightOnly(group_size=value), "weights": lambda: Fp8(weights=value),
            "activations": lambda: Fp8(activations=value)}[field]
    if field == "activations" and value is None:
        return  # weight-only FP8
    with pytest.raises((ValueError, TypeError), match=field):
        make()


@given(data=st.binary(min_size=0, max_size=64), keep=st.integers(0, 200))
def test_quant_load_of_a_damaged_file_changes_nothing(tmp_path_factory, data, keep):
    folder = tmp_path_factory.mktemp("ckpt")
    model = nn.Sequential(nn.Linear(64, 32))
    quantize_(model, Int8WeightOnly())
    good = folder / "good.safetensors"
    effllm.quant.save(model, good)
    damaged = folder / "damaged.safetensors"
    damaged.write_bytes(good.read_bytes()[:keep] + data)
    target = nn.Sequential(nn.Linear(64, 32))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(Exception) as info:
        effllm.quant.load(target, damaged)
    assert not isinstance(info.value, (AttributeError, KeyError, IndexError, ZeroDivisionError))
    assert type(target[0]) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


# ---- KV policies and caches --------------------------------------------------------------------

@given(policy=st.sampled_from([StreamingLLM, SnapKV, H2O, CAKE]),
       budget=st.sampled_from([0, -3, 0.0, 1.5, float("nan"), float("inf"), True, "0.5", None]))
def test_policies_refuse_bad_budgets(policy, budget):
    with pytest.raises((ValueError, TypeError), match="budget"):
        policy(budget)


@given(field=st.sampled_from(["bits", "group", "residual"]), value=st.sampled_from([0, 3, 2.0, True, -16, "4", 24]))
def test_kivi_refuses_bad_settings(field, value):
    settings = dict(bits=2, group=16, residual=32) | {field: value}
    if field == "residual" and value == 24:
        pass  # not a multiple of group 16: refused
    with pytest.raises((ValueError, TypeError), match=field):
        KIVI(**settings)


# ---- patch -------------------------------------------------------------------------------------

PATCH_CORRUPTIONS = {
    "attention": dict(attention="cuda-please"),
    "attention type": dict(attention=3),
    "quant": dict(quant="int4"),
    "kv": dict(kv="snapkv"),
    "kv object": dict(kv=object()),
    "moe": dict(moe={"cache_experts": 2}),
    "parallel": dict(parallel=object()),
}


@pytest.fixture(scope="module")
def tiny_model():
    from effllm.testing.models import tiny_causal_lm

    return tiny_causal_lm()


@pytest.mark.parametrize("corruption", sorted(PATCH_CORRUPTIONS))
def test_patch_refuses_before_any_change(tiny_model, corruption):
    model = tiny_model
    implementation = model.config._attn_implementation
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        effllm.patch(model, attention=True, **PATCH_CORRUPTIONS[corruption])
    assert corruption.split()[0] in str(info.value)
    assert model.config._attn_implementation == implementation and not hasattr(model, "_effllm_patch_handle")
    assert "generate" not in vars(model) and [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_scalar_table_is_not_trivially_empty():
    # The scalar lists above must hold non-finite and boolean values (the point of the suite).
    assert any(isinstance(v, float) and math.isnan(v) for v in BAD_SCALARS) and True in BAD_SCALARS


# ---- caches and save ---------------------------------------------------------------------------

@given(corruption=st.sampled_from(["head_dim", "dtype", "rank", "batch"]))
def test_quantized_cache_refuses_bad_updates_without_change(corruption):
    from effllm.kv import QuantizedKVCache
    from effllm.testing.models import tiny_causal_lm

    config = tiny_causal_lm().config
    cache = QuantizedKVCache(KIVI(bits=4, group=16, residual=16), config=config)
    good = torch.randn(1, 2, 20, 16)
    cache.update(good, good.clone(), 0)
    bad = {"head_dim": torch.randn(1, 2, 1, 17), "dtype": torch.randn(1, 2, 1, 16).to(torch.int32),
           "rank": torch.randn(2, 1, 16), "batch": torch.randn(3, 2, 1, 16)}[corruption]
    stored = cache.get_seq_length()
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        cache.update(bad, bad.clone(), 0)
    assert cache.get_seq_length() == stored


@given(target=st.sampled_from(["no quantized modules", "a folder"]))
def test_quant_save_refuses_without_writing(tmp_path_factory, target):
    folder = tmp_path_factory.mktemp("save")
    model = nn.Sequential(nn.Linear(64, 32))
    if target == "a folder":
        quantize_(model, Int8WeightOnly())
        path = folder
    else:
        path = folder / "q.safetensors"
    with pytest.raises((ValueError, OSError)):
        effllm.quant.save(model, path)
    assert [p for p in folder.iterdir()] == []
