"""Mapping an adapter's layer names onto the module paths of a base checkpoint.

Formats name modules differently from the checkpoint they were trained on: kohya
flattens dots to underscores behind `lora_unet_`/`lora_te_`; diffusers adds a component
prefix (`unet.`); single-file bases add one of their own (`model.diffusion_model.`).
A name resolves when exactly one base module matches; anything else is an error that
names the layer, never a guess.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from lora_tools.adapter import Adapter
from lora_tools.errors import MismatchError
from lora_tools.formats.kohya import KOHYA_PREFIXES


def _dotted_candidates(name: str, modules: set[str], by_suffix: dict[str, list[str]]) -> list[str]:
    if name in modules:
        return [name]
    parts = name.split(".")
    for start in range(1, len(parts)):  # adapter has an extra prefix ("unet.")
        tail = ".".join(parts[start:])
        if tail in modules:
            return [tail]
    return by_suffix.get(name, [])  # base has an extra prefix


def _kohya_candidates(name: str, underscored: dict[str, list[str]]) -> list[str]:
    body = name
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix):
            body = name[len(prefix):]
            break
    exact = underscored.get(body, [])
    if exact:
        return exact
    return [m for flat, ms in underscored.items() if flat.endswith("_" + body) for m in ms]


def resolve_names(adapter: Adapter, modules: set[str], base_path: str | Path) -> Adapter:
    """A copy of `adapter` whose layer names are module paths of the base."""
    by_suffix: dict[str, list[str]] = defaultdict(list)
    underscored: dict[str, list[str]] = defaultdict(list)
    for module in modules:
        parts = module.split(".")
        for start in range(1, len(parts)):
            by_suffix[".".join(parts[start:])].append(module)
        underscored[module.replace(".", "_")].append(module)

    layers = []
    for layer in adapter.layers:
        if layer.name.startswith(KOHYA_PREFIXES) and "." not in layer.name:
            candidates = _kohya_candidates(layer.name, underscored)
        else:
            candidates = _dotted_candidates(layer.name, modules, by_suffix)
        if len(candidates) != 1:
            problem = "matches no module" if not candidates else f"is ambiguous ({', '.join(sorted(candidates)[:3])})"
            raise MismatchError(adapter.path, f"layer {layer.name!r} {problem} of base {base_path}")
        layers.append(replace(layer, name=candidates[0]))
    full = {}
    for key, tensor in adapter.full_tensors.items():
        module, _, leaf = key.rpartition(".")
        candidates = _dotted_candidates(module, modules, by_suffix) if module else []
        full[f"{candidates[0]}.{leaf}" if len(candidates) == 1 else key] = tensor
    dtypes = {
        new: adapter.full_tensor_dtypes[old] for new, old in zip(full, adapter.full_tensors) if old in adapter.full_tensor_dtypes
    }
    return replace(adapter, layers=layers, full_tensors=full, full_tensor_dtypes=dtypes, names_resolved=True)
