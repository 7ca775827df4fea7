"""`lora-tools resize`: the command, its options and help."""

from __future__ import annotations

import click

from lora_tools.cli.common import _show, imports_without_gc
from lora_tools.cli.group import cli
from lora_tools.resize.options import DTYPES as RESIZE_DTYPES
from lora_tools.resize.options import FORMATS as RESIZE_FORMATS


@cli.command("resize")
@click.argument("adapter", type=click.Path(readable=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(readable=False), help="Output: a PEFT adapter folder, or a kohya/diffusers .safetensors file.")
@click.option("--rank", type=int, default=None, help="Keep at most R singular values per layer (also caps the other policies).")
@click.option("--energy", type=float, default=None, help="Per layer, the smallest rank keeping this share of Σσ² (e.g. 0.99).")
@click.option("--sv-ratio", "sv_ratio", type=float, default=None, help="kohya's sv_ratio: keep σᵢ > σ₁/x (x ≥ 1).")
@click.option("--sv-fro", "sv_fro", type=float, default=None, help="kohya's sv_fro: smallest rank with √(kept Σσ² share) ≥ p.")
@click.option("--sv-cumulative", "sv_cumulative", type=float, default=None, help="kohya's sv_cumulative: smallest rank with kept Σσ share ≥ p (σ, not σ²).")
@click.option("--budget", type=int, default=None, help="Global parameter budget N: ranks chosen to keep the most relative energy.")
@click.option("--min-rank", "min_rank", type=int, default=1, show_default=True, help="No layer below this rank (zero updates are dropped).")
@click.option("--bake", is_flag=True, help="Fold each layer's scale into its factors and write alpha = r (no rsLoRA).")
@click.option("--format", "out_format", default="auto", show_default=True, type=click.Choice(RESIZE_FORMATS), help="Output format; auto: the input's.")
@click.option("--dtype", default="keep", show_default=True, type=click.Choice(list(RESIZE_DTYPES)), help="Dtype of the written factors.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only after the resize succeeded).")
@click.option("--base", "base", default=None, type=click.Path(readable=False),
              help="Base model: also report the error of each merged weight (W0 + ΔW; DoRA renormalises it).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of tables.")
@click.option("--all", "show_all", is_flag=True, help="Show every layer instead of grouping long adapters by module.")
def resize_command(
    adapter: str, out: str, rank: int | None, energy: float | None, sv_ratio: float | None, sv_fro: float | None,
    sv_cumulative: float | None, budget: int | None, min_rank: int, bake: bool, out_format: str, dtype: str,
    force: bool, base: str | None, as_json: bool, show_all: bool,
) -> None:
    """Shrink an adapter's ranks exactly, from its factors (Eckart–Young per layer).

    \b
    Example:
        lora-tools resize ./my-adapter --energy 0.99 -o small/
        lora-tools resize lora.safetensors --sv-fro 0.9 --rank 32 -o lora-small.safetensors
        lora-tools resize ./my-adapter --budget 2000000 -o fit/
        lora-tools resize ./rslora-adapter --bake -o baked/      # alpha = r: right under any alpha/r runtime
    """
    from lora_tools.linalg.blas import import_numpy_for_own_threads

    with imports_without_gc():
        import_numpy_for_own_threads()  # resize's BLAS runs in its own single-threaded pool
        from lora_tools.resize.operation import resize

    report = resize(
        adapter, out, rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, sv_cumulative=sv_cumulative,
        budget=budget, min_rank=min_rank, bake=bake, out_format=out_format, dtype=dtype, force=force, base=base,
    )
    _show(report, "resize", as_json, show_all=show_all)
