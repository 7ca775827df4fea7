"""`resize`: exact rank reduction of one adapter from its factors (never a dense ΔW).

Per layer, the singular values of ΔW = s·B·A come from the factors (QR + SVD of an r×r
core, `linalg.factored`); a policy (`linalg.rank_policy`) picks k; the written factors
are the Eckart–Young truncation, balanced (B = U_k√Σ_k, A = √Σ_kV_kᵀ), and the reported
error ‖ΔW − ΔW_k‖_F = √(Σ discarded σ²) is exact. The scale rule is kept (alpha
re-derived per layer, rsLoRA included, rank_pattern/alpha_pattern written as needed) or,
with `bake`, folded into the factors with alpha = r and no rsLoRA, which any runtime
applying one global alpha/r reads right. Layers whose update is exactly zero are
dropped; DoRA magnitudes and full tensors (modules_to_save) are carried over unchanged.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.errors import LoraToolsError, RequestError
from lora_tools.linalg.rank_policy import RankPolicy, policy_from_options
from lora_tools.resize.layers import LayerResizeReport, factor_workers, resize_layers
from lora_tools.resize.options import DTYPES, FORMATS


@dataclass
class ResizeReport:
    adapter: str
    out: str
    format: str
    dtype: str
    policy: str  # "rank", "energy", "sv_ratio", "sv_fro", "sv_cumulative", "budget" or "bake"
    rank: int | None
    energy: float | None
    sv_ratio: float | None
    sv_fro: float | None
    sv_cumulative: float | None
    budget: int | None
    min_rank: int
    bake: bool
    n_layers_in: int
    n_layers_out: int
    params_in: int  # every tensor: factors, DoRA magnitudes, LoRA biases, full tensors
    params_out: int
    file_bytes_in: int
    file_bytes_out: int
    energy_kept: float  # 1 − Σ residual² / Σ ‖ΔW‖² over layers
    mean_energy_kept: float  # the mean of the layers' own kept shares (what --budget maximises)
    relative_error: float  # √(Σ residual²) / √(Σ ‖ΔW‖²) over layers
    worst_layer: str | None
    worst_relative_error: float
    base: str | None  # --base: the merged weights W0 + ΔW were compared too
    merged_relative_error: float | None  # √(Σ ‖W'_in − W'_out‖²) / √(Σ ‖W'_in‖²) over layers, with --base
    dropped_layers: list[str]  # exactly zero updates
    full_tensors: list[str]  # carried over unchanged
    notes: list[str]
    seconds: float
    layers: list[LayerResizeReport]

    def to_json(self) -> dict[str, Any]:
        # shallow, not asdict: its deep copy of every singular value (7 K at 1B r=64) took
        # ~8 ms, as long as reading a fifth of the adapter
        document = {f.name: getattr(self, f.name) for f in fields(self)}
        document["layers"] = [dict(vars(layer)) for layer in self.layers]
        return document


def check_options(rank: int | None, energy: float | None, sv_ratio: float | None, sv_fro: float | None,
                  sv_cumulative: float | None, budget: int | None, min_rank: int, bake: bool, out_format: str,
                  dtype: str) -> tuple[RankPolicy, str]:
    """The policy the options ask for, and its name; RequestError for a bad or conflicting one."""
    chosen = {name: value for name, value in (("energy", energy), ("sv_ratio", sv_ratio), ("sv_fro", sv_fro),
                                               ("sv_cumulative", sv_cumulative), ("budget", budget)) if value is not None}
    if not chosen and rank is None and not bake:
        raise RequestError(None, "choose a policy: --rank, --energy, --sv-ratio, --sv-fro, --sv-cumulative, --budget or --bake")
    policy, kind = policy_from_options(rank, min_rank, chosen)
    if out_format not in FORMATS:
        raise RequestError(None, f"--format must be one of {', '.join(FORMATS)}, got {out_format!r}")
    if dtype not in DTYPES:
        raise RequestError(None, f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return policy, kind or ("rank" if rank is not None else "bake")


def _size(path: str | os.PathLike[str]) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    return p.stat().st_size if p.exists() else 0


def resize(
    adapter_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
    rank: int | None = None, energy: float | None = None, sv_ratio: float | None = None, sv_fro: float | None = None,
    sv_cumulative: float | None = None, budget: int | None = None, min_rank: int = 1, bake: bool = False,
    out_format: str = "auto", dtype: str = "keep", force: bool = False, base: str | os.PathLike[str] | None = None,
) -> ResizeReport:
    """Read ADAPTER, resize every layer by the policy, write OUT atomically, report per
    layer; with `base`, also the error of each merged weight (what DoRA needs)."""
    from lora_tools.formats import load_adapter
    from lora_tools.formats.rewrite import common_dtype, write_like
    from lora_tools.formats.source import keep_stored
    from lora_tools.io.atomic import written_atomically
    from lora_tools.io.encode import WriteError

    started = time.perf_counter()
    policy, name = check_options(rank, energy, sv_ratio, sv_fro, sv_cumulative, budget, min_rank, bake, out_format, dtype)
    adapter = load_adapter(adapter_path, place=keep_stored)  # bf16 factors as read: see keep_stored
    fmt = adapter.format if out_format == "auto" else out_format
    if fmt != adapter.format:
        raise RequestError(out, f"--format {fmt} needs a {fmt} input (the input is {adapter.format}; names are not converted)")
    if not adapter.layers:
        raise RequestError(adapter_path, "has no LoRA layers to resize")
    code = DTYPES[dtype] or common_dtype([layer.dtype for layer in adapter.layers])
    # factors are held as they will be written (float64 products rounded once), so --base
    # measures the written adapter; bf16 ones are computed in float32 (≈ 2⁻²¹ here,
    # `tall.single_blocks`) and encoded by the threads that form them
    held = {"F64": np.float64, "F16": np.float16}.get(code, np.float32)
    with factor_workers(len(adapter.layers)) as pool:  # until the factors formed there are written
        try:
            layers, reports = resize_layers(adapter.layers, policy, pool, budget=budget, bake=bake, dtype=held,
                                            encode="BF16" if code == "BF16" else None)
        except ValueError as error:
            raise RequestError(adapter_path, str(error)) from None
        if not layers:
            raise RequestError(adapter_path, "every layer's update is exactly zero: nothing to write")
        dropped = [r.name for r in reports if r.rank_out == 0]
        merged_figure = None
        if base is not None:  # before anything is written: a base that does not fit is an input error
            from lora_tools.resize.merged_error import merged_errors

            written = iter(layers)
            try:  # reads the factors still being formed: their refusal, as the writer's would be
                figures = merged_errors(adapter, [None if r.rank_out == 0 else next(written) for r in reports], base)
            except WriteError as error:
                raise LoraToolsError(out, str(error)) from None
            for report, figure in zip(reports, figures):
                report.merged_error, report.merged_relative_error = figure.error, figure.relative
            merged_sq = sum(f.merged_norm**2 for f in figures)
            merged_figure = math.sqrt(sum(f.error**2 for f in figures) / merged_sq) if merged_sq > 0.0 else 0.0
        recipe = {"policy": name, "rank": rank, "energy": energy, "sv_ratio": sv_ratio, "sv_fro": sv_fro,
                  "sv_cumulative": sv_cumulative, "budget": budget, "min_rank": min_rank, "bake": bake}
        metadata = {"lora_tools.resize": json.dumps({k: v for k, v in recipe.items() if v is not None})}
        with written_atomically(out, force, [Path(adapter_path)]) as tmp:
            write_like(adapter, layers, tmp, fmt, code, dropped=bool(dropped), metadata=metadata)
    notes = []
    if any(r.dora for r in reports):
        notes.append("DoRA: magnitudes kept; the low-rank direction update s·B·A is truncated (figures are for it"
                     + ("; merged: the error of m·(W0 + ΔW)/‖W0 + ΔW‖)" if base is not None else "; --base gives the merged weights' error)"))
    if fmt == "kohya" and len({layer.alpha for layer in layers}) > 1:
        notes.append("kohya: per-module alphas differ; diffusers' kohya loader gives attention layers the most common "
                     "alpha instead (--bake writes one alpha, exact there too)")
    if adapter.unrecognized_keys:
        notes.append(f"{len(adapter.unrecognized_keys)} unrecognized tensor(s) not carried over")
    total_sq = sum(r.fro_norm**2 for r in reports)
    lost_sq = sum(r.residual_fro**2 for r in reports)
    worst = max(reports, key=lambda r: r.relative_error)
    full_params = sum(math.prod(t.shape) for t in adapter.full_tensors.values())
    return ResizeReport(
        adapter=os.fspath(adapter_path), out=os.fspath(out), format=fmt, dtype=code, policy=name, rank=rank,
        energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, sv_cumulative=sv_cumulative, budget=budget,
        min_rank=min_rank, bake=bake, n_layers_in=len(adapter.layers), n_layers_out=len(layers),
        params_in=adapter.n_params, params_out=sum(layer.n_params for layer in layers) + full_params,
        file_bytes_in=_size(adapter_path), file_bytes_out=_size(out),
        energy_kept=1.0 if total_sq == 0.0 else max(0.0, 1.0 - lost_sq / total_sq),
        mean_energy_kept=sum(r.energy_kept for r in reports) / len(reports),
        relative_error=math.sqrt(lost_sq / total_sq) if total_sq > 0.0 else 0.0,
        worst_layer=worst.name, worst_relative_error=worst.relative_error,
        base=None if base is None else os.fspath(base), merged_relative_error=merged_figure,
        dropped_layers=dropped, full_tensors=sorted(adapter.full_tensors), notes=notes,
        seconds=time.perf_counter() - started, layers=reports,
    )
