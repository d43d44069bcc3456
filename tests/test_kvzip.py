"""KVzip: the replay's attention and scores against explicit references, a cache the replay
leaves untouched, budgets per layer or shared by all layers, generate(), and bad settings."""

import math

import pytest
import torch
import torch.nn.functional as F

from effllm.kv import KVzip, Protected, SnapKV, compress
from effllm.kv.kvzip import ReplayChunk, replay_attention
from effllm.testing.models import tiny_causal_lm

pytest.importorskip("transformers")

PROMPT = [7, 8, 9, 10]


def _ids(n, seed=1, batch=1):
    return torch.randint(0, 101, (batch, n), generator=torch.Generator().manual_seed(seed))


class RecordingKVzip(KVzip):
    """KVzip that keeps a copy of every layer's replay scores before it evicts."""

    def _evict(self, cache):
        self.recorded = [layer.scores.clone() for layer in cache.layers]
        super()._evict(cache)


def test_replay_attention_matches_sdpa_and_explicit_scores():
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, stored, new, dim = 2, 6, 2, 11, 5, 8
    q = torch.randn(batch, heads, new, dim, generator=gen)
    k = torch.randn(batch, kv_heads, stored + new, dim, generator=gen)
    v = torch.randn(batch, kv_heads, stored + new, dim, generator=gen)
    out, best = replay_attention(q, k, v, 0.3, stored)
    # the replay queries sit at the last `new` positions: causal, aligned bottom-right
    visible = torch.ones(new, stored + new, dtype=torch.bool).tril(diagonal=stored)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=0.3, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    probs = torch.softmax((q @ k.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2) * 0.3)
                          .masked_fill(~visible, float("-inf")), dim=-1)
    ref_best = probs[..., :stored].view(batch, kv_heads, heads // kv_heads, new, stored).amax(dim=(2, 3))
    torch.testing.assert_close(best, ref_best)


@pytest.mark.parametrize("start,end,sinks", [(0, 5, 2), (4, 9, 2), (6, 11, 3), (3, 11, 0), (0, 11, 2)])
def test_replay_attention_scores_a_chunk_within_its_own_softmax(start, end, sinks):
    gen = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, stored, new, dim = 2, 6, 2, 11, 5, 8
    q = torch.randn(batch, heads, new, dim, generator=gen)
    k = torch.randn(batch, kv_heads, stored + new, dim, generator=gen)
    v = torch.randn(batch, kv_heads, stored + new, dim, generator=gen)
    valid = torch.ones(batch, stored + new, dtype=torch.bool)
    valid[1, :2] = False  # row 1 left-padded by 2: its sinks start at slot 2
    valid[1, stored:stored + 2] = False  # and its first two replay queries are padding: they score nothing
    full_out, _ = replay_attention(q, k, v, 0.3, stored, key_valid=valid)
    out, best = replay_attention(q, k, v, 0.3, stored, key_valid=valid, scored=ReplayChunk(start, end - start, sinks))
    # the output still reads the whole cache (a padding query's output is never read: not compared)
    real = valid[:, stored:]
    torch.testing.assert_close(out[real], full_out[real], rtol=1e-5, atol=1e-5)
    visible = torch.ones(new, stored + new, dtype=torch.bool).tril(diagonal=stored)
    for row, pad in ((0, 0), (1, 2)):
        allowed = torch.zeros(stored + new, dtype=torch.bool)
        allowed[pad:min(pad + sinks, start)] = True
        allowed[start:end] = True
        allowed[stored:] = True
        allowed &= valid[row]
        keys = k[row].repeat_interleave(heads // kv_heads, 0)
        probs = torch.softmax((q[row] @ keys.transpose(-1, -2) * 0.3).masked_fill(~(visible & allowed), float("-inf")),
                              dim=-1)
        probs = probs * valid[row, stored:, None]  # padding queries give no weight
        ref = probs[..., :stored].view(kv_heads, heads // kv_heads, new, stored).amax(dim=(1, 2))
        ref[:, :start] = 0
        ref[:, end:] = 0
        ref[:, ~valid[row, :stored]] = 0
        torch.testing.assert_close(best[row], ref)


def _eager_replay_scores(model, ids, chunks):
    """Reference scores: for each chunk, one eager pass over context + replay prompt + chunk;
    the replay's queries are the last rows, the context's keys the first columns. Max over
    chunks, queries and each KV head's group."""
    n = ids.shape[1]
    model.set_attn_implementation("eager")
    best = None
    for chunk in chunks:
        full = torch.cat([ids, torch.tensor([PROMPT]), chunk], dim=1)
        with torch.inference_mode():
            attentions = model(full, output_attentions=True).attentions
        scores = [a[:, :, n:, :n].reshape(1, 2, 2, -1, n).amax(dim=(2, 3)) for a in attentions]
        best = scores if best is None else [torch.maximum(x, y) for x, y in zip(best, scores)]
    model.set_attn_implementation("sdpa")
    return best


@pytest.mark.parametrize("chunk", [2048, 16])
def test_cache_scores_are_the_max_attention_of_the_replayed_context(chunk):
    model = tiny_causal_lm("llama", 3)
    ids = _ids(40)
    ref = _eager_replay_scores(model, ids, ids.split(chunk, dim=1))
    policy = RecordingKVzip(1.0, PROMPT, sinks=0, chunk=chunk, scoring="cache")
    with compress(model, policy) as kv, torch.inference_mode():
        model(ids, past_key_values=kv.new_cache(), use_cache=True)
    for scores, ref_scores in zip(policy.recorded, ref):
        torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-5)


def test_chunk_scores_are_the_replay_attention_renormalised_over_each_chunk():
    # scoring="chunk": a softmax restricted to some keys is the full one renormalised over them
    model = tiny_causal_lm("llama", 3)
    ids, chunk, sinks = _ids(40), 16, 2
    n = ids.shape[1]
    model.set_attn_implementation("eager")
    ref = None
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        full = torch.cat([ids, torch.tensor([PROMPT]), ids[:, start:end]], dim=1)
        with torch.inference_mode():
            attentions = model(full, output_attentions=True).attentions
        allowed = torch.zeros(full.shape[1], dtype=torch.bool)
        allowed[:min(sinks, start)] = allowed[start:end] = allowed[n:] = True
        scores = []
        for a in attentions:
            part = a[:, :, n:] * allowed
            part = part / part.sum(dim=-1, keepdim=True)
            best = part[..., :n].reshape(1, 2, 2, -1, n).amax(dim=(2, 3))
            best[..., :start] = 0
            best[..., end:] = 0
            scores.append(best)
        ref = scores if ref is None else [torch.maximum(x, y) for x, y in zip(ref, scores)]
    model.set_attn_implementation("sdpa")
    policy = RecordingKVzip(1.0, PROMPT, sinks=sinks, chunk=chunk, scoring="chunk")
    with compress(model, policy) as kv, torch.inference_mode():
        model(ids, past_key_values=kv.new_cache(), use_cache=True)
    for scores, ref_scores in zip(policy.recorded, ref):
        torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scoring", ["cache", "chunk"])
def test_every_chunk_is_replayed_after_the_whole_context(scoring):
    model = tiny_causal_lm("llama", 3)
    seen = []

    def record(module, args, kwargs):
        if kwargs.get("position_ids") is not None:
            seen.append(int(kwargs["position_ids"][0, 0]))

    hook = model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with compress(model, KVzip(0.5, PROMPT, chunk=16, scoring=scoring)) as kv, torch.inference_mode():
            model(_ids(40), past_key_values=kv.new_cache(), use_cache=True)
    finally:
        hook.remove()
    assert seen[-3:] == [40, 40, 40]  # the three replay passes, after the prefill


def test_one_chunk_scores_the_same_whatever_the_scoring():
    model = tiny_causal_lm("llama", 3)
    ids = _ids(40)
    recorded = {}
    for scoring in ("cache", "chunk"):
        policy = RecordingKVzip(1.0, PROMPT, sinks=2, scoring=scoring)
        with compress(model, policy) as kv, torch.inference_mode():
            model(ids, past_key_values=kv.new_cache(), use_cache=True)
        recorded[scoring] = policy.recorded
    for a, b in zip(recorded["cache"], recorded["chunk"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_replay_leaves_the_cache_as_a_full_one_at_full_budget():
    model = tiny_causal_lm("llama", 0)
    ids, nxt = _ids(33), _ids(3, seed=2)
    with torch.inference_mode():
        from transformers import DynamicCache

        ref_cache = DynamicCache(config=model.config)
        model(ids, past_key_values=ref_cache, use_cache=True)
        ref = model(nxt, past_key_values=ref_cache, use_cache=True).logits
    with compress(model, KVzip(1.0, PROMPT)) as kv, torch.inference_mode():
        cache = kv.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 33 and not cache.replaying
        for layer, ref_layer in zip(cache.layers, ref_cache.layers):
            assert layer.stored() == 33  # no replay token was stored
            torch.testing.assert_close(layer.keys, ref_layer.keys[:, :, :33])
        out = model(nxt, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(out, ref)


def test_layer_scope_keeps_the_budget_and_the_sinks_and_frees_memory():
    model = tiny_causal_lm("llama", 1)
    with compress(model, KVzip(12, PROMPT, scope="layer", sinks=3)) as kv, torch.inference_mode():
        cache = kv.new_cache(keep_positions=True)
        model(_ids(40), past_key_values=cache, use_cache=True)
        stats = kv.stats()
    for layer in cache.layers:
        assert layer.ragged is None and layer.stored() == 12
        assert bool((layer.positions[..., :3] == torch.arange(3)).all())
        assert bool((layer.positions.diff(dim=-1) > 0).all())  # token order preserved
    assert stats["kv_bytes"] == pytest.approx(stats["kv_bytes_full"] * 12 / 40)


def test_global_scope_shares_one_budget_across_layers_and_heads():
    model = tiny_causal_lm("llama", 2, num_hidden_layers=3)
    policy = RecordingKVzip(10, PROMPT, sinks=2)
    with compress(model, policy) as kv, torch.inference_mode():
        cache = kv.new_cache(keep_positions=True)
        model(_ids(40), past_key_values=cache, use_cache=True)
        kept = kv.stats()["kept_per_head"]
    counts = torch.tensor(kept).flatten()
    assert int(counts.sum()) == 10 * 3 * 2  # budget x layers x KV heads
    assert len(set(counts.tolist())) > 1  # layers and heads really differ
    # the kept tokens are the best-scored ones of all layers together (sinks aside)
    threshold = None
    for layer, scores in zip(cache.layers, policy.recorded):
        positions = layer.positions.clamp(min=0)
        kept_scores = scores.gather(-1, positions).masked_fill((layer.positions < 2) | (layer.positions < 0), 2.0)
        low = float(kept_scores.min())
        threshold = low if threshold is None else min(threshold, low)
    dropped = []
    for layer, scores in zip(cache.layers, policy.recorded):
        mask = torch.ones_like(scores, dtype=torch.bool)
        mask.scatter_(-1, layer.positions.clamp(min=0), layer.positions < 0)
        dropped.append(scores[mask])
    assert float(torch.cat(dropped).max()) <= threshold


def test_after_the_replay_the_cache_drops_positions_it_will_never_read():
    # KVzip evicts once, after its replay: the per-slot positions (padded to the longest row in
    # the global scope) are dead weight from then on, with or without a quantizer
    from effllm.kv import NSNQuant

    model = tiny_causal_lm("llama", 2, num_hidden_layers=3)
    steps = [torch.tensor([[t]]) for t in (3, 8, 1)]
    for quantizer in (None, NSNQuant(bits=2, residual=4, chunk=8)):
        runs = {}
        for keep in (False, True):
            kv_setting = KVzip(10, PROMPT, sinks=2) if quantizer is None else (KVzip(10, PROMPT, sinks=2), quantizer)
            with compress(model, kv_setting) as kv, torch.inference_mode():
                cache = kv.new_cache(keep_positions=keep)
                logits = [model(_ids(40), past_key_values=cache, use_cache=True).logits[:, -1:]]
                logits += [model(token, past_key_values=cache, use_cache=True).logits for token in steps]
            runs[keep] = (cache, torch.cat(logits, 1))
        (dropped, got), (kept, want) = runs[False], runs[True]
        assert torch.equal(got, want)
        assert all(layer.ragged is not None and layer.positions is None for layer in dropped.layers)
        slot_bytes = sum(layer.positions.numel() * layer.positions.element_size() for layer in kept.layers)
        assert slot_bytes > 0 and dropped.nbytes() == kept.nbytes() - slot_bytes
        # reset: the next prompt is scored and evicted as in a fresh cache (positions tracked again)
        with compress(model, kv_setting) as kv, torch.inference_mode():
            fresh = kv.new_cache()
            want = model(_ids(40, seed=9), past_key_values=fresh, use_cache=True).logits
            kv.adopt(dropped)
            dropped.reset()
            got = model(_ids(40, seed=9), past_key_values=dropped, use_cache=True).logits
        assert torch.equal(got, want) and dropped.stats()["kept_per_head"] == fresh.stats()["kept_per_head"]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pooled_scores_keep_the_neighbours_of_the_best_tokens(scope):
    model = tiny_causal_lm("llama", 2, num_hidden_layers=3)
    kept = {}
    for kernel in (1, 5):
        policy = RecordingKVzip(10, PROMPT, sinks=2, scope=scope, kernel=kernel)
        with compress(model, policy) as kv, torch.inference_mode():
            cache = kv.new_cache(keep_positions=True)
            model(_ids(40), past_key_values=cache, use_cache=True)
        kept[kernel] = [layer.positions.clone() for layer in cache.layers]
        # a token's pooled score: the largest raw score within kernel // 2 tokens of it, the
        # sinks (kept anyway) lending nothing; a peak: a token that is its own window's largest
        groups = []  # (pooled, peak, kept) of the non-sink tokens, per head (layer scope) or all
        for layer, raw in zip(cache.layers, policy.recorded):
            sink = torch.arange(raw.shape[-1]) < 2
            lent = raw.masked_fill(sink, 0.0)
            pooled = lent.clone()
            for shift in range(1, kernel // 2 + 1):
                pooled[..., shift:] = torch.maximum(pooled[..., shift:], lent[..., :-shift])
                pooled[..., :-shift] = torch.maximum(pooled[..., :-shift], lent[..., shift:])
            taken = torch.zeros_like(raw, dtype=torch.bool)
            taken.scatter_(-1, layer.positions.clamp(min=0), layer.positions >= 0)
            for head in range(raw.shape[1]):
                groups.append((pooled[0, head][~sink], (pooled == lent)[0, head][~sink], taken[0, head][~sink]))
        if scope == "global":  # all layers and heads compete
            groups = [tuple(torch.cat(parts) for parts in zip(*groups))]
        for score, peak, taken in groups:
            # every kept token scores at least as high as every dropped one
            assert float(score[taken].min()) >= float(score[~taken].max())
            # a tie cut by the budget keeps the peaks: a dropped peak scores below every kept non-peak
            if bool((peak & ~taken).any()) and bool((~peak & taken).any()):
                assert float(score[peak & ~taken].max()) < float(score[~peak & taken].min())
    assert any(not torch.equal(a, b) for a, b in zip(kept[1], kept[5]))  # pooling chose other tokens


class PeakedKVzip(KVzip):
    """KVzip whose replay scores are replaced by three isolated peaks over a near-flat floor."""

    def _evict(self, cache):
        for layer in cache.layers:
            scores = torch.rand(layer.scores.shape, generator=torch.Generator().manual_seed(3)) * 1e-3
            scores[..., [10, 20, 30]] = 1.0
            layer.scores = scores
        super()._evict(cache)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_tie_cut_by_the_budget_keeps_the_peaks(scope):
    # kernel 5 gives 15 tokens the peaks' score; the budget leaves room for 8 a head (10 minus 2
    # sinks; the global scope shares it between identical heads), so the cut falls inside the
    # ties: every head keeps the peaks first, then tied neighbours
    model = tiny_causal_lm("llama", 2, num_hidden_layers=2)
    with compress(model, PeakedKVzip(10, PROMPT, sinks=2, scope=scope, kernel=5)) as kv, torch.inference_mode():
        cache = kv.new_cache(keep_positions=True)
        model(_ids(40), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        for row in layer.positions.flatten(0, 1).tolist():
            assert {0, 1, 10, 20, 30} <= set(row)  # the sinks and every peak
            assert set(row) - {-1} <= {0, 1, *range(8, 13), *range(18, 23), *range(28, 33)}  # then only ties


def test_safeguard_gives_every_head_its_floor_and_shares_the_rest():
    model = tiny_causal_lm("llama", 2, num_hidden_layers=3)
    counts = {}
    for safeguard in (0.0, 0.8):
        policy = RecordingKVzip(10, PROMPT, sinks=2, safeguard=safeguard)
        with compress(model, policy) as kv, torch.inference_mode():
            cache = kv.new_cache(keep_positions=True)
            model(_ids(40), past_key_values=cache, use_cache=True)
            counts[safeguard] = torch.tensor(kv.stats()["kept_per_head"]).flatten()
    assert int(counts[0.0].min()) < 8  # without it some head falls below the floor
    assert int(counts[0.8].min()) >= 8 and int(counts[0.8].sum()) == 10 * 3 * 2
    assert len(set(counts[0.8].tolist())) > 1  # above the floor, heads still differ
    # each head kept its own 8 best-scored tokens (sinks first)
    for layer, scores in zip(cache.layers, policy.recorded):
        best = scores.masked_fill(torch.arange(scores.shape[-1]) < 2, float("inf")).topk(8, dim=-1).indices
        width = scores.shape[-1]  # empty slots (-1) land in an extra column
        slots = torch.where(layer.positions < 0, width, layer.positions)
        kept = torch.zeros(*scores.shape[:-1], width + 1, dtype=torch.bool).scatter_(-1, slots, True)
        assert kept.gather(-1, best).all()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_generate_after_kvzip(scope):
    model = tiny_causal_lm("qwen2", 0, sliding_window=None)
    ids = _ids(30)
    with compress(model, KVzip(0.5, PROMPT, scope=scope)) as kv, torch.inference_mode():
        # small pages: the memory of a 30-token context follows the kept tokens
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             past_key_values=kv.new_cache(page_size=4))
        stats = kv.stats()
    assert out.shape == (1, 36)
    assert stats["tokens_seen"] == 35
    assert stats["kv_bytes"] <= 0.5 * stats["kv_bytes_full"] * 1.3  # 15 kept of 30, then 5 decoded
    assert not model.base_model._forward_hooks  # the replay hook is gone with the patch


def test_bad_settings():
    with pytest.raises(ValueError, match="exactly one of prompt_ids"):
        KVzip(0.5)
    with pytest.raises(ValueError, match="exactly one of prompt_ids"):
        KVzip(0.5, PROMPT, tokenizer=object())
    with pytest.raises(ValueError, match="chunk"):
        KVzip(0.5, PROMPT, chunk=0)
    with pytest.raises(ValueError, match="scope"):
        KVzip(0.5, PROMPT, scope="head")
    with pytest.raises(ValueError, match="prompt_ids"):
        KVzip(0.5, [1, -2])
    with pytest.raises(ValueError, match="safeguard must lie in"):
        KVzip(0.5, PROMPT, safeguard=1.5)
    with pytest.raises(ValueError, match="needs scope='global'"):
        KVzip(0.5, PROMPT, scope="layer", safeguard=0.2)
    with pytest.raises(ValueError, match="scoring must be one of 'cache', 'chunk'"):
        KVzip(0.5, PROMPT, scoring="layer")
    for kernel in (0, 4, True, 3.0):
        with pytest.raises(ValueError, match="kernel must be an odd int >= 1"):
            KVzip(0.5, PROMPT, kernel=kernel)
    with pytest.raises(ValueError, match="Protected"):
        Protected(KVzip(0.5, PROMPT), spans=[(0, 4)])


@pytest.mark.parametrize("scope,safeguard,over,chunk,budget,kernel", [
    ("layer", 0.0, "cache", 2048, 12, 1), ("global", 0.0, "cache", 2048, 12, 1), ("global", 0.5, "cache", 2048, 12, 1),
    ("global", 0.0, "chunk", 2048, 12, 1), ("global", 0.0, "chunk", 16, 12, 1), ("layer", 0.0, "chunk", 7, 12, 1),
    # a fractional budget: each row's fraction of its own prompt
    ("layer", 0.0, "chunk", 7, 0.3, 1), ("global", 0.5, "cache", 2048, 0.3, 1),
    # pooled scores: a row's first tokens have padding on their left, which must lend them nothing
    ("global", 0.2, "chunk", 16, 12, 5), ("layer", 0.0, "cache", 2048, 0.3, 7)])
@pytest.mark.parametrize("lengths", [(30, 41), (9, 41)], ids=["over-budget", "one-under"])
def test_left_padded_batch_matches_one_by_one(scope, safeguard, over, chunk, budget, kernel, lengths):
    model = tiny_causal_lm("llama", 3, num_hidden_layers=3)
    rows = [_ids(n, seed=20 + n)[0].clamp(min=1).tolist() for n in lengths]  # pad id 0 never in a row
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (ids != 0).long()
    # no sinks with pooled scores: the padding next to a row's first tokens is then all that
    # pools into them (with sinks it would only reach tokens kept anyway)
    policy = KVzip(budget, PROMPT, scope=scope, safeguard=safeguard, scoring=over, chunk=chunk, kernel=kernel,
                   sinks=4 if kernel == 1 else 0)
    with compress(model, policy) as kv, torch.inference_mode():
        together = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        kept = kv.stats()["kept_per_head"]
        alone, kept_alone = [], []
        for r in rows:
            alone.append(model.generate(torch.tensor([r]), max_new_tokens=6, do_sample=False, pad_token_id=0))
            kept_alone.append([layer[0] for layer in kv.stats()["kept_per_head"]])
    for i, row in enumerate(rows):
        assert together[i, width:].tolist() == alone[i][0, len(row):].tolist()
        assert [layer[i] for layer in kept] == kept_alone[i]
    # the padding is gone: the short row holds at most its real tokens and the generated ones
    assert max(max(layer[0]) for layer in kept) <= min(lengths) + 5


def test_a_one_token_prompt_is_replayed_and_kept():
    # one token comes as a decode step, which sets no budget: the replay sets it (it crashed)
    model = tiny_causal_lm("llama", 3)
    ids = torch.tensor([[5]])
    with torch.inference_mode():
        plain = model.generate(ids, max_new_tokens=4, do_sample=False)
    with compress(model, KVzip(0.5, PROMPT)) as kv, torch.inference_mode():
        cache = kv.new_cache()
        out = model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert out.tolist() == plain.tolist() and cache.layers[0].budget == 1


@pytest.mark.parametrize("scoring,chunk", [("chunk", 2048), ("chunk", 16), ("chunk", 7), ("cache", 16)])
def test_a_padded_rows_replay_scores_its_tokens_as_it_alone_would(scoring, chunk):
    # each row's chunks are cut from its own first token and its replay sits at its own
    # positions: a left-padded row's scores are those of the row alone
    model = tiny_causal_lm("llama", 3, num_hidden_layers=2)
    with torch.no_grad():  # sharp attention: the scores then move with the replay's positions
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    lengths = (23, 41, 30)
    rows = [_ids(n, seed=40 + n)[0].clamp(min=1).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (ids != 0).long()

    def scores(input_ids, attention_mask=None):
        policy = RecordingKVzip(1.0, PROMPT, sinks=2, chunk=chunk, scoring=scoring)
        with compress(model, policy) as kv, torch.inference_mode():
            model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=1, do_sample=False,
                           pad_token_id=0)
        return policy.recorded

    together = scores(ids, mask)
    for i, row in enumerate(rows):
        alone = scores(torch.tensor([row]))
        for layer_together, layer_alone in zip(together, alone):
            torch.testing.assert_close(layer_together[i, :, width - len(row):], layer_alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.model
def test_smollm2_kvzip_finds_the_key_with_the_question_read_after_compression(smollm2):
    from effllm.demo import build_prompt
    from effllm.kv import repeat_prompt_ids

    model, tok = smollm2
    replay = tok.decode(repeat_prompt_ids(tok))
    assert replay.startswith("\n\nRepeat the previous context exactly.") and replay.endswith("assistant\n")
    prompt = build_prompt(tok, 600, seed=3, depth=0.4)
    question = tok("What is the secret pass key? Answer with the number.", add_special_tokens=False).input_ids
    ids = prompt.input_ids[0].tolist()
    at = next(i for i in range(len(ids)) if ids[i:i + len(question)] == question)
    context, rest = prompt.input_ids[:, :at], prompt.input_ids[:, at:]
    with compress(model, KVzip(0.25, tokenizer=tok)) as kv, torch.inference_mode():
        cache = kv.new_cache(page_size=16)  # a 600-token prompt: small pages follow the kept tokens
        model(context, past_key_values=cache, use_cache=True)
        stats = kv.stats()
        rows = len(stats["kept_per_head"]) * len(stats["kept_per_head"][0][0])  # layers x KV heads
        kept = sum(sum(map(sum, layer)) for layer in stats["kept_per_head"])
        assert kept == math.ceil(0.25 * context.shape[1]) * rows
        # memory follows the kept tokens: at most one partly filled page per row
        per_token = stats["kv_bytes_full"] / (context.shape[1] * rows)
        assert stats["kv_bytes"] <= (kept + rows * 15) * per_token
        logits = model(rest, past_key_values=cache, use_cache=True).logits[:, -1]
        tokens = [int(logits.argmax())]
        for _ in range(11):
            tokens.append(int(model(torch.tensor([tokens[-1:]]), past_key_values=cache).logits[0, -1].argmax()))
    assert prompt.key in tok.decode(tokens)


@pytest.mark.parametrize("keyword", ["default", "cache", "past_key_values"])
def test_generate_compresses_with_either_cache_keyword(keyword):
    # transformers 5.24 renamed past_key_values to cache: the replay must run and stats() must
    # describe the cache whichever name the caller (or effllm itself) uses, with no FutureWarning
    # from effllm's own calls.
    import warnings

    import transformers

    model = tiny_causal_lm()
    ids = _ids(40)
    with compress(model, KVzip(0.5, PROMPT)) as kv, torch.inference_mode():
        kwargs = {} if keyword == "default" else {keyword: kv.new_cache()}
        if keyword == "cache" and "cache" not in __import__("inspect").signature(model.forward).parameters:
            pytest.skip(f"transformers {transformers.__version__} has no cache= keyword")
        with warnings.catch_warnings():
            if keyword != "past_key_values":
                warnings.simplefilter("error", FutureWarning)
            model.generate(ids, max_new_tokens=2, do_sample=False, **kwargs)
        stats = kv.stats()
    assert stats, "stats() is empty: the cache effllm compressed is not the one generate() used"
    assert kv.last_cache.policy_state.get("replayed"), "KVzip's replay never ran"
    assert kv.last_cache.layers[0].stored() < ids.shape[1], "nothing was evicted"


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("how", ["generate", "forward loop"])
def test_kvzip_long_prompt_decodes_in_every_grad_mode(mode, how):
    # A prompt long enough for paged storage: the replay's eviction builds tensors that the
    # decode steps then write in place (once broken by running the replay in inference mode).
    model = tiny_causal_lm()
    ids = _ids(300)
    grad_mode = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with compress(model, KVzip(0.5, PROMPT)) as kv, grad_mode():
        if how == "generate":
            model.generate(ids, max_new_tokens=3, do_sample=False)
            cache = kv.last_cache
        else:
            from effllm._cache_arg import cache_argument_name

            cache = kv.new_cache()
            name = cache_argument_name(model)
            token = model(ids, use_cache=True, **{name: cache}).logits[:, -1:].argmax(-1)
            for _ in range(3):
                token = model(token, use_cache=True, **{name: cache}).logits[:, -1:].argmax(-1)
    assert cache.policy_state.get("replayed")
    assert cache.layers[0].stored() < ids.shape[1]


@pytest.mark.model
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_kvzip_generate_on_smollm2_with_an_ordinary_prompt(smollm2, mode):
    # A 300-token prompt through generate(): once a RuntimeError (inference tensors written
    # outside inference mode) under no_grad, and with transformers 5.24 a silent no-op.
    from effllm.demo import build_prompt

    model, tok = smollm2
    ids = build_prompt(tok, 300, seed=5, depth=0.5).input_ids
    grad_mode = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with compress(model, KVzip(0.5, tokenizer=tok)) as kv, grad_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False)
        stats = kv.stats()
    rows = len(stats["kept_per_head"]) * len(stats["kept_per_head"][0][0])  # layers x KV heads
    kept = sum(sum(map(sum, layer)) for layer in stats["kept_per_head"])
    assert kept <= (math.ceil(0.5 * ids.shape[1]) + 2) * rows  # half the prompt, plus the new tokens
    assert stats["kv_bytes"] < 0.75 * stats["kv_bytes_full"]  # pages and positions cost a little more


def test_chunk_scoring_leaves_no_nan_for_a_padding_query_with_nothing_to_read():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=gen)
    k, v = torch.randn(2, 2, 7, 8, generator=gen), torch.randn(2, 2, 7, 8, generator=gen)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :5] = False  # row 1: every cached token and its first replay query are padding
    out, best = replay_attention(q, k, v, 0.3, 4, key_valid=valid, scored=ReplayChunk(0, 4, 2))
    assert not out.isnan().any() and not best.isnan().any()
    assert (best[1] == 0).all()


def test_chunk_scoring_output_is_the_same_in_query_chunks(monkeypatch):
    import effllm.kv.kvzip as kvzip

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 9, 8, generator=gen)
    k, v = torch.randn(2, 2, 20, 8, generator=gen), torch.randn(2, 2, 20, 8, generator=gen)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :3] = False
    whole = replay_attention(q, k, v, 0.3, 11, key_valid=valid, scored=ReplayChunk(4, 7, 2))
    monkeypatch.setattr(kvzip, "SCORE_ELEMS", 2 * 4 * 20 * 2)  # two queries a chunk
    chunked = replay_attention(q, k, v, 0.3, 11, key_valid=valid, scored=ReplayChunk(4, 7, 2))
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[1], whole[1])
