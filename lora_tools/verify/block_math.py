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
all by the same functions (`figures`; there the whole tensor is one block). They
differ only in float64 rounding (the products are summed per block, w·s is folded into
A), far below any tolerance. The recipe replay is float32 and bit-exact: `merge`'s own
arithmetic (`dense.merge_block_into`, at least two rows per GEMM) and PEFT's
(`figures.peft_delta_into`), only per block.

Only plain layers take this path (`merge.is_plain`: untransposed LoRA, no DoRA, bias
or replacement), stored and base in bf16, fp16 or fp32; everything else, and any
tensor holding a NaN or an Inf, goes through the whole-tensor check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lora_tools.engine.binding import LayerTarget
from lora_tools.linalg.dense import MergeFactor, factor_tensor, is_power_of_two, merge_block_into, merge_factors
from lora_tools.verify.figures import (
    FORWARD_BATCH,
    SlackFactor,
    Sums,
    fit_residual,
    forward_inputs,
    judge_rows,
    peft_delta_into,
    slack_factor,
    slack_into,
)

# Row blocks of about this many elements. Each block costs ~170 µs of fixed overhead
# (about forty torch calls) and its six float64 buffers should stay in cache between
# passes: measured at 1B shapes on two cores, 64 K: 11.9 ns/element, 128 K: 10.5,
# 256 K-1 M: 9.6-10.
BLOCK_ELEMENTS = 256 * 1024

FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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
    slack: per layer `figures.slack_factor`s (|B|, |A|, 2·eps32·|w·s|) in float32;
    replay: merge's own float32 factors (`dense.merge_factors`, fused as on the CPU);
    peft: float32 (B, A, w·s) per layer, for PEFT's recipes;
    x: the forward check's random inputs (batch, width).
    """

    layers: list[tuple[LayerTarget, float]]
    expected: list[tuple[torch.Tensor, torch.Tensor, float, bool]]
    slack: list[SlackFactor]
    replay: list[MergeFactor]
    peft: list[tuple[torch.Tensor, torch.Tensor, float]]
    x: torch.Tensor


def prepare_factors(layers: list[tuple[LayerTarget, float]], width: int, seed: int) -> Factors:
    """Convert the factors once per tensor, not once per block; x is drawn as the
    whole-tensor check draws it (`figures.forward_inputs`)."""
    expected, slack, peft = [], [], []
    for target, weight in layers:
        factor = target.layer.scale * weight
        b = factor_tensor(target.layer.b_matrix, "cpu", torch.float64)
        a = factor_tensor(target.layer.a_matrix, "cpu", torch.float64).reshape(-1, width)
        fused = is_power_of_two(factor)
        expected.append((b, a * factor if fused else a, factor, fused))
        b32 = factor_tensor(target.layer.b_matrix, "cpu", torch.float32)
        a32 = factor_tensor(target.layer.a_matrix, "cpu", torch.float32).reshape(-1, width)
        slack.append(slack_factor(b32, a32, factor))
        peft.append((b32, a32, factor))
    replay = merge_factors(layers, "cpu", torch.float32, fuse=True)
    return Factors(layers, expected, slack, replay, peft, forward_inputs(seed, width))


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
    """Every element-wise figure of one block of rows (`figures.judge_rows`); w0/stored:
    the rows, flat.

    forward_merged/forward_base: (batch, all rows) outputs of the forward check, this
    block's rows filled in. Stops early (sums.finite False) at a NaN or an Inf.
    """
    rows = hi - lo
    width = stored.numel() // rows
    views = ws.block(rows, width)
    expected_into(f, lo, hi, w0, views)
    if sums.stored_is_base:
        _track_base(ws, views, sums, w0, stored, views.flat64[2])
    views.flat64[3].copy_(stored)
    forward_merged[:, lo:hi] = torch.matmul(f.x, views.mat64[3].T, out=views.forward)
    forward_base[:, lo:hi] = torch.matmul(f.x, views.mat64[0].T, out=views.forward)
    slack_into(views.mat32[1], views.mat32[2], f.slack, lo, hi)  # float32 buffer 1, flat
    judge_rows(views.flat64, views.flat32[1], stored.dtype, sums, lo * width, atol, rtol)
    if sums.finite and sums.fp32_round_once:
        sums.fp32_round_once = replay_fp32_round_once(ws, views, f, lo, hi, w0, stored)


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
    """Does `merge`'s float32 recipe give these rows' stored bytes? merge's own block
    arithmetic (`dense.merge_block_into`, fused as on the CPU), on this block."""
    widened, acc, spare = views.mat32
    views.flat32[0].copy_(w0)
    merge_block_into(acc, widened, f.replay, lo, hi, spare)
    rounded = ws.narrow(views, stored.dtype)[0].copy_(views.flat32[1])
    return same_values(rounded, stored)


def replay_peft_block(
    ws: Workspace, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor, twice: bool
) -> bool:
    """PEFT with factors in the model's dtype, on these rows (`figures.peft_recipes`)."""
    rows = hi - lo
    views = ws.block(rows, stored.numel() // rows)
    current, delta = ws.narrow(views, w0.dtype)
    current.copy_(w0)
    for b, a, factor in f.peft:
        torch.matmul(b[lo:hi], a, out=views.mat32[0])
        current.add_(peft_delta_into(delta, views.flat32[0], factor, twice))
    return bool(torch.equal(current, stored))


def fits_block(
    ws: Workspace, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor, strength: float,
    atol: float | None, rtol: float | None,
) -> float:
    """Worst |stored − (W0 + k·ΔW)| over its tolerance in these rows (`figures.fit_residual`)."""
    rows = hi - lo
    views = ws.block(rows, stored.numel() // rows)
    expected_into(f, lo, hi, w0, views)
    views.flat64[3].copy_(stored)
    if atol is None and rtol is None:
        slack_into(views.mat32[1], views.mat32[2], f.slack, lo, hi)
    return fit_residual(views.flat64, views.flat32[1], views.flat32[0], strength, stored.dtype, atol, rtol)
