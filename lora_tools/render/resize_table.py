"""`resize`'s report for people: per layer the ranks before → after, energy kept, the exact
relative error and the parameters, then the totals and the worst layer. (`--json` is
`render.tables.to_json_text` of the report.)"""

from __future__ import annotations

import re
from collections import defaultdict

from rich.console import Console
from rich.markup import escape as markup_escape
from rich.table import Table

from lora_tools.errors import printable
from lora_tools.resize.layers import LayerResizeReport
from lora_tools.resize.operation import ResizeReport

# Above this many layers the table groups layers by module unless --all is given.
MAX_ROWS = 40


def _esc(text: str) -> str:
    """Names from the user's files, printed literally (no markup, no control characters)."""
    return markup_escape(printable(text))


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _ranks(values: list[int]) -> str:
    distinct = sorted(set(values))
    return ",".join(map(str, distinct)) if len(distinct) <= 4 else f"{distinct[0]}…{distinct[-1]}"


def _layer_table(layers: list[LayerResizeReport]) -> Table:
    table = Table()
    for column in ("layer", "shape", "r", "energy kept", "rel. error", "params"):
        table.add_column(column, justify="left" if column == "layer" else "right", no_wrap=column != "layer")
    for layer in layers:
        table.add_row(
            _esc(layer.name), "×".join(map(str, layer.shape)),
            f"{layer.rank_in} → {layer.rank_out}" + (" (dropped)" if layer.rank_out == 0 else ""),
            _pct(layer.energy_kept), f"{layer.relative_error:.3g}", f"{layer.params_in:,} → {layer.params_out:,}",
        )
    return table


def _family_table(layers: list[LayerResizeReport]) -> Table:
    families: dict[str, list[LayerResizeReport]] = defaultdict(list)
    for layer in layers:
        families[re.sub(r"(?<=[._])\d+(?=[._]|$)", "*", layer.name)].append(layer)
    table = Table(title="layers grouped by module (min / median / max over depth)")
    for column in ("module", "layers", "r", "energy kept", "max rel. error", "params"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for family, members in families.items():
        kept = sorted(m.energy_kept for m in members)
        table.add_row(
            _esc(family), str(len(members)),
            f"{_ranks([m.rank_in for m in members])} → {_ranks([m.rank_out for m in members])}",
            " / ".join(_pct(v) for v in (kept[0], kept[len(kept) // 2], kept[-1])),
            f"{max(m.relative_error for m in members):.3g}",
            f"{sum(m.params_in for m in members):,} → {sum(m.params_out for m in members):,}",
        )
    return table


def render_resize(report: ResizeReport, console: Console, *, show_all: bool = False) -> None:
    """What was asked, the per-layer table, and the totals."""
    asked = {"rank": report.rank, "energy": report.energy, "sv_ratio": report.sv_ratio, "sv_fro": report.sv_fro,
             "sv_cumulative": report.sv_cumulative, "budget": report.budget}
    policy = ", ".join(f"{k} {v:g}" for k, v in asked.items() if v is not None) or "ranks unchanged"
    console.print(
        f"[bold]resize[/bold] {_esc(report.adapter)} -> {_esc(report.out)} ([cyan]{report.format}[/cyan], {report.dtype}): "
        f"{policy}, min rank {report.min_rank}" + (", scale baked (alpha = r)" if report.bake else "")
    )
    grouped = not show_all and len(report.layers) > MAX_ROWS
    console.print(_family_table(report.layers) if grouped else _layer_table(report.layers))
    if grouped:
        console.print(f"{len(report.layers)} layers grouped by module; --all shows every layer")
    console.print(
        f"{report.n_layers_out}/{report.n_layers_in} layers, parameters {report.params_in:,} → {report.params_out:,}, "
        f"file {report.file_bytes_in:,} → {report.file_bytes_out:,} bytes; energy kept {_pct(report.energy_kept)}, "
        f"relative error {report.relative_error:.3g}; {report.seconds:.2f} s"
    )
    if report.worst_layer is not None:
        console.print(f"worst layer: {_esc(report.worst_layer)} (relative error {report.worst_relative_error:.3g})")
    if report.dropped_layers:
        console.print(f"{len(report.dropped_layers)} layers dropped (update exactly 0): "
                      f"{_esc(', '.join(report.dropped_layers[:5]))}")
    if report.full_tensors:
        console.print(f"full tensors carried over unchanged: {_esc(', '.join(report.full_tensors))}")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {_esc(note)}")
