"""offload_experts on tiny random Mixtral / Qwen2-MoE / OLMoE / DeepSeek-V3 models: outputs equal the resident
model's, the cache bound holds, the disk store really holds no experts, remove() restores the model,
loader errors reach the caller, bad input leaves the model unchanged."""

import gc
import os
import subprocess
import sys
import threading

import pytest
import torch

from effllm.moe import Offload, offload_experts
from effllm.moe.store import DiskStore
from effllm.moe.traces import moe_blocks

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


def _model(kind, seed=0, **extra):
    torch.manual_seed(seed)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
                                         | COMMON | extra)
        return transformers.MixtralForCausalLM(cfg).eval()
    if kind == "qwen2_moe":  # a shared expert and a dense middle layer, which stay resident
        cfg = transformers.Qwen2MoeConfig(**dict(intermediate_size=32, moe_intermediate_size=16,
                                                 shared_expert_intermediate_size=16, num_experts=8,
                                                 num_experts_per_tok=2, mlp_only_layers=[1]) | COMMON | extra)
        return transformers.Qwen2MoeForCausalLM(cfg).eval()
    if kind == "olmoe":
        cfg = transformers.OlmoeConfig(**dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2)
                                       | COMMON | extra)
        return transformers.OlmoeForCausalLM(cfg).eval()
    if kind == "deepseek_v3":  # a dense first layer and a shared expert stay resident; group-limited routing
        cfg = transformers.DeepseekV3Config(**COMMON | dict(
            intermediate_size=32, moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=8,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8) | extra)
        model = transformers.DeepseekV3ForCausalLM(cfg).eval()
        with torch.no_grad():  # a non-zero selection bias, so selection and weights differ as in the real model
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.normal_()
        return model
    small = dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**COMMON | dict(intermediate_size=32, moe_intermediate_size=16, num_experts=8,
                                                          num_experts_per_tok=2, head_dim=8) | extra)
        return transformers.Qwen3MoeForCausalLM(cfg).eval()
    if kind == "granitemoe":  # the block is block_sparse_moe, its router mlp.router-style
        return transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(**COMMON | small | extra)).eval()
    if kind == "phimoe":
        return transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**COMMON | small | extra)).eval()
    if kind == "gpt_oss":  # expert biases, transposed weights
        cfg = transformers.GptOssConfig(**COMMON | small | dict(head_dim=8, layer_types=["full_attention"] * 3) | extra)
        return transformers.GptOssForCausalLM(cfg).eval()
    if kind == "jamba":  # the block is feed_forward
        cfg = transformers.JambaConfig(**COMMON | dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                                       expert_layer_period=1, expert_layer_offset=0, attn_layer_period=1,
                                                       attn_layer_offset=0, use_mamba_kernels=False) | extra)
        return transformers.JambaForCausalLM(cfg).eval()
    raise AssertionError(kind)


IDS = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))


def _run(model):
    with torch.no_grad():
        logits = model(IDS).logits
    generated = model.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    return logits, generated


def _snapshot(model):
    return {name: (p, p.detach().clone()) for name, p in model.named_parameters()}


def _assert_restored(model, snapshot, implementation):
    params = dict(model.named_parameters())
    assert params.keys() == snapshot.keys()
    for name, (param, value) in snapshot.items():
        assert params[name] is param and torch.equal(param, value), name
    assert model.config._experts_implementation == implementation
    experts = [block.experts for _, block, _ in moe_blocks(model)]
    assert experts and all("_effllm_offload" not in e.__dict__ for e in experts)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("store, prefetch, scope", [("cpu", None, "per_layer"), ("disk", "cross_layer_gate", "per_layer"),
                                                    ("cpu", "trace_match", "global"), ("disk", None, "global")])
def test_outputs_equal_the_resident_model(kind, store, prefetch, scope):
    model = _model(kind)
    implementation = model.config._experts_implementation
    reference = _run(model)
    snapshot = _snapshot(model)
    capacity = 2 if scope == "per_layer" else 3
    handle = offload_experts(model, store=store, cache_experts=capacity, scope=scope, prefetch=prefetch)
    # awaited, no prediction is skipped for being late, and the loader stopped before the counts are
    # read: the prefetch counts below do not depend on how the two threads were scheduled
    handle._await_predictions = True
    try:
        assert all(p.numel() == 0 for p in model.model.layers[-1].mlp.experts.parameters())
        logits, generated = _run(model)
        handle._stop_loader()  # queued prefetches count as cancelled, started ones finish
        stats = handle.stats()
    finally:
        handle.remove()
    assert torch.equal(logits, reference[0]) and torch.equal(generated, reference[1])
    n_moe = 2 if kind in ("qwen2_moe", "deepseek_v3") else 3
    bound = capacity * (n_moe if scope == "per_layer" else 1)
    assert stats["peak_cached_experts"] <= bound and stats["cache_bound_experts"] == bound
    assert stats["misses"] > 0 and stats["hits"] + stats["prefetch_hits"] + stats["misses"] == stats["accesses"]
    if prefetch:
        # the predictor ran: predictions reached their layers (its seconds are timings, which
        # benchmarks read) and became prefetch jobs, each either loaded or cancelled
        assert stats["prefetches"] + stats["cancelled_prefetches"] > 0
        # late_predictions counts predictions the forward moved past before they were made; with
        # _await_predictions the forward waits for each one, so 0 here is that guarantee, not a timing
        assert stats["predicted"] + stats["late_predictions"] > 0 and stats["late_predictions"] == 0
    _assert_restored(model, snapshot, implementation)


@pytest.mark.parametrize("kind", ["qwen3_moe", "granitemoe", "phimoe", "gpt_oss", "jamba"])
def test_more_architectures(kind):
    model = _model(kind)
    implementation = model.config._experts_implementation
    reference = _run(model)
    snapshot = _snapshot(model)
    with offload_experts(model, store="disk", cache_experts=2, prefetch="cross_layer_gate") as handle:
        logits, generated = _run(model)
        assert handle.stats()["misses"] > 0
    assert torch.equal(logits, reference[0]) and torch.equal(generated, reference[1])
    _assert_restored(model, snapshot, implementation)


def test_eager_implementation_is_kept_exact():
    model = _model("olmoe")
    model.set_experts_implementation("eager")
    reference = _run(model)
    with offload_experts(model, cache_experts=2, prefetch="cross_layer_gate"):
        assert torch.equal(_run(model)[0], reference[0])
    assert model.config._experts_implementation == "eager"


@pytest.mark.parametrize("store", ["cpu", "disk"])
def test_bfloat16_experts_round_trip_exactly(store):
    model = _model("mixtral").to(torch.bfloat16)
    with torch.no_grad():
        reference = model(IDS).logits
    snapshot, implementation = _snapshot(model), model.config._experts_implementation
    with offload_experts(model, store=store, cache_experts=2, prefetch="trace_match"), torch.no_grad():
        assert torch.equal(model(IDS).logits, reference)
    _assert_restored(model, snapshot, implementation)


def test_decode_stays_within_the_bound_plus_one_prefetch():
    model = _model("mixtral")
    with offload_experts(model, cache_experts=2, prefetch="cross_layer_gate") as handle:
        model.generate(IDS[:1, :1], max_new_tokens=8, do_sample=False, pad_token_id=0)  # one token per step
        stats = handle.stats()
    per_expert = max(handle.store.expert_bytes)
    assert stats["overflow_loads"] == 0
    assert stats["peak_resident_bytes"] <= stats["cache_bound_bytes"] + per_expert
    assert stats["peak_cached_experts"] <= 2 * 3


@pytest.mark.parametrize("store,prefetch", [("cpu", None), ("disk", "cross_layer_gate"), ("disk", "trace_match")])
def test_decode_runs_on_the_cache_slab_without_copying_experts(store, prefetch, monkeypatch):
    """One token per step: the cached experts' slab is the layer's table (no stacked copy), whatever
    slots the experts landed in, and the tokens equal the resident model's."""
    model = _model("mixtral", seed=3)
    prompt = IDS[:1, :4]
    reference = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with offload_experts(model, store=store, cache_experts=4, prefetch=prefetch):
        with torch.no_grad():
            model(prompt)  # the prompt's layer tables may be stacked copies (several tokens)
        stacks = []
        real_stack = torch.stack
        monkeypatch.setattr(torch, "stack", lambda *a, **k: stacks.append(1) or real_stack(*a, **k))
        out = model.generate(prompt[:, -1:], max_new_tokens=1, do_sample=False, pad_token_id=0)
        monkeypatch.setattr(torch, "stack", real_stack)
        assert not stacks, "a one-token step stacked a copy of its experts"
        assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0), reference)
    del out


def test_cross_layer_gate_predicts_exactly_when_the_residual_stream_is_still():
    # zero attention outputs and expert outputs: every layer's router sees the same hidden state,
    # so layer l+1's router applied at layer l picks exactly what layer l+1 then uses (the routers
    # differ per layer, so using the wrong layer's router would miss)
    model = _model("olmoe", seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
    routes = []
    with torch.no_grad():
        for layer in model.model.layers:
            routes.append(layer.mlp.gate(torch.randn(16, 32))[2].sort(-1).values)
    assert not torch.equal(routes[0], routes[1])
    with offload_experts(model, cache_experts=4, prefetch="cross_layer_gate") as handle, torch.no_grad():
        handle._await_predictions = True  # no prediction skipped for being late: deterministic counts
        model(IDS[:1, :1])
        handle._wait_for_predictions(handle._event + 1)  # the first step's last one (by frequency) too
        handle.reset_stats()
        model(IDS[:1, 1:2])
        stats = handle.stats()
    # layers 1 and 2 come from the gate; the next step's layer 0 from frequency (not asked here)
    assert stats["predicted"] >= 4 and stats["prediction_precision"] == 1.0


@pytest.mark.parametrize("prefetch", ["cross_layer_gate", "trace_match"])
def test_predictions_are_made_in_the_loader_thread(prefetch, monkeypatch):
    """The forward only hands predictions over; the predictor (the next layers' routers for
    cross_layer_gate, the matcher for trace_match) runs in the loader thread. Awaited, every layer's
    prediction is made before that layer runs; not awaited (the default), a late one is skipped and
    counted, and every prediction is either used in the precision figures or counted late."""
    from effllm.moe import offload as offload_module

    model = _model("mixtral")
    threads = []
    real = offload_module.OffloadHandle._predict
    monkeypatch.setattr(offload_module.OffloadHandle, "_predict",
                        lambda self, request: threads.append(threading.current_thread().name) or real(self, request))
    for awaited in (True, False):
        threads.clear()
        with offload_experts(model, cache_experts=2, prefetch=prefetch) as handle, torch.no_grad():
            handle._await_predictions = awaited
            for i in range(4):
                model(IDS[:1, i:i + 1])
            handle._stop_loader()  # every request handled: the counts below are final
            stats = handle.stats()
        assert set(threads) <= {"effllm-moe-prefetch"} and (threads or not awaited)
        # one request per MoE layer call; the last one (aimed at a next step that never comes, so
        # never awaited) and, not awaited, any still queued may be dropped when the loader stops
        assert len(threads) <= 4 * 3 and (len(threads) >= 4 * 3 - 1 or not awaited)
        # each layer call after the first is the target of one prediction: made in time (its
        # experts, 2 a token, enter the precision figures) or counted late
        in_time = stats["used_after_prediction"] // 2
        if awaited:
            assert in_time == 4 * 3 - 1 and stats["late_predictions"] == 0
        else:
            assert in_time + stats["late_predictions"] <= 4 * 3 - 1
        # the predictor's times are reported (their values are timings: benchmarks read them)
        assert all(isinstance(stats[k], float) for k in ("predictor_cpu_s", "predictor_forward_s", "predictor_wait_s"))


def test_disk_store_reads_an_expert_straight_into_a_slot(tmp_path):
    model = _model("mixtral")
    handle = offload_experts(model, store="disk", path=tmp_path / "e.safetensors", cache_experts=2)
    try:
        store = handle.store
        for column, expert in [(0, 0), (2, 7), (1, 3)]:
            want = store.load(column, expert)
            out = tuple(torch.full_like(t, float("nan")) for t in want)
            got = store.load(column, expert, out)
            assert got is out and all(torch.equal(a, b) for a, b in zip(out, want))
        assert len(store.spans) == 3 * 8  # one read per expert
    finally:
        handle.remove()


def test_disk_store_reads_experts_one_at_a_time(tmp_path):
    # Resident memory says something only in a fresh process: after a long test run, the heap
    # keeps freed pages (glibc does not return them), so the check runs in a child pytest.
    if os.environ.get("EFFLLM_RSS_CHILD") != "1":
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                f"{__file__}::test_disk_store_reads_experts_one_at_a_time"],
                               env=dict(os.environ, EFFLLM_RSS_CHILD="1"), capture_output=True, text=True)
        assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
        return
    big = dict(hidden_size=256, num_hidden_layers=2)
    model = _model("mixtral", intermediate_size=512, **big)
    expert_bytes = sum(p.numel() * p.element_size() for layer in model.model.layers
                       for p in layer.mlp.experts.parameters())
    gc.collect()
    before = _rss()
    handle = offload_experts(model, store="disk", path=tmp_path / "experts.safetensors", cache_experts=2)
    gc.collect()
    after = _rss()
    try:
        assert (tmp_path / "experts.safetensors").stat().st_size >= expert_bytes
        assert before - after > 0.6 * expert_bytes, (before, after, expert_bytes)
        loads = []
        original = handle.store.load
        handle.store.load = lambda c, e, out=None: loads.append((c, e)) or original(c, e, out)
        with torch.no_grad():
            model(IDS[:1, :1])
        assert len(loads) == len(set(loads)) == 2 * 2  # two experts per layer, each read once
        assert handle.stats()["cached_experts"] == 4
    finally:
        handle.remove()
    assert (tmp_path / "experts.safetensors").exists()  # a path the caller gave is theirs


def _direct_io_or_skip(directory):
    from effllm.moe.store import direct_io_unsupported

    why = direct_io_unsupported(directory)
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("prefetch", [None, "trace_match", "cross_layer_gate"])
def test_direct_io_outputs_equal_the_resident_model(tmp_path, prefetch):
    _direct_io_or_skip(tmp_path)
    model = _model("mixtral")
    reference = _run(model)
    with offload_experts(model, store="disk", path=tmp_path / "e.safetensors", cache_experts=2, prefetch=prefetch,
                         direct_io=True) as handle:
        assert handle.store.direct and handle.store.direct_fd is not None
        buffered = []  # reads through an expert-sized buffer (a slot that is not aligned)
        original = handle.store._read_direct
        handle.store._read_direct = lambda *args: buffered.append(args) or original(*args)
        logits, generated = _run(model)
        stats = handle.stats()
        assert stats["misses"] > 0 and not buffered  # every read, prefetches too, landed in its slot
        # what is buffered: the partial last block of each tensor, per reading thread
        assert 0 < stats["read_buffer_bytes"] <= 2 * len(handle.store.names) * 4096
    assert torch.equal(logits, reference[0]) and torch.equal(generated, reference[1])


def test_an_aligned_expert_file_is_read_straight_into_aligned_slots(tmp_path):
    _direct_io_or_skip(tmp_path)
    from safetensors.torch import load_file

    from effllm.moe.store import slab

    # 24 x 40 floats an expert matrix (3840 bytes): unaligned sizes, so slots and the file are padded
    gen = torch.Generator().manual_seed(0)
    fused = (torch.randn(5, 48, 40, generator=gen), torch.randn(5, 40, 24, generator=gen).half())
    names, path = ("gate_up_proj", "down_proj"), tmp_path / "e.safetensors"
    DiskStore.write(path, names, [fused], align=4096)
    on_disk = load_file(path)  # still a normal safetensors file; the gaps are __pad__ entries
    assert all(torch.equal(on_disk[f"moe.0.experts.{e}.{n}"], t[e]) for e in range(5) for n, t in zip(names, fused))
    store = DiskStore(path, names, [5], direct=True)
    try:
        assert store.slot_alignment == 4096 and len(store.aligned) == 5
        slabs = tuple(slab(3, t.shape[1:], t.dtype, 4096).fill_(float("nan")) for t in fused)
        assert all(s.data_ptr() % 4096 == 0 and s.stride(0) * s.element_size() % 4096 == 0 for s in slabs)
        for expert, slot in [(4, 1), (0, 0), (2, 2)]:
            out = tuple(s[slot] for s in slabs)
            assert store.load(0, expert, out) is out
            assert all(torch.equal(a, t[expert]) for a, t in zip(out, fused))
        assert all(torch.equal(s[1], t[4]) for s, t in zip(slabs, fused))  # neighbours' reads left it whole
        assert store.buffer_bytes() == 2 * 4096  # the tensors' partial last blocks went through a block each
        # an aligned tensor with no room after it (the first row of a plain stack): nothing past its end
        # is written
        stacks = tuple(slab(1, (2, *t.shape[1:]), t.dtype, 4096)[0].fill_(float("nan")) for t in fused)
        assert all(torch.equal(a, t[2]) for a, t in zip(store.load(0, 2, tuple(s[0] for s in stacks)), fused))
        assert all(s[1].isnan().all() for s in stacks)
        # a tensor that is not aligned goes through a buffer as large as it, to the same bytes
        shifted = tuple(torch.empty(t[0].numel() + 1, dtype=t.dtype)[1:].view(t.shape[1:]) for t in fused)
        buffered, original = [], store._read_direct
        store._read_direct = lambda *args: buffered.append(args[1]) or original(*args)
        assert all(torch.equal(a, t[3]) for a, t in zip(store.load(0, 3, shifted), fused))
        assert sorted(buffered) == sorted(t[0].numel() * t.element_size() for t in fused)
        with pytest.raises(ValueError, match=r"out must be 2 contiguous CPU tensors of .*\(48, 40\)"):
            store.load(0, 3, (shifted[1], shifted[0]))
        # truncated under the open store: the in-place read names the expert
        with open(path, "r+b") as f:
            f.truncate(store.aligned[0, 4] + 8)
        with pytest.raises(OSError, match="short read of expert 4 of MoE layer 0.*truncated"):
            store.load(0, 4, tuple(s[0] for s in slabs))
    finally:
        store.close()


def test_direct_io_reads_unaligned_experts_and_bypasses_the_page_cache(tmp_path):
    _direct_io_or_skip(tmp_path)
    # 24 x 40 floats an expert matrix: experts start at offsets that are not multiples of 4096
    model = _model("mixtral", hidden_size=40, intermediate_size=24, num_attention_heads=4)
    path = tmp_path / "e.safetensors"
    with offload_experts(model, store="disk", path=path, cache_experts=2) as buffered:
        wants = {(c, e): buffered.store.load(c, e) for c in range(3) for e in range(8)}
    assert any(span[0] % 4096 for span in buffered.store.spans.values())
    from effllm.bench.cases.moe import cached_fraction, drop_page_cache

    store = DiskStore(path, buffered.store.names, [8, 8, 8], direct=True)
    try:
        drop_page_cache([path])
        cached_before = cached_fraction([path])
        for (column, expert), want in wants.items():
            out = tuple(torch.full_like(t, float("nan")) for t in want)
            assert store.load(column, expert, out) is out and all(torch.equal(a, b) for a, b in zip(out, want))
            assert all(torch.equal(a, b) for a, b in zip(store.load(column, expert), want))
        if cached_before == 0:  # the OS honoured the drop: the direct reads brought no page back
            assert cached_fraction([path]) == 0
    finally:
        store.close()
    # a file truncated under an open store: the short read is named
    store = DiskStore(path, buffered.store.names, [8, 8, 8], direct=True)
    try:
        column, expert = max(store.spans, key=store.spans.get)
        with open(path, "r+b") as f:
            f.truncate(store.spans[column, expert][0] + 8)
        with pytest.raises(OSError, match=f"short read of expert {expert} of MoE layer {column}.*truncated"):
            store.load(column, expert)
    finally:
        store.close()


def test_direct_io_bad_input_leaves_the_model_unchanged(tmp_path, monkeypatch):
    model = _model("olmoe")
    snapshot, implementation = _snapshot(model), model.config._experts_implementation
    with pytest.raises(ValueError, match="direct_io is for store='disk'"):
        offload_experts(model, store="cpu", direct_io=True)
    with pytest.raises(ValueError, match="direct_io must be a bool"):
        offload_experts(model, store="disk", direct_io="yes")
    import effllm.moe.offload as offload_module

    monkeypatch.setattr(offload_module, "direct_io_unsupported", lambda d: f"the file system of {str(d)!r} refuses it")
    with pytest.raises(ValueError, match="direct_io=True, but the file system of .* refuses it"):
        offload_experts(model, store="disk", path=tmp_path / "e.safetensors", direct_io=True)
    assert not (tmp_path / "e.safetensors").exists()
    _assert_restored(model, snapshot, implementation)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status")


def test_missing_or_truncated_expert_file(tmp_path):
    model = _model("olmoe")
    path = tmp_path / "e.safetensors"
    handle = offload_experts(model, store="disk", path=path, cache_experts=2)
    handle.remove()
    names = handle.store.names
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"e\.safetensors: truncated safetensors file"):
        DiskStore(path, names, [8, 8, 8])
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        DiskStore(tmp_path / "nowhere.safetensors", names, [8, 8, 8])
    path.write_bytes(data)
    with pytest.raises(ValueError, match="no entry 'moe.3.experts.0"):
        DiskStore(path, names, [8, 8, 8, 8])


def test_an_on_demand_load_error_reaches_the_caller():
    model = _model("olmoe")
    with offload_experts(model, cache_experts=2) as handle:
        def broken(column, expert, out=None):
            raise OSError(f"cannot read expert {expert} of column {column}")
        handle.store.load = broken
        with pytest.raises(OSError, match="cannot read expert"), torch.no_grad():
            model(IDS[:1, :3])
        assert not handle._protected  # nothing left pinned after the failure


def test_a_failed_remove_changes_nothing_and_can_be_retried():
    model = _model("olmoe")
    want, snapshot = _run(model), _snapshot(model)
    implementation = model.config._experts_implementation
    handle = offload_experts(model, cache_experts=2, prefetch="cross_layer_gate")
    real = handle.store.load_all

    def broken(column):
        raise OSError(f"cannot read column {column}")

    handle.store.load_all = broken
    with pytest.raises(OSError, match="cannot read column"):
        handle.remove()
    got = _run(model)  # still offloaded and exact (prefetch off, loads on demand)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    handle.store.load_all = real
    handle.remove()
    _assert_restored(model, snapshot, implementation)


def test_a_background_load_error_reaches_the_caller_without_hanging():
    model = _model("mixtral")
    # two layers ahead, so queued prefetches usually start before the forward reaches their layer
    handle = offload_experts(model, cache_experts=2, prefetch="cross_layer_gate", lookahead=2)
    original = handle.store.load

    def fails_in_the_loader(column, expert, out=None):
        if threading.current_thread().name == "effllm-moe-prefetch":
            raise OSError("disk went away")
        return original(column, expert, out)

    handle.store.load = fails_in_the_loader
    errors = []

    def decode():
        try:
            with torch.no_grad():
                for i in range(20):
                    model(IDS[:1, i % 9:i % 9 + 1])
        except RuntimeError as exc:
            errors.append(exc)

    worker = threading.Thread(target=decode)
    worker.start()
    worker.join()  # no time limit: a forward that hangs hangs the test, which the CI job catches
    assert not worker.is_alive(), "the forward hung"
    handle.remove()
    assert errors and "background expert loader failed" in str(errors[0])
    assert isinstance(errors[0].__cause__, OSError) and "disk went away" in str(errors[0].__cause__)
    assert handle._thread is None


def test_bad_input_leaves_the_model_unchanged():
    from effllm.testing.models import tiny_causal_lm

    with pytest.raises(ValueError, match="LlamaForCausalLM: not a MoE model"):
        offload_experts(tiny_causal_lm("llama", 0))
    model = _model("olmoe")
    snapshot = _snapshot(model)
    implementation = model.config._experts_implementation
    for kwargs, message in [(dict(cache_experts=1), r"cache_experts must be an int >= .*top_k=2"),
                            (dict(policy="belady"), "Belady needs the future"),
                            (dict(store="ram"), "store must be 'cpu' or 'disk'"),
                            (dict(prefetch="oracle"), "prefetch must be None"),
                            (dict(scope="layer"), "scope must be"),
                            (dict(lookahead=0), "lookahead must be an int >= 1")]:
        with pytest.raises(ValueError, match=message):
            offload_experts(model, **kwargs)
        _assert_restored(model, snapshot, implementation)
    with offload_experts(model, cache_experts=2):
        with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts: already offloaded"):
            offload_experts(model, cache_experts=2)
    _assert_restored(model, snapshot, implementation)


def test_unsupported_expert_layout_is_named():
    model = _model("olmoe")
    experts = model.model.layers[1].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(torch.zeros(3, 4))  # not [num_experts, ...]
    experts.down_proj = torch.nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts: unsupported expert layout"):
        offload_experts(model, cache_experts=2)
    assert model.config._experts_implementation != "effllm_offload"
    assert model.model.layers[0].mlp.experts.gate_up_proj.numel() > 0


def test_a_model_dropped_without_remove_is_freed():
    import weakref

    model = _model("olmoe")
    handle = offload_experts(model, store="disk", cache_experts=2, prefetch="trace_match")
    with torch.no_grad():
        model(IDS[:1, :3])
    thread, path = handle._thread, handle.store.path
    model_ref = weakref.ref(model)
    del model, handle
    gc.collect()
    assert model_ref() is None
    thread.join()  # the loader sees its handle gone at its next wake-up (no time limit here)
    assert not thread.is_alive() and not path.exists()  # the temporary expert file went with it


def test_offload_settings_check_then_apply():
    model = _model("qwen2_moe")
    snapshot = _snapshot(model)
    implementation = model.config._experts_implementation
    with pytest.raises(ValueError, match="cache_experts must be"):
        Offload(cache_experts=1).check(model)
    Offload(store="disk", cache_experts=2).check(model)
    _assert_restored(model, snapshot, implementation)  # checking changes nothing
    handle = Offload(store="disk", cache_experts=2, prefetch="cross_layer_gate").apply(model)
    assert handle.stats()["cache_bound_experts"] == 4 and model.config._experts_implementation == "effllm_offload"
    handle.remove()
    _assert_restored(model, snapshot, implementation)
    with pytest.raises(ValueError, match="direct_io is for store='disk'"):
        Offload(direct_io=True).check(model)
    _assert_restored(model, snapshot, implementation)


@pytest.mark.parametrize("policy", ["lru", "lfu", "moe_infinity"])
def test_the_offloaded_cache_behaves_as_the_simulator_predicts(policy):
    # decode one token at a time while recording the routes: the live cache's hits and misses equal
    # the simulator's replay of the recorded trace under the same policy and capacity
    from effllm.moe import RouteRecorder, simulate

    model = _model("olmoe", seed=2)
    with offload_experts(model, cache_experts=3, policy=policy) as handle, RouteRecorder(model) as rec:
        model.generate(IDS[:1, :1], max_new_tokens=40, do_sample=False, pad_token_id=0)
        stats = handle.stats()
    replay = simulate(rec.trace(), 3, policy)
    assert replay.accesses == stats["accesses"] == 40 * 3 * 2
    assert (stats["hits"], stats["misses"]) == (replay.hits, replay.misses)
    assert stats["per_layer_hit_rate"] == list(zip([0, 1, 2], replay.per_layer_hit_rate))
