"""Load an earlier version of an effllm module (``git show REV:path > file``) next to the current one,
for the A/B scripts."""

from __future__ import annotations

import importlib.util
import sys


def load_baseline_module(path: str, name: str):
    """``path`` loaded as the module ``name``: a sibling of the current module (e.g.
    ``effllm.kernels._decode_baseline``), so that its relative imports resolve."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
