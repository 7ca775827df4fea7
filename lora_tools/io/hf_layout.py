"""The Hugging Face files around the weights: config.json as a base describes itself
(`read_base_config`), and what must follow a change of dtype: the index's total_size and
config.json's dtype."""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from lora_tools.io.checkpoint import INDEX_NAME, BaseCheckpoint
from lora_tools.io.dtypes import CONFIG_DTYPE_NAMES, DTYPE_ITEMSIZE, FLOAT_DTYPES
from lora_tools.io.extra_files import copy_extra_files


def read_base_config(base: str | os.PathLike[str]) -> dict[str, Any]:
    """The base's config.json (in its folder, or next to a single weights file) as a dict;
    FormatError naming the file when it is missing or not a JSON object."""
    from lora_tools.errors import FormatError
    from lora_tools.io.checkpoint import read_regular

    where = Path(base)
    path = where / "config.json" if where.is_dir() else where.parent / "config.json"
    if not path.exists():
        raise FormatError(base, f"has no config.json ({path}): it names the model's architecture")
    try:
        config = json.loads(read_regular(path).decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise FormatError(path, f"is not JSON ({error})") from None
    except OSError as error:
        raise FormatError(path, f"cannot be read ({error.strerror or error})") from None
    if not isinstance(config, dict):
        raise FormatError(path, "is not a JSON object")
    return config


def update_config_dtype(out_dir: Path, out_code: str | None, *, dequantized: bool = False) -> None:
    """After --dtype, config.json must say the dtype the weights now have.

    transformers reads `torch_dtype` (`dtype` since v5) to pick the load dtype with
    dtype="auto"; a stale float32 there would upcast a bf16 merge on load.
    `dequantized`: the FP8 weights were written as `out_code` floats (bf16 if None), so
    the config must no longer claim a quantization (transformers would look for scales).
    """
    config_path = out_dir / "config.json"
    if dequantized:
        out_code = out_code or "BF16"
    if out_code is None or not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # JSONDecodeError, 5000-digit ints, deep nesting
        return  # not ours to judge: it was copied byte for byte
    if not isinstance(config, dict):
        return
    if dequantized:
        config.pop("quantization_config", None)
    name = CONFIG_DTYPE_NAMES[out_code]
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_index(
    base: BaseCheckpoint, out_dir: Path, out_code: str | None,
    out_codes: Mapping[str, str] | None = None, dropped: Collection[str] = (),
) -> None:
    """The index: copied as is, unless a dtype change alters total_size or tensors were
    left out (`dropped`; `out_codes`: particular tensors' new dtypes, as the stream's).

    total_size is what transformers writes: the bytes of the tensors, headers excluded.
    """
    source = base.path / INDEX_NAME
    if not source.exists():
        return
    out_codes = out_codes or {}
    if out_code is None and not out_codes and not dropped:
        copy_extra_files(base.path, [INDEX_NAME], out_dir)
        return
    index = json.loads(source.read_text(encoding="utf-8"))
    total = 0
    for name in base.tensor_names():
        if name in dropped:
            continue
        info = base.info(name)
        code = out_codes.get(name) or (out_code if out_code is not None and info.dtype in FLOAT_DTYPES else info.dtype)
        total += info.numel * DTYPE_ITEMSIZE[code]
    weight_map = index.get("weight_map")
    if isinstance(weight_map, dict):
        index["weight_map"] = {k: v for k, v in weight_map.items() if k not in dropped}
    index.setdefault("metadata", {})["total_size"] = total
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
