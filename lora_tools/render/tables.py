"""Rendering results for people (Rich tables) and scripts (JSON).

Only `render/` and the CLI print. Tables go to stdout because they are the data;
progress and warnings go to stderr. Each command's tables live in their own module
(`inspect_table`, `verify_table`, `blend_table`, `resize_table`), and follow the
conventions of `columns`: names whole without their shared prefix, columns hidden by
priority to fit the console's width (a footer says which), one number format per column.
`--json` is the full-precision channel: `to_json_text`, here alone so that a `--json` run
does not import Rich's tables.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["to_json_text"]


_scalars = json.JSONEncoder(allow_nan=False, separators=(", ", ": ")).encode  # C-accelerated: no indent


def to_json_text(document: dict[str, Any]) -> str:
    """One JSON document; non-finite floats are not JSON, so they must not occur.

    Indented two spaces like json.dumps(indent=2), except that a list holding no list or
    dict is written on one line: a layer's 64 singular values are one line, not 64, and
    the indenting encoder (pure Python) is left to the few containers, so 700 layers take
    tens of milliseconds instead of 0.17 s."""
    return _indented(document, "")


def _indented(value: Any, pad: str) -> str:
    inner = pad + "  "
    if isinstance(value, dict) and value:
        items = (f"{inner}{_scalars(str(key))}: {_indented(item, inner)}" for key, item in value.items())
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)) and any(isinstance(item, (dict, list, tuple)) for item in value):
        return "[\n" + ",\n".join(inner + _indented(item, inner) for item in value) + f"\n{pad}]"
    return _scalars(value)
