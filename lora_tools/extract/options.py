"""The choices `extract` offers, importable without numpy so that the CLI can list them."""

from __future__ import annotations

from lora_tools.io.dtypes import DTYPE_ALIASES

METHODS = ("auto", "exact", "randomized")
FORMATS = ("peft", "kohya")
DTYPES = {name: DTYPE_ALIASES[name] for name in ("fp32", "fp16", "bf16", "fp64")}
# changed tensors written whole by default: embeddings and output heads (PEFT modules_to_save)
DEFAULT_FULL_MODULES = r"(^|\.)(embed_tokens|lm_head|wte|wpe|embed_out|embed_in)$"
# `auto`: a full SVD up to this many singular values (min(m, n)), a randomized one above
EXACT_UP_TO = 1024
