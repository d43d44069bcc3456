"""Backend choice: which implementation of an op runs for given tensors.

Every public op takes ``backend="auto" | "triton" | "torch"``. ``auto`` picks Triton for CUDA
tensors (when triton is installed and the op has a kernel) and the torch path everywhere else.
``triton`` on CPU tensors is only possible under the Triton interpreter (``TRITON_INTERPRET=1``,
set before effllm's kernel modules are imported), which is how kernels are tested without a GPU.

Nothing here runs at import time: capability checks are lazy and cached.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

BACKENDS = ("auto", "triton", "torch")
Backend = Literal["auto", "triton", "torch"]
Resolved = Literal["triton", "torch"]

_TRUTHY = {"1", "true", "yes", "on"}


def interpreting() -> bool:
    """True when the Triton interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(
    backend: str,
    *tensors: torch.Tensor,
    op: str,
    has_triton_kernel: bool = True,
) -> Resolved:
    """Return the backend that will run ``op`` on ``tensors``.

    Raises ``ValueError`` for an unknown name or tensors on different devices, and
    ``RuntimeError`` when ``backend="triton"`` is asked for where it cannot run.
    """
    check_backend_name(backend)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices)) if devices else torch.device("cpu")
    return resolve_for_device(backend, device, op=op, has_triton_kernel=has_triton_kernel)


def resolve_for_device(backend: str, device: torch.device, *, op: str, has_triton_kernel: bool = True) -> Resolved:
    """``resolve_backend`` for tensors that will live on ``device``: lets a caller (``patch``)
    refuse a backend before any tensor exists, with the same errors."""
    check_backend_name(backend)
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        use_triton = device.type == "cuda" and has_triton_kernel and triton_installed()
        return "triton" if use_triton else "torch"

    # backend == "triton": explain exactly why it cannot run, if it cannot.
    if not has_triton_kernel:
        raise RuntimeError(f"{op}: there is no Triton kernel for this op yet; use backend='torch' or 'auto'")
    if not triton_installed():
        raise RuntimeError(f"{op}: backend='triton' needs the triton package: pip install 'effllm[triton]'")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and interpreting():
        return "triton"
    if device.type == "cpu":
        raise RuntimeError(
            f"{op}: backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing effllm's kernels, or use backend='torch' (the fast CPU path)"
        )
    raise RuntimeError(f"{op}: backend='triton' does not support device {device}; use backend='torch'")
