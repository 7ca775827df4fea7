"""`convert`: an adapter written in another format with the same update, proven by reading
it back. naming.py maps layer names between formats; proof.py compares what was written
with what was asked; operation.py reads, writes and reports; options.py lists the choices
(light: the CLI imports it early)."""

from __future__ import annotations

from typing import Any

__all__ = ["ConvertReport", "LayerProof", "convert"]


def __getattr__(name: str) -> Any:
    """The operation, imported on first use: `lora_tools.convert.options` stays light."""
    if name not in __all__:
        raise AttributeError(f"module 'lora_tools.convert' has no attribute {name!r}")
    from lora_tools.convert import operation

    return getattr(operation, name)
