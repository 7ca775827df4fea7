"""verify's float32 screen: merge's recipe first, the float64 check only where it can matter.

Why this exists: the exact row-block check (`block_math`) recomputes every element's
expectation in float64 and makes ~30 passes per block; at 1B shapes that is ~13 ns of
CPU per element. But for a tensor whose stored bytes are exactly what merge's float32
arithmetic gives (`dense.merge_block_into`, rounded once: the recipe of lora-tools
merges and of PEFT merges of fp32 adapters), the verdict no longer depends on the
float64 figures. `tensor_check.decide`, given a matching recipe, says "ok" unless the
tensor equals the base ("not applied") or the update is below the dtype's resolution
("inconclusive", from σ_k). So the screen replays that recipe in float32, compares the
bits, and computes the report's figures from the float32 values it already holds
(float64 sums); it accepts a tensor only where every block matches, the stored tensor
is not the base, and a rigorous upper bound on the exact check's σ_k (`spread_bound`)
is within the inconclusive limit. Anything else (a block that differs, a NaN or an Inf,
a tensor equal to its base, a bound past the limit) is handed to the exact check, which
judges it as before: the screen can only say "ok" where the exact check says "ok".
docs/math.md ("The float32 screen") gives the proof and the bounds.

The figures it reports (the expectation E taken as R = fl32(W0 + Σ f·B·A), merge's own
value before rounding): max |MERGED − R|, max |R|, the worst |MERGED − R| in units of the
stored dtype's spacing at max(|R|, |W0|), k = 1 + ⟨MERGED − R, R − W0⟩ / ‖R − W0‖², σ_k
from the same spacing, and the forward check with x rounded to float32. They differ from
the float64 figures by float32's rounding of R (about 2⁻²⁴·|W0| per element, 2⁻¹⁵ of a
bf16 ulp), far below anything the report prints to three or four digits.

bf16 and fp16 checkpoints only (their ulp dwarfs float32's rounding), under the default
tolerance, on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lora_tools.linalg.dense import merge_block_into
from lora_tools.verify.block_math import Factors, max_abs, same_values
from lora_tools.verify.figures import EPS, FORWARD_BATCH, Sums

# The stored dtypes the screen judges, and their smallest normal's bits as a float32.
SCREEN_DTYPES = (torch.bfloat16, torch.float16)
_TINY_BITS32 = {
    dtype: int(torch.tensor(torch.finfo(dtype).tiny, dtype=torch.float32).view(torch.int32)) for dtype in SCREEN_DTYPES
}
_EXPONENT_BITS32 = 0x7F800000


@dataclass
class ScreenBuffers:
    """One block shape's float32 views of the screen's buffers (see `ScreenSpace`), as
    torch tensors (GEMM operands, dtype conversions) and flat numpy arrays (the other
    passes: numpy's per-call cost is a fraction of torch's, which counts ~30 times a block)."""

    pair: torch.Tensor  # (2·rows, width): W0 above MERGED − R, one GEMM for the forward check
    base: torch.Tensor  # (rows, width): W0 widened, the top half of pair
    merged: torch.Tensor  # (rows, width): merge's float32 value R, then the spacing
    spare: torch.Tensor  # (rows, width): merge_block_into's second product, MERGED widened, then R − W0
    forward: torch.Tensor  # (batch, 2·rows): x·W0ᵀ, then x·(MERGED − R)ᵀ
    arrays: tuple[np.ndarray, ...]  # flat numpy views: base, error (the bottom of pair), merged, spare
    rounded: dict[torch.dtype, torch.Tensor]  # R rounded to a stored dtype, flat


class ScreenSpace:
    """Float32 buffers reused by every block a worker screens (no fresh pages per pass)."""

    def __init__(self) -> None:
        self.capacity = 0
        self._pair = torch.empty(0)
        self._flat: list[torch.Tensor] = []
        self._rounded: dict[torch.dtype, torch.Tensor] = {}
        self._views: dict[tuple[int, int], ScreenBuffers] = {}

    def block(self, rows: int, width: int) -> ScreenBuffers:
        count = rows * width
        if count > self.capacity:
            self.capacity = count
            self._pair = torch.empty(2 * count, dtype=torch.float32)
            self._flat = [torch.empty(count, dtype=torch.float32) for _ in range(2)]
            self._rounded, self._views = {}, {}
        views = self._views.get((rows, width))
        if views is None:
            pair = self._pair[: 2 * count]
            merged, spare = (t[:count] for t in self._flat)
            arrays = tuple(t.numpy() for t in (pair[:count], pair[count:], merged, spare))
            views = ScreenBuffers(
                pair.view(2 * rows, width), pair[:count].view(rows, width), merged.view(rows, width),
                spare.view(rows, width), torch.empty((FORWARD_BATCH, 2 * rows), dtype=torch.float32), arrays, {},
            )
            self._views[(rows, width)] = views
        return views

    def rounded(self, views: ScreenBuffers, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in views.rounded:
            if dtype not in self._rounded:
                self._rounded[dtype] = torch.empty(self.capacity, dtype=dtype)
            views.rounded[dtype] = self._rounded[dtype][: views.merged.numel()]
        return views.rounded[dtype]


def screen_block(
    space: ScreenSpace, f: Factors, x32: torch.Tensor, lo: int, hi: int, w0: torch.Tensor,
    stored: torch.Tensor, sums: Sums, forward: tuple[np.ndarray, np.ndarray],
) -> bool:
    """Screen rows [lo, hi) (w0, stored: those rows, flat); False where the tensor must go
    to the exact check (merge's recipe does not give these bytes, or a value is not
    finite). The figures are added to `sums` as `figures.judge_rows` adds its own;
    forward: (batch, all rows) float32, x·W0ᵀ and x·(MERGED − R)ᵀ, filled in for these rows."""
    rows = hi - lo
    views = space.block(rows, stored.numel() // rows)
    base, error, merged, spare = views.arrays
    views.base.view(-1).copy_(w0)
    merge_block_into(views.merged, views.base, f.replay, lo, hi, views.spare)
    if not same_values(space.rounded(views, stored.dtype).copy_(views.merged.view(-1)), stored):
        sums.fp32_round_once = False
        return False
    if sums.stored_is_base:
        sums.stored_is_base = same_values(stored, w0 if w0.dtype == stored.dtype else w0.to(stored.dtype))
    views.spare.view(-1).copy_(stored)  # MERGED, widened
    np.subtract(spare, merged, out=error)  # MERGED − R: exact (R rounds to MERGED)
    block_error, block_expected = max_abs(views.pair[rows:]), max_abs(views.merged)
    if not (math.isfinite(block_error) and math.isfinite(block_expected)):
        sums.finite = False
        return False
    sums.max_abs_error = max(sums.max_abs_error, block_error)
    sums.max_expected = max(sums.max_expected, block_expected)
    torch.matmul(x32, views.pair.T, out=views.forward)
    products = views.forward.numpy()
    forward[0][:, lo:hi] = products[:, :rows]
    forward[1][:, lo:hi] = products[:, rows:]
    update = np.subtract(merged, base, out=spare)  # R − W0: the update as merge computed it
    sums.diff_dot_update += float(np.dot(error, update))
    sums.update_sq += float(np.dot(update, update))
    eps = EPS[stored.dtype]
    spacing, largest = _spacing_of_max(merged, base, stored.dtype)  # in R's buffer: R and W0 are spent
    sums.max_spacing = max(sums.max_spacing, largest)
    spread = np.multiply(update, spacing, out=update)
    sums.spread_sq += float(np.dot(spread, spread)) * eps * eps
    ratio = np.divide(error, spacing, out=base)  # (MERGED − R) / spacing, exactly: powers of two
    low, high = (float(v) for v in torch.aminmax(views.base))
    block_worst = max(-low, high) / eps
    if sums.worst_at is None or block_worst > sums.worst:
        sums.worst = block_worst
        sums.worst_at = lo * views.base.shape[1] + int(np.argmax(np.abs(ratio, out=ratio)))
    return True


def _spacing_of_max(merged: np.ndarray, base: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, float]:
    """In place in `merged` (float32, finite): the power of two 2^⌊log2 max(|R|, |W0|)⌋,
    at least the dtype's smallest normal (the dtype's ulp there is eps × this), and the
    largest of them. For float32 numbers the exponent bits are that power (the sign bit
    masked off), and keeping them commutes with max: three integer passes and one
    reduction, the clamp only where a spacing falls below it. base is overwritten."""
    merged_bits, base_bits = merged.view(np.int32), base.view(np.int32)
    np.bitwise_and(merged_bits, _EXPONENT_BITS32, out=merged_bits)
    np.bitwise_and(base_bits, _EXPONENT_BITS32, out=base_bits)
    np.maximum(merged_bits, base_bits, out=merged_bits)
    low, high = (int(v) for v in torch.aminmax(torch.from_numpy(merged_bits)))
    tiny = _TINY_BITS32[dtype]
    if low < tiny:  # (rare in bf16, whose smallest normal is float32's)
        np.maximum(merged_bits, tiny, out=merged_bits)
    return merged, float(np.int32(max(high, tiny)).view(np.float32))


def spread_bound(f: Factors, rows: int, width: int, max_spacing: float, dtype: torch.dtype) -> float:
    """A rigorous upper bound on the exact check's σ_k for a tensor the screen has seen,
    from the factors and the screen's largest spacing; the screen accepts a tensor only
    where it is at most the inconclusive limit, so that the exact check finds the update
    resolvable too (docs/math.md, "The float32 screen").

    σ_k = ε·√(Σ uᵢ²·spᵢ²/12) / Σ uᵢ² ≤ ε·max spᵢ / (√12·‖u‖), with u = E − W0 as the exact
    check takes it (float64), spᵢ its spacing of max(|Eᵢ|, |W0ᵢ|) (at most that value,
    rounded to float32). max(|Rᵢ|, |W0ᵢ|) < 2·max_spacing (R: merge's float32 value), and
    |Eᵢ − Rᵢ| ≤ 2⁻²⁴·|Rᵢ| + the float32 products' error, at most (r + L + 2)·2⁻²³ times
    Σₗ|fₗ|·(|Bₗ|·|Aₗ|)ᵢ ≤ Σₗ|fₗ|·maxᵢ‖Bₗ,ᵢ‖₁·max|Aₗ|. ‖u‖ ≥ ‖ΔW‖ − ‖u − ΔW‖: ‖ΔW‖² from
    float64 Gram sums of the concatenated factors, less their rounding (at most
    (m + n + R² + 4)·2⁻⁵² of P², P = ‖Σₗ|fₗ|·|Bₗ|·|Aₗ|‖_F, itself bounded by Gram sums of
    |B| and |A|); u − ΔW is the float64 expectation's rounding, at most
    (R + 2L + 2)·2⁻⁵³·P + L·2⁻⁵³·√N·max|E| in norm. Generous constants throughout."""
    if max_spacing <= 0:
        return math.inf
    b_cat = torch.cat([b for b, _, _, _ in f.expected], dim=1)
    a_cat = torch.cat([a if folded else a * factor for _, a, factor, folded in f.expected], dim=0)
    norm_sq = float(((b_cat.T @ b_cat) * (a_cat @ a_cat.T)).sum())
    b_abs, a_abs = b_cat.abs(), a_cat.abs()
    abs_norm = math.sqrt(float(((b_abs.T @ b_abs) * (a_abs @ a_abs.T)).sum())) * (1 + 2.0**-30)  # ≥ P
    abs_max = sum(
        float(b.abs().sum(1).max()) * float((a if folded else a * factor).abs().max()) for b, a, factor, folded in f.expected
    ) * (1 + 2.0**-30)
    rank, layers, count = a_cat.shape[0], len(f.expected), rows * width
    magnitude = 2 * max_spacing * (1 + 2.0**-22) + (rank + layers + 2) * 2.0**-23 * abs_max  # ≥ max(|E|, |W0|)
    gram_error = (rows + width + rank * rank + 4) * 2.0**-52 * abs_norm * abs_norm
    lower = math.sqrt(max(norm_sq - gram_error, 0.0))
    lower -= (rank + 2 * layers + 2) * 2.0**-53 * abs_norm + layers * 2.0**-53 * math.sqrt(count) * magnitude
    if not lower > 0:
        return math.inf
    rounding = 1 + (count + 8) * 2.0**-51  # the exact check's float64 sums and divisions, taken upward
    return EPS[dtype] * magnitude * (1 + 2.0**-23) / (math.sqrt(12.0) * lower) * rounding
