"""The explicit float32 softmax's per-key statistics (``kernels/scores.py``): what H2O's and
CAKE's prefill (attention ``mass``) and KVzip's replay (``peak``) compute on top of SDPA, on one
SmolLM2 layer. effllm's path (on CPU: the logits' matmul, then one native pass a row) against
the torch ops (the same chunks through torch's masking, logsumexp, exp and sum; the switch
``EFFLLM_NATIVE=0`` picks them). ``--baseline-rev`` measures a commit's code through the same
case."""

from __future__ import annotations

import os

import torch

from ...kernels.scores import softmax_attention
from ..registry import Setup, case

# One SmolLM2 layer (9 query / 3 KV heads, D 64): one prompt, and a left-padded batch of 8
# (prompts of 600 to 950 tokens), as H2O scores them at prefill.
_SHAPES = [{"B": b, "S": s, "stat": stat} for b, s in ((1, 2048), (8, 950)) for stat in ("mass", "peak")]


def _torch_ops(run):
    """``run()`` with the native pass switched off (the user's switch), then back as it was."""
    before = os.environ.get("EFFLLM_NATIVE")
    os.environ["EFFLLM_NATIVE"] = "0"
    try:
        return run()
    finally:
        if before is None:
            del os.environ["EFFLLM_NATIVE"]
        else:
            os.environ["EFFLLM_NATIVE"] = before


@case("scores.stats", shapes=_SHAPES, baseline="torch", quick_shapes=[{"B": 2, "S": 300, "stat": "mass"}],
      description="a causal prefill's attention mass (H2O, CAKE) or peak (KVzip) per key on one SmolLM2 layer "
                  "(9/3 heads, D 64; B=8: left-padded prompts of 600-950 tokens): effllm's path vs the torch ops")
def scores_stats(shape, dtype, device) -> Setup:
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch, seq = shape["B"], shape["S"]
    q = torch.randn(batch, 9, seq, 64, generator=gen).to(device, dtype)
    k = torch.randn(batch, 3, seq, 64, generator=gen).to(device, dtype)
    padding = torch.tensor([seq - 600 - 50 * i for i in range(batch)]) if batch > 1 else torch.zeros(1)
    key_valid = (torch.arange(seq)[None] >= padding.clamp(min=0)[:, None]).to(device)
    want = {"need_mass": True} if shape["stat"] == "mass" else {"need_peak": True}

    def run():
        result = softmax_attention(q, k, scale=0.125, causal=True, key_valid=key_valid, query_valid=key_valid,
                                   need_out=False, **want)
        return result.mass if shape["stat"] == "mass" else result.peak

    return Setup(providers={"effllm": run, "torch": lambda: _torch_ops(run)},
                 reference=lambda: _torch_ops(run).float(),
                 bytes_moved=q.numel() * q.element_size() + k.numel() * k.element_size())
