"""Save and load quantized models as safetensors, with the format in the file's metadata.

``save(model, path)`` writes the whole state dict (packed INT4/INT8/FP8 buffers as they are, tied
tensors once) plus ``effllm.quant``: a JSON map from module name to its config and shape.
``load(model, path)`` takes a model of the same architecture (unquantized, e.g. built from its
config), checks every tensor of the model as it will be (quantized modules as the metadata says)
against the file's shapes and dtypes, and the metadata's every field, *before* changing anything
(all or nothing), then swaps in empty quantized modules and loads. No re-quantisation happens, so
outputs are bit-identical to the model that was saved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from .api import replace_module
from .base import QuantLinear
from .config import config_from_dict, config_to_dict
from .registry import handler_for

FORMAT_VERSION = "1"
_META_KEY = "effllm.quant"
_VERSION_KEY = "effllm.format_version"


def save(model: nn.Module, path: str | Path) -> None:
    modules = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not modules:
        raise ValueError("effllm.quant.save: the model has no quantized modules; run quantize_ first")
    described = {
        name: {"config": config_to_dict(m.config), "in_features": m.in_features, "out_features": m.out_features,
               "bias": m.bias is not None, "dtype": str(m.dtype).removeprefix("torch.")}
        for name, m in modules.items()
    }
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(f"effllm.quant.save: path must be a file in an existing folder, got {str(path)!r}")
    # Written next to the target, then renamed: an interrupted save never leaves a torn file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_model(model, str(tmp), metadata={_META_KEY: json.dumps(described), _VERSION_KEY: FORMAT_VERSION})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load a file written by ``save`` into ``model`` (in place; also returned)."""
    path = str(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        shapes = {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}
    if _META_KEY not in meta:
        raise ValueError(f"effllm.quant.load: {path} has no '{_META_KEY}' metadata: not written by effllm.quant.save")
    if meta.get(_VERSION_KEY) != FORMAT_VERSION:
        raise ValueError(f"effllm.quant.load: {path} has format version {meta.get(_VERSION_KEY)!r}; this effllm "
                         f"reads version {FORMAT_VERSION}")
    described = _parse_metadata(meta[_META_KEY], path)
    shells = {name: _shell(model, name, info, path) for name, info in described.items()}
    _check_tensors(model, shells, shapes, path, strict)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for name, shell in shells.items():
        replace_module(model, name, shell.to_empty(device=device))
    load_model(model, path, strict=strict, device=str(device))
    return model


def _parse_metadata(text: str, path: str) -> dict:
    """The module map of the file's metadata; a clear error for anything effllm.quant.save does not write."""
    def bad(what: str) -> ValueError:
        return ValueError(f"effllm.quant.load: {path} is not a valid effllm checkpoint: {what}")

    try:
        described = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"metadata '{_META_KEY}' is not JSON ({exc})") from None
    if not isinstance(described, dict) or not described:
        raise bad(f"metadata '{_META_KEY}' must be a non-empty JSON object of modules, got {text[:80]!r}")
    for name, info in described.items():
        if not isinstance(info, dict):
            raise bad(f"module {name!r}: expected an object, got {info!r}")
        for field, kind in (("config", dict), ("in_features", int), ("out_features", int), ("bias", bool),
                            ("dtype", str)):
            value = info.get(field)
            if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
                raise bad(f"module {name!r}: bad field {field!r}: {value!r}")
        if not isinstance(getattr(torch, info["dtype"], None), torch.dtype):
            raise bad(f"module {name!r}: bad field 'dtype': {info['dtype']!r} is not a torch dtype")
        try:
            config_from_dict(info["config"])
        except (TypeError, ValueError, KeyError) as exc:
            raise bad(f"module {name!r}: bad field 'config': {exc}") from None
    return described


def _shell(model: nn.Module, name: str, info: dict, path: str) -> QuantLinear:
    """An empty quantized module for ``name``, after checking the model's module fits the file."""
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"effllm.quant.load: the file quantizes module {name!r}, which this model does not have")
    config = config_from_dict(info["config"])
    in_f, out_f = info["in_features"], info["out_features"]
    if isinstance(current, QuantLinear):
        if current.config != config:
            raise ValueError(f"effllm.quant.load: {name} is already quantized with {current.config}, the file has {config}")
    elif not isinstance(current, nn.Linear):
        raise ValueError(f"effllm.quant.load: {name} is a {type(current).__name__}, expected nn.Linear")
    if (current.in_features, current.out_features) != (in_f, out_f):
        raise ValueError(f"effllm.quant.load: {name} is {current.in_features} -> {current.out_features} in the model "
                         f"but {in_f} -> {out_f} in the file")
    cls = handler_for(config)
    return cls(in_f, out_f, info["bias"], config=config, dtype=getattr(torch, info["dtype"]), device="meta")


def _check_tensors(model, shells, shapes, path, strict) -> None:
    """Every tensor of the model as it will be (the quantized shells in place of their modules)
    must be in the file with the same shape and dtype; tensors tied to one in the file may be
    absent (safetensors stores them once); with ``strict``, the file holds nothing else."""
    expected = {f"{name}.{key}": tensor for name, shell in shells.items() for key, tensor in shell.state_dict().items()}
    exact_dtype = set(expected)  # the packed formats' tensors load as stored; other tensors are cast
    tied: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if any(key.startswith(name + ".") for name in shells):
            continue
        expected[key] = tensor
        tied.setdefault(tensor.data_ptr(), []).append(key)
    problems = []
    for key, tensor in expected.items():
        if key not in shapes:
            # A quantized module's tensors are always needed: its shell starts empty.
            twins = tied.get(tensor.data_ptr(), []) if key not in exact_dtype else []
            if key in exact_dtype or (strict and not any(twin in shapes for twin in twins)):
                problems.append(f"{key}: missing from the file")
            continue
        shape, dtype = shapes[key]
        want = _safetensors_dtype(tensor.dtype)
        if shape != tuple(tensor.shape) or (key in exact_dtype and dtype != want):
            problems.append(f"{key}: file has {dtype} {shape}, expected {want} {tuple(tensor.shape)}")
    if strict:
        problems += [f"{key}: in the file but not in the model" for key in shapes if key not in expected]
    if problems:
        raise ValueError(f"effllm.quant.load: {path} does not match this model (nothing was changed):\n  "
                         + "\n  ".join(problems))


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
                       torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.float8_e4m3fn: "F8_E4M3"}


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return _SAFETENSORS_DTYPES.get(dtype, str(dtype))
