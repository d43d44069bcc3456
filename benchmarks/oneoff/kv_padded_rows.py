"""One-off: eviction policies with a fractional budget on a left-padded SmolLM2 batch, at the code
on PYTHONPATH (run it at two commits to compare): each row's kept tokens and teacher-forced NLL
in the batch against the row alone.

    python benchmarks/oneoff/kv_padded_rows.py

Four prompts of 96-900 tokens (pydoc topics), each row at its own positions as generate() gives
them; per policy: kept tokens per layer (mean over layers and KV heads) and the mean NLL of the
row's next 32 tokens, in the batch and alone.
"""

import torch

import effllm
from effllm.kv import CAKE, H2O, AdaKV, KVzip, SnapKV
from effllm.testing.models import smollm2


def text_ids(tok, tokens, start=0):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return tok(text[start * 8:(start + tokens) * 8 + 64], return_tensors="pt").input_ids[0, :tokens].tolist()


def run(model, handle, prompts, follow, pad):
    """Per row: (mean kept tokens a layer and KV head after the prompt, mean NLL of ``follow``)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in prompts])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in prompts])
    cache = handle.kv.new_cache()
    logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), past_key_values=cache,
                   use_cache=True).logits[:, -1]
    kept = torch.stack([layer.row_lengths().float().mean(-1) for layer in cache.layers]).mean(0)
    nll = torch.zeros(len(prompts))
    for step in range(len(follow[0])):
        target = torch.tensor([f[step] for f in follow])
        nll += torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
        logits = model(target[:, None], attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    return kept, nll / len(follow[0])


def main():
    torch.set_num_threads(2)
    model, tok = smollm2()
    pad = tok.pad_token_id or 0
    lengths = [96, 250, 500, 900]
    texts = [text_ids(tok, n + 32, start=1000 * i) for i, n in enumerate(lengths)]
    prompts, follow = [t[:-32] for t in texts], [t[-32:] for t in texts]
    policies = {"SnapKV(0.5)": SnapKV(0.5), "H2O(0.5)": H2O(0.5), "CAKE(0.5)": CAKE(0.5),
                "AdaKV(SnapKV(0.5))": AdaKV(SnapKV(0.5)), "KVzip(0.5)": KVzip(0.5, tokenizer=tok)}
    for name, policy in policies.items():
        with effllm.patched(model, kv=policy) as handle, torch.inference_mode():
            kept, nll = run(model, handle, prompts, follow, pad)
            alone = [run(model, handle, [p], [f], pad) for p, f in zip(prompts, follow)]
        kept_alone, nll_alone = torch.cat([k for k, _ in alone]), torch.cat([n for _, n in alone])
        print(f"{name}: rows of {lengths} tokens; kept a layer and head in the batch "
              f"{[round(x, 1) for x in kept.tolist()]}, alone {[round(x, 1) for x in kept_alone.tolist()]}; "
              f"NLL of the next 32 in the batch {[round(x, 4) for x in nll.tolist()]}, alone "
              f"{[round(x, 4) for x in nll_alone.tolist()]}, |batch - alone| "
              f"{[f'{x:.1e}' for x in (nll - nll_alone).abs().tolist()]}", flush=True)


if __name__ == "__main__":
    main()
