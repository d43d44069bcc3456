# scratch: exact keys vs 2-stage (residual re-coded by NSNQuant-2) keys on the sharpest head, 1k prompts
import statistics, sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import kv_quality as kq
from kv_quant_quality import CombinedSession
from effllm.kv import KVzip, NSNQuant
from effllm.kv import exact_keys as ek
from effllm.kv.nsnquant import quantize, dequantize
from effllm.testing.models import smollm2
from effllm.demo import build_prompt
torch.set_num_threads(1)
model, tok = smollm2()
prompts = [build_prompt(tok, 1000, seed=i, depth=0.1 + 0.8 * i / 3) for i in range(4)]
orig = ek._residuals
def coded(bits, chunk):
    cfg = NSNQuant(bits=bits, residual=0, chunk=chunk)
    def f(rows, exact, decoded):
        r = exact[rows].float() - decoded[rows].float()  # (R, n, D)
        rq = dequantize(quantize(r[:, None], cfg), torch.float32)[:, 0]
        return rq.to(ek.residual_dtype(exact.dtype))
    return f
runs = {"exact": orig, "2-stage NSN2": coded(2, 32), "2-stage NSN1": coded(1, 32)}
with torch.inference_mode():
    for name, fn in runs.items():
        ek._residuals = fn
        nlls = []
        for p in prompts:
            with CombinedSession(model, (KVzip(0.25, tokenizer=tok, scope="global"), NSNQuant(bits=2, residual=16, chunk=32, key_heads=1))) as s:
                first = s.prefill(p.input_ids)[0, -1:]
                nlls.append(float(kq._answer(s, first, p.answer_ids).mean()))
        print(f"{name:14s} {statistics.mean(nlls):.3f} {[round(x, 3) for x in nlls]}", flush=True)
