"""The words of `inspect --plot`: its title and the text panel's summary.

Kept apart from the drawing (`plot`): plain strings from an `InspectReport`, testable
without matplotlib.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from lora_tools.errors import printable

if TYPE_CHECKING:
    from lora_tools.inspect import InspectReport, LayerReport

SUMMARY_LINES = 24  # what the text panel holds at 10 pt; longer flag lists are cut


def module_types(layers: list[LayerReport]) -> list[str]:
    """Module types in order of first appearance (q_proj, k_proj, … as the file has them)."""
    return list(dict.fromkeys(layer.module_type for layer in layers))


def short(label: str, width: int = 22, keep: str = "end") -> str:
    """`label` cut to `width` characters; module types keep their distinctive tail,
    layer names (keep="both") their head and tail. Control characters are escaped first
    (`errors.printable`): names come from the user's files."""
    label = printable(label)
    if len(label) <= width:
        return label
    if keep == "both":
        head = (width - 1) // 2
        return label[:head] + "…" + label[len(label) - (width - 1 - head):]
    return "…" + label[len(label) - width + 1:]


def title(report: InspectReport) -> str:
    summary = report.adapter
    layers = f"{summary.n_layers} layer" + ("" if summary.n_layers == 1 else "s")
    return f"{_basename(summary.path)}  ·  {summary.format}  ·  {layers}"


def _basename(path: str) -> str:
    """The file (or directory) name a user recognises; the path itself if it has none."""
    return printable(os.path.basename(path.rstrip("/\\")) or path)


def _compact(values: list[Any], limit: int = 8) -> str:
    """"[4, 8, 16]", or "4 … 64 (12 distinct)" when the list is long."""
    shown = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
    if len(shown) <= limit:
        return "[" + ", ".join(shown) + "]"
    return f"{shown[0]} … {shown[-1]} ({len(shown)} distinct)"


def summary_lines(report: InspectReport) -> list[str]:
    summary, layers = report.adapter, report.layers
    dead = [layer for layer in layers if "dead" in layer.flags]
    outliers = [layer for layer in layers if "outlier" in layer.flags]
    extras = [word for word, on in (("rsLoRA", summary.use_rslora), ("DoRA", summary.use_dora),
                                    ("fan_in_fan_out", summary.fan_in_fan_out)) if on]
    lines = [
        f"file        {short(_basename(summary.path), 48)}",
        f"format      {summary.format}" + (f"  ({', '.join(extras)})" if extras else ""),
        f"layers      {summary.n_layers}   params {summary.n_params:,}   dtype {summary.dtype}",
        f"ranks       {_compact(summary.ranks)}",
        f"alphas      {_compact(summary.alphas)}",
    ]
    if summary.base_model:
        lines.append(f"base model  {short(summary.base_model, 48, keep='both')}")
    if summary.base:
        lines.append(f"base        {short(_basename(summary.base), 48)}")
    cov = summary.coverage
    if cov.full_tensors or cov.unrecognized:
        n_full, n_unknown = len(cov.full_tensors), len(cov.unrecognized)
        lines.append(f"also        {n_full} full tensor(s), {n_unknown} unknown key(s)")
    lines += ["", *_per_type_lines(layers), "", f"flagged     {len(dead)} dead, {len(outliers)} outlier"]
    flagged = sorted(outliers, key=lambda layer: -abs(layer.norm_z_score or 0.0)) + dead
    room = max(1, SUMMARY_LINES - len(lines))
    shown = flagged if len(flagged) <= room else flagged[: room - 1]
    for layer in shown:
        z = layer.norm_z_score
        why = "dead" if "dead" in layer.flags else ("outlier" + (f" z={z:+.1f}" if z is not None else ""))
        lines.append(f"  {short(layer.name, 52, keep='both'):52s} {why}")
    if len(flagged) > len(shown):
        lines.append(f"  … and {len(flagged) - len(shown)} more")
    return lines


def _per_type_lines(layers: list[LayerReport], limit: int = 8) -> list[str]:
    """A small table: per module type, layer count and medians of ‖ΔW‖_F and rank usage."""
    import statistics

    types = module_types(layers)
    lines = [f"{'module type':22s} {'layers':>6s} {'med ‖ΔW‖_F':>11s} {'med r90/r':>10s}"]
    for t in types[:limit]:
        members = [layer for layer in layers if layer.module_type == t]
        norm = statistics.median(layer.fro_norm for layer in members)
        usage = [layer.energy_rank_90 / layer.rank for layer in members if layer.rank > 0 and layer.fro_norm > 0]
        usage_text = f"{statistics.median(usage):.2f}" if usage else "-"
        lines.append(f"{short(t):22s} {len(members):6d} {norm:11.4g} {usage_text:>10s}")
    if len(types) > limit:
        lines.append(f"… and {len(types) - limit} more module types")
    return lines
