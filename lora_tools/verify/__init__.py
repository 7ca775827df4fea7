"""`verify`: prove that a merged checkpoint equals base + Σ wᵢ·ΔWᵢ (operation.py), tensor by
tensor (tensor_check.py) or, for plain LoRA layers, in row blocks (blocks.py, block_math.py)."""

from lora_tools.verify.operation import VerifyReport, verify

__all__ = ["VerifyReport", "verify"]
