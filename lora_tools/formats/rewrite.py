"""Writing new layers in an adapter's format, keeping what the input carried besides its
layers: the PEFT config fields no layer determines, modules_to_save and copied base
weights, a kohya or diffusers file's header. `resize` (same format, new ranks) and
`convert` (new format, same layers) both write through here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.adapter import Adapter, LoraLayer
from lora_tools.formats.diffusers import METADATA_KEY, write_diffusers
from lora_tools.formats.kohya import write_kohya
from lora_tools.formats.peft import write_peft_adapter

# adapter_config.json fields `formats.peft.peft_config` derives from the written layers
_DERIVED = {"peft_type", "base_model_name_or_path", "r", "lora_alpha", "rank_pattern", "alpha_pattern",
            "target_modules", "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "init_lora_weights",
            "inference_mode"}
_TARGETING = ("exclude_modules", "layers_to_transform", "layers_pattern")
# kohya header fields the writer derives from the layers
_KOHYA_DERIVED = ("ss_network_dim", "ss_network_alpha")


def common_dtype(codes: Sequence[str], fallback: str = "F32") -> str:
    """The one dtype code all of `codes` share, else `fallback`."""
    return codes[0] if len(set(codes)) == 1 else fallback


def _peft_config_extra(adapter: Adapter, dropped: bool) -> tuple[dict[str, Any], list[str] | str | None]:
    """The input's config fields the output keeps, and its target_modules (None: the
    written modules' paths, when a dropped layer would otherwise be created empty)."""
    extra = {k: v for k, v in adapter.config.items() if k not in _DERIVED}
    if dropped or not adapter.config.get("target_modules"):
        for key in _TARGETING:
            extra.pop(key, None)
        return extra, None
    return extra, adapter.config["target_modules"]


def write_like(adapter: Adapter, layers: Sequence[LoraLayer], path: Path, fmt: str, code: str, *, dropped: bool,
               metadata: Mapping[str, str], base_model: str | None = None) -> None:
    """Write `layers` (named as `fmt` names them: module paths for peft, kohya names,
    component-prefixed paths for diffusers) at `path` in `fmt` with factors in `code`.

    What else the input had is kept where the output format is the input's: the kohya
    header (less the derived dim/alpha), the diffusers header (less its packed config),
    a PEFT config's own fields, modules_to_save and base copies. `dropped`: some input
    layers are not written (then PEFT's target_modules are the written paths).
    """
    same = fmt == adapter.format
    if same and fmt == "peft" and adapter.config.get("peft_type", "LORA") != "LORA":
        same = False  # a LoHa/LoKr config describes other tensors than the LoRA ones written
    if fmt == "kohya":
        kept = {k: v for k, v in adapter.metadata.items() if k not in _KOHYA_DERIVED} if same else {}
        write_kohya(layers, path, dtype=code, metadata={**kept, **metadata})
    elif fmt == "diffusers":
        kept = {k: v for k, v in adapter.metadata.items() if k not in (METADATA_KEY, "format")} if same else {}
        write_diffusers(layers, path, dtype=code, metadata={**kept, **metadata})
    else:
        tensors = {k: np.asarray(v) for k, v in adapter.full_tensors.items()} if same else {}
        adapted = {layer.name for layer in adapter.layers}
        copies = {k: v for k, v in tensors.items() if k.rpartition(".")[0] in adapted}
        full = {k: v for k, v in tensors.items() if k not in copies}
        full_code = common_dtype(list(adapter.full_tensor_dtypes.values()))
        extra, targets = _peft_config_extra(adapter, dropped) if same else ({}, None)
        name = adapter.config.get("base_model_name_or_path") if same else None
        write_peft_adapter(layers, path, base_model or (name if isinstance(name, str) else None), dtype=code,
                           full_tensors=full, full_tensor_dtype=full_code, base_copies=copies, target_modules=targets,
                           config_extra=extra, metadata={**({k: v for k, v in adapter.metadata.items() if k != "format"}
                                                            if same else {}), **metadata})
