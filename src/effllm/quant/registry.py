"""The quantization config registry: each config type names the module that implements it.

A format lives in one file (``int4.py``, ``int8.py``, ``fp8.py``): its config (a subclass of
``QuantConfig``) and its ``QuantLinear`` subclass, registered with ``@register(Config)``.
``quantize_``, ``save``/``load`` and ``ModuleConfigs`` look formats up here, so a new format is
one new file plus its export in ``effllm.quant``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .base import QuantLinear


class QuantConfig:
    """Base class of every quantization config (small frozen dataclasses describing *what* to
    do, never holding tensors)."""

    __slots__ = ()


_HANDLERS: dict[type, type] = {}


def register(config_type: type):
    """Class decorator: ``module_cls`` implements ``config_type`` (a ``QuantConfig`` subclass)."""
    if not (isinstance(config_type, type) and issubclass(config_type, QuantConfig)):
        raise TypeError(f"register: expected a QuantConfig subclass, got {config_type!r}")

    def decorate(module_cls):
        if _HANDLERS.get(config_type, module_cls) is not module_cls:
            raise ValueError(f"register: {config_type.__name__} already maps to {_HANDLERS[config_type].__name__}")
        module_cls.config_type = config_type
        _HANDLERS[config_type] = module_cls
        return module_cls

    return decorate


def handler_for(config) -> type[QuantLinear]:
    """The ``QuantLinear`` subclass for ``config``; ``ValueError`` naming the known configs otherwise."""
    module_cls = _HANDLERS.get(type(config))
    if module_cls is None:
        raise ValueError(f"expected a quantization config ({', '.join(config_types())}), got {config!r}")
    return module_cls


def config_types() -> dict[str, type]:
    """Registered config types by class name (the name stored in checkpoints)."""
    return {cls.__name__: cls for cls in _HANDLERS}
