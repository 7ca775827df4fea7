"""Tables that read in an ordinary terminal (80–120 columns): the conventions every table shares.

- Names first: a layer or tensor name is never cut. The prefix every row shares is removed
  from the rows and said once above the table (`shared_prefix`, `prefix_line`).
- Columns by priority: when the table is wider than the console, the columns of lowest
  priority are hidden (never squeezed), and a footer names them (`fit_table`).
- One number format per column (`number_format`): fixed decimals chosen so the largest value
  has `sig` significant digits (all of them, when the column spans one decade) and the
  smallest at least two, else scientific notation for the whole column; integers as integers.
- Lines that hold a path or a name are printed whole (`soft_wrap`: the terminal folds them,
  Rich does not break them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape as markup_escape
from rich.table import Table
from rich.text import Text

from lora_tools.errors import printable
from lora_tools.formats.names import module_family

T = TypeVar("T")

# Above this many layers the table groups layers by family unless --all is given.
MAX_ROWS = 40
# The priority of the column that names the row: never hidden.
NAME = 100


def escape(text: str) -> str:
    """Text from the user's files (paths, names, metadata) as Rich prints it literally:
    control characters escaped (`errors.printable`: no ESC sequence reaches the terminal,
    no newline splits a row) and "[...]" not taken for markup."""
    return markup_escape(printable(text))


# --------------------------------------------------------------------------- numbers


def number_format(values: Sequence[float | None], sig: int = 4, *, integers: bool = False) -> Callable[[float | None], str]:
    """One format for a whole column. `integers`: when every value is a whole number,
    print them as integers. None is "-", an exact zero "0"."""
    finite = [abs(float(v)) for v in values if v is not None and math.isfinite(v)]
    if integers and all(v.is_integer() and v < 1e15 for v in finite):
        return lambda v: "-" if v is None else (str(int(v)) if math.isfinite(v) else str(v))
    nonzero = [v for v in finite if v > 0]
    if not nonzero:
        return lambda v: "-" if v is None else ("0" if v == 0 else str(v))
    e_hi = math.floor(math.log10(max(nonzero)))
    e_lo = math.floor(math.log10(min(nonzero)))
    # Within one decade every value keeps `sig` digits; over more, the smallest keeps two.
    decimals = max(0, sig - 1 - e_lo) if e_hi - e_lo <= 1 else max(0, sig - 1 - e_hi, 1 - e_lo)
    if e_hi >= 6 or decimals > 6:
        return lambda v: "-" if v is None else ("0" if v == 0 else f"{v:.{sig - 1}e}")
    return lambda v: "-" if v is None else ("0" if v == 0 else f"{v:.{decimals}f}")


def numbers(values: Sequence[float | None], sig: int = 4, *, integers: bool = False) -> list[str]:
    fmt = number_format(values, sig, integers=integers)
    return [fmt(v) for v in values]


def spreads(rows: Sequence[Sequence[float]], sig: int = 3, *, integers: bool = False) -> list[str]:
    """"min / median / max" per row, one number format over the whole column."""
    picked = [[s[0], s[len(s) // 2], s[-1]] if s else [] for s in (sorted(r) for r in rows)]
    fmt = number_format([v for p in picked for v in p], sig, integers=integers)
    return [" / ".join(fmt(v) for v in p) if p else "-" for p in picked]


def number_list(values: Sequence[float]) -> str:
    """"[4, 8]": whole numbers as integers, others with up to 4 significant digits."""
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


# --------------------------------------------------------------------------- names


def shared_prefix(names: Sequence[str]) -> str:
    """The dotted prefix every name shares ("model.layers."), cut after a dot; "" when
    there is none, fewer than two names, or a name would be left empty."""
    if len(names) < 2:
        return ""
    cut = os.path.commonprefix(list(names)).rfind(".") + 1
    if cut == 0 or any(len(name) <= cut for name in names):
        return ""
    return names[0][:cut]


def prefix_line(prefix: str) -> str | None:
    """What was removed from the names, said once above the table (Rich markup, escaped)."""
    return None if not prefix else f"[dim]names below omit the prefix they share:[/dim] {escape(prefix)}"


# --------------------------------------------------------------------------- fitting


@dataclass
class Column:
    header: str
    cells: list[str]  # plain text: printed literally, never as markup
    priority: int = 50  # higher is kept longer; NAME is never hidden
    justify: str = "right"
    styles: list[str] | None = field(default=None)

    @property
    def width(self) -> int:
        return max([cell_len(self.header), *(cell_len(cell) for cell in self.cells)])


def table_width(columns: Sequence[Column]) -> int:
    """Rich's default box: "│ " + cell + " " per column, and the closing "│"."""
    return sum(column.width + 3 for column in columns) + 1


def fit(columns: Sequence[Column], width: int) -> tuple[list[Column], list[Column]]:
    """(shown, hidden): the lowest priorities are hidden until the table fits; then any
    hidden column that fits after all comes back, the most important first."""
    shown = list(columns)
    hidden: list[Column] = []
    while table_width(shown) > width:
        candidates = [c for c in shown if c.priority < NAME]
        if not candidates:
            break
        victim = min(candidates, key=lambda c: c.priority)
        shown.remove(victim)
        hidden.append(victim)
    for column in sorted(hidden, key=lambda c: -c.priority):
        trial = [c for c in columns if c in shown or c is column]
        if table_width(trial) <= width:
            shown = trial
            hidden.remove(column)
    return shown, [c for c in columns if c in hidden]


def fit_table(columns: Sequence[Column], width: int) -> tuple[Table, list[str]]:
    """A Rich table of the columns that fit `width`, and the footer lines (markup) that
    say what was hidden or shortened."""
    shown, hidden = fit(columns, width)
    table = Table()
    for column in shown:
        if column.priority >= NAME:  # folded (never cut) if even alone it cannot fit
            table.add_column(column.header, justify="left", overflow="fold")
        else:
            table.add_column(column.header, justify=column.justify, no_wrap=True)  # type: ignore[arg-type]
    for i in range(len(shown[0].cells) if shown else 0):
        table.add_row(*(Text(c.cells[i], style=c.styles[i] if c.styles else "") for c in shown))
    footer = []
    if hidden:
        names = ", ".join(escape(c.header) for c in hidden)
        footer.append(f"[dim]hidden at {width} columns: {names} (--json or a wider terminal shows them)[/dim]")
    if table_width(shown) > width:
        footer.append(f"[dim]columns shortened to fit {width} columns (--json or a wider terminal shows them whole)[/dim]")
    return table, footer


def print_table(console: Console, columns: Sequence[Column], prefix: str, width: int | None = None) -> None:
    """The prefix line, the table fitted to `width` (default: the console's), its footer."""
    line = prefix_line(prefix)
    if line:
        console.print(line)
    table, footer = fit_table(columns, console.width if width is None else width)
    console.print(table)
    for text in footer:
        console.print(text)


def group_by_family(items: Sequence[T], name_of: Callable[[T], str]) -> dict[str, list[T]]:
    """Items grouped by the family of their module path (`formats.names.module_family`), in order."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(module_family(name_of(item)), []).append(item)
    return groups


def family_head(items: Sequence[T], name_of: Callable[[T], str],
                layers_priority: int = 40) -> tuple[list[list[T]], list[Column], str]:
    """What every grouped table starts with: the items grouped by family, the "module" and
    "layers" columns, and the shared prefix of the family names (for `print_table`)."""
    families = group_by_family(items, name_of)
    names = [printable(family) for family in families]
    prefix = shared_prefix(names)
    groups = list(families.values())
    return groups, [Column("module", [name[len(prefix):] for name in names], NAME),
                    Column("layers", [str(len(members)) for members in groups], layers_priority)], prefix


def print_layers(console: Console, layers: Sequence[T], layer_columns: Callable[[list[T]], tuple[list[Column], str]],
                 family_columns: Callable[[list[T]], tuple[list[Column], str]], show_all: bool, *,
                 spreads: bool = False) -> None:
    """A verb's per-layer table, grouped by module family above MAX_ROWS layers unless
    `show_all`, with the lines that say so (`spreads`: the grouped columns show min /
    median / max over depth)."""
    grouped = not show_all and len(layers) > MAX_ROWS
    columns, prefix = (family_columns if grouped else layer_columns)(list(layers))
    if grouped and spreads:
        console.print("layers grouped by module (min / median / max over depth)")
    print_table(console, columns, prefix)
    if grouped:
        console.print(f"{len(layers)} layers grouped by module; --all shows every layer")
