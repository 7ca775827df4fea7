"""Row-block math of verify's fast path: one plain LoRA tensor judged block by block.

Why blocks: the whole-tensor check (`tensor_check.check_tensor`) makes about thirty
float64 passes, each over a fresh full-size temporary; at 1B shapes the page faults of
those allocations cost more than the arithmetic (40 M+ minor faults, most of verify's
time in the kernel). Here every pass runs over one block of rows (~64 K elements) in
buffers allocated once (`Workspace`), so a block stays in cache through all of them,
and B·A is computed once per block instead of once per check.

The figures are those of the whole-tensor check: the expectation is W0 + Σ wᵢ·sᵢ·BᵢAᵢ
in float64 (rounding to the stored dtype is judged with a tolerance of one ulp of
that dtype plus float32's slack), k and σ_k are the same sums taken block by block,
the ulp is bit for bit `tensor_check._ulp`'s. They differ only in float64 rounding
(the products are summed per block, w·s is folded into A), far below any tolerance.
The recipe replay is float32 and bit-exact: it repeats `merge`'s own operations
(`dense.merge_rows_into`, at least two rows per GEMM) and PEFT's, only per block.

Only plain layers take this path (`merge.is_plain`: untransposed LoRA, no DoRA, bias
or replacement), stored and base in bf16, fp16 or fp32; everything else, and any
tensor holding a NaN or an Inf, goes through the whole-tensor check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lora_tools.linalg.dense import factor_tensor, is_power_of_two
from lora_tools.engine.binding import LayerTarget

# Row blocks of about this many elements. Each block costs ~170 µs of fixed overhead
# (about forty torch calls) and its six float64 buffers should stay in cache between
# passes: measured at 1B shapes on two cores, 64 K: 11.9 ns/element, 128 K: 10.5,
# 256 K-1 M: 9.6-10.
BLOCK_ELEMENTS = 256 * 1024
FORWARD_BATCH = 8  # must match tensor_check.FORWARD_BATCH: the same random inputs

FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
_EXPONENT_BITS = 0x7FF0000000000000
# Adding this to a float64's bits carries into the exponent exactly when rounding it
# to float32 (nearest, ties to even) rounds it up to the next power of two.
_FLOAT32_ROUND_UP = 1 << 28
_TINY64 = torch.finfo(torch.float64).tiny
_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def row_blocks(rows: int, width: int, block_elements: int | None = None) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of about `block_elements` (default BLOCK_ELEMENTS, read at
    call time so that tests can make blocks small) each, never a 1-row block: a GEMM
    with one row is a GEMV, whose sums differ from the matrix product merge computed."""
    step = max(2, (block_elements or BLOCK_ELEMENTS) // max(width, 1))
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, [*starts[1:], rows]))


def max_block_rows(rows: int, width: int, block_elements: int | None = None) -> int:
    return max((hi - lo for lo, hi in row_blocks(rows, width, block_elements)), default=0)


def power_of_two_into(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """In place: float64 magnitudes (≥ 0) become the ulp of `dtype` there divided by
    the dtype's eps, so that the ulp is this × eps (an exact scaling, folded by the
    callers into a later pass).

    Bit for bit `tensor_check._ulp(magnitude, dtype) / eps`, which rounds to float32
    first, without the float32 round trip: clamp to the dtype's smallest normal, round
    the exponent up where float32 rounding would, keep only the exponent (2^⌊log2⌋).
    """
    magnitude.clamp_min_(torch.finfo(dtype).tiny)
    bits = magnitude.view(torch.int64)
    bits.add_(_FLOAT32_ROUND_UP)
    bits.bitwise_and_(_EXPONENT_BITS)
    return magnitude


def ulp_into(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """In place: float64 magnitudes (≥ 0) become the spacing of `dtype` there, bit for
    bit `tensor_check._ulp` (see `power_of_two_into`)."""
    return power_of_two_into(magnitude, dtype).mul_(_EPS[dtype])


@dataclass
class Buffers:
    """One block's views of the workspace: flat (element-wise passes, dots) and
    (rows, width) (GEMM operands), made once per block shape, not once per pass."""

    flat64: list[torch.Tensor]
    mat64: list[torch.Tensor]
    flat32: list[torch.Tensor]
    mat32: list[torch.Tensor]
    narrow: dict[torch.dtype, list[torch.Tensor]]
    forward: torch.Tensor  # (batch, rows): x·Wᵀ of this block


@dataclass
class Workspace:
    """Buffers reused by every block of every tensor: allocated once, grown when a
    larger block needs more, so no pass faults in fresh pages."""

    capacity: int = 0
    f64: list[torch.Tensor] = field(default_factory=list)
    f32: list[torch.Tensor] = field(default_factory=list)
    _views: dict[tuple[int, int], Buffers] = field(default_factory=dict)
    _narrow: dict[torch.dtype, list[torch.Tensor]] = field(default_factory=dict)

    def reserve(self, elements: int) -> None:
        if elements > self.capacity:
            self.capacity = elements
            self.f64 = [torch.empty(elements, dtype=torch.float64) for _ in range(6)]
            self.f32 = [torch.empty(elements, dtype=torch.float32) for _ in range(3)]
            self._views, self._narrow = {}, {}

    def block(self, rows: int, width: int) -> Buffers:
        views = self._views.get((rows, width))
        if views is None:
            count = rows * width
            flat64, flat32 = [t[:count] for t in self.f64], [t[:count] for t in self.f32]
            views = Buffers(
                flat64, [t.view(rows, width) for t in flat64], flat32, [t.view(rows, width) for t in flat32], {},
                torch.empty((FORWARD_BATCH, rows), dtype=torch.float64),
            )
            self._views[(rows, width)] = views
        return views

    def narrow(self, views: Buffers, dtype: torch.dtype) -> list[torch.Tensor]:
        """Two flat buffers in a stored dtype (bf16, fp16, fp32) for this block shape."""
        if dtype not in views.narrow:
            if dtype not in self._narrow:
                self._narrow[dtype] = [torch.empty(self.capacity, dtype=dtype) for _ in range(2)]
            views.narrow[dtype] = [t[: views.flat64[0].numel()] for t in self._narrow[dtype]]
        return views.narrow[dtype]


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal(a, b) for two flat tensors of one dtype, bitwise first: identical bits
    are equal values (the tensors on this path are finite), and numpy compares integer
    views several times faster than torch.equal compares bf16. Only when the bits
    differ does torch.equal decide (−0.0 equals +0.0)."""
    integer = _SAME_SIZE_INTEGER[a.element_size()]
    if a.dtype == b.dtype and np.array_equal(a.view(integer).numpy(), b.view(integer).numpy()):
        return True
    return bool(torch.equal(a, b))


@dataclass
class Factors:
    """Everything per tensor that the blocks share, prepared once.

    expected: per layer float64 (B, A or f·A, f, folded?): ΔWᵢ = (B·A)·f as `dense.apply_layer`
              computes it, f folded into A only when a power of two (the same bits);
    slack: per layer |B|, |A| and 2·eps32·|w·s| in float32, for the bound
           Σ 2·eps32·|w·s|·|B|·|A| computed as `tensor_check.compute_slack` does;
    replay: float32 factors per layer (B, A, what merge multiplies B by: f·A when it
            folds a power-of-two f, else A; f; folded?);
    x: the forward check's random inputs (batch, width).
    """

    layers: list[tuple[LayerTarget, float]]
    expected: list[tuple[torch.Tensor, torch.Tensor, float, bool]]
    slack: list[tuple[torch.Tensor, torch.Tensor, float]]
    replay: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, bool]]
    x: torch.Tensor


def prepare_factors(layers: list[tuple[LayerTarget, float]], width: int, seed: int) -> Factors:
    """Convert the factors once per tensor, not once per block; x is drawn exactly as
    `tensor_check._forward_error` draws it (same seed, shape and dtype)."""
    expected, slack, replay = [], [], []
    for target, weight in layers:
        factor = target.layer.scale * weight
        b = factor_tensor(target.layer.b_matrix, "cpu", torch.float64)
        a = factor_tensor(target.layer.a_matrix, "cpu", torch.float64).reshape(-1, width)
        fused = is_power_of_two(factor)
        expected.append((b, a * factor if fused else a, factor, fused))
        b32 = factor_tensor(target.layer.b_matrix, "cpu", torch.float32)
        a32 = factor_tensor(target.layer.a_matrix, "cpu", torch.float32).reshape(-1, width)
        # (|B|·|A|)·|f| then ·2eps in float32 is (|B|·|A|)·(|f|·2eps): 2eps is a power of two
        slack.append((b32.abs(), a32.abs(), abs(factor) * 2 * _EPS[torch.float32]))
        replay.append((b32, a32, a32 * factor if fused else a32, factor, fused))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(FORWARD_BATCH, width, generator=generator, dtype=torch.float64)
    return Factors(layers, expected, slack, replay, x)


@dataclass
class Sums:
    """What the blocks add up to; `verify_blocks._figures` turns it into the check's figures."""

    max_abs_error: float = 0.0
    max_expected: float = 0.0
    worst: float = 0.0
    worst_at: int | None = None  # flat index of the first worst element
    diff_dot_update: float = 0.0
    update_sq: float = 0.0
    spread_sq: float = 0.0  # Σ (ΔW·ulp)²
    slack_dot_update: float = 0.0
    finite: bool = True
    fp32_round_once: bool = True  # merge's recipe reproduces every block so far
    stored_is_base: bool = True
    expected_rounds_to_base: bool = True


def expected_into(f: Factors, lo: int, hi: int, w0: torch.Tensor, views: Buffers) -> None:
    """Buffers 0-2 become W (float64 base), the update E − W and E = W + ΔW; the update
    exactly as the whole-tensor check takes it (E − W, not ΔW: an update below W's
    float64 spacing counts as none). w0: this block's rows, flat."""
    base, update, expected = views.flat64[:3]
    base.copy_(w0)
    for index, (b, a, factor, folded) in enumerate(f.expected):  # W0 + ΔW₁ + ΔW₂ …, in order
        delta = views.mat64[1 if index == 0 else 5]
        torch.matmul(b[lo:hi], a, out=delta)  # (matmul, then add: faster than addmm in float64)
        if not folded:
            delta.mul_(factor)
        if index == 0:
            torch.add(base, update, out=expected)
        else:
            expected.add_(views.flat64[5])
    torch.sub(expected, base, out=update)


def judge_block(
    ws: Workspace, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor, sums: Sums,
    forward_merged: torch.Tensor, forward_base: torch.Tensor, atol: float | None, rtol: float | None,
) -> None:
    """Every element-wise figure of one block of rows; w0/stored: the rows, flat.

    forward_merged/forward_base: (batch, all rows) outputs of the forward check, this
    block's rows filled in. Stops early (sums.finite False) at a NaN or an Inf.
    """
    rows = hi - lo
    width = stored.numel() // rows
    dtype = stored.dtype
    views = ws.block(rows, width)
    expected_into(f, lo, hi, w0, views)
    base, update, expected, actual, magnitude, scratch = views.flat64
    if sums.stored_is_base:
        _track_base(ws, views, sums, w0, stored, expected)
    actual.copy_(stored)
    forward_merged[:, lo:hi] = torch.matmul(f.x, views.mat64[3].T, out=views.forward)
    forward_base[:, lo:hi] = torch.matmul(f.x, views.mat64[0].T, out=views.forward)
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
    sums.diff_dot_update += float(torch.dot(diff, update))
    sums.update_sq += float(torch.dot(update, update))
    tolerance = None
    if atol is not None or rtol is not None:  # before |E| becomes the ulp
        tolerance = torch.mul(magnitude, rtol or 0.0, out=expected).add_(atol or 0.0).clamp_min_(_TINY64)
    torch.maximum(magnitude, torch.abs(base, out=actual), out=magnitude)
    eps = _EPS[dtype]
    spacing = power_of_two_into(magnitude, dtype)  # the ulp is eps × this
    spread = torch.mul(update, spacing, out=actual)
    sums.spread_sq += float(torch.dot(spread, spread)) * (eps * eps)
    slack = views.flat64[0].copy_(slack_into(f, lo, hi, views))
    sums.slack_dot_update += float(torch.dot(slack, torch.abs(update, out=actual)))
    if tolerance is None:  # one ulp of the stored dtype, plus float32's slack
        tolerance = torch.add(slack, spacing, alpha=eps, out=spacing)
    worst = error.div_(tolerance)
    block_worst = float(torch.amax(worst))
    if block_worst > sums.worst or sums.worst_at is None:
        sums.worst = block_worst
        sums.worst_at = lo * width + int(worst.argmax())
    if sums.fp32_round_once:
        sums.fp32_round_once = replay_fp32_round_once(ws, views, f, lo, hi, w0, stored)


def slack_into(f: Factors, lo: int, hi: int, views: Buffers) -> torch.Tensor:
    """What float32 arithmetic may add to these rows of a merge (float32, flat), bit for
    bit `tensor_check.compute_slack`: Σ (|B|·|A|)·(2·eps32·|w·s|), summed in float32.
    Uses float32 buffers 1 and 2."""
    total, term = views.mat32[1], views.mat32[2]
    for index, (b, a, factor) in enumerate(f.slack):
        product = total if index == 0 else term
        torch.matmul(b[lo:hi], a, out=product)
        product.mul_(factor)
        if index:
            total.add_(term)
    return views.flat32[1]


def _track_base(ws: Workspace, views: Buffers, sums: Sums, w0: torch.Tensor, stored: torch.Tensor, expected: torch.Tensor) -> None:
    """"not applied" needs: MERGED equals the base rounded to its dtype, and the
    expectation does not. Checked only while the first still holds (one block, usually)."""
    first, second = ws.narrow(views, stored.dtype)
    base_rounded = w0 if w0.dtype == stored.dtype else first.copy_(w0)
    sums.stored_is_base = same_values(stored, base_rounded)
    if sums.stored_is_base and sums.expected_rounds_to_base:
        sums.expected_rounds_to_base = same_values(second.copy_(expected), base_rounded)


def replay_fp32_round_once(
    ws: Workspace, views: Buffers, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor
) -> bool:
    """Does `merge`'s float32 recipe give these rows' stored bytes? The same operations
    as `dense.merge_rows_into(fuse=True)`, on this block."""
    widened, acc, spare = views.mat32
    views.flat32[0].copy_(w0)
    for index, (b, _, a, factor, fused) in enumerate(f.replay):
        if fused:
            torch.addmm(widened if index == 0 else acc, b[lo:hi], a, out=acc)
            continue
        delta = acc if index == 0 else spare
        torch.matmul(b[lo:hi], a, out=delta)
        delta.mul_(factor)
        acc.add_(widened if index == 0 else delta)
    rounded = ws.narrow(views, stored.dtype)[0].copy_(views.flat32[1])
    return same_values(rounded, stored)


def replay_peft_block(
    ws: Workspace, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor, twice: bool
) -> bool:
    """PEFT with factors in the model's dtype, on these rows (`tensor_check._recipes`).

    twice=False: ΔW = (B·A)·s in float32, rounded to W0's dtype, added in that dtype.
    twice=True (a GPU): B·A rounded to W0's dtype, its scaling rounded again, added.
    """
    rows = hi - lo
    views = ws.block(rows, stored.numel() // rows)
    current, delta = ws.narrow(views, w0.dtype)
    current.copy_(w0)
    product = views.flat32[0]
    for (b, a, _, _, _), (target, weight) in zip(f.replay, f.layers):
        torch.matmul(b[lo:hi], a, out=views.mat32[0])
        if twice:
            delta.copy_(product)
            product.copy_(delta).mul_(target.layer.scale * weight)
        else:
            product.mul_(target.layer.scale * weight)
        current.add_(delta.copy_(product))
    return bool(torch.equal(current, stored))


def fits_block(
    ws: Workspace, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor, strength: float,
    atol: float | None, rtol: float | None,
) -> float:
    """Worst |stored − (W0 + k·ΔW)| over its tolerance in these rows (`_fits_strength`)."""
    rows = hi - lo
    views = ws.block(rows, stored.numel() // rows)
    expected_into(f, lo, hi, w0, views)
    base, update, expected, actual, magnitude, scratch = views.flat64
    actual.copy_(stored)
    fitted = torch.add(base, update, alpha=strength, out=scratch)
    if atol is None and rtol is None:
        torch.maximum(torch.abs(fitted, out=magnitude), torch.abs(actual, out=expected), out=magnitude)
        torch.maximum(magnitude, torch.abs(base, out=expected), out=magnitude)
        # as _fits_strength: ulp + max(1, |k|)·slack, each step rounded in float32
        slack = slack_into(f, lo, hi, views).mul_(max(1.0, abs(strength)))
        tolerance = magnitude.copy_(views.flat32[0].copy_(ulp_into(magnitude, stored.dtype)).add_(slack))
    else:
        tolerance = torch.abs(expected, out=magnitude).mul_(rtol or 0.0).add_(atol or 0.0)
    tolerance.clamp_min_(_TINY64)
    residual = actual.sub_(fitted).abs_().div_(tolerance)
    return float(residual.max()) if residual.numel() else 0.0


def forward_error(f: Factors, forward_merged: torch.Tensor, forward_base: torch.Tensor) -> float:
    """max |x·W_mergedᵀ − (x·W0ᵀ + Σ s·(x·Aᵀ)·Bᵀ)| / max |reference| from the per-block
    outputs (`tensor_check._forward_error`, plain layers)."""
    x = f.x
    reference = forward_base
    for target, weight in f.layers:
        a = factor_tensor(target.layer.a_matrix, "cpu", torch.float64).reshape(-1, x.shape[1])
        b = factor_tensor(target.layer.b_matrix, "cpu", torch.float64)
        reference = reference + ((x @ a.T) @ b.T) * (target.layer.scale * weight)
    scale = float(reference.abs().max())
    return float((forward_merged - reference).abs().max()) / scale if scale > 0 else 0.0
