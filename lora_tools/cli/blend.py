"""`lora-tools blend`: the command, its options and help."""

from __future__ import annotations

import click

from lora_tools.blend.options import DTYPES as BLEND_DTYPES
from lora_tools.blend.options import FORMATS as BLEND_FORMATS
from lora_tools.blend.options import METHODS as BLEND_METHODS
from lora_tools.cli.common import _show, imports_without_gc
from lora_tools.cli.group import cli


@cli.command("blend")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(readable=False), help="Output: a PEFT adapter folder (or a kohya .safetensors file).")
@click.option("--weight", "weights", type=float, multiple=True, help="One per adapter (Σ wᵢ·ΔWᵢ), or one t for two adapters: (1 − t)·A + t·B. Required.")
@click.option("--method", default="svd", show_default=True, type=click.Choice(BLEND_METHODS), help="cat: exact; svd: best rank-R; linear: PEFT's; ties/dare: dense, re-factored.")
@click.option("--rank", type=int, default=None, help="Output rank R (svd, ties, dare); default: the largest input rank.")
@click.option("--energy", type=float, default=None, help="Per layer, the smallest rank keeping this share of the energy (e.g. 0.99); --rank caps it.")
@click.option("--density", type=float, default=None, help="ties/dare: share of entries kept.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare: seed of the drop masks.")
@click.option("--normalize/--no-normalize", default=None, help="ties/dare: divide by the agreeing weights' sum (default as mergekit: ties yes, dare no).")
@click.option("--format", "out_format", default="auto", show_default=True, type=click.Choice(BLEND_FORMATS), help="Output format; auto: kohya for kohya inputs, else PEFT.")
@click.option("--dtype", default="keep", show_default=True, type=click.Choice(list(BLEND_DTYPES)), help="Dtype of the written factors.")
@click.option("--device", default="auto", show_default=True, help="ties/dare: auto, cpu, cuda or cuda:N.")
@click.option("--alpha", type=float, default=None, help="Override every input layer's alpha.")
@click.option("--base-model", "base_model", default=None, help="base_model_name_or_path to write (default: the first input's).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only after the blend succeeded).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of tables.")
@click.option("--all", "show_all", is_flag=True, help="Show every layer instead of grouping long adapters by module.")
def blend_command(
    adapters: tuple[str, ...], out: str, weights: tuple[float, ...], method: str, rank: int | None, energy: float | None,
    density: float | None, seed: int, normalize: bool | None, out_format: str, dtype: str, device: str,
    alpha: float | None, base_model: str | None, force: bool, as_json: bool, show_all: bool,
) -> None:
    """Combine adapters that share a base into one adapter, exactly or optimally.

    Works on the factors (no dense out×in matrix) for cat, svd and linear; reports per
    layer the ranks, the cosine similarity of the inputs' updates and the energy kept.

    \b
    Example:
        lora-tools blend style/ task/ --weight 0.3 -o mix/              # 0.7·style + 0.3·task, rank = max rank
        lora-tools blend a/ b/ c/ --weight 1 --weight 1 --weight -0.5 --method cat -o sum/
        lora-tools blend a/ b/ --weight 0.5 --energy 0.99 -o small/
    """
    with imports_without_gc():
        from lora_tools.blend.operation import blend

    report = blend(
        list(adapters), out, list(weights), method=method, rank=rank, energy=energy, density=density, seed=seed,
        normalize=normalize, out_format=out_format, dtype=dtype, device=device, alpha=alpha,
        base_model_name_or_path=base_model, force=force,
    )
    _show(report, "blend", as_json, show_all=show_all)
