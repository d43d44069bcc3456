"""One-off (session 17): where the bytes go at KVzip(global) 75% removed + NSNQuant-2 (window 16 /
chunk 32), question after, one ~4000-token pass-key prompt (seed 0), with the codes alone and with
every key coded twice (1-bit second code); bytes of an fp16 cache, windows at 2 bytes.

    python benchmarks/oneoff/kv_bytes_75.py
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import kv_quant_quality as kqq, kv_quality as kq
from effllm.kv import KVzip, NSNQuant
from effllm.testing.models import smollm2
from effllm.demo import build_prompt
torch.set_num_threads(2)
model, tok = smollm2()
cfg = model.config; per_token = cfg.num_key_value_heads * 64
small = dict(bits=2, residual=16, chunk=32)
prompt = build_prompt(tok, 4000, seed=0, depth=0.1)
end = kq._context_end(tok, prompt)
ids = prompt.input_ids
for name, q in [("codes", NSNQuant(**small)), ("twice1", NSNQuant(**small, key_heads="all", key_residual="codes", key_residual_bits=1))]:
    with kqq.CombinedSession(model, (KVzip(0.25, tokenizer=tok, scope="global"), q)) as s:
        s.prefill(ids[:, :end]); s.step(ids[:, end:])
        fp16 = cfg.num_hidden_layers * 2 * per_token * 2 * ids.shape[1]
        total = kqq._fp16_window_bytes(s.cache, per_token, 4) 
        # breakdown
        pos = codes = ek = win = 0
        for layer in s.cache.layers:
            for st in layer.ragged.stores:
                codes += st.key_codes.nbytes() + st.value_codes.nbytes() if st.key_codes is not None else 0
                ek += st.exact_keys.nbytes() if st.exact_keys is not None else 0
                win += sum(st.full_precision_tokens()) * 64 * 2
        print(name, round(total / fp16, 4), "codes", round(codes / fp16, 4), "second", round(ek / fp16, 4), "windows(fp16)", round(win / fp16, 4), "rest", round((total - codes - ek - win) / fp16, 4))
