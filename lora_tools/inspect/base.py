"""`inspect --base`: the adapter against its base checkpoint. ‖W0‖_F of each adapted
weight (for ‖ΔW‖/‖W0‖) and, for a QLoRA adapter (`--base-quant`), NF4's rounding error of
each weight bitsandbytes would quantize, in units of the layer's update."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from lora_tools.adapter import Adapter
from lora_tools.errors import FormatError, RequestError
from lora_tools.inspect.report import BaseQuantSummary, LayerReport
from lora_tools.linalg import nf4


def base_quant_summary(spec: nf4.BaseQuant, layers: list[LayerReport], errors: dict[str, float]) -> BaseQuantSummary:
    """Fill each quantized layer's base_quant_error and base_quant_mismatch (flagging
    "quant_mismatch" above 1) and sum them up in one sentence.

    The ratio compares two ways to merge: onto W0 (what a 16-bit serve loads) the result
    differs from what training saw, W_q + ΔW with W_q = deq(NF4(W0)), by W0 − W_q. Above 1,
    that difference is larger in norm than the layer's whole update. A zero update
    gets no ratio (it would be infinite; the layer is flagged dead already).
    """
    rated = []
    for layer in layers:
        if layer.name not in errors:
            continue
        layer.base_quant_error = errors[layer.name]
        if layer.fro_norm > 0:
            layer.base_quant_mismatch = layer.base_quant_error / layer.fro_norm
            rated.append(layer)
            if layer.base_quant_mismatch > 1:
                layer.flags.append("quant_mismatch")
    worst = max(rated, key=lambda m: m.base_quant_mismatch or 0.0, default=None)
    over = sum(1 for m in rated if (m.base_quant_mismatch or 0.0) > 1)
    if worst is None or worst.base_quant_mismatch is None:
        text = (f"no adapted layer has a base weight bitsandbytes holds in NF4 (Linear weights other than lm_head) and a"
                f" non-zero update: --base-quant {spec} changes nothing here")
    else:
        ratio = worst.base_quant_mismatch
        text = (f"merging onto the 16-bit base adds NF4's rounding error, {ratio:.3g}× the update on the worst layer"
                f" ({worst.name}){f', above 1× on {over} of {len(rated)} layers' if over else ''}; merge with"
                f" --base-quant {spec} to merge onto what the adapter was trained against")
    return BaseQuantSummary(
        spec=str(spec), double_quant=spec.double_quant, blocksize=spec.blocksize, quantized_layers=len(errors),
        layers_over_1=over, max_mismatch=None if worst is None else worst.base_quant_mismatch,
        worst_layer=None if worst is None else worst.name, summary=text,
    )


def against_base(
    adapter: Adapter, base_path: str | os.PathLike[str], spec: nf4.BaseQuant | None = None
) -> tuple[Adapter, dict[str, float], dict[str, float]]:
    """Resolve names against the base, check every layer fits, and measure ‖W0‖_F; with
    `spec`, also ‖W0 − deq(NF4(W0))‖_F of each weight bitsandbytes would quantize."""
    from lora_tools.engine.binding import fit_to_base
    from lora_tools.formats.names import resolve_names
    from lora_tools.io.checkpoint import BaseCheckpoint

    with BaseCheckpoint.open(base_path) as base:
        adapter = resolve_names(adapter, base.module_paths(), os.fspath(base_path))
        targets = fit_to_base(
            adapter, lambda k: base.info(k).shape if base.has(k) else None, os.fspath(base_path), base.value_dtype
        )
        norms = {
            t.layer.name: float(np.linalg.norm(base.numpy(t.weight_key).astype(np.float64).ravel()))
            for t in targets
        }
        for target in targets:
            if not math.isfinite(norms[target.layer.name]):  # a NaN in W0 would poison ‖ΔW‖/‖W0‖
                raise FormatError(base.shard_of(target.weight_key).path, f"tensor {target.weight_key!r} contains NaN or Inf")
        quant_errors = {} if spec is None else {
            t.layer.name: quant_error(base, t.weight_key, t.transposed, spec)
            for t in targets if nf4.quantized_by_bitsandbytes(t.layer, t.weight_shape)
        }
    return adapter, norms, quant_errors


def quant_error(base: Any, key: str, transposed: bool, spec: nf4.BaseQuant) -> float:
    """‖W0 − deq(NF4(W0))‖_F of one base weight, read in its stored dtype (bitsandbytes
    quantizes the weight as loaded) and quantized as (out, in), as transformers hands a
    Conv1D weight to it."""
    weight = base.torch(key)
    try:
        return nf4.round_trip_error(weight.T if transposed else weight, spec)
    except RequestError as error:
        raise RequestError(base.shard_of(key).path, f"tensor {key!r}: {error.problem}") from None
