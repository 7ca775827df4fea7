"""diffusers LoRA files: PEFT keys under a component prefix, and the legacy
attention-processor layout.

Current (diffusers ≥ 0.22 `save_lora_weights`): `unet.<module>.lora_A.weight`,
`text_encoder.<module>.lora_B.weight`, `transformer.<module>...`; LoraConfig kwargs in
the safetensors header key `lora_adapter_metadata` (JSON; keys may carry the component
prefix, e.g. "unet.lora_alpha"). With no alpha anywhere, alpha = r (s = 1), as diffusers'
`get_peft_kwargs` assumes. Legacy: `…attn1.processor.to_q_lora.down.weight` (module
`…attn1.to_q`; `to_out_lora` is `to_out.0`), text encoder `…q_proj.lora_linear_layer.up.weight`,
and generic `….lora.down.weight`, all with s = 1 unless `.alpha` keys are present.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lora_tools.adapter import Adapter
from lora_tools.errors import FormatError
from lora_tools.formats.common import (
    A, ALPHA, B, DuplicateRole, build_layers, finite_number, scalar_alpha,
)
from lora_tools.formats.peft import group_peft_keys, pattern_value
from lora_tools.formats.source import TensorSource

COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "transformer.", "prior.")

_LEGACY = re.compile(
    r"^(?P<m>.+?)(?:\.processor)?\.(?:(?P<proc>to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora"
    r"|lora_linear_layer|lora)\.(?P<role>down|up)\.weight$"
)
_LEGACY_ALPHA = re.compile(r"^(?P<m>.+?)(?:\.processor)?(?:\.(?P<proc>to_q|to_k|to_v|to_out)_lora)?\.alpha$")


def looks_like_legacy_diffusers(keys: list[str]) -> bool:
    return any(_LEGACY.match(k) for k in keys)


def looks_like_diffusers(keys: list[str], metadata: dict[str, str]) -> bool:
    return "lora_adapter_metadata" in metadata or any(k.startswith(COMPONENTS) for k in keys if ".lora_" in k)


def _legacy_module(match: re.Match[str]) -> str:
    module, proc = match.group("m"), match.group("proc")
    if proc is None:
        return module
    return f"{module}.{'to_out.0' if proc == 'to_out' else proc}"


def adapter_metadata(source: TensorSource) -> dict[str, Any]:
    """The LoraConfig kwargs diffusers stores in the header, flattened per component."""
    raw = source.metadata.get("lora_adapter_metadata")
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
    """Component-prefixed keys ("unet.lora_alpha") or nested dicts win over flat ones."""
    component = module.split(".", 1)[0]
    config = {k: v for k, v in metadata.items() if "." not in k and not isinstance(v, dict)}
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
        return float(pattern_value(pattern, bare, default))

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
