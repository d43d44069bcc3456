"""Quantization configs: small frozen dataclasses, versioned, serialisable to JSON metadata.

Each config is defined next to the module that implements it (``int4.py``, ``int8.py``,
``fp8.py``) and registered there (``registry.py``), as torchao does; ``quantize_`` looks the
module up by the config's type. This file holds what spans formats: ``ModuleConfigs`` (per-module
choice) and the JSON form stored in checkpoints.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .fp8 import Fp8
from .int4 import Int4WeightOnly
from .int8 import Int8WeightOnly
from .registry import QuantConfig, config_types

__all__ = [
    "Fp8",
    "Int4WeightOnly",
    "Int8WeightOnly",
    "ModuleConfigs",
    "QuantConfig",
    "config_from_dict",
    "config_to_dict",
]


@dataclass
class ModuleConfigs:
    """Per-module configs: keys are exact module names, ``"re:<pattern>"`` (full match) or
    ``"default"``; a value of ``None`` leaves the module unquantized.

    ``ModuleConfigs({"re:.*lm_head": None, "default": Int4WeightOnly()})``
    """

    configs: dict[str, QuantConfig | None] = field(default_factory=dict)

    def __post_init__(self):
        for key, cfg in self.configs.items():
            if cfg is not None and not isinstance(cfg, QuantConfig):
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
    known = config_types()
    if kind not in known:
        raise ValueError(f"unknown quantization config type {kind!r}; known: {sorted(known)}")
    return known[kind](**data)
