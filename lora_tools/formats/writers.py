"""Writing adapters: PEFT adapter folders and kohya `.safetensors` files, numpy only.

Key names are this package's business (see peft.py / kohya.py for the reading side):
- PEFT: `base_model.model.<module>.lora_A.weight` (r, in[, *k]), `….lora_B.weight`
  (out, r[, 1…]), `….lora_B.bias` under lora_bias, embeddings `….lora_embedding_A` /
  `….lora_embedding_B` (no `.weight`), modules_to_save copies as
  `base_model.model.<module>.weight`; `adapter_config.json` beside it.
- kohya: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (0-d).

Why numpy and not safetensors.torch: the factored blend must not pay torch's import
(≈ 1.3 s). Tensors are encoded here (bf16 by rounding float32 bits to nearest even) and
laid out with `output.build_header` through the streaming writer.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.adapter import LoraLayer
from lora_tools.formats.kohya import KOHYA_PREFIXES
from lora_tools.formats.peft import PEFT_PREFIX
from lora_tools.io.stream_writer import SafetensorsStreamWriter, safetensors_order

__all__ = ["encode_array", "float32_to_bf16_bits", "write_kohya", "write_peft_adapter", "write_safetensors"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
WRITABLE_DTYPES = ("F64", "F32", "F16", "BF16")
_NUMPY_CODES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
_PLAIN_NAME = re.compile(r"^[\w.]+$")


class WriteError(ValueError):
    """The layers cannot be written in the requested format (a caller's mistake or an
    unrepresentable value); callers turn it into a LoraToolsError naming the output."""


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of float32 values, rounded to nearest, ties to even.

    bf16 is the top half of a float32: add 0x7FFF plus the lowest kept bit, then drop the
    low 16 bits. Finite inputs only (NaN payloads are not preserved); values that round
    past bf16's largest finite number become ±inf, which `encode_array` refuses.
    """
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def encode_array(values: np.ndarray, dtype: str, name: str = "tensor") -> np.ndarray:
    """`values` as a contiguous little-endian array whose bytes are the safetensors `dtype`.

    float64 goes to bf16 through float32 (two roundings, as torch's `.to(bfloat16)` does);
    a value that does not fit the dtype (fp16 beyond ±65504) raises WriteError.
    """
    if dtype == "BF16":
        f32 = np.asarray(values, dtype=np.float32)
        encoded = float32_to_bf16_bits(f32)
        decoded = (encoded.astype(np.uint32) << 16).view(np.float32)
    elif dtype in _NUMPY_CODES:
        encoded = np.ascontiguousarray(values, dtype=_NUMPY_CODES[dtype])
        decoded = encoded
    else:
        raise WriteError(f"{name}: cannot write dtype {dtype!r} (use one of {', '.join(WRITABLE_DTYPES)})")
    if not np.isfinite(decoded).all():
        raise WriteError(f"{name}: values overflow {dtype} (largest |value| {float(np.max(np.abs(values))):.4g}); use F32 or BF16")
    return encoded


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, tuple[np.ndarray, str]], metadata: Mapping[str, str] | None = None
) -> None:
    """Write {name: (array, dtype code)} as one safetensors file, laid out the way
    safetensors itself orders tensors (dtype, then name). `path` must not exist."""
    encoded = {name: encode_array(array, dtype, name) for name, (array, dtype) in tensors.items()}
    entries = safetensors_order(
        [(name, tensors[name][1], tuple(int(d) for d in np.shape(tensors[name][0]))) for name in tensors]
    )
    with SafetensorsStreamWriter(path, entries, metadata) as writer:
        for name, _, _ in entries:
            writer.write_bytes(name, memoryview(encoded[name]).cast("B"))


# -- PEFT ---------------------------------------------------------------------------


def _number(value: float) -> int | float:
    """An alpha as JSON: 16 rather than 16.0 when integral, as PEFT configs carry it."""
    return int(value) if float(value).is_integer() else float(value)


def _pattern_key(name: str) -> str:
    """A rank/alpha_pattern key for exactly this module. PEFT matches keys with
    re.match(rf"(.*\\.)?({key})$", path) (peft.utils.other.get_pattern_key): a full dotted
    path matches itself, and another path only if it differed in the very characters
    its dots stand for, which module paths never do. So it is written as is (readable,
    and right for tools that compare keys as strings), escaped only if it holds others."""
    return name if _PLAIN_NAME.match(name) else re.escape(name)


def _most_common(values: Sequence[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def peft_config(
    layers: Sequence[LoraLayer],
    base_model_name_or_path: str | None,
    *,
    target_modules: list[str] | str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """adapter_config.json for `layers`: r / lora_alpha are the most common values and
    rank_pattern / alpha_pattern list the layers that differ, keyed by module path.

    target_modules defaults to the sorted module paths themselves: exact whatever the
    base, so PEFT creates LoRA layers for exactly these modules (no missing keys).
    `extra` adds or overrides fields (task_type, revision, modules_to_save, bias).
    """
    if not layers:
        raise WriteError("no layers to write")
    if len({layer.use_rslora for layer in layers}) != 1:
        raise WriteError("layers mix rsLoRA and plain scaling; fold the scale first")
    linear_fifo = {layer.fan_in_fan_out for layer in layers if layer.kind == "linear"}
    if len(linear_fifo) > 1:
        raise WriteError("layers mix fan_in_fan_out true and false")
    ranks = [layer.rank for layer in layers]
    alphas = [float(layer.alpha) for layer in layers]
    r, lora_alpha = _most_common(ranks), _most_common(alphas)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": _number(lora_alpha),
        "rank_pattern": {_pattern_key(l.name): l.rank for l in layers if l.rank != r},
        "alpha_pattern": {_pattern_key(l.name): _number(l.alpha) for l in layers if float(l.alpha) != lora_alpha},
        "target_modules": target_modules if target_modules is not None else sorted(l.name for l in layers),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_rslora": layers[0].use_rslora,
        "use_dora": False,
        "fan_in_fan_out": bool(linear_fifo and linear_fifo.pop()),
        "lora_bias": any(layer.bias is not None for layer in layers),
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,  # never PiSSA/OLoRA-style inits: they would rewrite the base on load
        "inference_mode": True,
    }
    config.update(extra or {})
    return config


def peft_tensors(layers: Sequence[LoraLayer], dtype: str) -> dict[str, tuple[np.ndarray, str]]:
    """The state dict PEFT's save_pretrained would write for these layers."""
    tensors: dict[str, tuple[np.ndarray, str]] = {}
    with_bias = any(layer.bias is not None for layer in layers)
    for layer in layers:
        if layer.magnitude is not None:
            raise WriteError(f"layer {layer.name!r}: DoRA layers cannot be written by this writer")
        prefix = PEFT_PREFIX + layer.name
        if layer.kind == "embedding":
            if with_bias:
                raise WriteError(f"layer {layer.name!r}: PEFT has no lora_bias for embeddings")
            tensors[f"{prefix}.lora_embedding_A"] = (layer.a, dtype)
            tensors[f"{prefix}.lora_embedding_B"] = (layer.b, dtype)
            continue
        tensors[f"{prefix}.lora_A.weight"] = (layer.a, dtype)
        tensors[f"{prefix}.lora_B.weight"] = (layer.b, dtype)
        if with_bias:  # lora_bias=True gives every LoRA layer a lora_B bias
            bias = layer.bias if layer.bias is not None else np.zeros(layer.b.shape[0])
            tensors[f"{prefix}.lora_B.bias"] = (bias, dtype)
    return tensors


def write_peft_adapter(
    layers: Sequence[LoraLayer],
    path: str | os.PathLike[str],
    base_model_name_or_path: str | None,
    *,
    dtype: str = "F32",
    full_tensors: Mapping[str, np.ndarray] | None = None,
    full_tensor_dtype: str | None = None,
    base_copies: Mapping[str, np.ndarray] | None = None,
    target_modules: list[str] | str | None = None,
    config_extra: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write a PEFT adapter folder at `path` (created; it must not exist) and return its config.

    Layers are written as given (their alpha, rank and scale rule); the factors are
    stored in `dtype`, full tensors (modules_to_save, keyed `<module>.weight`) and copies
    of base weights (save_embedding_layers, written as `<module>.base_layer.weight`, which
    PEFT loads over the base's) in `full_tensor_dtype` or `dtype`.
    """
    folder = Path(path)
    config = peft_config(layers, base_model_name_or_path, target_modules=target_modules, extra=config_extra)
    tensors = peft_tensors(layers, dtype)
    for key, tensor in (full_tensors or {}).items():
        tensors[PEFT_PREFIX + key] = (tensor, full_tensor_dtype or dtype)
    for key, tensor in (base_copies or {}).items():
        module, _, leaf = key.rpartition(".")
        tensors[f"{PEFT_PREFIX}{module}.base_layer.{leaf}"] = (tensor, full_tensor_dtype or dtype)
    folder.mkdir()
    write_safetensors(folder / PEFT_WEIGHTS, tensors, {"format": "pt", **(metadata or {})})
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return config


# -- kohya --------------------------------------------------------------------------


def write_kohya(
    layers: Sequence[LoraLayer],
    path: str | os.PathLike[str],
    *,
    dtype: str = "F16",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a kohya sd-scripts LoRA file (`path` must not exist).

    kohya knows one scale rule, s = alpha / r, so each layer's alpha is written as
    scale·r: an rsLoRA or alpha-pattern layer keeps its exact update. Names must already
    be kohya names (`lora_unet_…`, `lora_te_…`).
    """
    if not layers:
        raise WriteError("no layers to write")
    tensors: dict[str, tuple[np.ndarray, str]] = {}
    for layer in layers:
        if not layer.name.startswith(KOHYA_PREFIXES):
            raise WriteError(f"layer {layer.name!r} has no kohya name (lora_unet_…, lora_te_…)")
        if layer.magnitude is not None or layer.bias is not None:
            raise WriteError(f"layer {layer.name!r}: kohya LoRA files hold no DoRA magnitude or LoRA bias")
        tensors[f"{layer.name}.lora_down.weight"] = (layer.a, dtype)
        tensors[f"{layer.name}.lora_up.weight"] = (layer.b, dtype)
        tensors[f"{layer.name}.alpha"] = (np.asarray(layer.scale * layer.rank, dtype=np.float32), "F32")
    ranks = {layer.rank for layer in layers}
    alphas = {float(layer.scale * layer.rank) for layer in layers}
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(_number(alphas.pop())) if len(alphas) == 1 else "Dynamic",
        **(metadata or {}),
    }
    write_safetensors(path, tensors, header)
