"""`convert`'s report for people: per layer its name in the output, how its factors were
written and the update's relative error as read back, then the verdict. (`--json` is
`render.tables.to_json_text` of the report.)"""

from __future__ import annotations

from rich.console import Console

from lora_tools.convert.operation import ConvertReport
from lora_tools.convert.proof import LayerProof
from lora_tools.errors import printable
from lora_tools.render.columns import NAME, Column, escape, family_head, numbers, print_layers, shared_prefix


def _layer_columns(layers: list[LayerProof]) -> tuple[list[Column], str]:
    names = [printable(layer.name) for layer in layers]
    prefix = shared_prefix(names)
    return [
        Column("layer", [name[len(prefix):] for name in names], NAME),
        Column("written as", [printable(layer.written_as) for layer in layers], 60),
        Column("r", [str(layer.rank) for layer in layers], 70),
        Column("factors", [layer.factors for layer in layers], 90),
        Column("rel. error", numbers([layer.relative_error for layer in layers], 3), 80),
        Column("ok", ["yes" if layer.exact else "NO" for layer in layers], 95),
    ], prefix


def _family_columns(layers: list[LayerProof]) -> tuple[list[Column], str]:
    groups, head, prefix = family_head(layers, lambda layer: layer.name)
    return [
        *head,
        Column("factors", [", ".join(sorted({m.factors for m in members})) for members in groups], 90),
        Column("max rel. error", numbers([max(m.relative_error for m in members) for members in groups], 3), 80),
        Column("ok", [f"{sum(m.exact for m in members)}/{len(members)}" for members in groups], 95),
    ], prefix


def render_convert(report: ConvertReport, console: Console, *, show_all: bool = False) -> None:
    """What was converted, the per-layer proof, and the verdict."""
    console.print(f"[bold]convert[/bold] {escape(report.adapter)} ({report.from_format}) -> {escape(report.out)} "
                  f"([cyan]{report.to_format}[/cyan], {report.dtype})"
                  + (f"; GGUF {report.gguf_architecture}, alpha {report.gguf_alpha:g}" if report.gguf_alpha is not None else ""))
    print_layers(console, report.layers, _layer_columns, _family_columns, show_all)
    if report.dropped:
        console.print(f"{len(report.dropped)} left out: {escape('; '.join(report.dropped[:5]))}"
                      + (" …" if len(report.dropped) > 5 else ""))
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    verdict = ("[green]exact[/green]: every layer read back holds the input's update" if report.exact else
               f"[red]DIFFERS[/red]: layer {escape(str(report.first_difference))} does not hold the input's update")
    console.print(f"{report.n_layers_out}/{report.n_layers_in} layers written, max relative error "
                  f"{report.max_relative_error:.3g}; {verdict}; {report.seconds:.2f} s", soft_wrap=True)
