"""kohya sd-scripts LoRA files (`networks.lora`; LoCon conv layers too).

Key = module path with "." replaced by "_", prefixed `lora_unet_`, `lora_te_`,
`lora_te1_`/`lora_te2_`/`lora_te3_`; tensors `<name>.lora_down.weight` (r, in[, kh, kw]),
`<name>.lora_up.weight` (out, r[, 1, 1]) and `<name>.alpha` (0-d, any float dtype).
s = alpha / r with r = lora_down.shape[0]; a missing or zero alpha means alpha = r
(sd-scripts `LoRAModule.__init__`). Names stay kohya's until resolved against a base;
`names.format_key` makes them from module paths when writing.

DoRA: `<name>.dora_scale` as LyCORIS writes it with `wd_on_output=True` (its
`LoConModule`: shape (out, 1[, 1, 1]), the norm of W0 + ΔW taken per output feature),
which is PEFT's DoRA for linear and conv layers; ComfyUI reads the same key. The other
LyCORIS convention, (1, in, …) per input column, is refused here with its name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from lora_tools.adapter import Adapter, LoraLayer
from lora_tools.errors import FormatError
from lora_tools.formats.common import (
    ALPHA,
    MAGNITUDE,
    A,
    B,
    DuplicateRole,
    KeyGroups,
    build_layers,
    json_number,
    scalar_alpha,
)
from lora_tools.formats.names import KOHYA_PREFIXES, format_key
from lora_tools.formats.source import TensorSource
from lora_tools.io.encode import Deferred, Encoded, WriteError, storable, write_safetensors

__all__ = ["KOHYA_PREFIXES", "load_kohya", "looks_like_kohya", "write_kohya"]

_KEY = re.compile(r"^(?P<m>lora_[A-Za-z0-9_]+?)\.(?:(?P<role>lora_down|lora_up)\.weight|(?P<alpha>alpha)|(?P<dora>dora_scale))$")
_ROLE = {"lora_down": A, "lora_up": B}


def looks_like_kohya(keys: list[str]) -> bool:
    return any(k.startswith(KOHYA_PREFIXES) and (".lora_down." in k or ".lora_up." in k) for k in keys)


def load_kohya(source: TensorSource, *, alpha_override: float | None = None) -> Adapter:
    groups = KeyGroups()
    keys = source.keys()
    try:
        for key in keys:
            match = _KEY.match(key)
            if match and match.group("m").startswith(KOHYA_PREFIXES):
                role = ALPHA if match.group("alpha") else MAGNITUDE if match.group("dora") else _ROLE[match.group("role")]
                groups.add(match.group("m"), role, key)
            else:
                groups.unclaimed.append(key)
    except DuplicateRole as exc:
        raise FormatError(source.path, str(exc)) from None
    for module, roles in list(groups.modules.items()):
        if set(roles) == {ALPHA}:  # an alpha without factors: nothing to apply
            groups.unclaimed.append(roles[ALPHA])
            del groups.modules[module]
        elif MAGNITUDE in roles:
            shape = source.shape(roles[MAGNITUDE])
            if len(shape) < 2 or any(d != 1 for d in shape[1:]):
                raise FormatError(source.path, f"tensor {roles[MAGNITUDE]!r}: dora_scale of shape {list(shape)} is not "
                                               "per output feature (out, 1, …): LyCORIS' wd_on_output=False is not read yet")

    def alpha_for(module: str, rank: int, roles: dict[str, str]) -> float:
        if alpha_override is not None:
            return alpha_override
        if ALPHA not in roles:
            return float(rank)
        alpha = scalar_alpha(source, roles[ALPHA])
        return alpha if alpha != 0 else float(rank)

    layers = build_layers(source, groups, alpha_for)
    if not layers:
        raise FormatError(source.path, "no kohya LoRA pairs (.lora_down/.lora_up) found")
    for layer in layers:
        if layer.magnitude is not None:  # (out, 1, …) -> PEFT's (out,)
            layer.magnitude = layer.magnitude.reshape(-1)
    adapter = Adapter(
        path=str(source.path),
        format="kohya",
        layers=layers,
        metadata=source.metadata,
        unrecognized_keys=groups.unclaimed,
        names_resolved=False,
    )
    return adapter


def write_kohya(
    layers: Sequence[LoraLayer],
    path: str | os.PathLike[str],
    *,
    dtype: str = "F16",
    metadata: Mapping[str, str] | None = None,
    component: str | None = None,
) -> None:
    """Write a kohya sd-scripts LoRA file (`path` must not exist).

    kohya knows one scale rule, s = alpha / r, so each layer's alpha is written as
    scale·r: an rsLoRA or alpha-pattern layer keeps its exact update. A DoRA magnitude is
    written as `dora_scale` (out, 1[, 1, 1]) (see the module docstring). Without
    `component` the names must already be kohya names (`lora_unet_…`, `lora_te_…`, as a
    kohya file reads); with it ("unet", "te", "te1", ...) they are module paths, named
    by `names.format_key`.
    """
    if not layers:
        raise WriteError("no layers to write")
    tensors: dict[str, tuple[np.ndarray | Encoded | Deferred, str]] = {}
    for layer in layers:
        if component is None:
            if not layer.name.startswith(KOHYA_PREFIXES):
                raise WriteError(f"layer {layer.name!r} has no kohya name (lora_unet_…, lora_te_…)")
            name = layer.name
        else:
            try:
                name = format_key(layer.name, "kohya", component)
            except ValueError as error:
                raise WriteError(str(error)) from None
        if layer.bias is not None:
            raise WriteError(f"layer {layer.name!r}: kohya LoRA files hold no LoRA bias")
        if layer.magnitude is not None:
            if layer.kind == "embedding":
                raise WriteError(f"layer {layer.name!r}: kohya files hold no DoRA embedding")
            magnitude = np.asarray(layer.magnitude).reshape(layer.b.shape[0], *(1,) * (np.ndim(layer.a) - 1))
            tensors[f"{name}.dora_scale"] = (magnitude, dtype)
        if f"{name}.alpha" in tensors:
            raise WriteError(f"layer {layer.name!r}: kohya name {name!r} is taken by another layer")
        tensors[f"{name}.lora_down.weight"] = (storable(layer.a), dtype)
        tensors[f"{name}.lora_up.weight"] = (storable(layer.b), dtype)
        tensors[f"{name}.alpha"] = (np.asarray(layer.scale * layer.rank, dtype=np.float32), "F32")
    ranks = {layer.rank for layer in layers}
    alphas = {float(layer.scale * layer.rank) for layer in layers}
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(json_number(alphas.pop())) if len(alphas) == 1 else "Dynamic",
        **(metadata or {}),
    }
    write_safetensors(path, tensors, header)
