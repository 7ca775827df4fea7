"""`blend`: combine adapters that share a base (operation.py), by factored math (factored.py)
or on dense updates (dense.py), from inputs checked by inputs.py."""

from lora_tools.blend.operation import BlendReport, blend, blend_adapters

__all__ = ["BlendReport", "blend", "blend_adapters"]
