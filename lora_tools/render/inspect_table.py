"""`inspect`'s tables and summary, fitted to the console's width (see `columns`)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from rich.console import Console

from lora_tools.errors import printable
from lora_tools.inspect import DEAD_FRACTION, InspectReport, LayerReport
from lora_tools.render.columns import MAX_ROWS, NAME, Column, escape, number_list, numbers, print_table, shared_prefix, spreads

# Rank usage worth a word: 99 % of the energy in at most this share of every layer's rank.
LOW_USAGE = 0.5
MAX_ADVICE_LAYERS = 5
# --base-quant: NF4's rounding error of W0 in units of the layer's update.
QUANT_HEADER = "‖W0−nf4‖/‖ΔW‖"


def render_inspect(report: InspectReport, console: Console, *, show_all: bool = False, resize: bool = False) -> None:
    """Summary, the layer table (or the family table and the flagged layers), then advice.
    `resize`: a `resize` command exists, so the advice may name it."""
    summary = report.adapter
    cov = summary.coverage
    # Paths, keys, metadata and layer names come from the user's files: "[v2]" or "[/]" in
    # them is text, not Rich markup (unescaped, it vanishes or raises MarkupError).
    console.print(f"[bold]{escape(summary.path)}[/bold]  format [cyan]{escape(summary.format)}[/cyan]", soft_wrap=True)
    console.print(
        f"{summary.n_layers} layers, {summary.n_params:,} parameters, dtype {summary.dtype}, "
        f"ranks {number_list(summary.ranks)}, alphas {number_list(summary.alphas)}"
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
        console.print(f"  [red]not understood:[/red] {escape(key)}", soft_wrap=True)
    if len(cov.unrecognized) > 10:
        console.print(f"  … and {len(cov.unrecognized) - 10} more")
    if summary.base_model:
        console.print(f"base model (from config): {escape(summary.base_model)}", soft_wrap=True)
    for key, value in list(summary.training_metadata.items())[:12]:
        console.print(f"  {escape(key)} = {escape(value[:100])}", soft_wrap=True)
    with_base = any(layer.relative_norm is not None for layer in report.layers)
    with_quant = report.base_quant is not None
    width = console.width
    if show_all or len(report.layers) <= MAX_ROWS:
        _print_layer_table(console, report.layers, with_base, width, with_quant)
    else:
        _print_family_table(console, report.layers, with_base, width, with_quant)
        # quant_mismatch alone is common (most layers of a QLoRA adapter): the family table's
        # column and the summary line say it, a row per layer would undo the grouping
        flagged = [layer for layer in report.layers if set(layer.flags) - {"quant_mismatch"}]
        if flagged:
            console.print("flagged layers")
            _print_layer_table(console, flagged, with_base, width, with_quant)
        console.print(f"{len(report.layers)} layers grouped by module; --all shows every layer")
    for line in advice(report, resize=resize):
        console.print(escape(line))


def _print_layer_table(console: Console, layers: list[LayerReport], with_base: bool, width: int,
                       with_quant: bool = False) -> None:
    names = [printable(layer.name) for layer in layers]
    prefix = shared_prefix(names)
    flags = [", ".join(layer.flags) + (" (DoRA)" if layer.dora else "") for layer in layers]
    columns = [
        Column("layer", [name[len(prefix):] for name in names], NAME),
        Column("shape", ["×".join(map(str, layer.shape)) for layer in layers], 30),
        Column("r", [str(layer.rank) for layer in layers], 80),
        *([Column("algo", [layer.algo for layer in layers], 82)] if any(layer.algo != "lora" for layer in layers) else []),
        Column("alpha", numbers([layer.alpha for layer in layers], integers=True), 20),
        Column("scale", numbers([layer.scale for layer in layers], integers=True), 25),
        Column("‖ΔW‖_F", numbers([layer.fro_norm for layer in layers]), 75),
        Column("σ1", numbers([layer.spectral_norm for layer in layers]), 35),
        Column("e90", [str(layer.energy_rank_90) for layer in layers], 60),
        Column("e99", [str(layer.energy_rank_99) for layer in layers], 65),
        Column("eff.rank", numbers([layer.effective_rank for layer in layers], 3), 40),
    ]
    if with_base:
        columns.append(Column("‖ΔW‖/‖W0‖", numbers([layer.relative_norm for layer in layers], 3), 85))
    if with_quant:  # "-": a weight bitsandbytes keeps in 16 bit, or a zero update
        columns.append(Column(QUANT_HEADER, numbers([layer.base_quant_mismatch for layer in layers], 3), 88))
    if any(flags):
        columns.append(Column("flags", flags, 90, justify="left", styles=["red" if f else "" for f in flags]))
    print_table(console, columns, prefix, width)


def _print_family_table(console: Console, layers: list[LayerReport], with_base: bool, width: int,
                        with_quant: bool = False) -> None:
    families: dict[str, list[LayerReport]] = defaultdict(list)
    for layer in layers:
        families[layer.family].append(layer)
    groups = list(families.values())
    names = [printable(family) for family in families]
    prefix = shared_prefix(names)
    console.print("layers grouped by module (min / median / max over depth)")
    n_flagged = [sum(1 for m in members if set(m.flags) - {"quant_mismatch"}) for members in groups]  # see render_inspect
    columns = [
        Column("module", [name[len(prefix):] for name in names], NAME),
        Column("layers", [str(len(members)) for members in groups], 90),
        Column("r", [",".join(map(str, sorted({m.rank for m in members}))) for members in groups], 80),
        *([Column("algo", [",".join(sorted({m.algo for m in members})) for members in groups], 82)]
          if any(m.algo != "lora" for members in groups for m in members) else []),
        Column("‖ΔW‖_F", spreads([[m.fro_norm for m in members] for members in groups]), 75),
        Column("σ1", spreads([[m.spectral_norm for m in members] for members in groups]), 35),
        Column("e90", spreads([[float(m.energy_rank_90) for m in members] for members in groups], integers=True), 60),
        Column("eff.rank", spreads([[m.effective_rank for m in members] for members in groups]), 40),
    ]
    if with_base:
        rel = [[m.relative_norm for m in members if m.relative_norm is not None] for members in groups]
        columns.append(Column("‖ΔW‖/‖W0‖", spreads(rel), 85))
    if with_quant:
        ratios = [[m.base_quant_mismatch for m in members if m.base_quant_mismatch is not None] for members in groups]
        columns.append(Column(QUANT_HEADER, spreads(ratios), 88))
    if any(n_flagged):
        flags = [f"{n} flagged" if n else "" for n in n_flagged]
        columns.append(Column("flags", flags, 95, justify="left", styles=["red" if f else "" for f in flags]))
    print_table(console, columns, prefix, width)


def _directions(layer: LayerReport) -> int:
    """Parameters per rank-one direction: a column of B and a row of A (kernel included)."""
    return layer.shape[0] + math.prod(layer.shape[1:])


def advice(report: InspectReport, *, resize: bool = False) -> list[str]:
    """What the numbers imply, in words (plain text; the caller escapes it)."""
    layers, lines = report.layers, []
    live = [layer for layer in layers if "dead" not in layer.flags and layer.rank > 0]
    if live and max(layer.energy_rank_99 / layer.rank for layer in live) <= LOW_USAGE:
        k = max(layer.energy_rank_99 for layer in live)
        ranks = sorted({layer.rank for layer in live})
        r = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
        every = "every layer" if len(live) == len(layers) else "every live layer"
        line = f"rank usage: 99 % of the energy in ≤ {k} of {r} directions in {every}"
        if resize:
            kept = sum(layer.energy_rank_99 * _directions(layer) for layer in live)
            line += (f"; `lora-tools resize --energy 0.99` would cut it to about {kept:,} parameters"
                     f" (now {report.adapter.n_params:,})")
        lines.append(line)
    norms = [layer.fro_norm for layer in layers]
    median = statistics.median(norms) if norms else 0.0
    dead = [layer for layer in layers if "dead" in layer.flags]
    for layer in dead[:MAX_ADVICE_LAYERS]:
        why = ("‖ΔW‖_F = 0: the update changes nothing" if layer.fro_norm == 0 else
               f"‖ΔW‖_F {layer.fro_norm:.3g} is below {DEAD_FRACTION:g} of the adapter's median {median:.3g}")
        lines.append(f"dead layer {printable(layer.name)}: {why}")
    outliers = sorted((layer for layer in layers if "outlier" in layer.flags), key=lambda m: -abs(m.norm_z_score or 0.0))
    by_family: dict[str, list[float]] = defaultdict(list)
    for layer in layers:
        if layer.fro_norm > 0:
            by_family[layer.family].append(layer.fro_norm)
    for layer in outliers[:MAX_ADVICE_LAYERS]:
        family_median = statistics.median(by_family[layer.family])
        ratio = layer.fro_norm / family_median
        times = f"{ratio:.3g}× the" if ratio >= 1 else f"1/{1 / ratio:.3g} of the"
        z = f", robust z {layer.norm_z_score:+.1f}" if layer.norm_z_score is not None else ""
        lines.append(f"outlier {printable(layer.name)}: ‖ΔW‖_F {layer.fro_norm:.3g} is {times} median of its"
                     f" {len(by_family[layer.family])} peers {printable(layer.family)} ({family_median:.3g}){z}")
    hidden = len(dead) - min(len(dead), MAX_ADVICE_LAYERS) + len(outliers) - min(len(outliers), MAX_ADVICE_LAYERS)
    if hidden:
        lines.append(f"… and {hidden} more flagged layers (--json has every figure)")
    if report.base_quant is not None:
        lines.append(report.base_quant.summary)
    if report.adapter.base is None:
        lines.append("--base BASE would add ‖ΔW‖/‖W0‖ (each update against its weight) and check the fit")
    return lines
