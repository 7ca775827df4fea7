"""Turning grouped factor keys into `LoraLayer`s: the part every format shares.

A format reader only decides which key plays which role for which module; this module
reads the tensors, checks that the factors fit together, and builds the layers. Writers
share `json_number`, for alphas in configs and headers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lora_tools.adapter import Factor, LoraLayer
from lora_tools.errors import FormatError
from lora_tools.formats.source import ReadAhead, TensorSource, keep_stored
from lora_tools.io.dtypes import NUMERIC_DTYPES
from lora_tools.io.encode import storable

# Integer alphas are real: diffusers' convert_state_dict_to_kohya writes torch.tensor(rank), an int64.

# Roles a key can play for one module.
A, B, EMB_A, EMB_B, BIAS, MAGNITUDE, ALPHA = "A", "B", "emb_A", "emb_B", "bias", "magnitude", "alpha"


@dataclass
class KeyGroups:
    """Keys sorted by module, in first-seen order, plus the keys no rule claimed."""

    modules: dict[str, dict[str, str]] = field(default_factory=dict)
    unclaimed: list[str] = field(default_factory=list)

    def add(self, module: str, role: str, key: str) -> None:
        roles = self.modules.setdefault(module, {})
        if role in roles:
            raise DuplicateRole(module, role, roles[role], key)
        roles[role] = key


class DuplicateRole(Exception):
    def __init__(self, module: str, role: str, first: str, second: str) -> None:
        super().__init__(f"keys {first!r} and {second!r} both give {role} of module {module!r}")


def build_layers(
    source: TensorSource,
    groups: KeyGroups,
    alpha_for: Callable[[str, int, dict[str, str]], float],
    *,
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
) -> list[LoraLayer]:
    """Read each module's factors and check their shapes agree.

    `alpha_for(module, rank, roles)` gives the module's alpha: formats differ (config
    patterns, per-module alpha tensors, metadata), the rest is shared.
    """
    plan: list[tuple[str, dict[str, str], bool, str | None, str | None]] = []
    keys: list[str] = []  # every tensor read, in the order the loop below asks for them
    for module, roles in groups.modules.items():
        embedding = EMB_A in roles or EMB_B in roles
        key_a, key_b = (roles.get(EMB_A), roles.get(EMB_B)) if embedding else (roles.get(A), roles.get(B))
        plan.append((module, roles, embedding, key_a, key_b))
        if key_a is None or key_b is None:
            break  # refused below, after the modules before it (as their errors come first)
        keys += [key_a, key_b] + [roles[role] for role in (MAGNITUDE, BIAS) if role in roles]
    layers = []
    with ReadAhead(source, keys, stored=source.place is keep_stored) as arrays:
        for module, roles, embedding, key_a, key_b in plan:
            if key_a is None or key_b is None:
                present = next(iter(roles.values()))
                missing = "A (down)" if key_a is None else "B (up)"
                raise FormatError(source.path, f"module {module!r}: has {present!r} but no LoRA {missing} factor")
            a = arrays.get(key_a)
            b = arrays.get(key_b)
            check_factor_shapes(source, module, a, b, embedding)
            kind = "embedding" if embedding else ("conv" if a.ndim > 2 else "linear")
            rank = int(a.shape[0])
            layer = LoraLayer(
                name=module,
                a=a,
                b=b,
                alpha=float(alpha_for(module, rank, roles)),
                kind=kind,  # type: ignore[arg-type]
                use_rslora=use_rslora,
                fan_in_fan_out=fan_in_fan_out and kind == "linear",
                dtype=source.dtype(key_a),
                source_keys=tuple(roles.values()),
            )
            if MAGNITUDE in roles:
                layer.magnitude = arrays.get(roles[MAGNITUDE])
                check_magnitude(source, layer, roles[MAGNITUDE])
            if BIAS in roles:
                layer.bias = arrays.get(roles[BIAS])
                if layer.bias.shape != (b.shape[0],):
                    raise FormatError(
                        source.path, f"module {module!r}: lora bias has shape {layer.bias.shape}, expected ({b.shape[0]},)"
                    )
            _place_factors(source, layer, key_a, key_b, roles)
            layers.append(layer)
    return layers


def _place_factors(source: TensorSource, layer: LoraLayer, key_a: str, key_b: str, roles: dict[str, str]) -> None:
    """Hand the checked arrays to the source's `place`, one layer at a time, so the
    float32 arrays read for the checks never pile up (see `source.Place`)."""
    # the layer holds the checked arrays (or bits, `keep_stored`) as they were read until here
    layer.a = source.place(storable(layer.a), source.dtype(key_a))
    layer.b = source.place(storable(layer.b), source.dtype(key_b))
    if layer.magnitude is not None:
        layer.magnitude = source.place(storable(layer.magnitude), source.dtype(roles[MAGNITUDE]))
    if layer.bias is not None:
        layer.bias = source.place(storable(layer.bias), source.dtype(roles[BIAS]))


def finite_number(value: object) -> float | None:
    """`value` as a float if it is a finite JSON number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # a 400-digit integer
        return None
    return number if math.isfinite(number) else None


def json_number(value: float) -> int | float:
    """An alpha as JSON: 16 rather than 16.0 when integral, as PEFT configs carry it."""
    return int(value) if float(value).is_integer() else float(value)


def scalar_alpha(source: TensorSource, key: str) -> float:
    """A per-module `.alpha` tensor: one finite number, stored as any float or int dtype."""
    if source.dtype(key) not in NUMERIC_DTYPES:
        raise FormatError(source.path, f"tensor {key!r}: alpha has non-numeric dtype {source.dtype(key)}")
    value = np.asarray(source.numpy(key), dtype=np.float64)
    if value.size != 1:
        raise FormatError(source.path, f"tensor {key!r}: alpha must be a scalar, has shape {value.shape}")
    alpha = float(value.reshape(()))
    if not np.isfinite(alpha):
        raise FormatError(source.path, f"tensor {key!r}: alpha is {alpha}")
    return alpha


def check_factor_shapes(source: TensorSource, module: str, a: Factor, b: Factor, embedding: bool) -> None:
    """A is (r, in, ...) and B is (out, r, 1, ...): the two r must agree."""
    if a.ndim < 2 or b.ndim < 2:
        raise FormatError(source.path, f"module {module!r}: factors must be at least 2-D, got {a.shape} and {b.shape}")
    if a.shape[0] == 0:
        raise FormatError(source.path, f"module {module!r}: rank 0 (factors {tuple(a.shape)} and {tuple(b.shape)})")
    if b.shape[1] != a.shape[0]:
        raise FormatError(
            source.path,
            f"module {module!r}: ranks disagree (A {tuple(a.shape)} has r={a.shape[0]}, B {tuple(b.shape)} has r={b.shape[1]})",
        )
    if a.size == 0 or b.size == 0:  # r would be unbounded by the file's size (A of shape (2**40, 0))
        raise FormatError(
            source.path, f"module {module!r}: empty factors (A {tuple(a.shape)}, B {tuple(b.shape)} have a zero dimension)"
        )
    if embedding and (a.ndim != 2 or b.ndim != 2):
        raise FormatError(source.path, f"module {module!r}: embedding factors must be 2-D")
    if b.ndim > 2 and any(d != 1 for d in b.shape[2:]):
        raise FormatError(source.path, f"module {module!r}: up/B factor {tuple(b.shape)} must have a 1×1 kernel")


def check_magnitude(source: TensorSource, layer: LoraLayer, key: str) -> None:
    """DoRA's magnitude has one entry per output feature of the base weight."""
    assert layer.magnitude is not None
    out_features = layer.b.shape[0]
    if layer.magnitude.size != out_features:
        raise FormatError(
            source.path,
            f"tensor {key!r}: DoRA magnitude has {layer.magnitude.size} entries, expected {out_features}",
        )
