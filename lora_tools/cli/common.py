"""Helpers more than one verb uses: a report on stdout (JSON or the verb's tables) and the
verify run that both `verify` and `merge --verify` end with."""

from __future__ import annotations

import sys
from typing import Any

import click

from lora_tools.render.console import stdout_console


def _show(report: Any, verb: str, as_json: bool, **table_options: Any) -> None:
    """A report on stdout: one JSON document, or the verb's Rich tables (`render/<verb>_table`,
    imported only when drawn)."""
    if as_json:
        from lora_tools.render.tables import to_json_text

        click.echo(to_json_text(report.to_json()))
        return
    import importlib

    render = getattr(importlib.import_module(f"lora_tools.render.{verb}_table"), f"render_{verb}")
    render(report, stdout_console(), **table_options)


def _run_verify(
    base: str, adapters: list[str], merged: str, weights: list[float], alpha: float | None,
    atol: float | None, rtol: float | None, as_json: bool, show_all: bool = False, device: str = "cpu",
) -> None:
    from lora_tools.verify.operation import verify

    report = verify(base, list(adapters), merged, weights=weights or None, atol=atol, rtol=rtol, alpha=alpha, device=device)
    _show(report, "verify", as_json, show_all=show_all)
    if not report.equivalent:
        sys.exit(1)
