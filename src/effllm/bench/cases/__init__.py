"""Benchmark cases shipped with effllm; importing this package registers them."""

from . import attention, norm  # noqa: F401
