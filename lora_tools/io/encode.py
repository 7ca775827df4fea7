"""Encoding numpy arrays as safetensors tensors and writing them as one file, numpy only.

Format-free: the key names and header metadata are the caller's (see lora_tools.formats).
Why numpy and not safetensors.torch: the factored blend must not pay torch's import
(≈ 1.3 s). Tensors are encoded here (bf16 by rounding float32 bits to nearest even) and
laid out with `stream_writer.build_header` through the streaming writer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import numpy as np

from lora_tools.io.dtypes import FLOAT_DTYPES, NUMPY_DTYPE

__all__ = ["WRITABLE_DTYPES", "WriteError", "encode_array", "float32_to_bf16_bits", "stored_values", "write_safetensors"]

WRITABLE_DTYPES = ("F64", "F32", "F16", "BF16")  # the float dtypes (FLOAT_DTYPES), in the order messages list them


class WriteError(ValueError):
    """The layers cannot be written in the requested format (a caller's mistake or an
    unrepresentable value); callers turn it into a LoraToolsError naming the output."""


# Elements encoded at a time: the float32 copy and its carry bits stay in cache, and no
# whole-tensor temporaries are allocated (their page faults cost more than the arithmetic).
_CHUNK = 1 << 16


def _bf16_chunks(values: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, bf16 bit patterns) of `values` flattened, _CHUNK elements at a time, each
    chunk in one reused uint16 buffer (valid until the next one is asked for): the rounding
    of `float32_to_bf16_bits`, without any whole-tensor array."""
    flat = np.ascontiguousarray(values).reshape(-1)
    f32 = np.empty(min(_CHUNK, flat.size), dtype="<f4")
    bits, carry = f32.view("<u4"), np.empty(f32.size, dtype="<u4")
    out = np.empty(f32.size, dtype="<u2")
    with np.errstate(over="ignore", invalid="ignore"):
        for lo in range(0, flat.size, _CHUNK):
            n = min(_CHUNK, flat.size - lo)
            chunk, chunk_bits, chunk_carry = f32[:n], bits[:n], carry[:n]
            np.copyto(chunk, flat[lo:lo + n], casting="unsafe")
            infinite = ~np.isfinite(chunk)
            np.right_shift(chunk_bits, 16, out=chunk_carry)
            np.bitwise_and(chunk_carry, 1, out=chunk_carry)
            chunk_carry += 0x7FFF
            chunk_bits += chunk_carry
            chunk_bits >>= 16
            chunk_bits[infinite] = 0x7F80  # NaN and ±inf (whose carry may wrap) as +inf
            np.copyto(out[:n], chunk_bits, casting="unsafe")
            yield lo, out[:n]


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of `values` (any float dtype, rounded to float32 first,
    as torch's `.to(bfloat16)` does for float64), rounded to nearest, ties to even.

    bf16 is the top half of a float32: add 0x7FFF plus the lowest kept bit, then drop the
    low 16 bits (no uint32 overflow for finite values: 0xFF7FFFFF + 0x8000 < 2³²).
    Finite inputs only: a non-finite value, or one that rounds past bf16's largest finite
    number, gives an exponent of all ones (inf or NaN), which `encode_array` refuses.
    """
    out = np.empty(np.size(values), dtype="<u2")
    for lo, chunk in _bf16_chunks(values):
        out[lo:lo + chunk.size] = chunk
    return out.reshape(np.shape(values))


def _bf16_finite(encoded: np.ndarray) -> bool:
    """No bf16 pattern with an exponent of all ones (inf, NaN)."""
    flat = encoded.reshape(-1)
    return not any(bool(((flat[lo:lo + _CHUNK] & 0x7F80) == 0x7F80).any()) for lo in range(0, flat.size, _CHUNK))


def _overflow(values: np.ndarray, dtype: str, name: str) -> WriteError:
    return WriteError(f"{name}: values overflow {dtype} (largest |value| {float(np.max(np.abs(values))):.4g}); use F32 or BF16")


def encode_array(values: np.ndarray, dtype: str, name: str = "tensor") -> np.ndarray:
    """`values` as a contiguous little-endian array whose bytes are the safetensors `dtype`.

    float64 goes to bf16 through float32 (two roundings, as torch's `.to(bfloat16)` does);
    a value that does not fit the dtype (fp16 beyond ±65504) raises WriteError.
    """
    if dtype == "BF16":
        encoded = float32_to_bf16_bits(values)
        finite = _bf16_finite(encoded)
    elif dtype in FLOAT_DTYPES:
        encoded = np.ascontiguousarray(values, dtype=NUMPY_DTYPE[dtype])
        finite = bool(np.isfinite(encoded).all())
    else:
        raise WriteError(f"{name}: cannot write dtype {dtype!r} (use one of {', '.join(WRITABLE_DTYPES)})")
    if not finite:
        raise _overflow(values, dtype, name)
    return encoded


def _encoded_chunks(values: np.ndarray, dtype: str, name: str) -> Iterator[np.ndarray]:
    """`encode_array`'s bytes in pieces: bf16 chunk by chunk through one reused buffer
    (a 1B adapter's whole encoded copy is ~80 MB of fresh pages, which cost more than the
    rounding), other dtypes whole; WriteError as soon as a chunk does not fit."""
    if dtype != "BF16":
        yield encode_array(values, dtype, name)
        return
    for _, chunk in _bf16_chunks(values):
        if _bf16_finite(chunk):
            yield chunk
        else:
            raise _overflow(values, dtype, name)


def stored_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` as a reader gets them back once written as `dtype` (bf16 as float32,
    exactly, the way `SafetensorsFile.numpy` widens it): what a written file must hold."""
    encoded = encode_array(values, dtype)
    if dtype == "BF16":
        return (encoded.astype(np.uint32) << 16).view(np.float32)
    return encoded


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, tuple[np.ndarray, str]], metadata: Mapping[str, str] | None = None
) -> None:
    """Write {name: (array, dtype code)} as one safetensors file, laid out the way
    safetensors itself orders tensors (dtype, then name). `path` must not exist."""
    # Imported here: the format modules import this one, and reading never needs the writer.
    from lora_tools.io.stream_writer import SafetensorsStreamWriter, safetensors_order

    entries = safetensors_order(
        [(name, tensors[name][1], tuple(int(d) for d in np.shape(tensors[name][0]))) for name in tensors]
    )
    with SafetensorsStreamWriter(path, entries, metadata) as writer:
        for name, _, _ in entries:
            array, dtype = tensors[name]
            writer.write_chunks(name, (chunk.data.cast("B") for chunk in _encoded_chunks(array, dtype, name)))
