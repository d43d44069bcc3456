"""Protected tokens (``NSNQuant(protect=f)``, ``kv/protected.py``): the best-ranked coded tokens
keep their coding error as a 16-bit residual. Which tokens, how exact, how many bytes, attention
over codes with the residuals, eviction and beams, the cache's hand-over of the policy's ranking,
and bad input."""

import pytest
import torch

from effllm.kv.codes_attention import dense_attend, nsn_attend
from effllm.kv.nsnquant import NSNQuant
from effllm.kv.nsnquant import dequantize as nsn_dequantize
from effllm.testing.models import patched_prefill


def _data(batch, heads, tokens, dim, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, tokens, dim, generator=gen) * 2 + torch.randn(dim, generator=gen)
    values = torch.randn(batch, heads, tokens, dim, generator=gen)
    priority = torch.randn(batch, heads, tokens, generator=gen)
    return keys.to(dtype), values.to(dtype), priority


def _relative_errors(store, keys):
    """Per token ``|k_hat - k| / |k|`` of the coded tokens as ``store.keys()`` reads them back."""
    coded = store.coded_tokens()
    got = store.keys()[:, :, :coded].float()
    return (got - keys[:, :, :coded].float()).norm(dim=-1) / keys[:, :, :coded].float().norm(dim=-1)


def test_the_best_ranked_fraction_of_coded_tokens_reads_back_near_exact():
    keys, values, priority = _data(2, 3, 200, 64)
    store = NSNQuant(bits=2, residual=8, chunk=32, protect=0.1).new_store()
    store.append(keys, values, priority=priority)
    coded = store.coded_tokens()
    assert coded == 192
    errors = _relative_errors(store, keys)
    take = round(0.1 * coded)
    best = priority[:, :, :coded].topk(take, dim=-1).indices
    protected = torch.zeros_like(errors, dtype=torch.bool).scatter_(2, best, True)
    # bfloat16 residuals of a ~25% coding error: well under 1e-2 of the token
    assert float(errors[protected].max()) < 5e-3
    assert float(errors[~protected].min()) > 0.05  # the rest keep their 2-bit error
    assert store.protected.index.shape == (2, 3, take)
    values_back = store.values()[:, :, :coded]
    value_errors = (values_back - values[:, :, :coded]).norm(dim=-1) / values[:, :, :coded].norm(dim=-1)
    assert float(value_errors[protected].max()) < 5e-3 and float(value_errors[~protected].min()) > 0.05


def test_protect_zero_or_no_ranking_protects_nothing_and_changes_no_code():
    keys, values, priority = _data(1, 2, 100, 32)
    plain = NSNQuant(bits=2, residual=4, chunk=16).new_store()
    plain.append(keys, values)
    unranked = NSNQuant(bits=2, residual=4, chunk=16, protect=0.5).new_store()
    unranked.append(keys, values)  # decode steps, a quantizer alone: no ranking
    ranked_off = NSNQuant(bits=2, residual=4, chunk=16).new_store()
    ranked_off.append(keys, values, priority=priority)
    for store in (unranked, ranked_off):
        assert store.protected is None and store.nbytes() == plain.nbytes()
        torch.testing.assert_close(store.keys(), plain.keys(), rtol=0, atol=0)


def test_unranked_tokens_are_never_protected():
    keys, values, priority = _data(1, 2, 96, 32)
    priority[:, :, 40:] = float("-inf")  # only the first 40 tokens were ranked
    store = NSNQuant(bits=2, residual=0, chunk=32, protect=1.0).new_store()
    store.append(keys, values, priority=priority)
    errors = _relative_errors(store, keys)
    assert float(errors[:, :, :40].max()) < 5e-3 and float(errors[:, :, 40:].min()) > 0.05


def test_tied_priorities_protect_the_earlier_tokens():
    # pooled scores (KVzip(kernel=k)) tie often: ties go to the earlier token, as eviction's do,
    # so CPU and CUDA protect the same tokens (topk breaks ties differently on each)
    keys, values, _ = _data(1, 2, 64, 32)
    priority = torch.zeros(1, 2, 64)
    priority[..., 5:45] = 1.0  # 40 tied tokens, 25% of 64 = 16 protected
    store = NSNQuant(bits=2, residual=0, chunk=32, protect=0.25).new_store()
    store.append(keys, values, priority=priority)
    for head in range(2):
        assert sorted(store.protected.index[0, head].tolist()) == list(range(5, 21))


def test_protected_tokens_cost_4d_plus_4_bytes_each():
    keys, values, priority = _data(2, 2, 160, 64)
    plain = NSNQuant(bits=2, residual=0, chunk=32).new_store()
    plain.append(keys, values)
    store = NSNQuant(bits=2, residual=0, chunk=32, protect=0.05).new_store()
    store.append(keys, values, priority=priority)
    count = store.protected.index.shape[-1]
    assert count == 8
    assert store.nbytes() - plain.nbytes() == 2 * 2 * count * (4 * 64 + 4)


def _reference(store):
    """Keys and values in float32: codes dequantized, residuals added (as stored), window."""
    coded = [nsn_dequantize(codes, torch.float32) for codes in (store.key_codes, store.value_codes)]
    index = store.protected.index.long()[..., None].expand(-1, -1, -1, coded[0].shape[-1])
    coded[0].scatter_add_(2, index, store.protected.keys.float())
    coded[1].scatter_add_(2, index, store.protected.values.float())
    return (torch.cat([coded[0], store.key_window.float()], 2), torch.cat([coded[1], store.value_window.float()], 2))


@pytest.mark.parametrize("seq_q", [1, 4])
def test_attention_over_codes_adds_the_residuals_as_dequantize_then_attend_would(seq_q, cpu_path):
    keys, values, priority = _data(2, 2, 120, 32, seed=3)
    store = NSNQuant(bits=2, residual=6, chunk=16, protect=0.2).new_store()
    store.append(keys[:, :, :110], values[:, :, :110], priority=priority[:, :, :110])
    for t in range(110, 120):  # decode steps: no ranking
        store.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
    assert store.protected is not None
    query = torch.randn(2, 6, seq_q, 32, generator=torch.Generator().manual_seed(4))
    ref_keys, ref_values = _reference(store)
    reference, ref_mass = dense_attend(ref_keys, ref_values, query, 0.3, return_mass=True)
    out, mass = nsn_attend(store, query, 0.3, return_mass=True)
    torch.testing.assert_close(out.float(), reference, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=2e-6)
    # and the residuals matter: without them the output differs
    store.protected = None
    assert (nsn_attend(store, query, 0.3).float() - reference).abs().max() > 1e-3


def test_eviction_keeps_the_kept_tokens_residuals_and_renumbers_them(cpu_path):
    keys, values, priority = _data(2, 3, 150, 32, seed=5)
    store = NSNQuant(bits=2, residual=8, chunk=16, protect=0.25).new_store()
    store.append(keys, values, priority=priority)
    before_k, before_v = store.keys(), store.values()
    gen = torch.Generator().manual_seed(6)
    index = torch.stack([torch.randperm(150, generator=gen)[:61].sort().values for _ in range(6)]).view(2, 3, 61)
    store.select_tokens(index)
    pick = index[..., None].expand(-1, -1, -1, 32)
    # kept tokens read back as before: codes kept, residuals moved with them (or, for the tokens
    # that move to the window, added before they move)
    torch.testing.assert_close(store.keys(), before_k.gather(2, pick), rtol=0, atol=0)
    torch.testing.assert_close(store.values(), before_v.gather(2, pick), rtol=0, atol=0)
    query = torch.randn(2, 6, 1, 32, generator=gen)
    ref_keys, ref_values = _reference(store)
    torch.testing.assert_close(nsn_attend(store, query, 0.3).float(), dense_attend(ref_keys, ref_values, query, 0.3),
                               rtol=1e-5, atol=2e-6)


def test_beams_copy_the_residuals_of_their_rows():
    keys, values, priority = _data(2, 2, 90, 32, seed=7)
    store = NSNQuant(bits=2, residual=4, chunk=16, protect=0.2).new_store()
    store.append(keys, values, priority=priority)
    before = store.keys()
    store.select_batch(torch.tensor([1, 1, 0]))
    torch.testing.assert_close(store.keys(), before[[1, 1, 0]], rtol=0, atol=0)
    assert store.protected.index.shape[0] == 3


@pytest.mark.parametrize("protect", [-0.1, 1.5, True, "0.1", float("nan")])
def test_bad_protect_is_refused(protect):
    with pytest.raises(ValueError, match="protect"):
        NSNQuant(bits=2, protect=protect)


def test_a_ranking_of_the_wrong_shape_is_refused_before_the_store_changes():
    keys, values, priority = _data(1, 2, 40, 32)
    store = NSNQuant(bits=2, residual=4, chunk=16, protect=0.5).new_store()
    with pytest.raises(ValueError, match=r"priority must be a \(B, H, n\)"):
        store.append(keys, values, priority=priority[:, :, :-1])
    assert len(store) == 0 and store.key_window is None


class _ByKeyNorm:
    """A scorer whose ranking a test can compute: each token's key norm."""

    @staticmethod
    def make(budget, **kwargs):
        from effllm.kv.policies import Policy

        class ByKeyNorm(Policy):
            def score(self, view):
                return view.keys.float().norm(dim=-1)

        return ByKeyNorm(budget, **kwargs)


def _protected_positions(layer):
    """Per (batch row, KV head): the original positions of the tokens with residuals."""
    store, out = layer.store, []
    real = store.protected.real()
    for b in range(real.shape[0]):
        for h in range(real.shape[1]):
            slots = store.protected.index[b, h][real[b, h]].long()
            out.append(set(layer.positions[b, h, slots].tolist()))
    return out


def test_the_cache_protects_the_best_scored_of_the_kept_tokens():
    """A policy scoring tokens by their key norm, with a small ``protect``: the tokens with
    residuals are exactly the best-scored of each row's kept prompt tokens."""
    from effllm.testing.models import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=0)
    ids = torch.randint(0, 101, (2, 80), generator=torch.Generator().manual_seed(1))
    alone = patched_prefill(model, _ByKeyNorm.make(40), ids)
    cache = patched_prefill(model, (_ByKeyNorm.make(40), NSNQuant(bits=2, residual=0, chunk=8, protect=0.1)), ids)
    for plain, coded in zip(alone.layers, cache.layers, strict=True):
        assert coded.keys.shape[-2] == 0 and coded.store.coded_tokens() == 40  # settled in the prefill
        norms = plain.keys.float().norm(dim=-1)  # the kept tokens, exact
        # round(0.1 * 40); a repeated token id ties (RoPE keeps its key's norm): the earlier wins
        best = torch.sort(norms, dim=-1, descending=True, stable=True).indices[..., :4]
        want = [set(plain.positions[b, h, best[b, h]].tolist()) for b in range(2) for h in range(2)]
        assert _protected_positions(coded) == want


def test_an_eviction_that_keeps_everything_still_hands_over_the_ranking():
    from effllm.testing.models import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=0)
    ids = torch.randint(0, 101, (1, 48), generator=torch.Generator().manual_seed(2))
    for budget in (47, 48, 60):  # one token evicted, none, a budget above the prompt
        cache = patched_prefill(model, (_ByKeyNorm.make(budget), NSNQuant(bits=2, residual=0, chunk=8, protect=0.25)), ids)
        for layer in cache.layers:
            assert layer.store.protected is not None
            assert layer.store.protected.real().sum(-1).min() == round(0.25 * layer.store.coded_tokens())


def test_every_chunk_of_a_chunked_prefill_is_ranked():
    """Two prefill chunks, the second evicting from codes and its own staged tokens: with
    ``protect=1.0`` every kept token of either chunk has a residual."""
    from effllm.testing.models import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=0)
    ids = torch.randint(0, 101, (1, 80), generator=torch.Generator().manual_seed(3))
    cache = patched_prefill(model, (_ByKeyNorm.make(24), NSNQuant(bits=2, residual=0, chunk=8, protect=1.0)), ids, chunks=2)
    for layer in cache.layers:
        kept = [set(layer.positions[0, h].tolist()) for h in range(2)]
        assert all(max(k) >= 40 for k in kept)  # the second chunk keeps some tokens
        assert _protected_positions(layer) == kept


def test_rows_of_different_lengths_protect_their_own_best_tokens():
    """``QuantizedRows.from_padded`` with a ranking: each row's store protects the best of its
    own kept slots."""
    from effllm.kv.quantized_rows import QuantizedRows

    keys, values, priority = _data(1, 3, 64, 32, seed=8)
    keep = torch.rand(3, 64, generator=torch.Generator().manual_seed(9)) < torch.tensor([[0.3], [0.6], [0.9]])
    rows = QuantizedRows.from_padded(NSNQuant(bits=2, residual=0, chunk=8, protect=0.25), keys[0], values[0], keep,
                                     priority[0])
    for row, store in enumerate(rows.stores):
        slots = keep[row].nonzero().squeeze(1)
        coded = store.coded_tokens()
        ranks = priority[0, row, slots[:coded]]
        want = set(ranks.topk(round(0.25 * coded)).indices.tolist())
        assert set(store.protected.index[0, 0].long().tolist()) == want


def test_staged_ranking_follows_a_beam_reorder_before_it_is_settled():
    from effllm.testing.models import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=0)
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(4))
    cache = patched_prefill(model, (_ByKeyNorm.make(20), NSNQuant(bits=2, residual=0, chunk=4, protect=0.2)), ids)
    layer = cache.layers[0]
    # unsettle by hand: put the kept tokens back in the staging area, as a cache that does not
    # know its number of layers leaves them after a prefill, with their ranking
    keys, values = layer.store.keys(), layer.store.values()
    want = _protected_positions(layer)
    layer.store = NSNQuant(bits=2, residual=0, chunk=4, protect=0.2).new_store()
    layer.keys, layer.values = keys, values
    layer.staged_priority = keys.float().norm(dim=-1)
    layer.reorder_cache(torch.tensor([1, 0]))
    layer.settle()
    assert _protected_positions(layer) == want[2:] + want[:2]


def test_a_stale_ranking_is_never_applied_to_other_tokens():
    from effllm.testing.models import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=0)
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = patched_prefill(model, (_ByKeyNorm.make(20), NSNQuant(bits=2, residual=0, chunk=4, protect=0.2)), ids)
    layer = cache.layers[1]
    layer.staged_priority = torch.zeros(1, 2, 30)  # longer than anything staged: ignored, not a crash
    layer.keys = layer.keys.new_zeros(1, 2, 4, layer.keys.shape[-1])
    layer.values = layer.keys
    layer.settle()
    assert layer.staged_priority is None and len(layer.store) == 24


@pytest.mark.interpret
def test_the_triton_backend_falls_back_to_the_torch_path_for_protected_tokens():
    from effllm._backend import interpreting

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on CUDA, else interpreted
    keys, values, priority = (t.to(device) for t in _data(1, 2, 70, 32, seed=6))
    store = NSNQuant(bits=2, residual=4, chunk=16, protect=0.3).new_store()
    store.append(keys, values, priority=priority)
    query = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(7)).to(device)
    ref_keys, ref_values = _reference(store)
    torch.testing.assert_close(nsn_attend(store, query, 0.3, backend="triton").float(),
                               dense_attend(ref_keys, ref_values, query, 0.3), rtol=1e-5, atol=2e-6)
