"""`verify`'s table, legend and verdict lines, fitted to the console's width (see `columns`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

from lora_tools.errors import printable
from lora_tools.render.columns import MAX_ROWS, NAME, Column, escape, fit_table, numbers, prefix_line, shared_prefix

if TYPE_CHECKING:
    from lora_tools.verify.operation import VerifyReport

_STYLES = {"ok": "green", "inconclusive": "yellow"}


def recipe_code(recipe: str) -> str:
    """A short code for a recipe sentence of `verify.figures`; the legend spells it out."""
    if recipe.startswith("fp32 round-once"):
        return "fp32-once"
    if recipe.startswith("PEFT on a GPU"):
        return "peft-2round"
    if recipe.startswith("PEFT delta in"):
        return "peft-once"
    return printable(recipe.split(" ")[0].lower())


def render_verify(report: VerifyReport, console: Console, *, show_all: bool = False) -> None:
    """Per adapted tensor: errors, strength and verdict; failures first when long."""
    # Paths and tensor names come from the user's files: text, not Rich markup (see render_inspect).
    rows = report.tensors
    dtypes = sorted({check.dtype for check in rows})
    console.print(f"{escape(report.merged)} vs {escape(report.base)} + {len(report.adapters)} adapter(s)"
                  + (f"; adapted tensors in {dtypes[0]}" if len(dtypes) == 1 else ""), soft_wrap=True)
    if not show_all and len(rows) > MAX_ROWS:
        rows = [t for t in rows if t.verdict != "ok"][:MAX_ROWS] or rows[:MAX_ROWS]
    names = [printable(check.name) for check in rows]
    prefix = shared_prefix(names)
    spread = [None if c.strength_spread is None else 6 * c.strength_spread for c in rows]
    codes = [recipe_code(c.recipe) if c.recipe else "-" for c in rows]
    columns = [
        Column("tensor", [name[len(prefix):] for name in names], NAME),
        *([Column("dtype", [c.dtype for c in rows], 20)] if len(dtypes) > 1 else []),
        Column("max abs err", numbers([c.max_abs_error for c in rows], 3), 80),
        Column("max rel err", numbers([c.max_rel_error for c in rows], 3), 50),
        Column("×tol", numbers([c.worst_ulps for c in rows], 3), 90),
        Column("strength k", numbers([c.strength for c in rows], 6), 70),
        Column("±6σ", numbers(spread, 2), 30),
        Column("forward", numbers([c.forward_rel_error for c in rows], 2), 40),
        Column("recipe", codes, 60, justify="left"),
        Column("verdict", [c.verdict for c in rows], 99, justify="left",
               styles=[_STYLES.get(c.verdict, "red") for c in rows]),
    ]
    line = prefix_line(prefix)
    if line:
        console.print(line)
    table, footer = fit_table(columns, console.width)
    console.print(table)
    if any(c.header == "recipe" for c in table.columns):
        legend = {c.recipe: code for code, c in zip(codes, rows) if c.recipe}
        if legend:
            console.print("[dim]recipe: " + "; ".join(f"{code} = {escape(text)}" for text, code in legend.items()) + "[/dim]")
    for text in footer:
        console.print(text)
    if len(rows) < len(report.tensors):
        console.print(f"{len(report.tensors) - len(rows)} more tensors not shown (--all shows every one)")
    for text in describe(report)[:20]:
        style = "yellow" if "inconclusive" in text else "red"
        console.print(f"[{style}]{escape(text)}[/{style}]", soft_wrap=True)
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
