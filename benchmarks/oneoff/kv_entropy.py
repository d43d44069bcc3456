import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import kv_quality as kq
from effllm.testing.models import smollm2
from effllm.demo import build_prompt
torch.set_num_threads(1)
model, tok = smollm2()
cfg = model.config; L, Hk = cfg.num_hidden_layers, cfg.num_key_value_heads
n, samples = int(sys.argv[1]), int(sys.argv[2])
def ent(ids, last=32):
    model.set_attn_implementation("eager")
    try: out = model(ids, output_attentions=True)
    finally: model.set_attn_implementation("sdpa")
    e = torch.zeros(L, Hk)
    for l, a in enumerate(out.attentions):
        a = a[0, :, -last:, :].float()
        e[l] = (-(a.clamp_min(1e-12).log() * a).sum(-1).mean(-1)).view(Hk, -1).mean(-1)
    return e
with torch.inference_mode():
    for i in range(samples):
        p = build_prompt(tok, n, seed=i, depth=0.1 + 0.8 * i / max(1, samples - 1))
        end = kq._context_end(tok, p)
        for conv, ids in (("in", p.input_ids), ("after", p.input_ids[:, :end])):
            e = ent(ids).flatten()
            top = (-e).topk(5).indices
            print(i, conv, [(int(t) // Hk, int(t) % Hk, round(float(e[t]), 2)) for t in top], flush=True)
