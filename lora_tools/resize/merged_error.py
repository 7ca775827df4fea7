"""`resize --base`: how far the merged weight moves, not only ΔW.

For plain LoRA the merged weights differ by exactly ΔW − ΔW_k, whose norm the report
already has; DoRA renormalises W0 + ΔW row by row (m ⊙ (W0 + ΔW)/‖W0 + ΔW‖), so a
truncated direction changes every weight of the row by an amount only the base can
tell. Both merges are done here by the merge recipe itself (`linalg.dense.apply_layer`,
the code `merge` and `verify` run) in float64, one base tensor at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from lora_tools.adapter import Adapter, LoraLayer
from lora_tools.errors import FormatError


@dataclass
class MergedError:
    """‖W'_in − W'_out‖_F and ‖W'_in‖_F for one layer (W' = the merged weight)."""

    error: float
    merged_norm: float

    @property
    def relative(self) -> float:
        return self.error / self.merged_norm if self.merged_norm > 0.0 else 0.0


def merged_errors(adapter: Adapter, resized: Sequence[LoraLayer | None],
                  base_path: str | os.PathLike[str]) -> list[MergedError]:
    """Per input layer (in order; `resized[i]` is layer i's output, None when dropped),
    the merged weight's error against the base at `base_path`, float64."""
    import torch

    from lora_tools.engine.binding import fit_to_base
    from lora_tools.formats.names import resolve_names
    from lora_tools.io.checkpoint import BaseCheckpoint
    from lora_tools.linalg.dense import apply_layer

    where = os.fspath(base_path)
    results = []
    with BaseCheckpoint.open(base_path) as base:
        resolved = resolve_names(adapter, base.module_paths(), where)
        targets = fit_to_base(resolved, lambda k: base.info(k).shape if base.has(k) else None, where, base.value_dtype)
        for target, out in zip(targets, resized):
            w0 = torch.from_numpy(base.numpy(target.weight_key)).to(torch.float64)
            before = apply_layer(w0, w0, target, 1.0)
            after = w0 if out is None else apply_layer(w0, w0, replace(target, layer=replace(out, name=target.layer.name)), 1.0)
            error, norm = float(torch.linalg.vector_norm(before - after)), float(torch.linalg.vector_norm(before))
            if not (math.isfinite(error) and math.isfinite(norm)):
                raise FormatError(base.shard_of(target.weight_key).path,
                                  f"tensor {target.weight_key!r}: the merged weight is not finite (NaN or Inf in W0?)")
            results.append(MergedError(error, norm))
    return results
