"""effllm: composable, PyTorch-native LLM efficiency primitives.

Importing this package is cheap and side-effect free: it initialises no device, imports
neither transformers nor triton, and patches nothing. Subpackages load on first attribute
access (``effllm.kernels``, ``effllm.bench``, ...), and ``effllm.patch`` only touches the
model instance it is given.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_SUBMODULES = ("kernels", "quant", "kv", "moe", "parallel", "fast", "hf", "bench", "models", "testing", "native")
_LAZY_ATTRS = {
    "patch": ("effllm.hf.patch", "patch"),
    "patched": ("effllm.hf.patch", "patched"),
    "PatchHandle": ("effllm.hf.patch", "PatchHandle"),
    "quantize_": ("effllm.quant.api", "quantize_"),
}

__all__ = ["__version__", *_SUBMODULES, *_LAZY_ATTRS]

if TYPE_CHECKING:  # pragma: no cover
    from . import bench, fast, hf, kernels, kv, models, moe, native, parallel, quant, testing
    from .hf.patch import PatchHandle, patch, patched
    from .quant.api import quantize_


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"effllm.{name}")
        globals()[name] = module
        return module
    if name in _LAZY_ATTRS:
        module_name, attr = _LAZY_ATTRS[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'effllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
