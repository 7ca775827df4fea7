"""Tall matrices X (m, k), k ≪ m, that the factored math only ever applies to small ones.

Three kinds: a float64 array; a `Stack` of blocks (the side of a blend); a `Widened`
array stored in float32/float16 (a loaded factor). Every product here is float64 and
costs O(m·k·j); the point of the two classes is to get there without a float64 copy of
the whole tall matrix: copying 8192×24 blocks side by side costs as much as their Gram
product, and widening a whole 1B adapter's factors to float64 (360 MB) costs more in
page faults than the products themselves take (~0.4 s of a 1.6 s resize). No I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

# Rows widened at a time: 2048×64 float64 is 1 MB, which stays in a core's cache
# between the widening copy and the product that reads it.
ROW_BLOCK = 2048


class Stack:
    """X = [c₁·X₁ | c₂·X₂ | …] (m, Σkᵢ), kept as its blocks: the tall side of a blend.

    Copying 8192×24 factors side by side costs as much as their Gram product (rows of a
    C-ordered array are short), so X is only ever applied to small matrices, block by
    block, with the coefficients moved onto the small side.
    """

    def __init__(self, blocks: Sequence[np.ndarray], coefficients: Sequence[float]) -> None:
        self.blocks = list(blocks)  # each (m, kᵢ)
        self.coefficients = [float(c) for c in coefficients]
        self.edges = np.cumsum([0] + [blk.shape[1] for blk in self.blocks])
        self.shape = (self.blocks[0].shape[0], int(self.edges[-1]))

    def __matmul__(self, small: np.ndarray) -> np.ndarray:
        """X·small (m, j) = Σ Xᵢ·(cᵢ·smallᵢ); O(m·k·j)."""
        out = None
        for blk, c, lo, hi in zip(self.blocks, self.coefficients, self.edges[:-1], self.edges[1:]):
            part = blk @ (c * small[lo:hi])
            out = part if out is None else out + part
        assert out is not None
        return out

    def dense(self) -> np.ndarray:
        return np.concatenate([c * blk for blk, c in zip(self.blocks, self.coefficients)], axis=1)


class Widened:
    """A float32/float16 X (m, k) used as float64, ROW_BLOCK rows at a time; or, with
    `bf16_bits`, X given as the uint16 bit patterns of bf16 values (as a file stores them;
    each is the top half of the float32 of the same value).

    Each block is copied into one reused float64 buffer of X's own memory order (so the
    copy reads contiguous runs: Aᵀ of a C-ordered A is F-ordered), then multiplied;
    results equal those of the widened whole matrix up to the order of float64 sums.
    """

    def __init__(self, x: np.ndarray, bf16_bits: bool = False) -> None:
        if x.ndim != 2:
            raise ValueError(f"a factor must be 2-D, got shape {x.shape}")
        self.x = x
        self.bf16_bits = bf16_bits
        self.shape = x.shape

    @property
    def single(self) -> bool:
        """X's values are float32 (or bf16, widened exactly to float32)."""
        return self.bf16_bits or self.x.dtype == np.float32

    @property
    def memory_order(self) -> Literal["C", "F"]:
        return "F" if self.x.flags.f_contiguous and not self.x.flags.c_contiguous else "C"

    def rows_into(self, lo: int, hi: int, out: np.ndarray, bits: np.ndarray | None = None) -> np.ndarray:
        """out[:] = rows lo:hi of X as out's dtype; bf16 bits are shifted into float32
        bit patterns, in `out` itself when it is float32, else through `bits` (uint32,
        out's shape: scratch)."""
        if self.bf16_bits and out.dtype == np.float32:  # the float32 bits are the shifted bf16 ones
            np.left_shift(self.x[lo:hi], 16, out=out.view(np.uint32), dtype=np.uint32)
        elif self.bf16_bits:
            assert bits is not None
            np.left_shift(self.x[lo:hi], 16, out=bits, dtype=np.uint32)
            np.copyto(out, bits.view(np.float32))
        else:
            np.copyto(out, self.x[lo:hi])
        return out

    def _blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        m, k = self.shape
        order = self.memory_order
        buffer = np.empty((min(ROW_BLOCK, m), k), order=order)
        bits = np.empty(buffer.shape, dtype=np.uint32, order=order) if self.bf16_bits else None
        for lo in range(0, m, ROW_BLOCK):
            hi = min(lo + ROW_BLOCK, m)
            yield lo, hi, self.rows_into(lo, hi, buffer[: hi - lo], None if bits is None else bits[: hi - lo])

    def gram(self) -> np.ndarray:
        """XᵀX (k, k) in float64."""
        k = self.shape[1]
        out = np.zeros((k, k))
        for _, _, block in self._blocks():
            out += block.T @ block
        return out

    def times(self, small: np.ndarray, out: np.ndarray) -> None:
        """out[:] = X·small, each row block's float64 product stored as out's dtype (past its
        range: inf, which writers refuse in one line, so numpy is not let to warn)."""
        for lo, hi, block in self._blocks():
            with np.errstate(over="ignore"):
                out[lo:hi] = block @ small

    def __matmul__(self, small: np.ndarray) -> np.ndarray:
        out = np.empty((self.shape[0], small.shape[1]))
        self.times(small, out)
        return out

    def dense(self) -> np.ndarray:
        bits = np.empty(self.shape, dtype=np.uint32) if self.bf16_bits else None
        return self.rows_into(0, self.shape[0], np.empty(self.shape), bits)


Tall = np.ndarray | Stack | Widened


def as_tall(x: Tall) -> Tall:
    """A Stack or Widened as it is, a float64 array as it is, any other array Widened
    (2-D checked)."""
    if isinstance(x, (Stack, Widened)):
        return x
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"a factor must be 2-D, got shape {x.shape}")
    return x if x.dtype == np.float64 else Widened(x)


def dense(x: Tall) -> np.ndarray:
    """X as one float64 array."""
    return x if isinstance(x, np.ndarray) else x.dense()


def gram(x: Tall) -> np.ndarray:
    """XᵀX (k, k), float64."""
    if isinstance(x, Widened):
        return x.gram()
    x = dense(x)
    return x.T @ x


def times(x: Tall, small: np.ndarray, dtype: type = np.float64, *, transposed: bool = False) -> np.ndarray:
    """X·small (m, j) computed in float64 and stored as `dtype`; with `transposed`,
    (X·small)ᵀ (j, m), C-ordered, without a transposing copy."""
    m, j = x.shape[0], small.shape[1]
    if isinstance(x, Widened):
        out = np.empty((j, m), dtype=dtype).T if transposed else np.empty((m, j), dtype=dtype)
        x.times(small, out)
        return out.T if transposed else out
    with np.errstate(over="ignore"):  # stored past the dtype's range: inf, refused by the writers
        if transposed and isinstance(x, np.ndarray):
            return np.asarray(small.T @ x.T, dtype=dtype)  # (j, m), C-ordered as the product is
        product = x @ small
        return np.ascontiguousarray(product.T if transposed else product, dtype=dtype)


# Elements of one block of `single_blocks`: the block and its rounding's scratch stay in a
# core's cache between the product and the caller's use of it.
PRODUCT_BLOCK = 1 << 16


def single_blocks(x: Tall, small: np.ndarray, *,
                  transposed: bool = False) -> Iterator[tuple[tuple[slice, slice], np.ndarray]]:
    """X·small (m, j), or with `transposed` (X·small)ᵀ (j, m), as blocks (index into that
    result, values), each in one reused buffer that the caller may overwrite and that is
    valid until the next block is asked for.

    For results rounded to bf16 (2⁻⁹) next, as they come: a float32-stored X is multiplied
    in float32 as it is (error ≈ √k·2⁻²⁴ relative; half the traffic of widened blocks and
    twice the flop rate), any other X in float64. No whole-result array is made.
    """
    widened = x if isinstance(x, Widened) else None
    stored = widened.x if widened is not None else dense(x)  # (m, k)
    m, j = stored.shape[0], small.shape[1]
    single = widened is not None and widened.single
    side = small.astype(np.float32) if single else small
    width = max(1, PRODUCT_BLOCK // max(j, 1))  # rows of X per block
    flat = np.empty(min(width, m) * j, dtype=np.float32 if single else np.float64)
    rows_buffer = None
    if widened is not None and widened.bf16_bits:  # rows widened to float32 first, in X's order
        rows_buffer = np.empty((min(width, m), stored.shape[1]), dtype=np.float32, order=widened.memory_order)
    for lo in range(0, m, width):
        hi = min(lo + width, m)
        if rows_buffer is not None and widened is not None:
            rows = widened.rows_into(lo, hi, rows_buffer[: hi - lo])
        else:
            rows = stored[lo:hi] if single else np.asarray(stored[lo:hi], dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # past float32: inf, which the caller refuses
            if transposed:
                block = flat[: j * (hi - lo)].reshape(j, hi - lo)
                np.matmul(side.T, rows.T, out=block)
            else:
                block = flat[: (hi - lo) * j].reshape(hi - lo, j)
                np.matmul(rows, side, out=block)
        yield ((slice(None), slice(lo, hi)) if transposed else (slice(lo, hi), slice(None))), block
