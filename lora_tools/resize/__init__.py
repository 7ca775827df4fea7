"""`resize`: exact rank reduction of an adapter from its factors. operation.py reads,
checks, writes and reports; layers.py truncates layer by layer; options.py lists the
choices (light: the CLI imports it early)."""

from __future__ import annotations

from typing import Any

__all__ = ["LayerResizeReport", "ResizeReport", "resize"]


def __getattr__(name: str) -> Any:
    """The operation, imported on first use: `lora_tools.resize.options` stays light."""
    if name not in __all__:
        raise AttributeError(f"module 'lora_tools.resize' has no attribute {name!r}")
    from lora_tools.resize import operation

    return getattr(operation, name)
