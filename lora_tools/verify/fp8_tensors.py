"""verify's rules for the tensors an FP8 base or an FP8 merge changes.

- The expectation comes from the dequantized base (codes × scales, `io.fp8`), as merge's.
- An FP8 weight in MERGED is read dequantized with MERGED's own scales; each element is
  held to one step of its FP8 value (its code's ulp times its block's scale: a correct
  re-quantization errs by at most half of it), and the strength fit's spread uses those
  steps, so k still has to come out at 1 where the update is representable. The forward
  check, bounded in float32 epsilons, is left to the element-wise one.
- A merge written dequantized (bf16) has no scale tensors: their absence is expected. An
  adapted weight's scale tensor in an FP8 merge is new by design and judged through the
  weight it scales. An unadapted FP8 weight must keep its values: byte for byte in an
  FP8 merge, rounded once to the stored dtype in a dequantized one.
"""

from __future__ import annotations

import torch

from lora_tools.engine.plan import TensorPlan
from lora_tools.engine.stream import all_finite
from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import BaseCheckpoint
from lora_tools.io.fp8 import step_of
from lora_tools.verify.tensor_check import TensorCheck, check_tensor


def involves_fp8(name: str, base: BaseCheckpoint, merged: BaseCheckpoint) -> bool:
    """Whether `name` is an FP8 weight or a scale in either checkpoint."""
    return any(c.fp8 is not None and (name in c.fp8.weights or name in c.fp8.aux) for c in (base, merged))


def check_aux(name: str, adapted: set[str], base: BaseCheckpoint, merged: BaseCheckpoint) -> tuple[str, str | None]:
    """A base scale (or activation scale): ("skip", None) when its absence or change is
    expected, ("compare", None) when it must be byte-identical, ("problem", text) else."""
    owner = None if base.fp8 is None else base.fp8.owners.get(name)
    if not merged.has(name):
        kept_fp8 = merged.fp8 is not None and (owner is None or owner in merged.fp8.weights)
        return ("problem", f"tensor {name!r} (a scale) is missing") if kept_fp8 else ("skip", None)
    if owner is not None and owner in adapted and merged.is_fp8_weight(owner):
        return "skip", None  # fresh scales of a re-quantized weight: judged through it
    return "compare", None


def unadapted_fp8_identical(name: str, base: BaseCheckpoint, merged: BaseCheckpoint) -> tuple[bool, bool]:
    """(identical, converted) for an FP8 weight no adapter touches: the same values
    (codes and scales) in an FP8 merge, or the values rounded once to MERGED's dtype."""
    if merged.is_fp8_weight(name) != base.is_fp8_weight(name) and merged.is_fp8_weight(name):
        return False, False  # a 16-bit tensor quantized: changed
    ours, theirs = base.torch(name), merged.torch(name)
    if merged.is_fp8_weight(name):
        return bool(torch.equal(ours, theirs)), False
    # dequantized values are finite: an Inf here is a rounding that overflowed (fp16)
    return bool(torch.equal(ours.to(theirs.dtype), theirs)) and all_finite(theirs), True


def check_adapted_fp8(
    plan: TensorPlan, base: BaseCheckpoint, merged: BaseCheckpoint, atol: float | None, rtol: float | None, seed: int
) -> TensorCheck:
    """The whole-tensor check of an adapted weight stored as FP8 in BASE or in MERGED."""
    name = plan.name
    w0 = base.torch(name)
    if not bool(torch.isfinite(w0.sum(dtype=torch.float64))):
        raise FormatError(base.shard_of(name).path, f"tensor {name!r} contains NaN or Inf")
    stored = merged.torch(name)
    step = None
    if merged.is_fp8_weight(name):
        step = step_of(merged.shard_of(name).torch(name), *merged.scales_of(name))
    check = check_tensor(plan, w0, stored, atol, rtol, seed, step)
    if step is not None:
        check.dtype = f"{merged.info(name).dtype} (dequantized)"
    return check
