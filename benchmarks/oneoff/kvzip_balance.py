"""One-off (session 18): where KVzip(global) keeps its tokens in a ~4000-token pass-key prompt
(tokens kept in the context's first and second halves, summed over layers and KV heads; the key's
tokens kept, of 5 tokens x 90 rows) and whether the greedy answer then finds the key with the
question read after compression; per scoring (env OVER: cache, chunk, local, as kv/kvzip.py had
them at commit 33e06b6), replay chunk size and budget.

    OVER=local python benchmarks/oneoff/kvzip_balance.py 0,1,2,3 2048 0.19
"""
import sys, torch, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import kv_quant_quality as kqq, kv_quality as kq
from effllm.kv import KVzip
from effllm.testing.models import smollm2
from effllm.demo import build_prompt
torch.set_num_threads(1)
model, tok = smollm2()
seeds = [int(s) for s in sys.argv[1].split(",")]
chunks = [int(c) for c in sys.argv[2].split(",")]
budget = float(sys.argv[3]) if len(sys.argv) > 3 else 0.19
_mode = torch.inference_mode(); _mode.__enter__()
for i in seeds:
    prompt = build_prompt(tok, 4000, seed=i, depth=0.1 + 0.8 * i / 7)
    ids, answer = prompt.input_ids, prompt.answer_ids
    end = kq._context_end(tok, prompt)
    # where the key sits
    key_ids = tok(prompt.key, add_special_tokens=False).input_ids
    flat = ids[0].tolist()
    kpos = []
    for form in (prompt.key, " " + prompt.key):
        key_ids = tok(form, add_special_tokens=False).input_ids
        kpos = [p for p in range(len(flat) - len(key_ids)) if flat[p:p + len(key_ids)] == key_ids]
        if kpos:
            break
    for c in chunks:
        with kqq.CombinedSession(model, KVzip(budget, tokenizer=tok, scope="global", chunk=c, scoring=__import__("os").environ.get("OVER", "cache"))) as s:
            s.prefill(ids[:, :end])
            halves = [0, 0]; keykept = 0; rows = 0
            for layer in s.cache.layers:
                pos = layer.positions
                valid = pos >= 0
                halves[0] += int(((pos < end // 2) & valid).sum()); halves[1] += int(((pos >= end // 2) & valid).sum())
                if kpos:
                    kk = torch.zeros_like(valid)
                    for p in range(kpos[0], kpos[0] + len(key_ids)):
                        kk |= pos == p
                    keykept += int(kk.sum()); rows += pos.shape[0] * pos.shape[1] * len(key_ids)
            first = s.step(ids[:, end:])[0, -1:]
            fork = s.fork()
            nll = float(kq._answer(s, first, answer).mean()); s.restore(fork)
            text = tok.decode(kq._greedy(s, first, 12)); em = prompt.key in text; print(repr(text), prompt.key)
        print(f"seed {i} key@{kpos[:1]} end {end} chunk {c}: kept first/second half {halves[0]}/{halves[1]}  key tokens kept {keykept}/{rows}  NLL {nll:.3f} EM {em}", flush=True)
