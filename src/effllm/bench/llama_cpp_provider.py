"""llama.cpp as a benchmark provider, through llama-cpp-python in a worker process.

llama-cpp-python builds llama.cpp from source, so it lives in a benchmark-only environment
(docs/fast_decode.md, "llama.cpp"): ``EFFLLM_LLAMA_CPP_PYTHON`` names that environment's
interpreter; without it, this interpreter is used when it can import ``llama_cpp``. The worker
(``llama_cpp_worker.py``) runs in its own process either way, so llama.cpp's thread pool never
shares a process with torch's. Where any piece is missing the provider is unavailable, with why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

PYTHON_ENV = "EFFLLM_LLAMA_CPP_PYTHON"
WORKER = Path(__file__).with_name("llama_cpp_worker.py")
_HOWTO = "see docs/fast_decode.md, 'llama.cpp'"


def llama_cpp_python() -> tuple[str | None, str | None]:
    """``(interpreter, None)`` for the Python that runs llama.cpp, or ``(None, why not)``."""
    named = os.environ.get(PYTHON_ENV)
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            return None, f"{PYTHON_ENV}={named} is not an executable file ({_HOWTO})"
        return named, None
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable, None
    return None, f"llama-cpp-python is not installed here and {PYTHON_ENV} is not set ({_HOWTO})"


class LlamaCppWorker:
    """One llama.cpp model loaded in a worker process; calling it times one greedy decode."""

    def __init__(self, python: str, gguf: str | Path, threads: int, context: int):
        # llama.cpp's own logging goes to a file (a pipe could fill and block); closed in close().
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self._proc = subprocess.Popen([python, str(WORKER), str(gguf), str(threads), str(context)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      text=True, env=env)
        hello = self._read()
        if not hello.get("ready"):
            self.close()
            raise RuntimeError(hello.get("error") or "the llama.cpp worker did not start")
        self.version = hello.get("version")
        self.last_tokens: list[int] = []

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            self._log.seek(0)
            tail = self._log.read()[-800:].strip()
            return {"error": f"the llama.cpp worker exited with code {self._proc.returncode}: {tail or 'no output'}"}
        return json.loads(line)

    def __call__(self, tokens: list[int], new_tokens: int) -> dict[str, float]:
        self._proc.stdin.write(json.dumps({"tokens": tokens, "new_tokens": new_tokens}) + "\n")
        self._proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        self.last_tokens = reply.pop("tokens")
        return reply

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()        # the worker exits at end of input
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._log.close()

    def __del__(self):
        if hasattr(self, "_proc"):
            self.close()


def llama_cpp_run(gguf: str | Path, prompt: list[int], new_tokens: int, threads: int
                  ) -> tuple[Callable[[], dict[str, float]] | None, str | None]:
    """``(run, None)``: ``run()`` greedily decodes ``new_tokens`` after exactly the ids ``prompt`` with
    llama.cpp on ``threads`` threads and returns time_generate's metrics; or ``(None, why not)``."""
    python, why = llama_cpp_python()
    if python is None:
        return None, why
    if not Path(gguf).is_file():
        return None, f"no GGUF file at {gguf}"
    try:
        worker = LlamaCppWorker(python, gguf, threads, context=len(prompt) + new_tokens)
    except (OSError, RuntimeError) as exc:
        return None, f"llama.cpp could not load {gguf} with {python}: {exc}"
    def run():
        return worker(list(prompt), new_tokens)

    run.worker = worker
    return run, None
