import sys, torch, collections
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from kv_quant_quality import CombinedSession
from effllm.kv import KVzip, NSNQuant
from effllm.testing.models import smollm2
from effllm.demo import build_prompt
torch.set_num_threads(1)
model, tok = smollm2()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
p = build_prompt(tok, n, seed=0, depth=0.5)
cfg = model.config
fp16 = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 64 * 2 * p.input_ids.shape[1]
parts = collections.Counter(); kept = 0
def nb(t): return 0 if t is None else t.numel() * t.element_size()
with torch.inference_mode(), CombinedSession(model, (KVzip(0.25, tokenizer=tok, scope="global"), NSNQuant(bits=2, residual=16, chunk=32))) as s:
    s.prefill(p.input_ids)
    for layer in s.cache.layers:
        stores = layer.ragged.stores if getattr(layer, "ragged", None) is not None else [layer.store]
        for st in stores:
            for side in ("key_codes", "value_codes"):
                c = getattr(st, side)
                if c is None: continue
                for name in ("codes", "scales", "grid", "shift", "counts"):
                    parts[f"{side}.{name}"] += nb(getattr(c, name))
                kept += c.codes.shape[2] if side == "key_codes" else 0
            for w in ("key_window", "value_window"):
                parts[w + " (at 2 bytes)"] += nb(getattr(st, w)) // getattr(st, w).element_size() * 2 if getattr(st, w) is not None else 0
    print("tokens", p.input_ids.shape[1], "fp16 bytes", fp16, "coded token-rows", kept, "of", p.input_ids.shape[1] * 90)
    for k, v in sorted(parts.items()): print(f"{k:28s} {v:9d}  {v / fp16:.4f}")
    print("total", sum(parts.values()) / fp16)
