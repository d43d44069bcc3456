"""KV-cache compression: invariants of each policy, memory actually freed, exactness at full
budget, generate() on tiny models and SmolLM2, and bad settings."""

import math

import pytest
import torch

import effllm
from effllm._backend import interpreting
from effllm.kv import CAKE, H2O, CompressedCache, SnapKV, StreamingLLM, compress
from effllm.kv.policies import attention_mass
from effllm.testing.models import tiny_causal_lm

pytest.importorskip("transformers")


def _tiny(kind="llama", seed=0, layers=2):
    # qwen2 / mistral default to sliding-window attention, which compression rejects
    extra = {"sliding_window": None} if kind in ("mistral", "qwen2") else {}
    return tiny_causal_lm(kind, seed, num_hidden_layers=layers, **extra)


def _ids(n, seed=1, batch=1):
    return torch.randint(0, 101, (batch, n), generator=torch.Generator().manual_seed(seed))


def _prefill(model, policy, ids, keep_positions=True):
    # keep_positions: the tests read which tokens each head kept (layer.positions)
    parts = policy if isinstance(policy, tuple) else (policy,)  # (policy, quantizer)
    with compress(model, *parts) as kv, torch.inference_mode():
        cache = kv.new_cache(keep_positions=keep_positions)
        logits = model(ids, past_key_values=cache, use_cache=True).logits
    return cache, logits


POLICIES = [StreamingLLM(24, sinks=4), SnapKV(24, window=8, kernel=5), H2O(24, recent=8)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_prefill_invariants(policy):
    model = _tiny()
    cache, _ = _prefill(model, policy, _ids(61))
    for layer in cache.layers:
        assert layer.stored() == 24 and layer.keys.shape == (1, 2, 24, 16) and layer.seen == 61
        pos = layer.positions
        assert (pos[..., 1:] > pos[..., :-1]).all()  # token order preserved per head
        if isinstance(policy, StreamingLLM):
            assert pos[0, 0].tolist() == [0, 1, 2, 3] + list(range(41, 61))
        if isinstance(policy, SnapKV):
            assert (pos[..., -8:] == torch.arange(53, 61)).all()  # the observation window is kept
        if isinstance(policy, H2O):
            assert (pos[..., -8:] == torch.arange(53, 61)).all()  # the recent window is kept
    assert cache.get_seq_length() == 61
    stats = cache.stats()
    assert stats["kept_per_layer"] == [24, 24] and stats["kv_bytes"] == stats["kv_bytes_full"] * 24 // 61


def test_heads_choose_their_own_tokens():
    cache, _ = _prefill(_tiny(seed=3), SnapKV(20, window=4, kernel=1), _ids(70, seed=3))
    pos = cache.layers[0].positions[0]
    assert not torch.equal(pos[0], pos[1])  # per-KV-head selection


@pytest.mark.parametrize("policy,page_size,quantized", [("snapkv", "auto", False), ("snapkv", "auto", True),
                                                        ("adakv", 4, False), ("h2o", "auto", False)],
                         ids=["SnapKV", "SnapKV-NSNQuant", "AdaKV-SnapKV-paged", "H2O"])
def test_a_policy_done_evicting_leaves_no_positions_behind(policy, page_size, quantized):
    # positions and scores serve evictions only: once the policy will never evict again, the cache
    # drops them and holds exactly their bytes less, decoding as a cache that keeps them does
    # (uniform layers, with and without codes, and ragged ones)
    from effllm.kv import AdaKV, NSNQuant

    def make():
        return {"snapkv": SnapKV(24, window=8, kernel=5), "h2o": H2O(24, recent=8),
                "adakv": AdaKV(SnapKV(24, window=6, kernel=3), alpha_safeguard=0.5)}[policy]

    model, ids = _tiny(seed=11), _ids(70, seed=11)
    steps = [torch.tensor([[t]]) for t in (5, 9, 2, 7)]
    runs = {}
    for keep in (False, True):
        setting = (make(), NSNQuant(bits=2, residual=4, chunk=8, shift_bits=8)) if quantized else make()
        with effllm.patched(model, kv=setting) as handle, torch.inference_mode():
            kv = handle.kv
            cache = kv.new_cache(page_size=page_size, keep_positions=keep)
            logits = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1:]]
            logits += [model(token, past_key_values=cache, use_cache=True).logits for token in steps]
        runs[keep] = (cache, torch.cat(logits, 1))
    (dropped, got), (kept, want) = runs[False], runs[True]
    assert torch.equal(got, want)
    if policy == "adakv":
        assert all(layer.ragged is not None for layer in kept.layers)
    if quantized:  # uniform layers holding codes: decode steps appended to the store, positions not tracked
        assert all(layer.ragged is None and layer.store is not None for layer in dropped.layers)
    slot_bytes = sum(t.numel() * t.element_size() for layer in kept.layers
                     for t in (layer.positions, layer.scores) if t is not None)
    if make().evicts_later:  # H2O evicts while decoding: it keeps them
        assert all(layer.positions is not None for layer in dropped.layers) and dropped.nbytes() == kept.nbytes()
    else:
        assert all(layer.positions is None and layer.scores is None for layer in dropped.layers)
        assert slot_bytes > 0 and dropped.nbytes() == kept.nbytes() - slot_bytes
        assert dropped.stats()["kept_per_head"] == kept.stats()["kept_per_head"]
    with pytest.raises(ValueError, match="keep_positions"):
        CompressedCache(SnapKV(0.5), keep_positions=1)


def test_memory_is_freed():
    model = _tiny()
    from transformers import DynamicCache

    full = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(_ids(80), past_key_values=full, use_cache=True)
    cache, _ = _prefill(model, StreamingLLM(0.25), _ids(80))
    kv_full = sum(layer.keys.untyped_storage().nbytes() * 2 for layer in full.layers)
    kv_kept = sum(layer.keys.untyped_storage().nbytes() * 2 for layer in cache.layers)
    assert kv_kept == kv_full * 20 // 80  # the storage itself shrank, not just a view
    assert cache.nbytes() <= 0.25 * kv_full * 1.05 + sum(l.positions.numel() * 8 for l in cache.layers)


@pytest.mark.parametrize("kind", ["uniform", "ragged", "ragged-quantized"])
def test_no_buffer_keeps_evicted_tokens_alive(kind):
    # every tensor reachable from the cache (what a memory walker sees) is counted by nbytes():
    # no spare-capacity buffer of the uncompressed prefill survives the eviction (a ragged
    # quantized layer's codes lie deepest: a store a row)
    from effllm.bench.model import kv_bytes as reachable_bytes
    from effllm.kv import AdaKV, CompressedCache, NSNQuant

    policy = StreamingLLM(0.25) if kind == "uniform" else AdaKV(SnapKV(0.25, window=8))
    if kind == "ragged-quantized":
        policy = (policy, NSNQuant(bits=2, residual=4, chunk=8))
    cache, _ = _prefill(_tiny(), policy, _ids(80, batch=2))
    if kind == "ragged-quantized":
        assert isinstance(cache, CompressedCache) and type(cache.layers[0].ragged).__name__ == "QuantizedRows"
    held = cache.nbytes()
    reachable = reachable_bytes(cache)
    assert held <= reachable <= held * 1.1, (held, reachable)


@pytest.mark.parametrize("policy", [StreamingLLM(1.0), SnapKV(1.0, window=8), H2O(1.0)],
                         ids=lambda p: type(p).__name__)
def test_full_budget_is_exact(policy):
    model = _tiny()
    ids = _ids(40)
    with torch.inference_mode():
        base = model(ids).logits
    _, logits = _prefill(model, policy, ids)
    torch.testing.assert_close(logits, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_generate_holds_the_budget_while_decoding(kind):
    model = _tiny(kind)
    ids = _ids(50)
    with compress(model, H2O(0.5, recent=0.25)) as kv, torch.inference_mode():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids))
        stats = kv.stats()
    assert out.shape == (1, 60)
    assert stats["tokens_seen"] == 59 and stats["kept_per_layer"] == [25, 25]
    assert "generate" not in vars(model) and model.config._attn_implementation == "sdpa"


def test_snapkv_and_streaming_match_a_manual_reference_decode():
    # Decoding with the compressed cache equals attention over exactly the kept keys.
    model = _tiny(layers=1)
    ids = _ids(45)
    cache, _ = _prefill(model, StreamingLLM(20, sinks=2), ids)
    kept = cache.layers[0].positions[0, 0].tolist()
    assert kept == [0, 1] + list(range(27, 45))
    with compress(model, StreamingLLM(20, sinks=2)) as kv, torch.inference_mode():
        cache = kv.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        nxt = torch.tensor([[7]])
        logits = model(nxt, past_key_values=cache, use_cache=True).logits
        assert cache.layers[0].stored() == 20 and cache.get_seq_length() == 46
    # The same token appended to a hand-trimmed full cache (positions preserved) gives the same logits.
    from transformers import DynamicCache

    with torch.inference_mode():
        ref_cache = DynamicCache()
        model(ids, past_key_values=ref_cache, use_cache=True)
        layer = ref_cache.layers[0]
        layer.keys, layer.values = layer.keys[:, :, kept], layer.values[:, :, kept]
        pos = torch.tensor([[45]])
        ref = model(nxt, past_key_values=ref_cache, position_ids=pos, cache_position=pos[0], use_cache=True).logits
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_attention_mass_matches_explicit_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 9, 16, generator=gen), torch.randn(1, 2, 9, 16, generator=gen)
    mass = attention_mass(q, k, 0.25)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.25
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(scores, -1).view(1, 2, 2, 9, 9).sum(dim=(2, 3))
    torch.testing.assert_close(mass, want)
    assert torch.allclose(mass.sum(-1), torch.full((1, 2), 18.0))


def test_bad_settings():
    with pytest.raises(ValueError, match=r"fractional budget must lie in \(0, 1\]"):
        H2O(1.5)
    with pytest.raises(ValueError, match="budget must be"):
        SnapKV(0)
    with pytest.raises(ValueError, match="kernel an odd int"):
        SnapKV(0.5, kernel=4)
    model = _tiny()
    with pytest.raises(ValueError, match=r"window=32 is larger than the prompt \(20 tokens\)"):
        _prefill(model, SnapKV(0.5, window=32), _ids(20))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="expected an effllm.kv policy"):
        effllm.patch(model, kv="h2o")
    assert not hasattr(model, "_effllm_patch_handle")
    import transformers

    sliding = transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, sliding_window=16))
    with pytest.raises(ValueError, match="sliding-window"):
        effllm.patch(sliding, kv=H2O(0.5))


@pytest.mark.model
def test_smollm2_pass_key_survives_snapkv(smollm2):
    from effllm.demo import build_prompt

    model, tok = smollm2
    prompt = build_prompt(tok, 600)
    with compress(model, SnapKV(0.5)) as kv, torch.inference_mode():
        out = model.generate(prompt.input_ids, max_new_tokens=12, do_sample=False)
        stats = kv.stats()
    assert prompt.key in tok.decode(out[0, prompt.input_ids.shape[1]:])
    assert stats["kv_bytes"] <= 0.5 * stats["kv_bytes_full"] * 1.05
    # CAKE's per-layer budgets (different lengths per layer) run through generate on the real model
    with compress(model, CAKE(0.5)) as kv, torch.inference_mode():
        out = model.generate(prompt.input_ids, max_new_tokens=12, do_sample=False)
        kept = kv.stats()["kept_per_layer"]
    assert len(set(kept)) > 1 and prompt.key in tok.decode(out[0, prompt.input_ids.shape[1]:])


def test_cake_divides_one_total_budget_by_layer_preference():
    model = _tiny(layers=4, seed=5)
    cache, _ = _prefill(model, CAKE(30, window=6), _ids(90, seed=5))
    kept = [layer.stored() for layer in cache.layers]
    assert len(set(kept)) > 1  # layers differ
    assert sum(kept) <= 30 * 4 and sum(kept) >= 30 * 4 - 4  # one total, rounding per layer only
    prefs = cache.policy_state["preferences"]
    order = sorted(range(4), key=lambda i: prefs[i])
    assert [kept[i] for i in order] == sorted(kept)  # budgets follow the preferences
    for layer in cache.layers:
        assert (layer.positions[..., -6:] == torch.arange(84, 90)).all()  # the window is kept


@pytest.mark.parametrize("budget", [1.0, 0.9, 70])
def test_cake_layers_held_at_their_prompt_pass_their_share_on(budget):
    # a layer's share past its prompt goes to the other layers: CAKE(1.0) keeps everything, as
    # every other policy does at 1.0, and the layers together keep the whole budget (until
    # session 21 a capped layer's excess was lost: CAKE(1.0) kept ~82% of SmolLM2's prompt)
    from effllm.kv.allocation import water_fill

    model = _tiny(layers=4, seed=5)
    cache, _ = _prefill(model, CAKE(budget, window=6), _ids(80, seed=5))
    kept = [layer.stored() for layer in cache.layers]
    total = 80 * 4 if budget == 1.0 else (math.ceil(0.9 * 80) if budget == 0.9 else 70) * 4
    assert sum(kept) >= total - 4 and max(kept) <= 80  # one total, rounding per layer only
    if budget == 1.0:
        assert kept == [80] * 4
    shares = water_fill(100, {0: 1.0, 1: 1.0, 2: 2.0}, {0: 100, 1: 100, 2: 30})
    assert shares == {0: 35, 1: 35, 2: 30}


def test_cake_generates_with_ragged_layers_and_holds_budgets():
    model = _tiny(layers=3, seed=6)
    ids = _ids(80, seed=6)
    with compress(model, CAKE(0.5, window=8, slack=1)) as kv, torch.inference_mode():
        cache = kv.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        budgets = [layer.budget for layer in cache.layers]
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 86)
    assert [layer.stored() for layer in kv.last_cache.layers] == [layer.budget for layer in kv.last_cache.layers]
    assert budgets == [layer.budget for layer in kv.last_cache.layers]


def test_slack_batches_decode_evictions():
    model = _tiny()
    ids = _ids(64)
    with compress(model, StreamingLLM(32, slack=5)) as kv, torch.inference_mode():
        cache = kv.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        sizes = []
        for step in range(12):
            model(torch.tensor([[step + 1]]), past_key_values=cache, use_cache=True)
            sizes.append(cache.layers[0].stored())
    assert sizes == [33, 34, 35, 36, 32, 33, 34, 35, 36, 32, 33, 34]  # evicts at budget + slack
    with pytest.raises(ValueError, match="slack"):
        H2O(0.5, slack=0)


@pytest.mark.parametrize("inner", [StreamingLLM(24, sinks=2), SnapKV(24, window=6), H2O(24, recent=6),
                                   CAKE(24, window=6)], ids=lambda p: type(p).__name__)
def test_protected_spans_are_never_evicted(inner):
    from effllm.kv import Protected

    model = _tiny(layers=2, seed=7)
    ids = _ids(80, seed=7)
    policy = Protected(inner, spans=[(10, 18), (40, 42)])
    with compress(model, policy) as kv, torch.inference_mode():
        cache = kv.new_cache(keep_positions=True)
        model(ids, past_key_values=cache, use_cache=True)
        for step in range(5):
            model(torch.tensor([[step + 3]]), past_key_values=cache, use_cache=True)
    pinned = torch.tensor(list(range(10, 18)) + [40, 41])
    for layer in cache.layers:
        assert torch.isin(pinned, layer.positions[0, 0]).all() and torch.isin(pinned, layer.positions[0, 1]).all()
    with pytest.raises(ValueError, match="pin 30 tokens, the budget keeps 24"):
        _prefill(model, Protected(SnapKV(24, window=4), spans=[(0, 30)]), ids)
    for spans in ([(5, 2)], (0, 4), [(0, 4, 6)], [0, 4], [], [(False, True)]):  # (0, 4): one pair, not a list
        with pytest.raises(ValueError, match=r"spans must be a list of \(start, end\) int pairs"):
            Protected(H2O(0.5), spans=spans)


@pytest.mark.parametrize("policy", [SnapKV(0.5, window=8), H2O(0.5), CAKE(0.5, window=8)],
                         ids=lambda p: type(p).__name__)
def test_batch_without_padding_matches_one_by_one(policy):
    model = _tiny(seed=8)
    ids = _ids(40, seed=8, batch=2)
    with compress(model, policy), torch.inference_mode():
        together = model.generate(ids, max_new_tokens=5, do_sample=False)
        alone = [model.generate(ids[i:i + 1], max_new_tokens=5, do_sample=False) for i in range(2)]
    assert torch.equal(together, torch.cat(alone))


# ---- ragged layers: per-head budgets (AdaKV) and left-padded batches ------------------------------

def _ragged_reference(keys, values, mask, q, new_k, new_v, scale):
    """Per row, in float64: softmax attention of q over the row's kept keys and its new keys."""
    from effllm.testing.compare import per_row_attention_reference

    batch, kv_heads = keys.shape[:2]
    rows = [(torch.cat([keys[b, h][mask[b, h]], new_k[b, h]]), torch.cat([values[b, h][mask[b, h]], new_v[b, h]]))
            for b in range(batch) for h in range(kv_heads)]
    return per_row_attention_reference(q, rows, scale)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[
    pytest.mark.interpret, pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
                                              reason="needs CUDA or TRITON_INTERPRET=1")])])
@pytest.mark.parametrize("page_size", [None, 3])
@pytest.mark.parametrize("q_len", [1, 5, 19])
def test_ragged_layer_attends_exactly_its_kept_tokens(page_size, q_len, backend):
    from effllm.kv import CompressedLayer
    from effllm.kv.attention import _ragged_attention

    gen = torch.Generator().manual_seed(q_len)
    batch, kv_heads, group, seq, dim = 2, 3, 2, 23, 8

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    keys, values = randn(batch, kv_heads, seq, dim), randn(batch, kv_heads, seq, dim)
    mask = torch.rand(batch, kv_heads, seq, generator=gen) < torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1)
    mask[..., 0] = True
    # Compiled Triton needs CUDA tensors; the reference stays on CPU.
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    layer = CompressedLayer()
    layer.page_size = page_size
    layer.update(keys.to(dev), values.to(dev))
    layer.keep_mask(mask.to(dev))
    assert layer.ragged is not None and layer.row_lengths().tolist() == mask.sum(-1).tolist()
    assert (layer.positions[layer.valid_mask()].cpu() == torch.arange(seq).expand_as(mask)[mask]).all()
    new_k, new_v = randn(batch, kv_heads, q_len, dim), randn(batch, kv_heads, q_len, dim)
    layer.update(new_k.to(dev), new_v.to(dev))
    q = randn(batch, kv_heads * group, q_len, dim)
    with torch.no_grad():
        out, stats = _ragged_attention(layer, q.to(dev), 0.3, None, backend, need_stats=True)
    out, stats = out.cpu(), stats.cpu()
    torch.testing.assert_close(out, _ragged_reference(keys, values, mask, q, new_k, new_v, 0.3), rtol=1e-4, atol=1e-5)
    # attention mass: every query row sums to 1, empty slots get none
    torch.testing.assert_close(stats.sum(-1), torch.full((batch, kv_heads), float(group * q_len)))
    assert (stats[~layer.valid_mask().cpu()] == 0).all()


def test_adakv_shares_the_budget_across_heads_and_frees_memory():
    from effllm.kv import AdaKV

    model = _tiny(seed=11)
    ids = _ids(90, seed=11)
    with compress(model, AdaKV(SnapKV(24, window=6, kernel=3), alpha_safeguard=0.5)) as kv, torch.inference_mode():
        cache = kv.new_cache(page_size=4, keep_positions=True)
        model(ids, past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        lengths = layer.row_lengths()
        assert lengths.sum() == 24 * 2 and lengths.min() >= 12 and len(set(lengths.flatten().tolist())) > 1
        assert (layer.recent_mask(6).sum(-1) == 6).all()  # every head keeps the observation window
        # paged: the pool holds the pages in use, less than one spare page per head
        assert layer.ragged.k.shape[0] <= sum(-(-n // 4) for n in lengths.flatten().tolist()) + 1
        assert layer.kv_bytes() < 0.3 * layer.full_bytes()
    assert cache.stats()["kept_per_head"][0] == cache.layers[0].row_lengths().tolist()
    with pytest.raises(ValueError, match="AdaKV: policy must be SnapKV or H2O"):
        AdaKV(StreamingLLM(0.5))
    with pytest.raises(ValueError, match="alpha_safeguard"):
        AdaKV(SnapKV(0.5), alpha_safeguard=1.5)


def test_adakv_keeps_the_best_tokens_of_any_head():
    from effllm.kv.cache import _shared_top_mask

    ranked = torch.tensor([[[9.0, 8.0, 7.0, 6.0], [1.0, 0.5, 0.2, 0.1]]])
    assert _shared_top_mask(ranked, 2, 0.0).tolist() == [[[True, True, True, True], [False] * 4]]
    assert _shared_top_mask(ranked, 2, 0.5).tolist() == [[[True, True, True, False], [True, False, False, False]]]
    assert _shared_top_mask(ranked, 2, 1.0).tolist() == [[[True, True, False, False], [True, True, False, False]]]



def test_tied_scores_keep_the_earlier_tokens():
    # topk breaks ties one way on CPU and another on CUDA; eviction must not depend on it
    # (SnapKV's max-pooled scores tie in runs): the earlier token stays, on every path.
    from effllm.kv import CompressedLayer
    from effllm.kv.cache import _shared_top_mask
    from effllm.kv.ranking import top_mask

    ranked = torch.tensor([[[2.0, 5.0, 5.0, 1.0, 5.0, 5.0, 5.0, 0.0, 5.0]] * 2])
    assert top_mask(ranked, 4)[0, 0].nonzero().flatten().tolist() == [1, 2, 4, 5]
    assert _shared_top_mask(ranked, 3, 0.5)[0].nonzero().tolist() == [[0, 1], [0, 2], [0, 4], [0, 5], [1, 1], [1, 2]]
    layer = CompressedLayer()
    layer.update(torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4))
    layer.evict(ranked, 5)  # uniform layer: the topk-then-gather path
    assert layer.positions.tolist() == [[[1, 2, 4, 5, 6]] * 2]

def test_selections_take_a_count_per_batch_row():
    # a fractional budget on a left-padded batch: each batch row keeps its own count
    from effllm.kv.cache import _shared_top_mask
    from effllm.kv.ranking import top_mask

    ranked = torch.tensor([[[3.0, 1.0, 2.0, 0.0], [0.5, 0.4, 9.0, 0.1]],
                           [[3.0, 1.0, 2.0, 0.0], [0.5, 0.4, 9.0, 0.1]]])
    mask = top_mask(ranked, [1, 3])
    assert mask[0].tolist() == [[True, False, False, False], [False, False, True, False]]
    assert mask[1].tolist() == [[True, True, True, False], [True, True, True, False]]
    assert torch.equal(top_mask(ranked, [2, 2]), top_mask(ranked, 2))
    shared = _shared_top_mask(ranked, [1, 2], 0.0)  # 1 * 2 heads, then 2 * 2, of any head
    assert shared[0].tolist() == [[True, False, False, False], [False, False, True, False]]  # 9 and 3
    assert shared[1].tolist() == [[True, True, True, False], [False, False, True, False]]  # 9, 3, 2, 1
    for row, keep in enumerate([1, 2]):
        assert torch.equal(shared[row], _shared_top_mask(ranked[row:row + 1], keep, 0.0)[0])


def _masked_reference_attention(keep):
    """A transformers attention function that hides, per KV head, the keys where keep is False."""
    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        group = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(group, 1).double(), value.repeat_interleave(group, 1).double()
        s = (query.double() @ k.transpose(-1, -2)) * scaling
        s = s.masked_fill(~keep[:, :, : key.shape[2]].repeat_interleave(group, 1)[:, :, None, :], float("-inf"))
        return (torch.softmax(s, -1) @ v).to(query.dtype).transpose(1, 2), None
    return attend


@pytest.mark.parametrize("page_size", [None, 5])
def test_adakv_decoding_equals_full_attention_with_dropped_keys_hidden(page_size):
    from transformers import AttentionInterface, DynamicCache

    from effllm.kv import AdaKV

    model = _tiny(layers=1, seed=12)
    ids, steps = _ids(60, seed=12), (5, 9, 2)
    with compress(model, AdaKV(SnapKV(20, window=4, kernel=1), alpha_safeguard=0.1)) as kv, torch.inference_mode():
        cache = kv.new_cache(page_size=page_size, keep_positions=True)
        model(ids, past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        kept = layer.positions.clone()
        logits = torch.cat([model(torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits for t in steps])
    assert len(set(layer.row_lengths().flatten().tolist())) > 1  # really ragged
    keep = torch.zeros(1, 2, 60 + len(steps), dtype=torch.bool)
    for h in range(2):
        keep[0, h, kept[0, h][kept[0, h] >= 0]] = True
    keep[..., 60:] = True
    AttentionInterface.register("effllm_test_masked", _masked_reference_attention(keep))
    try:
        with torch.inference_mode():
            ref_cache = DynamicCache()
            model(ids, past_key_values=ref_cache, use_cache=True)
            model.set_attn_implementation("effllm_test_masked")
            ref = torch.cat([model(torch.tensor([[t]]), past_key_values=ref_cache, use_cache=True).logits
                             for t in steps])
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("page_size", [None, 5])
def test_adakv_h2o_holds_the_shared_budget_while_decoding(page_size):
    # Decode-time eviction with per-head budgets: every step attends exactly the keys each head
    # kept (a full-attention reference hiding the rest), H2O's scores gain each step's attention
    # (G query heads per KV head: G per head and step), and each eviction leaves the sequence
    # budget * H_kv tokens, each head its floor and its recent tokens.
    from transformers import AttentionInterface, DynamicCache

    from effllm.kv import AdaKV

    model = _tiny(layers=1, seed=16)
    with torch.no_grad():  # random init attends almost uniformly: sharpen KV head 0 so heads differ
        model.model.layers[0].self_attn.k_proj.weight[:16] *= 30
    ids, steps = _ids(50, seed=16), _ids(14, seed=17)[0].tolist()
    budget, recent, slack, alpha = 16, 4, 3, 0.25
    keeps, logits, score_sums, totals, ragged_steps = [], [], [], [], 0
    with compress(model, AdaKV(H2O(budget, recent=recent, slack=slack), alpha_safeguard=alpha)) as kv, \
            torch.inference_mode():
        cache = kv.new_cache(page_size=page_size)
        model(ids, past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        for i, token in enumerate(steps):
            keep = torch.zeros(1, 2, 50 + len(steps), dtype=torch.bool)
            for h in range(2):
                keep[0, h, layer.positions[0, h][layer.positions[0, h] >= 0]] = True
            keep[..., 50 + i] = True
            keeps.append(keep)
            before = layer.scores.sum(dim=-1).clone()
            logits.append(model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits)
            lengths = layer.row_lengths()[0]
            totals.append(int(lengths.sum()))
            ragged_steps += int(lengths.min() < lengths.max())
            if totals[-1] > (totals[-2] if i else 0) or i == 0:  # no eviction this step
                score_sums.append(layer.scores.sum(dim=-1) - before)
            else:
                assert totals[-1] == budget * 2
                assert (lengths >= math.ceil(alpha * budget)).all()
                assert (layer.recent_mask(recent).sum(dim=-1) == recent).all()
    assert max(totals) < (budget + slack) * 2 and totals.count(budget * 2) >= 3  # it evicted, repeatedly
    assert ragged_steps > len(steps) // 2  # the heads really hold different counts
    for gained in score_sums:
        torch.testing.assert_close(gained, torch.full_like(gained, 2.0), rtol=1e-4, atol=1e-4)
    current = iter(keeps)
    AttentionInterface.register("effllm_test_stepwise",
                                lambda *a, **kw: _masked_reference_attention(next(current))(*a, **kw))
    try:
        with torch.inference_mode():
            ref_cache = DynamicCache()
            model(ids, past_key_values=ref_cache, use_cache=True)
            model.set_attn_implementation("effllm_test_stepwise")
            ref = [model(torch.tensor([[t]]), past_key_values=ref_cache, use_cache=True).logits for t in steps]
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(torch.cat(logits), torch.cat(ref), rtol=1e-4, atol=1e-4)


def _left_pad(rows, pad_id=0):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("policy", [StreamingLLM(16, sinks=2), SnapKV(16, window=4), H2O(16, recent=4, slack=2),
                                    "adakv"], ids=lambda p: p if isinstance(p, str) else type(p).__name__)
@pytest.mark.parametrize("lengths", [(30, 41), (10, 41), (9, 14)], ids=["over-budget", "one-under", "all-under"])
def test_left_padded_batch_matches_one_by_one(policy, lengths):
    from effllm.kv import AdaKV

    # kernel=1: max-pooling makes plateaus of exactly tied votes, which topk may break either way
    policy = AdaKV(SnapKV(16, window=4, kernel=1)) if policy == "adakv" else policy
    model = _tiny(seed=13)
    rows = [_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in lengths]  # pad id 0 never appears in a row
    ids, mask = _left_pad(rows)
    with compress(model, policy) as kv, torch.inference_mode():
        together = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        batch_stats = kv.stats()
        alone = [model.generate(torch.tensor([r]), max_new_tokens=6, do_sample=False, pad_token_id=0) for r in rows]
    for i, row in enumerate(rows):
        assert together[i, ids.shape[1]:].tolist() == alone[i][0, len(row):].tolist()
    # the padding is gone from the cache: no row holds more than its real tokens
    for layer_rows in batch_stats["kept_per_head"]:
        assert max(layer_rows[0]) <= lengths[0] + 5


@pytest.mark.parametrize("policy", [SnapKV(0.5, window=4, kernel=1), H2O(0.5, recent=0.25, slack=2),
                                    StreamingLLM(0.4, sinks=2, slack=1), "adakv", "adakv-floor", "fair", "cake",
                                    "cake-1.0"],
                         ids=lambda p: p if isinstance(p, str) else type(p).__name__)
def test_a_fractional_budget_in_a_left_padded_batch_is_each_rows_own(policy):
    # each row keeps its fraction of its own prompt, so its kept tokens and its output are what
    # it keeps and says alone (they were the longest row's fraction: a short row kept more)
    from effllm.kv import AdaKV, Protected

    policy = {"adakv": AdaKV(SnapKV(0.5, window=4, kernel=1)), "cake": CAKE(0.5, window=4, slack=1),
              # shares that pass a layer's own tokens: capped at the row's, not the padded width
              "cake-1.0": CAKE(1.0, window=4, slack=1),
              # every head its whole budget first: each row's floor is its own budget
              "adakv-floor": AdaKV(SnapKV(0.5, window=4, kernel=1), alpha_safeguard=1.0),
              "fair": Protected(SnapKV(0.5, window=4, kernel=1), spans=[(2, 12), (20, 30)], fair=True)}.get(policy, policy)
    model = _tiny(layers=3, seed=13)
    rows = [_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in (23, 41, 30)]  # pad id 0 never appears
    ids, mask = _left_pad(rows)
    with compress(model, policy) as kv, torch.inference_mode():
        together = model.generate(ids, attention_mask=mask, max_new_tokens=7, min_new_tokens=7, do_sample=False,
                                  pad_token_id=0)
        kept_together = kv.stats()["kept_per_head"]
        alone, kept_alone = [], []
        for row in rows:
            alone.append(model.generate(torch.tensor([row]), max_new_tokens=7, min_new_tokens=7, do_sample=False,
                                        pad_token_id=0))
            kept_alone.append([layer[0] for layer in kv.stats()["kept_per_head"]])
    for i, row in enumerate(rows):
        assert [layer[i] for layer in kept_together] == kept_alone[i], f"row {i}"
        if not isinstance(policy, Protected):  # spans count from the padded input's start: not the row's own
            assert together[i, ids.shape[1]:].tolist() == alone[i][0, len(row):].tolist(), f"row {i}"


@pytest.mark.parametrize("inner", [SnapKV(0.5, window=4, kernel=1), H2O(0.5, recent=0.25)], ids=["SnapKV", "H2O"])
def test_fair_spans_in_a_padded_batch_keep_what_each_row_keeps_alone(inner):
    # spans count from the padded input's start; a row's share of a span is of its own tokens
    # in it (the padding is no span's) and of its own budget: with the spans moved to its own
    # positions, the row alone keeps the same tokens
    from effllm.kv import Protected

    model = _tiny(layers=2, seed=13)
    rows = [_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in (23, 41, 30)]
    ids, mask = _left_pad(rows)
    spans = [(2, 16), (20, 30), (30, 38)]
    with compress(model, Protected(inner, spans=spans, fair=True)) as kv, torch.inference_mode():
        cache = kv.new_cache(keep_positions=True)
        model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), past_key_values=cache,
              use_cache=True)
        together = [layer.positions for layer in cache.layers]
    for i, row in enumerate(rows):
        pad = ids.shape[1] - len(row)
        own = [(max(0, a - pad), b - pad) for a, b in spans if b - pad > 0]
        with compress(model, Protected(inner, spans=own, fair=True)) as kv, torch.inference_mode():
            alone = kv.new_cache(keep_positions=True)
            model(torch.tensor([row]), past_key_values=alone, use_cache=True)
        for layer, positions in zip(alone.layers, together, strict=True):
            kept = positions[i].masked_fill(positions[i] < 0, -1 - pad) - pad  # empty slots stay < 0
            for head in range(kept.shape[0]):
                assert sorted(x for x in kept[head].tolist() if x >= 0) == sorted(layer.positions[0, head].tolist())


def test_a_batch_selection_moves_the_rows_budgets():
    # beam search and batch selection rebuild every per-row tensor: the budgets go with the rows
    model = _tiny(layers=1, seed=13)
    rows = [_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in (23, 41)]
    ids, mask = _left_pad(rows)
    with compress(model, H2O(0.5, recent=0.25, slack=1)) as kv, torch.inference_mode():
        cache = kv.new_cache()
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        assert layer.row_budget == [12, 21] and layer.row_lengths()[:, 0].tolist() == [12, 21]
        cache.batch_select_indices(torch.tensor([1, 0]))
        assert layer.row_budget == [21, 12]
        for _ in range(3):  # past each row's budget + slack: each back to its own budget
            model(torch.tensor([[5], [6]]), past_key_values=cache, use_cache=True)
        assert layer.row_lengths()[:, 0].tolist() == [21, 12]  # budgets left behind: [12, 15]


@pytest.mark.parametrize("policy,lengths", [
    (StreamingLLM(0.5, sinks=2), (40, 150)), (H2O(0.5, recent=0.25), (40, 150)), ("adakv-h2o", (40, 150)),
    (StreamingLLM(16, slack=2), (11, 41))], ids=["StreamingLLM", "H2O", "AdaKV(H2O)", "StreamingLLM-int"])
def test_each_row_evicts_while_decoding_when_it_would_alone(policy, lengths):
    # rows reach their budget + slack at different steps (their own budgets and slacks, or a
    # row shorter than an int budget): a row evicts when it is over, not when another row is
    from effllm.kv import AdaKV

    policy = AdaKV(H2O(0.5, recent=0.25)) if policy == "adakv-h2o" else policy
    model = _tiny(layers=2, seed=13)
    rows = [_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in lengths]  # pad id 0 never appears
    ids, mask = _left_pad(rows)
    steps = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with compress(model, policy) as kv, torch.inference_mode():
        together = model.generate(ids, attention_mask=mask, **steps)
        kept_together = kv.stats()["kept_per_head"]
        alone, kept_alone = [], []
        for row in rows:
            alone.append(model.generate(torch.tensor([row]), **steps))
            kept_alone.append([layer[0] for layer in kv.stats()["kept_per_head"]])
    for i, row in enumerate(rows):
        assert [layer[i] for layer in kept_together] == kept_alone[i], f"row {i}"
        assert together[i, ids.shape[1]:].tolist() == alone[i][0, len(row):].tolist(), f"row {i}"


@pytest.mark.parametrize("policy", [H2O(0.5, recent=0.25, slack=3), CAKE(0.5, window=4, slack=2), "adakv-snapkv"],
                         ids=["H2O", "CAKE", "AdaKV(SnapKV)"])
def test_ragged_decode_steps_read_the_rows_in_one_native_pass_as_the_torch_path_does(monkeypatch, policy):
    # a ragged layer's decode step (with the mass H2O and CAKE score by, or without) runs one
    # loop over the rows where they lie (native.rows_decode); with the loops off, the torch
    # path: the same tokens, kept counts and logits (float32 sums in another order)
    import effllm.kv.attention as kv_attention
    from effllm import native
    from effllm.kv import AdaKV

    if not native.available():
        pytest.skip(f"the native loops do not build here: {native.why_unavailable()}")
    policy = AdaKV(SnapKV(0.5, window=4)) if policy == "adakv-snapkv" else policy
    model = _tiny(layers=2, seed=13)
    ids, mask = _left_pad([_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in (19, 44, 31)])
    steps = dict(max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0, output_logits=True,
                 return_dict_in_generate=True)

    def run():
        with compress(model, policy) as kv, torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, **steps)
            assert all(layer.ragged is not None for layer in kv.last_cache.layers)
            return out.sequences, torch.stack(out.logits), kv.stats()["kept_per_head"]

    def refuse(*_args, **_kwargs):
        raise AssertionError("a ragged decode step took the torch path")

    monkeypatch.setattr(kv_attention, "decode_attention_unchecked", refuse)
    tokens, logits, kept = run()
    monkeypatch.undo()
    monkeypatch.setenv("EFFLLM_NATIVE", "0")
    monkeypatch.setattr(native, "rows_decode", refuse)
    torch_tokens, torch_logits, torch_kept = run()
    assert tokens.tolist() == torch_tokens.tolist() and kept == torch_kept
    torch.testing.assert_close(logits, torch_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv", [H2O(0.5, recent=0.25, slack=2), CAKE(0.5, window=4, slack=2), "adakv-snapkv", "kvzip",
                                "nsnquant", "adakv-snapkv+nsnquant"])
def test_a_cache_prefilled_under_inference_mode_decodes_outside_it(kv):
    # Tensors made under torch.inference_mode cannot be written in place outside it, which a
    # ragged layer does at every step: a prefill there and decoding under no_grad (generate's
    # mode) crashed. The first step outside copies the cache once; it then decodes, and reorders
    # beams, as a cache made without inference mode does.
    from effllm.kv import AdaKV, KVzip, NSNQuant

    snap, nsn = AdaKV(SnapKV(0.5, window=4)), NSNQuant(bits=2, residual=8, chunk=8)  # codes, not only windows
    policy, quantizer = {"adakv-snapkv": (snap, None), "kvzip": (KVzip(0.5, prompt_ids=[5, 6, 7]), None),
                         "nsnquant": (None, nsn), "adakv-snapkv+nsnquant": (snap, nsn)}.get(kv, (kv, None))
    model = _tiny(layers=2, seed=13)
    ids, mask = _left_pad([_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in (19, 44, 31)])

    def run(prefill_mode):
        with compress(model, policy, quantizer) as handle:
            cache = handle.new_cache(page_size=8)  # pages with free slots: the next tokens go there in place
            run_mask, logits = mask, []
            with prefill_mode():
                out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                            past_key_values=cache, use_cache=True)
            assert cache.layers[1].ragged is not None  # a ragged layer: written in place while decoding
            token = out.logits[:, -1:].argmax(-1)
            for step in range(4):
                with torch.no_grad():
                    if step == 2:
                        cache.reorder_cache(torch.tensor([2, 0, 1]))  # beam search's reorder
                        token, run_mask = token[[2, 0, 1]], run_mask[[2, 0, 1]]
                    run_mask = torch.cat([run_mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
                    out = model(token, attention_mask=run_mask, position_ids=run_mask.sum(1, keepdim=True) - 1,
                                past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(-1)
            assert not cache.inference_tensors  # copied once, not at every step
            assert all(layer.read_buffers is cache.read_buffers and layer.quantizer is cache.quantizer
                       for layer in cache.layers)
            return torch.stack(logits), handle.stats()["kept_per_head"]

    logits, kept = run(torch.inference_mode)
    reference, reference_kept = run(torch.no_grad)
    assert kept == reference_kept
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("made", ["deepcopy", "reorder"])
def test_a_cache_copied_or_reordered_under_inference_mode_decodes_outside_it(made):
    # Tensors a copy (transformers' prompt-reuse recipe) or a beam reorder makes under
    # inference mode are inference tensors too; the next update outside copies them once, a
    # layer at a time, keeping what the layers share (the quantizer, the read buffers) shared.
    import copy

    from effllm.kv import AdaKV, NSNQuant

    model = _tiny(layers=2, seed=13)
    ids, mask = _left_pad([_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in (19, 44, 31)])

    def run(mode):
        with compress(model, AdaKV(SnapKV(0.5, window=4)), NSNQuant(bits=2, residual=8, chunk=8)) as handle:
            cache = handle.new_cache(page_size=8)
            with torch.no_grad():
                out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                            past_key_values=cache, use_cache=True)
            with mode():
                if made == "deepcopy":
                    cache = copy.deepcopy(cache)
                else:
                    cache.reorder_cache(torch.tensor([2, 0, 1]))
            order = [0, 1, 2] if made == "deepcopy" else [2, 0, 1]
            run_mask = torch.cat([mask[order], torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            token = out.logits[order, -1:].argmax(-1)
            with torch.no_grad():
                logits = model(token, attention_mask=run_mask, position_ids=run_mask.sum(1, keepdim=True) - 1,
                               past_key_values=cache, use_cache=True).logits
            assert not cache.inference_tensors  # copied once, not at every step
            assert all(layer.read_buffers is cache.read_buffers and layer.quantizer is cache.quantizer
                       for layer in cache.layers)
            return logits

    torch.testing.assert_close(run(torch.inference_mode), run(torch.no_grad), rtol=0, atol=0)


@pytest.mark.parametrize("policy,asked", [(CAKE(0.5, window=4, slack=2), 8), (H2O(0.5, recent=0.25, slack=5), 3),
                                          (StreamingLLM(0.5, sinks=2, slack=5), 3)],
                         ids=["CAKE", "H2O", "StreamingLLM"])
def test_a_question_appended_to_a_padded_batch_is_kept_as_alone(policy, asked):
    # per-row budgets leave the layers ragged, where a multi-token step goes to after_decode;
    # it must do what after_prefill does for a row alone (a uniform layer): a compress-once
    # policy (CAKE) appends the question, not evicting down to the budget at once; the others
    # evict down to the budget at once, not waiting for the slack (questions shorter than it)
    model = _tiny(layers=3, seed=13)
    rows = [_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in (30, 47)]
    question = _ids(asked, seed=99)[0].clamp(min=1).tolist()

    def run(prompts):
        ids, mask = _left_pad(prompts)
        cache, tokens = kv.new_cache(), []
        step = ids
        for ids_now in (ids, torch.tensor([question] * len(prompts))) + (None,) * 4:
            step = ids_now if ids_now is not None else step
            if ids_now is not ids:
                mask = torch.cat([mask, torch.ones(len(prompts), step.shape[1], dtype=mask.dtype)], 1)
            positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -step.shape[1]:]
            logits = model(step, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True).logits
            step = logits[:, -1:].argmax(-1)
            tokens.append(step)
        kept = [layer.row_lengths()[:, 0].tolist() for layer in cache.layers]
        return torch.cat(tokens, 1), kept

    with compress(model, policy) as kv, torch.inference_mode():
        together, kept_together = run(rows)
        alone = [run([row]) for row in rows]
    for i in range(len(rows)):
        assert together[i].tolist() == alone[i][0][0].tolist(), f"row {i}"
        assert [layer[i] for layer in kept_together] == [layer[0] for layer in alone[i][1]], f"row {i}"


def test_a_padded_row_that_would_be_refused_alone_is_refused_in_the_batch():
    # CAKE's window and budget and Protected's pinned count are checked per row (its own
    # tokens and budget), not against the padded width; nothing is stored
    from effllm.kv import Protected

    model = _tiny(layers=2, seed=13)
    rows = [_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in (12, 60)]
    ids, mask = _left_pad(rows)
    for policy, alone, message in [
            (CAKE(0.5, window=8), None, r"the budget of batch row 0 \(6 tokens per layer\) must exceed window=8"),
            (CAKE(40, window=16), None, r"window=16 is larger than the prompt of batch row 0 \(12 tokens\)"),
            # spans count from the padded input's start: row 0's tokens are positions 48-59
            (Protected(H2O(0.5), spans=[(50, 60)]), Protected(H2O(0.5), spans=[(2, 12)]),
             r"the spans pin 10 tokens of batch row 0, the budget keeps 6")]:
        with compress(model, policy) as kv, torch.inference_mode():
            cache = kv.new_cache()
            with pytest.raises(ValueError, match=message):
                model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            assert cache.get_seq_length() == 0
        with compress(model, alone or policy) as kv, torch.inference_mode(), \
                pytest.raises(ValueError, match=message.replace(" of batch row 0", "")):
            model(torch.tensor([rows[0]]), past_key_values=kv.new_cache(), use_cache=True)  # as alone
    with compress(model, CAKE(0.5, window=4)) as kv, torch.inference_mode():  # both rows' budgets exceed it
        model(ids, attention_mask=mask, past_key_values=kv.new_cache(), use_cache=True)
    swapped, swapped_mask = _left_pad(rows[::-1])  # the short row second: named as such
    with compress(model, CAKE(0.5, window=8)) as kv, torch.inference_mode(), \
            pytest.raises(ValueError, match=r"the budget of batch row 1 \(6 tokens per layer\)"):
        model(swapped, attention_mask=swapped_mask, past_key_values=kv.new_cache(), use_cache=True)
    # spans over the short row's padding pin none of its tokens: accepted (the long row pins 10 of 30)
    with compress(model, Protected(H2O(0.5), spans=[(0, 10)])) as kv, torch.inference_mode():
        model(ids, attention_mask=mask, past_key_values=kv.new_cache(), use_cache=True)


def test_a_refusal_in_a_later_layer_leaves_the_cache_as_it_was():
    # a policy's check that fails at layer 1 of the first prefill (layer 0 stored and evicted):
    # every layer is empty again, so the same cache takes the prompt whole afterwards
    class RefusesOnce(H2O):
        calls = 0

        def prepare(self, layer, query):
            RefusesOnce.calls += 1
            if RefusesOnce.calls == 2:
                raise ValueError("RefusesOnce: no")

    model = _tiny(layers=2, seed=13)
    ids = _ids(20)
    with compress(model, RefusesOnce(8, slack=1)) as kv, torch.inference_mode():
        cache = kv.new_cache()
        with pytest.raises(ValueError, match="RefusesOnce"):
            model(ids, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 0 and all(not layer.is_initialized for layer in cache.layers)
        model(ids, past_key_values=cache, use_cache=True)
        assert [(layer.seen, layer.stored()) for layer in cache.layers] == [(20, 8), (20, 8)]


def test_a_first_forward_with_a_row_of_padding_only_is_refused_before_anything_is_stored():
    # a prompt fed in chunks shorter than a row's padding: the next chunk's padding would be
    # stored as the row's tokens and attended unmasked (a policy reads the mask once)
    model = _tiny()
    ids = torch.tensor([[0, 0, 0, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])
    with compress(model, SnapKV(2, window=1)) as kv, torch.inference_mode():
        cache = kv.new_cache()
        with pytest.raises(ValueError, match=r"batch row\(s\) \[0\] of the first forward are all padding"):
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 0  # nothing stored: the cache can take the prompt whole
        ids, mask = torch.tensor([[0, 0, 0, 9, 9], [5, 6, 7, 8, 9]]), torch.tensor([[0, 0, 0, 1, 1], [1] * 5])
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        assert cache.layers[0].row_lengths()[:, 0].tolist() == [2, 2]


def test_right_padding_is_rejected_clearly():
    model = _tiny()
    ids, mask = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with compress(model, SnapKV(2, window=1)) as kv, torch.inference_mode(), \
            pytest.raises(ValueError, match="left-padded"):
        model(ids, attention_mask=mask, past_key_values=kv.new_cache(), use_cache=True)


def test_cake_on_a_left_padded_batch_drops_the_padding_and_holds_budgets():
    model = _tiny(layers=3, seed=14)
    rows = [_ids(n, seed=40 + n)[0].clamp(min=1).tolist() for n in (25, 60)]
    ids, mask = _left_pad(rows)
    with compress(model, CAKE(0.5, window=8, slack=1)) as kv, torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        cache = kv.last_cache
    assert out.shape == (2, 65)
    for layer in cache.layers:
        lengths = layer.row_lengths()
        assert lengths.max() <= layer.budget and (lengths[0] <= 25 + 4).all()
        assert (layer.positions[layer.valid_mask()] >= 0).all() and not layer.positions[0].lt(35).logical_and(
            layer.positions[0].ge(0)).any()  # row 0's padding (positions 0..34) is gone
    with pytest.raises(ValueError, match="page_size"):
        CompressedCache(CAKE(0.5), page_size=0)


def test_fair_spans_keep_their_share_where_plain_eviction_wipes_one_out():
    from effllm.kv import Protected

    model = _tiny(layers=1, seed=15)
    ids = _ids(100, seed=15)
    spans = [(10, 30), (40, 60), (60, 80)]
    plain, _ = _prefill(model, SnapKV(25, window=5, kernel=1), ids)
    fair, _ = _prefill(model, Protected(SnapKV(25, window=5, kernel=1), spans=spans, fair=True), ids)

    def kept_per_span(cache):
        pos = cache.layers[0].positions[0]
        return torch.stack([((pos >= a) & (pos < b)).sum(-1) for a, b in spans], dim=-1)  # (H_kv, spans)

    assert (kept_per_span(fair) >= 5).all()  # each span keeps >= 25/100 of its 20 tokens, on every head
    assert (kept_per_span(plain) < 5).any()  # without it, some span on some head loses more than its share
    assert fair.layers[0].stored() == 25 and (fair.layers[0].recent_mask(5).sum(-1) == 5).all()
    with pytest.raises(ValueError, match="fair=True"):
        Protected(StreamingLLM(0.5), spans=[(0, 4)], fair=True)


@pytest.mark.parametrize("inner", [H2O(8, recent=2), SnapKV(8, window=2)], ids=["H2O", "SnapKV"])
def test_fair_spans_never_outrank_the_policys_own_recent_tokens(inner):
    # the spans' shares (1.2 and 6.8 of 8) are whole tokens adding up to the budget, and the
    # policy's recent window stays (rounded up, they took 9 of 8 and pushed out the last token)
    from effllm.kv import Protected
    from effllm.kv.policies import _apportion

    assert _apportion(8, 20, [3, 17]) == [1, 7] and _apportion(10, 20, [5, 5, 5, 5]) == [3, 3, 2, 2]
    assert _apportion(8, 20, [12, 3], room=5) == [4, 1]  # 4.8 + 1.2 scaled into the 5 places left
    assert _apportion(8, 20, [14, 2], room=4) == [3, 1]  # 3.5 + 0.5 after scaling: the tie to the smaller
    model = _tiny(layers=1, seed=3)
    fair, _ = _prefill(model, Protected(inner, spans=[(0, 3), (3, 20)], fair=True), _ids(20, seed=3))
    positions = fair.layers[0].positions[0]
    assert fair.layers[0].stored() == 8 and (positions >= 18).sum(-1).tolist() == [2] * positions.shape[0]


@pytest.mark.parametrize("inner", [H2O(8, recent=4), SnapKV(8, window=4)], ids=["H2O", "SnapKV"])
def test_fair_spans_share_what_the_policys_own_tokens_leave(inner):
    # the recent window (4 tokens) lies in no span: the spans share the other 4 places, and the
    # late span keeps its share (given the whole budget, 6 + 1 with 4 forced, it lost it on every head)
    from effllm.kv import Protected

    model = _tiny(layers=1, seed=3)
    fair, _ = _prefill(model, Protected(inner, spans=[(0, 14), (14, 16)], fair=True), _ids(20, seed=3))
    positions = fair.layers[0].positions[0]
    late, recent = ((positions >= 14) & (positions < 16)).sum(-1), (positions >= 16).sum(-1)
    assert fair.layers[0].stored() == 8 and (late >= 1).all() and (recent == 4).all()


@pytest.mark.parametrize("policy", [H2O(20, recent=4), SnapKV(20, window=4)], ids=lambda p: type(p).__name__)
def test_reset_cache_takes_a_new_prompt_like_a_fresh_one(policy):
    # SnapKV's cache dropped its positions after the first prompt: reset() tracks them again
    model = _tiny(seed=16)
    with compress(model, policy) as kv, torch.inference_mode():
        cache = kv.new_cache()
        model(_ids(50, seed=1), past_key_values=cache, use_cache=True)
        cache.reset()
        reused = model(_ids(33, seed=2), past_key_values=cache, use_cache=True).logits
        assert cache.get_seq_length() == 33 and cache.layers[0].budget == 20
        fresh_cache = kv.new_cache()
        fresh = model(_ids(33, seed=2), past_key_values=fresh_cache, use_cache=True).logits
    torch.testing.assert_close(reused, fresh)
    for a, b in zip(cache.layers, fresh_cache.layers, strict=True):
        assert (a.positions is None) == (b.positions is None) == (not policy.evicts_later)
        assert a.positions is None or torch.equal(a.positions, b.positions)


@pytest.mark.parametrize("page_size", [None, 3])
def test_ragged_appends_across_pages_keep_every_row_in_order(page_size):
    from effllm.kv.ragged import RaggedKV

    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 9, 4, generator=gen)
    keep = torch.rand(3, 9, generator=gen) < 0.5
    keep[:, 0] = True
    store = RaggedKV.from_padded(keys, -keys, keep, page_size=page_size)
    rows = [list(keys[r][keep[r]]) for r in range(3)]
    for step in range(11):  # one token at a time, then a multi-token append: pages and capacity grow
        new = torch.randn(3, 1 if step < 10 else 4, 4, generator=gen)
        store.append(new, -new)
        for r in range(3):
            rows[r].extend(new[r])
    got_k, got_v = store.padded()
    for r in range(3):
        expect = torch.stack(rows[r])
        assert int(store.lengths[r]) == int(store.lengths_host[r]) == len(expect)
        torch.testing.assert_close(got_k[r, :len(expect)], expect)
        torch.testing.assert_close(got_v[r, :len(expect)], -expect)


@pytest.mark.parametrize("page_size", [None, 3])
def test_ragged_keep_moves_only_the_rows_that_lose_tokens(page_size):
    # Eviction on a ragged layer compacts the losing rows within their own slots or pages: the
    # kept tokens in order, other rows untouched, no memory given back; appends then go on.
    from effllm.kv.ragged import RaggedKV

    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(4, 13, 5, generator=gen)
    lengths = torch.tensor([13, 7, 11, 2])
    store = RaggedKV.from_padded(keys, -keys, torch.arange(13)[None, :] < lengths[:, None], page_size=page_size)
    pool, slots = store.k, store.allocated_slots()
    keep = torch.rand(4, 13, generator=gen) < 0.6
    keep[1] = True  # row 1 keeps every token it has (and the slots past its length do not count)
    keep[3, :2] = torch.tensor([False, True])
    keep[0, :3] = True  # leading kept tokens stay where they are
    store.keep(keep)
    assert store.k is pool and store.allocated_slots() == slots
    rows = [list(keys[r, :n][keep[r, :n]]) for r, n in enumerate(lengths.tolist())]
    assert store.lengths_host.tolist() == store.lengths.tolist() == [len(r) for r in rows]
    for step in range(6):
        new = torch.randn(4, 1 if step < 5 else 3, 5, generator=gen)
        store.append(new, -new)
        for r in range(4):
            rows[r].extend(new[r])
    got_k, got_v = store.padded()
    for r in range(4):
        expect = torch.stack(rows[r])
        assert int(store.lengths_host[r]) == len(expect)
        torch.testing.assert_close(got_k[r, :len(expect)], expect, rtol=0, atol=0)
        torch.testing.assert_close(got_v[r, :len(expect)], -expect, rtol=0, atol=0)


@pytest.mark.parametrize("page_size", [None, 4])
def test_a_ragged_layer_evicts_a_few_tokens_in_place_and_most_into_a_new_store(page_size):
    # decode-time eviction (a token or two a row) keeps the store and its memory for the tokens
    # decoded next; keeping under half of what the store holds lays the rows out afresh, smaller
    model = _tiny(layers=1, seed=13)
    ids, mask = _left_pad([_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in (19, 44, 31)])
    policy = H2O(0.5, recent=0.25)  # evicts while decoding: keeps positions and scores to compact too
    cache = CompressedCache(policy, num_layers=1, page_size=page_size)
    with compress(model, policy), torch.inference_mode():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        _evict_few_then_most(cache.layers[0])


def _evict_few_then_most(layer):
    """The rest of the test above, in inference mode (the cache's tensors are inference tensors)."""
    store, pool = layer.ragged, layer.ragged.k
    lengths = layer.row_lengths()
    slots = torch.arange(layer.stored())
    keys_before = store.padded()[0].clone()

    def keep(mask, expect):
        positions = layer.positions
        layer.keep_mask(mask, priority=layer.scores)
        rows = mask.flatten(0, 1)
        for r in range(rows.shape[0]):
            kept = int(rows[r].sum())
            torch.testing.assert_close(layer.ragged.padded()[0][r, :kept], expect[r][rows[r]], rtol=0, atol=0)
            assert layer.positions.flatten(0, 1)[r, :kept].tolist() == positions.flatten(0, 1)[r][rows[r]].tolist()

    few = slots < (lengths - 1 - (lengths % 2))[..., None]  # one or two tokens off the end of each row
    few[0, 0, 1] = False  # and one from the middle
    keep(few, keys_before)
    assert layer.ragged is store and store.k is pool and layer.row_lengths().tolist() == few.sum(-1).tolist()
    allocated = store.allocated_slots()
    keys_now = store.padded()[0].clone()
    most = (torch.arange(layer.stored()) < 3).expand(*lengths.shape, -1)
    keep(most, keys_now)
    assert layer.ragged is not store and layer.ragged.allocated_slots() < allocated // 2
    assert layer.row_lengths().tolist() == [[3] * lengths.shape[1]] * lengths.shape[0]


def test_paged_rows_are_laid_out_again_before_most_scatter():
    # New pages go to the end of the pool: a row that takes one is no longer read in place.
    # Before most rows would be, the store lays every row out again, each with room to grow
    # (1/16 of its length), so decoding keeps reading rows in place; the tokens stay in order.
    from effllm.kernels._decode_impl import consecutive_pages as _consecutive_pages
    from effllm.kv.ragged import RaggedKV

    gen = torch.Generator().manual_seed(3)
    lengths = [70, 12, 41, 33, 90, 5]
    keys = torch.randn(6, 90, 4, generator=gen)
    keep = torch.arange(90)[None, :] < torch.tensor(lengths)[:, None]
    store = RaggedKV.from_padded(keys, -keys, keep, page_size=8)
    rows = [list(keys[r, :n]) for r, n in enumerate(lengths)]
    relayouts, pool = 0, store.k
    for _ in range(60):
        new = torch.randn(6, 1, 4, generator=gen)
        store.append(new, -new)
        relayouts += store.k is not pool and store.pages_used == int(store.pages_host.sum())
        pool = store.k
        for r in range(6):
            rows[r].append(new[r, 0])
        in_place = _consecutive_pages(store.block_table, store.lengths_host.tolist(), 8)
        assert len(in_place) * 2 >= 6 and int(store.scattered.sum()) * 2 <= 6
    assert relayouts >= 2
    got_k, got_v = store.padded()
    for r in range(6):
        torch.testing.assert_close(got_k[r, :len(rows[r])], torch.stack(rows[r]))
        torch.testing.assert_close(got_v[r, :len(rows[r])], -torch.stack(rows[r]))
    # memory: the rows' tokens, 1/16 of room each, and less than one page per row otherwise
    final = store.lengths_host
    assert store.pages_used <= int(((final + final // 16 + 8 - 1) // 8).sum()) + 6


def test_auto_page_size_uses_one_tensor_only_while_padding_is_small():
    from effllm.kv.cache import _auto_page_size

    assert _auto_page_size(torch.tensor([[100, 96, 99]]), cuda=False) is None  # 5 padded of 295
    assert _auto_page_size(torch.tensor([[300, 40, 290]]), cuda=False) == 64  # 11 pages: 704 against 900
    # rows padded that hold no more than the pages would: 300 against 5 pages (320); 3 x 50 against 3 x 64
    assert _auto_page_size(torch.tensor([[100, 40, 99]]), cuda=False) is None
    assert _auto_page_size(torch.tensor([[50, 10, 30]]), cuda=False) is None
    assert _auto_page_size(torch.tensor([[100, 96, 99]]), cuda=True) == 16


def test_decode_appends_write_in_place_without_copying_the_layer():
    model = _tiny()
    cache, logits = _prefill(model, SnapKV(64, window=8), _ids(100))
    layer = cache.layers[0]
    token = logits[:, -1:].argmax(-1)
    storages = []
    with compress(model, SnapKV(64, window=8)), torch.inference_mode():
        for _ in range(6):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            storages.append((layer.keys.untyped_storage().data_ptr(), layer.positions.untyped_storage().data_ptr()))
    # 64 kept: the first step grows the buffer to 64 + 1 + 2 (1/32 spare), the next two write
    # into it; the fourth grows it to 68 + 2 and the last two write into that (positions alike)
    assert storages == [storages[0]] * 3 + [storages[3]] * 3
    assert storages[3][0] != storages[0][0] and storages[3][1] != storages[0][1]
    assert torch.equal(layer.positions[0, 0, -6:], torch.arange(100, 106))
    assert layer.stored() == 70 and layer.keys.untyped_storage().nbytes() == 2 * 70 * 16 * 4  # (1, 2, 70, 16) fp32


# ---- beam search: reordering batch rows --------------------------------------------------------

@pytest.mark.parametrize("policy,page_size", [
    (SnapKV(0.5, window=6), None), (H2O(0.5, recent=4), None),
    ("adakv", None), ("adakv", 4)], ids=["SnapKV", "H2O", "AdaKV-rows", "AdaKV-paged"])
def test_reordered_rows_continue_like_a_cache_built_in_that_order(policy, page_size):
    # Row b takes row order[b]'s keys, values, positions and scores, ragged rows included: the
    # next steps (with H2O, decode-time evictions that read the moved scores) match a cache
    # that was built from the prompts in that order.
    from effllm.kv import AdaKV

    policy = AdaKV(SnapKV(0.5, window=6), alpha_safeguard=0.5) if policy == "adakv" else policy
    model = _tiny(seed=12)
    ids, first = _ids(40, seed=12, batch=2), _ids(1, seed=13, batch=2)
    order = torch.tensor([1, 0, 1])
    later = [_ids(1, seed=14 + i, batch=3) for i in range(3)]
    with compress(model, policy) as kv, torch.inference_mode():
        cache = kv.new_cache(page_size=page_size, keep_positions=True)
        want_cache = kv.new_cache(page_size=page_size, keep_positions=True)
        model(ids, past_key_values=cache, use_cache=True)
        model(first, past_key_values=cache, use_cache=True)
        cache.reorder_cache(order)
        model(ids[order], past_key_values=want_cache, use_cache=True)
        model(first[order], past_key_values=want_cache, use_cache=True)
        for step in later:
            got = model(step, past_key_values=cache, use_cache=True).logits
            want = model(step, past_key_values=want_cache, use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if page_size is not None or isinstance(policy, AdaKV):
        assert any(layer.ragged is not None for layer in cache.layers)
    for layer, want_layer in zip(cache.layers, want_cache.layers):
        assert torch.equal(layer.positions, want_layer.positions)
        assert torch.equal(layer.row_lengths(), want_layer.row_lengths())


def test_beam_search_runs_on_a_compressed_cache():
    # Nothing evicted (the budget is the prompt): the same beams as transformers' own cache.
    model = _tiny(seed=15)
    ids = _ids(30, seed=15, batch=2)
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
        with compress(model, SnapKV(1.0, window=6)):
            got = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
        with compress(model, H2O(0.5, recent=4)) as kv:  # evicting while the beams reorder
            cache = kv.new_cache()
            out = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, past_key_values=cache)
    assert torch.equal(got, want)
    assert out.shape == (2, 36) and all((layer.row_lengths() <= 15 + 1).all() for layer in cache.layers)


def test_unwired_cache_refuses_or_is_adopted_by_generate():
    # A CompressedCache on a model that is not patched would keep every token silently.
    model = _tiny()
    ids = _ids(40)
    with pytest.raises(ValueError, match="not wired"), torch.inference_mode():
        model.generate(ids, max_new_tokens=2, past_key_values=CompressedCache(SnapKV(0.5, window=4)))
    # Given to generate() of a patched model, the same kind of cache is wired and compresses.
    with effllm.patched(model, kv=SnapKV(0.5, window=4)) as handle, torch.inference_mode():
        cache = CompressedCache(SnapKV(0.5, window=4))
        model.generate(ids, max_new_tokens=2, past_key_values=cache)
        assert handle.kv.stats() == cache.stats()
    assert cache.layers[0].stored() < ids.shape[1]


def test_a_cache_outlives_its_patch_as_an_unwired_cache():
    # After unpatch() a cache made by handle.kv.new_cache() is read by plain attention: it must
    # then hand out every stored token (dequantized), not only the new one.
    model, quantizer = _tiny(), effllm.kv.NSNQuant(bits=2, residual=0, chunk=4)
    ids = _ids(12)
    with torch.inference_mode():
        with effllm.patched(model, kv=quantizer) as handle:
            orphan = handle.kv.new_cache()
        fresh = effllm.kv.QuantizedKVCache(quantizer)
        got, want = [], []
        for cache, out in ((orphan, got), (fresh, want)):
            out.append(model(ids, past_key_values=cache).logits)
            out.append(model(ids[:, -1:], past_key_values=cache).logits)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(ValueError, match="not wired"), torch.inference_mode():  # a policy's cache refuses
        with effllm.patched(model, kv=SnapKV(0.5, window=4)) as handle:
            cache = handle.kv.new_cache()
        model(ids, past_key_values=cache)
    with effllm.patched(model, kv=SnapKV(0.5, window=4)) as handle, torch.inference_mode():
        model(ids, past_key_values=cache)  # a patched model's forward adopts it, as generate() does
        assert cache.owner is handle.kv and cache.layers[0].stored() < ids.shape[1]


def test_generate_refuses_a_cache_wired_to_another_model_and_ignores_foreign_caches():
    from transformers import DynamicCache

    first, second, ids = _tiny(), _tiny(), _ids(20)
    with effllm.patched(first, kv=SnapKV(0.5, window=4)) as one, \
            effllm.patched(second, kv=SnapKV(0.5, window=4)) as two, torch.inference_mode():
        cache = one.kv.new_cache()
        with pytest.raises(ValueError, match="another patched model"):
            second.generate(ids, max_new_tokens=2, past_key_values=cache)
        with pytest.raises(ValueError, match="another patched model"):
            second(ids, past_key_values=cache)
        assert cache.get_seq_length() == 0 and two.kv.stats() == {}
        second.generate(ids, max_new_tokens=2, past_key_values=DynamicCache())
        assert two.kv.stats() == {}  # a transformers cache has no effllm stats


@pytest.mark.parametrize("make", [lambda: effllm.kv.KIVI(bits=2.0), lambda: effllm.kv.KIVI(bits=True),
                                  lambda: StreamingLLM(0.5, sinks=1.5), lambda: StreamingLLM(0.5, sinks=True),
                                  lambda: SnapKV(0.5, window=4.0), lambda: SnapKV(0.5, kernel=True),
                                  lambda: CAKE(0.5, window=4.0), lambda: CAKE(0.5, kernel=True),
                                  lambda: CAKE(0.5, tau1="1"), lambda: CAKE(8, window=1)])
def test_non_integer_settings_are_refused_at_construction(make):
    # Accepted before, they failed later inside generate() (CAKE's window of 1: a NaN variance).
    with pytest.raises(ValueError, match="must be"):
        make()


def test_numpy_budgets_are_taken_as_python_numbers():
    np = pytest.importorskip("numpy")
    assert SnapKV(np.int64(8)).budget == 8 and type(SnapKV(np.int64(8)).budget) is int
    assert SnapKV(np.float64(0.5)).tokens(10) == 5
    with pytest.raises(ValueError, match="budget must be"):
        SnapKV(np.bool_(True))


def test_a_policy_is_a_small_scorer_and_the_framework_does_the_rest():
    # A new policy is score(view) plus settings: budget, recent window, sinks, eviction and
    # storage are the framework's (here: keep the keys of smallest norm, KnormPress's rule).
    from effllm.kv import Policy

    class KeyNorm(Policy):
        compress_once = True
        sinks = 2

        def score(self, view):
            return -view.keys.float().norm(dim=-1)

        def recent_tokens(self, keep, decoding):
            return 4

    cache, _ = _prefill(_tiny(seed=11), KeyNorm(16), _ids(50, seed=11))
    full, _ = _prefill(_tiny(seed=11), StreamingLLM(1.0), _ids(50, seed=11))  # keeps everything
    for layer, whole in zip(cache.layers, full.layers):
        assert layer.stored() == 16
        norms = whole.keys.float().norm(dim=-1)[0]  # (H_kv, 50)
        for head in range(norms.shape[0]):
            rest = norms[head, 2:46]
            best = set((rest.argsort()[:10] + 2).tolist())  # 16 - 2 sinks - 4 recent
            assert set(layer.positions[0, head].tolist()) == {0, 1, 46, 47, 48, 49} | best


def test_a_refused_first_prefill_leaves_the_cache_as_it_was():
    model, ids = _tiny(), _ids(10)
    right_padded = torch.ones_like(ids)
    right_padded[:, -2:] = 0
    with effllm.patched(model, kv=H2O(0.5, recent=4)) as handle, torch.inference_mode():
        cache = handle.kv.new_cache()
        with pytest.raises(ValueError, match="left-padded"):  # padding after a token
            model(ids, attention_mask=right_padded, past_key_values=cache)
        assert cache.get_seq_length() == 0 and all(layer.seen == 0 for layer in cache.layers)
        got = model(ids, past_key_values=cache).logits
        want = model(ids, past_key_values=handle.kv.new_cache()).logits
    assert torch.equal(got, want)


def test_a_quantized_cache_refusing_softcap_with_a_mask_keeps_nothing_of_the_call():
    from effllm.kv.attention import attend_cache

    with effllm.patched(_tiny(), kv=effllm.kv.KIVI(bits=4, group=8, residual=8)) as handle:
        cache = handle.kv.new_cache()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 10, 16, generator=gen) for h in (4, 2, 2))
    key, value = cache.update(k, v, 0)
    with pytest.raises(ValueError, match="softcap"):
        attend_cache(cache, 0, q, key, value, torch.ones(1, 1, 10, 10, dtype=torch.bool), 0.25, 30.0, "torch")
    assert cache.get_seq_length() == 0 and cache.layers[0].seen == 0


def test_cache_settings_after_the_policy_are_keywords():
    # CompressedCache(SnapKV(0.5), NSNQuant()) once took the quantizer for num_layers, silently.
    with pytest.raises(TypeError):
        CompressedCache(SnapKV(0.5), effllm.kv.NSNQuant())
    with pytest.raises(ValueError, match="num_layers"):
        CompressedCache(SnapKV(0.5), num_layers=2.5)
    assert CompressedCache(SnapKV(0.5), quantizer=effllm.kv.NSNQuant()).quantizer is not None


@pytest.mark.parametrize("quantizer", [None, "nsnquant"])
def test_a_copied_cache_continues_on_the_same_model_and_leaves_the_original_alone(quantizer):
    # transformers' recipe for reusing a prompt's cache is copy.deepcopy(prompt_cache): the copy
    # must stay wired to the patched model (not to a deep copy of it) and decode on its own
    import copy
    import pickle

    from effllm.kv import NSNQuant

    model = _tiny(seed=5)
    prompt = torch.randint(1, 100, (1, 40), generator=torch.Generator().manual_seed(3))
    question = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(4))
    kv = H2O(0.5) if quantizer is None else (H2O(0.5), NSNQuant(bits=2, residual=4, chunk=8))
    with effllm.patched(model, kv=kv) as handle, torch.inference_mode():
        cache = handle.kv.new_cache()
        model(prompt, past_key_values=cache, use_cache=True)
        before = (cache.get_seq_length(), cache.nbytes(), cache.stats()["kept_per_head"])
        ids = torch.cat([prompt, question], 1)
        runs = []
        for _ in range(2):
            copied = copy.deepcopy(cache)
            assert copied.owner is cache.owner  # the model is shared, not copied
            runs.append(model.generate(ids, past_key_values=copied, max_new_tokens=12, min_new_tokens=12, do_sample=False))
        assert (cache.get_seq_length(), cache.nbytes(), cache.stats()["kept_per_head"]) == before
        torch.testing.assert_close(runs[0], runs[1])
        assert copied.get_seq_length() == ids.shape[1] + 11  # the copy moved on (H2O holds its budget)
        # pickled, it comes back unwired; the patched model adopts it at its next forward
        restored = pickle.loads(pickle.dumps(cache))
        assert restored.owner is None
        again = model.generate(ids, past_key_values=restored, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert restored.owner is cache.owner
        torch.testing.assert_close(again, runs[0])
        # a copy of the whole model copies its caches with it, wired to the copy
        twin = copy.deepcopy(model)
        twin_cache = twin.generate.feature.last_cache
        assert twin_cache is not handle.kv.last_cache and twin_cache.owner is twin.generate.feature
        twin.generate(ids, past_key_values=twin_cache, max_new_tokens=2, do_sample=False)


def test_a_chunked_prefill_with_a_policy_is_refused_before_anything_runs():
    # the policy would take its budget from the first chunk and compress the rest against it
    from transformers import GenerationConfig

    from effllm.kv import KIVI

    model = _tiny(seed=2)
    ids = torch.randint(1, 100, (1, 60), generator=torch.Generator().manual_seed(3))
    with effllm.patched(model, kv=SnapKV(0.5, window=4)) as handle:
        for extra in ({"prefill_chunk_size": 20}, {"generation_config": GenerationConfig(prefill_chunk_size=20)}):
            with pytest.raises(ValueError, match="prefill_chunk_size"):
                model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, **extra)
            assert handle.kv.last_cache is None
    with effllm.patched(model, kv=KIVI(bits=4, group=8, residual=8)), torch.inference_mode():  # nothing to budget
        chunked = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, prefill_chunk_size=20)
        whole = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        # the cache that will be used decides: one with a policy is refused on a quantizer-patched model
        with pytest.raises(ValueError, match="prefill_chunk_size"):
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, prefill_chunk_size=20,
                           past_key_values=CompressedCache(SnapKV(0.5, window=4), quantizer=KIVI(4, 8, 8)))
    assert chunked.shape == whole.shape
    with effllm.patched(model, kv=SnapKV(0.5, window=4)), torch.inference_mode():
        # a policy-less cache on a policy-patched model takes a chunked prefill; None overrides the config's
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, prefill_chunk_size=20,
                       past_key_values=CompressedCache(quantizer=KIVI(4, 8, 8)))
        model.generation_config.prefill_chunk_size = 20
        try:
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, prefill_chunk_size=None)
        finally:
            model.generation_config.prefill_chunk_size = None


def test_budgets_below_what_a_policy_always_keeps_keep_its_newest_or_first_tokens():
    # documented behaviour for budgets smaller than SnapKV's window or not above StreamingLLM's sinks
    model = _tiny(layers=1, seed=4)
    snap, _ = _prefill(model, SnapKV(4, window=8), _ids(40, seed=4))
    assert (snap.layers[0].positions[0].sort(-1).values == torch.arange(36, 40)).all()
    stream, _ = _prefill(model, StreamingLLM(4, sinks=4), _ids(40, seed=4))
    assert (stream.layers[0].positions[0].sort(-1).values == torch.arange(0, 4)).all()
