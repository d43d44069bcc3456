"""Probe of the "question after" pass-key cells: answer-NLL increase (mean ± standard error of the
per-prompt increase, 8 prompts, NLL only) at 50% / 75% removed, for variants that are not
shipped policies.

    python benchmarks/kv_question_after_probe.py [--variants KVzip(0.1),Leverage(exact),...]

- ``KVzip(X)``: effllm's KVzip with ``safeguard=X`` (the shipped option; picks its default).
- ``Leverage(exact)`` / ``Leverage(sketch=48)``: leverage scores of each KV head's pre-RoPE keys
  (centred; ``diag(X (X^T X)^-1 X^T)``), exactly or after a right Gaussian sketch to 48 dims, as
  kvpress's LeverageScorePress computes them; uniform budget per head.
- ``Random``: uniform random eviction (4 sinks kept), the control.

Behind the paragraph on LeverageScorePress in docs/kv.md; writes nothing.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_quality import Session, run_pass_key, smollm2  # noqa: E402

from effllm.kv import KVzip  # noqa: E402
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
        x = _unrotate(self.model, layer.keys.float(), layer.positions)
        x = x - x.mean(-2, keepdim=True)
        if self.sketch:
            x = x @ (torch.randn(*x.shape[:2], x.shape[-1], self.sketch) / self.sketch**0.5)
        gram = x.transpose(-1, -2) @ x
        gram = gram + 1e-3 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(gram.shape[-1])
        layer.evict((x * torch.linalg.solve(gram, x.transpose(-1, -2)).transpose(-1, -2)).sum(-1), keep)


class Random(Policy):
    def after_prefill(self, layer, query, scale, **context):
        keep = self._fix_budget(layer)
        if layer.stored() > keep:
            layer.evict(torch.rand(layer.positions.shape).masked_fill(layer.first_mask(4), float("inf")), keep)


def answer_nlls(model, tok, factory, budget) -> list[float]:
    return run_pass_key(model, tok, Session, factory, budget, 8, "question after", modes=("nll",))["answer_nlls"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="KVzip(0.0),KVzip(0.1),KVzip(0.2),KVzip(0.3),Leverage(exact),"
                                              "Leverage(sketch=48),Random")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = smollm2()

    def factory(name):
        if name.startswith("KVzip("):
            return lambda b: KVzip(b, tokenizer=tok, safeguard=float(name[6:-1]))
        if name.startswith("Leverage("):
            sketch = None if name == "Leverage(exact)" else int(name.split("=")[1][:-1])
            return lambda b: Leverage(b, model, sketch)
        if name == "Random":
            return lambda b: Random(b)
        raise SystemExit(f"unknown variant {name!r}")

    full = answer_nlls(model, tok, None, None)
    for name in args.variants.split(","):
        for label, budget in (("50%", 0.5), ("75%", 0.25)):
            diff = [a - b for a, b in zip(answer_nlls(model, tok, factory(name), budget), full)]
            print(f"{name:20s} {label} removed: {statistics.mean(diff):+.4f} ± "
                  f"{statistics.stdev(diff) / len(diff) ** 0.5:.4f}", flush=True)


if __name__ == "__main__":
    main()
