"""`merge`: fold adapters into a base checkpoint, streaming one tensor at a time.

The output has the base's layout (shard names, index, metadata, every non-weight
file). Tensors no adapter touches are copied as raw bytes; adapted ones are computed
in float32 on the chosen device from W0 and the factors (`linalg.dense`, the one merge
recipe), and rounded once to the stored dtype. The streaming is `engine.stream`'s;
everything is written under a temporary sibling and renamed at the very end.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_tools.engine.fp8_stream import Dequantizing, Requantizing, Survival, lost_updates
from lora_tools.engine.placement import factors_on
from lora_tools.engine.plan import MergePlan, TensorPlan, is_plain, make_plan
from lora_tools.engine.staging import ByteRing
from lora_tools.engine.stream import Progress, TensorStream, all_finite, first_new_non_finite, may_overflow, refuse_overflow
from lora_tools.errors import CheckFailed, FormatError, LoraToolsError, RequestError
from lora_tools.io.atomic import written_atomically
from lora_tools.io.dtypes import KEEP_FP8, dtype_code
from lora_tools.io.extra_files import copy_extra_files
from lora_tools.io.hf_layout import update_config_dtype, write_index
from lora_tools.linalg.dense import (
    MIN_BLOCK_ROWS,
    RowMerge,
    accumulation_dtype,
    merge_factors,
    merge_rows_into,
    merged_tensor,
)
from lora_tools.linalg.device import resolve_device
from lora_tools.linalg.nf4 import BaseQuant, parse_base_quant, quantized_by_bitsandbytes, round_trip_stored

__all__ = ["MergeResult", "Progress", "merge", "output_dtype_code"]

# Row blocks of about this many elements (16 MiB of float32) on the CPU: large enough
# that torch's per-operation thread hand-offs cost nothing, small enough that the passes
# of a merge reuse warm buffers. Measured at 1B shapes on two cores (whole merge):
# 3.8-3.9 s with 4 M, 4.0-4.4 s with 1 M. On a GPU a tensor is one block.
CPU_CHUNK_ELEMENTS = 4 * 1024 * 1024

# An adapted FP8 weight that keeps less than this share of its update (‖stored − W0‖ /
# ‖ΔW‖) after re-quantization is reported as lost: most of its update is gone.
LOST_BELOW = 0.5


@dataclass
class MergeResult:
    out: str
    device: str
    n_tensors: int
    n_adapted: int  # tensors computed from an adapter (weights, biases, replacements)
    n_copied: int  # tensors copied byte for byte
    n_layers: int  # adapter layers folded in
    bytes_written: int
    seconds: float
    # An FP8 base: "dequantized" (written as floats) or "requantized" (--dtype fp8); else None.
    fp8: str | None = None
    # --dtype fp8: how much of each adapted FP8 weight's update the re-rounding kept.
    survival: list[Survival] = field(default_factory=list)

    def lost(self, threshold: float = LOST_BELOW) -> list[Survival]:
        """The adapted FP8 weights that kept less than `threshold` of their update, worst first."""
        return lost_updates(self.survival, threshold)


def output_dtype_code(dtype: str) -> str | None:
    """None for "keep" (and "fp8": the FP8 base's own format), else the safetensors code
    every float tensor is stored in."""
    if dtype == KEEP_FP8:
        return None
    try:
        return dtype_code(dtype)
    except KeyError:
        raise RequestError(None, f"unknown --dtype {dtype!r} (use keep, bf16, fp16, fp32 or fp8)") from None


def merge(
    base_path: str | os.PathLike[str],
    adapter_paths: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: list[float] | None = None,
    device: str = "auto",
    dtype: str = "keep",
    force: bool = False,
    alpha: float | None = None,
    progress: Progress | None = None,
    min_survival: float | None = None,
    base_quant: str | None = None,
) -> MergeResult:
    """Write BASE + Σ wᵢ·ΔWᵢ to `out` in BASE's layout; see the module docstring.

    An FP8 base (`io.fp8_layout`) is merged on its dequantized weights and written as
    bf16 (or `dtype`), or with `dtype="fp8"` re-quantized with fresh scales
    (`engine.fp8_stream`); `min_survival`: refuse (CheckFailed, nothing written) when an
    adapted FP8 weight keeps less than this share of its update.

    `base_quant` ("nf4", "nf4,dq", `linalg.nf4`): merge onto deq(NF4(W0)), what a QLoRA
    adapter was trained against, instead of W0, for the weights bitsandbytes would have
    held in NF4 (adapted Linear weights); written in the base's dtype."""
    started = time.perf_counter()
    out = Path(out)
    target_device = resolve_device(device)
    out_code = output_dtype_code(dtype)
    nf4 = parse_base_quant(base_quant) if base_quant is not None else None
    plan = make_plan(base_path, adapter_paths, weights, alpha=alpha, place=factors_on(target_device))
    inputs = [Path(base_path), *map(Path, adapter_paths)]
    survival: list[Survival] = []
    try:
        if nf4 is not None and plan.base.fp8 is not None:
            raise RequestError(plan.base.path, "is an FP8 checkpoint: --base-quant nf4 describes a 16-bit base a QLoRA adapter was trained on")
        stream, fp8 = _stream_for(_Merger(plan, target_device, nf4), plan, target_device, dtype, out_code, progress, min_survival)
        with written_atomically(out, force, inputs) as tmp:
            if plan.base.is_dir:
                tmp.mkdir()
                copy_extra_files(plan.base.path, plan.base.extra_files(), tmp)
                stream.write_files([(plan.base.shard(name), tmp / name) for name in plan.base.shard_names])
                write_index(plan.base, tmp, out_code, stream.out_codes, stream.dropped)
                update_config_dtype(tmp, out_code, dequantized=fp8 == "dequantized")
            else:
                stream.write_files([(plan.base.shard(plan.base.shard_names[0]), tmp)])
            if isinstance(stream.compute, Requantizing):
                survival = stream.compute.survival
                _check_survival(survival, min_survival, plan.base.path)
    finally:
        plan.close()
    return MergeResult(
        out=os.fspath(out),
        device=str(target_device),
        n_tensors=stream.n_computed + stream.n_copied,
        n_adapted=stream.n_computed,
        n_copied=stream.n_copied,
        n_layers=plan.n_layers,
        bytes_written=stream.bytes_written,
        seconds=time.perf_counter() - started,
        fp8=fp8,
        survival=survival,
    )


def _stream_for(
    merger: _Merger, plan: MergePlan, device: torch.device, dtype: str, out_code: str | None, progress: Progress | None,
    min_survival: float | None,
) -> tuple[TensorStream, str | None]:
    """The stream that writes this merge, and what it does with an FP8 base (or None)."""
    layout = plan.base.fp8
    if layout is None:
        if dtype == KEEP_FP8 or min_survival is not None:
            what = "--dtype fp8" if dtype == KEEP_FP8 else "--min-survival"
            raise RequestError(plan.base.path, f"has no FP8 weights: {what} applies to FP8 bases only")
        return TensorStream(device, plan.tensors, merger, out_code, progress), None
    if dtype == KEEP_FP8:
        requantizing = Requantizing(plan.base, merger, plan.tensors, device, merger.row_merge)
        stream = TensorStream(device, requantizing.computed, requantizing, None, progress, reorder=requantizing.reorder)
        return stream, "requantized"
    if min_survival is not None:
        raise RequestError(None, "--min-survival applies to --dtype fp8 (a dequantized merge keeps the whole update)")
    dequantizing = Dequantizing(plan.base, merger, plan.tensors, out_code, device)
    stream = TensorStream(
        device, dequantizing.computed, dequantizing, out_code, progress,
        out_codes=dequantizing.out_codes, dropped=dequantizing.dropped,
    )
    return stream, "dequantized"


def _check_survival(survival: list[Survival], min_survival: float | None, base: Path) -> None:
    if min_survival is None:
        return
    lost = lost_updates(survival, min_survival)
    if lost:
        worst = ", ".join(f"{s.name} ({s.survival:.2f})" for s in lost[:3])
        raise CheckFailed(
            base,
            f"re-quantizing to FP8 keeps less than {min_survival:g} of the update in {len(lost)} weight(s): {worst}; "
            "nothing written (merge with --dtype bf16 to keep the whole update)",
        )


class _Merger:
    """The merge's `compute` for the stream: W0 + Σ wᵢ·ΔWᵢ of one tensor, into `out`."""

    def __init__(self, plan: MergePlan, device: torch.device, nf4: BaseQuant | None = None) -> None:
        self.plan = plan
        self.device = device
        self.nf4 = nf4
        # --base-quant: the tensors a QLoRA base held in NF4, and whether each is stored (in, out)
        self.nf4_tensors = {
            name: targets[0][0].transposed
            for name, tensor in plan.tensors.items()
            if nf4 is not None and (targets := [t for t in tensor.layers if quantized_by_bitsandbytes(t[0].layer, t[0].weight_shape)])
        }
        for name in self.nf4_tensors:
            if plan.base.info(name).dtype not in ("F32", "BF16", "F16"):
                raise RequestError(
                    plan.base.shard_of(name).path,
                    f"tensor {name!r} is {plan.base.info(name).dtype}: bitsandbytes quantizes float32, bfloat16 and "
                    "float16 weights to NF4 (--base-quant)",
                )
        # The row blocks' compute buffers, reused for every tensor.
        self.work = ByteRing(1, device)
        self.widened = ByteRing(1, device)

    def __call__(self, name: str, w0: torch.Tensor, stored: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        plan = self.plan.tensors[name]
        if self.nf4 is not None and name in self.nf4_tensors:  # what the QLoRA adapter was trained against
            w0 = round_trip_stored(w0, self.nf4, self.nf4_tensors[name])
        fp8_rows = None
        if self._fp8_codes(name, w0):  # merged on their values
            if is_plain(plan):
                fp8_rows = self.plan.base.row_dequantizer(name, w0)  # dequantized block by block, below
            else:
                w0 = self.plan.base.dequantized(name, w0)
        values = torch.float32 if fp8_rows is not None else w0.dtype  # the dtype W0's values have
        compute = accumulation_dtype(values, stored)
        if is_plain(plan):
            rows = w0.shape[0]
            width = w0[0].numel()
            chunk = rows if self.device.type == "cuda" else max(MIN_BLOCK_ROWS, min(rows, CPU_CHUNK_ELEMENTS // max(1, width)))
            total = merge_rows_into(
                out.view(rows, width), w0.view(rows, width), plan.layers, chunk,
                self.work.tensor((min(rows, chunk + MIN_BLOCK_ROWS - 1), width), compute),
                self.widened.tensor((min(rows, chunk + MIN_BLOCK_ROWS - 1), width), compute),
                fuse=self.device.type == "cpu", widen=fp8_rows,
            )
            if not bool(torch.isfinite(total)) and not bool(torch.isfinite(out).all()):
                self._refuse_non_finite(name, plan, self._values_of(name, w0))
        else:
            merged = merged_tensor(plan, w0, compute)
            # one reduction instead of an element-wise isfinite pass
            if not bool(torch.isfinite(merged.sum())) and not bool(torch.isfinite(merged).all()):
                self._refuse_non_finite(name, plan, w0)
            out.copy_(merged)  # the one rounding to the stored dtype
        # The sums above were taken before the rounding: a finite float32 result may still
        # be past the stored dtype's range (float16). One more reduction, on the result,
        # unless W0 fits the stored dtype and the update is far too small to push it out.
        if may_overflow(compute, stored) and not _fits_surely(plan, values, stored) and not all_finite(out):
            self._refuse_overflow(name, plan, self._values_of(name, w0), out)
        return out

    def row_merge(self, name: str) -> RowMerge | None:
        """W0 + Σ wᵢ·sᵢ·BᵢAᵢ for any block of rows of a plain tensor, from those rows of W0
        in float32 (`RowMerge`), the arithmetic of `__call__` on them; None where the tensor
        needs more than its rows (not plain, or rounded through NF4 first)."""
        plan = self.plan.tensors[name]
        if not is_plain(plan) or name in self.nf4_tensors:
            return None
        return RowMerge(merge_factors(plan.layers, self.device, torch.float32, self.device.type == "cpu"))

    def _fp8_codes(self, name: str, w0: torch.Tensor) -> bool:
        """`w0` holds an FP8 weight's codes (not yet its values)."""
        return w0.dtype.itemsize == 1 and self.plan.base.is_fp8_weight(name)

    def _values_of(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        """W0's values: FP8 codes dequantized (the error paths look at them element by element)."""
        return self.plan.base.dequantized(name, w0) if self._fp8_codes(name, w0) else w0

    def _refuse_non_finite(self, name: str, plan: TensorPlan, w0: torch.Tensor) -> None:
        if not bool(torch.isfinite(w0).all()):  # the base's fault, not the adapter's
            raise FormatError(self.plan.base.shard_of(name).path, f"tensor {name!r} contains NaN or Inf")
        raise LoraToolsError(plan.sources[0], f"merging into {name!r} produced NaN or Inf")

    def _refuse_overflow(self, name: str, plan: TensorPlan, w0: torch.Tensor, out: torch.Tensor) -> None:
        """The stored result holds ±Inf that the computation did not: a value past the
        stored dtype's range. The base's fault if W0 alone does not fit, else the update's."""
        if plan.replacement is None:  # (a replaced tensor's W0 is not what is stored)
            refuse_overflow(self.plan.base.shard_of(name).path, name, w0, w0.to(out.dtype))
        where = first_new_non_finite(w0, out)
        if where is None:  # W0 held that Inf already
            return
        dtype = str(out.dtype).removeprefix("torch.")
        raise RequestError(
            plan.sources[0],
            f"merging into {name!r} gives a value past the largest {dtype} value {torch.finfo(out.dtype).max:.6g} "
            f"at {where} (W0 there: {float(w0[tuple(where)]):.6g}): it would be stored as inf; "
            "use a dtype of wider range (e.g. --dtype bf16 or fp32) or a smaller --weight",
        )


def _fits_surely(plan: TensorPlan, base: torch.dtype, stored: torch.dtype) -> bool:
    """True when no element of W0 + Σ w·s·B·A can round past `stored`'s range: W0 is
    stored in a dtype no wider than it, and the bound Σ |w·s|·r·max|B|·max|A| on every
    element of the update is below half the room between `stored`'s largest value and
    the point where rounding gives Inf (half an ulp there: 16 for float16, 3e35 for
    bfloat16). Costs a pass over the factors only, so the common merge (bf16 or fp16
    in, the same out, updates far below 1) needs no extra pass over the result."""
    if not is_plain(plan) or may_overflow(base, stored):
        return False
    finfo = torch.finfo(stored)
    room = finfo.max * finfo.eps / 4  # half an ulp at the top of the range
    bound = 0.0
    for target, weight in plan.layers:
        b, a = target.layer.b_matrix, target.layer.a_matrix
        if not isinstance(b, torch.Tensor) or not isinstance(a, torch.Tensor) or not b.numel() or not a.numel():
            return False
        peaks = [max(abs(float(x)) for x in torch.aminmax(f.reshape(-1))) for f in (b, a)]
        bound += abs(target.layer.scale * weight) * b.shape[-1] * peaks[0] * peaks[1]
    return bound <= room / 2
