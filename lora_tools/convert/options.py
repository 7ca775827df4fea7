"""The choices `convert` offers, importable without numpy so that the CLI can list them."""

from __future__ import annotations

from lora_tools.io.dtypes import DTYPE_ALIASES, FACTOR_DTYPE_CHOICES

TARGETS = ("peft", "kohya", "diffusers", "gguf")
# --dtype of the written factors -> safetensors code (None: as the input stores them)
DTYPES: dict[str, str | None] = {name: None if name == "keep" else DTYPE_ALIASES[name] for name in FACTOR_DTYPE_CHOICES}
