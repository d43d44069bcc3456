"""Where things live inside a Hugging Face model: declarative specs per ``model_type`` plus a
structural fallback, so a new architecture works without a per-model patch function.

A spec only names things (attribute names and class-name patterns); ``find_layout`` walks the
model once and returns module paths, which patch features then act on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture names its parts. Defaults are the Llama family's names."""

    model_type: str
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    norm_class_pattern: str = r"RMSNorm$"
    mlp_projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    experts_attribute: str | None = None
    notes: str = ""


# Architectures checked against transformers' modeling code. Anything else goes through the
# structural fallback and is reported as such.
SPECS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama"),
        ArchSpec("mistral"),
        ArchSpec("qwen2"),
        ArchSpec("qwen3"),
        ArchSpec("gemma", norm_class_pattern=r"GemmaRMSNorm$"),
        ArchSpec("phi3", attention_projections=("qkv_proj", "o_proj"), mlp_projections=("gate_up_proj", "down_proj")),
        ArchSpec("mixtral", mlp_projections=(), experts_attribute="experts"),
        ArchSpec("qwen2_moe", experts_attribute="experts"),
        ArchSpec("qwen3_moe", experts_attribute="experts"),
        ArchSpec("olmoe", experts_attribute="experts"),
    )
}


@dataclass
class ModelLayout:
    """Module paths found in one model instance."""

    model_type: str
    source: str  # "spec" or "structural"
    attention: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    mlps: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    linears: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.model_type} ({self.source}): {len(self.attention)} attention, {len(self.norms)} norms, "
            f"{len(self.mlps)} MLPs, {len(self.experts)} expert blocks, {len(self.linears)} linears"
        )


def _has_all(module: nn.Module, names: tuple[str, ...]) -> bool:
    return bool(names) and all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def structural_spec(model_type: str) -> ArchSpec:
    return ArchSpec(model_type, notes="structural fallback: q/k/v/o, *RMSNorm, gate/up/down and experts by name")


def find_layout(model: nn.Module) -> ModelLayout:
    """Walk ``model`` once and collect the paths of its attention, norm, MLP, expert and linear modules."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    spec = SPECS.get(model_type)
    layout = ModelLayout(model_type=model_type, source="spec" if spec else "structural")
    spec = spec or structural_spec(model_type)
    norm_re = re.compile(spec.norm_class_pattern)
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            layout.linears.append(path)
        elif _has_all(module, spec.attention_projections):
            layout.attention.append(path)
        elif norm_re.search(type(module).__name__):
            layout.norms.append(path)
        elif _has_all(module, spec.mlp_projections):
            layout.mlps.append(path)
        if spec.experts_attribute and isinstance(getattr(module, spec.experts_attribute, None), nn.Module):
            layout.experts.append(f"{path}.{spec.experts_attribute}" if path else spec.experts_attribute)
        elif not spec.experts_attribute and isinstance(getattr(module, "experts", None), nn.Module):
            layout.experts.append(f"{path}.experts" if path else "experts")
    return layout
