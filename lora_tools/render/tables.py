"""Rendering results for people (Rich tables) and scripts (JSON).

Only this module and the CLI print. Tables go to stdout because they are the data;
progress and warnings go to stderr.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape as markup_escape
from rich.table import Table

from lora_tools.errors import printable
from lora_tools.inspect import InspectReport, LayerReport

if TYPE_CHECKING:
    from lora_tools.verify.operation import VerifyReport

# Above this many layers the table groups layers by family unless --all is given.
MAX_ROWS = 40


def to_json_text(document: dict[str, Any]) -> str:
    """One JSON document; non-finite floats are not JSON, so they must not occur."""
    return json.dumps(document, indent=2, allow_nan=False)


def escape(text: str) -> str:
    """Text from the user's files (paths, names, metadata) as Rich prints it literally:
    control characters escaped (`errors.printable`: no ESC sequence reaches the terminal,
    no newline splits a row) and "[...]" not taken for markup."""
    return markup_escape(printable(text))


def _g(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def render_inspect(report: InspectReport, console: Console, *, show_all: bool = False) -> None:
    summary = report.adapter
    cov = summary.coverage
    # Paths, keys, metadata and layer names come from the user's files: "[v2]" or "[/]" in
    # them is text, not Rich markup (unescaped, it vanishes or raises MarkupError).
    console.print(f"[bold]{escape(summary.path)}[/bold]  format [cyan]{escape(summary.format)}[/cyan]")
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
        console.print(f"  [red]not understood:[/red] {escape(key)}")
    if len(cov.unrecognized) > 10:
        console.print(f"  … and {len(cov.unrecognized) - 10} more")
    if summary.base_model:
        console.print(f"base model (from config): {escape(summary.base_model)}")
    for key, value in list(summary.training_metadata.items())[:12]:
        console.print(f"  {escape(key)} = {escape(value[:100])}")
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
            escape(layer.name), "×".join(map(str, layer.shape)), str(layer.rank), _g(layer.alpha), _g(layer.scale),
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
            escape(family), str(len(members)), ",".join(map(str, ranks)),
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
    # Paths and tensor names come from the user's files: text, not Rich markup (see render_inspect).
    table = Table(title=f"{escape(report.merged)} vs {escape(report.base)} + {len(report.adapters)} adapter(s)")
    for column in ("tensor", "dtype", "max abs err", "max rel err", "×tol", "strength k", "±6σ", "forward", "recipe", "verdict"):
        table.add_column(column, justify="left" if column in {"tensor", "recipe", "verdict"} else "right")
    rows = report.tensors
    if not show_all and len(rows) > MAX_ROWS:
        rows = [t for t in rows if t.verdict != "ok"][:MAX_ROWS] or rows[:MAX_ROWS]
    for check in rows:
        spread = None if check.strength_spread is None else 6 * check.strength_spread
        style = "green" if check.verdict == "ok" else ("yellow" if check.verdict == "inconclusive" else "red")
        table.add_row(
            escape(check.name), check.dtype, _g(check.max_abs_error, 3), _g(check.max_rel_error, 3), _g(check.worst_ulps, 3),
            _g(check.strength, 6), _g(spread, 2), _g(check.forward_rel_error, 2), check.recipe or "-",
            f"[{style}]{check.verdict}[/{style}]",
        )
    console.print(table)
    if len(rows) < len(report.tensors):
        console.print(f"{len(report.tensors) - len(rows)} more tensors not shown (--all shows every one)")
    for line in describe(report)[:20]:
        console.print(f"[red]{escape(line)}[/red]" if "inconclusive" not in line else f"[yellow]{escape(line)}[/yellow]")
    console.print(verify_summary_line(report))


def verify_summary_line(report: VerifyReport) -> str:
    """The one-line verdict: how many tensors were ok, inconclusive, failed, unchanged."""
    verdict = "EQUIVALENT" if report.equivalent else "NOT EQUIVALENT"
    return (
        f"{verdict}: {report.n_adapted - report.n_failed - report.n_inconclusive}/{report.n_adapted} adapted tensors ok"
        + (f", {report.n_inconclusive} inconclusive" if report.n_inconclusive else "")
        + (f", {report.n_failed} failed" if report.n_failed else "")
        + f"; {report.n_unadapted_identical}/{report.n_unadapted} other tensors bit-identical"
        + (f" ({report.n_unadapted_converted} after rounding to their new dtype)" if report.n_unadapted_converted else "")
        + (f"; {len(report.layout_problems)} layout problem(s)" if report.layout_problems else "")
    )


def describe(report: VerifyReport) -> list[str]:
    """Failure lines worth reading first: every tensor not ok, changed unadapted tensors,
    layout problems."""
    lines = [f"{t.name}: {t.verdict} ({t.detail})" for t in report.tensors if t.verdict not in {"ok"}]
    lines += [f"{name}: changed (not adapted, must be bit-identical)" for name in report.changed_unadapted]
    lines += report.layout_problems
    return lines


if TYPE_CHECKING:
    from lora_tools.blend.operation import BlendReport


def render_blend(report: BlendReport, console: Console, *, show_all: bool = False) -> None:
    """Inputs and weights, per-layer ranks / cosines / energy kept, and the totals."""
    import re

    esc = escape

    console.print(
        f"[bold]blend {report.method}[/bold] of {len(report.inputs)} adapter(s) -> {esc(report.out)} "
        f"([cyan]{report.format}[/cyan], {report.dtype})"
    )
    for i, source in enumerate(report.inputs):
        console.print(f"  \\[{i}] w = {source.weight:g}  {esc(source.path)}  ({source.format}, {source.n_layers} layers, ranks {source.ranks})")
    details = [f"rank {report.rank}" if report.rank is not None else None,
               f"energy target {report.energy:g}" if report.energy is not None else None,
               f"density {report.density:g}" if report.density is not None else None,
               f"seed {report.seed}" if report.seed is not None else None,
               f"normalize {report.normalize}" if report.normalize is not None else None,
               f"on {report.device}" if report.device else None]
    if any(details):
        console.print("  " + ", ".join(d for d in details if d))

    def cos_text(matrix: list[list[float | None]]) -> str:
        pairs = [v for i, row in enumerate(matrix) for v in row[i + 1:] if v is not None]
        if not pairs:
            return "-"
        return " ".join(f"{v:+.3f}" for v in pairs) if len(pairs) <= 3 else f"{min(pairs):+.3f}…{max(pairs):+.3f}"

    def kept_text(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    layers = report.layers
    if show_all or len(layers) <= MAX_ROWS:
        table = Table()
        for column in ("layer", "shape", "r in", "r out", "cos", "‖ΣwΔW‖_F", "energy kept", "residual", "rel.err"):
            table.add_column(column, justify="left" if column == "layer" else "right", no_wrap=column != "layer")
        for layer in layers:
            table.add_row(
                esc(layer.name), "×".join(map(str, layer.shape)), "+".join("-" if r is None else str(r) for r in layer.ranks_in),
                str(layer.rank_out), cos_text(layer.cosine_similarity), _g(layer.fro_norm_sum), kept_text(layer.energy_kept),
                _g(layer.residual_fro, 3), _g(layer.relative_error, 3),
            )
    else:
        families: dict[str, list[Any]] = defaultdict(list)
        for layer in layers:
            families[re.sub(r"(?<=[._])\d+(?=[._]|$)", "*", layer.name)].append(layer)
        table = Table(title="layers grouped by module (min / median / max over depth)")
        for column in ("module", "layers", "r in", "r out", "cos", "energy kept", "max rel.err"):
            table.add_column(column, justify="left" if column == "module" else "right")

        def spread(values: list[float], fmt: Any) -> str:
            ordered = sorted(values)
            return "-" if not ordered else " / ".join(fmt(v) for v in (ordered[0], ordered[len(ordered) // 2], ordered[-1]))

        for family, members in families.items():
            ranks_in = sorted({"+".join("-" if r is None else str(r) for r in m.ranks_in) for m in members})
            cosines = [v for m in members for i, row in enumerate(m.cosine_similarity) for v in row[i + 1:] if v is not None]
            kept = [m.energy_kept for m in members if m.energy_kept is not None]
            table.add_row(
                esc(family), str(len(members)), ",".join(ranks_in), ",".join(map(str, sorted({m.rank_out for m in members}))),
                spread(cosines, lambda v: f"{v:+.3f}"), spread(kept, kept_text),
                _g(max(m.relative_error for m in members), 3),
            )
    console.print(table)
    if not show_all and len(layers) > MAX_ROWS:
        console.print(f"{len(layers)} layers grouped by module; --all shows every layer")
    console.print(
        f"{report.n_layers} layers, {report.n_params:,} parameters; energy kept {kept_text(report.energy_kept)}"
        + (f" (min {kept_text(report.min_energy_kept)})" if report.min_energy_kept is not None else "")
        + f"; relative error vs Σ wᵢ·ΔWᵢ {report.relative_error:.3g}; {report.seconds:.2f} s"
    )
    if report.full_tensors:
        console.print(f"full tensors (modules_to_save) blended: {esc(', '.join(report.full_tensors))}")
    if report.dropped_layers:
        console.print(f"{len(report.dropped_layers)} layers dropped (all their weights are 0): {esc(', '.join(report.dropped_layers[:5]))}")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {esc(note)}")
