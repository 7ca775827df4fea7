"""The --weight values of merge and verify, checked before any file is read.

A weight multiplies an adapter's scaling, and the product is applied to the factors
in float32 (merge) or float64 (verify). NaN and ±Inf would make every adapted tensor
NaN or Inf, and a huge finite weight overflows float32 for any non-trivial update:
either way the adapter would be blamed for the user's request. So a weight must be a
finite number of magnitude at most MAX_WEIGHT. The bound leaves float32 (largest
finite 3.4e38) eight orders of magnitude for the scaling and the factors' products;
no sensible mix comes near it, and blend refuses non-finite weights the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from lora_tools.errors import RequestError

MAX_WEIGHT = 1e30


def check_weights(weights: Sequence[float] | None, where: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse a weight that is NaN, ±Inf or larger in magnitude than MAX_WEIGHT, naming
    the adapter it belongs to (`where`: the adapter paths, in the weights' order)."""
    for index, weight in enumerate(weights or ()):
        value = float(weight)
        if math.isfinite(value) and abs(value) <= MAX_WEIGHT:
            continue
        path = where[index] if index < len(where) else (where[0] if where else None)
        why = "not a finite number" if not math.isfinite(value) else f"beyond ±{MAX_WEIGHT:g}"
        raise RequestError(path, f"--weight {value:g} is {why}; weights must be finite, |w| ≤ {MAX_WEIGHT:g}")
