"""`blend`: combine adapters that share a base. operation.py reads, writes and reports;
layers.py blends layer by layer, by factored math (factored.py) or on dense updates
(dense.py), from inputs checked by inputs.py; options.py lists the choices."""

from __future__ import annotations

from typing import Any

__all__ = ["BlendReport", "blend", "blend_adapters"]


def __getattr__(name: str) -> Any:
    """The operation, imported on first use: `lora_tools.blend.options` and friends stay light."""
    if name not in __all__:
        raise AttributeError(f"module 'lora_tools.blend' has no attribute {name!r}")
    from lora_tools.blend import operation

    return getattr(operation, name)
