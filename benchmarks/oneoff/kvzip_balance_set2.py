"""One-off (session 18): where KVzip(global) keeps its tokens in ~4000-token prompts of the second
retrieval set (benchmarks/retrieval_set.py: Python's documentation, no repetition), by quarter of
the context (tokens kept, summed over layers and KV heads), and whether the greedy answer finds
the needle with the question read after compression; scoring from env OVER (default cache).

    python benchmarks/oneoff/kvzip_balance_set2.py 0,1 0.19
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import kv_quant_quality as kqq, kv_quality as kq
from retrieval_set import haystack_sentences, retrieval_prompt
from effllm.kv import KVzip
from effllm.testing.models import smollm2
torch.set_num_threads(1)
model, tok = smollm2()
sent = haystack_sentences()
seeds = [int(s) for s in sys.argv[1].split(",")]
budget = float(sys.argv[2]) if len(sys.argv) > 2 else 0.19

@torch.inference_mode()
def run():
    for i in seeds:
        p = retrieval_prompt(tok, i, 8, prompt_tokens=4000, sentences=sent)
        ids, answer = p.input_ids, p.answer_ids
        end = kq._context_end(tok, p)
        with kqq.CombinedSession(model, KVzip(budget, tokenizer=tok, scope="global", scoring=__import__("os").environ.get("OVER", "cache"))) as s:
            s.prefill(ids[:, :end])
            quarters = [0, 0, 0, 0]
            for layer in s.cache.layers:
                pos = layer.positions; valid = pos >= 0
                for q in range(4):
                    quarters[q] += int(((pos >= q * end // 4) & (pos < (q + 1) * end // 4) & valid).sum())
            first = s.step(ids[:, end:])[0, -1:]
            fork = s.fork()
            nll = float(kq._answer(s, first, answer).mean()); s.restore(fork)
            em = p.key in tok.decode(kq._greedy(s, first, 12))
        print(f"set2 seed {i} depth {p.depth:.2f} {p.kind} end {end}: kept by quarter {quarters}  NLL {nll:.3f} EM {em}", flush=True)
run()
