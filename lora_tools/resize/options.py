"""The choices `resize` offers, importable without numpy so that the CLI can list them."""

from __future__ import annotations

from lora_tools.io.dtypes import DTYPE_ALIASES, FACTOR_DTYPE_CHOICES

FORMATS = ("auto", "peft", "kohya", "diffusers")
# --dtype of the written factors -> safetensors code (None: as the input stores them)
DTYPES: dict[str, str | None] = {name: None if name == "keep" else DTYPE_ALIASES[name] for name in FACTOR_DTYPE_CHOICES}
# the per-layer policies (at most one) and the global one, as the options name them
POLICIES = ("energy", "sv_ratio", "sv_fro", "sv_cumulative", "budget")
