"""`inspect_adapter`: read an adapter (and its base, if given), compute every figure,
flag, summarise."""

from __future__ import annotations

import math
import os

from lora_tools.errors import FormatError, RequestError
from lora_tools.formats import load_adapter
from lora_tools.inspect.base import against_base, base_quant_summary
from lora_tools.inspect.figures import _layer_reports, flag_layers, summarize
from lora_tools.inspect.report import InspectReport
from lora_tools.linalg import nf4


def inspect_adapter(
    adapter_path: str | os.PathLike[str],
    *,
    base_path: str | os.PathLike[str] | None = None,
    alpha: float | None = None,
    base_quant: str | None = None,
) -> InspectReport:
    """Read an adapter (and optionally its base) and compute every per-layer figure.

    `base_quant` ("nf4", "nf4,dq", see `linalg.nf4.parse_base_quant`): the adapter was
    trained on the base quantized so (QLoRA); each quantized layer gets NF4's rounding
    error of W0 against its update, and the report a summary of what that means for a merge.
    """
    spec = None if base_quant is None else nf4.parse_base_quant(base_quant)
    if spec is not None and base_path is None:
        raise RequestError(None, "--base-quant needs --base BASE: the rounding error is measured on the base's weights")
    adapter = load_adapter(adapter_path, alpha=alpha)
    base_norms: dict[str, float] = {}
    quant_errors: dict[str, float] = {}
    if base_path is not None:
        adapter, base_norms, quant_errors = against_base(adapter, base_path, spec)
    layers = _layer_reports(adapter.layers)
    for report in layers:
        figures = [report.scale, report.fro_norm, report.effective_rank, *report.singular_values]
        if not all(math.isfinite(x) for x in figures):  # finite factors, but 1e200·1e200 is not
            raise FormatError(
                adapter.path, f"layer {report.name!r}: s·B·A overflows float64 (scale {report.scale:g}), no figures"
            )
        if report.name in base_norms:
            report.base_fro_norm = base_norms[report.name]
            report.relative_norm = report.fro_norm / report.base_fro_norm if report.base_fro_norm > 0 else None
    flag_layers(layers)
    summary = summarize(adapter, None if base_path is None else os.fspath(base_path))
    if spec is None:
        return InspectReport(summary, layers)
    return InspectReport(summary, layers, base_quant_summary(spec, layers, quant_errors))
