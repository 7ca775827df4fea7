"""lora-tools: inspect, merge, blend and verify LoRA adapters.

The public API is re-exported lazily so that `import lora_tools` (and the CLI's
`--help`) stays fast: numpy is imported only when a function is first used.
The operations are modules named after their verb, each holding the function of the
same name (`lora_tools.merge.merge`, `lora_tools.blend.blend`, `lora_tools.verify.verify`):
a package attribute cannot be both, and a submodule wins once it has been imported.
"""

from __future__ import annotations

from typing import Any

from lora_tools.errors import FormatError, LoraToolsError, MismatchError, RequestError

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "BlendReport",
    "FormatError",
    "InspectReport",
    "LoraLayer",
    "LoraToolsError",
    "MergeResult",
    "MismatchError",
    "RequestError",
    "VerifyReport",
    "blend",
    "inspect_adapter",
    "load_adapter",
    "merge",
    "verify",
]

_LAZY = {
    "Adapter": "lora_tools.adapter",
    "LoraLayer": "lora_tools.adapter",
    "InspectReport": "lora_tools.inspect",
    "inspect_adapter": "lora_tools.inspect",
    "load_adapter": "lora_tools.formats",
    "MergeResult": "lora_tools.merge",
    "BlendReport": "lora_tools.blend.operation",
    "VerifyReport": "lora_tools.verify.operation",
}
_OPERATIONS = ("merge", "blend", "verify")  # modules, see above


def __getattr__(name: str) -> Any:
    import importlib

    if name in _OPERATIONS:
        return importlib.import_module(f"lora_tools.{name}")
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lora_tools' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
