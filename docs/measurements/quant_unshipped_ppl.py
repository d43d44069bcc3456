"""Perplexity cost of each quant config on SmolLM2, on a text effllm does not ship (written here)."""
import os, sys, time, platform
import torch
from effllm.testing.models import smollm2
from effllm.testing.quality import perplexity, calibration_texts
from effllm.quant import quantize_, Int8WeightOnly, Int4WeightOnly, Fp8

TEXT = """The old lighthouse keeper on the northern island kept a ledger of every ship that passed.
Each morning he climbed the spiral stairs, wiped the salt from the great lens, and wrote the date,
the weather and the names of the vessels he had seen during the night. Some entries were short:
a fishing boat heading home, a ferry late because of fog. Others ran for a page, describing a
storm that tore the roof from the boat shed, or a tall sailing ship that anchored in the bay for
three days while its crew repaired a broken mast. When the keeper retired, the ledgers filled two
shelves in the village library. Children who read them learned how the wind changes with the
seasons, how the price of coal rose and fell, and how a small community depends on the sea for
its food, its trade and its news. A historian from the mainland later counted the ships by decade
and found that traffic doubled after the harbour was dredged, then fell when the railway reached
the coast. Farmers began sending their grain by train instead of by boat, and the quay grew quiet.
Yet the keeper's notes also show things no count can capture: the evening a whale surfaced beside
the rocks, the winter the bay froze for a week, the summer a travelling orchestra played on the
pier and the whole village danced until dawn. Reading them now, one feels both the slowness of
that life and its richness. Modern navigation has made the lighthouse unnecessary; its lamp is
automatic and a computer logs the ships. But visitors still climb the stairs, look out across the
grey water, and try to imagine the patient man who watched it for forty years.
In the valley beyond the hills, a cooperative of cheese makers follows recipes that are older than
the lighthouse. Milk from the morning is warmed in copper vats, cultures are added, and the curd is
cut by hand with long wire harps. The wheels are salted, pressed and carried to caves where the air
stays cool and damp all year. Every few days someone turns each wheel and brushes its rind. After a
year the cheese is hard and nutty; after three it crumbles and tastes of caramel and grass. The
makers argue about whether the flavour comes from the pasture, the breed of cow, or the caves
themselves, and a university study found that all three matter, along with the particular mix of
microbes living on the wooden shelves."""

def main():
    threads = int(os.environ.get("THREADS", "1"))
    torch.set_num_threads(threads)
    print(f"cpu: {platform.processor() or platform.machine()}, threads {threads}, load {os.getloadavg()}")
    model, tok = smollm2()
    n = tok(TEXT, return_tensors="pt").input_ids.shape[1]
    print(f"text: {n} tokens")
    base = perplexity(model, tok, TEXT)
    print(f"fp32 baseline ppl {base:.3f}", flush=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [tok(t, return_tensors="pt").input_ids for t in calibration_texts()]
    configs = [
        ("Int8WeightOnly()", Int8WeightOnly(), False),
        ("Int4WeightOnly(64)", Int4WeightOnly(64), False),
        ("Fp8() = row/token", Fp8(), False),
        ("Fp8(activations=None)", Fp8(activations=None), False),
        ("Fp8('tensor')", Fp8("tensor"), False),
        ("Fp8('tensor', None)", Fp8("tensor", None), False),
        ("Fp8('block', 'block')", Fp8("block", "block"), False),
        ("Fp8('block', None)", Fp8("block", None), False),
        ("Fp8(gptq=True)", Fp8(gptq=True), True),
        ("Fp8(activations=None, gptq=True)", Fp8(activations=None, gptq=True), True),
    ]
    only = sys.argv[1:]
    for name, cfg, cal in configs:
        if only and name not in only:
            continue
        model, tok = smollm2()
        t0 = time.time()
        quantize_(model, cfg, calibration=calib if cal else None)
        ppl = perplexity(model, tok, TEXT)
        print(f"{name:<36} ppl {ppl:.3f}  {100 * (ppl / base - 1):+.2f}%  ({time.time() - t0:.0f} s)", flush=True)

main()
