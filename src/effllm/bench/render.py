"""``effllm bench render``: the README's and docs' result tables, generated from records (not yet)."""

from __future__ import annotations


def render_all(*, root=None, check: bool = False) -> int:
    raise NotImplementedError("effllm bench render: not yet (the renderer lands with the README results)")
