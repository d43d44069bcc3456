"""Hugging Face integration: ``patch(model, ...)`` and the architecture specs it relies on.

Nothing here imports transformers at import time.
"""

from .patch import PatchHandle, PatchRecord, patch, patched
from .specs import SPECS, ArchSpec, ModelLayout, find_layout

__all__ = ["patch", "patched", "PatchHandle", "PatchRecord", "SPECS", "ArchSpec", "ModelLayout", "find_layout"]
