"""adapter_config.json: parsed, and held to what PEFT itself would load.

`read_config` checks each field on its own; `check_layers` checks the config against the
tensors it describes once they are read. What PEFT 0.21 does with each lie, and what
lora-tools does (docs/formats.md, "Config lies"):

- r / rank_pattern that disagree with the factors' rank: PEFT builds lora_A with the
  configured rank and fails on the state dict (size mismatch); refused.
- rank_pattern values ≤ 0 or fractional: PEFT raises ("`r` should be a positive integer");
  refused.
- alpha_pattern values ≤ 0: PEFT loads them (a zero or sign-flipped update); refused like
  lora_alpha ≤ 0 (a negated adapter is asked for with --weight -1, not hidden in a config).
- use_dora without lora_magnitude_vector tensors: PEFT loads it, warns of missing keys,
  and takes the magnitudes from the base weights' norms, which is no plain LoRA update;
  refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_tools.adapter import LoraLayer
from lora_tools.errors import FormatError
from lora_tools.formats.common import finite_number
from lora_tools.formats.patterns import PatternTable, UnsafePattern

__all__ = ["SUPPORTED_PEFT_TYPES", "check_layers", "pattern_table", "read_config"]

SUPPORTED_PEFT_TYPES = {"LORA", "LOHA", "LOKR"}  # LoHa/LoKr: formats.lycoris


def read_config(path: Path) -> dict[str, Any]:
    """Parse and check the parts of adapter_config.json that change the math."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(path, f"cannot read: {exc}") from None
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, 5000-digit ints, deep nesting
        raise FormatError(path, f"invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise FormatError(path, "adapter config is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() not in SUPPORTED_PEFT_TYPES:
        raise FormatError(path, f"peft_type {peft_type!r} is not supported (LoRA, LoHa and LoKr adapters are)")
    config["peft_type"] = peft_type.upper()
    for field_name in ("r", "lora_alpha" if config["peft_type"] == "LORA" else "alpha"):
        if field_name not in config:
            raise FormatError(path, f"missing {field_name!r}")
        value = config[field_name]
        number = finite_number(value)
        if number is None or number <= 0:
            raise FormatError(path, f"{field_name!r} must be a positive number, got {value!r}")
    for field_name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field_name) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and finite_number(v) is not None for k, v in pattern.items()
        ):
            raise FormatError(path, f"{field_name!r} must map module patterns to numbers")
        config[field_name] = pattern
    _check_pattern_values(path, config)
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if not isinstance(config.get(flag) or False, bool):
            raise FormatError(path, f"{flag!r} must be true or false, got {config[flag]!r}")
    if not isinstance(config.get("bias") or "none", str):
        raise FormatError(path, f"'bias' must be \"none\", \"all\" or \"lora_only\", got {config['bias']!r}")
    if "bias" in config:  # [] or {} read as "none", and must not reach a set lookup unhashable
        config["bias"] = config["bias"] or "none"
    for field_name in ("modules_to_save", "target_modules"):  # a name (or regex), a list of names, or absent
        names = config.get(field_name) or []
        if not isinstance(names, str) and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise FormatError(path, f"{field_name!r} must be a module name or a list of them, got {names!r}")
    modules_to_save = config.get("modules_to_save") or []
    config["modules_to_save"] = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    for field_name in ("rank_pattern", "alpha_pattern"):  # refuse unbounded regexes before any runs
        pattern_table(path, config, field_name)
    return config


def _check_pattern_values(path: Path, config: dict[str, Any]) -> None:
    """A rank is a positive whole number (PEFT raises on anything else); a pattern alpha
    is positive, as lora_alpha is."""
    for key, value in config["rank_pattern"].items():
        if value <= 0 or not float(value).is_integer():
            raise FormatError(
                path, f"'rank_pattern' gives {key!r} rank {value!r}: a rank must be a positive whole number "
                "(PEFT refuses it too)"
            )
    for key, value in config["alpha_pattern"].items():
        if value <= 0:
            raise FormatError(
                path, f"'alpha_pattern' gives {key!r} alpha {value!r}: it must be a positive number, as 'lora_alpha' "
                "must (to negate an adapter, use --weight -1)"
            )


def pattern_table(path: Path, config: dict[str, Any], field_name: str) -> PatternTable:
    """The field's keys as a `PatternTable`; an unbounded key is an error naming `path`."""
    try:
        return PatternTable(field_name, config.get(field_name) or {})
    except UnsafePattern as exc:
        raise FormatError(path, str(exc)) from None


def check_layers(path: Path, config: dict[str, Any], layers: Sequence[LoraLayer]) -> None:
    """The config against the factors it describes: each layer's rank is the one PEFT
    would build (r, or the first matching rank_pattern key), and use_dora has a magnitude
    vector for every layer. `config` is one `read_config` returned; `path` is its file."""
    if config.get("r") is None:  # a bare file without adapter_config.json: nothing to hold it to
        return
    ranks = pattern_table(path, config, "rank_pattern")
    use_dora = bool(config.get("use_dora"))
    for layer in layers:
        try:
            expected = ranks.value(layer.name, config["r"])
        except UnsafePattern as exc:
            raise FormatError(path, str(exc)) from None
        if layer.rank != expected:
            where = "rank_pattern" if expected != config["r"] else "r"
            raise FormatError(
                path, f"module {layer.name!r}: factors have rank {layer.rank} but the config says {where} = "
                f"{expected:g} (PEFT would fail to load them: size mismatch)"
            )
        if use_dora and layer.magnitude is None:
            raise FormatError(
                path, f"module {layer.name!r}: 'use_dora' is true but the adapter has no lora_magnitude_vector for "
                "it (PEFT would take the magnitude from the base weight: not a plain LoRA update)"
            )
