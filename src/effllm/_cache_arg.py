"""The keyword a transformers model takes its KV cache by.

transformers 5.24 renamed the models' ``past_key_values`` argument to ``cache`` (the old name
still works, with a FutureWarning, until 5.40). effllm reads both names wherever it receives a
cache and passes the one the installed model declares, so no call of ours warns.
"""

from __future__ import annotations

import inspect

CACHE_ARG_NAMES = ("cache", "past_key_values")


def cache_argument_name(model) -> str:
    """``"cache"`` if ``model.forward`` declares it (transformers >= 5.24), else ``"past_key_values"``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def find_cache(kwargs: dict):
    """The cache passed in ``kwargs`` under either name, or None."""
    for name in CACHE_ARG_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None
