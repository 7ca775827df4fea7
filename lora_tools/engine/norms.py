"""‖ΔW‖ of one tensor's update, from its factors.

Why a module of its own: merge's FP8 survival figure and verify's float32 screen both
need the norm of a tensor's whole update (every adapter's layers, weighted) without a
pass over an m×n matrix; `linalg.factored` has the Gram-sum norm of a B·A pair, and this
gathers a plan's layers into one.
"""

from __future__ import annotations

import numpy as np
import torch

from lora_tools.adapter import Factor
from lora_tools.engine.plan import TensorPlan
from lora_tools.linalg.dense import factor_tensor
from lora_tools.linalg.factored import concat_factors, frobenius_norm


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
