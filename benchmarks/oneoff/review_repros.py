"""One-off: the figures of session 21's review findings, to run at the commit before the fixes
and after them (``PYTHONPATH=<worktree>/src python benchmarks/oneoff/review_repros.py``)."""

import torch

import effllm
from effllm.kv import CAKE, H2O, KIVI, CompressedCache, KVzip, NSNQuant, Protected, QuantizedKVCache, SnapKV
from effllm.testing.models import smollm2, tiny_causal_lm

torch.set_num_threads(1)


def cake_budgets(model, tok):
    ids = tok("The capital of France is Paris. " * 30 + "The capital of France is", return_tensors="pt").input_ids
    for budget in (1.0, 0.9, 0.5):
        with effllm.patched(model, kv=CAKE(budget)) as handle, torch.inference_mode():
            cache = handle.kv.new_cache()
            model(ids, past_key_values=cache, use_cache=True)
            kept = cache.stats()["kept_per_layer"]
        print(f"CAKE({budget}): prompt {ids.shape[1]}, kept per layer mean {sum(kept) / len(kept):.1f}, "
              f"target {budget * ids.shape[1]:.1f}")


def page_size_bytes(model, tok):
    ids = tok("The capital of France is Paris. " * 10 + "The capital", return_tensors="pt").input_ids
    with effllm.patched(model, kv=KVzip(0.5, tokenizer=tok)) as handle, torch.inference_mode():
        cache = handle.kv.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        stats = cache.stats()
    print(f"KVzip(0.5), {ids.shape[1]}-token prompt, page_size='auto': kv_bytes / kv_bytes_full "
          f"{stats['kv_bytes'] / stats['kv_bytes_full']:.3f}")


def own_token_exact():
    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 101, (1, 90), generator=torch.Generator().manual_seed(0))
    for make in (lambda: KIVI(bits=4, group=16, residual=16), lambda: NSNQuant(bits=2, residual=0, chunk=8)):
        with torch.inference_mode():
            plain = QuantizedKVCache(make(), config=model.config)
            a = [model(ids[:, :60], past_key_values=plain, use_cache=True).logits[:, -1]]
            a += [model(ids[:, t:t + 1], past_key_values=plain, use_cache=True).logits[:, -1] for t in range(60, 68)]
            with effllm.patched(model, kv=make()) as handle:
                cache = handle.kv.new_cache()
                b = [model(ids[:, :60], past_key_values=cache, use_cache=True).logits[:, -1]]
                b += [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
                      for t in range(60, 68)]
        worst = max(float((x - y).abs().max()) for x, y in zip(a, b))
        print(f"{make()!r}: patched vs dequantizing reader, largest logit difference over 9 steps {worst:.1e}")


def chunked_prefill():
    model = tiny_causal_lm("llama")
    ids = torch.randint(1, 101, (1, 60), generator=torch.Generator().manual_seed(3))
    for policy in (SnapKV(0.5, window=4), H2O(0.5)):
        with effllm.patched(model, kv=policy) as handle:
            try:
                model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, prefill_chunk_size=20)
                print(f"{type(policy).__name__}(0.5), prefill_chunk_size=20: kept {handle.kv.stats()['kept_per_layer']}"
                      f" of 60")
            except ValueError as exc:
                print(f"{type(policy).__name__}(0.5), prefill_chunk_size=20: refused ({str(exc)[:40]}...)")


def padded_fraction():
    model = tiny_causal_lm("llama")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, 101, (40,), generator=gen), torch.randint(1, 101, (20,), generator=gen)
    ids, mask = torch.zeros(2, 40, dtype=torch.long), torch.zeros(2, 40, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 20:], mask[1, 20:] = b, 1
    with effllm.kv.compress(model, SnapKV(0.5, window=4, kernel=1)) as kv, torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
        batch = kv.stats()["kept_per_head"][0]
        model.generate(b[None], max_new_tokens=1, do_sample=False, pad_token_id=0)
        alone = kv.stats()["kept_per_head"][0]
    print(f"SnapKV(0.5), rows of 40 and 20 tokens left-padded: kept per head {batch} (batch), 20-token row alone "
          f"{alone}")


def fair_spans():
    model = tiny_causal_lm("llama")
    ids = torch.randint(1, 101, (1, 20), generator=torch.Generator().manual_seed(3))
    for spans, inner in (([(0, 3), (3, 20)], H2O(8, recent=2)), ([(0, 14), (14, 16)], SnapKV(8, window=4))):
        policy = Protected(inner, spans=spans, fair=True)
        with effllm.patched(model, kv=policy), torch.inference_mode():
            cache = CompressedCache(policy, config=model.config, keep_positions=True)
            model(ids, past_key_values=cache, use_cache=True)
        print(f"Protected({type(inner).__name__}(8), spans={spans}, fair=True): head 0 keeps "
              f"{sorted(cache.layers[0].positions[0, 0].tolist())}")


if __name__ == "__main__":
    model, tok = smollm2()
    cake_budgets(model, tok)
    page_size_bytes(model, tok)
    own_token_exact()
    chunked_prefill()
    padded_fraction()
    fair_spans()
