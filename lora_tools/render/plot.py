"""`inspect --plot`: one PNG page that shows what an adapter learned, layer by layer.

Four panels drawn from an `InspectReport` alone (no tensors): the normalised singular
value spectra, rank usage by module type and depth, ‖ΔW‖ by depth with the flagged
layers marked, and a text summary. matplotlib is imported inside `save_plot` and used
through `Figure` + the Agg canvas, never pyplot, so importing this module costs nothing
and no global backend or figure state is touched.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tools.errors import LoraToolsError
from lora_tools.render.plot_text import module_types, short, summary_lines, title

if TYPE_CHECKING:
    from lora_tools.inspect import InspectReport, LayerReport

FIGSIZE = (16.0, 11.0)  # inches; at DPI this is 1760×1210 px, legible at 100 % zoom
DPI = 110
MAX_DEPTH_TICKS = 16  # beyond this, label every k-th depth column
MAX_ANNOTATED_CELLS = 60  # small heatmaps get their numbers written in the cells
SPECTRUM_FLOOR = 1e-6  # σᵢ/σ₁ below this is round-off, not signal: kept off the y axis
NO_DEPTH = "-"  # column / tick label for layers whose name carries no layer number
_RC = {
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
}


def save_plot(report: InspectReport, path: str | os.PathLike[str], force: bool = False) -> None:
    """Write the report as a PNG to `path` (always PNG, whatever the extension).

    Never onto an input (the adapter, the base, or a file inside them) and, without
    `force`, never over an existing file other than an earlier plot (`io.output_path.check_plot_path`).
    Written to a temporary sibling and moved into place, so an interrupted run never
    leaves half an image. Raises `LoraToolsError` naming `path` if it cannot be written;
    the temporary is created first, so an unwritable path fails before any drawing.
    """
    from lora_tools.io.output_path import PLOT_SOFTWARE, check_plot_path, temporary_sibling

    path = os.fspath(path)
    check_plot_path(path, force, [given for given in (report.adapter.path, report.adapter.base) if given is not None])

    import matplotlib.style

    tmp_name = temporary_sibling(Path(os.path.abspath(path)), ".lora-tools-tmp-")
    created = False
    try:
        with open(tmp_name, "xb") as tmp:  # "x": never clobber; plain open: the umask applies
            created = True
            # The default style, not the user's matplotlibrc (usetex, dark themes), and held
            # through savefig because ticks are made while drawing.
            with matplotlib.style.context(["default", _RC]):
                _figure(report).savefig(tmp, format="png", dpi=DPI, metadata={"Software": PLOT_SOFTWARE})
        os.replace(tmp_name, path)
        created = False
    except OSError as err:
        raise LoraToolsError(path, f"cannot write plot: {err.strerror or err}") from err
    finally:
        if created:
            os.remove(tmp_name)


def _figure(report: InspectReport) -> Any:
    """The four-panel `Figure`, on its own Agg canvas (no pyplot, no global state)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    types = module_types(report.layers)
    colors = _type_colors(matplotlib, types)
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    (ax_spec, ax_heat), (ax_norm, ax_text) = fig.subplots(2, 2)
    _spectra_panel(ax_spec, report.layers, colors)
    _rank_usage_panel(fig, ax_heat, report.layers, types)
    _norm_panel(ax_norm, report.layers, types, colors)
    _summary_panel(ax_text, report)
    fig.suptitle(title(report), fontsize=15, fontweight="bold")
    _shared_legend(fig, types, colors)
    return fig


# ---------------------------------------------------------------- grouping and colours


def _type_colors(matplotlib: Any, types: list[str]) -> dict[str, Any]:
    cmap = matplotlib.colormaps["tab10" if len(types) <= 10 else "tab20"]
    return {t: cmap(i % cmap.N) for i, t in enumerate(types)}


def _depth_columns(layers: list[LayerReport]) -> list[int | None]:
    """Distinct depths ascending, then None (the "-" column) if any layer lacks one."""
    depths: list[int | None] = [*sorted({layer.depth for layer in layers if layer.depth is not None})]
    if any(layer.depth is None for layer in layers):
        depths.append(None)
    return depths


def _depth_ticks(columns: list[int | None]) -> tuple[list[int], list[str]]:
    """Positions and labels for every k-th column (k keeps ≤ MAX_DEPTH_TICKS); "-" always."""
    numbered = [(i, d) for i, d in enumerate(columns) if d is not None]
    step = max(1, math.ceil(len(numbered) / MAX_DEPTH_TICKS))
    if step > 1:  # round to 2, 4, 5, 10 … so ticks land on familiar numbers
        step = next(s for s in (2, 4, 5, 8, 10, 16, 20, 25, 50, 100, step) if s >= step)
    positions = [i for i, d in numbered if d % step == 0] or [i for i, _ in numbered[::step]]
    if columns and columns[-1] is None:
        positions.append(len(columns) - 1)
    labels = [NO_DEPTH if columns[i] is None else str(columns[i]) for i in positions]
    return positions, labels


# ---------------------------------------------------------------- panels


def _spectra_panel(ax: Any, layers: list[LayerReport], colors: dict[str, Any]) -> None:
    """σᵢ/σ₁ against i, log y, one thin line per layer; all-zero spectra skipped."""
    import numpy as np

    max_rank, low, drawn = 1, 1.0, 0
    n_lines = sum(1 for layer in layers if layer.fro_norm > 0)
    # Few lines: draw them plainly; hundreds: thin and translucent so density shows.
    alpha = min(0.9, max(0.2, 3.0 / math.sqrt(max(n_lines, 1))))
    width = 1.4 if n_lines <= 20 else 0.8
    for layer in layers:
        sv = np.asarray(layer.singular_values, dtype=np.float64)
        if sv.size == 0 or not np.isfinite(sv).all() or sv[0] <= 0:
            continue
        ratio = sv / sv[0]
        ratio[ratio < SPECTRUM_FLOOR] = np.nan  # log axis: round-off and zeros left out
        x = np.arange(1, sv.size + 1)
        ax.plot(x, ratio, color=colors[layer.module_type], lw=width, alpha=alpha,
                marker="o" if sv.size == 1 else None, ms=4)
        max_rank = max(max_rank, sv.size)
        if np.isfinite(ratio).any():
            low = min(low, float(np.nanmin(ratio)))
        drawn += 1
    if drawn == 0:
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        from matplotlib.ticker import MaxNLocator

        ax.set_yscale("log")
        ax.set_ylim(max(min(low, 0.1), SPECTRUM_FLOOR) / 1.5, 1.5)  # at least one decade
        ax.set_xlim(0.5, max_rank + 0.5)
        if max_rank <= 12:
            ax.set_xticks(range(1, max_rank + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("σᵢ / σ₁")
    ax.set_title(f"Singular-value spectra ({drawn} of {len(layers)} layers; all-zero skipped)")
    ax.grid(True, which="major", alpha=0.3)
    if drawn == 0:
        ax.text(0.5, 0.5, "no layer with a non-zero spectrum", transform=ax.transAxes,
                ha="center", va="center", color="0.4")


def _rank_usage_panel(fig: Any, ax: Any, layers: list[LayerReport], types: list[str]) -> None:
    """Heatmap of energy_rank_90 / rank: rows module types, columns depths (mean per cell)."""
    import matplotlib
    import numpy as np

    columns = _depth_columns(layers)
    col_of = {d: j for j, d in enumerate(columns)}
    row_of = {t: i for i, t in enumerate(types)}
    total = np.zeros((max(len(types), 1), max(len(columns), 1)))  # (rows, columns); 1×1 if empty
    count = np.zeros_like(total)
    for layer in layers:
        if layer.rank <= 0 or layer.fro_norm == 0.0:
            continue  # no energy, no usage: the cell stays blank
        i, j = row_of[layer.module_type], col_of[layer.depth]
        total[i, j] += layer.energy_rank_90 / layer.rank
        count[i, j] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        usage = np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0, 0, 0, 0))
    image = ax.imshow(usage, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_facecolor("white")
    ax.set_yticks(range(len(types)), [short(t) for t in types])
    positions, labels = _depth_ticks(columns)
    ax.set_xticks(positions, labels)
    ax.set_xlabel("depth (layer index)" + (f'; "{NO_DEPTH}" = no layer number' if None in columns else ""))
    ax.set_title("Rank usage: share of rank holding 90 % of ‖ΔW‖²")
    if not np.isfinite(usage).any():
        ax.text(0.5, 0.5, "no layer with a non-zero update", transform=ax.transAxes,
                ha="center", va="center", color="0.4")
    elif usage.size <= MAX_ANNOTATED_CELLS:
        for (i, j), value in np.ndenumerate(usage):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value < 0.6 else "black")
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label("energy_rank_90 / rank")


def _norm_panel(ax: Any, layers: list[LayerReport], types: list[str], colors: dict[str, Any]) -> None:
    """‖ΔW‖_F (or ‖ΔW‖/‖W0‖ with a base) by depth, one line per module type, flags marked."""
    import numpy as np

    relative = any(layer.relative_norm is not None for layer in layers)
    columns = _depth_columns(layers)
    numbered = [d for d in columns if d is not None]
    # Depth-less layers sit in a "-" column one step right of the last numbered depth.
    x_none = (max(numbered) + max(1, math.ceil(len(numbered) / MAX_DEPTH_TICKS))) if numbered else 0

    def value(layer: LayerReport) -> float:
        v = layer.relative_norm if relative else layer.fro_norm
        return float(v) if v is not None and math.isfinite(v) and "dead" not in layer.flags else math.nan

    def x_of(layer: LayerReport) -> float:
        return float(x_none if layer.depth is None else layer.depth)

    for t in types:
        members = [layer for layer in layers if layer.module_type == t]
        # Every layer is a marker; the line joins the per-depth medians, so a type with
        # several layers per depth (UNet blocks) reads as a trend, not a zigzag.
        ax.plot([x_of(layer) for layer in members], [value(layer) for layer in members],
                ls="none", color=colors[t], marker="o", ms=3.5, alpha=0.9)
        by_depth: dict[int, list[float]] = {}
        for layer in members:
            if layer.depth is not None:
                by_depth.setdefault(layer.depth, []).append(value(layer))
        depths = sorted(by_depth)
        medians = [_finite_median(by_depth[d]) for d in depths]
        ax.plot(depths, medians, color=colors[t], lw=1.2, alpha=0.9)
    values = np.array([value(layer) for layer in layers])
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size and positive.max() / positive.min() > 20:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        if positive.max() / positive.min() < 1e4:  # few decades: label 1-2-5 steps, not just 10ⁿ
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    outliers = [layer for layer in layers if "outlier" in layer.flags and math.isfinite(value(layer))]
    ax.scatter([x_of(layer) for layer in outliers], [value(layer) for layer in outliers], s=160,
               facecolors="none", edgecolors="red", linewidths=1.6, zorder=5)
    dead = [layer for layer in layers if "dead" in layer.flags]
    # Dead layers have no useful height (zero, or far below the rest): pin them to the floor.
    ax.scatter([x_of(layer) for layer in dead], [0.04] * len(dead), marker="x", s=50, color="black",
               linewidths=1.5, transform=ax.get_xaxis_transform(), zorder=5, clip_on=False)
    if not positive.size:
        ax.set_ylim(0, 1)
    # The same depth ticks as the heatmap above, "-" at the depth-less column.
    positions, labels = _depth_ticks(columns)
    ax.set_xticks([x_none if (d := columns[i]) is None else d for i in positions], labels)
    lo = min(numbered) if numbered else x_none
    hi = x_none if None in columns else (max(numbered) if numbered else 0)
    ax.set_xlim(lo - 0.7, hi + 0.7)
    ax.set_xlabel("depth (layer index)")
    ax.set_ylabel("‖ΔW‖ / ‖W0‖" if relative else "‖ΔW‖_F")
    ax.set_title("Relative update norm by depth" if relative else "Update norm ‖ΔW‖_F by depth")
    ax.grid(True, which="major", alpha=0.3)


def _finite_median(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan  # a gap in the line
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


def _summary_panel(ax: Any, report: InspectReport) -> None:
    ax.axis("off")
    ax.set_title("Summary", loc="left")
    ax.text(0.0, 1.0, "\n".join(summary_lines(report)), transform=ax.transAxes,
            va="top", ha="left", family="monospace", fontsize=10, linespacing=1.35)


def _shared_legend(fig: Any, types: list[str], colors: dict[str, Any]) -> None:
    """One legend for the figure: a swatch per module type plus the flag markers."""
    from matplotlib.lines import Line2D

    from lora_tools.inspect.figures import OUTLIER_Z  # the caller built the report, so this is loaded

    handles = [Line2D([], [], color=colors[t], lw=2.5, label=short(t)) for t in types]
    handles.append(Line2D([], [], ls="none", marker="o", ms=11, mfc="none", mec="red", mew=1.6,
                          label=f"outlier (|norm z| > {OUTLIER_Z:g})"))
    handles.append(Line2D([], [], ls="none", marker="x", ms=8, color="black", mew=1.5,
                          label="dead (‖ΔW‖≈0, drawn at bottom)"))
    # As many entries per row as fit the figure's width (≈ 200 characters of legend text).
    width = sum(len(str(h.get_label())) + 6 for h in handles)
    rows = max(1, math.ceil(width / 200))
    ncol = math.ceil(len(handles) / rows)
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False,
               handlelength=1.8, columnspacing=1.4)
