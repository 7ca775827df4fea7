"""`inspect`: what an adapter learned, layer by layer, from its factors alone.

Every figure comes from the factors through `linalg` (QR of B and Aᵀ, SVD of an r×r
core), so a 4096×14336 layer costs about as much as a 16×16 one. Flags are verdicts
drawn from those figures, and the figures behind them stay in the report.

Modules: `report` (the dataclasses), `figures` (per-layer figures and flags from the
factors), `base` (against a base checkpoint: ‖W0‖, `--base-quant`), `operation`
(`inspect_adapter`).
"""

from __future__ import annotations

from lora_tools.inspect.figures import DEAD_FRACTION, flag_layers, layer_report, module_type, summarize
from lora_tools.inspect.operation import inspect_adapter
from lora_tools.inspect.report import AdapterSummary, BaseQuantSummary, Coverage, InspectReport, LayerReport

__all__ = [
    "DEAD_FRACTION", "AdapterSummary", "BaseQuantSummary", "Coverage", "InspectReport", "LayerReport", "flag_layers",
    "inspect_adapter", "layer_report", "module_type", "summarize",
]
