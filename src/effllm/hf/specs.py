"""Where the attention modules live inside a Hugging Face model: a declarative spec per
``model_type`` plus a structural fallback, so a new architecture works without a per-model
patch function.

A spec only names things (projection attribute names); ``find_layout`` walks the model once and
returns the attention modules' paths, which ``patch`` counts and reports. (Quantization, KV
compression and MoE offload find their own modules: linears, attention configs, experts.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture names its attention projections. Defaults are the Llama family's."""

    model_type: str
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
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
        ArchSpec("gemma"),
        ArchSpec("phi3", attention_projections=("qkv_proj", "o_proj")),
        ArchSpec("mixtral"),
        ArchSpec("qwen2_moe"),
        ArchSpec("qwen3_moe"),
        ArchSpec("olmoe"),
    )
}


@dataclass
class ModelLayout:
    """The attention modules found in one model instance, and how they were found."""

    model_type: str
    source: str  # "spec" or "structural"
    attention: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.model_type} ({self.source}): {len(self.attention)} attention modules"


def _has_all(module: nn.Module, names: tuple[str, ...]) -> bool:
    return bool(names) and all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def structural_spec(model_type: str) -> ArchSpec:
    return ArchSpec(model_type, notes="structural fallback: attention modules by their q/k/v/o projections")


def find_layout(model: nn.Module) -> ModelLayout:
    """Walk ``model`` once and collect the paths of its attention modules."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    spec = SPECS.get(model_type)
    layout = ModelLayout(model_type=model_type, source="spec" if spec else "structural")
    spec = spec or structural_spec(model_type)
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) and _has_all(module, spec.attention_projections):
            layout.attention.append(path)
    return layout
