"""The choices `blend` offers, importable without numpy so that the CLI can list them."""

from __future__ import annotations

from lora_tools.io.dtypes import DTYPE_ALIASES, FACTOR_DTYPE_CHOICES

METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")
DENSE_METHODS = ("ties", "dare_linear", "dare_ties")
FORMATS = ("auto", "peft", "kohya")
# --dtype of the written factors -> safetensors code (None: as the inputs store them)
DTYPES: dict[str, str | None] = {name: None if name == "keep" else DTYPE_ALIASES[name] for name in FACTOR_DTYPE_CHOICES}
