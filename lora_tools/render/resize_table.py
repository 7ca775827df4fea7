"""`resize`'s report for people: per layer the ranks before → after, energy kept, the exact
relative error and the parameters, then the totals and the worst layer. (`--json` is
`render.tables.to_json_text` of the report.)"""

from __future__ import annotations

from rich.console import Console

from lora_tools.errors import printable
from lora_tools.render.columns import NAME, Column, escape, family_head, numbers, print_layers, shared_prefix
from lora_tools.resize.layers import LayerResizeReport
from lora_tools.resize.operation import ResizeReport


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _ranks(values: list[int]) -> str:
    distinct = sorted(set(values))
    return ",".join(map(str, distinct)) if len(distinct) <= 4 else f"{distinct[0]}…{distinct[-1]}"


def _layer_columns(layers: list[LayerResizeReport]) -> tuple[list[Column], str]:
    names = [printable(layer.name) for layer in layers]
    prefix = shared_prefix(names)
    return [
        Column("layer", [name[len(prefix):] for name in names], NAME),
        Column("shape", ["×".join(map(str, layer.shape)) for layer in layers], 30),
        Column("r", [f"{layer.rank_in} → {layer.rank_out}" + (" (dropped)" if layer.rank_out == 0 else "")
                     for layer in layers], 90),
        Column("energy kept", [_pct(layer.energy_kept) for layer in layers], 85),
        Column("rel. error", numbers([layer.relative_error for layer in layers], 3), 80),
        Column("params", [f"{layer.params_in:,} → {layer.params_out:,}" for layer in layers], 50),
        *_merged([[layer] for layer in layers], "merged rel. error"),
    ], prefix


def _merged(groups: list[list[LayerResizeReport]], title: str) -> list[Column]:
    """The merged weights' largest relative error per row, when --base measured it."""
    if any(m.merged_relative_error is None for members in groups for m in members):
        return []
    return [Column(title, numbers([max(m.merged_relative_error or 0.0 for m in members) for members in groups], 3), 75)]


def _family_columns(layers: list[LayerResizeReport]) -> tuple[list[Column], str]:
    groups, head, prefix = family_head(layers, lambda layer: layer.name)

    def kept_spread(members: list[LayerResizeReport]) -> str:
        kept = sorted(m.energy_kept for m in members)
        return " / ".join(_pct(v) for v in (kept[0], kept[len(kept) // 2], kept[-1]))

    return [
        *head,
        Column("r", [f"{_ranks([m.rank_in for m in members])} → {_ranks([m.rank_out for m in members])}"
                     for members in groups], 90),
        Column("energy kept", [kept_spread(members) for members in groups], 85),
        Column("max rel. error", numbers([max(m.relative_error for m in members) for members in groups], 3), 80),
        Column("params", [f"{sum(m.params_in for m in members):,} → {sum(m.params_out for m in members):,}"
                          for members in groups], 50),
        *_merged(groups, "max merged rel. error"),
    ], prefix


def render_resize(report: ResizeReport, console: Console, *, show_all: bool = False) -> None:
    """What was asked, the per-layer table, and the totals."""
    asked = {"rank": report.rank, "energy": report.energy, "sv_ratio": report.sv_ratio, "sv_fro": report.sv_fro,
             "sv_cumulative": report.sv_cumulative, "budget": report.budget}
    policy = ", ".join(f"{k} {v:g}" for k, v in asked.items() if v is not None) or "ranks unchanged"
    console.print(
        f"[bold]resize[/bold] {escape(report.adapter)} -> {escape(report.out)} ([cyan]{report.format}[/cyan], {report.dtype}): "
        f"{policy}, min rank {report.min_rank}" + (", scale baked (alpha = r)" if report.bake else "")
    )
    print_layers(console, report.layers, _layer_columns, _family_columns, show_all, spreads=True)
    console.print(
        f"{report.n_layers_out}/{report.n_layers_in} layers, parameters {report.params_in:,} → {report.params_out:,}, "
        f"file {report.file_bytes_in:,} → {report.file_bytes_out:,} bytes; energy kept {_pct(report.energy_kept)}, "
        f"relative error {report.relative_error:.3g}"
        + ("" if report.merged_relative_error is None else f", merged weights {report.merged_relative_error:.3g}")
        + f"; {report.seconds:.2f} s",
        soft_wrap=True,  # a summary: the terminal wraps it, Rich does not break it mid-number
    )
    if report.worst_layer is not None:
        console.print(f"worst layer: {escape(report.worst_layer)} (relative error {report.worst_relative_error:.3g})")
    if report.dropped_layers:
        console.print(f"{len(report.dropped_layers)} layers dropped (update exactly 0): "
                      f"{escape(', '.join(report.dropped_layers[:5]))}")
    if report.full_tensors:
        console.print(f"full tensors carried over unchanged: {escape(', '.join(report.full_tensors))}")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
