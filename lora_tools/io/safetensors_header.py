"""A safetensors header checked completely: where every tensor lives, from the header's bytes.

Pure parsing, no I/O (`safetensors_file` reads the bytes): the JSON header maps each name
to {dtype, shape, data_offsets}, plus an optional `__metadata__` of strings. Everything a
forged or corrupt header can get wrong (sizes, offsets past the end, unknown dtypes,
overlapping tensors, duplicate keys, strings no file may hold) is refused here, with the
file named, before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from lora_tools.errors import FormatError
from lora_tools.io.dtypes import DTYPE_ITEMSIZE

__all__ = ["MAX_HEADER_BYTES", "TensorInfo", "parse_header", "require_valid_unicode"]

# Largest header we accept: real headers are a few MB even for 70B checkpoints, and a
# forged length (2**63) must not make us allocate it.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file: absolute byte range, dtype code, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def require_valid_unicode(path: str | os.PathLike[str], text: str, what: str) -> None:
    """Refuse a string that cannot be written back as UTF-8: a lone surrogate such as
    "\\ud800", which JSON and pickles can carry but no file name or header may hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(path, f"{what} {text!r} is not valid Unicode (a lone surrogate)") from None


def parse_header(path: str | os.PathLike[str], raw_header: bytes, data_start: int,
                 data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors and metadata of a header's bytes; `data_start` is the file offset its
    data begins at, `data_len` how many bytes follow it. FormatError names `path`."""
    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except UnicodeDecodeError:
        raise FormatError(path, "header is not UTF-8 (not a safetensors file?)") from None
    except ValueError as exc:
        raise FormatError(path, f"header is not valid JSON ({exc})") from None
    except RecursionError:  # "[[[[…" a million deep
        raise FormatError(path, "header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise FormatError(path, "header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(path, "__metadata__ must map strings to strings")
    for key, value in metadata.items():
        require_valid_unicode(path, key, "__metadata__ key")
        require_valid_unicode(path, value, "__metadata__ value")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        require_valid_unicode(path, name, "tensor name")
        tensors[name] = _parse_entry(path, name, entry, data_start, data_len)
    _check_no_overlap(path, tensors.values())
    return tensors, metadata


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in header")
        seen[key] = value
    return seen


def _parse_entry(path: str | os.PathLike[str], name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(path, f"tensor {name!r}: header entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
        raise FormatError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(path, f"tensor {name!r}: invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise FormatError(path, f"tensor {name!r}: invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_len:
        raise FormatError(path, f"tensor {name!r}: data_offsets {offsets} run past the end of the file (truncated?)")
    expected = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    if end - begin != expected:
        raise FormatError(path, f"tensor {name!r}: {end - begin} bytes stored but shape {shape} of {dtype} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_no_overlap(path: str | os.PathLike[str], infos: Any) -> None:
    last: TensorInfo | None = None
    for info in sorted(infos, key=lambda t: (t.start, t.end)):
        if last is not None and info.start < last.end and info.nbytes and last.nbytes:
            raise FormatError(path, f"tensors {last.name!r} and {info.name!r} overlap in the file")
        last = info if last is None or info.end >= last.end else last
