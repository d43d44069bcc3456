"""One-off (session 17): does evicting more and coding every key twice beat 75% + codes?

Pass-key prompts of --tokens tokens, 8 depths, one convention; answer NLL, exact match, bytes
(windows at 2 bytes). Run from benchmarks/ so kv_quant_quality imports.

    python benchmarks/oneoff/kv_keys_all.py --tokens 1000 --convention "question in prompt" --out F
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kv_quant_quality as kqq  # noqa: E402
import torch  # noqa: E402

from effllm.bench.records import describe_device, git_sha, write_result_rows  # noqa: E402
from effllm.kv import KVzip, NSNQuant  # noqa: E402
from effllm.testing.models import smollm2  # noqa: E402


def runs(tok):
    small = dict(bits=2, residual=16, chunk=32)
    every = dict(key_heads=10**6, key_residual="codes")  # a count above the rows: every row
    out = {}
    for removed in (75, 81, 85):
        keep = 1 - removed / 100
        out[f"KVzip(global) {removed}% removed"] = lambda k=keep: KVzip(k, tokenizer=tok, scope="global")
        out[f"KVzip(global) {removed}% removed + NSNQuant-2 (window 16 / chunk 32)"] = \
            lambda k=keep: (KVzip(k, tokenizer=tok, scope="global"), NSNQuant(**small))
        out[f"KVzip(global) {removed}% removed + NSNQuant-2 (window 16 / chunk 32 / every key coded twice)"] = \
            lambda k=keep: (KVzip(k, tokenizer=tok, scope="global"), NSNQuant(**small, **every))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--convention", default="question in prompt")
    p.add_argument("--only", default=None)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    sha = git_sha()
    model, tok = smollm2()
    kqq.passkey_long_runs = runs
    only = None if a.only is None else a.only.split(",")

    def record(row):
        row = {**row, "part": f"passkey-{a.tokens}"}
        write_result_rows(a.out, [row], device=describe_device(torch.device("cpu")), threads=1,
                          samples=a.samples, git_sha=sha, keep_others=("part", "config", "convention"))

    kqq.passkey_long(model, tok, a.samples, tokens=a.tokens, record=record, only=only, conventions=(a.convention,))


if __name__ == "__main__":
    main()
