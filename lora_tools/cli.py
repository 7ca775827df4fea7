"""The `lora-tools` command line: parse, call the library, render, map errors.

Library modules are imported inside each command so that `lora-tools --help` never
pays for numpy, torch or matplotlib.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from lora_tools.blend.options import DTYPES as BLEND_DTYPES
from lora_tools.blend.options import FORMATS as BLEND_FORMATS
from lora_tools.blend.options import METHODS as BLEND_METHODS
from lora_tools.convert.options import DTYPES as CONVERT_DTYPES
from lora_tools.convert.options import TARGETS as CONVERT_TARGETS
from lora_tools.errors import CheckFailed, LoraToolsError, RequestError, printable
from lora_tools.extract.options import DTYPES as EXTRACT_DTYPES
from lora_tools.extract.options import FORMATS as EXTRACT_FORMATS
from lora_tools.io.dtypes import MERGE_DTYPE_CHOICES
from lora_tools.render.console import RichProgress, stdout_console
from lora_tools.resize.options import DTYPES as RESIZE_DTYPES
from lora_tools.resize.options import FORMATS as RESIZE_FORMATS

# A bug in lora-tools: neither 1 (a verify check failed) nor 2 (the user's input).
INTERNAL_ERROR = 3


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
    from lora_tools.inspect import inspect_adapter

    report = inspect_adapter(adapter, base_path=base, alpha=alpha, base_quant=base_quant)
    if plot_path is not None:
        from lora_tools.render.plot import save_plot

        save_plot(report, plot_path, force=force)
    _show(report, "inspect", as_json, show_all=show_all, resize="resize" in cli.commands)


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


def _run_verify(
    base: str, adapters: list[str], merged: str, weights: list[float], alpha: float | None,
    atol: float | None, rtol: float | None, as_json: bool, show_all: bool = False, device: str = "cpu",
) -> None:
    from lora_tools.verify.operation import verify

    report = verify(base, list(adapters), merged, weights=weights or None, atol=atol, rtol=rtol, alpha=alpha, device=device)
    _show(report, "verify", as_json, show_all=show_all)
    if not report.equivalent:
        sys.exit(1)


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
    from lora_tools.blend.operation import blend

    report = blend(
        list(adapters), out, list(weights), method=method, rank=rank, energy=energy, density=density, seed=seed,
        normalize=normalize, out_format=out_format, dtype=dtype, device=device, alpha=alpha,
        base_model_name_or_path=base_model, force=force,
    )
    _show(report, "blend", as_json, show_all=show_all)


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
    from lora_tools.resize.operation import resize

    report = resize(
        adapter, out, rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, sv_cumulative=sv_cumulative,
        budget=budget, min_rank=min_rank, bake=bake, out_format=out_format, dtype=dtype, force=force, base=base,
    )
    _show(report, "resize", as_json, show_all=show_all)


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
    from lora_tools.convert.operation import convert

    report = convert(adapter, out, to=to, base=base, prefix=prefix, component=component, dtype=dtype,
                     drop_unsupported=drop_unsupported, force=force)
    _show(report, "convert", as_json, show_all=show_all)
    if not report.exact:
        sys.exit(1)


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


def _stopped(signum: int, written: str | None) -> int:
    """Say which signal stopped the run, and whether OUT was already complete; return the status."""
    import signal

    from lora_tools.io.output_path import published_outputs

    written = written or next(reversed(published_outputs()), None)
    named: dict[int, str] = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
    what = named.get(signum) or f"terminated by {signal.Signals(signum).name}"
    click.echo(f"Error: {what}" + (f" after the output was written: {written}" if written else ""), err=True)
    return 128 + signum


def _run_command() -> int:
    """Run the command; whatever ends it is reported in one stderr line. Returns the exit status."""
    import os
    import signal

    from lora_tools.errors import Terminated

    try:  # cli.main() would print a blank line on Ctrl-C: invoke the group directly
        with cli.make_context("lora-tools", sys.argv[1:]) as context:
            cli.invoke(context)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        return _stopped(signal.SIGINT, None)
    except Terminated as stop:
        return _stopped(stop.signum, stop.written)
    except SystemExit as done:  # verify's status 1
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    except BrokenPipeError:  # `lora-tools inspect ... | head`
        return 0
    except Exception as error:  # noqa: BLE001 - a bug: still one line, and a way to see more
        if os.environ.get("LORA_TOOLS_DEBUG"):
            raise
        message = printable(str(error).splitlines()[0]) if str(error) else ""
        click.echo(f"Error: internal error: {type(error).__name__}: {message} (set LORA_TOOLS_DEBUG=1 for details)", err=True)
        return INTERNAL_ERROR
    return 0


def _ignore_stop_signals() -> None:
    """At interpreter exit: the outcome is reported, a late signal must not change it (or kill silently)."""
    import signal

    from lora_tools.io.output_path import STOP_SIGNALS

    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def main() -> None:
    """Entry point of the console script.

    Click's standalone mode would turn Ctrl-C into "Aborted!" with status 1, which is
    verify's "not equivalent"; here a stop signal exits with 128 + its number and one line:
    Ctrl-C 130 "interrupted", SIGTERM 143 "terminated", SIGHUP 129 and SIGQUIT 131 "terminated
    by SIG…", each saying so when an output was already written. A signal that arrives
    once the outcome is reported is ignored. Anything unexpected is one line too
    (LORA_TOOLS_DEBUG=1 shows the traceback).
    """
    import atexit
    import signal
    import threading

    from lora_tools.errors import Terminated
    from lora_tools.io.output_path import STOP_SIGNALS, forget_published

    forget_published()

    def stop(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:  # SIGINT keeps Python's KeyboardInterrupt; an ignored one stays ignored
            before = signal.getsignal(signum)
            if signum != signal.SIGINT and before is not signal.SIG_IGN and before is not None:
                previous[signum] = signal.signal(signum, stop)
    try:
        try:
            code = _run_command()
        except KeyboardInterrupt:  # while reporting another outcome
            code = _stopped(signal.SIGINT, None)
        except Terminated as late:
            code = _stopped(late.signum, late.written)
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)
    atexit.unregister(_ignore_stop_signals)
    atexit.register(_ignore_stop_signals)  # registered last, so it runs before torch's own exit work
    sys.exit(code)
