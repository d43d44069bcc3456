# scratch: do the coded sink tokens carry the codes' cost? residuals for every token (forced ones too), then zeroed except chosen
import statistics, sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import kv_quality as kq
from kv_quant_quality import CombinedSession
from effllm.kv import KVzip, NSNQuant
from effllm.kv import protected as prot
from effllm.testing.models import smollm2
from effllm.demo import build_prompt
torch.set_num_threads(1)
orig = prot.ProtectedTokens.choose.__func__
def choose(cls, priority, fraction, *a):
    return orig(cls, priority.nan_to_num(neginf=-1e30, posinf=1e30), fraction, *a)
prot.ProtectedTokens.choose = classmethod(choose)
model, tok = smollm2()
samples = int(sys.argv[1]) if len(sys.argv) > 1 else 4
prompts = [build_prompt(tok, 1000, seed=i, depth=0.1 + 0.8 * i / max(1, samples - 1)) for i in range(samples)]
Hk = model.config.num_key_value_heads
def keep(sink_k, sink_v, heads_k=()):
    def f(cache):
        for l, layer in enumerate(cache.layers):
            rows = layer.ragged.stores if getattr(layer, "ragged", None) is not None else None
            assert rows is not None
            for r, s in enumerate(rows):
                if s.protected is None: continue
                sink = (s.protected.index < 4)[..., None]
                k_on = sink if sink_k else torch.zeros_like(sink)
                if (l, r % Hk) in heads_k: k_on = torch.ones_like(sink)
                s.protected.keys.mul_(k_on)
                s.protected.values.mul_(sink if sink_v else torch.zeros_like(sink))
    return f
runs = {"sinks K+V exact": keep(True, True), "sinks K exact": keep(True, False),
        "sinks K+V + 18.2 keys": keep(True, True, {(18, 2)}), "all protected (sinks too)": lambda c: None}
with torch.inference_mode():
    for name, post in runs.items():
        nlls = []
        for p in prompts:
            with CombinedSession(model, (KVzip(0.25, tokenizer=tok, scope="global"), NSNQuant(bits=2, residual=16, chunk=32, protect=1.0))) as session:
                first = session.prefill(p.input_ids)[0, -1:]
                post(session.cache)
                nlls.append(float(kq._answer(session, first, p.answer_ids).mean()))
        print(f"{name:26s} {statistics.mean(nlls):.3f}  {[round(x,3) for x in nlls]}", flush=True)
