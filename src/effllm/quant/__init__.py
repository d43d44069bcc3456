"""Weight quantization: INT4 / INT8 weight-only and FP8 linears, ``quantize_(model, config)``,
safetensors save/load, AWQ/GPTQ layout converters.

The formats are documented in ``formats.py``; compute paths per device in ``linear.py``.
"""

from .api import QuantReport, quantize_
from .config import Fp8, Int4WeightOnly, Int8WeightOnly, ModuleConfigs
from .linear import Fp8Linear, Int4Linear, Int8Linear, QuantLinear
from .serialization import load, save

__all__ = [
    "quantize_", "QuantReport", "Int4WeightOnly", "Int8WeightOnly", "Fp8", "ModuleConfigs",
    "QuantLinear", "Int4Linear", "Int8Linear", "Fp8Linear", "save", "load",
]
