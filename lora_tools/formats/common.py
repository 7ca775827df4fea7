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

from lora_tools.adapter import LoraLayer
from lora_tools.errors import FormatError
from lora_tools.formats.source import SafetensorsSource, TensorSource, finite_factor
from lora_tools.io.dtypes import FLOAT_DTYPES, NUMERIC_DTYPES, NUMPY_DTYPE

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
    layers = []
    for module, roles in groups.modules.items():
        embedding = EMB_A in roles or EMB_B in roles
        key_a, key_b = (roles.get(EMB_A), roles.get(EMB_B)) if embedding else (roles.get(A), roles.get(B))
        if key_a is None or key_b is None:
            present = next(iter(roles.values()))
            missing = "A (down)" if key_a is None else "B (up)"
            raise FormatError(source.path, f"module {module!r}: has {present!r} but no LoRA {missing} factor")
        a = finite_factor(source, key_a)
        b = finite_factor(source, key_b)
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
            layer.magnitude = finite_factor(source, roles[MAGNITUDE])
            check_magnitude(source, layer, roles[MAGNITUDE])
        if BIAS in roles:
            layer.bias = finite_factor(source, roles[BIAS])
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
    # the layer holds the checked numpy arrays until here (np.asarray returns them as they are)
    layer.a = source.place(np.asarray(layer.a), source.dtype(key_a))
    layer.b = source.place(np.asarray(layer.b), source.dtype(key_b))
    if layer.magnitude is not None:
        layer.magnitude = source.place(np.asarray(layer.magnitude), source.dtype(roles[MAGNITUDE]))
    if layer.bias is not None:
        layer.bias = source.place(np.asarray(layer.bias), source.dtype(roles[BIAS]))


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


def check_factor_shapes(source: TensorSource, module: str, a: np.ndarray, b: np.ndarray, embedding: bool) -> None:
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


# Stored float code -> (its bits as an unsigned int, the exponent mask): a value is NaN or
# Inf exactly when every exponent bit is set (IEEE 754 binary16/32/64 and bfloat16).
_EXPONENT_BITS: dict[str, tuple[str, int]] = {
    "F64": ("<u8", 0x7FF0_0000_0000_0000), "F32": ("<u4", 0x7F80_0000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80),
}
FINITE_BLOCK_BYTES = 4 << 20


def finite_in_blocks(source: TensorSource, key: str) -> np.ndarray:
    """`finite_factor` for whole tensors (modules_to_save, an 8B lm_head is 1 GB of bf16):
    the same array and the same refusals, but the NaN/Inf check runs on the stored bits one
    block of FINITE_BLOCK_BYTES at a time, and the result is filled in place, so reading
    costs the result plus one block instead of the raw bytes, a widened copy and a mask."""
    code = source.dtype(key)
    if code not in FLOAT_DTYPES:
        raise FormatError(source.path, f"tensor {key!r} has non-float dtype {code}")
    if not isinstance(source, SafetensorsSource) or code not in _EXPONENT_BITS:
        return finite_factor(source, key)  # a pickle is in memory already
    bits_dtype, mask = _EXPONENT_BITS[code]
    info = source.file.info(key)
    out = np.empty(info.numel, dtype=np.float32 if code == "BF16" else NUMPY_DTYPE[code])
    itemsize = np.dtype(bits_dtype).itemsize
    step = max(1, FINITE_BLOCK_BYTES // itemsize)
    scratch = np.empty(min(step, info.numel), dtype=bits_dtype) if code == "BF16" else None
    for start in range(0, info.numel, step):
        count = min(step, info.numel - start)
        # bf16 is read into scratch and widened exactly (its bits are a float32's top half)
        bits = scratch[:count] if scratch is not None else out[start:start + count].view(bits_dtype)
        source.file.read_into(key, bits, start * itemsize)
        if np.any(np.bitwise_and(bits, mask) == mask):
            raise FormatError(source.path, f"tensor {key!r} contains NaN or Inf")
        if scratch is not None:
            np.left_shift(bits, 16, out=out[start:start + count].view(np.uint32), dtype=np.uint32)
    return out.reshape(info.shape)


def check_magnitude(source: TensorSource, layer: LoraLayer, key: str) -> None:
    """DoRA's magnitude has one entry per output feature of the base weight."""
    assert layer.magnitude is not None
    out_features = layer.b.shape[0]
    if layer.magnitude.size != out_features:
        raise FormatError(
            source.path,
            f"tensor {key!r}: DoRA magnitude has {layer.magnitude.size} entries, expected {out_features}",
        )
