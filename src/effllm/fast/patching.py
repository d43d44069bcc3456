"""``patch(model, decode=...)``: validation (before anything changes) and application.

What composes with ``decode``:

- ``attention``: yes. Prefill already runs effllm's attention; direct ``model(...)`` calls
  use it as usual. Decode steps attend over the static cache inside the fast step.
- ``quant``: yes for ``Int8WeightOnly`` and ``Int4WeightOnly`` (not ``act_aware``): the fast
  path multiplies with torch's packed CPU ops on the quantized modules' weights. ``Fp8`` is
  refused (on CPU it is a storage format only).
- ``kv`` (eviction policies, KIVI), ``moe``, ``parallel``: refused. The fast path keeps its own
  static cache and reads the model's weights directly.
"""

from __future__ import annotations

import functools

from torch import nn

from .config import FastDecode


def check_decode(model: nn.Module, decode, *, quant_plan=None, kv=None, moe=None, parallel=None) -> FastDecode:
    """Return the ``FastDecode`` to apply, or raise naming what does not work. Changes nothing."""
    from .decoder import UnsupportedModel, check_model

    if decode is True:
        decode = FastDecode()
    if not isinstance(decode, FastDecode):
        raise TypeError(f"effllm.patch(decode=...): expected True or effllm.fast.FastDecode(...), got {decode!r}")
    for name, value in (("kv", kv), ("moe", moe), ("parallel", parallel)):
        if value is not None:
            raise ValueError(f"effllm.patch: decode=... does not compose with {name}=... (the fast path keeps its own "
                             f"static KV cache and reads the model's weights directly); patch without one of them")
    device = next(iter(model.parameters()), None)
    if device is not None and device.device.type != "cpu":
        raise NotImplementedError(f"effllm.patch(decode=...): not yet on {device.device.type} (the fast decode path "
                                  "and its packed-weight ops are CPU-only for now; CUDA graphs are planned)")
    try:
        check_model(model) if quant_plan is None else _check_planned(model, quant_plan)
    except UnsupportedModel as exc:
        raise ValueError(f"effllm.patch(decode=...): {exc}") from None
    return decode


def _check_planned(model: nn.Module, quant_plan) -> None:
    """``check_model`` for the model as it will be once ``quant_plan`` is applied."""
    from ..quant.config import Int4WeightOnly, Int8WeightOnly
    from .decoder import UnsupportedModel, check_model

    check_model(model, skip_linears=True)  # first: the walk below assumes the supported layout
    plan, _report = quant_plan
    for name, cfg in plan.items():
        if not isinstance(cfg, (Int4WeightOnly, Int8WeightOnly)) or getattr(cfg, "act_aware", False):
            raise UnsupportedModel(f"quant config {cfg!r} for {name}: the fast path takes Int8WeightOnly and "
                                   "Int4WeightOnly (without act_aware)")
    groups = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]
    for i, _ in enumerate(model.model.layers):
        for group in groups:
            prefix = f"model.layers.{i}.{'self_attn' if group[0] == 'q_proj' else 'mlp'}."
            configs = {plan.get(prefix + n) for n in group}
            if len(configs) > 1:
                raise UnsupportedModel(f"{prefix}{'/'.join(group)} get different quant configs {configs}; the fast "
                                       "path merges them into one matmul, so they need one format")


def apply_decode(model: nn.Module, config: FastDecode):
    """Build the fast path and install its ``generate``; return ``(runner, undo)``."""
    from .compiled import FastRunner
    from .decoder import FastDecoder
    from .generate import FastGenerate

    decoder = FastDecoder(model, weights=config.weights, lm_head=config.lm_head)
    runner = FastRunner(decoder, config)
    had_own = "generate" in vars(model)
    previous = vars(model).get("generate")
    model.generate = FastGenerate(model, runner, model.generate)
    return runner, functools.partial(_restore_generate, model, had_own, previous)


def _restore_generate(model: nn.Module, had_own: bool, previous) -> None:
    if had_own:
        model.generate = previous
    else:
        vars(model).pop("generate", None)
