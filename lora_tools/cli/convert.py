"""`lora-tools convert`: the command, its options and help."""

from __future__ import annotations

import sys

import click

from lora_tools.cli.common import _show, imports_without_gc
from lora_tools.cli.group import cli
from lora_tools.convert.options import DTYPES as CONVERT_DTYPES
from lora_tools.convert.options import TARGETS as CONVERT_TARGETS


@cli.command("convert")
@click.argument("adapter", type=click.Path(readable=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(readable=False), help="Output: a PEFT adapter folder, a kohya/diffusers .safetensors or a .gguf file.")
@click.option("--to", "to", required=True, type=click.Choice(CONVERT_TARGETS), help="Target format.")
@click.option("--base", "base", default=None, type=click.Path(readable=False), help="Base model: names kohya layers by module path, checks the fit; required for gguf (config.json).")
@click.option("--prefix", default=None, help="kohya: prefix or component of layers without one (default lora_unet_); diffusers: their component (default unet).")
@click.option("--component", default=None, help="Keep only this diffusers component's layers (unet, text_encoder, ...): a PEFT or GGUF output holds one model.")
@click.option("--dtype", default="keep", show_default=True, type=click.Choice(list(CONVERT_DTYPES)), help="Dtype of the written factors.")
@click.option("--drop-unsupported", "drop_unsupported", is_flag=True, help="Leave out what the target cannot hold (listed in the report) instead of refusing.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only after the conversion succeeded).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of tables.")
@click.option("--all", "show_all", is_flag=True, help="Show every layer instead of grouping long adapters by module.")
def convert_command(
    adapter: str, out: str, to: str, base: str | None, prefix: str | None, component: str | None, dtype: str,
    drop_unsupported: bool, force: bool, as_json: bool, show_all: bool,
) -> None:
    """Write an adapter in another format with the same update, proven by reading it back.

    Exit status 1 when a written layer differs from its source (the report names it).

    \b
    Example:
        lora-tools convert ./peft-adapter --to kohya -o lora.safetensors
        lora-tools convert lora.safetensors --to peft --base ./sd-base -o peft-adapter/
        lora-tools convert ./llama-adapter --to gguf --base ./Llama-3.2-1B -o adapter.gguf
    """
    with imports_without_gc():
        from lora_tools.convert.operation import convert

    report = convert(adapter, out, to=to, base=base, prefix=prefix, component=component, dtype=dtype,
                     drop_unsupported=drop_unsupported, force=force)
    _show(report, "convert", as_json, show_all=show_all)
    if not report.exact:
        sys.exit(1)
