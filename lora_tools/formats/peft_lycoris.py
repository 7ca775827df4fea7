"""PEFT's LoHa and LoKr adapter folders (peft/tuners/loha, lokr), read into exact LoRA
layers by the LyCORIS algorithms of `formats.lycoris` (PEFT's tuners follow LyCORIS' math).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter
from lora_tools.errors import FormatError
from lora_tools.formats.lycoris import ROLES, ScaleRule, build_layers, grouped
from lora_tools.formats.patterns import PatternTable, UnsafePattern
from lora_tools.formats.source import TensorSource

__all__ = ["PEFT_LYCORIS_TYPES", "load_peft_lycoris"]

# PEFT's tuners for the same algorithms (peft/tuners/loha, lokr): keys `base_model.model.<module>.<role>`,
# LoHaConfig/LoKrConfig `r` and `alpha` with rank_pattern/alpha_pattern, s = alpha / r always
# (`update_layer`: `self.scaling[adapter_name] = alpha / r`, LoKr's full sides included).
PEFT_LYCORIS_TYPES = {"LOHA": "hada_", "LOKR": "lokr_"}
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<m>.+)\.(?P<role>"
                       + "|".join(re.escape(r) for r in ROLES if r.startswith(("hada_", "lokr_"))) + ")$")


def load_peft_lycoris(source: TensorSource, config: dict[str, Any], *, adapter_path: Path,
                      alpha_override: float | None = None) -> Adapter:
    """A PEFT LoHa or LoKr adapter folder, its layers as exact LoRA layers."""
    config_path = source.path.parent / "adapter_config.json"
    groups = grouped(source, _PEFT_KEY)
    try:
        ranks, alphas = PatternTable("rank_pattern", config.get("rank_pattern") or {}), \
            PatternTable("alpha_pattern", config.get("alpha_pattern") or {})
    except UnsafePattern as exc:
        raise FormatError(config_path, str(exc)) from None

    def rule(module: str) -> ScaleRule:
        try:
            r = float(ranks.value(module, config["r"]))
            alpha = alpha_override if alpha_override is not None else float(alphas.value(module, config["alpha"]))
        except UnsafePattern as exc:
            raise FormatError(config_path, str(exc)) from None
        return lambda dim: alpha / r

    layers = build_layers(source, groups.modules, lambda name, roles: rule(name))
    if not layers:
        raise FormatError(source.path, f"no {config.get('peft_type')} tensors found (keys like '...hada_w1_a')")
    if groups.unclaimed:
        raise FormatError(source.path, f"tensor {groups.unclaimed[0]!r} is no {config.get('peft_type')} factor "
                                       "(modules_to_save are not read for LoHa/LoKr adapters)")
    return Adapter(path=str(adapter_path), format="peft", layers=layers, config=config, metadata=source.metadata)
