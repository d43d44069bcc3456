"""The quantized drop-in replacements for ``nn.Linear``, under one import path.

Each format lives in its own file with its config (``int4.py``, ``int8.py``, ``fp8.py``; the
shared base in ``base.py``); their docstrings say which kernel runs on which device.
"""

from .base import QuantLinear
from .fp8 import Fp8Linear, fp8_scaled_mm
from .int4 import Int4Linear
from .int8 import Int8Linear

__all__ = ["Fp8Linear", "Int4Linear", "Int8Linear", "QuantLinear", "fp8_scaled_mm"]
