"""The `lora-tools` command line: parse, call the library, render, map errors.

Library modules are imported inside each command so that `lora-tools --help` never
pays for numpy, torch or matplotlib.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from lora_tools.errors import LoraToolsError


class InputError(click.ClickException):
    """Bad input or usage detected by the library: one stderr line, exit status 2."""

    exit_code = 2


def fail(error: LoraToolsError) -> NoReturn:
    raise InputError(str(error)) from None


def _stdout_console() -> Any:
    from rich.console import Console

    console = Console(soft_wrap=False)
    if not console.is_terminal:  # piped: do not fold layer names at 80 columns
        console = Console(soft_wrap=False, width=200)
    return console


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-tools")
def cli() -> None:
    """Inspect, merge, blend and verify LoRA adapters.

    \b
    Adapters: PEFT folders/files, kohya sd-scripts and diffusers LoRA files.
    Bases: Hugging Face folders (single or sharded safetensors) or one .safetensors file.
    """


@cli.command("inspect")
@click.argument("adapter", type=click.Path())
@click.option("--base", "base", type=click.Path(), default=None, help="Base checkpoint: adds ‖ΔW‖/‖W0‖ and checks the adapter fits.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of tables.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write spectra, rank-usage and norm plots to this PNG.")
@click.option("--alpha", type=float, default=None, help="Override every layer's alpha (scale = alpha / r).")
@click.option("--all", "show_all", is_flag=True, help="Show every layer instead of grouping long adapters by module.")
def inspect_command(
    adapter: str, base: str | None, as_json: bool, plot_path: str | None, alpha: float | None, show_all: bool
) -> None:
    """What did this adapter learn? Per-layer rank usage, spectra and norms.

    \b
    Example:
        lora-tools inspect ./my-adapter
        lora-tools inspect adapter.safetensors --base ./base-model --json
        lora-tools inspect ./my-adapter --plot report.png
    """
    from lora_tools.inspect import inspect_adapter
    from lora_tools.report import render_inspect, to_json_text

    try:
        report = inspect_adapter(adapter, base_path=base, alpha=alpha)
        if plot_path is not None:
            from lora_tools.plot import save_plot

            save_plot(report, plot_path)
    except LoraToolsError as error:
        fail(error)
    if as_json:
        click.echo(to_json_text(report.to_json()))
    else:
        render_inspect(report, _stdout_console(), show_all=show_all)


def main() -> None:
    """Entry point of the console script."""
    try:
        cli.main(prog_name="lora-tools", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - interactive
        click.echo("Error: interrupted", err=True)
        sys.exit(130)
