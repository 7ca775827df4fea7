"""Dense update math in torch: what merge writes and what verify recomputes.

Both commands must agree on PEFT's semantics, so they share these functions, only
with a different compute dtype (float32 for merge, float64 for verify's reference).
The order of operations copies PEFT's (`(B @ A) * scaling`, then the add), so that an
fp32 merge reproduces `merge_and_unload` bit for bit.

Weights w of several adapters act like PEFT's `scale_layer(w)`: they multiply the
adapter's scaling, so W' = W0 + Σ wᵢ·sᵢ·BᵢAᵢ for LoRA; for DoRA the low-rank part is
scaled and the column norm is that of W0 + w·s·B·A, as PEFT computes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from lora_tools.adapter import Factor, LoraLayer


class LayerTarget(Protocol):
    """An adapter layer bound to the base weight it updates (`engine.binding` makes them)."""

    @property
    def layer(self) -> LoraLayer: ...

    @property
    def weight_shape(self) -> tuple[int, ...]: ...

    @property
    def transposed(self) -> bool: ...  # ΔW = (s·B·A)ᵀ: embeddings and fan_in_fan_out weights


class TensorRecipe(Protocol):
    """Everything that changes one base tensor, in the order it is applied (`engine.plan.TensorPlan`)."""

    @property
    def replacement(self) -> tuple[Any, float] | None: ...  # (full tensor, weight): modules_to_save

    @property
    def layers(self) -> Sequence[tuple[LayerTarget, float]]: ...

    @property
    def biases(self) -> Sequence[tuple[LayerTarget, float]]: ...


def factor_tensor(array: Factor, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """A factor on `device` in `dtype`; from_numpy shares memory, the copy happens in .to()
    (none when the factor already is there, as merge arranges); an encoded one is decoded."""
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)


def delta_weight(
    target: LayerTarget, weight: float, device: Any, dtype: torch.dtype, *, absolute: bool = False
) -> torch.Tensor:
    """w·s·B·A shaped (and transposed) like the base weight: PEFT's get_delta_weight.

    absolute=True gives |w·s|·|B|·|A| instead, the bound on |ΔW| that rounding errors
    of the product scale with (verify's tolerance).
    """
    layer = target.layer
    b = factor_tensor(layer.b_matrix, device, dtype)  # (out, r)
    a = factor_tensor(layer.a_matrix, device, dtype)  # (r, in·k)
    factor = layer.scale * weight
    if absolute:
        b, a, factor = b.abs(), a.abs(), abs(factor)
    return like_weight((b @ a) * factor, target)  # (out, in·k), then the weight's layout


def like_weight(product: torch.Tensor, target: LayerTarget) -> torch.Tensor:
    """A B·A-shaped (out, in·k) tensor in the base weight's layout (transposed for
    embeddings and fan_in_fan_out, reshaped for convolutions): a view where it can be."""
    return (product.T if target.transposed else product).reshape(target.weight_shape)


def accumulation_dtype(w0: torch.dtype, stored: torch.dtype) -> torch.dtype:
    """float32 accumulates every narrower dtype exactly enough; a float64 weight (or
    output) would lose 29 bits of every element to it."""
    return torch.float64 if torch.float64 in (w0, stored) else torch.float32


def is_power_of_two(value: float) -> bool:
    return value != 0.0 and math.isfinite(value) and math.frexp(abs(value))[0] == 0.5


MergeFactor = tuple[torch.Tensor, torch.Tensor, float, bool]  # (B, A or f·A, f = w·s, f folded into A?)


def merge_factors(
    layers: Sequence[tuple[LayerTarget, float]], device: Any, dtype: torch.dtype, fuse: bool
) -> list[MergeFactor]:
    """The factors `merge_block_into` multiplies, converted once per tensor (not per
    block): B (m, r), A (r, n) or, with fuse and a power-of-two f = w·s, f·A (exact)."""
    factors = []
    for target, weight in layers:
        b = factor_tensor(target.layer.b_matrix, device, dtype)
        a = factor_tensor(target.layer.a_matrix, device, dtype)
        factor = target.layer.scale * weight
        folded = fuse and is_power_of_two(factor)
        factors.append((b, a * factor if folded else a, factor, folded))
    return factors


def merge_block_into(
    acc: torch.Tensor, base: torch.Tensor, factors: Sequence[MergeFactor], lo: int, hi: int, spare: torch.Tensor
) -> torch.Tensor:
    """acc = W0 + Σ w·s·B·A for rows [lo, hi), in the compute dtype, before the one
    rounding: merge's arithmetic, which verify replays block by block (its fp32
    round-once recipe). base: those rows of W0, widened; spare: a buffer like acc.

    Folded factors (a power of two f in f·A) take one addmm: B·(f·A) = f·(B·A) exactly,
    and the GEMM adds C after its sums, so it gives the bits of PEFT's (B @ A) * f, then
    + W, in one pass. The others: the product, the scaling, the add, as PEFT does them.
    """
    for index, (b, a, factor, folded) in enumerate(factors):
        if folded:
            torch.addmm(base if index == 0 else acc, b[lo:hi], a, out=acc)
            continue
        delta = acc if index == 0 else spare
        torch.matmul(b[lo:hi], a, out=delta)
        delta.mul_(factor)
        acc.add_(base if index == 0 else delta)  # W0 + d₁ (PEFT's weight += delta), then + dᵢ
    return acc


# The fewest rows a block of a row-blocked product may have. MKL's sgemm sums a block of
# 2-3 rows (one thread), or of 5-11 rows split over two threads, in another order than the
# same rows inside a large product, which is what PEFT computes: measured on the dev box,
# every block of 12 rows or more gives the large product's bits, any start. A shorter last
# block is folded into the one before it.
MIN_BLOCK_ROWS = 16


def row_blocks_of(rows: int, step: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering `rows` rows, `step` (at least MIN_BLOCK_ROWS) at a time,
    none shorter than MIN_BLOCK_ROWS unless it is the only one: the last block takes up
    to MIN_BLOCK_ROWS − 1 rows more. The one partition every row-blocked product
    that must give a whole product's bits uses (merge, verify's replay, FP8 blocks)."""
    starts = list(range(0, rows, max(MIN_BLOCK_ROWS, step)))
    if len(starts) > 1 and rows - starts[-1] < MIN_BLOCK_ROWS:
        starts.pop()
    return list(zip(starts, [*starts[1:], rows]))


class RowMerge:
    """One plain tensor's merge a block of rows at a time, from its `merge_factors`, in
    float32: the FP8 re-quantization (`engine.fp8_stream.Requantizing`) merges,
    re-quantizes and measures each block while it is warm. Blocks of `row_blocks_of`'s
    sizes give the bits of merge's own blocks, and PEFT's."""

    def __init__(self, factors: list[MergeFactor]) -> None:
        self.factors = factors
        self._spare: torch.Tensor | None = None  # a product's scratch, for a second layer on

    def __call__(self, base: torch.Tensor, lo: int, hi: int, out: torch.Tensor, check: bool = True) -> bool:
        """out = rows [lo, hi) of W0 + ΔW from base, those rows of W0 (float32); False when
        a value is not finite (the caller then takes the whole tensor's path, whose error
        names the culprit). `check=False`: the caller looks for such values itself."""
        spare = out
        if len(self.factors) > 1:
            if self._spare is None or self._spare.numel() < out.numel():
                self._spare = torch.empty(out.numel(), dtype=out.dtype, device=out.device)
            spare = self._spare[: out.numel()].view(out.shape)
        merge_block_into(out, base, self.factors, lo, hi, spare)
        return not check or bool(torch.isfinite(out.sum())) or bool(torch.isfinite(out).all())


def merge_rows_into(
    out: torch.Tensor,
    w0: torch.Tensor,
    layers: Sequence[tuple[LayerTarget, float]],
    chunk_rows: int,
    work: torch.Tensor,
    widened: torch.Tensor,
    fuse: bool = False,
    widen: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """out = round(W0 + Σ w·s·B·A), one block of rows at a time; returns Σ of the block
    sums (finite iff every merged element is, barring overflow of the sum itself).
    `widen(buffer, lo, hi)`: W0's rows [lo, hi) in the compute dtype, written into the
    buffer, for a W0 stored in a form that needs more than a cast (FP8 codes and scales).

    The merge's hot path for plain, untransposed layers. Per element it does exactly
    what PEFT does — the rank-r product, the scaling, the add in float32 (W0 widened
    exactly), then one rounding — on row blocks whose buffers are reused, so no pass
    faults in fresh pages and the blocks stay warm between the passes.
    out/w0: (m, n) views of the stored and the base weight; work/widened: (chunk_rows +
    MIN_BLOCK_ROWS − 1, n) buffers in the compute dtype (the last block may take that many
    rows more: `row_blocks_of`, whose blocks give PEFT's bits exactly).
    fuse=True (the CPU) folds a power-of-two scale into A and the add into the GEMM
    (addmm): the same bits in one pass instead of three; checked against PEFT in the
    tests. GPUs keep the separate steps: their GEMM kernels are chosen by heuristics
    that may differ between addmm and matmul.
    """
    dtype = work.dtype
    factors = merge_factors(layers, w0.device, dtype, fuse)
    spare = torch.empty_like(work) if len(factors) > 1 else work
    rows = w0.shape[0]
    total = torch.zeros((), dtype=dtype, device=w0.device)
    # an output in the compute dtype (a float32 merge, FP8's merged values) is its own
    # accumulator: no copy of every block into it (the same arithmetic, the same bits)
    in_place = out.dtype == dtype and out.is_contiguous() and out.untyped_storage().data_ptr() != w0.untyped_storage().data_ptr()
    for lo, hi in row_blocks_of(rows, chunk_rows):
        acc = out[lo:hi] if in_place else work[: hi - lo]
        # W0 already in the compute dtype (a float32 base, a dequantized FP8 weight) is
        # only read: no widened copy of it
        if widen is not None:
            base = widen(widened[: hi - lo], lo, hi)
        else:
            base = w0[lo:hi] if w0.dtype == dtype else widened[: hi - lo].copy_(w0[lo:hi])
        merge_block_into(acc, base, factors, lo, hi, spare[: hi - lo])
        total += acc.sum()
        if not in_place:
            out[lo:hi].copy_(acc)  # the one rounding to the stored dtype
    return total


def dora_norm_dims(target: LayerTarget) -> tuple[int, ...]:
    """Axes the DoRA norm runs over, in the stored weight's orientation.

    Per output feature (PEFT, LyCORIS' wd_on_output): rows of a Linear (out, in), every
    axis but 0 of a conv, and columns when the weight is stored transposed (fan_in_fan_out,
    embeddings, whose magnitude is per embedding dimension). Per input column (LyCORIS'
    older dora_scale (1, in, …)): every axis but 1.
    """
    ndim = len(target.weight_shape)
    if target.layer.magnitude_axis == "in":
        return tuple(d for d in range(ndim) if d != 1)
    if target.transposed:
        return (0,)
    return tuple(range(1, ndim))


def apply_layer(
    current: torch.Tensor, base: torch.Tensor, target: LayerTarget, weight: float
) -> torch.Tensor:
    """The weight after folding in one adapter layer.

    current: the weight so far (other adapters already folded in), compute dtype.
    base:    the original W0, compute dtype; DoRA's norm is taken of W0 + ΔW, never of
             a weight that already holds another adapter (as PEFT's merge does), plus
             the layer's eps (LyCORIS adds one, PEFT does not).
    """
    delta = delta_weight(target, weight, current.device, current.dtype)
    magnitude = target.layer.magnitude
    if magnitude is None:
        return current + delta
    dims = dora_norm_dims(target)
    norm = torch.linalg.vector_norm(base + delta, dim=dims, keepdim=True)
    if target.layer.magnitude_eps:
        norm = norm + target.layer.magnitude_eps
    m = factor_tensor(magnitude, current.device, current.dtype).reshape(norm.shape)
    return (m / norm) * (current + delta)


def apply_bias(current: torch.Tensor, target: LayerTarget, weight: float) -> torch.Tensor:
    """lora_bias: bias' = bias + w·s·lora_B.bias."""
    assert target.layer.bias is not None
    lora_bias = factor_tensor(target.layer.bias, current.device, current.dtype)
    return current + lora_bias * (target.layer.scale * weight)


def merged_tensor(plan: TensorRecipe, w0: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """W0 with a replacement, every adapter layer and every LoRA bias folded in: the merge
    recipe, in `compute_dtype` (merge: float32; verify's reference: float64).

    `w0` is on the compute device in its stored dtype. merge uses this for everything
    but its plain-LoRA hot path (`merge_rows_into`), which does the same operations.
    """
    base = w0.to(compute_dtype)
    if plan.replacement is not None:
        tensor, weight = plan.replacement
        full = factor_tensor(tensor, base.device, compute_dtype).reshape(base.shape)
        base = full if weight == 1.0 else base + (full - base) * weight
    current = base
    for target, weight in plan.layers:
        current = apply_layer(current, base, target, weight)
    for target, weight in plan.biases:
        current = apply_bias(current, target, weight)
    return current
