"""Probe of the "question after" pass-key cells: NLL increase of the whole answer and of the key's
digits alone (mean ± standard error of the per-prompt increase, NLL only) at 50% / 75% removed,
for variants that are not shipped policies, on kv_quality.py's 8 prompts or other seeds.

    python benchmarks/kv_question_after_probe.py [--variants KVzip(0.1),Leverage(exact),...]

- ``KVzip(X)``: effllm's KVzip with ``safeguard=X`` (the shipped option; picks its default).
- ``Leverage(exact)`` / ``Leverage(sketch=48)``: leverage scores of each KV head's pre-RoPE keys
  (centred; ``diag(X (X^T X)^-1 X^T)``), exactly or after a right Gaussian sketch to 48 dims, as
  kvpress's LeverageScorePress computes them; uniform budget per head.
- ``KVzipValue(p)``: KVzip (safeguard 0.2) with each score times its value's norm (mean 1 per
  head) to the power ``p``: a token's share of the output is its weight times its value.
- ``KVzipUnique(beta)``: KVzip (safeguard 0.2) with each token's score multiplied by its exact
  leverage (mean 1 per head) to the power ``beta``: redundancy-aware KVzip, tried in session 6.
- ``Random``: uniform random eviction (4 sinks kept), the control.

``--per-token`` instead prints, at 50% removed, each answer position's mean NLL increase over the
full cache for KVzip (safeguard 0.2) and Leverage(sketch=48).

``--kept SEED`` instead prints, for one prompt's context at 50% removed, the tokens that KVzip and
Leverage(sketch=48) keep in the most different fractions of the layers' KV heads.

Behind the paragraph on LeverageScorePress in docs/kv.md; writes nothing.
"""

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_quality import Session, _answer, _context_end, pass_key_prompt, run_pass_key, smollm2  # noqa: E402

from effllm.kv import KVzip, compress  # noqa: E402
from effllm.kv.policies import Policy  # noqa: E402


def _unrotate(model, keys, positions):
    """Pre-RoPE keys from cached (rotated) ones, with the model's own rotary embedding."""
    cos, sin = model.model.rotary_emb(keys, positions[:, 0, :])
    cos, sin = cos[:, None].float(), sin[:, None].float()
    half = keys.shape[-1] // 2
    rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    return (keys * cos - rotated_half * sin) / (cos**2 + sin**2)


class Leverage(Policy):
    def __init__(self, budget, model, sketch=None):
        super().__init__(budget)
        self.model, self.sketch = model, sketch

    def after_prefill(self, layer, query, scale, **context):
        keep = self._fix_budget(layer)
        if layer.stored() <= keep:
            return
        layer.evict(_leverage(self.model, layer, self.sketch), keep)


def _leverage(model, layer, sketch=None):
    """Leverage of each cached key among its head's keys (pre-RoPE, centred): ``(B, H_kv, S)``."""
    x = _unrotate(model, layer.keys.float(), layer.positions)
    x = x - x.mean(-2, keepdim=True)
    if sketch:
        x = x @ (torch.randn(*x.shape[:2], x.shape[-1], sketch) / sketch**0.5)
    gram = x.transpose(-1, -2) @ x
    gram = gram + 1e-3 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(gram.shape[-1])
    return (x * torch.linalg.solve(gram, x.transpose(-1, -2)).transpose(-1, -2)).sum(-1)


class KVzipUnique(KVzip):
    def __init__(self, budget, model, beta, **kw):
        super().__init__(budget, safeguard=0.2, **kw)
        self.model, self.beta = model, beta

    def _evict(self, cache):
        for layer in cache.layers:
            lev = _leverage(self.model, layer)
            layer.scores = layer.scores * (lev * lev.shape[-1] / lev.sum(-1, keepdim=True)).clamp_min(1e-6) ** self.beta
        super()._evict(cache)


class KVzipValue(KVzip):
    """KVzip with each token's score times its value's norm (per head, mean 1)."""

    def __init__(self, budget, power, **kw):
        super().__init__(budget, safeguard=0.2, **kw)
        self.power = power

    def _evict(self, cache):
        for layer in cache.layers:
            norm = layer.values.float().norm(dim=-1)
            layer.scores = layer.scores * (norm / norm.mean(-1, keepdim=True)) ** self.power
        super()._evict(cache)


class Random(Policy):
    def after_prefill(self, layer, query, scale, **context):
        keep = self._fix_budget(layer)
        if layer.stored() > keep:
            layer.evict(torch.rand(layer.positions.shape).masked_fill(layer.first_mask(4), float("inf")), keep)


SEEDS = range(8)


def answer_nlls(model, tok, factory, budget) -> tuple[list[float], list[float]]:
    """Per-prompt NLLs of the whole answer and of its key digits."""
    res = run_pass_key(model, tok, Session, factory, budget, 8, "question after", modes=("nll",), seeds=SEEDS)
    return res["answer_nlls"], res["key_nlls"]


def _increase(nlls, full) -> str:
    diff = [a - b for a, b in zip(nlls, full)]
    return f"{statistics.mean(diff):+.4f} ± {statistics.stdev(diff) / len(diff) ** 0.5:.4f}"


def kept_fractions(model, policy, ids) -> torch.Tensor:
    """Per context token, the fraction of (layer, KV head) pairs whose cache keeps it."""
    with compress(model, policy) as kv, torch.inference_mode():
        cache = kv.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        kept = torch.zeros(ids.shape[1])
        for layer in cache.layers:
            positions = layer.positions.reshape(-1, layer.positions.shape[-1])
            lengths = layer.row_lengths().flatten().tolist() if layer.ragged is not None else None
            for row, pos in enumerate(positions):
                pos = pos[: lengths[row]] if lengths else pos
                kept.index_add_(0, pos.long(), torch.ones(len(pos)))
        return kept / (len(cache.layers) * positions.shape[0])


def print_kept(model, tok, seed: int) -> None:
    prompt = pass_key_prompt(tok, seed, 8)
    ids = prompt.input_ids[:, :_context_end(tok, prompt)]
    a = kept_fractions(model, KVzip(0.5, tokenizer=tok), ids)
    b = kept_fractions(model, Leverage(0.5, model, 48), ids)
    words = [tok.decode([t]) for t in ids[0].tolist()]
    by_word = defaultdict(list)
    for i, word in enumerate(words):
        by_word[word].append(i)
    print(f"pass key {prompt.key}; kept fraction of layer-heads, KVzip / Leverage(sketch=48), mean per token:")
    ranked = sorted(by_word.items(), key=lambda item: -float((a[item[1]] - b[item[1]]).sum()))
    for word, idx in ranked[:8] + ranked[-4:]:
        print(f"  {word!r:14s} x{len(idx):3d}  {float(a[idx].mean()):.2f} / {float(b[idx].mean()):.2f}")
    digits = [i for i, word in enumerate(words) if word.strip().isdigit()]
    print("  pass-key digits: " + ", ".join(f"{words[i]!r} {float(a[i]):.2f} / {float(b[i]):.2f}" for i in digits))


def per_token_nlls(model, tok, factory) -> torch.Tensor:
    """``(prompts, answer tokens)`` NLLs, question after, 50% removed (every answer has 12 tokens)."""
    rows = []
    for i in SEEDS:
        prompt = pass_key_prompt(tok, i)
        end = _context_end(tok, prompt)
        with Session(model, factory(0.5) if factory else None) as session, torch.inference_mode():
            session.prefill(prompt.input_ids[:, :end])
            first = session.step(prompt.input_ids[:, end:])[0, -1:]
            rows.append(_answer(session, first, prompt.answer_ids))
    return torch.stack(rows)


def print_per_token(model, tok) -> None:
    full = per_token_nlls(model, tok, None)
    words = [tok.decode([t]) for t in pass_key_prompt(tok, SEEDS[0]).answer_ids[0].tolist()]
    print("answer token:      " + " ".join(f"{w!r:>8s}" for w in words))
    for name, factory in (("KVzip(0.2)", lambda b: KVzip(b, tokenizer=tok, safeguard=0.2)),
                          ("Leverage(sketch=48)", lambda b: Leverage(b, model, 48))):
        diff = (per_token_nlls(model, tok, factory) - full).mean(0)
        print(f"{name:19s}" + " ".join(f"{float(d):+8.3f}" for d in diff))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="KVzip(0.0),KVzip(0.1),KVzip(0.2),KVzip(0.3),Leverage(exact),"
                                              "Leverage(sketch=48),KVzipUnique(1.0),KVzipUnique(0.5),Random")
    parser.add_argument("--seeds", default="0:8", help="prompt seeds START:END (0:8 is kv_quality.py's set)")
    parser.add_argument("--per-token", action="store_true", help="NLL increase per answer position")
    parser.add_argument("--kept", type=int, metavar="SEED", help="print kept-token fractions for one prompt")
    args = parser.parse_args()
    global SEEDS
    SEEDS = range(*map(int, args.seeds.split(":")))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = smollm2()
    if args.kept is not None:
        return print_kept(model, tok, args.kept)
    if args.per_token:
        return print_per_token(model, tok)

    def factory(name):
        if name.startswith("KVzip("):
            return lambda b: KVzip(b, tokenizer=tok, safeguard=float(name[6:-1]))
        if name.startswith("Leverage("):
            sketch = None if name == "Leverage(exact)" else int(name.split("=")[1][:-1])
            return lambda b: Leverage(b, model, sketch)
        if name.startswith("KVzipUnique("):
            return lambda b: KVzipUnique(b, model, float(name[12:-1]), tokenizer=tok)
        if name.startswith("KVzipValue("):
            return lambda b: KVzipValue(b, float(name[11:-1]), tokenizer=tok)
        if name == "Random":
            return lambda b: Random(b)
        raise SystemExit(f"unknown variant {name!r}")

    full = answer_nlls(model, tok, None, None)
    for name in args.variants.split(","):
        for label, budget in (("50%", 0.5), ("75%", 0.25)):
            answer, key = answer_nlls(model, tok, factory(name), budget)
            print(f"{name:20s} {label} removed: answer {_increase(answer, full[0])}  key {_increase(key, full[1])}",
                  flush=True)


if __name__ == "__main__":
    main()
