"""Run a model over calibration batches and hand every input row of chosen linears to a callback."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def feed_inputs(model: nn.Module, modules: dict[str, nn.Linear], batches: Iterable,
                record: Callable[[str, torch.Tensor], None]) -> None:
    """Call ``record(name, x (rows, K) float32)`` for each input of each module while ``model``
    runs on ``batches`` (tensors, or dicts of keyword arguments). Raises ``ValueError`` when no
    batch was given or a module never ran."""
    rows = dict.fromkeys(modules, 0)

    def hook(name):
        def on_input(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            rows[name] += x.shape[0]
            record(name, x)
        return on_input

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in modules.items()]
    try:
        any_batch = False
        for batch in batches:
            any_batch = True
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in handles:
            h.remove()
    if not any_batch:
        raise ValueError("calibration: no batches were given")
    for name, count in rows.items():
        if count == 0:
            raise ValueError(f"calibration: module {name!r} was never called by the calibration batches")
