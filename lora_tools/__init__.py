"""lora-tools: inspect, merge, blend and verify LoRA adapters.

The public API is re-exported lazily so that `import lora_tools` (and the CLI's
`--help`) stays fast: numpy is imported only when a function is first used.
"""

from __future__ import annotations

from typing import Any

from lora_tools.errors import FormatError, LoraToolsError, MismatchError, UsageError

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "FormatError",
    "LoraLayer",
    "LoraToolsError",
    "MismatchError",
    "UsageError",
    "inspect_adapter",
    "load_adapter",
]

_LAZY = {
    "Adapter": "lora_tools.adapter",
    "LoraLayer": "lora_tools.adapter",
    "inspect_adapter": "lora_tools.inspect",
    "load_adapter": "lora_tools.formats",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lora_tools' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
