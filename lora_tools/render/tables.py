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


def to_json_text(document: dict[str, Any]) -> str:
    """One JSON document; non-finite floats are not JSON, so they must not occur."""
    return json.dumps(document, indent=2, allow_nan=False)
