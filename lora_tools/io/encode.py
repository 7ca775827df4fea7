"""Encoding numpy arrays as safetensors tensors and writing them as one file, numpy only.

Format-free: the key names and header metadata are the caller's (see lora_tools.formats).
Why numpy and not safetensors.torch: the factored blend must not pay torch's import
(≈ 1.3 s). Tensors are encoded here (bf16 by rounding float32 bits to nearest even) and
laid out with `stream_writer.build_header` through the streaming writer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_tools.io.dtypes import FLOAT_DTYPES, NUMPY_DTYPE
from lora_tools.io.kernels import native

if TYPE_CHECKING:
    from concurrent.futures import Future

__all__ = ["WRITABLE_DTYPES", "Deferred", "Encoded", "WriteError", "bf16_finite", "bf16_to_float32", "encode_array", "encode_blocks", "float32_to_bf16_bits", "overflow_error", "storable",
           "stored_values", "write_safetensors"]

WRITABLE_DTYPES = ("F64", "F32", "F16", "BF16")  # the float dtypes (FLOAT_DTYPES), in the order messages list them


class WriteError(ValueError):
    """The layers cannot be written in the requested format (a caller's mistake or an
    unrepresentable value); callers turn it into a LoraToolsError naming the output."""


# Elements encoded at a time: the float32 copy and its carry bits stay in cache, and no
# whole-tensor temporaries are allocated (their page faults cost more than the arithmetic).
_CHUNK = 1 << 16


def _round_bf16(scratch: np.ndarray, carry: np.ndarray, out: np.ndarray) -> None:
    """out[...] = the bf16 bit patterns of float32 `scratch` (consumed: its bits are
    overwritten), rounded to nearest even; NaN and ±inf (whose carry may wrap) as +inf.
    `carry` is uint32 scratch of the same shape; `out` any uint16 array of that shape."""
    bits = scratch.view("<u4")
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(scratch)
    np.right_shift(bits, 16, out=carry)
    np.bitwise_and(carry, 1, out=carry)
    carry += 0x7FFF
    bits += carry
    if finite.all():  # the usual case: the shift writes the result
        np.right_shift(bits, 16, out=out, casting="unsafe")
        return
    bits >>= 16
    bits[~finite] = 0x7F80
    np.copyto(out, bits, casting="unsafe")


def _bf16_chunks(values: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, bf16 bit patterns) of `values` flattened, _CHUNK elements at a time, each
    chunk in one reused uint16 buffer (valid until the next one is asked for): the rounding
    of `float32_to_bf16_bits`, without any whole-tensor array."""
    flat = np.ascontiguousarray(values).reshape(-1)
    f32 = np.empty(min(_CHUNK, flat.size), dtype="<f4")
    carry = np.empty(f32.size, dtype="<u4")
    out = np.empty(f32.size, dtype="<u2")
    kernel = native()
    for lo in range(0, flat.size, _CHUNK):
        n = min(_CHUNK, flat.size - lo)
        with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, refused by the callers
            np.copyto(f32[:n], flat[lo:lo + n], casting="unsafe")
        # the C kernel in one pass; where it finds a value that is not finite, numpy's
        # passes, which give such values the +inf pattern the callers look for
        if kernel is None or not kernel.bf16_round(f32[:n], out[:n]):
            _round_bf16(f32[:n], carry[:n], out[:n])
        yield lo, out[:n]


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bf16 bit patterns (uint16), exactly: each is the top half of its
    float32. The inverse of `float32_to_bf16_bits` on finite values."""
    out = np.empty(bits.shape, dtype="<u4")
    np.left_shift(bits, 16, out=out, dtype="<u4")
    return out.view("<f4")


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


def bf16_finite(encoded: np.ndarray) -> bool:
    """No bf16 pattern with an exponent of all ones (inf, NaN)."""
    flat = encoded.reshape(-1)
    return not any(bool(((flat[lo:lo + _CHUNK] & 0x7F80) == 0x7F80).any()) for lo in range(0, flat.size, _CHUNK))


def overflow_error(values: np.ndarray, dtype: str, name: str) -> WriteError:
    """The refusal of `values` (named `name`) that `dtype` cannot hold, with the largest
    (where the values were already rounded to inf, that they passed the dtype's range)."""
    largest = float(np.max(np.abs(values)))
    what = "a value past its range" if math.isinf(largest) else f"largest |value| {largest:.4g}"
    return WriteError(f"{name}: values overflow {dtype} ({what}); use F32 or BF16")


def encode_array(values: np.ndarray, dtype: str, name: str = "tensor") -> np.ndarray:
    """`values` as a contiguous little-endian array whose bytes are the safetensors `dtype`.

    float64 goes to bf16 through float32 (two roundings, as torch's `.to(bfloat16)` does);
    a value that does not fit the dtype (fp16 beyond ±65504) raises WriteError.
    """
    if dtype == "BF16":
        encoded = float32_to_bf16_bits(values)
        finite = bf16_finite(encoded)
    elif dtype in FLOAT_DTYPES:
        with np.errstate(over="ignore"):  # refused below, in one line, not warned about
            encoded = np.ascontiguousarray(values, dtype=NUMPY_DTYPE[dtype])
        finite = bool(np.isfinite(encoded).all())
    else:
        raise WriteError(f"{name}: cannot write dtype {dtype!r} (use one of {', '.join(WRITABLE_DTYPES)})")
    if not finite:
        raise overflow_error(values, dtype, name)
    return encoded


@dataclass(frozen=True)
class Encoded:
    """A tensor already in its stored form: `bits` holds the bytes of dtype `code`
    (uint16 bit patterns for BF16, the float itself for the others), checked finite.

    Why: resize forms each layer's bf16 factors on its worker threads, block by block,
    and rounds each block while it is still in cache. Kept as float32 until the writer
    encodes them, a 1B adapter's factors are ~150 MB of fresh pages and one serial
    rounding pass, which cost more than the products. The writer copies `bits` as they
    are; anything else (`np.asarray`, a `reshape`) sees the exact stored values."""

    bits: np.ndarray
    code: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    @property
    def ndim(self) -> int:
        return int(self.bits.ndim)

    @property
    def size(self) -> int:
        return int(self.bits.size)

    def reshape(self, *shape: Any) -> Encoded:
        return Encoded(self.bits.reshape(*shape), self.code)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.code == "BF16":  # a new array either way
            values = bf16_to_float32(self.bits)
            return values if dtype is None else values.astype(dtype, copy=False)
        return np.array(self.bits, dtype=dtype, copy=copy)


class Deferred:
    """A tensor still being formed on another thread, its shape known: the writer lays out
    the file from the shapes and waits for each tensor only when its turn comes, so the
    writing (and the disk) overlaps the work still running (resize's factors).

    `future` gives a tuple; this tensor is its item `item`, reshaped to `shape`. Reading
    it (`result`, `np.asarray`) waits; an error of the work surfaces there."""

    def __init__(self, future: Future[Any], item: int, shape: tuple[int, ...]) -> None:
        self.future, self.item, self.shape = future, item, tuple(int(d) for d in shape)
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)

    def reshape(self, *shape: Any) -> Deferred:
        dims = [int(d) for d in (shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)]
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1)
            dims[dims.index(-1)] = self.size // known if known else 0
        if math.prod(dims) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {tuple(dims)}")
        return Deferred(self.future, self.item, tuple(dims))

    def result(self) -> Encoded | np.ndarray:
        value = self.future.result()[self.item]
        return value.reshape(self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.array(self.result(), dtype=dtype, copy=copy)


def storable(values: Any) -> np.ndarray | Encoded | Deferred:
    """What a writer passes on for a factor: an `Encoded` or `Deferred` as it is, anything
    else as numpy."""
    return values if isinstance(values, (Encoded, Deferred)) else np.asarray(values)


def encode_blocks(shape: tuple[int, ...], blocks: Iterable[tuple[Any, np.ndarray]], code: str,
                  name: str = "tensor") -> Encoded:
    """A (shape) tensor encoded as `code` from the blocks that make it up: (index into the
    tensor, float values), each rounded through a reused float32 scratch while it is in
    cache. WriteError (naming `name`) at the first block holding a value the dtype cannot
    store."""
    if code not in WRITABLE_DTYPES:
        raise WriteError(f"{name}: cannot write dtype {code!r} (use one of {', '.join(WRITABLE_DTYPES)})")
    bits = np.empty(shape, dtype="<u2" if code == "BF16" else NUMPY_DTYPE[code])
    scratch, carry = np.empty(0, dtype="<f4"), np.empty(0, dtype="<u4")
    staged = np.empty(0, dtype="<u2")
    kernel = native() if code == "BF16" else None
    for index, block in blocks:
        target = bits[index]
        with np.errstate(over="ignore", invalid="ignore"):  # beyond the dtype's range: inf, refused below
            if kernel is not None and block.dtype == np.float32 and block.flags.c_contiguous:
                # one pass of the C kernel, into the target itself where it is contiguous
                if target.flags.c_contiguous:
                    finite = kernel.bf16_round(block, target)
                else:
                    if staged.size < block.size:
                        staged = np.empty(block.size, dtype="<u2")
                    finite = kernel.bf16_round(block, staged[:block.size])
                    np.copyto(target, staged[:block.size].reshape(block.shape))
            elif code == "BF16":
                if scratch.size < block.size:
                    scratch, carry = np.empty(block.size, dtype="<f4"), np.empty(block.size, dtype="<u4")
                rounded = scratch[:block.size].reshape(block.shape)
                np.copyto(rounded, block, casting="unsafe")
                _round_bf16(rounded, carry[:block.size].reshape(block.shape), target)
                finite = bf16_finite(target)
            else:
                np.copyto(target, block, casting="unsafe")
                finite = bool(np.isfinite(target).all())
        if not finite:
            raise overflow_error(block, code, name)
    return Encoded(bits, code)


def _encoded_chunks(values: np.ndarray | Encoded | Deferred, dtype: str, name: str) -> Iterator[np.ndarray]:
    """`encode_array`'s bytes in pieces: bf16 chunk by chunk through one reused buffer
    (a 1B adapter's whole encoded copy is ~80 MB of fresh pages, which cost more than the
    rounding), other dtypes whole, an `Encoded` of this dtype as it is (a `Deferred` once
    it is done); WriteError as soon as a chunk does not fit."""
    if isinstance(values, Deferred):
        values = values.result()
    if isinstance(values, Encoded):
        if values.code == dtype:
            yield np.ascontiguousarray(values.bits)
            return
        values = np.asarray(values)
    if dtype != "BF16":
        yield encode_array(values, dtype, name)
        return
    for _, chunk in _bf16_chunks(values):
        if bf16_finite(chunk):
            yield chunk
        else:
            raise overflow_error(values, dtype, name)


def stored_values(values: np.ndarray, dtype: str, name: str = "tensor") -> np.ndarray:
    """`values` as a reader gets them back once written as `dtype` (bf16 as float32,
    exactly, the way `SafetensorsFile.numpy` widens it): what a written file must hold.
    WriteError (naming `name`) where the dtype cannot hold them."""
    encoded = encode_array(values, dtype, name)
    if dtype == "BF16":
        return bf16_to_float32(encoded)
    return encoded


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, tuple[np.ndarray | Encoded | Deferred, str]],
    metadata: Mapping[str, str] | None = None
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
