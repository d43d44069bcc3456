"""Weight quantization: INT4 / INT8 weight-only and FP8 linears, ``quantize_(model, config)``,
safetensors save/load, AWQ/GPTQ layout converters.

One file per format holds its config and module (``int4.py``, ``int8.py``, ``fp8.py``),
registered in ``registry.py``; the portable formats are documented in ``formats.py``.
"""

from .api import QuantReport, quantize_
from .config import Fp8, Int4WeightOnly, Int8WeightOnly, ModuleConfigs
from .linear import Fp8Linear, Int4Linear, Int8Linear, QuantLinear
from .registry import QuantConfig, register
from .serialization import load, save

__all__ = [
    "Fp8",
    "Fp8Linear",
    "Int4Linear",
    "Int4WeightOnly",
    "Int8Linear",
    "Int8WeightOnly",
    "ModuleConfigs",
    "QuantConfig",
    "QuantLinear",
    "QuantReport",
    "load",
    "quantize_",
    "register",
    "save",
]
