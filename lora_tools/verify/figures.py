"""verify's formulas, each written once, for both ways of checking a tensor.

The whole-tensor check (`tensor_check`, any layer kind) and the row-block check
(`block_math`, plain LoRA, the hot path) judge a tensor by the same figures; the only
difference is how much of the tensor one call sees (the whole tensor is one block).
So every formula lives here, as a function over flat float64 rows that writes into
buffers the caller owns (`out=`, in place): the block path hands it reused workspace
views, the whole-tensor path hands it the tensors themselves. No pass or allocation
is added per block by sharing them.

The figures: the element-wise error against a tolerance of one ulp of the stored dtype
plus float32's slack (`spacing_into`, `slack_into`), the least-squares strength
k = ⟨W_merged − W0, ΔW⟩ / ‖ΔW‖²_F with the spread σ_k that rounding alone explains
(`judge_rows` sums them, `fill_figures` divides), the fit of W0 + k·ΔW
(`fit_residual`), the forward check (`forward_error`) and PEFT's recipes
(`peft_delta_into`; merge's own recipe is `dense.merge_block_into` itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lora_tools.engine.binding import LayerTarget
from lora_tools.linalg.dense import factor_tensor

# |k − 1| beyond this many rounding spreads is a strength error.
K_SIGMAS = 6.0
FORWARD_BATCH = 8

RECIPE_FP32_ROUND_ONCE = "fp32 round-once (lora-tools; PEFT with fp32 adapter weights)"

EPS = {dtype: float(torch.finfo(dtype).eps) for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
# float32 arithmetic before the final rounding: 2·eps32 per unit of |w·s|·|B|·|A| (a power of two)
SLACK_PER_UNIT = 2 * EPS[torch.float32]
_EXPONENT_BITS = 0x7FF0000000000000
# Adding this to a float64's bits carries into the exponent exactly when rounding it
# to float32 (nearest, ties to even) rounds it up to the next power of two.
_FLOAT32_ROUND_UP = 1 << 28
_TINY64 = torch.finfo(torch.float64).tiny
_BIT_TRICK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# bits of each dtype's smallest normal as a float64 (a power of two)
_TINY_BITS = {
    dtype: int(torch.tensor(torch.finfo(dtype).tiny, dtype=torch.float64).view(torch.int64)) for dtype in _BIT_TRICK_DTYPES
}


@dataclass
class TensorCheck:
    """The verdict on one adapted tensor; the figures behind it are kept."""

    name: str
    verdict: str  # "ok", "mismatch", "wrong strength", "not applied", "inconclusive", "missing", "layout"
    dtype: str
    max_abs_error: float | None = None
    max_rel_error: float | None = None  # max |error| / max |expected|
    worst_ulps: float | None = None  # worst |error| in units of the allowed tolerance
    strength: float | None = None
    strength_spread: float | None = None
    recipe: str | None = None  # which known recipe reproduces the stored bytes
    forward_rel_error: float | None = None
    detail: str = ""


# --------------------------------------------------------------------------- ulp


def frexp_ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at each |value|, float32 (it is a tolerance): the definition.

    |v| = m·2^e with m in [0.5, 1): the spacing is eps·2^(e−1), |v| rounded to float32
    first; values below the dtype's smallest normal get that normal's spacing. Used as
    is for float64 checkpoints (whose magnitudes float32 may not hold); `spacing_into`
    reproduces it bit for bit for the other dtypes without the float32 round trip.
    """
    magnitude = values.abs().to(torch.float32).clamp_min_(torch.finfo(dtype).tiny)
    _, exponent = torch.frexp(magnitude)
    return torch.ldexp(magnitude.fill_(EPS[dtype] / 2), exponent)


def spacing_into(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """In place: float64 magnitudes (≥ 0) become `frexp_ulp` / eps, so that the ulp is
    this × eps (an exact scaling, which the callers fold into a later pass).

    For float32, bf16 and fp16 by a bit trick, one pass and no temporary: clamp to the
    dtype's smallest normal, round the exponent up where float32 rounding would, keep
    only the exponent (2^⌊log2⌋).
    """
    if dtype not in _BIT_TRICK_DTYPES:
        return magnitude.copy_(frexp_ulp(magnitude, dtype)).div_(EPS[dtype])
    magnitude.clamp_min_(torch.finfo(dtype).tiny)
    bits = magnitude.view(torch.int64)
    bits.add_(_FLOAT32_ROUND_UP)
    bits.bitwise_and_(_EXPONENT_BITS)
    return magnitude


def ulp_into(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """In place: float64 magnitudes (≥ 0) become the spacing of `dtype` there (`frexp_ulp`)."""
    return spacing_into(magnitude, dtype).mul_(EPS[dtype])


def spacing_of_max_into(expected: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`spacing_into(max(|expected|, |base|))`, in place in `expected`, in five integer
    passes instead of six float ones (no |·|, no float maximum, nothing out of place).
    base (overwritten) must hold float32 numbers (a widened bf16/fp16/fp32 W0); both are
    flat float64, finite; dtype in `_BIT_TRICK_DTYPES`.

    Why it is the same number bit for bit: x ↦ (bits(x) + 2²⁸) & exponent mask is
    monotonic on x ≥ 0 (rounding to float32 is), so it commutes with max; the mask drops
    the sign bit, which the + 2²⁸ cannot reach for a finite value, so |·| is implicit; the
    clamp at the dtype's smallest normal (a power of two, a fixed point of the map) can
    come last. A float32 base has zero low bits: + 2²⁸ cannot carry there, only the mask
    is needed.
    """
    bits = expected.view(torch.int64).add_(_FLOAT32_ROUND_UP)
    bits.bitwise_and_(_EXPONENT_BITS)
    base_bits = base.view(torch.int64).bitwise_and_(_EXPONENT_BITS)
    torch.maximum(bits, base_bits, out=bits)
    bits.clamp_min_(_TINY_BITS[dtype])
    return expected


# --------------------------------------------------------------------------- slack

SlackFactor = tuple[torch.Tensor, torch.Tensor, float]  # (|B| rows, |A|, 2·eps32·|w·s|), float32


def slack_factor(b32: torch.Tensor, a32: torch.Tensor, factor: float) -> SlackFactor:
    """(|B|·|A|)·|f| then ·2eps in float32 is (|B|·|A|)·(|f|·2eps): 2eps is a power of two."""
    return b32.abs(), a32.abs(), abs(factor) * SLACK_PER_UNIT


def slack_into(total: torch.Tensor, spare: torch.Tensor, factors: Sequence[SlackFactor], lo: int, hi: int) -> torch.Tensor:
    """What float32 arithmetic may add to rows [lo, hi) of a merge: Σ 2·eps32·|w·s|·|B|·|A|
    in float32, in B·A's (out, in·k) layout. total/spare: float32 (hi − lo, n) buffers.

    A merge computed in float32 (ours, PEFT's, on a CPU or a GPU) carries product
    errors of a few float32 eps times |w·s|·|B|·|A|; in a bf16 checkpoint this is
    invisible, in an fp32 one it is what separates a correct merge computed in another
    order from a wrong one.
    """
    for index, (b, a, factor) in enumerate(factors):
        product = total if index == 0 else spare
        torch.matmul(b[lo:hi], a, out=product)
        product.mul_(factor)
        if index:
            total.add_(spare)
    return total


def slack_shift_bound(factors: Sequence[SlackFactor], update_sq: float, count: int) -> float:
    """An upper bound on the slack shift ⟨slack, |ΔW|⟩ / ‖ΔW‖² that `fill_figures` takes,
    from the factors alone, so that a check whose strength allowance is decided by σ_k
    anyway (the shift below K_SIGMAS·σ_k: any bf16 or fp16 tensor of a usual update) need
    not compute the slack of every element.

    Cauchy–Schwarz: ⟨slack, |u|⟩ ≤ ‖slack‖_F·‖u‖_F; the triangle inequality over layers;
    and ‖|B|·|A|‖_F² = Σₖₗ (|B|ᵀ|B|)ₖₗ·(|A|·|A|ᵀ)ₖₗ, an r×r sum (O((m + n)·r²), no m×n
    matrix). The rest are the roundings of what the blocks compute, all of them upward
    here: `slack_into`'s float32 sums of nonnegative terms (at most (1 + u₃₂)^(r+L+2)
    above the exact), the float64 dots over `count` elements, the division. docs/math.md
    ("Row blocks in bf16 and fp16: the slack only where it can matter").
    """
    if update_sq <= 0:
        return math.inf
    norm = 0.0
    for b_abs, a_abs, factor in factors:
        gram_b = b_abs.double().T @ b_abs.double()
        gram_a = a_abs.double() @ a_abs.double().T
        norm += factor * math.sqrt(max(float((gram_b * gram_a).sum()), 0.0))
    rank = max((a_abs.shape[0] for _, a_abs, _ in factors), default=0)
    float32_sums = 1.0 + (rank + len(factors) + 2) * 2.0**-23
    float64_sums = 1.0 + (count + rank * rank + 4) * 2.0**-51
    if float64_sums >= 2.0:
        return math.inf
    return norm * float32_sums * float64_sums**2 * math.sqrt(update_sq * float64_sums) / update_sq


# --------------------------------------------------------------------------- element-wise figures


@dataclass
class Sums:
    """What the blocks add up to (one block: the whole tensor); `fill_figures` turns it
    into the check's figures."""

    max_abs_error: float = 0.0
    max_expected: float = 0.0
    worst: float = 0.0
    worst_at: int | None = None  # flat index of the first worst element
    diff_dot_update: float = 0.0
    update_sq: float = 0.0
    spread_sq: float = 0.0  # Σ (ΔW·ulp)²
    slack_dot_update: float = 0.0
    max_spacing: float = 0.0  # the float32 screen's: its largest spacing (`screen.spread_bound`)
    finite: bool = True
    fp32_round_once: bool = True  # merge's recipe reproduces every block so far
    stored_is_base: bool = True
    expected_rounds_to_base: bool = True

    def add(self, other: Sums) -> None:
        """Fold in the sums of other blocks (another worker's), as if they had come in
        this order: maxima, sums, and-ed flags; the worst element is the first of the
        largest (lowest flat index), as one pass over all blocks in order would find it."""
        self.max_abs_error = max(self.max_abs_error, other.max_abs_error)
        self.max_expected = max(self.max_expected, other.max_expected)
        if other.worst_at is not None and (
            self.worst_at is None or (other.worst, -other.worst_at) > (self.worst, -self.worst_at)
        ):
            self.worst, self.worst_at = other.worst, other.worst_at
        self.diff_dot_update += other.diff_dot_update
        self.update_sq += other.update_sq
        self.spread_sq += other.spread_sq
        self.slack_dot_update += other.slack_dot_update
        self.max_spacing = max(self.max_spacing, other.max_spacing)
        self.finite &= other.finite
        self.fp32_round_once &= other.fp32_round_once
        self.stored_is_base &= other.stored_is_base
        self.expected_rounds_to_base &= other.expected_rounds_to_base


def judge_rows(
    rows: Sequence[torch.Tensor], slack: torch.Tensor, dtype: torch.dtype, sums: Sums, offset: int,
    atol: float | None, rtol: float | None, step: torch.Tensor | None = None,
) -> None:
    """Add one block's element-wise figures to `sums`; offset: its first flat index.

    rows: six flat float64 buffers, W0, E − W0, E, MERGED and two scratch; all but the
    update are overwritten. slack: `slack_into`'s float32 bound for these elements.
    Stops early (sums.finite False) at a NaN or an Inf. The tolerance: one ulp of the
    stored dtype (of max(|E|, |W0|)) plus float32's slack, or atol + rtol·|E| if given.
    `step`: each element's own rounding step instead of the dtype's ulp (an FP8 value:
    one code's step times its block's scale), in the tolerance and the spread of k.
    """
    base, update, expected, actual, magnitude, scratch = rows
    diff = actual.sub_(expected)
    error = torch.abs(diff, out=scratch)
    block_error = float(torch.amax(error))  # amax: twice as fast as max(), NaN propagates too
    torch.abs(expected, out=magnitude)
    block_expected = float(torch.amax(magnitude))
    if not (math.isfinite(block_error) and math.isfinite(block_expected)):
        sums.finite = False
        return
    sums.max_abs_error = max(sums.max_abs_error, block_error)
    sums.max_expected = max(sums.max_expected, block_expected)
    # k = ⟨W_merged − W0, ΔW⟩/‖ΔW‖² = 1 + ⟨W_merged − E, ΔW⟩/‖ΔW‖²
    sums.diff_dot_update += float(torch.dot(diff, update))
    sums.update_sq += float(torch.dot(update, update))
    tolerance = None
    if atol is not None or rtol is not None:  # before |E| becomes the ulp
        tolerance = torch.mul(magnitude, rtol or 0.0, out=expected).add_(atol or 0.0).clamp_min_(_TINY64)
    torch.maximum(magnitude, torch.abs(base, out=actual), out=magnitude)
    eps = EPS[dtype] if step is None else 1.0
    spacing = spacing_into(magnitude, dtype) if step is None else magnitude.copy_(step)  # the ulp is eps × this
    # rounding to the stored dtype: variance ulp²/12 per element
    spread = torch.mul(update, spacing, out=actual)
    sums.spread_sq += float(torch.dot(spread, spread)) * (eps * eps)
    slack64 = base.copy_(slack)
    sums.slack_dot_update += float(torch.dot(slack64, torch.abs(update, out=actual)))
    if tolerance is None:  # one ulp of the stored dtype, plus float32's slack
        tolerance = torch.add(slack64, spacing, alpha=eps, out=spacing)
    worst = error.div_(tolerance)
    block_worst = float(torch.amax(worst))
    if block_worst > sums.worst or sums.worst_at is None:
        sums.worst = block_worst
        sums.worst_at = offset + first_argmax(worst)


def first_argmax(values: torch.Tensor) -> int:
    """Index of the first largest element of a flat finite tensor, as torch.argmax gives
    it; through numpy on the CPU, whose argmax is ~10× faster than torch's here."""
    if values.device.type == "cpu":
        return int(np.argmax(values.numpy()))
    return int(values.argmax())


def fill_figures(check: TensorCheck, sums: Sums) -> float:
    """Fill in the check's figures from the sums; returns the strength allowance."""
    check.max_abs_error = sums.max_abs_error
    check.max_rel_error = sums.max_abs_error / sums.max_expected if sums.max_expected > 0 else 0.0
    check.worst_ulps = sums.worst
    if sums.update_sq <= 0:
        return 0.0
    check.strength = 1.0 + sums.diff_dot_update / sums.update_sq
    check.strength_spread = math.sqrt(sums.spread_sq / 12.0) / sums.update_sq
    # float32 arithmetic before the rounding (w·s itself rounded, DoRA's norm, the
    # product) may shift every element the same way: at most ⟨slack, |ΔW|⟩/‖ΔW‖².
    # Invisible next to bf16 rounding; in fp32 it is what a correct GPU merge shows.
    slack_shift = sums.slack_dot_update / sums.update_sq
    return max(K_SIGMAS * check.strength_spread, slack_shift)


def fit_residual(
    rows: Sequence[torch.Tensor], slack: torch.Tensor, work32: torch.Tensor, strength: float, dtype: torch.dtype,
    atol: float | None, rtol: float | None, step: torch.Tensor | None = None,
) -> float:
    """Worst |MERGED − (W0 + k·ΔW)| over its tolerance in these elements: ≤ 1 means the
    update was applied at the wrong strength (half, double, sign flipped, the wrong
    alpha), rather than being something else altogether.

    rows: as `judge_rows` (W0, E − W0, E, MERGED, scratch ×2), MERGED, E and the scratch
    overwritten; slack: `slack_into`'s bound (scaled here, in place); work32: a float32
    buffer like it. The tolerance is that of `judge_rows` at the fitted weight: the ulp
    of max(|fit|, |MERGED|, |W0|) + max(1, |k|)·slack, each step rounded in float32.
    """
    base, update, expected, actual, magnitude, scratch = rows
    fitted = torch.add(base, update, alpha=strength, out=scratch)
    if atol is None and rtol is None:
        torch.maximum(torch.abs(fitted, out=magnitude), torch.abs(actual, out=expected), out=magnitude)
        torch.maximum(magnitude, torch.abs(base, out=expected), out=magnitude)
        scaled = slack.mul_(max(1.0, abs(strength)))
        ulp = ulp_into(magnitude, dtype) if step is None else step  # `step`: as judge_rows'
        tolerance = magnitude.copy_(work32.copy_(ulp).add_(scaled))
    else:
        tolerance = torch.abs(expected, out=magnitude).mul_(rtol or 0.0).add_(atol or 0.0)
    tolerance.clamp_min_(_TINY64)
    residual = actual.sub_(fitted).abs_().div_(tolerance)
    return float(residual.max()) if residual.numel() else 0.0


# --------------------------------------------------------------------------- forward check


def forward_inputs(seed: int, width: int) -> torch.Tensor:
    """The forward check's random inputs (FORWARD_BATCH, width), float64."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(FORWARD_BATCH, width, generator=generator, dtype=torch.float64)


def forward_error(
    x: torch.Tensor, layers: Sequence[tuple[LayerTarget, float]], merged_out: torch.Tensor, base_out: torch.Tensor
) -> float:
    """Relative error of x·W_mergedᵀ against the unmerged x·W0ᵀ + Σ s·(x·Aᵀ)·Bᵀ path,
    from merged_out = x·W_mergedᵀ and base_out = x·W0ᵀ."""
    return relative_error(merged_out, unmerged_forward(x, layers, base_out))


def unmerged_forward(x: torch.Tensor, layers: Sequence[tuple[LayerTarget, float]], base_out: torch.Tensor) -> torch.Tensor:
    """x·W0ᵀ + Σ s·(x·Aᵀ)·Bᵀ in float64, from base_out = x·W0ᵀ: the forward check's reference."""
    reference = base_out
    for target, weight in layers:
        a = factor_tensor(target.layer.a_matrix, "cpu", torch.float64).reshape(-1, x.shape[1])
        b = factor_tensor(target.layer.b_matrix, "cpu", torch.float64)
        reference = reference + ((x @ a.T) @ b.T) * (target.layer.scale * weight)
    return reference


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """max |out − reference| / max |reference| (0 for a zero reference)."""
    scale = float(reference.abs().max())
    return float((out - reference).abs().max()) / scale if scale > 0 else 0.0


# --------------------------------------------------------------------------- PEFT's recipes


def peft_recipes(base_dtype: torch.dtype) -> list[tuple[bool, str]]:
    """(rounded twice?, name) of the PEFT recipes worth replaying, in the order tried:
    adapter weights in the model's dtype, delta rounded, then added in that dtype. On a
    CPU PEFT computes B·A·s in fp32 and rounds once; on a GPU a bf16/fp16 GEMM rounds
    B·A, and the scaling rounds again."""
    name = str(base_dtype).removeprefix("torch.")
    recipes = [(False, f"PEFT delta in {name}, added in {name}")]
    if base_dtype in (torch.bfloat16, torch.float16):
        recipes.append((True, f"PEFT on a GPU: B·A and its scaling rounded to {name}, added in {name}"))
    return recipes


def peft_delta_into(delta: torch.Tensor, product: torch.Tensor, factor: float, twice: bool) -> torch.Tensor:
    """PEFT's delta in the model's dtype (`delta`) from product = B·A in float32
    (overwritten). twice=False: (B·A)·s in float32, rounded once; twice=True (a GPU):
    B·A rounded, widened, scaled in float32 and rounded again."""
    if twice:
        delta.copy_(product)
        product.copy_(delta)
    product.mul_(factor)
    return delta.copy_(product)


def worst_index(sums: Sums, shape: Sequence[int]) -> list[int]:
    """Where the worst element is, as an index into a tensor of `shape`."""
    assert sums.worst_at is not None
    return [int(i) for i in torch.unravel_index(torch.tensor(sums.worst_at), tuple(shape))] if len(shape) else []
