"""`lora-tools extract`: the command, its options and help."""

from __future__ import annotations

import click

from lora_tools.cli.common import _show, imports_without_gc
from lora_tools.cli.group import cli
from lora_tools.extract.options import DTYPES as EXTRACT_DTYPES
from lora_tools.extract.options import FORMATS as EXTRACT_FORMATS
from lora_tools.render.console import RichProgress


@cli.command("extract")
@click.argument("base", type=click.Path(readable=False))
@click.argument("tuned", type=click.Path(readable=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(readable=False), help="Output: a PEFT adapter folder, or a kohya .safetensors file.")
@click.option("--rank", type=int, default=None, help="At most R per layer (also caps the other policies).")
@click.option("--energy", type=float, default=None, help="Per layer, the smallest rank keeping this share of ‖D‖² (e.g. 0.99).")
@click.option("--sv-ratio", "sv_ratio", type=float, default=None, help="Keep σᵢ > σ₁/x (x ≥ 1), as resize and kohya do.")
@click.option("--budget", type=int, default=None, help="Global parameter budget N: ranks chosen to keep the most relative energy.")
@click.option("--min-rank", "min_rank", type=int, default=1, show_default=True, help="No extracted layer below this rank.")
@click.option("--modules", default=None, help="Only modules whose path matches this regular expression.")
@click.option("--exclude", default=None, help="Skip modules whose path matches this regular expression.")
@click.option("--full-modules", "full_modules", default=None, help="Modules written whole when changed (default: embeddings and lm_head).")
@click.option("--exact", "method", flag_value="exact", help="Full SVD of every difference.")
@click.option("--randomized", "method", flag_value="randomized", help="Randomized SVD (Halko et al.); the reported error stays exact.")
@click.option("--format", "out_format", default="peft", show_default=True, type=click.Choice(EXTRACT_FORMATS), help="Output format.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(list(EXTRACT_DTYPES)), help="Dtype of the written factors.")
@click.option("--device", default="auto", show_default=True, help="Where the SVDs run: auto (CUDA when present), cpu (numpy), cuda or cuda:N; float64 either way.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only after the extraction succeeded).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of tables.")
@click.option("--all", "show_all", is_flag=True, help="Show every layer instead of grouping long adapters by module.")
def extract_command(
    base: str, tuned: str, out: str, rank: int | None, energy: float | None, sv_ratio: float | None, budget: int | None,
    min_rank: int, modules: str | None, exclude: str | None, full_modules: str | None, method: str | None,
    out_format: str, dtype: str, device: str, force: bool, quiet: bool, as_json: bool, show_all: bool,
) -> None:
    """Extract a LoRA from a full fine-tune: the truncated SVD of each changed weight.

    \b
    Example:
        lora-tools extract ./base ./finetuned --rank 32 -o extracted/
        lora-tools extract ./base ./finetuned --energy 0.9 --rank 128 -o extracted/
    """
    with imports_without_gc():
        from lora_tools.extract.operation import extract

    progress = None if quiet else RichProgress()
    try:
        report = extract(base, tuned, out, rank=rank, energy=energy, sv_ratio=sv_ratio, budget=budget, min_rank=min_rank,
                         modules=modules, exclude=exclude, full_modules=full_modules, method=method or "auto",
                         out_format=out_format, dtype=dtype, force=force, progress=progress, device=device)
    finally:
        if progress is not None:
            progress.stop()
    _show(report, "extract", as_json, show_all=show_all)
