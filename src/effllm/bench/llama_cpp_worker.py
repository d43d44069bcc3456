"""Greedy-decode timer for llama.cpp, run as a script by another Python (the one with llama-cpp-python).

Standalone on purpose: llama-cpp-python is installed in a benchmark-only environment that has
neither torch nor effllm, so this file imports only the standard library, numpy and llama_cpp.

Protocol (one JSON object per line): argv is ``GGUF_PATH THREADS CONTEXT``; the worker loads the
model, prints ``{"ready": true, ...}`` (or ``{"error": ...}`` and exits), then for each request
``{"tokens": [ids...], "new_tokens": N}`` on stdin prints the timings of one greedy decode of N tokens
after exactly those prompt ids (no BOS added, end-of-sequence ignored), until stdin closes.
"""

import json
import sys
import time


def _reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _load(path, threads, context):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=context,
                          n_batch=context, n_ubatch=context, logits_all=False, verbose=False)
    return llm, llama_cpp.__version__


def _greedy(llm, tokens, new_tokens):
    """The same stamps as effllm.bench.model.time_generate: one when each new token's logits are ready."""
    import llama_cpp
    import numpy as np

    def argmax_of_last_logits():
        # llama-cpp-python 0.3 keeps no scores without logits_all: read the context's last row.
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    vocab = llm.n_vocab()
    llm.reset()
    stamps, out = [], []
    start = time.perf_counter()
    llm.eval(tokens)                                   # prefill: logits of the last prompt position
    for i in range(new_tokens):
        stamps.append(time.perf_counter())
        token = argmax_of_last_logits()
        out.append(token)
        if i + 1 < new_tokens:
            llm.eval([token])
    first = stamps[0] - start
    return {
        "first_token_ms": first * 1e3,
        "prefill_tokens_per_s": len(tokens) / first,
        "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "tokens": out,
    }


def main(argv):
    path, threads, context = argv[1], int(argv[2]), int(argv[3])
    try:
        llm, version = _load(path, threads, context)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which marks the provider unavailable
        _reply({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _reply({"ready": True, "version": version, "n_vocab": llm.n_vocab()})
    for line in sys.stdin:
        request = json.loads(line)
        _reply(_greedy(llm, request["tokens"], request["new_tokens"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
