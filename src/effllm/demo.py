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
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import torch


def _quant(kind: str):
    def options() -> dict:
        from .quant import Int4WeightOnly, Int8WeightOnly

        # SmolLM2's hidden size 576 is not a multiple of 128: INT4 uses groups of 64.
        return {"attention": True, "quant": {"int8": Int8WeightOnly(), "int4": Int4WeightOnly(64)}[kind]}
    return options


# Features the demo can run: name -> () -> keyword arguments of effllm.patch (None = the baseline).
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
    feature: str
    prefill_tok_s: float
    decode_tok_s: float
    kv_mib: float
    peak_mib: float | None
    answer_nll: float
    found_key: bool
    tokens: list[int]
    agreement: float | None = None


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


@torch.inference_mode()
def run_feature(model, tokenizer, prompt: Prompt, feature: str, new_tokens: int) -> Result:
    from transformers import DynamicCache

    import effllm

    from ._cache_arg import cache_argument_name
    from .bench.memory import PeakMemory
    from .hf.cache import kv_cache_nbytes

    options = FEATURES[feature]
    cache_arg = cache_argument_name(model)
    handle = effllm.patch(model, **options()) if options else None
    try:
        ids = prompt.input_ids
        with PeakMemory(ids.device) as mem:
            cache = handle.kv.new_cache() if handle is not None and handle.kv else DynamicCache(config=model.config)
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
        # Answer NLL through the same kind of cache (compressed for kv rows), by teacher forcing.
        cache = handle.kv.new_cache() if handle is not None and handle.kv else DynamicCache(config=model.config)
        first = model(ids, **{cache_arg: cache}, use_cache=True).logits[0, -1:]
        rest = model(prompt.answer_ids[:, :-1], **{cache_arg: cache}, use_cache=True).logits[0]
        answer_logits = torch.cat([first, rest]).float()
        nll = float(torch.nn.functional.cross_entropy(answer_logits, prompt.answer_ids[0]))
    finally:
        if handle is not None:
            handle.unpatch()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return Result(
        feature=feature,
        prefill_tok_s=ids.shape[1] / prefill_s,
        decode_tok_s=(new_tokens - 1) / decode_s if new_tokens > 1 else float("nan"),
        kv_mib=kv_bytes / 2**20,
        peak_mib=mem.peak_mb,
        answer_nll=nll,
        found_key=prompt.key in text,
        tokens=tokens,
    )


def format_table(results: list[Result], prompt_len: int, memory_kind: str) -> str:
    header = (
        f"{'feature':<16} {'prefill tok/s':>13} {'decode tok/s':>12} {'KV MiB':>8} {memory_kind + ' MiB':>15} "
        f"{'answer NLL':>10} {'key found':>9} {'agree':>6}"
    )
    lines = [f"SmolLM2-135M-Instruct, prompt {prompt_len} tokens", header, "-" * len(header)]
    for r in results:
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a"
        agree = f"{r.agreement:.2f}" if r.agreement is not None else "-"
        lines.append(
            f"{r.feature:<16} {r.prefill_tok_s:>13.1f} {r.decode_tok_s:>12.1f} {r.kv_mib:>8.2f} {peak:>15} "
            f"{r.answer_nll:>10.3f} {('yes' if r.found_key else 'no'):>9} {agree:>6}"
        )
    return "\n".join(lines)


DESCRIPTION = (
    "Run one long pass-key prompt on the embedded SmolLM2-135M-Instruct through the baseline and "
    "through each effllm feature, and print speed, memory and answer quality side by side."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded SmolLM2 through each effllm feature", description=DESCRIPTION)
    p.add_argument("--features", default=",".join(FEATURES),
                   help=f"comma-separated, from {', '.join(FEATURES)} (default: all)".replace("%", "%%"))
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length in tokens (default 1024)")
    p.add_argument("--new-tokens", type=int, default=24, help="greedy tokens to decode (default 24)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
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
    if args.prompt_tokens < 64 or args.new_tokens < 1:
        raise SystemExit("effllm demo: --prompt-tokens must be >= 64 and --new-tokens >= 1")
    if "baseline" not in features:
        features.insert(0, "baseline")  # agreement is measured against it
    if args.threads:
        torch.set_num_threads(args.threads)

    _require_hf()
    from .testing.models import ModelNotInstalledError, smollm2

    try:
        model, tokenizer = smollm2()
    except ModelNotInstalledError as exc:
        raise SystemExit(f"effllm demo: {exc}") from None
    prompt = build_prompt(tokenizer, args.prompt_tokens, seed=args.seed)
    print(f"prompt: {prompt.input_ids.shape[1]} tokens, pass key {prompt.key}; decoding {args.new_tokens} tokens")
    results = []
    for feature in features:
        result = run_feature(model, tokenizer, prompt, feature, args.new_tokens)
        results.append(result)
        print(f"  {feature}: done", flush=True)
    base = results[0].tokens
    for r in results:
        r.agreement = sum(a == b for a, b in zip(r.tokens, base)) / len(base)
    print()
    print(format_table(results, prompt.input_ids.shape[1], "peak RSS" if prompt.input_ids.device.type == "cpu" else "peak"))
    eos = tokenizer.eos_token_id
    answer = base[: base.index(eos)] if eos in base else base
    print(f"\nbaseline answer: {tokenizer.decode(answer, skip_special_tokens=True)!r}")
    return 0
