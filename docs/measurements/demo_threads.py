"""Demo thread default: baseline and int4 rows at 1 vs 2 threads, interleaved, medians."""
import os, platform, statistics, torch
from effllm import demo
from effllm.models import smollm2
model, tok = smollm2()
prompt = demo.build_prompt(tok, 1024)
cpu = [l for l in open("/proc/cpuinfo") if l.startswith("model name")][0].split(":")[1].strip()
print(f"{cpu}, {os.cpu_count()} cpus, load {os.getloadavg()}")
res = {}
for t in (1, 2):
    torch.set_num_threads(t)
    demo.run_feature(model, tok, demo.build_prompt(tok, 64), "baseline", 2)
for rep in range(3):
    for t in (1, 2):
        for f in ("baseline", "attention+int4"):
            torch.set_num_threads(t)
            r = res.setdefault((t, f), demo.Result(f, prompt.input_ids.shape[1], 16))
            demo.run_feature(model, tok, prompt, f, 16, r)
for (t, f), r in sorted(res.items()):
    print(f"threads {t} {f:<16} prefill {r.prefill_tok_s:7.1f} tok/s  decode {r.decode_tok_s:6.1f} tok/s "
          f"(runs: {[round(x, 2) for x in r.prefill_s]} / {[round(x, 2) for x in r.decode_s]})")
print(f"load after {os.getloadavg()}")
