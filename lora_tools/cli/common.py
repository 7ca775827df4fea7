"""Helpers more than one verb uses: a report on stdout (JSON or the verb's tables) and the
verify run that both `verify` and `merge --verify` end with."""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator
from typing import Any

import click

from lora_tools.render.console import stdout_console

# Set by `main` for its run: the process is the command's, so what the imports made may
# be frozen (`imports_without_gc`); a caller invoking the click group in its own process
# (tests, other programs) keeps its collector as it was.
FREEZE_IMPORTS = False


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """A verb's library imported with the cyclic garbage collector paused and, in a run
    of `main` (FREEZE_IMPORTS), what the imports made frozen: never traversed again
    (`main` unfreezes it at the end).

    Why: importing torch, or numpy and the library, makes hundreds of thousands of
    objects that live until exit, and Python's default thresholds run a collection every
    700 new ones, each traversing them again: 380 collections and 0.22 s of a 1B FP8
    merge, ~10 ms of a resize. Modules hold nothing to collect; the collector runs as
    usual on what the command itself allocates."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if FREEZE_IMPORTS:
                gc.freeze()
            gc.enable()


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
    with imports_without_gc():
        from lora_tools.verify.operation import verify

    report = verify(base, list(adapters), merged, weights=weights or None, atol=atol, rtol=rtol, alpha=alpha, device=device)
    _show(report, "verify", as_json, show_all=show_all)
    if not report.equivalent:
        sys.exit(1)
