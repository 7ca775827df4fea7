"""FP8 weights stored with scales: the codec (dequantize, quantize with fresh scales).

Both families that ship FP8 checkpoints store W = q·s, q an e4m3 value and s its block's
scale: block-scaled checkpoints ("quant_method": "fp8", DeepSeek-V3, Qwen3-FP8) call s
`weight_scale_inv` and use 128×128 blocks; compressed-tensors calls it `weight_scale`,
per tensor, channel, group or block. A (rows, cols) block covers all of them (a tensor
scale is one block the size of the weight, a channel scale a block of one row), so one
codec serves both; which tensor scales which is `fp8_layout`'s business.

torch is imported lazily: this module is also imported (for its names) by inspect,
which never needs it for an unquantized base.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

Block = tuple[int, int]

FP8_CODES = frozenset({"F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True)
class ScaleRule:
    """How fresh scales are computed, as the checkpoint's producer computes them.

    `multiplier_first`: transformers' `Fp8Quantize` (block-scaled checkpoints) computes
    the multiplier 448/amax, quantizes w·multiplier and stores 1/multiplier;
    compressed-tensors computes the scale amax/448, stores it and quantizes w/scale.
    `power_of_two`: `scale_fmt: "ue8m0"` rounds each stored scale up to a power of two
    (so that q·s is exact) and quantizes with its exact reciprocal.
    """

    multiplier_first: bool = True
    power_of_two: bool = False


def scale_grid(shape: tuple[int, ...], block: Block) -> tuple[int, int]:
    """The scale tensor's (rows, cols) for a weight of `shape` cut in `block`s (edge
    blocks are partial: ⌈rows/bo⌉ × ⌈cols/bi⌉, as DeepSeek and transformers lay them)."""
    rows, cols = shape
    return math.ceil(rows / block[0]) if rows else 0, math.ceil(cols / block[1]) if cols else 0


def per_element_rows(scale: Any, rows: int, block_rows: int) -> Any:
    """The (rows, grid cols) scales of every weight row (a block row repeated)."""
    return scale.repeat_interleave(block_rows, dim=0)[:rows]


def _apply_per_block(values: Any, scale_rows: Any, block_cols: int, op: str) -> Any:
    """values (rows, cols) *= or /= each element's scale, in place, through views of whole
    column blocks (no weight-sized expanded scale) and one pass for a partial last one."""
    cols = values.shape[1]
    full = cols // block_cols
    if full:
        view = values[:, : full * block_cols].unflatten(-1, (full, block_cols))
        factor = scale_rows[:, :full, None]
        view.mul_(factor) if op == "mul" else view.div_(factor)
    if full * block_cols < cols:
        tail = values[:, full * block_cols :]
        factor = scale_rows[:, full : full + 1]
        tail.mul_(factor) if op == "mul" else tail.div_(factor)
    return values


# Rows dequantized at once by `dequantize` (about 16 MiB of float32): the table route's
# int32 scratch stays small and warm whatever the tensor's size.
_CHUNK_ELEMENTS = 4 * 1024 * 1024
_SCRATCH = threading.local()  # each thread's int32 scratch of code indices, reused


class RowDequantizer:
    """An FP8 weight dequantized a block of rows at a time: merge's row blocks take their
    W0 rows from it, so the float32 weight is never formed whole (one pass over memory
    fewer, the rows still warm when the GEMM adds to them)."""

    def __init__(self, q: Any, scale: Any, block: Block) -> None:
        import torch

        self.q, self.block_cols = q, block[1]
        grid = scale_grid(tuple(q.shape), block)
        scales = scale.to(device=q.device, dtype=torch.float32).reshape(grid)
        self.row_scales = per_element_rows(scales, q.shape[0], block[0])  # (rows, grid cols): small
        # the C kernel's one pass where it is built, for e4m3fn codes on the CPU (io/kernels.py)
        self.kernel = None
        if q.device.type == "cpu" and q.dtype == torch.float8_e4m3fn and q.ndim == 2:
            from lora_tools.io.kernels import native

            self.kernel = native()
            self.row_scales = self.row_scales.contiguous()
        # e4m3 codes widened by their bits come out 2⁻¹²⁰ times their value: the scales
        # carry the 2¹²⁰ back, exactly (a power of two), where that cannot overflow
        self.rebiased = None
        if (self.kernel is None and q.device.type == "cpu" and q.dtype == torch.float8_e4m3fn and _e4m3_bits_exact()
                and self.row_scales.numel() and bool(self.row_scales.abs().amax() < _E4M3_SCALE_LIMIT)):
            self.rebiased = self.row_scales * _E4M3_REBIAS

    def __call__(self, out: Any, lo: int, hi: int, trusted: bool = False) -> Any:
        """Rows [lo, hi) as float32 values, written into `out` (hi − lo rows); `trusted`:
        the codes are known to hold no NaN (fresh from `requantize`), so none is looked for."""
        import torch

        codes = self.q[lo:hi]
        scales = self.row_scales[lo:hi]
        if self.kernel is not None and out.is_contiguous() and codes.is_contiguous():
            rows, cols = out.shape
            self.kernel.decode_rows(codes.view(torch.uint8).numpy(), scales.numpy(), out.numpy(), rows, cols,
                                    self.block_cols)
            return out
        if self.rebiased is not None and out.is_contiguous() and _widen_e4m3_by_bits(codes, out, check=not trusted):
            scales = self.rebiased[lo:hi]
        elif codes.device.type == "cpu" and codes.element_size() == 1:
            _widen_by_table(codes, out)
        else:
            out.copy_(codes)
        return _apply_per_block(out, scales, self.block_cols, "mul")


# e4m3fn: s eeee mmm, exponent bias 7. A code's int8 value shifted left by 20 and masked
# (sign kept, the sign extension cleared) is the float32 whose exponent field is eeee and
# whose mantissa starts with mmm: the code's value times 2⁻¹²⁰, subnormal codes included
# (as float32 subnormals). Codes 0x7F and 0xFF are NaN; by bits they would read ±480·2⁻¹²⁰,
# beyond every finite code's ±448·2⁻¹²⁰.
_E4M3_SHIFT = 20
_E4M3_MASK = 0x87FFFFFF - (1 << 32)  # as an int32
_E4M3_REBIAS = 2.0**120
_E4M3_LARGEST = 448.0 * 2.0**-120
_E4M3_SCALE_LIMIT = 2.0**7  # scale·2¹²⁰ stays finite in float32


@lru_cache(maxsize=1)
def _e4m3_bits_exact() -> bool:
    """The bit route gives every finite code exactly what torch's cast gives (it would
    not where the CPU flushes subnormal operands to zero)."""
    import torch

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    values = torch.empty(256, dtype=torch.float32)
    _widen_e4m3_by_bits(codes, values, check=False)
    expected = _code_values(torch.float8_e4m3fn)
    finite = ~expected.isnan()
    return bool(torch.equal((values * _E4M3_REBIAS)[finite], expected[finite]))


def _widen_e4m3_by_bits(codes: Any, out: Any, check: bool = True) -> bool:
    """out (contiguous float32, codes' shape) = the e4m3fn codes' values times 2⁻¹²⁰, by
    three integer passes in out's own memory (3.5× faster here than the table's lookup);
    False, with out spent, when a code is NaN (`check`: one min/max pass finds it)."""
    import torch

    bits = out.view(torch.int32)
    bits.copy_(codes.view(torch.int8))  # sign-extended
    bits.bitwise_left_shift_(_E4M3_SHIFT)
    bits.bitwise_and_(_E4M3_MASK)
    if check and out.numel():
        low, high = torch.aminmax(out)
        return bool(high <= _E4M3_LARGEST) and bool(low >= -_E4M3_LARGEST)
    return True


@lru_cache(maxsize=4)
def _code_values(dtype: Any) -> Any:
    """The float32 value of each of an 8-bit float dtype's 256 codes (NaN codes NaN)."""
    import torch

    return torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)


def _widen_by_table(codes: Any, out: Any) -> None:
    """out = codes as float32 on the CPU, by looking each code up among its 256 values.

    Why: torch widens FP8 to float32 element by element (13 ms per 4 M codes on the dev
    box); the lookup (codes copied to a reused int32 scratch, then one `index_select`)
    takes 3.1 ms, and gives every code exactly the value torch's cast gives it, NaN codes
    included, with nothing to special-case (an earlier float16-bits route, 7.7 ms, had to
    check every block for NaN codes)."""
    import torch

    n = codes.numel()
    scratch = getattr(_SCRATCH, "indices", None)
    if scratch is None or scratch.numel() < n:
        scratch = _SCRATCH.indices = torch.empty(n, dtype=torch.int32)
    indices = scratch[:n].copy_(codes.contiguous().view(torch.uint8).view(-1))
    if out.is_contiguous():
        torch.index_select(_code_values(codes.dtype), 0, indices, out=out.view(-1))
    else:
        out.copy_(torch.index_select(_code_values(codes.dtype), 0, indices).view(out.shape))


def dequantize(q: Any, scale: Any, block: Block, out: Any = None, trusted: bool = False) -> Any:
    """q·s in float32 on q's device, as DeepSeek's `weight_dequant` and transformers do
    (each code widened to float32, times its block's scale widened to float32); into
    `out` (float32, q's shape) when given, reused memory sparing a fresh tensor's faults.
    `trusted`: codes known to hold no NaN (`RowDequantizer`)."""
    import torch

    values = torch.empty(q.shape, dtype=torch.float32, device=q.device) if out is None else out
    if not values.numel():
        return values
    rows = q.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, q[0].numel()))
    rows_of = RowDequantizer(q, scale, block)
    for lo in range(0, rows, step):
        rows_of(values[lo : lo + step], lo, min(rows, lo + step), trusted)
    return values


def block_amax(values: Any, block: Block) -> Any:
    """The largest |value| of every block, (⌈rows/bo⌉, ⌈cols/bi⌉), edge blocks partial."""
    import torch
    import torch.nn.functional as F

    rows, cols = values.shape
    grid_rows, grid_cols = scale_grid((rows, cols), block)
    if rows == grid_rows * block[0] and cols == grid_cols * block[1] and values.is_contiguous():
        # whole blocks: the max and min of each row's stretch of a block, along the
        # contiguous dimension (1.7× faster than reducing the strided block dimensions at
        # once, 3× faster than one aminmax), then of the block's rows on the small result;
        # no weight-sized |values| copy
        stretches = values.view(rows, grid_cols, block[1])
        per_row = torch.maximum(torch.amax(stretches, dim=-1), torch.amin(stretches, dim=-1).neg_())
        return torch.amax(per_row.view(grid_rows, block[0], grid_cols), dim=1)
    padded = F.pad(values.abs(), (0, grid_cols * block[1] - cols, 0, grid_rows * block[0] - rows))
    return torch.amax(padded.reshape(grid_rows, block[0], grid_cols, block[1]), dim=(1, 3))


@dataclass(frozen=True)
class FreshScales:
    """The fresh scales of a float32 weight (or block of its rows), as `requantize` computes
    them: `stored`, the scale tensor's values (grid, in the scale dtype); `factor`, the
    float32 each value is multiplied by (`divide`: divided by) before the cast; `amax`,
    each block's largest |value|."""

    stored: Any
    factor: Any
    divide: bool
    amax: Any


def fresh_scales(values: Any, block: Block, fp8: Any, scale_dtype: Any, rule: ScaleRule,
                 amax: Any = None) -> FreshScales:
    """Each block's fresh scale of float32 `values` (rows, cols), from its largest |value|
    (`amax`, when the caller has it: `block_amax`'s), as the producer named by `rule`
    computes it (an all-zero block gets scale 1)."""
    import torch

    limit = torch.finfo(fp8).max
    if amax is None:
        amax = block_amax(values, block)
    zero = amax == 0
    if rule.multiplier_first:
        multiplier = torch.where(zero, torch.ones_like(amax), limit / amax)
        scales = 1.0 / multiplier
    else:
        scales = torch.where(zero, torch.ones_like(amax), amax / limit)
    if rule.power_of_two:
        scales = torch.pow(2.0, torch.ceil(torch.log2(scales.clamp(min=torch.finfo(torch.float32).tiny))))
        multiplier = 1.0 / scales  # exact: a power of two
    stored = scales.to(scale_dtype)
    # A scale that rounds to zero in a narrow scale dtype (fp16 has not float32's range)
    # would make its block's codes infinite: keep that dtype's smallest normal instead.
    if bool((stored.to(torch.float32) == 0).any()):
        stored = torch.where(stored.to(torch.float32) > 0, stored.to(torch.float32), torch.finfo(scale_dtype).tiny).to(scale_dtype)
    if rule.multiplier_first and stored.dtype == torch.float32:  # transformers: w·(448/amax), or w·2⁻ᵏ
        return FreshScales(stored, multiplier, False, amax)
    return FreshScales(stored, stored.to(torch.float32), True, amax)  # against what is stored: w / s


def requantize(
    values: Any, block: Block, fp8: Any, scale_dtype: Any, rule: ScaleRule, *, in_place: bool = False, out: Any = None,
    fresh: FreshScales | None = None,
) -> tuple[Any, Any]:
    """(codes, stored scales) of float32 `values` (rows, cols) with fresh scales from
    each block's largest |value|, as the producer named by `rule` computes them (an
    all-zero block gets scale 1). Values are clamped to the FP8 dtype's finite range
    before the cast (past it a cast gives NaN). `in_place`: `values` is used as the
    scratch and left scaled and clamped; `out`: where the codes go (FP8, values' shape);
    `fresh`: the scales, when the caller has them (`fresh_scales`)."""
    import torch

    limit = torch.finfo(fp8).max
    if fresh is None:
        fresh = fresh_scales(values, block, fp8, scale_dtype, rule)
    work = values if in_place and values.dtype == torch.float32 else values.to(torch.float32, copy=True)
    if work.numel():
        op = "div" if fresh.divide else "mul"
        _apply_per_block(work, per_element_rows(fresh.factor, values.shape[0], block[0]), block[1], op)
        # each block's largest |scaled value| is its amax scaled by the same float32 op, and
        # rounding is monotonic: where none passes the limit the clamp changes nothing
        peak = fresh.amax / fresh.factor if fresh.divide else fresh.amax * fresh.factor
        if not bool((peak <= limit).all()):  # (NaN: clamped, as always)
            work.clamp_(-limit, limit)
    return (work.to(fp8) if out is None else out.copy_(work)), fresh.stored


def step_of(q: Any, scale: Any, block: Block) -> Any:
    """The distance from each dequantized value to the next FP8 value away from zero
    (one unit in the last place of its code, times its scale), float32 on q's device:
    what a correct re-quantization may change an element by, at most half of it."""
    import torch

    fp8 = q.dtype
    info = torch.finfo(fp8)
    mantissa_bits = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[fp8]
    codes = q.to(torch.float32).abs()
    # ulp of a normal value 2^e·1.m is 2^(e - mantissa bits); subnormals share the
    # smallest normal's ulp.
    exponent = torch.floor(torch.log2(codes.clamp(min=info.smallest_normal)))
    ulp = torch.pow(2.0, exponent - mantissa_bits)
    return dequantize(ulp.to(torch.float32), scale, block)
