"""Judging one adapted tensor of a merged checkpoint against its float64 expectation.

The numbers behind every `verify` verdict: the element-wise error against a tolerance
of about one ulp of the stored dtype (plus float32's own slack), the least-squares
strength k = ⟨W_merged − W0, ΔW⟩ / ‖ΔW‖²_F with the spread σ_k that rounding alone
explains, replays of the known merge recipes, and a forward check. `verify` streams a
checkpoint and calls `check_tensor` per adapted tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_tools.linalg.dense import delta_weight, factor_tensor, merge_rows_into
from lora_tools.errors import LoraToolsError
from lora_tools.engine.binding import LayerTarget
from lora_tools.engine.plan import is_plain
from lora_tools.linalg.dense import accumulation_dtype, merged_tensor
from lora_tools.engine.plan import TensorPlan

# |k − 1| beyond this many rounding spreads is a strength error.
K_SIGMAS = 6.0
# Below this resolving power (6σ_k ≥ 0.5), k cannot tell "applied" from "half applied".
INCONCLUSIVE_SPREAD = 0.5 / K_SIGMAS
FORWARD_BATCH = 8

RECIPE_FP32_ROUND_ONCE = "fp32 round-once (lora-tools; PEFT with fp32 adapter weights)"

_EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}


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


def _ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at each |value| (float32 out: it is a tolerance, and halving
    the memory traffic of these passes halves verify's time on a 1B model).

    |v| = m·2^e with m in [0.5, 1): the spacing is eps·2^(e−1). frexp is exact and two
    orders of magnitude faster than exp2(floor(log2(·))). Values below the dtype's
    smallest normal get that normal's spacing.
    """
    eps = _EPS[dtype]
    magnitude = values.abs().to(torch.float32).clamp_min_(torch.finfo(dtype).tiny)
    _, exponent = torch.frexp(magnitude)
    return torch.ldexp(magnitude.fill_(eps / 2), exponent)


def compute_slack(plan: TensorPlan, expected_abs: torch.Tensor) -> torch.Tensor:
    """What float32 arithmetic may add to a merge before its final rounding.

    A merge computed in float32 (ours, PEFT's, on a CPU or a GPU) carries product
    errors of a few float32 eps times |w·s|·|B|·|A|; in a bf16 checkpoint this is
    invisible, in an fp32 one it is what separates a correct merge computed in another
    order from a wrong one.
    """
    terms = torch.zeros(expected_abs.shape, dtype=torch.float32)
    for target, weight in plan.layers:
        terms += delta_weight(target, weight, "cpu", torch.float32, absolute=True)
        if target.layer.magnitude is not None:  # the m/‖W0+ΔW‖ factor carries its own rounding
            terms += expected_abs
    return terms.mul_(2 * _EPS[torch.float32])


def _recipes(plan: TensorPlan, w0: torch.Tensor, stored: torch.Tensor) -> str | None:
    """Replay known merge recipes and name the one that gives the stored bytes."""
    if torch.equal(_lora_tools_merge(plan, w0, stored.dtype), stored):
        return RECIPE_FP32_ROUND_ONCE
    if not plan.replacement and all(t.layer.magnitude is None for t, _ in plan.layers) and not plan.biases:
        # PEFT with adapter weights in the model's dtype: delta rounded, then added in that
        # dtype. On a CPU PEFT computes B·A·s in fp32 and rounds once; on a GPU a bf16/fp16
        # GEMM rounds B·A, and the scaling rounds again.
        name = str(w0.dtype).removeprefix("torch.")
        current = w0.clone()
        for target, weight in plan.layers:
            current += delta_weight(target, weight, w0.device, torch.float32).to(w0.dtype)
        if torch.equal(current, stored):
            return recipe_peft_native(name)
        if w0.dtype in (torch.bfloat16, torch.float16):
            current = w0.clone()
            for target, weight in plan.layers:
                current += _delta_rounded_twice(target, weight, w0.dtype)
            if torch.equal(current, stored):
                return recipe_peft_gpu(name)
    return None


def recipe_peft_native(dtype_name: str) -> str:
    return f"PEFT delta in {dtype_name}, added in {dtype_name}"


def recipe_peft_gpu(dtype_name: str) -> str:
    return f"PEFT on a GPU: B·A and its scaling rounded to {dtype_name}, added in {dtype_name}"


def _lora_tools_merge(plan: TensorPlan, w0: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """What `lora-tools merge` writes for this tensor (its own hot path where it takes it)."""
    compute = accumulation_dtype(w0.dtype, stored)
    if not is_plain(plan):
        return merged_tensor(plan, w0, compute).to(stored)
    rows = w0.shape[0]
    width = w0[0].numel()
    out = torch.empty(w0.shape, dtype=stored)
    buffers = [torch.empty((rows, width), dtype=compute) for _ in range(2)]
    merge_rows_into(out.view(rows, width), w0.view(rows, width), plan.layers, rows, *buffers, fuse=True)
    return out


def _delta_rounded_twice(target: LayerTarget, weight: float, dtype: torch.dtype) -> torch.Tensor:
    """w·s·B·A as a half-precision GEMM gives it: B·A accumulated in fp32 and rounded to
    `dtype`, then multiplied by w·s and rounded again."""
    b = factor_tensor(target.layer.b_matrix, "cpu", torch.float32)  # (out, r)
    a = factor_tensor(target.layer.a_matrix, "cpu", torch.float32)  # (r, in·k)
    product = (b @ a).to(dtype)
    delta = (product.to(torch.float32) * (target.layer.scale * weight)).to(dtype)
    if target.transposed:
        delta = delta.T
    return delta.reshape(target.weight_shape)


def check_tensor(
    plan: TensorPlan, w0: torch.Tensor, stored: torch.Tensor, atol: float | None, rtol: float | None, seed: int
) -> TensorCheck:
    """Compare one stored adapted tensor with its float64 expectation."""
    dtype = stored.dtype
    check = TensorCheck(plan.name, "ok", str(dtype).removeprefix("torch."))
    base64 = w0.to(torch.float64)
    expected = merged_tensor(plan, base64, torch.float64)  # widened once, not twice
    # one reduction each instead of element-wise isfinite passes (a sum of finite
    # float64 weights cannot overflow)
    if not bool(torch.isfinite(expected.sum())):  # W0 is finite (checked by the caller): the update overflows
        raise LoraToolsError(plan.sources[0], f"merging into {plan.name!r} produced NaN or Inf")
    actual = stored.to(torch.float64)
    if not bool(torch.isfinite(actual.sum())):
        # Every comparison with NaN is false: without this, NaN would pass every test below.
        where = [int(i) for i in (~torch.isfinite(actual)).nonzero()[0]]
        check.verdict, check.detail = "mismatch", f"MERGED holds NaN or Inf (first at {where})"
        check.max_abs_error = check.max_rel_error = check.worst_ulps = math.inf
        return check
    diff = actual - expected  # (the stored error, signed)
    error = diff.abs()
    check.max_abs_error = float(error.max()) if error.numel() else 0.0
    expected_abs = expected.abs()
    scale = float(expected_abs.max()) if expected.numel() else 0.0
    check.max_rel_error = check.max_abs_error / scale if scale > 0 else 0.0
    slack = compute_slack(plan, expected_abs)
    ulp = _ulp(torch.maximum(expected_abs, base64.abs()), dtype).to(torch.float64)  # mixed-dtype ops are slow
    slack = slack.to(torch.float64)
    if atol is None and rtol is None:  # one ulp of the stored dtype, plus float32's slack
        tolerance = ulp + slack
    else:
        tolerance = (atol or 0.0) + (rtol or 0.0) * expected_abs
    worst = error.div_(tolerance.clamp_min_(torch.finfo(torch.float64).tiny))
    check.worst_ulps = float(worst.max()) if worst.numel() else 0.0

    update = (expected - base64).view(-1)
    update_sq = float(torch.dot(update, update))
    strength_allowance = 0.0
    if update_sq > 0:
        # k = ⟨W_merged − W0, ΔW⟩/‖ΔW‖² = 1 + ⟨W_merged − E, ΔW⟩/‖ΔW‖²
        check.strength = 1.0 + float(torch.dot(diff.view(-1), update)) / update_sq
        # rounding to the stored dtype: variance ulp²/12 per element
        spread = update * ulp.view(-1)
        check.strength_spread = math.sqrt(float(torch.dot(spread, spread)) / 12.0) / update_sq
        # float32 arithmetic before the rounding (w·s itself rounded, DoRA's norm, the
        # product) may shift every element the same way: at most ⟨slack, |ΔW|⟩/‖ΔW‖².
        # Invisible next to bf16 rounding; in fp32 it is what a correct GPU merge shows.
        slack_shift = float(torch.dot(slack.view(-1), update.abs())) / update_sq
        strength_allowance = max(K_SIGMAS * check.strength_spread, slack_shift)
    check.recipe = _recipes(plan, w0, stored)
    check.forward_rel_error = _forward_error(plan, actual, expected, base64, seed)

    def worst_at() -> list[int]:
        return [int(i) for i in torch.unravel_index(worst.argmax(), worst.shape)] if worst.ndim else []

    return decide(
        check, update_sq, strength_allowance, dtype,
        stored_is_base=lambda: bool(torch.equal(stored, w0.to(dtype))),
        expected_rounds_to_base=lambda: bool(torch.equal(expected.to(dtype), w0.to(dtype))),
        fits_strength=lambda: _fits_strength(plan, base64, expected, actual, check.strength or 0.0, tolerance, atol, rtol, dtype),
        worst_at=worst_at,
    )


def decide(
    check: TensorCheck, update_sq: float, strength_allowance: float, dtype: torch.dtype, *,
    stored_is_base: Callable[[], bool], expected_rounds_to_base: Callable[[], bool],
    fits_strength: Callable[[], bool], worst_at: Callable[[], list[int]],
) -> TensorCheck:
    """The verdict from a tensor's figures; shared by the whole-tensor and the row-block
    check. The callables answer the few questions that need the tensors again; each is
    asked only when the verdict depends on it (they may cost a pass over the tensor).
    """
    # Below this resolving power k cannot tell "applied" from "half applied" or "not
    # applied", whatever the bytes say: even a replayed recipe that matches bit for bit
    # would match most strengths as well. Only elements that miss their tolerance (small
    # weights, where the update does show) can still prove something wrong.
    assert check.worst_ulps is not None
    resolvable = check.strength_spread is None or check.strength_spread <= INCONCLUSIVE_SPREAD
    strength_off = check.strength is not None and abs(check.strength - 1.0) > max(strength_allowance, 1e-9)
    if (
        update_sq > 0 and (resolvable or check.worst_ulps > 1.0) and stored_is_base()
        and not expected_rounds_to_base()
    ):
        check.verdict, check.detail = "not applied", "merged tensor equals the base"
    elif check.worst_ulps > 1.0 and check.recipe is None:
        if strength_off and fits_strength():
            assert check.strength is not None
            check.verdict = "wrong strength"
            check.detail = _strength_detail(check.strength, strength_allowance)
        else:
            check.verdict = "mismatch"
            check.detail = f"max error {check.worst_ulps:.3g}× the tolerance, worst at {worst_at()}"
            if check.strength is not None and abs(check.strength) < 0.5:
                check.detail += f"; the change is not this layer's update (strength {check.strength:.3g})"
            elif check.strength is not None:
                check.detail += f"; strength {check.strength:.4g}"
    elif not resolvable:
        check.verdict = "inconclusive"
        check.detail = "the update is below the stored dtype's rounding; a merge and no merge look alike"
        if check.recipe is not None:
            check.detail += f" (the bytes match {check.recipe})"
    elif strength_off and check.recipe is None:
        assert check.strength is not None
        check.verdict = "wrong strength"
        check.detail = _strength_detail(check.strength, strength_allowance)
    forward_limit = 8 * _EPS[dtype]
    if check.verdict == "ok" and check.recipe is None and (check.forward_rel_error or 0.0) > forward_limit:
        check.verdict = "forward mismatch"
        check.detail = f"forward relative error {check.forward_rel_error:.3g} > {forward_limit:.3g}"
    return check


def _fits_strength(
    plan: TensorPlan, base64: torch.Tensor, expected: torch.Tensor, actual: torch.Tensor, strength: float,
    tolerance: torch.Tensor, atol: float | None, rtol: float | None, dtype: torch.dtype,
) -> bool:
    """Is the stored tensor W0 + k·ΔW within rounding, for the fitted strength k?

    Then the update was applied at the wrong strength (half, double, sign flipped, the
    wrong alpha), rather than being something else altogether.
    """
    fitted = base64 + strength * (expected - base64)
    if atol is None and rtol is None:
        magnitude = torch.maximum(torch.maximum(fitted.abs(), actual.abs()), base64.abs())
        tolerance = _ulp(magnitude, dtype) + max(1.0, abs(strength)) * compute_slack(plan, expected.abs())
    residual = (actual - fitted).abs() / tolerance.clamp_min(torch.finfo(torch.float64).tiny)
    return bool(residual.numel() == 0 or float(residual.max()) <= 1.0)


def _strength_detail(strength: float, allowance: float) -> str:
    hints = {0.5: "half strength", 2.0: "double strength", -1.0: "sign flipped", 0.0: "not applied"}
    hint = next((h for k, h in hints.items() if abs(strength - k) <= 0.01), None)
    if hint is None and strength < 0:
        hint = f"sign flipped, {abs(strength):.3g}× strength"
    elif hint is None:
        hint = f"{strength:.3g}× strength" if abs(strength - 1) >= 1e-3 else f"off by {strength - 1:+.2g}"
    return f"strength {strength:.6g}, expected 1 ± {allowance:.2g}: {hint}"


def _forward_error(
    plan: TensorPlan, actual: torch.Tensor, expected: torch.Tensor, base64: torch.Tensor, seed: int
) -> float | None:
    """Relative error of x·W_mergedᵀ against the unmerged x·W0ᵀ + s·(x·Aᵀ)·Bᵀ path.

    Plain LoRA layers use the factors unmerged; DoRA and replaced tensors use the dense
    expectation (their unmerged forward is the same product). Embeddings are lookups,
    already covered element by element.
    """
    if not plan.layers or any(t.layer.kind == "embedding" for t, _ in plan.layers) or actual.ndim < 2:
        return None
    generator = torch.Generator().manual_seed(seed)
    matrix = actual.reshape(actual.shape[0], -1)
    transposed = plan.layers[0][0].transposed
    if transposed:
        matrix = matrix.T
    x = torch.randn(FORWARD_BATCH, matrix.shape[1], generator=generator, dtype=torch.float64)
    merged_out = x @ matrix.T
    plain = plan.replacement is None and all(t.layer.magnitude is None for t, _ in plan.layers)
    if plain:
        base = base64.reshape(actual.shape[0], -1)
        reference = x @ (base.T if transposed else base).T
        for target, weight in plan.layers:
            a = factor_tensor(target.layer.a_matrix, "cpu", torch.float64)
            b = factor_tensor(target.layer.b_matrix, "cpu", torch.float64)
            reference = reference + ((x @ a.T) @ b.T) * (target.layer.scale * weight)
    else:
        full = expected.reshape(expected.shape[0], -1)
        reference = x @ (full.T if transposed else full).T
    scale = float(reference.abs().max())
    return float((merged_out - reference).abs().max()) / scale if scale > 0 else 0.0
