"""PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors` (or `.bin`).

Key facts (checked against peft 0.21 `tuners/lora` and `utils/save_and_load.py`):
- keys are `base_model.model.<module>.lora_A.weight` (r, in) / `lora_B.weight` (out, r),
  embeddings `lora_embedding_A` (r, num_embeddings) / `lora_embedding_B` (dim, r) with no
  `.weight`, DoRA `lora_magnitude_vector`, `lora_B.bias` under lora_bias; some tools
  leave the adapter name in (`lora_A.default.weight`) or drop `base_model.model.`;
- s = alpha/r, or alpha/√r with use_rslora; r and alpha per module come from the first
  rank_pattern/alpha_pattern key k with re.match(rf"(.*\\.)?({k})$", module path);
- modules_to_save copies are saved as plain `<module>.weight` / `.bias`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter
from lora_tools.errors import FormatError
from lora_tools.formats.common import (
    A, B, BIAS, EMB_A, EMB_B, MAGNITUDE, DuplicateRole, KeyGroups, build_layers, finite_number,
)
from lora_tools.formats.source import TensorSource, finite_factor

PEFT_PREFIX = "base_model.model."

# suffix regex -> role; the optional group swallows an adapter name left in the key.
_SUFFIXES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.[^.]+)?\.weight$"), A),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[^.]+)?\.weight$"), B),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[^.]+)?\.bias$"), BIAS),
    (re.compile(r"^(?P<m>.+)\.lora_embedding_A(?:\.[^.]+)?$"), EMB_A),
    (re.compile(r"^(?P<m>.+)\.lora_embedding_B(?:\.[^.]+)?$"), EMB_B),
    (re.compile(r"^(?P<m>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"), MAGNITUDE),
]

SUPPORTED_PEFT_TYPES = {"LORA"}


def strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def group_peft_keys(keys: list[str], key_prefix: str = "") -> KeyGroups:
    """Sort PEFT-style keys by module; `key_prefix` is dropped too (diffusers components)."""
    groups = KeyGroups()
    for key in keys:
        bare = strip_prefix(key)
        for pattern, role in _SUFFIXES:
            match = pattern.match(bare)
            if match:
                groups.add(match.group("m"), role, key)
                break
        else:
            groups.unclaimed.append(key)
    return groups


def looks_like_peft(keys: list[str]) -> bool:
    return any(".lora_A" in k or ".lora_embedding_A" in k for k in keys)


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
        raise FormatError(path, f"peft_type {peft_type!r} is not supported (only LoRA adapters are)")
    for field_name in ("r", "lora_alpha"):
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
    return config


def pattern_value(pattern: dict[str, float], module: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the first key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return default


def load_peft(
    source: TensorSource,
    config: dict[str, Any],
    *,
    adapter_path: Path,
    fmt: str = "peft",
    alpha_override: float | None = None,
) -> Adapter:
    """Build an `Adapter` from PEFT-named tensors and a (possibly synthesized) config."""
    keys = source.keys()
    try:
        groups = group_peft_keys(keys)
    except DuplicateRole as exc:
        raise FormatError(source.path, str(exc)) from None

    def alpha_for(module: str, rank: int, roles: dict[str, str]) -> float:
        if alpha_override is not None:
            return alpha_override
        default = config.get("lora_alpha")
        if default is None:  # a bare file with no config: alpha = r, so s = 1
            default = rank
        return float(pattern_value(config.get("alpha_pattern") or {}, module, default))

    layers = build_layers(
        source,
        groups,
        alpha_for,
        use_rslora=bool(config.get("use_rslora")),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
    )
    adapter = Adapter(
        path=str(adapter_path), format=fmt, layers=layers, config=config, metadata=source.metadata
    )
    _claim_full_tensors(source, groups.unclaimed, config, adapter)
    if not adapter.layers and not adapter.full_tensors:
        raise FormatError(source.path, "no LoRA tensors found (keys like '...lora_A.weight')")
    return adapter


def _claim_full_tensors(source: TensorSource, unclaimed: list[str], config: dict[str, Any], adapter: Adapter) -> None:
    """modules_to_save copies and bias="all"/"lora_only" biases replace base tensors whole."""
    modules_to_save = config.get("modules_to_save") or []
    saves_biases = config.get("bias") in {"all", "lora_only"}
    for key in unclaimed:
        bare = re.sub(r"\.modules_to_save\.[^.]+\.", ".", strip_prefix(key))
        # save_embedding_layers=True stores the whole base weight as `.base_layer.weight`;
        # PEFT loads it over the base's, so it is a full replacement too.
        full_base_copy = ".base_layer." in bare
        bare = bare.replace(".base_layer.", ".")
        module, _, leaf = bare.rpartition(".")
        wanted = any(module == m or module.endswith("." + m) for m in modules_to_save)
        if wanted or full_base_copy or (saves_biases and leaf == "bias"):
            adapter.full_tensors[bare] = source.place(finite_factor(source, key), source.dtype(key))
            adapter.full_tensor_dtypes[bare] = source.dtype(key)
        else:
            adapter.unrecognized_keys.append(key)
