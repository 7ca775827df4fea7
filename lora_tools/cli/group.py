"""The click group every verb registers on, and the one place a library error becomes
what the user sees. Its own module so that `__init__` and the verb modules all import it
without a cycle."""

from __future__ import annotations

import sys
from typing import Any

import click

from lora_tools.errors import CheckFailed, LoraToolsError, printable


class InputError(click.ClickException):
    """Bad input or usage detected by the library: one stderr line, exit status 2.

    Names in the message come from inside files (tensor, layer and shard names): their
    control characters are escaped here, so the message stays one harmless line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


class _Commands(click.Group):
    """The one place a library error becomes what the user sees: one stderr line, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CheckFailed as error:
            click.echo(f"Error: {printable(str(error))}", err=True)
            sys.exit(1)
        except LoraToolsError as error:
            raise InputError(str(error)) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-tools")
def cli() -> None:
    """Inspect, merge, blend and verify LoRA adapters.

    \b
    Adapters: PEFT folders/files (LoRA, LoHa, LoKr), kohya sd-scripts, LyCORIS and
    diffusers files; convert also writes llama.cpp GGUF adapters.
    Bases: Hugging Face folders (single or sharded safetensors) or one .safetensors file.
    """
