"""`verify`: prove that a merged checkpoint equals base + Σ wᵢ·ΔWᵢ (operation.py), tensor by
tensor (tensor_check.py) or, for plain LoRA layers, in row blocks (blocks.py, block_math.py, replay.py)."""

from __future__ import annotations

from typing import Any

__all__ = ["VerifyReport", "verify"]


def __getattr__(name: str) -> Any:
    """The operation, imported on first use: `lora_tools.verify.options` and friends stay light."""
    if name not in __all__:
        raise AttributeError(f"module 'lora_tools.verify' has no attribute {name!r}")
    from lora_tools.verify import operation

    return getattr(operation, name)
