"""diffusers LoRA files: PEFT keys under a component prefix, and the legacy
attention-processor layout.

Current (diffusers ≥ 0.22 `save_lora_weights`): `unet.<module>.lora_A.weight`,
`text_encoder.<module>.lora_B.weight`, `transformer.<module>...`; LoraConfig kwargs in
the safetensors header key `lora_adapter_metadata` (JSON; keys may carry the component
prefix, e.g. "unet.lora_alpha"). With no alpha anywhere, alpha = r (s = 1), as diffusers'
`get_peft_kwargs` assumes. Legacy: `…attn1.processor.to_q_lora.down.weight` (module
`…attn1.to_q`; `to_out_lora` is `to_out.0`), text encoder `…q_proj.lora_linear_layer.up.weight`,
and generic `….lora.down.weight`, all with s = 1 unless `.alpha` keys are present.

Writing (`write_diffusers`) produces the current layout, as `save_lora_weights` does
(`LoraBaseMixin._save_lora_weights` / `write_lora_layers`, diffusers 0.34+): PEFT keys
without `base_model.model.` under `<component>.`, and each component's LoraConfig
fields packed as `"<component>.<field>"` into one JSON object (indent 2, sorted keys)
under `lora_adapter_metadata`, beside `"format": "pt"`. `load_lora_weights` strips the
component from keys and fields and builds `LoraConfig(**fields)` from them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from lora_tools.adapter import Adapter, LoraLayer
from lora_tools.errors import FormatError
from lora_tools.formats.common import (
    ALPHA,
    A,
    B,
    DuplicateRole,
    build_layers,
    finite_number,
    scalar_alpha,
)
from lora_tools.formats.names import COMPONENTS, DIFFUSERS_COMPONENTS, format_key
from lora_tools.formats.patterns import PatternTable, UnsafePattern
from lora_tools.formats.peft import (
    group_peft_keys,
    peft_config,
    peft_tensors,
)
from lora_tools.formats.source import TensorSource
from lora_tools.io.encode import Deferred, Encoded, WriteError, write_safetensors

__all__ = [
    "COMPONENTS", "DIFFUSERS_WEIGHTS", "METADATA_KEY", "load_diffusers", "looks_like_diffusers",
    "looks_like_legacy_diffusers", "write_diffusers",
]

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # save_lora_weights' file name in its folder
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY

_LEGACY = re.compile(
    r"^(?P<m>.+?)(?:\.processor)?\.(?:(?P<proc>to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora"
    r"|lora_linear_layer|lora)\.(?P<role>down|up)\.weight$"
)
_LEGACY_ALPHA = re.compile(r"^(?P<m>.+?)(?:\.processor)?(?:\.(?P<proc>to_q|to_k|to_v|to_out)_lora)?\.alpha$")


def looks_like_legacy_diffusers(keys: list[str]) -> bool:
    return any(_LEGACY.match(k) for k in keys)


def looks_like_diffusers(keys: list[str], metadata: dict[str, str]) -> bool:
    return METADATA_KEY in metadata or any(k.startswith(COMPONENTS) for k in keys if ".lora_" in k)


def _legacy_module(match: re.Match[str]) -> str:
    module, proc = match.group("m"), match.group("proc")
    if proc is None:
        return module
    return f"{module}.{'to_out.0' if proc == 'to_out' else proc}"


def adapter_metadata(source: TensorSource) -> dict[str, Any]:
    """The LoraConfig kwargs diffusers stores in the header, flattened per component."""
    raw = source.metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, 5000-digit ints, deep nesting
        raise FormatError(source.path, f"header lora_adapter_metadata is not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise FormatError(source.path, "header lora_adapter_metadata is not a JSON object")
    return parsed


def _config_for(metadata: dict[str, Any], module: str) -> dict[str, Any]:
    """Component-prefixed keys ("unet.lora_alpha") or nested component dicts win over flat
    ones. Flat dict-valued fields (alpha_pattern, rank_pattern: what a model's own
    `save_lora_adapter` writes) are config, not components."""
    component = module.split(".", 1)[0]
    config = {k: v for k, v in metadata.items() if "." not in k and not (isinstance(v, dict) and k in DIFFUSERS_COMPONENTS)}
    nested = metadata.get(component)
    if isinstance(nested, dict):
        config.update(nested)
    prefix = component + "."
    config.update({k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)})
    return config


def load_diffusers(source: TensorSource, *, alpha_override: float | None = None) -> Adapter:
    keys = source.keys()
    metadata = adapter_metadata(source)
    try:
        groups = group_peft_keys([k for k in keys if not _LEGACY.match(k) and not k.endswith(".alpha")])
        alpha_keys: dict[str, str] = {}
        for key in keys:
            legacy = _LEGACY.match(key)
            if legacy:
                groups.add(_legacy_module(legacy), A if legacy.group("role") == "down" else B, key)
            elif key.endswith(".alpha"):
                alpha_match = _LEGACY_ALPHA.match(key)
                if alpha_match is None:  # ".alpha" alone names no module
                    groups.unclaimed.append(key)
                else:
                    alpha_keys[_legacy_module(alpha_match)] = key
    except DuplicateRole as exc:
        raise FormatError(source.path, str(exc)) from None
    for module, key in alpha_keys.items():
        if module in groups.modules:
            groups.modules[module][ALPHA] = key
        else:
            groups.unclaimed.append(key)

    def alpha_for(module: str, rank: int, roles: dict[str, str]) -> float:
        if alpha_override is not None:
            return alpha_override
        if ALPHA in roles:
            return scalar_alpha(source, roles[ALPHA])
        config = _config_for(metadata, module)
        bare = module.split(".", 1)[1] if module.startswith(COMPONENTS) else module
        default = finite_number(config.get("lora_alpha", rank))
        if default is None:
            problem = f"lora_alpha {config.get('lora_alpha')!r} is not a number"
            raise FormatError(source.path, f"header lora_adapter_metadata: {problem}")
        pattern = config.get("alpha_pattern") or {}
        if not isinstance(pattern, dict) or any(finite_number(v) is None for v in pattern.values()):
            problem = "alpha_pattern must map module patterns to numbers"
            raise FormatError(source.path, f"header lora_adapter_metadata: {problem}")
        try:  # one table per component's pattern, so the time budget spans the whole file
            table_key = json.dumps(pattern, sort_keys=True)
            table = tables.get(table_key) or tables.setdefault(table_key, PatternTable("alpha_pattern", pattern))
            return float(table.value(bare, default))
        except UnsafePattern as exc:
            raise FormatError(source.path, f"header lora_adapter_metadata: {exc}") from None

    tables: dict[str, PatternTable] = {}

    layers = build_layers(source, groups, alpha_for)
    for layer in layers:  # rsLoRA is per component ("unet.use_rslora"), like every other field
        use_rslora = _config_for(metadata, layer.name).get("use_rslora") or False
        if not isinstance(use_rslora, bool):  # "false" is a true string: never guess a scale rule
            problem = f"use_rslora must be true or false, got {use_rslora!r}"
            raise FormatError(source.path, f"header lora_adapter_metadata: {problem}")
        layer.use_rslora = use_rslora
    if not layers:
        raise FormatError(source.path, "no diffusers LoRA tensors found")
    return Adapter(
        path=str(source.path),
        format="diffusers",
        layers=layers,
        config=metadata,
        metadata=source.metadata,
        unrecognized_keys=groups.unclaimed,
    )


def write_diffusers(
    layers: Sequence[LoraLayer],
    path: str | os.PathLike[str],
    *,
    component: str | None = None,
    dtype: str = "F32",
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write a diffusers LoRA file at `path` (it must not exist; diffusers itself names
    it DIFFUSERS_WEIGHTS in a folder) and return the packed LoraConfig fields.

    Without `component` every layer name must start with its component (`unet.…`,
    `text_encoder.…`, as a diffusers file reads); with it (one of DIFFUSERS_COMPONENTS)
    the names are module paths inside that component. Each component gets its own
    config (`peft.peft_config`: most common r/alpha, patterns for the rest, its own
    use_rslora), so every layer keeps its exact scale.
    """
    if not layers:
        raise WriteError("no layers to write")
    by_component: dict[str, list[LoraLayer]] = {}
    for layer in layers:
        if component is None:
            owner, _, module = layer.name.partition(".")
            if owner not in DIFFUSERS_COMPONENTS or not module:
                choices = ", ".join(f"{c}." for c in DIFFUSERS_COMPONENTS)
                raise WriteError(f"layer {layer.name!r} starts with no diffusers component ({choices}); name one")
        else:
            owner, module = component, layer.name
        by_component.setdefault(owner, []).append(replace(layer, name=module))
    tensors: dict[str, tuple[np.ndarray | Encoded | Deferred, str]] = {}
    packed: dict[str, Any] = {}
    for owner, owned in by_component.items():
        try:
            stems = {layer.name: format_key(layer.name, "diffusers", owner) for layer in owned}
        except ValueError as error:
            raise WriteError(str(error)) from None
        if len(stems) != len(owned):
            raise WriteError(f"two layers adapt the same {owner} module")
        config = peft_config(owned, None)
        packed.update({f"{owner}.{field}": value for field, value in config.items()})
        tensors.update(peft_tensors(owned, dtype, stems.__getitem__))
    header = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True), **(metadata or {})}
    write_safetensors(path, tensors, header)
    return packed
