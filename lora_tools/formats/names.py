"""Layer names both ways: a format's key stem ⇄ the module path it adapts in the base.

Formats name modules differently from the checkpoint they were trained on: PEFT puts
`base_model.model.` in front; kohya flattens dots to underscores behind `lora_unet_`/
`lora_te_`; diffusers adds a component prefix (`unet.`); single-file bases add one of
their own (`model.diffusion_model.`).

- `resolve_names` (key stem → module path): a name resolves when exactly one base module
  matches; anything else is an error that names the layer, never a guess. kohya names
  need the base's module paths, since "_" in them may stand for "." or for itself.
- `format_key` (module path → key stem): what each format writes for a module; the
  writers name their keys with it and nothing else.

The prefixes live here, so that readers, writers and this module agree on them.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from lora_tools.adapter import Adapter
from lora_tools.errors import MismatchError

__all__ = ["COMPONENTS", "DIFFUSERS_COMPONENTS", "KOHYA_COMPONENTS", "KOHYA_PREFIXES", "LAYER_NUMBER", "PEFT_PREFIX", "format_key", "module_family", "resolve_names", "tied_hint"]

PEFT_PREFIX = "base_model.model."
# kohya's component (the part between `lora_` and the module) -> its key prefix. SD1/2
# text encoders are `te`, SDXL's `te1`/`te2`, T5 `te3`; Flux/SD3 transformers are `unet`
# in sd-scripts ("for ComfyUI"), `transformer` in some other trainers.
KOHYA_COMPONENTS = {
    "unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_",
    "transformer": "lora_transformer_", "lycoris": "lycoris_",  # lycoris_: create_lycoris on a plain model
}
KOHYA_PREFIXES = tuple(KOHYA_COMPONENTS.values())
# diffusers' pipeline components whose LoRA keys carry their name as a prefix (`unet.…`).
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")
COMPONENTS = tuple(f"{component}." for component in DIFFUSERS_COMPONENTS)


def format_key(module: str, fmt: str, component: str | None = None) -> str:
    """The key stem `fmt` writes for the module at path `module` (its tensors' keys are
    the stem plus `.lora_A.weight`, `.lora_down.weight`, `.alpha`, ...).

    peft       `base_model.model.<module>` (no component)
    kohya      `lora_<component>_<module with "." as "_">`, component one of KOHYA_COMPONENTS
    diffusers  `<component>.<module>`, component one of DIFFUSERS_COMPONENTS

    A bad format or component raises ValueError naming the choices.
    """
    if fmt == "peft":
        if component is not None:
            raise ValueError(f"PEFT keys have no component (got {component!r})")
        return PEFT_PREFIX + module
    if fmt == "kohya":
        if component not in KOHYA_COMPONENTS:
            raise ValueError(f"kohya component must be one of {', '.join(KOHYA_COMPONENTS)} (got {component!r})")
        return KOHYA_COMPONENTS[component] + module.replace(".", "_")
    if fmt == "diffusers":
        if component not in DIFFUSERS_COMPONENTS:
            raise ValueError(f"diffusers component must be one of {', '.join(DIFFUSERS_COMPONENTS)} (got {component!r})")
        return f"{component}.{module}"
    raise ValueError(f"unknown format {fmt!r} (peft, kohya or diffusers)")


# Output embeddings that transformers ties to the input embeddings (no tensor of their own).
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")


def tied_hint(base_path: str | Path, module: str) -> str:
    """For a module the base lacks: why, when it is an output embedding of a base whose
    config.json says tie_word_embeddings: true (else ""). Read only on this error path."""
    if module.rpartition(".")[2] not in OUTPUT_EMBEDDINGS:
        return ""
    base = Path(base_path)
    config_path = (base if base.is_dir() else base.parent) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return ""
    configs = [config, config.get("text_config")] if isinstance(config, dict) else []
    if not any(isinstance(c, dict) and c.get("tie_word_embeddings") is True for c in configs):
        return ""
    return (
        f" ({config_path} says tie_word_embeddings: true: {module} shares the input embedding's weight and has "
        "no tensor of its own; PEFT would change both, lora-tools merges no tied weights)"
    )


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
    """A copy of `adapter` whose layer names (key stems of any format) are module paths
    of the base, whose module paths are `modules`; the inverse of `format_key`."""
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
            hint = "" if candidates else tied_hint(base_path, layer.name)
            raise MismatchError(adapter.path, f"layer {layer.name!r} {problem} of base {base_path}{hint}")
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


LAYER_NUMBER = re.compile(r"(?<=[._])\d+(?=[._]|$)")


def module_family(name: str) -> str:
    """The module path with its layer numbers as "*" ("model.layers.*.self_attn.q_proj"):
    the same module type across depth, which inspect's outlier test and the grouped
    tables compare layers within."""
    return LAYER_NUMBER.sub("*", name)
