"""Where each layer lives, in every format's terms: a module path inside one component.

PEFT names a module by its path in one model (component None); diffusers prefixes the
pipeline component (`unet.…`, `text_encoder.…`); kohya joins a component prefix and the
path with "." as "_" (`lora_unet_down_blocks_0_…`), which only a base's module paths can
undo (`formats.names.resolve_names`). Components map between the two naming schemes as
sd-scripts and diffusers' own converters do: `lora_te_`/`lora_te1_` ↔ text_encoder,
`lora_te2_` ↔ text_encoder_2, `lora_te3_` ↔ text_encoder_3, `lora_unet_` ↔ unet, and a
diffusers `transformer` (Flux, SD3) is `lora_unet_` in sd-scripts and ComfyUI.
Pure: names in, names out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lora_tools.formats.names import DIFFUSERS_COMPONENTS, KOHYA_COMPONENTS, KOHYA_PREFIXES

# kohya key prefix -> diffusers component
KOHYA_TO_COMPONENT: dict[str, str | None] = {
    "lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3", "lora_transformer_": "transformer", "lycoris_": None}  # lycoris_: one plain model
_COMPONENT_TO_KOHYA = {"unet": "lora_unet_", "transformer": "lora_unet_", "text_encoder_2": "lora_te2_",
                       "text_encoder_3": "lora_te3_"}


@dataclass(frozen=True)
class Location:
    """One layer: its module path (None for a kohya name no base resolved) in a component
    (None: the adapter is one model's, as PEFT's are)."""

    module: str | None
    component: str | None
    kohya_name: str | None = None  # the input's own kohya name, kept for kohya → kohya


def kohya_component(name: str) -> tuple[str, str | None]:
    """(kohya prefix, diffusers component) of a kohya layer name."""
    prefix = next(p for p in KOHYA_PREFIXES if name.startswith(p))
    return prefix, KOHYA_TO_COMPONENT[prefix]


def split_component(name: str) -> tuple[str | None, str]:
    """A diffusers layer name as (component, module path); no known prefix: (None, name)."""
    head, _, rest = name.partition(".")
    return (head, rest) if head in DIFFUSERS_COMPONENTS and rest else (None, name)


def _kohya_prefix(component: str | None, default: str, has_second_encoder: bool) -> str:
    if component is None:
        return default
    if component == "text_encoder":
        return "lora_te1_" if has_second_encoder else "lora_te_"
    if component not in _COMPONENT_TO_KOHYA:
        raise ValueError(f"diffusers component {component!r} has no kohya prefix")
    return _COMPONENT_TO_KOHYA[component]


def kohya_prefix_option(prefix: str | None) -> str:
    """`--prefix` for a kohya output: a component ("unet", "te1") or a literal prefix
    ("lora_unet_"); default lora_unet_. ValueError names the choices."""
    if prefix is None:
        return KOHYA_COMPONENTS["unet"]
    if prefix in KOHYA_COMPONENTS:
        return KOHYA_COMPONENTS[prefix]
    if prefix in KOHYA_PREFIXES:
        return prefix
    choices = ", ".join([*KOHYA_COMPONENTS, *KOHYA_PREFIXES])
    raise ValueError(f"--prefix for kohya must be one of {choices} (got {prefix!r})")


def output_names(locations: Sequence[Location], target: str, prefix: str | None) -> list[str]:
    """Each layer's name in `target`'s scheme (module paths for peft and gguf, kohya names,
    component-prefixed paths for diffusers). `prefix`: kohya, the prefix of layers that
    have no component; diffusers, the component of such layers. ValueError: a name the
    target cannot form (a kohya name without a base, components mixed in a PEFT output)."""
    unresolved = next((loc.kohya_name for loc in locations if loc.module is None), None)
    if target == "kohya":
        if unresolved is not None and any(loc.module is not None for loc in locations):
            raise ValueError("mixed resolved and unresolved kohya names")
        if unresolved is not None:
            return [str(loc.kohya_name) for loc in locations]
        default = kohya_prefix_option(prefix)
        second = any(loc.component == "text_encoder_2" for loc in locations)
        return [_kohya_prefix(loc.component, default, second) + str(loc.module).replace(".", "_") for loc in locations]
    if unresolved is not None:
        raise ValueError(f"kohya layer {unresolved!r} needs --base to be named as {target} names it (module paths "
                         "come from the base's tensor names)")
    if target == "diffusers":
        component = prefix or "unet"
        if component not in DIFFUSERS_COMPONENTS:
            raise ValueError(f"--prefix for diffusers must be a component: {', '.join(DIFFUSERS_COMPONENTS)} (got {prefix!r})")
        return [f"{loc.component or component}.{loc.module}" for loc in locations]
    components = sorted({str(loc.component) for loc in locations if loc.component is not None})
    if len(components) > 1:
        raise ValueError(f"layers of {len(components)} components ({', '.join(components)}); a {target} adapter holds "
                         "one model: choose one with --component")
    return [str(loc.module) for loc in locations]
