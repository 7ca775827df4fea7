"""PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors` (or `.bin`).

Key facts (checked against peft 0.21 `tuners/lora` and `utils/save_and_load.py`):
- keys are `base_model.model.<module>.lora_A.weight` (r, in) / `lora_B.weight` (out, r),
  embeddings `lora_embedding_A` (r, num_embeddings) / `lora_embedding_B` (dim, r) with no
  `.weight`, DoRA `lora_magnitude_vector`, `lora_B.bias` under lora_bias; some tools
  leave the adapter name in (`lora_A.default.weight`) or drop `base_model.model.`;
- s = alpha/r, or alpha/√r with use_rslora; r and alpha per module come from the first
  rank_pattern/alpha_pattern key k with re.match(rf"(.*\\.)?({k})$", module path);
- modules_to_save copies are saved as plain `<module>.weight` / `.bias`.

Writing (`write_peft_adapter`) produces what PEFT's save_pretrained would: the keys above
(`names.format_key`), `adapter_config.json` beside them; diffusers.py reuses
`peft_config` / `peft_tensors` under its component prefixes.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.adapter import Adapter, LoraLayer
from lora_tools.errors import FormatError
from lora_tools.formats.common import (
    BIAS,
    EMB_A,
    EMB_B,
    MAGNITUDE,
    A,
    B,
    DuplicateRole,
    KeyGroups,
    build_layers,
    json_number,
)
from lora_tools.formats.names import PEFT_PREFIX, format_key
from lora_tools.formats.patterns import UnsafePattern
from lora_tools.formats.peft_config import SUPPORTED_PEFT_TYPES, check_layers, pattern_table, read_config
from lora_tools.formats.source import TensorSource, finite_factor
from lora_tools.io.encode import Deferred, Encoded, WriteError, storable, write_safetensors

__all__ = [
    "PEFT_PREFIX", "SUPPORTED_PEFT_TYPES", "load_peft", "looks_like_peft", "peft_config", "peft_tensors", "read_config", "write_peft_adapter",
]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PLAIN_NAME = re.compile(r"^[\w.]+$")

# suffix regex -> role; the optional group swallows an adapter name left in the key.
_SUFFIXES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.[^.]+)?\.weight$"), A),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[^.]+)?\.weight$"), B),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[^.]+)?\.bias$"), BIAS),
    (re.compile(r"^(?P<m>.+)\.lora_embedding_A(?:\.[^.]+)?$"), EMB_A),
    (re.compile(r"^(?P<m>.+)\.lora_embedding_B(?:\.[^.]+)?$"), EMB_B),
    (re.compile(r"^(?P<m>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"), MAGNITUDE),
]

def strip_prefix(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX)


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

    config_path = source.path.parent / PEFT_CONFIG  # where a config read for this source lives
    alphas = pattern_table(config_path, config, "alpha_pattern")

    def alpha_for(module: str, rank: int, roles: dict[str, str]) -> float:
        if alpha_override is not None:
            return alpha_override
        default = config.get("lora_alpha")
        if default is None:  # a bare file with no config: alpha = r, so s = 1
            default = rank
        try:
            return float(alphas.value(module, default))
        except UnsafePattern as exc:
            raise FormatError(config_path, str(exc)) from None

    layers = build_layers(
        source,
        groups,
        alpha_for,
        use_rslora=bool(config.get("use_rslora")),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
    )
    check_layers(config_path, config, layers)
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


# -- writing ------------------------------------------------------------------------


def _pattern_key(name: str) -> str:
    """A rank/alpha_pattern key for exactly this module. PEFT matches keys with
    re.match(rf"(.*\\.)?({key})$", path) (peft.utils.other.get_pattern_key): a full dotted
    path matches itself, and another path only if it differed in the very characters
    its dots stand for, which module paths never do. So it is written as is (readable,
    and right for tools that compare keys as strings), escaped only if it holds others."""
    return name if _PLAIN_NAME.match(name) else re.escape(name)


def _most_common(values: Sequence[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def peft_config(
    layers: Sequence[LoraLayer],
    base_model_name_or_path: str | None,
    *,
    target_modules: list[str] | str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """adapter_config.json for `layers`: r / lora_alpha are the most common values and
    rank_pattern / alpha_pattern list the layers that differ, keyed by module path.

    target_modules defaults to the sorted module paths themselves: exact whatever the
    base, so PEFT creates LoRA layers for exactly these modules (no missing keys).
    `extra` adds or overrides fields (task_type, revision, modules_to_save, bias).
    """
    if not layers:
        raise WriteError("no layers to write")
    if len({layer.use_rslora for layer in layers}) != 1:
        raise WriteError("layers mix rsLoRA and plain scaling; fold the scale first")
    if len({layer.magnitude is not None for layer in layers}) != 1:
        raise WriteError("layers mix DoRA and plain LoRA; PEFT's use_dora is one flag")
    linear_fifo = {layer.fan_in_fan_out for layer in layers if layer.kind == "linear"}
    if len(linear_fifo) > 1:
        raise WriteError("layers mix fan_in_fan_out true and false")
    ranks = [layer.rank for layer in layers]
    alphas = [float(layer.alpha) for layer in layers]
    r, lora_alpha = _most_common(ranks), _most_common(alphas)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": json_number(lora_alpha),
        "rank_pattern": {_pattern_key(layer.name): layer.rank for layer in layers if layer.rank != r},
        "alpha_pattern": {
            _pattern_key(layer.name): json_number(layer.alpha) for layer in layers if float(layer.alpha) != lora_alpha
        },
        "target_modules": target_modules if target_modules is not None else sorted(layer.name for layer in layers),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_rslora": layers[0].use_rslora,
        "use_dora": layers[0].magnitude is not None,
        "fan_in_fan_out": bool(linear_fifo and linear_fifo.pop()),
        "lora_bias": any(layer.bias is not None for layer in layers),
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,  # never PiSSA/OLoRA-style inits: they would rewrite the base on load
        "inference_mode": True,
    }
    config.update(extra or {})
    return config


def peft_tensors(
    layers: Sequence[LoraLayer], dtype: str, stem: Callable[[str], str] | None = None
) -> dict[str, tuple[np.ndarray | Encoded | Deferred, str]]:
    """The state dict PEFT's save_pretrained would write for these layers. `stem` names
    a module's keys (default `format_key(name, "peft")`, i.e. `base_model.model.<name>`)."""
    stem = stem or (lambda name: format_key(name, "peft"))
    tensors: dict[str, tuple[np.ndarray | Encoded | Deferred, str]] = {}
    with_bias = any(layer.bias is not None for layer in layers)
    for layer in layers:
        prefix = stem(layer.name)
        if layer.magnitude is not None:  # DoRA: PEFT saves the magnitude as lora_magnitude_vector.weight
            tensors[f"{prefix}.lora_magnitude_vector.weight"] = (np.asarray(layer.magnitude), dtype)
        if layer.kind == "embedding":
            if with_bias:
                raise WriteError(f"layer {layer.name!r}: PEFT has no lora_bias for embeddings")
            tensors[f"{prefix}.lora_embedding_A"] = (storable(layer.a), dtype)
            tensors[f"{prefix}.lora_embedding_B"] = (storable(layer.b), dtype)
            continue
        tensors[f"{prefix}.lora_A.weight"] = (storable(layer.a), dtype)
        tensors[f"{prefix}.lora_B.weight"] = (storable(layer.b), dtype)
        if with_bias:  # lora_bias=True gives every LoRA layer a lora_B bias
            bias = np.asarray(layer.bias) if layer.bias is not None else np.zeros(layer.b.shape[0])
            tensors[f"{prefix}.lora_B.bias"] = (bias, dtype)
    return tensors


def write_peft_adapter(
    layers: Sequence[LoraLayer],
    path: str | os.PathLike[str],
    base_model_name_or_path: str | None,
    *,
    dtype: str = "F32",
    full_tensors: Mapping[str, np.ndarray] | None = None,
    full_tensor_dtype: str | None = None,
    base_copies: Mapping[str, np.ndarray] | None = None,
    target_modules: list[str] | str | None = None,
    config_extra: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write a PEFT adapter folder at `path` (created; it must not exist) and return its config.

    Layers are written as given (their alpha, rank and scale rule); the factors are
    stored in `dtype`, full tensors (modules_to_save, keyed `<module>.weight`) and copies
    of base weights (save_embedding_layers, written as `<module>.base_layer.weight`, which
    PEFT loads over the base's) in `full_tensor_dtype` or `dtype`.
    """
    folder = Path(path)
    config = peft_config(layers, base_model_name_or_path, target_modules=target_modules, extra=config_extra)
    tensors = peft_tensors(layers, dtype)
    for key, tensor in (full_tensors or {}).items():
        tensors[format_key(key, "peft")] = (tensor, full_tensor_dtype or dtype)
    for key, tensor in (base_copies or {}).items():
        module, _, leaf = key.rpartition(".")
        tensors[f"{format_key(module, 'peft')}.base_layer.{leaf}"] = (tensor, full_tensor_dtype or dtype)
    folder.mkdir()
    write_safetensors(folder / PEFT_WEIGHTS, tensors, {"format": "pt", **(metadata or {})})
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return config
