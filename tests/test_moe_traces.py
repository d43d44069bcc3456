"""Routing traces: the shipped JSON-lines traces, the safetensors format, bad files, and recording
routes from tiny transformers MoE models."""

import json
from pathlib import Path

import pytest
import torch

from effllm.moe import RouteRecorder, RoutingTrace, TraceFormatError, find_routers, load_trace

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
OLMOE = DATA / "olmoe_layer0_routes.jsonl"
MIXTRAL = DATA / "mixtral_humaneval_routes.jsonl"
needs_data = pytest.mark.skipif(not OLMOE.is_file() or not MIXTRAL.is_file(),
                                reason=f"the shipped routing traces are not in {DATA}")


def _raw_line(path, lineno):
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if i == lineno:
                return json.loads(line)


@needs_data
def test_olmoe_trace_drops_the_warmup_batch():
    trace = load_trace(OLMOE)
    # the data README: 2,048 vLLM warm-up rows, then 4,471 real ones; top-8 of 64, layer 0 only
    assert (trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts) == (4471, 1, 8, 64)
    assert trace.layers == [0] and trace.meta["dropped_warmup_tokens"] == 2048
    first_real = _raw_line(OLMOE, 1 + 2048 + 1)  # meta line, warm-up rows, then the first real row
    assert trace.experts[0, 0].tolist() == first_real["topk_ids"]
    assert trace.weights[0, 0].tolist() == pytest.approx(first_real["topk_weights"])
    last = _raw_line(OLMOE, 1 + 6519)
    assert trace.experts[-1, 0].tolist() == last["topk_ids"]
    assert load_trace(OLMOE, drop_warmup=False).num_tokens == 6519


@needs_data
def test_mixtral_trace_has_both_requests_and_all_layers():
    trace = load_trace(MIXTRAL)
    assert (trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts) == (333, 32, 2, 8)
    assert trace.requests == ["humaneval/0", "humaneval/1"]
    assert [int((trace.request == i).sum()) for i in range(2)] == [81, 252]  # the README's split
    row = _raw_line(MIXTRAL, 2 + 81)  # first token of the second request
    assert row["request"] == "humaneval/1" and row["token"] == 0
    assert trace.experts[81].tolist() == row["experts"]
    assert trace.weights[81].flatten().tolist() == pytest.approx(sum(row["weights"], []))


@needs_data
def test_safetensors_round_trip(tmp_path):
    trace = load_trace(MIXTRAL)
    back = load_trace(trace.save(tmp_path / "routes.safetensors"))
    assert torch.equal(back.experts, trace.experts) and torch.equal(back.request, trace.request)
    assert back.requests == trace.requests and back.layers == trace.layers and back.num_experts == 8
    assert back.meta["model"] == trace.meta["model"]
    # weights are stored as float16: equal to half precision
    torch.testing.assert_close(back.weights, trace.weights.half().float(), rtol=0, atol=0)
    # ids 1 B and weights 2 B per route, 4 B of request index per token, a header
    assert (tmp_path / "routes.safetensors").stat().st_size < 333 * 32 * 2 * 3 + 333 * 4 + 2048


def test_wide_expert_ids_round_trip(tmp_path):
    experts = torch.tensor([[[299, 3]], [[0, 298]]])
    trace = RoutingTrace(experts, 300, requests=["a"])
    back = load_trace(trace.save(tmp_path / "t.safetensors"))
    assert torch.equal(back.experts, experts) and back.weights is None


def _write(tmp_path, lines, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


ROUTE = {"type": "route", "req_id": "r0", "token_idx": 0, "layer": 0, "topk_ids": [1, 2], "topk_weights": [0.6, 0.4]}


@pytest.mark.parametrize("lines, line, message", [
    ([{"type": "meta"}, ROUTE, "{not json"], 3, "not valid JSON"),
    ([ROUTE, {**ROUTE, "token_idx": 1, "topk_ids": [1, "x"]}], 2, "topk_ids must be a list of integers"),
    ([ROUTE, {"request": "a", "experts": [[1, 2]]}], 2, "per-token row in a per-(token, layer)"),
    ([ROUTE, {"hello": 1}], 2, "needs 'topk_ids'"),
    ([ROUTE, {**ROUTE, "token_idx": 1, "topk_weights": [1.0]}], 2, "2 topk_ids but 1 topk_weights"),
    ([{"experts": [[1, 2], [3, 4]]}, {"experts": [[1, 2]]}], 2, "expected 2 layers of 2 expert ids"),
    ([{"type": "meta", "num_experts": 4}, {"experts": [[1, 2]]}, {"experts": [[1, 9]]}], 3, "outside [0, num_experts=4)"),
    ([ROUTE, {**ROUTE, "layer": 0}], 2, "has layer 0 twice"),
    ([ROUTE, {**ROUTE, "layer": 1}, {**ROUTE, "token_idx": 1}], 3, "has layers [0]"),
    ([[1, 2]], 1, "expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, line, message):
    path = _write(tmp_path, lines)
    with pytest.raises(TraceFormatError) as info:
        load_trace(path)
    assert f"{path}:{line}" in str(info.value) and message in str(info.value)


def test_not_a_trace(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_trace(tmp_path / "nope.jsonl")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(TraceFormatError, match="junk.bin"):
        load_trace(junk)
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(TraceFormatError, match="not an effllm routing trace"):
        load_trace(other)
    with pytest.raises(TraceFormatError, match="only warm-up|no route rows"):
        load_trace(_write(tmp_path, [{**ROUTE, "topk_weights": [0.5, 0.5]}]))


def test_trace_checks_its_tensors():
    with pytest.raises(ValueError, match="num_experts=4"):
        RoutingTrace(torch.tensor([[[1, 4]]]), 4)
    with pytest.raises(ValueError, match=r"integer tensor \[tokens, layers, top_k\]"):
        RoutingTrace(torch.zeros(2, 2), 4)


# -- recording ---------------------------------------------------------------------------------------------------


def _tiny_moe(kind, seed=0, **extra):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    common = dict(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    if kind == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=16, num_experts=8, num_experts_per_tok=2, **common, **extra)
        return transformers.OlmoeForCausalLM(cfg).eval()
    if kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                          num_experts=8, num_experts_per_tok=2, **common, **extra)
        return transformers.Qwen2MoeForCausalLM(cfg).eval()
    raise AssertionError(kind)


def test_recorder_matches_router_logits_and_removes_hooks():
    model = _tiny_moe("olmoe")
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(1))
    routers = find_routers(model)
    assert [i for i, _ in routers] == [0, 1, 2]
    with torch.no_grad():
        logits = model(ids, output_router_logits=True).router_logits
        hooks = [dict(r._forward_hooks) for _, r in routers]
        with RouteRecorder(model, request="q1") as rec:
            assert all(len(r._forward_hooks) == len(h) + 1 for (_, r), h in zip(routers, hooks))
            model.generate(ids, max_new_tokens=3, do_sample=False)
    assert [dict(r._forward_hooks) for _, r in routers] == hooks
    trace = rec.trace()
    assert (trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts) == (7 + 2, 3, 2, 8)
    assert trace.requests == ["q1"]
    for layer in range(3):
        probs = logits[layer].float().softmax(-1)
        expect = probs.topk(2, dim=-1)
        assert torch.equal(trace.experts[:7, layer].sort(-1).values, expect.indices.sort(-1).values)
        # OLMoE keeps the softmax probabilities of the top-k (norm_topk_prob=False)
        torch.testing.assert_close(trace.weights[:7, layer].sort(-1).values, expect.values.sort(-1).values)


def test_recorder_skips_dense_layers_and_labels_requests():
    model = _tiny_moe("qwen2_moe", mlp_only_layers=[1])
    assert [i for i, _ in find_routers(model)] == [0, 2]
    with RouteRecorder(model) as rec, torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
        rec.new_request("second")
        model(torch.tensor([[4, 5], [6, 7]]))
    trace = rec.trace()
    assert trace.layers == [0, 2] and trace.num_tokens == 3 + 4
    assert trace.request.tolist() == [0, 0, 0, 1, 1, 1, 1] and trace.requests == ["0", "second"]


def test_recorder_rejects_dense_models():
    from effllm.testing.models import tiny_causal_lm

    with pytest.raises(ValueError, match="no MoE layer found"):
        RouteRecorder(tiny_causal_lm("llama", 0))
