"""moefy: a dense gated-MLP model turned into a transformers-layout MoE whose routing comes from
its own activations; exact for the channels of the chosen experts; offloadable and recordable."""

import copy

import pytest
import torch

from effllm.moe import RouteRecorder, offload_experts
from effllm.moe.moefy import moefy
from effllm.testing.models import tiny_causal_lm

pytest.importorskip("transformers")

IDS = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(0))


def _dense():
    return tiny_causal_lm("llama", 0)


def _route(mlp, block, route_by):
    """Five random tokens through a moefied block: ``(x, gate output, |channel activation|, block output)``."""
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        routed = block.gate(x)
        channel = mlp.act_fn(mlp.gate_proj(x))
        channel = (channel * mlp.up_proj(x) if route_by == "gate_up" else channel).abs()
        out = block(x[None])[0]
    return x, routed, channel, out


@pytest.mark.parametrize("route_by", ["gate", "gate_up"])
def test_every_expert_selected_gives_the_dense_model_back(route_by):
    dense = _dense()
    with torch.no_grad():
        reference = dense(IDS).logits
        moe = moefy(copy.deepcopy(dense), IDS, num_experts=8, top_k=8, route_by=route_by)
        torch.testing.assert_close(moe(IDS).logits, reference)  # only the order of the channel sum differs


@pytest.mark.parametrize("route_by", ["gate", "gate_up"])
def test_selected_experts_are_exact_for_their_channels(route_by):
    dense = _dense()
    moe = moefy(copy.deepcopy(dense), IDS, num_experts=8, top_k=2, route_by=route_by)
    mlp, block = dense.model.layers[1].mlp, moe.model.layers[1].mlp
    x, (scores, weights, index), channel, out = _route(mlp, block, route_by)
    assert torch.equal(weights, torch.ones_like(weights))
    # the experts' channels partition the MLP's: find each expert's channels from its gate rows
    rows = block.experts.gate_up_proj[:, :16]  # [experts, channels, hidden]: gate rows
    owner = {}
    for e in range(8):
        for r in rows[e]:
            owner[int(torch.nonzero((mlp.gate_proj.weight == r).all(1))[0])] = e
    assert sorted(owner) == list(range(128))
    for t in range(5):
        # the router's score sums |act(gate)| (or |act(gate) * up|) over the expert's channels; the top 2 win
        expect = torch.zeros(8).index_add_(0, torch.tensor([owner[c] for c in range(128)]), channel[t])
        torch.testing.assert_close(scores[t], expect)
        chosen = set(index[t].tolist())
        assert chosen == set(torch.topk(expect, 2).indices.tolist())
        keep = torch.tensor([owner[c] in chosen for c in range(128)], dtype=x.dtype)
        with torch.no_grad():
            hidden = mlp.act_fn(mlp.gate_proj(x[t])) * mlp.up_proj(x[t]) * keep
            torch.testing.assert_close(out[t], mlp.down_proj(hidden))


def test_experts_are_balanced():
    moe = moefy(_dense(), IDS, num_experts=8, top_k=2)
    for layer in moe.model.layers:
        assert layer.mlp.experts.gate_up_proj.shape == (8, 32, 64)
        assert layer.mlp.experts.down_proj.shape == (8, 64, 16)


def test_a_moefied_model_records_and_offloads():
    moe = moefy(_dense(), IDS, num_experts=8, top_k=2)
    with torch.no_grad():
        reference = moe(IDS).logits
    with RouteRecorder(moe) as rec, torch.no_grad():
        moe(IDS[:1])
    trace = rec.trace()
    assert (trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts) == (40, 2, 2, 8)
    with offload_experts(moe, store="disk", cache_experts=2, prefetch="cross_layer_gate"), torch.no_grad():
        assert torch.equal(moe(IDS).logits, reference)


def _owners(dense, block, experts, shared):
    """Channel -> expert id (or "shared"), found by matching each expert's gate rows to the MLP's."""
    mlp, owner = dense.model.layers[1].mlp, {}
    per_expert = block.experts.gate_up_proj.shape[1] // 2
    for e in range(experts):
        for r in block.experts.gate_up_proj[e, :per_expert]:
            owner[int(torch.nonzero((mlp.gate_proj.weight == r).all(1))[0])] = e
    for r in block.shared_expert.gate_proj.weight:
        c = int(torch.nonzero((mlp.gate_proj.weight == r).all(1))[0])
        assert c not in owner, "a channel both shared and routed"
        owner[c] = "shared"
    assert sorted(owner) == list(range(128)), "the shared and routed channels must partition the MLP's"
    assert sum(v == "shared" for v in owner.values()) == shared
    return owner


def test_every_expert_selected_with_a_shared_expert_gives_the_dense_model_back():
    dense = _dense()
    with torch.no_grad():
        reference = dense(IDS).logits
        moe = moefy(copy.deepcopy(dense), IDS, num_experts=8, top_k=8, shared_channels=32)
        torch.testing.assert_close(moe(IDS).logits, reference)


@pytest.mark.parametrize("route_by", ["gate", "gate_up"])
def test_shared_expert_plus_selected_experts_are_exact_for_their_channels(route_by):
    dense = _dense()
    moe = moefy(copy.deepcopy(dense), IDS, num_experts=8, top_k=2, shared_channels=48, route_by=route_by)
    mlp, block = dense.model.layers[1].mlp, moe.model.layers[1].mlp
    assert block.experts.gate_up_proj.shape == (8, 20, 64)  # (128 - 48) / 8 = 10 channels per expert
    owner = _owners(dense, block, 8, 48)
    x, (scores, _, index), channel, out = _route(mlp, block, route_by)
    routed = [c for c in range(128) if owner[c] != "shared"]
    for t in range(5):
        # the router scores only the routed channels
        expect = torch.zeros(8).index_add_(0, torch.tensor([owner[c] for c in routed]), channel[t, routed])
        torch.testing.assert_close(scores[t], expect)
        chosen = set(index[t].tolist())
        assert chosen == set(torch.topk(expect, 2).indices.tolist())
        keep = torch.tensor([owner[c] == "shared" or owner[c] in chosen for c in range(128)], dtype=x.dtype)
        with torch.no_grad():
            hidden = mlp.act_fn(mlp.gate_proj(x[t])) * mlp.up_proj(x[t]) * keep
            torch.testing.assert_close(out[t], mlp.down_proj(hidden))


def test_the_shared_expert_takes_the_channels_most_often_strong():
    dense = _dense()
    strong = [3, 50, 77, 101]
    with torch.no_grad():
        for layer in dense.model.layers:
            layer.mlp.up_proj.weight[strong] *= 50  # these channels dominate every token
    moe = moefy(copy.deepcopy(dense), IDS, num_experts=8, top_k=2, shared_channels=8)
    for layer in range(2):
        block = moe.model.layers[layer].mlp
        mlp = dense.model.layers[layer].mlp
        shared = {int(torch.nonzero((mlp.gate_proj.weight == r).all(1))[0]) for r in block.shared_expert.gate_proj.weight}
        assert set(strong) <= shared


def test_offloading_keeps_the_shared_expert_resident_and_exact():
    moe = moefy(_dense(), IDS, num_experts=8, top_k=2, shared_channels=32)
    with torch.no_grad():
        reference = moe(IDS).logits
    shared = moe.model.layers[0].mlp.shared_expert.gate_proj.weight
    with offload_experts(moe, store="disk", cache_experts=2, prefetch="trace_match") as handle, torch.no_grad():
        assert moe.model.layers[0].mlp.experts.gate_up_proj.numel() == 0
        assert shared.numel() == 32 * 64
        assert torch.equal(moe(IDS).logits, reference)
        assert handle.stats()["cached_experts"] <= 2 * 2


def test_bad_settings():
    with pytest.raises(ValueError, match="not a multiple of num_experts=7"):
        moefy(_dense(), IDS, num_experts=7)
    with pytest.raises(ValueError, match="top_k must be in"):
        moefy(_dense(), IDS, num_experts=8, top_k=9)
    with pytest.raises(ValueError, match="route_by must be"):
        moefy(_dense(), IDS, route_by="up")
    with pytest.raises(ValueError, match="shared_channels must be in"):
        moefy(_dense(), IDS, num_experts=8, shared_channels=128)
    with pytest.raises(ValueError, match="less shared_channels=12 is not a multiple of num_experts=8"):
        moefy(_dense(), IDS, num_experts=8, shared_channels=12)
