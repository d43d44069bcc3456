"""``quantize_(model, config)``: replace ``nn.Linear`` modules by quantized ones, in place.

Everything is checked before the model changes (shapes, calibration); new modules are all built
before any is swapped in, so an error leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import awq, gptq
from .base import QuantLinear
from .config import ModuleConfigs
from .registry import QuantConfig, config_types, handler_for


@dataclass
class QuantReport:
    """What ``quantize_`` did: module name -> config, and module name -> why it was skipped."""

    quantized: dict[str, QuantConfig] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"quantized {len(self.quantized)} linear modules, skipped {len(self.skipped)}"]
        lines += [f"  {name}: {cfg}" for name, cfg in self.quantized.items()]
        lines += [f"  {name}: skipped ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


def quantize_(
    model: nn.Module,
    config: QuantConfig | ModuleConfigs,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    calibration: Iterable | None = None,
) -> QuantReport:
    """Quantize ``model``'s linear layers in place and return a report.

    - ``config``: one config for every linear, or ``ModuleConfigs`` (per name / regex / default).
    - ``filter_fn(module, name)``: only modules for which it returns True are considered.
    - ``calibration``: batches (tensors or keyword dicts) to run the model on, needed by
      ``Int4WeightOnly(act_aware=True)`` and ``Fp8(gptq=True)``.

    Linears whose weight is shared with another module (tied embeddings) are skipped: replacing
    them unties the weights (the other module keeps the float tensor). Naming such a module
    explicitly in ``ModuleConfigs`` quantizes it anyway (worth it for a large ``lm_head``, which
    is read every decode step while the embedding is only indexed). Already-quantized modules
    are skipped.
    """
    plan, report = plan_quantization(model, config, filter_fn, calibrated=calibration is not None)
    new_modules = build_quantized(model, plan, calibration)
    for name, module in new_modules.items():
        replace_module(model, name, module)
        report.quantized[name] = plan[name]
    return report


def plan_quantization(model, config, filter_fn=None, *, calibrated: bool = False
                      ) -> tuple[dict[str, QuantConfig], QuantReport]:
    """Which linears get which config; raises ``ValueError`` (changing nothing) when one cannot."""
    plan, report = _plan(model, config, filter_fn)
    errors = [f"{name}: {err}" for name, cfg in plan.items()
              if (err := handler_for(cfg).shape_error(model.get_submodule(name), cfg))]
    if errors:
        raise ValueError("quantize_: these modules cannot take their config (nothing was changed):\n  "
                         + "\n  ".join(errors))
    needs = sorted({type(cfg).__name__ for cfg in plan.values() if handler_for(cfg).calibration_needs(cfg)})
    if not calibrated and needs:
        raise ValueError(f"quantize_: {', '.join(needs)} with act_aware=True or gptq=True needs "
                         f"calibration=<batches> (nothing was changed)")
    return plan, report


def build_quantized(model, plan: dict[str, QuantConfig], calibration=None) -> dict[str, QuantLinear]:
    """Quantized replacements for the planned modules, built without touching the model."""
    needs = {name: handler_for(cfg).calibration_needs(cfg) for name, cfg in plan.items()}
    aware = {name: model.get_submodule(name) for name in plan if "act_aware" in needs[name]}
    compensated = {name: model.get_submodule(name) for name in plan if "gptq" in needs[name]}
    if aware and compensated:
        calibration = list(calibration)  # read twice
    stats = awq.collect_inputs(model, aware, calibration) if aware else {}
    hessians = gptq.accumulate_hessians(model, compensated, calibration) if compensated else {}
    new_modules = {}
    with torch.no_grad():
        for name, cfg in plan.items():
            linear = model.get_submodule(name)
            extra = {}
            if name in stats:
                scales = awq.search_scales(linear.weight, stats[name], cfg)
                clip = awq.search_clip(linear.weight, stats[name], scales, cfg)
                device = linear.weight.device
                extra.update(channel_scale=scales.to(device), clip=clip.to(device))
            if name in hessians:
                extra["hessian"] = hessians.pop(name)
            new_modules[name] = handler_for(cfg).from_linear(linear, cfg, **extra)
    return new_modules


def _plan(model, config, filter_fn) -> tuple[dict[str, QuantConfig], QuantReport]:
    if not isinstance(config, ModuleConfigs) and type(config) not in config_types().values():
        raise ValueError(f"quantize_: config must be one of {', '.join(config_types())} or ModuleConfigs, "
                         f"got {config!r}")
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    report, plan = QuantReport(), {}
    for name, module in model.named_modules():
        # Say why a linear-like module is left alone: silence read as "quantized".
        if isinstance(module, QuantLinear):
            report.skipped[name] = f"already quantized ({type(module).__name__})"
            continue
        if not isinstance(module, nn.Linear):
            continue
        if type(module) is not nn.Linear:
            report.skipped[name] = (f"{type(module).__name__} subclasses nn.Linear with a forward effllm cannot "
                                    f"reproduce; only plain nn.Linear is quantized")
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        cfg = config.lookup(name) if isinstance(config, ModuleConfigs) else config
        if cfg is None:
            report.skipped[name] = "config is None"
            continue
        shared = [other for other in owners[id(module.weight)] if other != f"{name}.weight"]
        named_explicitly = isinstance(config, ModuleConfigs) and name in config.configs
        if shared and not named_explicitly:
            report.skipped[name] = f"weight tied to {shared[0]} (name it in ModuleConfigs to quantize an untied copy)"
            continue
        plan[name] = cfg
    return plan, report


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Swap the submodule at ``name`` for ``module``; return the one that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old
