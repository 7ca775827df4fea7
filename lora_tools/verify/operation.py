"""`verify`: prove, tensor by tensor, that a merged checkpoint is BASE + Σ wᵢ·ΔWᵢ.

Per adapted tensor: the expected weight is recomputed in float64 from W0 and the
factors (the same `dense` code as merge, another dtype); the stored tensor must lie
within about one unit in the last place of it. Because an element-wise test in bf16 is
blind to a 5 % error on an update far below the weight's ulp, each tensor also gets the
least-squares strength k = ⟨W_merged − W0, ΔW⟩ / ‖ΔW‖²_F (1 healthy, 0 not applied,
0.5 half, −1 sign flip, ≈0 another layer's update) and the spread σ_k that rounding
alone explains; |k − 1| beyond K_SIGMAS·σ_k fails. A tensor that misses its tolerance
but is W0 + k·ΔW to within rounding is a "wrong strength"; anything else that misses is
a "mismatch". When even k cannot tell a merge from no merge, the tensor is
"inconclusive", never passed, even when a replayed recipe matches its bytes. Every
other tensor must be bit-identical (after merge --dtype: the base rounded once to its
new dtype). A forward check runs random inputs through the merged weight and through
the unmerged computation.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lora_tools.engine.placement import factors_on
from lora_tools.engine.plan import TensorPlan, make_plan
from lora_tools.engine.staging import CudaStaging
from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import BaseCheckpoint
from lora_tools.linalg.device import resolve_device
from lora_tools.verify import blocks
from lora_tools.verify.blocks import bytes_equal, check_plain_tensor, converted_equal
from lora_tools.verify.fp8_tensors import check_adapted_fp8, check_aux, involves_fp8, unadapted_fp8_identical
from lora_tools.verify.tensor_check import K_SIGMAS, TensorCheck, check_tensor
from lora_tools.verify.workers import BlockWorkers

__all__ = ["K_SIGMAS", "TensorCheck", "VerifyReport", "check_tensor", "verify"]


@dataclass
class VerifyReport:
    base: str
    merged: str
    adapters: list[str]
    weights: list[float]
    equivalent: bool
    n_adapted: int
    n_unadapted: int
    n_unadapted_identical: int  # bit-identical, or exactly the base rounded to a new dtype
    tensors: list[TensorCheck]
    n_unadapted_converted: int = 0  # of those, stored in another dtype (merge --dtype)
    changed_unadapted: list[str] = field(default_factory=list)
    layout_problems: list[str] = field(default_factory=list)
    atol: float | None = None
    rtol: float | None = None

    @property
    def n_failed(self) -> int:
        return sum(t.verdict not in {"ok", "inconclusive"} for t in self.tensors)

    @property
    def n_inconclusive(self) -> int:
        return sum(t.verdict == "inconclusive" for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON values: a figure that is not finite (an Inf stored in MERGED,
        an error against a zero tolerance) is null; its verdict and detail say why."""
        document = _finite_or_none(asdict(self))
        document["n_failed"] = self.n_failed
        document["n_inconclusive"] = self.n_inconclusive
        return document


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def verify(
    base_path: str | os.PathLike[str],
    adapter_paths: list[str | os.PathLike[str]],
    merged_path: str | os.PathLike[str],
    *,
    weights: list[float] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    alpha: float | None = None,
    seed: int = 0,
    workers: int | None = None,
    device: str = "cpu",
) -> VerifyReport:
    """Check `merged_path` against BASE + Σ wᵢ·ΔWᵢ; see the module docstring.

    workers: threads for the row blocks (default: one per core, at most
    `workers.MAX_WORKERS`); the report does not depend on it.
    device: where plain LoRA tensors are judged ("cpu", "auto", "cuda", "cuda:N"): on a
    GPU through merge's staging, each tensor whole, replaying merge's GPU arithmetic; the
    other tensors are compared and checked on the host either way."""
    staging = blocks.device_staging(resolve_device(device))
    # factors as stored (bf16 at half the size of float32), widened per use like merge's
    plan = make_plan(base_path, adapter_paths, weights, alpha=alpha, place=factors_on(torch.device("cpu")))
    try:
        with BaseCheckpoint.open(merged_path) as merged:
            report = VerifyReport(
                base=os.fspath(base_path), merged=os.fspath(merged_path),
                adapters=[os.fspath(p) for p in adapter_paths], weights=plan.weights,
                equivalent=False, n_adapted=0, n_unadapted=0, n_unadapted_identical=0, tensors=[],
                atol=atol, rtol=rtol,
            )
            base_names = plan.base.tensor_names()
            adapted = set(plan.tensors)
            extra = sorted(set(merged.tensor_names()) - set(base_names))
            report.layout_problems += [f"tensor {n!r} is not in the base" for n in extra[:20]]
            pool = BlockWorkers(workers)
            try:
                for index, name in enumerate(base_names):
                    for upcoming in base_names[index : index + 2]:  # this tensor and the next: read ahead
                        for checkpoint in (plan.base, merged):
                            if upcoming in checkpoint.weight_map:
                                checkpoint.shard_of(upcoming).will_need(upcoming)
                    _check_one(plan.tensors.get(name), name, plan.base, merged, report, atol, rtol, seed + index, pool,
                               adapted, staging)
            finally:
                pool.close()
    finally:
        plan.close()
    report.equivalent = report.n_failed == 0 and not report.changed_unadapted and not report.layout_problems
    return report


def _check_one(
    plan: TensorPlan | None, name: str, base: BaseCheckpoint, merged: BaseCheckpoint,
    report: VerifyReport, atol: float | None, rtol: float | None, seed: int, pool: BlockWorkers,
    adapted: set[str], staging: CudaStaging | None = None,
) -> None:
    if involves_fp8(name, base, merged) and _check_fp8(plan, name, base, merged, report, atol, rtol, seed, adapted):
        return
    if not merged.has(name):
        if plan is not None:
            report.n_adapted += 1
            report.tensors.append(TensorCheck(name, "missing", base.info(name).dtype, detail="absent from MERGED"))
        else:
            report.n_unadapted += 1
            report.layout_problems.append(f"tensor {name!r} is missing")
        return
    info_base, info_merged = base.info(name), merged.info(name)
    if info_base.shape != info_merged.shape:
        problem = f"tensor {name!r} has shape {list(info_merged.shape)}, base has {list(info_base.shape)}"
        if plan is not None:
            report.n_adapted += 1
            report.tensors.append(TensorCheck(name, "layout", info_merged.dtype, detail=problem))
        else:
            report.n_unadapted += 1
            report.layout_problems.append(problem)
        return
    if plan is None:
        report.n_unadapted += 1
        base_shard, merged_shard = base.shard_of(name), merged.shard_of(name)
        reader = pool.workers[0].reader
        if bytes_equal(pool, base_shard, merged_shard, name):
            report.n_unadapted_identical += 1
        elif converted_equal(reader, base_shard, merged_shard, name):  # merge --dtype: the base rounded once
            report.n_unadapted_identical += 1
            report.n_unadapted_converted += 1
        else:
            report.changed_unadapted.append(name)
        return
    report.n_adapted += 1
    fast = check_plain_tensor(plan, base.shard_of(name), merged.shard_of(name), pool, atol, rtol, seed, staging=staging)
    if fast is not None:
        report.tensors.append(fast)
        return
    # Not plain LoRA, another dtype, or a NaN/Inf somewhere: the whole-tensor check.
    w0 = base.torch(name)
    if not bool(torch.isfinite(w0.sum(dtype=torch.float64))):  # no expectation can be computed from it
        raise FormatError(base.shard_of(name).path, f"tensor {name!r} contains NaN or Inf")
    report.tensors.append(check_tensor(plan, w0, merged.torch(name), atol, rtol, seed))


def _check_fp8(
    plan: TensorPlan | None, name: str, base: BaseCheckpoint, merged: BaseCheckpoint,
    report: VerifyReport, atol: float | None, rtol: float | None, seed: int, adapted: set[str],
) -> bool:
    """`verify.fp8_tensors`' rules for an FP8 weight or a scale; False leaves the tensor
    to the ordinary checks (missing, misshaped, or a scale to compare byte for byte)."""
    if base.fp8 is not None and name in base.fp8.aux:
        action, problem = check_aux(name, adapted, base, merged)
        if problem is not None:
            report.layout_problems.append(problem)
        return action != "compare"
    if not merged.has(name) or base.info(name).shape != merged.info(name).shape or not base.is_fp8_weight(name) and not merged.is_fp8_weight(name):
        return False
    if plan is None:
        report.n_unadapted += 1
        identical, converted = unadapted_fp8_identical(name, base, merged)
        if identical:
            report.n_unadapted_identical += 1
            report.n_unadapted_converted += converted
        else:
            report.changed_unadapted.append(name)
        return True
    report.n_adapted += 1
    report.tensors.append(check_adapted_fp8(plan, base, merged, atol, rtol, seed))
    return True
