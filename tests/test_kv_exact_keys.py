"""Exact keys on the sharpest heads (``NSNQuant(key_heads=...)``, ``kv/exact_keys.py``): the
chosen rows' coded keys read back near-exact, attention over codes adds them, eviction and beams
keep them, bytes are counted, the cache chooses the rows whose prefill attention has the lowest
entropy (checked against the model's own eager attention), and bad input."""

import pytest
import torch

from effllm.kv import AdaKV, CompressedCache, KVzip, NSNQuant, SnapKV
from effllm.kv.codes_attention import dense_attend, nsn_attend
from effllm.kv.exact_keys import ExactKeys
from effllm.testing.models import patched_prefill, tiny_causal_lm


def _data(batch, heads, tokens, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, tokens, dim, generator=gen) * 2 + torch.randn(dim, generator=gen)
    return keys, torch.randn(batch, heads, tokens, dim, generator=gen)


# how far a chosen row's coded keys read back from exact, relative: bfloat16 rounding of the
# residual, or the second code's error of the first one's (``key_residual="codes"``); 2-bit codes
# alone are at about 0.3
NEAR = {"16-bit": 4e-3, "codes": 0.15}


@pytest.fixture(params=list(NEAR))
def mode(request):
    return request.param


def _store(rows, keys, values, **config):
    store = NSNQuant(bits=2, residual=8, chunk=16, key_heads=1, **config).new_store()
    store.choose_exact_keys(rows)
    store.append(keys, values)
    return store


def _key_errors(store, keys):
    """Per row, ``|k_hat - k| / |k|`` averaged over the coded tokens, as ``store.keys()`` reads them."""
    coded = store.coded_tokens()
    got = store.keys()[:, :, :coded].float()
    return ((got - keys[:, :, :coded]).norm(dim=-1) / keys[:, :, :coded].norm(dim=-1)).mean(-1)


ROWS = torch.tensor([[False, True, False], [True, False, True]])


def test_chosen_rows_read_back_near_exact_and_others_at_their_codes(mode):
    keys, values = _data(2, 3, 150, 32, seed=1)
    store = _store(ROWS, keys, values, key_residual=mode)
    assert store.coded_tokens() == 128
    errors = _key_errors(store, keys)
    assert bool((errors[ROWS] < NEAR[mode]).all())
    assert bool((errors[~ROWS] > 0.2).all())  # 2-bit codes
    plain = NSNQuant(bits=2, residual=8, chunk=16).new_store()
    plain.append(keys, values)
    # values and the other rows' keys are exactly what a store without exact keys holds
    assert torch.equal(store.values(), plain.values())
    assert torch.equal(store.keys()[~ROWS], plain.keys()[~ROWS])


def test_bytes_count_two_bytes_a_coded_key_element_of_the_chosen_rows():
    keys, values = _data(2, 3, 150, 32, seed=2)
    store = _store(ROWS, keys, values)
    plain = NSNQuant(bits=2, residual=8, chunk=16).new_store()
    plain.append(keys, values)
    # residuals, the residuals' row mask and the store's own (B, H) record of the choice
    assert store.nbytes() - plain.nbytes() == int(ROWS.sum()) * 128 * 32 * 2 + 2 * ROWS.numel()
    # coded again: a chosen row's residuals cost what a row's key codes cost
    coded = _store(ROWS, keys, values, key_residual="codes")
    per_row = plain.key_codes.nbytes() // ROWS.numel()
    assert coded.nbytes() - plain.nbytes() == int(ROWS.sum()) * per_row + 2 * ROWS.numel()


@pytest.mark.parametrize("seq_q", [1, 5])
def test_attention_over_codes_equals_dequantize_then_attend(seq_q, cpu_path, mode):
    keys, values = _data(2, 3, 150, 32, seed=3)
    store = _store(ROWS, keys, values, key_residual=mode)
    query = torch.randn(2, 6, seq_q, 32, generator=torch.Generator().manual_seed(4))
    want, want_mass = dense_attend(store.keys(), store.values(), query, 0.3, return_mass=True)
    out, mass = nsn_attend(store, query, 0.3, return_mass=True)  # cpu_path: C loops, then torch ops
    torch.testing.assert_close(out.float(), want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=2e-6)
    # the residuals matter: without them the output is another one
    store.exact_keys = None
    assert not torch.allclose(nsn_attend(store, query, 0.3).float(), want, atol=1e-3)


@pytest.mark.interpret
@pytest.mark.parametrize("seq_q, every", [(1, False), (3, False), (1, True)])
def test_the_triton_kernel_reads_exact_keys_as_a_score_bias(seq_q, every, mode, monkeypatch):
    from effllm._backend import interpreting
    from effllm.kernels.triton import decode_codes

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on CUDA, else interpreted
    if every:  # key_heads="all", and enough tokens for the kernel to split them (> 256 coded)
        keys, values = (t.to(device) for t in _data(2, 3, 300, 32, seed=5))
        store = NSNQuant(bits=2, residual=8, chunk=16, key_heads="all", key_residual=mode).new_store()
        store.append(keys, values)
        assert store.coded_tokens() > 256 and store.exact_keys.every_row
    else:
        keys, values = (t.to(device) for t in _data(2, 3, 70, 32, seed=5))
        store = _store(ROWS.to(device), keys, values, key_residual=mode)
    query = torch.randn(2, 6, seq_q, 32, generator=torch.Generator().manual_seed(6)).to(device)
    want = dense_attend(store.keys().float(), store.values().float(), query, 0.3)
    biases = []
    kernel = decode_codes.nsn_decode_codes
    monkeypatch.setattr(decode_codes, "nsn_decode_codes", lambda *a, **k: biases.append(k["bias"]) or kernel(*a, **k))
    torch.testing.assert_close(nsn_attend(store, query, 0.3, backend="triton").float(), want, rtol=1e-5, atol=2e-6)
    assert len(biases) == 1 and biases[0] is not None  # the kernel ran, with the residuals' scores
    rows = store.exact_keys.rows
    assert bool((biases[0][~rows] == 0).all()) and bool((biases[0][rows] != 0).any())


def test_eviction_and_beams_keep_the_exact_keys_of_the_tokens_that_stay(mode):
    keys, values = _data(2, 3, 150, 32, seed=7)
    store = _store(ROWS, keys, values, key_residual=mode)
    gen = torch.Generator().manual_seed(8)
    index = torch.stack([torch.randperm(150, generator=gen)[:90].sort().values for _ in range(6)]).view(2, 3, 90)
    store.select_tokens(index)
    kept = keys.gather(2, index[..., None].expand(-1, -1, -1, 32))
    assert bool((_key_errors(store, kept)[ROWS] < NEAR[mode]).all())
    # a beam reorder repeating row 1: its chosen rows (0 and 2) follow it, with their residuals
    store.select_batch(torch.tensor([1, 1, 0]))
    assert torch.equal(store.exact_rows, ROWS[[1, 1, 0]])
    errors = _key_errors(store, kept[[1, 1, 0]])
    assert bool((errors[ROWS[[1, 1, 0]]] < NEAR[mode]).all()) and bool((errors[~ROWS[[1, 1, 0]]] > 0.2).all())


def test_tokens_coded_later_keep_exact_keys_on_the_chosen_rows_only(mode):
    keys, values = _data(2, 3, 200, 32, seed=9)
    store = _store(ROWS, keys[:, :, :100], values[:, :, :100], key_residual=mode)
    for step in range(100, 200):  # decode steps: the window flushes chunk by chunk
        store.append(keys[:, :, step:step + 1], values[:, :, step:step + 1])
    assert store.coded_tokens() == store.exact_keys.tokens() == 192  # 8 left in the window
    errors = _key_errors(store, keys)
    assert bool((errors[ROWS] < NEAR[mode]).all()) and bool((errors[~ROWS] > 0.2).all())


def test_undecided_stores_keep_every_row_until_the_choice_then_only_the_chosen(mode):
    keys, values = _data(2, 3, 150, 32, seed=10)
    store = NSNQuant(bits=2, residual=8, chunk=16, key_heads=1, key_residual=mode).new_store()
    store.append(keys, values)  # coded before the cache chose: every row keeps its residuals
    assert bool((_key_errors(store, keys) < NEAR[mode]).all())
    store.choose_exact_keys(ROWS)
    errors = _key_errors(store, keys)
    assert bool((errors[ROWS] < NEAR[mode]).all()) and bool((errors[~ROWS] > 0.2).all())
    assert store.exact_keys.residuals().shape[0] == int(ROWS.sum())


def test_exact_keys_unit_operations_match_their_definitions():
    gen = torch.Generator().manual_seed(11)
    exact, decoded = torch.randn(2, 3, 10, 8, generator=gen), torch.randn(2, 3, 10, 8, generator=gen)
    held = ExactKeys.of(ROWS, exact, decoded)
    out = decoded.clone()
    held.add_to(out)
    torch.testing.assert_close(out[ROWS], exact[ROWS], rtol=0, atol=2e-2)  # bfloat16 residuals
    assert torch.equal(out[~ROWS], decoded[~ROWS])
    queries = torch.randn(2, 3, 4, 8, generator=gen)
    scores = queries @ decoded.transpose(2, 3)
    held.correct_scores(queries, scores)
    torch.testing.assert_close(scores, queries @ out.transpose(2, 3), rtol=1e-5, atol=1e-5)
    assert ExactKeys.of(torch.zeros(2, 3, dtype=torch.bool), exact, decoded) is None
    assert held.restrict(~ROWS) is None


def _sharpened(layers=3, sharp=((1, 0, 60.0), (2, 1, 30.0))):
    """A tiny model (4 query / 2 KV heads) whose attention is near uniform except where
    ``sharp`` scales a KV head's query projections ((layer, KV head, factor)): the sharpest
    heads by construction, in that order."""
    model = tiny_causal_lm("llama", seed=3, num_hidden_layers=layers)
    width = model.config.hidden_size // model.config.num_key_value_heads  # query rows of one KV head
    with torch.no_grad():
        for layer, head, factor in sharp:
            model.model.layers[layer].self_attn.q_proj.weight[head * width:(head + 1) * width] *= factor
    return model


def _entropies(model, ids, last=32):
    """(B, layers, KV heads): the model's own eager attention, entropy of the last queries."""
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    out = []
    for probs in attentions:
        probs = probs[:, :, -last:].double()
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(-1)  # (B, H)
        out.append(entropy.view(entropy.shape[0], -1, group).mean(-1))
    return torch.stack(out, 1)


def _chosen(cache):
    """(B, layers, KV heads) bool: the rows whose stores keep exact keys."""
    out = []
    for layer in cache.layers:
        if layer.ragged is not None:
            rows = torch.tensor([store.exact_rows.item() for store in layer.ragged.stores])
            out.append(rows.view(layer.batch_heads()))
        else:
            out.append(layer.store.exact_rows)
    return torch.stack(out, 1)


SHARP = torch.tensor([[False, False], [True, False], [False, True]])  # _sharpened()'s two heads


@pytest.mark.parametrize("policy", [SnapKV(24, window=8), AdaKV(SnapKV(24, window=8))])
@pytest.mark.parametrize("take, want", [(1, SHARP & torch.tensor([[False], [True], [False]])), (2, SHARP)])
def test_the_cache_chooses_the_lowest_entropy_rows(policy, take, want):
    model = _sharpened()
    ids = torch.randint(0, 101, (2, 70), generator=torch.Generator().manual_seed(12))
    entropy = _entropies(model, ids)  # (2, 3, 2), the model's own eager attention
    order = entropy.flatten(1).sort(dim=1).values
    assert bool((order[:, 2] - order[:, 1] > 0.1).all()) and bool((order[:, 1] - order[:, 0] > 0.1).all())
    expected = torch.zeros(2, 6, dtype=torch.bool).scatter_(1, entropy.flatten(1).argsort(1)[:, :take], True)
    assert torch.equal(expected.view(2, 3, 2), want.expand(2, 3, 2))  # the construction is what the model does
    cache = patched_prefill(model, (policy, NSNQuant(bits=2, residual=4, chunk=8, key_heads=take)), ids)
    assert cache.exact_keys_chosen and torch.equal(_chosen(cache), want.expand(2, 3, 2))


def test_each_batch_row_chooses_its_own_rows():
    # the choice itself, from given entropies: per batch row, across layers
    cache = CompressedCache(SnapKV(0.5), quantizer=NSNQuant(bits=2, residual=4, chunk=8, key_heads=2), num_layers=3)
    entropy = torch.tensor([[[3.0, 1.0], [2.0, 4.0], [5.0, 6.0]],   # row 0: (0, 1) and (1, 0)
                            [[6.0, 5.0], [4.0, 3.0], [0.5, 2.5]]])  # row 1: (2, 0) and (2, 1)
    keys, values = _data(2, 2, 30, 16, seed=19)
    for index in range(3):
        cache.layers.append(cache._new_layer())
        cache.layers[index].update(keys, values)
        cache.layers[index].sharpness = entropy[:, index]
    cache.settle()
    want = torch.tensor([[[False, True], [True, False], [False, False]], [[False, False], [False, False], [True, True]]])
    assert cache.exact_keys_chosen and torch.equal(_chosen(cache), want)
    for index, layer in enumerate(cache.layers):  # the staged tokens were coded with those rows' residuals only
        errors = _key_errors(layer.store, keys)
        assert bool((errors[want[:, index]] < 4e-3).all()) and bool((errors[~want[:, index]] > 0.2).all())


def test_fractions_count_rows_and_chunked_prefills_choose_once():
    model = tiny_causal_lm("llama", seed=3, num_hidden_layers=3)
    ids = torch.randint(0, 101, (1, 90), generator=torch.Generator().manual_seed(13))
    cache = patched_prefill(model, (SnapKV(40, window=8), NSNQuant(bits=2, residual=4, chunk=8, key_heads=0.5)), ids,
                     chunks=2)
    assert int(_chosen(cache).sum()) == 3  # half of 3 layers x 2 KV heads, chosen at the first chunk
    first = patched_prefill(model, (SnapKV(40, window=8), NSNQuant(bits=2, residual=4, chunk=8, key_heads=0.5)),
                     ids[:, :45])
    assert torch.equal(_chosen(cache), _chosen(first))


def test_kvzip_global_rows_keep_exact_keys_on_the_chosen_rows_and_generate():
    import effllm

    model = _sharpened()
    ids = torch.randint(0, 101, (1, 80), generator=torch.Generator().manual_seed(14))
    setting = (KVzip(0.4, ids[0].tolist(), scope="global"), NSNQuant(bits=2, residual=4, chunk=8, key_heads=2))
    cache = patched_prefill(model, setting, ids)
    chosen = _chosen(cache)
    assert torch.equal(chosen[0], SHARP)
    for layer, rows in zip(cache.layers, chosen[0]):
        for store, keep in zip(layer.ragged.stores, rows.tolist()):
            assert (store.exact_keys is not None) == (keep and store.coded_tokens() > 0)
    with effllm.patched(model, kv=setting), torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 86)


def test_a_first_forward_of_one_token_chooses_no_rows():
    model = _sharpened()
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(17))
    cache = patched_prefill(model, (SnapKV(16, window=4), NSNQuant(bits=2, residual=4, chunk=8, key_heads=1)), ids,
                     chunks=40)  # one token a forward: no prompt whose attention could be measured
    assert cache.exact_keys_chosen and not bool(_chosen(cache).any())
    assert all(layer.store.exact_keys is None for layer in cache.layers)


def test_head_entropy_in_query_chunks_equals_the_whole_window(monkeypatch):
    from effllm.kernels import scores
    from effllm.kv.exact_keys import head_entropy

    gen = torch.Generator().manual_seed(18)
    query, keys = torch.randn(2, 4, 40, 16, generator=gen) * 2, torch.randn(2, 2, 50, 16, generator=gen) * 2
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :7] = False  # a left-padded row
    logits = (query[:, :, -32:].double() @ keys.double().repeat_interleave(2, 1).transpose(2, 3)) * 0.25
    position = torch.arange(50 - 32, 50)[:, None]
    logits = logits.masked_fill((torch.arange(50)[None] > position) | ~valid[:, None, None], float("-inf"))
    probs = logits.softmax(-1)
    want = -(probs * probs.clamp_min(1e-300).log()).sum(-1).mean(-1).view(2, 2, 2).mean(-1)
    torch.testing.assert_close(head_entropy(query, keys, 0.25, key_valid=valid).double(), want, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(scores, "SCORE_ELEMS", 2 * 4 * 50 * 5)  # chunks of 5 queries
    torch.testing.assert_close(head_entropy(query, keys, 0.25, key_valid=valid).double(), want, rtol=1e-5, atol=1e-6)


def test_bad_key_heads_are_refused_before_anything_changes():
    for bad in (-1, 1.0, 1.5, True, "1", "every", 0.0 - 0.1):  # 1.0: "all" says every row
        with pytest.raises(ValueError, match="key_heads"):
            NSNQuant(key_heads=bad)
    with pytest.raises(ValueError, match="key_residual"):
        NSNQuant(key_heads=1, key_residual="8-bit")
    with pytest.raises(ValueError, match="protect and key_heads"):
        NSNQuant(protect=0.1, key_heads=1)
    with pytest.raises(ValueError, match="key_residual_bits applies to key_residual='codes'"):
        NSNQuant(key_heads=1, key_residual_bits=1)
    with pytest.raises(ValueError, match="key_heads is 0"):
        NSNQuant(key_residual="codes")
    # 4-dim sub-vectors: two 4-bit indices a byte, so an odd count a token is refused before any append
    for config in (NSNQuant(bits=1, vector_dim=4), NSNQuant(vector_dim=4, key_heads="all", key_residual="codes",
                                                            key_residual_bits=1)):
        store = config.new_store()
        with pytest.raises(ValueError, match="odd number of 4-bit indices"):
            store.append(torch.randn(1, 1, 80, 12), torch.randn(1, 1, 80, 12))
        assert len(store) == 0
    NSNQuant(vector_dim=4, key_heads="all", key_residual="codes").validate(12, torch.float32)  # 2 bits: even
    for bad in (3, 0, 1.0, True):
        with pytest.raises(ValueError, match="key_residual_bits must be 1 or 2"):
            NSNQuant(key_heads=1, key_residual="codes", key_residual_bits=bad)
    with pytest.raises(ValueError, match="needs an eviction policy"):
        CompressedCache(quantizer=NSNQuant(key_heads=1), num_layers=2)
    with pytest.raises(ValueError, match="num_layers= or config="):
        CompressedCache(SnapKV(0.5), quantizer=NSNQuant(key_heads=1))
    keys, values = _data(2, 3, 40, 32)
    store = NSNQuant(bits=2, residual=8, chunk=16, key_heads=1).new_store()
    store.append(keys, values)
    with pytest.raises(ValueError, match=r"\(B, H\) = \(2, 3\) bool"):
        store.choose_exact_keys(torch.ones(3, 2, dtype=torch.bool))
    assert store.exact_rows is None and store.exact_keys.keys.shape[0] == 6  # unchanged
    assert NSNQuant(key_heads=0.02).key_head_count(90) == 2 and NSNQuant(key_heads=0.001).key_head_count(90) == 1
    assert NSNQuant(key_heads=200).key_head_count(90) == 90 and NSNQuant().key_head_count(90) == 0
    assert NSNQuant(key_heads="all").key_head_count(90) == 90


def test_a_coded_layer_that_turns_ragged_keeps_the_choice_per_row():
    from effllm.kv.cache import CompressedLayer

    keys, values = _data(1, 3, 60, 16, seed=15)
    layer = CompressedLayer()
    layer.quantizer, layer.stage_prefill = NSNQuant(bits=2, residual=4, chunk=8, key_heads=1), True
    layer.update(keys, values)
    layer.choose_exact_keys(torch.tensor([[False, True, False]]))
    layer.settle()
    mask = torch.rand(1, 3, 60, generator=torch.Generator().manual_seed(16)) < torch.tensor([0.3, 0.6, 0.9]).view(1, 3, 1)
    layer.keep_mask(mask)  # rows of different lengths: a store per row, coded again
    stores = layer.ragged.stores
    assert [bool(store.exact_rows.item()) for store in stores] == [False, True, False]
    assert [store.exact_keys is not None for store in stores] == [False, True, False]
    kept = keys[0, 1][mask[0, 1]]
    coded = stores[1].coded_tokens()
    error = (stores[1].keys()[0, 0, :coded] - kept[:coded]).norm(dim=-1) / kept[:coded].norm(dim=-1)
    assert float(error.max()) < 1e-2  # exact keys read back, coded again from near-exact ones


def test_every_row_keeps_coded_key_residuals_without_a_policy_or_a_choice():
    """``key_heads="all"``: nothing to measure or choose, so a quantizer alone (no policy, no
    config) keeps every row's residuals, on every coded token, decode steps included."""
    keys, values = _data(2, 3, 150, 32, seed=21)
    config = NSNQuant(bits=2, residual=8, chunk=16, key_heads="all", key_residual="codes")
    assert config.every_key_row and not config.chooses_key_heads
    cache = CompressedCache(quantizer=config)  # no policy, no num_layers: nothing refused
    assert not cache.chooses_exact_keys
    store = config.new_store()
    store.append(keys[:, :, :100], values[:, :, :100])
    for t in range(100, 150):  # decode steps code more chunks
        store.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
    assert store.coded_tokens() == 128 and store.exact_rows is None
    assert bool((_key_errors(store, keys) < NEAR["codes"]).all())
    plain = NSNQuant(bits=2, residual=8, chunk=16).new_store()
    plain.append(keys, values)
    assert bool((_key_errors(plain, keys) > 0.2).all())
    assert torch.equal(store.values(), plain.values())


def test_a_one_bit_second_code_sits_between_the_codes_and_a_two_bit_second_code():
    keys, values = _data(2, 3, 150, 32, seed=22)
    stores = {}
    for name, extra in (("codes", {}), ("1-bit", {"key_heads": "all", "key_residual": "codes", "key_residual_bits": 1}),
                        ("2-bit", {"key_heads": "all", "key_residual": "codes"})):
        stores[name] = NSNQuant(bits=2, residual=8, chunk=16, **extra).new_store()
        stores[name].append(keys, values)
    errors = {name: _key_errors(store, keys) for name, store in stores.items()}
    assert bool((errors["2-bit"] < errors["1-bit"]).all()) and bool((errors["1-bit"] < errors["codes"]).all())
    # the second code's indices: one byte a sub-vector a stage (stages = bits), so half at 1 bit
    second = {name: stores[name].exact_keys.keys.codes for name in ("1-bit", "2-bit")}
    assert second["1-bit"].shape[-1] * 2 == second["2-bit"].shape[-1]
    assert stores["codes"].nbytes() < stores["1-bit"].nbytes() < stores["2-bit"].nbytes()
    assert "key_residual_bits=1" in repr(NSNQuant(key_heads="all", key_residual="codes", key_residual_bits=1))


def test_every_row_with_coded_keys_generates_and_reads_as_dequantize_then_attend():
    import effllm

    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 101, (1, 60), generator=torch.Generator().manual_seed(23))
    setting = NSNQuant(bits=2, residual=4, chunk=8, key_heads="all", key_residual="codes", key_residual_bits=1)
    with effllm.patched(model, kv=setting) as handle, torch.inference_mode():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        cache = handle.kv.last_cache
    assert out.shape == (1, 65)
    store = cache.layers[0].store
    assert store.exact_keys is not None and bool(store.exact_keys.rows.all())
    query = torch.randn(1, store.key_window.shape[1] * 2, 1, store.key_window.shape[-1],
                        generator=torch.Generator().manual_seed(24))
    torch.testing.assert_close(nsn_attend(store, query, 0.3), dense_attend(store.keys(), store.values(), query, 0.3),
                               rtol=1e-4, atol=1e-5)


def test_every_row_with_ragged_rows_evictions_and_beams():
    """``key_heads="all"`` under KVzip's global scope (a store per row) keeps every store's key
    residuals; eviction and a beam reorder keep them on the kept tokens and rows."""
    import effllm

    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 101, (1, 80), generator=torch.Generator().manual_seed(25))
    setting = (KVzip(0.4, ids[0].tolist(), scope="global"),
               NSNQuant(bits=2, residual=4, chunk=8, key_heads="all", key_residual="codes", key_residual_bits=1))
    cache = patched_prefill(model, setting, ids)
    stores = [store for layer in cache.layers for store in layer.ragged.stores]
    coded = [store for store in stores if store.coded_tokens()]
    assert coded and all(store.exact_keys is not None and store.exact_keys.every_row for store in coded)
    with effllm.patched(model, kv=setting), torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             num_beams=2, pad_token_id=0)
    assert out.shape == (1, 84)
    # a store's own eviction and beam reorder keep every row's residuals on what stays
    keys, values = _data(2, 3, 150, 32, seed=26)
    store = NSNQuant(bits=2, residual=8, chunk=16, key_heads="all", key_residual="codes").new_store()
    store.append(keys, values)
    index = torch.stack([torch.randperm(150, generator=torch.Generator().manual_seed(27 + r))[:90].sort().values
                         for r in range(6)]).view(2, 3, 90)
    store.select_tokens(index)
    store.select_batch(torch.tensor([1, 1, 0]))
    kept = keys.gather(2, index[..., None].expand(-1, -1, -1, 32))[[1, 1, 0]]
    assert store.exact_keys.every_row and bool((_key_errors(store, kept) < NEAR["codes"]).all())
    query = torch.randn(3, 6, 1, 32, generator=torch.Generator().manual_seed(28))
    torch.testing.assert_close(nsn_attend(store, query, 0.3), dense_attend(store.keys(), store.values(), query, 0.3),
                               rtol=1e-4, atol=1e-5)
