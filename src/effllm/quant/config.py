"""Quantization configs: small frozen dataclasses, versioned, serialisable to JSON metadata.

``quantize_`` looks a handler up by the config's type (``HANDLERS``), as torchao does; a config
only describes *what* to do, never holds tensors.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .formats import FP8_WEIGHT_GRANULARITIES, INT4_GROUP_SIZES


@dataclass(frozen=True)
class Int4WeightOnly:
    """W4A16: 4-bit weights in groups of ``group_size`` input channels, activations unchanged.

    ``act_aware=True`` runs an activation-aware search (AWQ-style per-input-channel scales and
    per-group clipping) on calibration batches passed to ``quantize_(..., calibration=...)``.
    ``integer_zeros`` (default) rounds asymmetric zero points to integers, as AWQ/GPTQ
    checkpoints store them: 0 stays exactly representable, which suits bell-shaped weights, and
    export to those layouts is exact. ``False`` maps each group's [min, max] exactly; with
    ``act_aware`` it did better on SmolLM2 (see docs/quantization.md).
    ``gptq=True`` rounds with error compensation (``effllm.quant.gptq``) on the round-to-nearest
    group scales (after the activation-aware search when both are set); it needs calibration too.
    """

    group_size: int = 128
    symmetric: bool = False
    act_aware: bool = False
    integer_zeros: bool = True
    gptq: bool = False
    version: int = 1

    def __post_init__(self):
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"Int4WeightOnly: group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")


@dataclass(frozen=True)
class Int8WeightOnly:
    """W8A16: symmetric 8-bit weights, one scale per output channel."""

    version: int = 1


@dataclass(frozen=True)
class Fp8:
    """FP8 e4m3 weights (scale per tensor, output row or 128x128 block) and, unless
    ``activations=None``, dynamically quantized activations (per token or per 1x128 block).

    ``gptq=True`` rounds the weights with error compensation (``effllm.quant.gptq``) on the
    same scales, from the input statistics of calibration batches (``quantize_(...,
    calibration=...)``); the stored format does not change."""

    weights: str = "row"
    activations: str | None = "token"
    gptq: bool = False
    version: int = 1

    def __post_init__(self):
        if self.weights not in FP8_WEIGHT_GRANULARITIES:
            raise ValueError(f"Fp8: weights must be one of {FP8_WEIGHT_GRANULARITIES}, got {self.weights!r}")
        if self.activations not in ("token", "block", None):
            raise ValueError(f"Fp8: activations must be 'token', 'block' or None, got {self.activations!r}")


QuantConfig = Int4WeightOnly | Int8WeightOnly | Fp8
CONFIG_TYPES = {cls.__name__: cls for cls in (Int4WeightOnly, Int8WeightOnly, Fp8)}


@dataclass
class ModuleConfigs:
    """Per-module configs: keys are exact module names, ``"re:<pattern>"`` (full match) or
    ``"default"``; a value of ``None`` leaves the module unquantized.

    ``ModuleConfigs({"re:.*lm_head": None, "default": Int4WeightOnly()})``
    """

    configs: dict[str, QuantConfig | None] = field(default_factory=dict)

    def __post_init__(self):
        for key, cfg in self.configs.items():
            if cfg is not None and not isinstance(cfg, tuple(CONFIG_TYPES.values())):
                raise ValueError(f"ModuleConfigs[{key!r}] must be a quantization config or None, got {cfg!r}")
            if key.startswith("re:"):
                re.compile(key[3:])

    def lookup(self, name: str) -> QuantConfig | None:
        if name in self.configs:
            return self.configs[name]
        for key, cfg in self.configs.items():
            if key.startswith("re:") and re.fullmatch(key[3:], name):
                return cfg
        return self.configs.get("default")


def config_to_dict(config: QuantConfig) -> dict:
    return {"type": type(config).__name__, **dataclasses.asdict(config)}


def config_from_dict(data: dict) -> QuantConfig:
    data = dict(data)
    kind = data.pop("type", None)
    if kind not in CONFIG_TYPES:
        raise ValueError(f"unknown quantization config type {kind!r}; known: {sorted(CONFIG_TYPES)}")
    return CONFIG_TYPES[kind](**data)
