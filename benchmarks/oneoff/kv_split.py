# scratch: where the codes' cost lies after KVzip(global) 75%: keys or values (protect=1 with one side's residuals zeroed)
import statistics, sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import kv_quality as kq
from kv_quant_quality import CombinedSession
from effllm.kv import KVzip, NSNQuant
from effllm.testing.models import smollm2
from effllm.demo import build_prompt
torch.set_num_threads(1)
model, tok = smollm2()
samples = int(sys.argv[1]) if len(sys.argv) > 1 else 4
prompts = [build_prompt(tok, 1000, seed=i, depth=0.1 + 0.8 * i / max(1, samples - 1)) for i in range(samples)]

def stores(cache):
    for layer in cache.layers:
        if getattr(layer, "store", None) is not None:
            yield layer.store
        ragged = getattr(layer, "ragged", None)
        if ragged is not None:
            yield from ragged.stores

def zero(side):
    def f(cache):
        n = 0
        for s in stores(cache):
            if s.protected is not None:
                getattr(s.protected, side).zero_(); n += 1
        assert n > 0
    return f

runs = {"kvzip": (lambda: KVzip(0.25, tokenizer=tok, scope="global"), None),
        "codes": (lambda: (KVzip(0.25, tokenizer=tok, scope="global"), NSNQuant(bits=2, residual=16, chunk=32)), None),
        "keys exact": (lambda: (KVzip(0.25, tokenizer=tok, scope="global"), NSNQuant(bits=2, residual=16, chunk=32, protect=1.0)), zero("values")),
        "values exact": (lambda: (KVzip(0.25, tokenizer=tok, scope="global"), NSNQuant(bits=2, residual=16, chunk=32, protect=1.0)), zero("keys")),
        }
with torch.inference_mode():
    for name, (factory, post) in runs.items():
        nlls = []
        for p in prompts:
            with CombinedSession(model, factory()) as session:
                first = session.prefill(p.input_ids)[0, -1:]
                if post: post(session.cache)
                nlls.append(float(kq._answer(session, first, p.answer_ids).mean()))
        print(f"{name:14s} {statistics.mean(nlls):.3f}  {[round(x,3) for x in nlls]}", flush=True)
