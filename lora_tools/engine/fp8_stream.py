"""FP8 bases in the stream: a merge's `compute` made to read and write FP8 weights.

A merge into an FP8 base computes on the dequantized weight (codes times scales, in
float32) and then stores the result one of two ways:

- dequantized (the default): every FP8 weight becomes a float tensor (bf16 unless a
  --dtype says otherwise), adapted or not, and the scale tensors are left out: an
  ordinary checkpoint, as DeepSeek's `fp8_cast_bf16.py` writes, with the update added
  before the one rounding;
- requantized (--dtype fp8): the layout stays the base's; every adapted FP8 weight is
  quantized again with fresh scales computed from the merged values, as the format's
  producers compute them, and its scale tensor is rewritten with them; unadapted
  weights and their scales are copied byte for byte. Re-rounding to FP8 can erase a
  small update (its step is 1/8 to 1/16 of a value), so each adapted weight reports how
  much of its update survived.

A weight and its scale tensor are two entries of the output, and safetensors puts
float32 scales before e4m3 weights, yet the scales can only be computed from the merged
weight. So the scales of adapted weights are written last in their file (`reorder`:
every tensor keeps its bytes, only their order in the file changes), and each weight
leaves its fresh scales (1/16384 of it for 128×128 blocks) for them. Where moving them
would misalign a tensor (a weight of an odd byte count), the source's order is kept and
a scale that comes first merges its weight once more just for the scales; memory stays
at one tensor either way.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from lora_tools.adapter import Factor
from lora_tools.engine.plan import TensorPlan
from lora_tools.engine.staging import ByteRing
from lora_tools.engine.stream import Compute, all_finite, refuse_overflow
from lora_tools.io.checkpoint import BaseCheckpoint
from lora_tools.io.dtypes import DTYPE_ITEMSIZE, torch_dtype
from lora_tools.io.fp8 import dequantize, fresh_scales, requantize
from lora_tools.io.fp8_fused import block_amax_checked, fused_applies, requantize_measured
from lora_tools.io.kernels import in_turn
from lora_tools.io.stream_writer import Entry
from lora_tools.linalg.dense import MIN_BLOCK_ROWS, RowMerge, factor_tensor, row_blocks_of
from lora_tools.linalg.factored import concat_factors, frobenius_norm

# Elements of W0 per block of rows in `Requantizing._by_blocks`: its three float32
# buffers (W0, W0 + ΔW, the dequantized result) stay warm between the dozen passes, and
# replace three weight-sized ones (3 × 64 MB at 1B shapes). Smaller blocks pay more in
# per-call overhead than they gain in cache: 1 M, 2 M and 4 M elements measured here.
BLOCK_ELEMENTS = 1 << 21


@dataclass
class Survival:
    """How much of one weight's update a re-quantization to FP8 kept.

    `survival` = ‖deq(Q(W0+ΔW)) − W0‖_F / ‖ΔW‖_F (about 1 when the update is far above
    FP8's step, 0 when it vanished; None for a zero update); `unchanged` = the share of
    elements whose code did not change (a fresh scale a few units off the old one moves
    every value of its block a little, codes unchanged: the ratio counts that as noise,
    not as update kept, which is why a vanished update still shows 0.2-0.4 there)."""

    name: str
    survival: float | None
    unchanged: float
    update_norm: float


def update_norm(plan: TensorPlan) -> float | None:
    """‖Σ wᵢ·sᵢ·Bᵢ·Aᵢ‖_F of a tensor's update from its factors (float64 Gram sums,
    `linalg.factored`), where the update is only LoRA products (a transposed one has the
    same norm); None where it is more (a replacement, DoRA, a bias): then it is measured
    on the merged weight. Exact, and no pass over the weight."""
    if plan.replacement is not None or plan.biases or not plan.layers:
        return None
    if any(target.layer.magnitude is not None for target, _ in plan.layers):
        return None
    terms = [(_float64(t.layer.b_matrix), _float64(t.layer.a_matrix), t.layer.scale * w) for t, w in plan.layers]
    return frobenius_norm(*concat_factors(terms))


def _float64(factor: Factor) -> np.ndarray:
    """A factor as a float64 numpy array on the host (merge may hold it as a torch tensor, on its device)."""
    return factor_tensor(factor, "cpu", torch.float64).numpy()


def lost_updates(survival: list[Survival], below: float) -> list[Survival]:
    """The weights that kept less than `below` of their update, worst first."""
    return sorted((s for s in survival if s.survival is not None and s.survival < below), key=lambda s: s.survival or 0.0)


class Dequantizing:
    """The merge's compute on an FP8 base written dequantized: see the module docstring."""

    def __init__(
        self, base: BaseCheckpoint, inner: Compute, adapted: Collection[str], out_code: str | None, device: torch.device
    ) -> None:
        assert base.fp8 is not None
        self.base, self.inner, self.adapted = base, inner, adapted
        self.out_codes = dict.fromkeys(base.fp8.weights, out_code or "BF16")
        self.dropped = base.fp8.aux
        self.computed = set(adapted) | set(base.fp8.weights)
        self._values = ByteRing(1, device)  # the dequantized weight, reused

    def __call__(self, name: str, w0: torch.Tensor, stored: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        if not self.base.is_fp8_weight(name) or name in self.adapted:
            return self.inner(name, w0, stored, out)  # the merge reads FP8 codes itself, by row blocks
        values = self.base.dequantized(name, w0, self._values.tensor(tuple(w0.shape), torch.float32))
        out.copy_(values)
        if not all_finite(out):  # fp16 cannot hold every code times its scale
            refuse_overflow(self.base.shard_of(name).path, name, values, out)
        return out


class Requantizing:
    """The merge's compute on an FP8 base written as FP8 with fresh scales."""

    def __init__(
        self, base: BaseCheckpoint, inner: Compute, adapted: Mapping[str, TensorPlan], device: torch.device,
        row_merge: Callable[[str], RowMerge | None] | None = None,
    ) -> None:
        assert base.fp8 is not None
        self.base, self.inner, self.device = base, inner, device
        self.plans = adapted
        # the merge of a block of rows (`merge._Merger.row_merge`): on the CPU a weight is
        # merged, re-quantized and measured a block of rows at a time, while it is in cache
        self.row_merge = row_merge if device.type == "cpu" else None
        self.layout = base.fp8
        self.adapted_fp8 = {name for name in adapted if base.is_fp8_weight(name)}
        self.weight_of_scale = {scale: w for scale, w in self.layout.owners.items() if w in self.adapted_fp8}
        self.computed = set(adapted) | set(self.weight_of_scale)
        self.survival: list[Survival] = []
        self._scales: dict[str, torch.Tensor] = {}  # a weight's fresh scales, its scale tensor still to come
        self._scale_written: set[str] = set()  # weights whose scale tensor is written
        # float32 buffers reused for every weight: W0, W0 + ΔW, and a difference
        self._base, self._merged, self._scratch = (ByteRing(1, device) for _ in range(3))
        # by thread: the merge's own thread reuses the three above, block workers get theirs
        self._thread_rings = {threading.get_ident(): (self._base, self._merged, self._scratch)}

    def reorder(self, entries: list[Entry]) -> list[Entry]:
        """The file's entries with the adapted weights' scales moved to its end, unless
        that would leave some tensor at an offset that is not a multiple of its item
        size (safetensors aligns every tensor so; readers may rely on it)."""
        moved = [e for e in entries if e[0] in self.weight_of_scale]
        if not moved:
            return entries
        order = [e for e in entries if e[0] not in self.weight_of_scale] + moved
        offset = 0
        for _, code, shape in order:
            if offset % DTYPE_ITEMSIZE[code]:
                return entries
            offset += math.prod(shape) * DTYPE_ITEMSIZE[code]
        return order

    def __call__(self, name: str, w0: torch.Tensor, stored: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        if name in self.weight_of_scale:
            weight = self.weight_of_scale[name]
            self._scale_written.add(weight)
            scales = self._scales.pop(weight, None)  # the weight came first and left them
            if scales is None:  # the scale comes first: merge now, only for the scales
                codes = self.base.shard_of(weight).torch(weight).to(self.device)
                merged, _ = self._merged_weight(weight, codes)
                scales = self._requantized(weight, merged, codes.dtype)[1]
            return out.copy_(scales)
        if name not in self.adapted_fp8:
            return self.inner(name, w0, stored, out)
        rows = self.row_merge(name) if self.row_merge is not None else None
        if rows is not None and self._by_blocks(name, w0, rows, out):
            return out
        merged, base_values = self._merged_weight(name, w0)
        scratch = self._scratch.tensor(tuple(w0.shape), torch.float32)
        norm = update_norm(self.plans[name])
        if norm is None:
            norm = _norm(torch.sub(merged, base_values, out=scratch))
        _, scales = self._requantized(name, merged, out.dtype, out)  # merged is the scratch from here on
        if name not in self._scale_written:
            self._scales[name] = scales
        # the codes just made hold no NaN: no check for one
        kept = dequantize(out, scales, self.layout.weights[name].block, scratch, trusted=True).sub_(base_values)
        unchanged = _same_bytes(out, w0) / max(1, out.numel())
        self.survival.append(Survival(name, _norm(kept) / norm if norm > 0 else None, unchanged, norm))
        return out

    def _by_blocks(self, name: str, codes: torch.Tensor, merge_rows: RowMerge, out: torch.Tensor) -> bool:
        """`__call__` for an adapted weight, a block of rows at a time: each block's W0
        dequantized, merged, re-quantized with its fresh scales, and its survival figures
        summed, while it is warm (at 1B shapes 5-10 % faster than whole-weight passes,
        and three float32 buffers of a block instead of the weight's). The same bits:
        scales are per block of weight rows, and blocks of merge rows are whole blocks of
        them. False, with nothing recorded, at a value that is not finite: the whole
        weight's path then runs and names what went wrong.

        With the C kernels (`fused_applies`) the blocks are shared among torch's threads,
        each block on one thread with torch single-threaded inside it (`kernels.in_turn`):
        no OpenMP worker then spins beside the kernels, and one block's passes overlap
        another's (about 15 % less time than torch's threads inside each block, on 1B
        blocks). Each thread has its own buffers and its own row merge."""
        block = self.layout.weights[name].block
        rows, width = codes.shape[0], codes[0].numel()
        # whole scale blocks of rows, a GEMM's bits in each (`dense.row_blocks_of`)
        step = max(1, BLOCK_ELEMENTS // max(1, block[0] * width), math.ceil(MIN_BLOCK_ROWS / block[0])) * block[0]
        blocks = row_blocks_of(rows, step)
        if not blocks:
            return False
        tall = max(hi - lo for lo, hi in blocks)
        widen = self.base.row_dequantizer(name, codes)
        scale_dtype = torch_dtype(self.base.info(self.layout.scale_of(name)).dtype)
        fused = fused_applies(out)  # the C kernels: block maxima and finiteness in one read, then one pass
        merges = {threading.get_ident(): merge_rows}

        def one(index: int) -> tuple[torch.Tensor, float, int] | None:
            """(fresh scales, Σ kept², unchanged codes) of block `index`; None where a value
            is not finite."""
            lo, hi = blocks[index]
            n = hi - lo
            me = threading.get_ident()
            if me not in merges:
                merges[me] = self._row_merge_of(name)
            base_rows, merged_rows, scratch = (ring.tensor((tall, width), torch.float32) for ring in self._rings(me))
            base = widen(base_rows[:n], lo, hi)
            merged = merged_rows[:n]
            if not merges[me](base, lo, hi, merged, check=not fused):
                return None
            amax = block_amax_checked(merged, block) if fused else None
            if fused and amax is None:
                return None
            fresh = fresh_scales(merged, block, out.dtype, scale_dtype, self.layout.rule, amax=amax)
            measured = requantize_measured(merged, block, fresh, base, codes[lo:hi], out[lo:hi])
            if measured is not None:  # the fused pass: the same codes, the same figures
                return fresh.stored, measured[0], measured[1]
            requantize(merged, block, out.dtype, scale_dtype, self.layout.rule, in_place=True, out=out[lo:hi], fresh=fresh)
            kept = dequantize(out[lo:hi], fresh.stored, block, scratch[:n], trusted=True).sub_(base)
            return fresh.stored, _squares(kept), _same_bytes(out[lo:hi], codes[lo:hi])

        threads = torch.get_num_threads() if fused else 1  # (fused: on the CPU)
        results: list[tuple[torch.Tensor, float, int] | None] = []
        norms: list[float | None] = []

        def job(index: int) -> tuple[torch.Tensor, float, int] | None:
            """Job 0: ‖ΔW‖ from the factors (numpy, which releases the GIL in its products),
            beside the blocks; job i > 0: block i − 1."""
            if index == 0:
                norms.append(update_norm(self.plans[name]))
                return None
            return one(index - 1)

        if threads > 1:
            torch.set_num_threads(1)
            try:
                results = in_turn(len(blocks) + 1, job, threads)[1:]
            finally:
                torch.set_num_threads(threads)
        else:
            for index in range(len(blocks)):
                results.append(one(index))
                if results[-1] is None:
                    break
        done = [r for r in results if r is not None]
        if len(done) < len(blocks):
            return False
        if name not in self._scale_written:
            self._scales[name] = torch.cat([stored for stored, _, _ in done])
        kept_sq, unchanged = sum(r[1] for r in done), sum(r[2] for r in done)
        norm = norms[0] if norms else update_norm(self.plans[name])
        assert norm is not None  # (a plain tensor's update is its factors')
        survival = math.sqrt(kept_sq) / norm if norm > 0 else None
        self.survival.append(Survival(name, survival, unchanged / max(1, out.numel()), norm))
        return True

    def _rings(self, thread: int) -> tuple[ByteRing, ByteRing, ByteRing]:
        """The float32 buffers of a block's W0, W0 + ΔW and a difference, for one thread
        (the merge's own thread has the weight-sized ones of the whole-weight path)."""
        if thread not in self._thread_rings:
            self._thread_rings[thread] = (ByteRing(1, self.device), ByteRing(1, self.device), ByteRing(1, self.device))
        return self._thread_rings[thread]

    def _row_merge_of(self, name: str) -> RowMerge:
        """A row merge of a plain tensor for another thread (each holds its own scratch)."""
        assert self.row_merge is not None
        merge_rows = self.row_merge(name)
        assert merge_rows is not None  # (the calling thread got one for the same tensor)
        return merge_rows

    def _merged_weight(self, weight: str, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W0 + ΔW of an adapted FP8 weight in float32, and W0 (both in reused memory)."""
        shape = tuple(codes.shape)
        base_values = self.base.dequantized(weight, codes, self._base.tensor(shape, torch.float32))
        return self.inner(weight, base_values, torch.float32, self._merged.tensor(shape, torch.float32)), base_values

    def _requantized(
        self, weight: str, merged: torch.Tensor, fp8: torch.dtype, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) of the merged weight, computed in `merged`'s memory (codes into
        `out`); deterministic, so the scale tensor and the weight agree whichever came first."""
        scale_dtype = torch_dtype(self.base.info(self.layout.scale_of(weight)).dtype)
        return requantize(merged, self.layout.weights[weight].block, fp8, scale_dtype, self.layout.rule, in_place=True, out=out)


def _norm(values: torch.Tensor) -> float:
    """‖values‖_F as √(float64 of a float32 dot product): BLAS's dot runs ~2.5× faster
    here than `vector_norm`, and a report figure needs no more than float32's sums."""
    return math.sqrt(_squares(values))


def _squares(values: torch.Tensor) -> float:
    """Σ values² (`_norm`'s sum, to be added up block by block)."""
    flat = values.reshape(-1)
    return max(float(torch.dot(flat, flat)), 0.0)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many elements of two 1-byte tensors (FP8 codes) hold the same byte: on the CPU
    by numpy's compare and count, 0.07 against torch's 0.12 ns per element here."""
    a, b = a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    if a.device.type != "cpu":
        return int(torch.count_nonzero(a == b))
    return int(np.count_nonzero(a.numpy() == b.numpy()))
