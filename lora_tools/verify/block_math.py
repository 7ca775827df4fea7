"""Row-block math of verify's fast path: one plain LoRA tensor judged block by block.

Here: the row blocks, the buffers they are judged in (`Workspace`, `Buffers`), the
factors prepared once per tensor (`Factors`), the expectation (`expected_into`), the
judging of a block (`judge_block`, `judge_block_bounded`) and the search for its worst
element. The merge recipes replayed on a block are `replay`'s.

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
A), far below any tolerance.

Only plain layers take this path (`merge.is_plain`: untransposed LoRA, no DoRA, bias
or replacement), stored and base in bf16, fp16 or fp32; everything else, and any
tensor holding a NaN or an Inf, goes through the whole-tensor check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lora_tools.engine.binding import LayerTarget
from lora_tools.linalg.dense import MergeFactor, factor_tensor, is_power_of_two, merge_factors, row_blocks_of
from lora_tools.verify.figures import (
    EPS,
    FORWARD_BATCH,
    SlackFactor,
    Sums,
    first_argmax,
    forward_inputs,
    judge_rows,
    slack_factor,
    slack_into,
    spacing_of_max_into,
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
    call time so that tests can make blocks small) each, none too short to give the bits
    of the matrix product merge computed (`dense.row_blocks_of`)."""
    return row_blocks_of(rows, (block_elements or BLOCK_ELEMENTS) // max(width, 1))


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
    pair: torch.Tensor  # (2·rows, width): W0 (mat64[0]) above MERGED (mat64[3]), one GEMM for both
    forward_pair: torch.Tensor  # (batch, 2·rows)


@dataclass
class Workspace:
    """Buffers reused by every block of every tensor: allocated once, grown when a
    larger block needs more, so no pass faults in fresh pages."""

    capacity: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    f64: list[torch.Tensor] = field(default_factory=list)
    f32: list[torch.Tensor] = field(default_factory=list)
    _views: dict[tuple[int, int], Buffers] = field(default_factory=dict)
    _narrow: dict[torch.dtype, list[torch.Tensor]] = field(default_factory=dict)
    _flags: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))

    def reserve(self, elements: int) -> None:
        if elements > self.capacity:
            self.capacity = elements
            # buffers 0 and 3 (W0 and MERGED, widened) are the halves of one, per block
            self.f64 = [torch.empty(2 * elements, dtype=torch.float64, device=self.device)] + [
                torch.empty(elements, dtype=torch.float64, device=self.device) for _ in range(4)
            ]
            self.f32 = [torch.empty(elements, dtype=torch.float32, device=self.device) for _ in range(3)]
            self._views, self._narrow = {}, {}

    def block(self, rows: int, width: int) -> Buffers:
        views = self._views.get((rows, width))
        if views is None:
            count = rows * width
            pair = self.f64[0][: 2 * count]
            flat64 = [pair[:count], *(t[:count] for t in self.f64[1:3]), pair[count:], *(t[:count] for t in self.f64[3:])]
            flat32 = [t[:count] for t in self.f32]
            views = Buffers(
                flat64, [t.view(rows, width) for t in flat64], flat32, [t.view(rows, width) for t in flat32], {},
                torch.empty((FORWARD_BATCH, rows), dtype=torch.float64, device=self.device), pair.view(2 * rows, width),
                torch.empty((FORWARD_BATCH, 2 * rows), dtype=torch.float64, device=self.device),
            )
            self._views[(rows, width)] = views
        return views

    def flags(self, count: int) -> np.ndarray:
        """A reused boolean buffer of `count` elements."""
        if self._flags.size < count:
            self._flags = np.empty(max(count, self.capacity), dtype=bool)
        return self._flags[:count]

    def narrow(self, views: Buffers, dtype: torch.dtype) -> list[torch.Tensor]:
        """Two flat buffers in a stored dtype (bf16, fp16, fp32) for this block shape."""
        if dtype not in views.narrow:
            if dtype not in self._narrow:
                self._narrow[dtype] = [torch.empty(self.capacity, dtype=dtype, device=self.device) for _ in range(2)]
            views.narrow[dtype] = [t[: views.flat64[0].numel()] for t in self._narrow[dtype]]
        return views.narrow[dtype]


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal(a, b) for two flat tensors of one dtype, bitwise first: identical bits
    are equal values (the tensors on this path are finite), and numpy compares integer
    views several times faster than torch.equal compares bf16. Only when the bits
    differ does torch.equal decide (−0.0 equals +0.0)."""
    if a.device.type != "cpu":
        return bool(torch.equal(a, b))
    if a.dtype == b.dtype and a.numel() == b.numel():
        # as 8-byte words where the length allows: a quarter of the bf16 comparisons
        size = 8 if a.numel() * a.element_size() % 8 == 0 else a.element_size()
        integer = _SAME_SIZE_INTEGER[size]
        if np.array_equal(a.view(integer).numpy(), b.view(integer).numpy()):
            return True
    return bool(torch.equal(a, b))


@dataclass
class Factors:
    """Everything per tensor that the blocks share, prepared once.

    expected: per layer float64 (B, A or f·A, f, folded?): ΔWᵢ = (B·A)·f as `dense.apply_layer`
              computes it, f folded into A only when a power of two (the same bits);
    slack: per layer `figures.slack_factor`s (|B|, |A|, 2·eps32·|w·s|) in float32;
    replay: merge's own float32 factors (`dense.merge_factors`, fused as on the CPU),
            for `replay.replay_fp32_round_once`;
    peft: float32 (B, A, w·s) per layer, for PEFT's recipes (`replay.replay_peft_block`);
    x: the forward check's random inputs (batch, width).
    """

    layers: list[tuple[LayerTarget, float]]
    expected: list[tuple[torch.Tensor, torch.Tensor, float, bool]]
    slack: list[SlackFactor]
    replay: list[MergeFactor]
    peft: list[tuple[torch.Tensor, torch.Tensor, float]]
    x: torch.Tensor


def prepare_factors(
    layers: list[tuple[LayerTarget, float]], width: int, seed: int, device: torch.device | str = "cpu"
) -> Factors:
    """Convert the factors once per tensor, not once per block, on the device the blocks
    are judged on; x is drawn as the whole-tensor check draws it (`figures.forward_inputs`).
    merge's replay is merge's arithmetic on that device: fused on the CPU, not on a GPU
    (`merge._Merger`)."""
    device = torch.device(device)
    expected, slack, peft = [], [], []
    for target, weight in layers:
        factor = target.layer.scale * weight
        b = factor_tensor(target.layer.b_matrix, device, torch.float64)
        a = factor_tensor(target.layer.a_matrix, device, torch.float64).reshape(-1, width)
        fused = is_power_of_two(factor)
        expected.append((b, a * factor if fused else a, factor, fused))
        b32 = factor_tensor(target.layer.b_matrix, device, torch.float32)
        a32 = factor_tensor(target.layer.a_matrix, device, torch.float32).reshape(-1, width)
        slack.append(slack_factor(b32, a32, factor))
        peft.append((b32, a32, factor))
    replay = merge_factors(layers, device, torch.float32, fuse=device.type == "cpu")
    return Factors(layers, expected, slack, replay, peft, forward_inputs(seed, width).to(device))


def expected_into(f: Factors, lo: int, hi: int, w0: torch.Tensor, views: Buffers) -> None:
    """Buffers 0, 2 and 1 become W (float64 base), E = W + ΔW₁ + ΔW₂ … (each add inside
    its GEMM) and the update E − W, exactly as the whole-tensor check takes it (not ΔW:
    an update below W's float64 spacing counts as none). w0: this block's rows, flat."""
    base, update, expected = views.flat64[:3]
    base.copy_(w0)
    for index, (b, a, factor, folded) in enumerate(f.expected):
        torch.addmm(views.mat64[0 if index == 0 else 2], b[lo:hi], a, alpha=1.0 if folded else factor, out=views.mat64[2])
    torch.sub(expected, base, out=update)


def judge_block(
    ws: Workspace, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor, sums: Sums,
    forward_merged: torch.Tensor, forward_base: torch.Tensor, atol: float | None, rtol: float | None,
) -> None:
    """Every element-wise figure of one block of rows (`figures.judge_rows`); w0/stored:
    the rows, flat.

    forward_merged/forward_base: (batch, all rows) outputs of the forward check, this
    block's rows filled in. Stops early (sums.finite False) at a NaN or an Inf. merge's
    recipe is replayed on the block by the caller, right after (`replay`).
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


def judge_block_bounded(
    ws: Workspace, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor, sums: Sums,
    forward_merged: torch.Tensor, forward_base: torch.Tensor,
) -> None:
    """`judge_block` for a tensor stored in bf16 or fp16 under the default tolerance, with
    the same figures, minus the float32 slack of every element.

    The slack (≥ 0) only enlarges each element's tolerance eps·spacing + slack, so
    |error|/(eps·spacing), an exact division by powers of two, bounds each element's
    ×tolerance from above. A block whose bound cannot beat the worst element found so
    far cannot change the tensor's worst (nor its verdict: a block under 1 passes);
    where it might, the few elements whose bound beats it get a rigorous upper bound
    with their own slack (`_may_beat`), and only a block where one of them may really
    beat it (the first, then one per new maximum) is judged as `judge_rows` judges it.
    The slack's other use, the strength allowance, is bounded from the factors
    afterwards (`figures.slack_shift_bound`); `blocks.check_plain_tensor` redoes the
    tensor with `judge_block` where that bound is not enough. In bf16 the slack is ~2⁻¹⁶
    of the ulp: this saves its GEMM and seven passes per block and changes no figure.
    """
    rows = hi - lo
    width = stored.numel() // rows
    views = ws.block(rows, width)
    base, update, expected, actual = views.flat64[:4]
    expected_into(f, lo, hi, w0, views)
    if sums.stored_is_base:
        _track_base(ws, views, sums, w0, stored, expected)
    actual.copy_(stored)
    both = torch.matmul(f.x, views.pair.T, out=views.forward_pair)  # x·W0ᵀ, then x·MERGEDᵀ
    forward_base[:, lo:hi] = both[:, :rows]
    forward_merged[:, lo:hi] = both[:, rows:]
    diff = actual.sub_(expected)
    block_error, block_expected = max_abs(diff), max_abs(expected)
    if not (math.isfinite(block_error) and math.isfinite(block_expected)):
        sums.finite = False
        return
    dtype = stored.dtype
    eps = EPS[dtype]
    sums.max_abs_error = max(sums.max_abs_error, block_error)
    sums.max_expected = max(sums.max_expected, block_expected)
    sums.diff_dot_update += float(torch.dot(diff, update))
    sums.update_sq += float(torch.dot(update, update))
    spacing = spacing_of_max_into(expected, base, dtype)  # E and W0 are spent
    spread = update.mul_(spacing)  # (the update is spent too)
    sums.spread_sq += float(torch.dot(spread, spread)) * (eps * eps)
    ratio = diff.div_(spacing)  # |error| = |ratio|·spacing, exactly: powers of two
    low, high = (float(v) for v in torch.aminmax(ratio))  # (finite: d and the spacing are)
    if sums.worst_at is None or max(-low, high) / eps > sums.worst:  # ≥ every |error| / tolerance here
        tails = (-low / eps > sums.worst, high / eps > sums.worst)
        if sums.worst_at is None or _may_beat(ws, f, lo, width, ratio, spacing, tails, eps, sums.worst):
            _block_worst(views, f, lo, hi, ratio, spacing, sums, eps)


# Past this many elements whose bound beats the running worst, a block is judged in
# full (one GEMM and four passes) rather than element by element.
CANDIDATES_LIMIT = 4096


def _may_beat(
    ws: Workspace, f: Factors, lo: int, width: int, ratio: torch.Tensor, spacing: torch.Tensor,
    tails: tuple[bool, bool], eps: float, worst: float,
) -> bool:
    """Can an element of this block have |error| / tolerance > worst, with tolerances as
    `judge_rows` computes them? Only an element whose bound |ratio|/eps exceeds it can
    (tails: whether any ratio lies below −worst·eps, above worst·eps: usually one side);
    for those, the exact slack (float64 sums of the float32 factors' products: r terms,
    nonnegative) lowered by what float32 rounding may take from the slack `slack_into`
    computes (at most a relative (r + L + 2)·2⁻²³) gives an upper bound on what
    `judge_rows` would find."""
    limit = worst * eps
    found = []
    for negative, beyond in zip((True, False), tails):
        if not beyond:
            continue
        if ratio.device.type == "cpu":  # numpy: ~5× faster here than torch's comparison and nonzero
            mask = ws.flags(ratio.numel())  # (a fresh mask each time would cost page faults)
            (np.less if negative else np.greater)(ratio.numpy(), -limit if negative else limit, out=mask)
            found.append(torch.from_numpy(np.flatnonzero(mask)))
        else:
            found.append(torch.nonzero(ratio < -limit if negative else ratio > limit).view(-1))
    index = torch.cat(found) if len(found) > 1 else found[0]
    if index.numel() > CANDIDATES_LIMIT:
        return True
    if not index.numel():
        return False
    rows, cols = index // width + lo, index % width
    slack = torch.zeros(index.numel(), dtype=torch.float64, device=ratio.device)
    for b_abs, a_abs, factor in f.slack:
        slack += (b_abs[rows].double() * a_abs[:, cols].T.double()).sum(1) * factor
    rank = max(a_abs.shape[0] for _, a_abs, _ in f.slack)
    slack *= 1.0 - (rank + len(f.slack) + 2) * 2.0**-23
    error = ratio[index].abs() * spacing[index]
    upper = error / (spacing[index] * eps + slack) * (1.0 + 2.0**-50)
    return bool((upper > worst).any())


def _block_worst(
    views: Buffers, f: Factors, lo: int, hi: int, ratio: torch.Tensor, spacing: torch.Tensor, sums: Sums, eps: float
) -> None:
    """The block's worst element exactly as `judge_rows` finds it: the slack of every
    element, the tolerance eps·spacing + slack, |error| / tolerance, the first largest."""
    width = ratio.numel() // (hi - lo)
    slack = slack_into(views.mat32[1], views.mat32[2], f.slack, lo, hi).view(-1)
    error = ratio.mul_(spacing).abs_()  # |MERGED − E| again, bit for bit
    tolerance = torch.add(views.flat64[0].copy_(slack), spacing, alpha=eps, out=spacing)
    worst = error.div_(tolerance)
    block_worst = float(torch.amax(worst))
    if block_worst > sums.worst or sums.worst_at is None:
        sums.worst = block_worst
        sums.worst_at = lo * width + first_argmax(worst)


def max_abs(values: torch.Tensor) -> float:
    """max |values| in one pass (NaN propagates)."""
    low, high = torch.aminmax(values)
    return max(-float(low), float(high)) if not math.isnan(float(low)) else math.nan


def _track_base(ws: Workspace, views: Buffers, sums: Sums, w0: torch.Tensor, stored: torch.Tensor, expected: torch.Tensor) -> None:
    """"not applied" needs: MERGED equals the base rounded to its dtype, and the
    expectation does not. Checked only while the first still holds (one block, usually)."""
    first, second = ws.narrow(views, stored.dtype)
    base_rounded = w0 if w0.dtype == stored.dtype else first.copy_(w0)
    sums.stored_is_base = same_values(stored, base_rounded)
    if sums.stored_is_base and sums.expected_rounds_to_base:
        sums.expected_rounds_to_base = same_values(second.copy_(expected), base_rounded)
