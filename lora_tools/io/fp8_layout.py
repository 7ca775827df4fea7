"""Which tensors of a checkpoint are FP8 weights, which tensor scales each, in what blocks.

Read from the checkpoint's config.json (`quantization_config`) and its tensors, and
checked completely when the checkpoint is opened, so that a merge into an FP8 base
whose scales are missing or of the wrong shape fails before anything is written.
What counts (FORMATS.md, checked against transformers 5 and compressed-tensors):

- "quant_method": "fp8" (transformers' FineGrainedFP8Config): `X.weight` in e4m3 and
  `X.weight_scale_inv` (any float dtype) of ⌈rows/bo⌉ × ⌈cols/bi⌉, block from
  `weight_block_size` (none: one scale per tensor); `scale_fmt: "ue8m0"` = power-of-two
  scales.
- "quant_method": "compressed-tensors", format "float-quantized": `X.weight` in e4m3
  and `X.weight_scale` per tensor (1), channel (rows, 1), group (rows, ⌈cols/g⌉) or block,
  as its config groups declare; `input_scale`, `k_scale`, `v_scale` are activation
  scales; an asymmetric scheme (`weight_zero_point`) is refused.
- No quantization_config: an FP8 tensor with `_scale_inv` is taken as DeepSeek's
  128×128 blocks, one with `_scale` as compressed-tensors' (block from the scale's shape).
Any other quant_method (gptq, awq, bitsandbytes, …) is refused: its weights are not
what a LoRA update can be added to.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from lora_tools.errors import FormatError
from lora_tools.io.dtypes import SCALE_DTYPES
from lora_tools.io.fp8 import FP8_CODES, Block, ScaleRule, scale_grid
from lora_tools.io.safetensors_file import TensorInfo

BLOCK_METHOD = "fp8"
COMPRESSED_METHOD = "compressed-tensors"
DEEPSEEK_BLOCK: Block = (128, 128)

# Tensors that hold scales or activation parameters, not weights (by name ending).
_SCALE_SUFFIXES = ("_scale_inv", "_scale")
_ACTIVATION_SUFFIXES = (".input_scale", ".activation_scale", ".k_scale", ".v_scale", ".output_scale")


@dataclass(frozen=True)
class ScaledWeight:
    """One FP8 weight and the tensor holding its scales."""

    name: str
    scale: str
    block: Block


@dataclass(frozen=True)
class Fp8Layout:
    """A checkpoint's FP8 weights. `aux`: every scale and activation-scale tensor, which
    is dropped from a dequantized copy and never bound to an adapter layer."""

    method: str
    weights: Mapping[str, ScaledWeight]
    aux: frozenset[str]
    rule: ScaleRule
    config_path: Path | None

    def scale_of(self, weight: str) -> str:
        return self.weights[weight].scale

    @cached_property
    def owners(self) -> Mapping[str, str]:
        """Scale tensor → the FP8 weight it scales (built once: verify asks per tensor)."""
        return {w.scale: w.name for w in self.weights.values()}


def config_path_of(base: Path, is_dir: bool) -> Path:
    return base / "config.json" if is_dir else base.parent / "config.json"


def read_quantization_config(path: Path) -> dict[str, Any] | None:
    """config.json's quantization_config (None when absent). A config.json that cannot be
    read or parsed is not this module's concern unless the weights need it: None."""
    try:
        config = json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict):
        return None
    quant = config.get("quantization_config")
    return quant if isinstance(quant, dict) else None


def fp8_layout(
    names: Iterable[str],
    info: Callable[[str], TensorInfo],
    where: Callable[[str], Path],
    config_path: Path,
) -> Fp8Layout | None:
    """The layout of a checkpoint with these tensors (`info`, `where` = the file holding
    one, for messages), or None when it holds no FP8 weight; FormatError for a
    quantization this cannot read or an FP8 weight whose scales are missing or misshaped."""
    names = list(names)
    present = set(names)
    quant = read_quantization_config(config_path)
    method = quant.get("quant_method") if quant is not None else None
    if method is not None and method not in (BLOCK_METHOD, COMPRESSED_METHOD):
        raise FormatError(
            config_path,
            f"quantization_config.quant_method {method!r} is not supported: lora-tools reads FP8 checkpoints "
            f"({BLOCK_METHOD!r}, {COMPRESSED_METHOD!r} float-quantized) and unquantized ones",
        )
    if method == COMPRESSED_METHOD and quant is not None:
        _check_compressed_format(quant, config_path)
    fp8_names = [n for n in names if info(n).dtype in FP8_CODES]
    if not fp8_names:
        return None
    for name in names:
        if name.endswith(".weight_zero_point"):
            raise FormatError(where(name), f"tensor {name!r}: asymmetric FP8 (a zero point) is not supported")
    blocks = _declared_blocks(quant, method, config_path)
    weights: dict[str, ScaledWeight] = {}
    for name in fp8_names:
        weights[name] = _scaled_weight(name, info, where, present, method, blocks)
    aux = {w.scale for w in weights.values()}
    aux |= {n for n in names if n.endswith(_ACTIVATION_SUFFIXES) or _is_orphan_scale(n, info, present)}
    guessed = method or (BLOCK_METHOD if any(w.scale.endswith("_scale_inv") for w in weights.values()) else COMPRESSED_METHOD)
    rule = ScaleRule(multiplier_first=guessed == BLOCK_METHOD, power_of_two=bool(quant and quant.get("scale_fmt") == "ue8m0"))
    return Fp8Layout(guessed, weights, frozenset(aux), rule, config_path if quant is not None else None)


def _check_compressed_format(quant: Mapping[str, Any], config_path: Path) -> None:
    formats = {quant.get("format")} | {
        g.get("format") for g in (quant.get("config_groups") or {}).values() if isinstance(g, dict)
    }
    unsupported = sorted(str(f) for f in formats - {None, "float-quantized", "naive-quantized"})
    if unsupported:
        raise FormatError(
            config_path,
            f"compressed-tensors format {unsupported[0]!r} is not supported (only float-quantized FP8 weights)",
        )


def _declared_blocks(quant: Mapping[str, Any] | None, method: str | None, config_path: Path) -> list[Block | str]:
    """The blocks the config declares, in order; "tensor" and "channel" stand for blocks
    that depend on the weight's shape. Empty: infer from the scale's shape."""
    if quant is None:
        return []
    if method == BLOCK_METHOD:
        size = quant.get("weight_block_size", list(DEEPSEEK_BLOCK))
        if size is None:
            return ["tensor"]
        return [_block_from(size, config_path, "weight_block_size")]
    blocks: list[Block | str] = []
    for group in (quant.get("config_groups") or {}).values():
        args = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(args, dict):
            continue
        if args.get("symmetric") is False:
            raise FormatError(config_path, "asymmetric FP8 weights (symmetric: false) are not supported")
        strategy = args.get("strategy")
        if strategy in ("tensor", "channel"):
            blocks.append(strategy)
        elif strategy == "group":
            blocks.append((1, _positive(args.get("group_size"), config_path, "group_size")))
        elif strategy == "block":
            blocks.append(_block_from(args.get("block_structure"), config_path, "block_structure"))
        elif strategy is not None:
            raise FormatError(config_path, f"weight quantization strategy {strategy!r} is not supported")
    return blocks


def _positive(value: Any, config_path: Path, key: str) -> int:
    if type(value) is not int or value <= 0:
        raise FormatError(config_path, f"{key} {value!r} is not a positive integer")
    return value


def _block_from(value: Any, config_path: Path, key: str) -> Block:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise FormatError(config_path, f"{key} {value!r} is not [rows, cols]")
    return _positive(value[0], config_path, key), _positive(value[1], config_path, key)


def _concrete(block: Block | str, shape: tuple[int, int]) -> Block:
    if block == "tensor":
        return max(1, shape[0]), max(1, shape[1])
    if block == "channel":
        return 1, max(1, shape[1])
    assert not isinstance(block, str)
    return block


def _scaled_weight(
    name: str,
    info: Callable[[str], TensorInfo],
    where: Callable[[str], Path],
    present: set[str],
    method: str | None,
    declared: list[Block | str],
) -> ScaledWeight:
    weight = info(name)
    suffixes = {BLOCK_METHOD: ("_scale_inv",), COMPRESSED_METHOD: ("_scale",)}.get(method or "", _SCALE_SUFFIXES)
    scale = next((name + s for s in suffixes if name + s in present), None)
    if scale is None:
        expected = " or ".join(repr(name + s) for s in suffixes)
        raise FormatError(where(name), f"tensor {name!r} is FP8 ({weight.dtype}) but the checkpoint has no scale {expected}")
    if len(weight.shape) != 2:
        raise FormatError(where(name), f"FP8 tensor {name!r} has {len(weight.shape)} dimensions; only 2-D weights are supported")
    scale_info = info(scale)
    if scale_info.dtype not in SCALE_DTYPES:
        raise FormatError(where(scale), f"scale {scale!r} is {scale_info.dtype}, not a float tensor")
    shape = (weight.shape[0], weight.shape[1])
    candidates = [_concrete(b, shape) for b in declared] or _inferred_blocks(scale, scale_info.shape, shape)
    for block in candidates:
        if _scale_fits(scale_info.shape, scale_grid(shape, block)):
            return ScaledWeight(name, scale, block)
    wanted = " or ".join(str(list(scale_grid(shape, b))) for b in candidates)
    blocks = " or ".join(str(list(b)) for b in candidates)
    raise FormatError(
        where(scale),
        f"scale {scale!r} has shape {list(scale_info.shape)}; weight {name!r} of shape {list(shape)} "
        f"in blocks of {blocks} needs {wanted}",
    )


def _inferred_blocks(scale: str, scale_shape: tuple[int, ...], shape: tuple[int, int]) -> list[Block]:
    """Without a config: DeepSeek's 128×128 for `_scale_inv`; for `_scale`, what the
    scale's shape says (one value: per tensor; a column: per channel; else exact blocks)."""
    if scale.endswith("_scale_inv"):
        return [DEEPSEEK_BLOCK]
    whole = (max(1, shape[0]), max(1, shape[1]))
    if len(scale_shape) == 2 and scale_shape[0] and scale_shape[1] and scale_shape != (1, 1):
        grid_rows, grid_cols = scale_shape
        return [(1, whole[1]) if grid_cols == 1 and grid_rows == shape[0] else (-(-shape[0] // grid_rows), -(-shape[1] // grid_cols))]
    return [whole]


def _scale_fits(scale_shape: tuple[int, ...], grid: tuple[int, int]) -> bool:
    """A grid of one is also stored as () or (1,) (a per-tensor scale)."""
    if tuple(scale_shape) == grid:
        return True
    return grid == (1, 1) and tuple(scale_shape) in ((), (1,))


def _is_orphan_scale(name: str, info: Callable[[str], TensorInfo], present: set[str]) -> bool:
    """A `X.weight_scale(_inv)` beside a weight that is not FP8 (a partly dequantized
    checkpoint): still a scale, never a weight."""
    for suffix in _SCALE_SUFFIXES:
        if name.endswith(".weight" + suffix):
            return name[: -len(suffix)] in present
    return False
