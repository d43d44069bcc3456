# scratch: keys exact (16-bit residual) only on the heads a signal picks; signal = attention sharpness of the prompt's last queries
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
cfg = model.config; L, Hq, Hk = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads

def sharpness(ids, last=32):
    model.set_attn_implementation("eager")
    try:
        out = model(ids, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    peak, ent = torch.zeros(L, Hk), torch.zeros(L, Hk)
    for l, a in enumerate(out.attentions):  # (1, Hq, S, S)
        a = a[0, :, -last:, :].float()
        pk = a[..., 1:].max(-1).values.mean(-1)  # (Hq,)
        e = -(a.clamp_min(1e-12).log() * a).sum(-1).mean(-1)
        peak[l] = pk.view(Hk, -1).mean(-1); ent[l] = e.view(Hk, -1).mean(-1)
    return peak, ent

def keep_key_residuals(chosen):  # chosen: bool (L, Hk)
    def f(cache):
        for l, layer in enumerate(cache.layers):
            ragged = getattr(layer, "ragged", None)
            if ragged is not None:
                for r, s in enumerate(ragged.stores):
                    if s.protected is None: continue
                    s.protected.values.zero_()
                    if not chosen[l, r % Hk]: s.protected.keys.zero_()
            elif getattr(layer, "store", None) is not None:
                s = layer.store
                if s.protected is None: continue
                s.protected.values.zero_()
                for h in range(Hk):
                    if not chosen[l, h]: s.protected.keys[:, h].zero_()
    return f

def factory():
    return (KVzip(0.25, tokenizer=tok, scope="global"), NSNQuant(bits=2, residual=16, chunk=32, protect=1.0))

with torch.inference_mode():
    signals = [sharpness(p.input_ids) for p in prompts]
    for i, (pk, en) in enumerate(signals):
        top = pk.flatten().topk(6).indices
        print("prompt", i, "peak top6", [(int(t) // Hk, int(t) % Hk, round(float(pk.flatten()[t]), 3)) for t in top], flush=True)
    runs = {}
    for k in (1, 3, 9):
        runs[f"peak top{k}"] = lambda pk, en, k=k: torch.zeros(L * Hk, dtype=torch.bool).index_fill_(0, pk.flatten().topk(k).indices, True).view(L, Hk)
        runs[f"low-entropy top{k}"] = lambda pk, en, k=k: torch.zeros(L * Hk, dtype=torch.bool).index_fill_(0, (-en).flatten().topk(k).indices, True).view(L, Hk)
    runs["layers 15-19"] = lambda pk, en: torch.zeros(L, Hk, dtype=torch.bool).index_fill_(0, torch.arange(15, 20), True)
    for name, pick in runs.items():
        nlls = []
        for p, (pk, en) in zip(prompts, signals):
            with CombinedSession(model, factory()) as session:
                first = session.prefill(p.input_ids)[0, -1:]
                keep_key_residuals(pick(pk, en))(session.cache)
                nlls.append(float(kq._answer(session, first, p.answer_ids).mean()))
        print(f"{name:18s} {statistics.mean(nlls):.3f}  {[round(x,3) for x in nlls]}", flush=True)
