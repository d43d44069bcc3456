"""Benchmark cases shipped with effllm; importing this package registers them."""

from . import attention, decode, norm  # noqa: F401
