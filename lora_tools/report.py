"""Rendering results for people (Rich tables) and scripts (JSON).

Only this module and the CLI print. Tables go to stdout because they are the data;
progress and warnings go to stderr.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from lora_tools.inspect import InspectReport, LayerReport

if TYPE_CHECKING:
    from lora_tools.verify import VerifyReport

# Above this many layers the table groups layers by family unless --all is given.
MAX_ROWS = 40


def to_json_text(document: dict[str, Any]) -> str:
    """One JSON document; non-finite floats are not JSON, so they must not occur."""
    return json.dumps(document, indent=2, allow_nan=False)


def _g(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def render_inspect(report: InspectReport, console: Console, *, show_all: bool = False) -> None:
    summary = report.adapter
    cov = summary.coverage
    console.print(f"[bold]{summary.path}[/bold]  format [cyan]{summary.format}[/cyan]")
    console.print(
        f"{summary.n_layers} layers, {summary.n_params:,} parameters, dtype {summary.dtype}, "
        f"ranks {summary.ranks}, alphas {[_g(a) for a in summary.alphas]}"
        + (", rsLoRA" if summary.use_rslora else "")
        + (", DoRA" if summary.use_dora else "")
        + (", fan_in_fan_out" if summary.fan_in_fan_out else "")
    )
    coverage = (
        f"coverage: {cov.n_tensors} tensors = {cov.lora_pairs} LoRA layers"
        + (f", {cov.dora_magnitudes} DoRA magnitudes" if cov.dora_magnitudes else "")
        + (f", {cov.lora_biases} LoRA biases" if cov.lora_biases else "")
        + (f", {len(cov.full_tensors)} full tensors (modules_to_save)" if cov.full_tensors else "")
        + (f", [red]{len(cov.unrecognized)} not understood[/red]" if cov.unrecognized else "")
    )
    console.print(coverage)
    for key in cov.unrecognized[:10]:
        console.print(f"  [red]not understood:[/red] {key}")
    if len(cov.unrecognized) > 10:
        console.print(f"  … and {len(cov.unrecognized) - 10} more")
    if summary.base_model:
        console.print(f"base model (from config): {summary.base_model}")
    for key, value in list(summary.training_metadata.items())[:12]:
        console.print(f"  {key} = {value[:100]}")
    with_base = any(layer.relative_norm is not None for layer in report.layers)
    if show_all or len(report.layers) <= MAX_ROWS:
        console.print(_layer_table(report.layers, with_base))
    else:
        console.print(_family_table(report.layers, with_base))
        flagged = [layer for layer in report.layers if layer.flags]
        if flagged:
            console.print(_layer_table(flagged, with_base, title="flagged layers"))
        console.print(f"{len(report.layers)} layers grouped by module; --all shows every layer")


def _layer_table(layers: list[LayerReport], with_base: bool, title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    for column in ("layer", "shape", "r", "alpha", "scale", "‖ΔW‖_F", "σ1", "e90", "e99", "eff.rank"):
        table.add_column(column, justify="left" if column == "layer" else "right", no_wrap=column != "layer")
    if with_base:
        table.add_column("‖ΔW‖/‖W0‖", justify="right")
    table.add_column("flags")
    for layer in layers:
        row = [
            layer.name, "×".join(map(str, layer.shape)), str(layer.rank), _g(layer.alpha), _g(layer.scale),
            _g(layer.fro_norm), _g(layer.spectral_norm), str(layer.energy_rank_90), str(layer.energy_rank_99),
            f"{layer.effective_rank:.2f}",
        ]
        if with_base:
            row.append(_g(layer.relative_norm, 3))
        row.append(", ".join(layer.flags) + (" (DoRA)" if layer.dora else ""))
        table.add_row(*row)
    return table


def _family_table(layers: list[LayerReport], with_base: bool) -> Table:
    families: dict[str, list[LayerReport]] = defaultdict(list)
    for layer in layers:
        families[layer.family].append(layer)
    table = Table(title="layers grouped by module (min / median / max over depth)")
    for column in ("module", "layers", "r", "‖ΔW‖_F", "σ1", "e90", "eff.rank"):
        table.add_column(column, justify="left" if column == "module" else "right")
    if with_base:
        table.add_column("‖ΔW‖/‖W0‖", justify="right")
    table.add_column("flags")

    def spread(values: list[float]) -> str:
        ordered = sorted(values)
        return f"{ordered[0]:.3g} / {ordered[len(ordered) // 2]:.3g} / {ordered[-1]:.3g}"

    for family, members in families.items():
        ranks = sorted({m.rank for m in members})
        row = [
            family, str(len(members)), ",".join(map(str, ranks)),
            spread([m.fro_norm for m in members]), spread([m.spectral_norm for m in members]),
            spread([float(m.energy_rank_90) for m in members]), spread([m.effective_rank for m in members]),
        ]
        if with_base:
            rel = [m.relative_norm for m in members if m.relative_norm is not None]
            row.append(spread(rel) if rel else "-")
        n_flagged = sum(1 for m in members if m.flags)
        row.append(f"{n_flagged} flagged" if n_flagged else "")
        table.add_row(*row)
    return table


def render_verify(report: VerifyReport, console: Console, *, show_all: bool = False) -> None:
    """Per adapted tensor: errors, strength and verdict; failures first when long."""
    from lora_tools.verify import describe, verify_summary_line

    table = Table(title=f"{report.merged} vs {report.base} + {len(report.adapters)} adapter(s)")
    for column in ("tensor", "dtype", "max abs err", "max rel err", "×tol", "strength k", "±6σ", "forward", "recipe", "verdict"):
        table.add_column(column, justify="left" if column in {"tensor", "recipe", "verdict"} else "right")
    rows = report.tensors
    if not show_all and len(rows) > MAX_ROWS:
        rows = [t for t in rows if t.verdict != "ok"][:MAX_ROWS] or rows[:MAX_ROWS]
    for check in rows:
        spread = None if check.strength_spread is None else 6 * check.strength_spread
        style = "green" if check.verdict == "ok" else ("yellow" if check.verdict == "inconclusive" else "red")
        table.add_row(
            check.name, check.dtype, _g(check.max_abs_error, 3), _g(check.max_rel_error, 3), _g(check.worst_ulps, 3),
            _g(check.strength, 6), _g(spread, 2), _g(check.forward_rel_error, 2), check.recipe or "-",
            f"[{style}]{check.verdict}[/{style}]",
        )
    console.print(table)
    if len(rows) < len(report.tensors):
        console.print(f"{len(report.tensors) - len(rows)} more tensors not shown (--all shows every one)")
    for line in describe(report)[:20]:
        console.print(f"[red]{line}[/red]" if "inconclusive" not in line else f"[yellow]{line}[/yellow]")
    console.print(verify_summary_line(report))
