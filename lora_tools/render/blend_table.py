"""`blend`'s inputs, per-layer table and totals, fitted to the console's width (see `columns`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

from lora_tools.errors import printable
from lora_tools.render.columns import NAME, Column, escape, family_head, number_list, numbers, print_layers, shared_prefix

if TYPE_CHECKING:
    from lora_tools.blend.layers import LayerBlendReport
    from lora_tools.blend.operation import BlendReport


def _pairs(matrix: list[list[float | None]]) -> list[float]:
    return [v for i, row in enumerate(matrix) for v in row[i + 1:] if v is not None]


def _cos_text(matrix: list[list[float | None]]) -> str:
    pairs = _pairs(matrix)
    if not pairs:
        return "-"
    return " ".join(f"{v:+.3f}" for v in pairs) if len(pairs) <= 3 else f"{min(pairs):+.3f} to {max(pairs):+.3f}"


def _kept_text(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _ranks_in(layer: LayerBlendReport) -> str:
    return "+".join("-" if r is None else str(r) for r in layer.ranks_in)


def render_blend(report: BlendReport, console: Console, *, show_all: bool = False) -> None:
    """Inputs and weights, per-layer ranks / cosines / energy kept, and the totals."""
    esc = escape
    console.print(
        f"[bold]blend {report.method}[/bold] of {len(report.inputs)} adapter(s) -> {esc(report.out)} "
        f"([cyan]{report.format}[/cyan], {report.dtype})", soft_wrap=True,
    )
    for i, source in enumerate(report.inputs):
        console.print(f"  \\[{i}] w = {source.weight:g}  {esc(source.path)}  "
                      f"({source.format}, {source.n_layers} layers, ranks {number_list(source.ranks)})", soft_wrap=True)
    details = [f"rank {report.rank}" if report.rank is not None else None,
               f"energy target {report.energy:g}" if report.energy is not None else None,
               f"density {report.density:g}" if report.density is not None else None,
               f"seed {report.seed}" if report.seed is not None else None,
               f"normalize {report.normalize}" if report.normalize is not None else None,
               f"on {report.device}" if report.device else None]
    if any(details):
        console.print("  " + ", ".join(d for d in details if d))

    layers = report.layers
    print_layers(console, layers, _layer_columns, _family_columns, show_all, spreads=True)
    console.print(
        f"{report.n_layers} layers, {report.n_params:,} parameters; energy kept {_kept_text(report.energy_kept)}"
        + (f" (min {_kept_text(report.min_energy_kept)})" if report.min_energy_kept is not None else "")
        + f"; relative error vs Σ wᵢ·ΔWᵢ {report.relative_error:.3g}; {report.seconds:.2f} s"
    )
    if report.full_tensors:
        console.print(f"full tensors (modules_to_save) blended: {esc(', '.join(report.full_tensors))}", soft_wrap=True)
    if report.dropped_layers:
        console.print(f"{len(report.dropped_layers)} layers dropped (all their weights are 0): {esc(', '.join(report.dropped_layers[:5]))}",
                      soft_wrap=True)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {esc(note)}")


def _layer_columns(layers: list[LayerBlendReport]) -> tuple[list[Column], str]:
    names = [printable(layer.name) for layer in layers]
    prefix = shared_prefix(names)
    return [
        Column("layer", [name[len(prefix):] for name in names], NAME),
        Column("shape", ["×".join(map(str, layer.shape)) for layer in layers], 30),
        Column("r in", [_ranks_in(layer) for layer in layers], 70),
        Column("r out", [str(layer.rank_out) for layer in layers], 90),
        Column("cos", [_cos_text(layer.cosine_similarity) for layer in layers], 60),
        Column("‖ΣwΔW‖_F", numbers([layer.fro_norm_sum for layer in layers]), 50),
        Column("energy kept", [_kept_text(layer.energy_kept) for layer in layers], 85),
        Column("residual", numbers([layer.residual_fro for layer in layers], 3), 40),
        Column("rel.err", numbers([layer.relative_error for layer in layers], 3), 80),
    ], prefix


def _family_columns(layers: list[LayerBlendReport]) -> tuple[list[Column], str]:
    groups, head, prefix = family_head(layers, lambda layer: layer.name, layers_priority=90)

    def kept_spread(members: list[LayerBlendReport]) -> str:
        kept = sorted(m.energy_kept for m in members if m.energy_kept is not None)
        return "-" if not kept else " / ".join(_kept_text(v) for v in (kept[0], kept[len(kept) // 2], kept[-1]))

    def cos_spread(members: list[LayerBlendReport]) -> str:
        cos = sorted(v for m in members for v in _pairs(m.cosine_similarity))
        return "-" if not cos else " / ".join(f"{v:+.3f}" for v in (cos[0], cos[len(cos) // 2], cos[-1]))

    return [
        *head,
        Column("r in", [",".join(sorted({_ranks_in(m) for m in members})) for members in groups], 70),
        Column("r out", [",".join(map(str, sorted({m.rank_out for m in members}))) for members in groups], 88),
        Column("cos", [cos_spread(members) for members in groups], 60),
        Column("energy kept", [kept_spread(members) for members in groups], 85),
        Column("max rel.err", numbers([max(m.relative_error for m in members) for members in groups], 3), 80),
    ], prefix
