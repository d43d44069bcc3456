"""Route SmolLM2's attention through effllm, compare with the sdpa baseline, and undo it."""

import torch

import effllm
from effllm.testing.models import smollm2

model, tok = smollm2()
ids = tok("The harbour town of Lindmoor wakes before dawn, when", return_tensors="pt").input_ids

with torch.inference_mode():
    baseline = model.generate(ids, max_new_tokens=20, do_sample=False)
    with effllm.patched(model, attention=True) as handle:
        print(handle.report())
        patched = model.generate(ids, max_new_tokens=20, do_sample=False)

print(tok.decode(patched[0], skip_special_tokens=True))
print("same tokens as sdpa:", torch.equal(baseline, patched))
