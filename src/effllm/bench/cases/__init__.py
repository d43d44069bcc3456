"""Benchmark cases shipped with effllm; importing this package registers them."""

from . import attention, decode, norm, quant  # noqa: F401
