"""The llama.cpp bench provider: clean unavailability, and its worker protocol against a fake llama_cpp."""

import sys
import textwrap

import pytest

from effllm.bench import llama_cpp_provider as lcp

# A stand-in for llama_cpp with the few members the worker uses: the next token's logits put the
# maximum at (7 * sum of all ids so far + n_threads) % 50, so the test can predict every greedy token.
FAKE = textwrap.dedent("""
    import ctypes
    __version__ = "fake"

    def llama_get_logits_ith(ctx, i):
        assert i == -1
        return ctypes.cast(ctx, ctypes.POINTER(ctypes.c_float))

    class Llama:
        def __init__(self, model_path, n_threads, n_ctx, **kw):
            assert open(model_path).read() == "gguf"
            self.threads, self.seen, self.ctx = n_threads, [], (ctypes.c_float * 50)()

        def n_vocab(self):
            return 50

        def reset(self):
            self.seen = []

        def eval(self, tokens):
            self.seen += tokens
            ctypes.memset(self.ctx, 0, ctypes.sizeof(self.ctx))
            self.ctx[(7 * sum(self.seen) + self.threads) % 50] = 1.0
""")


def _expected(prompt, new_tokens, threads):
    seen, out = list(prompt), []
    for _ in range(new_tokens):
        out.append((7 * sum(seen) + threads) % 50)
        seen.append(out[-1])
    return out


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("gguf")
    return path


def test_unavailable_when_the_named_interpreter_is_missing(monkeypatch, gguf, tmp_path):
    monkeypatch.setenv(lcp.PYTHON_ENV, str(tmp_path / "no-python"))
    run, why = lcp.llama_cpp_run(gguf, [1, 2], 4, 1)
    assert run is None and lcp.PYTHON_ENV in why and "no-python" in why


def test_unavailable_when_llama_cpp_is_not_installed_and_no_interpreter_named(monkeypatch, gguf):
    monkeypatch.delenv(lcp.PYTHON_ENV, raising=False)
    monkeypatch.setattr(lcp.importlib.util, "find_spec", lambda name: None)
    run, why = lcp.llama_cpp_run(gguf, [1, 2], 4, 1)
    assert run is None and "not installed" in why and lcp.PYTHON_ENV in why


def test_unavailable_when_the_gguf_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(lcp.PYTHON_ENV, sys.executable)
    run, why = lcp.llama_cpp_run(tmp_path / "absent.gguf", [1, 2], 4, 1)
    assert run is None and "absent.gguf" in why


def test_unavailable_when_the_interpreter_cannot_import_llama_cpp(monkeypatch, gguf, tmp_path):
    monkeypatch.setenv(lcp.PYTHON_ENV, sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))          # no llama_cpp there (nor in this venv)
    if lcp.importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama_cpp is importable in this environment")
    run, why = lcp.llama_cpp_run(gguf, [1, 2], 4, 1)
    assert run is None and "llama_cpp" in why


@pytest.mark.parametrize("threads", [1, 3])
def test_worker_decodes_greedily_after_exactly_the_prompt_ids(monkeypatch, gguf, tmp_path, threads):
    (tmp_path / "llama_cpp.py").write_text(FAKE)
    monkeypatch.setenv(lcp.PYTHON_ENV, sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    prompt = [5, 11, 2, 40]
    run, why = lcp.llama_cpp_run(gguf, prompt, 6, threads)
    assert why is None
    for _ in range(2):                                       # a second call starts from a reset model
        metrics = run()
        assert set(metrics) == {"first_token_ms", "prefill_tokens_per_s", "decode_tokens_per_s"}
        assert all(isinstance(v, float) for v in metrics.values())  # the record's schema; speed is for benchmarks
        assert run.worker.last_tokens == _expected(prompt, 6, threads)
    run.worker.close()
