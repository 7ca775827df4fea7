"""Judging one adapted tensor of a merged checkpoint against its float64 expectation.

The whole-tensor check: any layer kind (DoRA, embeddings, fan_in_fan_out, biases,
modules_to_save, float64), and the reference for the row-block path (`blocks`), which
takes plain LoRA tensors. The figures come from the same functions (`figures`), this
check handing them the whole tensor as one block; here only the expectation
(`dense.merged_tensor`) and the layouts (transposed, reshaped) are its own. `verify`
calls `check_tensor` per adapted tensor the row-block path leaves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lora_tools.engine.plan import TensorPlan, is_plain
from lora_tools.errors import LoraToolsError
from lora_tools.linalg.dense import (
    accumulation_dtype,
    factor_tensor,
    like_weight,
    merge_rows_into,
    merged_tensor,
)
from lora_tools.verify.figures import (
    EPS,
    FORWARD_BATCH,
    K_SIGMAS,
    RECIPE_FP32_ROUND_ONCE,
    SLACK_PER_UNIT,
    Sums,
    TensorCheck,
    fill_figures,
    fit_residual,
    forward_error,
    forward_inputs,
    judge_rows,
    peft_delta_into,
    peft_recipes,
    relative_error,
    slack_factor,
    slack_into,
    worst_index,
)

__all__ = ["FORWARD_BATCH", "K_SIGMAS", "RECIPE_FP32_ROUND_ONCE", "TensorCheck", "check_tensor", "decide"]

# Below this resolving power (6σ_k ≥ 0.5), k cannot tell "applied" from "half applied".
INCONCLUSIVE_SPREAD = 0.5 / K_SIGMAS


def compute_slack(plan: TensorPlan, expected_abs: torch.Tensor) -> torch.Tensor:
    """`figures.slack_into` over the whole tensor, layer by layer in its layout, float32;
    a DoRA layer's m/‖W0+ΔW‖ factor carries its own rounding: 2·eps32·|E| more."""
    total = torch.zeros(expected_abs.shape, dtype=torch.float32)
    for target, weight in plan.layers:
        b = factor_tensor(target.layer.b_matrix, "cpu", torch.float32)  # (out, r)
        a = factor_tensor(target.layer.a_matrix, "cpu", torch.float32)  # (r, in·k)
        product = torch.empty((b.shape[0], a.shape[1]), dtype=torch.float32)
        total += like_weight(slack_into(product, product, [slack_factor(b, a, target.layer.scale * weight)], 0, b.shape[0]), target)
        if target.layer.magnitude is not None:
            total += expected_abs * SLACK_PER_UNIT
    return total


def replayed_recipe(plan: TensorPlan, w0: torch.Tensor, stored: torch.Tensor) -> str | None:
    """Replay known merge recipes and name the one that gives the stored bytes."""
    if torch.equal(_lora_tools_merge(plan, w0, stored.dtype), stored):
        return RECIPE_FP32_ROUND_ONCE
    if plan.replacement or any(t.layer.magnitude is not None for t, _ in plan.layers) or plan.biases:
        return None
    for twice, recipe in peft_recipes(w0.dtype):
        current = w0.clone()
        for target, weight in plan.layers:
            b = factor_tensor(target.layer.b_matrix, "cpu", torch.float32)
            a = factor_tensor(target.layer.a_matrix, "cpu", torch.float32)
            delta = torch.empty((b.shape[0], a.shape[1]), dtype=w0.dtype)
            current += like_weight(peft_delta_into(delta, b @ a, target.layer.scale * weight, twice), target)
        if torch.equal(current, stored):
            return recipe
    return None


def _lora_tools_merge(plan: TensorPlan, w0: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """What `lora-tools merge` writes for this tensor (its own hot path where it takes it)."""
    compute = accumulation_dtype(w0.dtype, stored)
    if not is_plain(plan):
        return merged_tensor(plan, w0, compute).to(stored)
    rows = w0.shape[0]
    width = w0[0].numel()
    out = torch.empty(w0.shape, dtype=stored)
    work, widened = (torch.empty((rows, width), dtype=compute) for _ in range(2))
    merge_rows_into(out.view(rows, width), w0.view(rows, width), plan.layers, rows, work, widened, fuse=True)
    return out


def check_tensor(
    plan: TensorPlan, w0: torch.Tensor, stored: torch.Tensor, atol: float | None, rtol: float | None, seed: int,
    step: torch.Tensor | None = None,
) -> TensorCheck:
    """Compare one stored adapted tensor with its float64 expectation. `step`: each
    element's rounding step when `stored` holds dequantized FP8 values (float32), which
    replaces the dtype's ulp; the forward check, whose bound is in units of the dtype's
    epsilon, is then left to the element-wise one."""
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
    update = (expected - base64).reshape(-1)

    def rows() -> list[torch.Tensor]:
        """`figures`' six flat float64 buffers (W0, E − W0, E, MERGED, scratch ×2), fresh:
        the originals are read again."""
        return [base64.flatten().clone(), update, expected.flatten().clone(), actual.flatten().clone(),
                torch.empty_like(update), torch.empty_like(update)]

    sums = Sums()
    step64 = None if step is None else step.to(torch.float64).reshape(-1)
    if update.numel():  # the whole tensor is one block
        judge_rows(rows(), compute_slack(plan, expected.abs()).view(-1), dtype, sums, 0, atol, rtol, step64)
    strength_allowance = fill_figures(check, sums)
    check.recipe = replayed_recipe(plan, w0, stored)
    check.forward_rel_error = _forward_error(plan, actual, expected, base64, seed) if step is None else None

    def fits_strength() -> bool:
        slack = compute_slack(plan, expected.abs()).view(-1)
        return fit_residual(rows(), slack, torch.empty_like(slack), check.strength or 0.0, dtype, atol, rtol, step64) <= 1.0

    return decide(
        check, sums.update_sq, strength_allowance, dtype,
        stored_is_base=lambda: bool(torch.equal(stored, w0.to(dtype))),
        expected_rounds_to_base=lambda: bool(torch.equal(expected.to(dtype), w0.to(dtype))),
        fits_strength=fits_strength, worst_at=lambda: worst_index(sums, expected.shape),
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
    forward_limit = 8 * EPS[dtype]
    if check.verdict == "ok" and check.recipe is None and (check.forward_rel_error or 0.0) > forward_limit:
        check.verdict = "forward mismatch"
        check.detail = f"forward relative error {check.forward_rel_error:.3g} > {forward_limit:.3g}"
    return check


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
    """`figures.forward_error` in the weight's layout: plain LoRA layers use the factors
    unmerged; DoRA and replaced tensors use the dense expectation (their unmerged forward
    is the same product). Embeddings are lookups, already covered element by element.
    """
    if not plan.layers or any(t.layer.kind == "embedding" for t, _ in plan.layers) or actual.ndim < 2:
        return None
    matrix = actual.reshape(actual.shape[0], -1)
    transposed = plan.layers[0][0].transposed
    if transposed:
        matrix = matrix.T
    x = forward_inputs(seed, matrix.shape[1])
    merged_out = x @ matrix.T
    plain = plan.replacement is None and all(t.layer.magnitude is None for t, _ in plan.layers)
    if plain:
        base = base64.reshape(actual.shape[0], -1)
        return forward_error(x, plan.layers, merged_out, x @ (base.T if transposed else base).T)
    full = expected.reshape(expected.shape[0], -1)
    return relative_error(merged_out, x @ (full.T if transposed else full).T)
