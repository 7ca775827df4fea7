"""`lora-tools inspect`: the command, its options and help."""

from __future__ import annotations

import click

from lora_tools.cli.common import _show, imports_without_gc
from lora_tools.cli.group import cli


@cli.command("inspect")
@click.argument("adapter", type=click.Path(readable=False))
@click.option("--base", "base", type=click.Path(readable=False), default=None, help="Base checkpoint: adds ‖ΔW‖/‖W0‖ and checks the adapter fits.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of tables.")
@click.option("--plot", "plot_path", type=click.Path(readable=False), default=None, help="Write spectra, rank-usage and norm plots to this PNG.")
@click.option("--alpha", type=float, default=None, help="Override every layer's alpha (scale = alpha / r).")
@click.option("--all", "show_all", is_flag=True, help="Show every layer instead of grouping long adapters by module.")
@click.option("--force", is_flag=True, help="Replace an existing --plot FILE (never an input).")
@click.option("--base-quant", "base_quant", metavar="SPEC", default=None,
              help="With --base: the adapter was trained on the base in bitsandbytes NF4 (QLoRA): nf4, nf4,dq "
                   "(double quant), optionally ,blocksize=N. Adds ‖W0 − deq(NF4(W0))‖/‖ΔW‖ per layer.")
def inspect_command(
    adapter: str, base: str | None, as_json: bool, plot_path: str | None, alpha: float | None, show_all: bool,
    force: bool, base_quant: str | None,
) -> None:
    """What did this adapter learn? Per-layer rank usage, spectra and norms.

    \b
    Example:
        lora-tools inspect ./my-adapter
        lora-tools inspect adapter.safetensors --base ./base-model --json
        lora-tools inspect ./my-adapter --plot report.png
        lora-tools inspect ./qlora-adapter --base ./base-model --base-quant nf4,dq
    """
    with imports_without_gc():
        from lora_tools.inspect import inspect_adapter

    report = inspect_adapter(adapter, base_path=base, alpha=alpha, base_quant=base_quant)
    if plot_path is not None:
        from lora_tools.render.plot import save_plot

        save_plot(report, plot_path, force=force)
    _show(report, "inspect", as_json, show_all=show_all, resize="resize" in cli.commands)
