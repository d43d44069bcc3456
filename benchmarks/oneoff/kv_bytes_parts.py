"""One-off (session 19): every part of the bytes at KVzip(global) 75% removed (chunk scoring) +
NSNQuant-2 (window 16 / chunk 32) with every key coded twice (1-bit second code), question after,
one ~4000-token pass-key prompt (seed 0, depth 0.1); fractions of an fp16 cache of the tokens seen.
Session 19 (after 488c0cd): ``--shift-bits 8`` for int8 shifts; the cache drops positions after
the replay unless ``--keep-positions``.

    python benchmarks/oneoff/kv_bytes_parts.py [--shift-bits 8] [--keep-positions]
"""
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kv_quality as kq
import kv_quant_quality as kqq

from effllm.demo import build_prompt
from effllm.kv import KVzip, NSNQuant
from effllm.testing.models import smollm2

shift_bits = 8 if "--shift-bits" in sys.argv and sys.argv[sys.argv.index("--shift-bits") + 1] == "8" else 16
keep_positions = "--keep-positions" in sys.argv
torch.set_num_threads(1)
model, tok = smollm2()
cfg = model.config
per_token = cfg.num_key_value_heads * 64
prompt = build_prompt(tok, 4000, seed=0, depth=0.1)
end = kq._context_end(tok, prompt)
ids = prompt.input_ids
quantizer = NSNQuant(bits=2, residual=16, chunk=32, key_heads="all", key_residual="codes", key_residual_bits=1,
                     shift_bits=shift_bits)


def size(t):
    return 0 if t is None else t.numel() * t.element_size()


if keep_positions:  # the cache as it was before 488c0cd: positions kept after the replay
    from effllm.kv.cache import CompressedCache
    CompressedCache.compressed = lambda self: None


with kqq.CombinedSession(model, (KVzip(0.25, tokenizer=tok, scope="global"), quantizer)) as s:
    s.prefill(ids[:, :end])
    s.step(ids[:, end:])
    fp16 = cfg.num_hidden_layers * 2 * per_token * 2 * ids.shape[1]
    parts = Counter()
    for layer in s.cache.layers:
        parts["positions"] += size(layer.positions)
        parts["scores"] += size(layer.scores)
        for st in layer.ragged.stores:
            for kind, codes in (("first", st.key_codes), ("first", st.value_codes)):
                for name in ("codes", "scales", "grid", "shift", "counts", "shift_scale"):
                    parts[f"{kind} {name}"] += size(getattr(codes, name))
            if st.exact_keys is not None:
                second = st.exact_keys.keys
                for name in ("codes", "scales", "grid", "shift", "counts", "shift_scale"):
                    parts[f"second {name}"] += size(getattr(second, name))
                parts["second rows"] += size(st.exact_keys.rows)
            parts["exact_rows"] += size(st.exact_rows)
            parts["windows (fp16)"] += sum(st.full_precision_tokens()) * 64 * 2
    parts["read buffers"] = s.cache.read_buffers.nbytes() if s.cache.read_buffers is not None else 0
    total = kqq._fp16_window_bytes(s.cache, per_token, model.dtype.itemsize)
    print("shift_bits", shift_bits, "keep_positions", keep_positions)
    print("total", round(total / fp16, 5), "parts sum", round(sum(parts.values()) / fp16, 5))
    for name, value in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"{name:16s} {value / fp16:.5f}")
