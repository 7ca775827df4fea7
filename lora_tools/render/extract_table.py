"""`extract`'s report for people: per layer ‖D‖ against the base weight, the rank chosen,
the energy kept and the exact relative error, then the totals and the worst layer.
(`--json` is `render.tables.to_json_text` of the report.)"""

from __future__ import annotations

from rich.console import Console

from lora_tools.errors import printable
from lora_tools.extract.layers import LayerExtractReport
from lora_tools.extract.operation import ExtractReport
from lora_tools.render.columns import NAME, Column, escape, family_head, numbers, print_layers, shared_prefix


def _layer_columns(layers: list[LayerExtractReport]) -> tuple[list[Column], str]:
    names = [printable(layer.name) for layer in layers]
    prefix = shared_prefix(names)
    return [
        Column("layer", [name[len(prefix):] for name in names], NAME),
        Column("shape", ["×".join(map(str, layer.shape)) for layer in layers], 30),
        Column("‖D‖/‖W0‖", numbers([layer.relative_diff for layer in layers], 3), 60),
        Column("r", [str(layer.rank) for layer in layers], 90),
        Column("energy kept", [f"{100 * layer.energy_kept:.2f}%" for layer in layers], 85),
        Column("rel. error", numbers([layer.relative_error for layer in layers], 3), 80),
        Column("svd", [layer.method for layer in layers], 40),
    ], prefix


def _family_columns(layers: list[LayerExtractReport]) -> tuple[list[Column], str]:
    groups, head, prefix = family_head(layers, lambda layer: layer.name)
    return [
        *head,
        Column("r", [",".join(map(str, sorted({m.rank for m in members}))) for members in groups], 90),
        Column("max rel. error", numbers([max(m.relative_error for m in members) for members in groups], 3), 80),
    ], prefix


def render_extract(report: ExtractReport, console: Console, *, show_all: bool = False) -> None:
    console.print(f"[bold]extract[/bold] {escape(report.base)} → {escape(report.tuned)} -> {escape(report.out)} "
                  f"([cyan]{report.format}[/cyan], {report.dtype}): {report.policy}")
    print_layers(console, report.layers, _layer_columns, _family_columns, show_all)
    console.print(f"{report.n_layers} layers, {report.params:,} parameters; energy kept {100 * report.energy_kept:.2f}%, "
                  f"relative error {report.relative_error:.3g}; {report.unchanged} tensors unchanged; {report.seconds:.2f} s",
                  soft_wrap=True)
    if report.worst_layer is not None:
        console.print(f"worst layer: {escape(report.worst_layer)} (relative error {report.worst_relative_error:.3g})")
    if report.full_tensors:
        console.print(f"written whole: {escape(', '.join(report.full_tensors))}")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
