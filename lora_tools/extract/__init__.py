"""`extract`: a LoRA from a full fine-tune, tensor pair by tensor pair. operation.py reads
both checkpoints, decides what each tensor becomes, writes and reports; layers.py is the
per-matrix math (difference, truncated SVD, the rank a policy picks); options.py lists
the choices (light: the CLI imports it early)."""

from __future__ import annotations

from typing import Any

__all__ = ["ExtractReport", "LayerExtractReport", "extract"]


def __getattr__(name: str) -> Any:
    """The operation, imported on first use: `lora_tools.extract.options` stays light."""
    if name not in __all__:
        raise AttributeError(f"module 'lora_tools.extract' has no attribute {name!r}")
    from lora_tools.extract import operation

    return getattr(operation, name)
