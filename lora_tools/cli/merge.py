"""`lora-tools merge`: the command, its options and help, and its FP8 survival warning."""

from __future__ import annotations

from typing import Any

import click

from lora_tools.cli.common import _run_verify, imports_without_gc
from lora_tools.cli.group import cli
from lora_tools.errors import RequestError
from lora_tools.io.dtypes import MERGE_DTYPE_CHOICES
from lora_tools.render.console import RichProgress


@cli.command("merge")
@click.argument("base", type=click.Path(readable=False))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(readable=False), help="Output folder (or file, for a single-file base).")
@click.option("--weight", "weights", type=float, multiple=True, help="Weight of each adapter, in order (default 1 each).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="keep", show_default=True, type=click.Choice(MERGE_DTYPE_CHOICES), help="Dtype of the stored float tensors; an FP8 base: keep writes bf16, fp8 re-quantizes with fresh scales.")
@click.option("--alpha", type=float, default=None, help="Override every layer's alpha.")
@click.option("--min-survival", "min_survival", type=float, default=None, help="--dtype fp8: fail (exit 1, nothing written) if a weight keeps less than this share of its update.")
@click.option("--base-quant", "base_quant", metavar="SPEC", default=None,
              help="QLoRA: merge onto deq(NF4(W0)), what the adapter was trained against: nf4, nf4,dq (double quant), optionally ,blocksize=N.")
@click.option("--verify", "run_verify", is_flag=True, help="Re-read OUT and verify it against BASE + adapters.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only after the merge succeeded).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary on stderr.")
def merge_command(
    base: str, adapters: tuple[str, ...], out: str, weights: tuple[float, ...], device: str, dtype: str,
    alpha: float | None, min_survival: float | None, base_quant: str | None, run_verify: bool, force: bool, quiet: bool,
) -> None:
    """Fold one or several adapters into a base checkpoint: W0 + Σ wᵢ·ΔWᵢ.

    Same result as PEFT's merge_and_unload, streamed tensor by tensor (memory does
    not grow with the model), on the GPU when there is one.

    \b
    Example:
        lora-tools merge ./base-model ./my-adapter -o ./merged
        lora-tools merge ./base-model a b --weight 0.7 --weight 0.3 -o ./merged --verify
    """
    with imports_without_gc():
        from lora_tools.merge import merge

    if run_verify and base_quant is not None:
        raise RequestError(None, "--verify checks OUT against BASE's own weights, not deq(NF4(W0)): run merge --base-quant without it")
    progress = None if quiet else RichProgress()
    try:
        result = merge(
            base, list(adapters), out, weights=list(weights) or None, device=device, dtype=dtype,
            force=force, alpha=alpha, progress=progress, min_survival=min_survival, base_quant=base_quant,
        )
    finally:
        if progress is not None:
            progress.stop()
    if not quiet:
        fp8 = {"dequantized": " (FP8 base dequantized)", "requantized": " (re-quantized to FP8, fresh scales)"}
        click.echo(
            f"merged {result.n_layers} adapter layers into {result.n_adapted} tensors "
            f"({result.n_copied} copied){fp8.get(result.fp8 or '', '')} on {result.device} "
            f"in {result.seconds:.2f} s -> {result.out}",
            err=True,
        )
    _warn_lost_updates(result)
    if run_verify:
        _run_verify(base, list(adapters), out, list(weights), alpha, None, None, False)


def _warn_lost_updates(result: Any) -> None:
    """--dtype fp8: one warning line when re-rounding erased most of some updates."""
    if not result.survival:
        return
    lost = result.lost()
    if lost:
        worst = ", ".join(f"{s.name} ({s.survival:.2f})" for s in lost[:3])
        click.echo(
            f"Warning: FP8 re-quantization kept less than half of the update in {len(lost)} of "
            f"{len(result.survival)} weights; worst: {worst}. Merge with --dtype bf16 to keep it.",
            err=True,
        )
