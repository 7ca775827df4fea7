"""`lora-tools verify`: the command, its options and help (the run itself is shared with
`merge --verify`, in `common`)."""

from __future__ import annotations

import click

from lora_tools.cli.common import _run_verify
from lora_tools.cli.group import cli
from lora_tools.errors import RequestError


@cli.command("verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--weight", "weights", type=float, multiple=True, help="Weight of each adapter, as given to merge.")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default: about one ulp of the stored dtype).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default: about one ulp of the stored dtype).")
@click.option("--alpha", type=float, default=None, help="Override every layer's alpha, as given to merge.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--all", "show_all", is_flag=True, help="Show every tensor, not only failures, for long models.")
@click.option("--device", default="cpu", show_default=True, help="Where adapted tensors are judged: cpu, auto, cuda or cuda:N.")
def verify_command(
    paths: tuple[str, ...], weights: tuple[float, ...], atol: float | None, rtol: float | None,
    alpha: float | None, as_json: bool, show_all: bool, device: str,
) -> None:
    """Check that MERGED equals BASE + Σ wᵢ·ΔWᵢ: BASE ADAPTER [ADAPTER ...] MERGED.

    Exit status 0 when equivalent, 1 when not, 2 on bad input.

    \b
    Example:
        lora-tools verify ./base-model ./my-adapter ./merged
    """
    if len(paths) < 3:
        raise RequestError(None, "verify needs BASE, at least one ADAPTER, and MERGED")
    _run_verify(paths[0], list(paths[1:-1]), paths[-1], list(weights), alpha, atol, rtol, as_json, show_all, device)
