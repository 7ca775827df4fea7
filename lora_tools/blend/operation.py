"""`blend`: exact and optimal combinations of adapters that share a base, in factored form.

Each input's update at a layer is ΔWᵢ = sᵢ·Bᵢ·Aᵢ (its own scale rule: alpha/r, rsLoRA,
rank/alpha patterns, already resolved per layer by the readers). The blend is
Σ wᵢ·ΔWᵢ, and everything below works on factors (numpy float64, never a dense out×in
matrix) except TIES/DARE, which act on matrix entries (see dense.py):

- cat:    [c₁B₁ | c₂B₂ | …]·[A₁; A₂; …] with cᵢ = wᵢ·sᵢ: exact, rank Σ rᵢ.
- svd:    the best rank-R approximation of that sum (Eckart–Young) from QR of the
          stacked factors and an SVD of the small core (linalg.factored.truncate); the
          residual ‖ΔW − ΔW_R‖_F it reports is exact, from the discarded singular values.
- linear: PEFT's add_weighted_adapter(combination_type="linear") bit for bit in the
          factors: A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ, B = Σ √|cᵢ|·Bᵢ. Its product has cross terms
          Bᵢ·Aⱼ, so it is *not* the weighted sum; the report says how far it is.
- ties, dare_linear, dare_ties: dense.py.
Every output layer stores its scale folded into the factors (alpha = r, so s = 1, no
rsLoRA), which every consumer reads the same way. This module reads the inputs, writes
OUT and reports; the layer-by-layer work is `layers.blend_adapters`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.adapter import Adapter
from lora_tools.blend.inputs import DTYPES, check_inputs, check_options, resolve_weights
from lora_tools.blend.layers import BlendResult, LayerBlendReport, blend_adapters, default_rank
from lora_tools.errors import RequestError

# PEFT config fields that decide which modules an adapter creates: copied to the
# output only when every input agrees on them and adapts the same modules.
_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass
class InputSummary:
    path: str
    format: str
    weight: float
    n_layers: int
    ranks: list[int]
    base_model: str | None


@dataclass
class BlendReport:
    method: str
    weights: list[float]
    inputs: list[InputSummary]
    out: str
    format: str
    dtype: str
    rank: int | None
    energy: float | None
    density: float | None
    seed: int | None
    normalize: bool | None
    device: str | None
    n_layers: int
    n_params: int
    energy_kept: float | None  # 1 − Σ residual² / Σ ‖target‖² over layers
    min_energy_kept: float | None
    relative_error: float  # sqrt(Σ‖out − sum‖²) / sqrt(Σ‖sum‖²) over layers
    full_tensors: list[str]
    dropped_layers: list[str]
    notes: list[str]
    seconds: float
    layers: list[LayerBlendReport]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- the command --------------------------------------------------------------------


def _common(values: Sequence[str], fallback: str) -> str:
    return values[0] if len(set(values)) == 1 else fallback


def _peft_extras(adapters: Sequence[Adapter], result: BlendResult) -> tuple[dict[str, Any], list[str] | str | None]:
    """Config fields carried from the inputs: task_type, revision, modules_to_save, and
    the targeting fields when every input uses the same ones on the same modules."""
    configs = [a.config for a in adapters]
    extra: dict[str, Any] = {}
    for key in ("task_type", "revision"):
        value = next((c.get(key) for c in configs if c.get(key)), None)
        if value is not None:
            extra[key] = value
    if result.full_tensors:
        saved = sorted({m for c in configs for m in (c.get("modules_to_save") or [])})
        extra["modules_to_save"] = saved or None
        extra["bias"] = _common([str(c.get("bias") or "none") for c in configs], "none")
    names = {layer.name for layer in result.layers}
    same_modules = all({layer.name for layer in a.layers} == names for a in adapters)
    targeting = [json.dumps([c.get(k) for k in _TARGETING], sort_keys=True) for c in configs]
    if same_modules and configs[0].get("target_modules") and len(set(targeting)) == 1:
        extra.update({k: configs[0].get(k) for k in _TARGETING[1:]})
        return extra, configs[0]["target_modules"]
    return extra, None


def blend(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    weights: Sequence[float],
    *,
    method: str = "svd", rank: int | None = None, energy: float | None = None,  # as blend_adapters
    density: float | None = None, seed: int = 0, normalize: bool | None = None, device: str = "auto",
    out_format: str = "auto", dtype: str = "keep", alpha: float | None = None,  # the files
    base_model_name_or_path: str | None = None, force: bool = False,
) -> BlendReport:
    """Read the inputs, blend them, write OUT atomically, and report per layer."""
    from lora_tools.formats import load_adapter
    from lora_tools.formats.kohya import write_kohya
    from lora_tools.formats.peft import write_peft_adapter
    from lora_tools.io.atomic import written_atomically

    started = time.perf_counter()
    check_options(method, rank, energy, density, out_format, dtype)
    if not inputs:
        raise RequestError(None, "blend needs at least one adapter")
    adapters = [load_adapter(path, alpha=alpha) for path in inputs]
    weights = resolve_weights(len(adapters), weights)
    check_inputs(adapters)
    kohya_inputs = all(a.format == "kohya" for a in adapters)
    fmt = ("kohya" if kohya_inputs else "peft") if out_format == "auto" else out_format
    if (fmt == "kohya") != kohya_inputs:
        raise RequestError(out, f"--format {fmt} needs {'kohya' if fmt == 'kohya' else 'PEFT'} inputs (names are not converted)")
    result = blend_adapters(adapters, weights, method=method, rank=rank, energy=energy, density=density,
                            seed=seed, normalize=normalize, device=device)
    if not result.layers:
        raise RequestError(None, "every weight is 0: nothing to write")
    code = DTYPES[dtype] or _common([layer.dtype for a in adapters for layer in a.layers], "F32")
    # full tensors are weights of the base's kind, not factors: they keep their stored dtype
    full_code = _common([d for a in adapters for d in a.full_tensor_dtypes.values()], "F32")
    bases = [name for name in map(_base_name, adapters) if name is not None]
    notes = []
    if len(set(bases)) > 1:
        notes.append(f"inputs name different base models ({', '.join(sorted(set(bases)))}); the output names {bases[0]}")
    base_name = base_model_name_or_path or (bases[0] if bases else None)
    recipe = {"method": method, "weights": weights, "inputs": [Path(p).name for p in inputs]}
    metadata = {"lora_tools.blend": json.dumps(recipe)}
    with written_atomically(out, force, [Path(p) for p in inputs]) as tmp:
        if fmt == "kohya":
            write_kohya(result.layers, tmp, dtype=code, metadata=metadata)
        else:
            extra, targets = _peft_extras(adapters, result)
            write_peft_adapter(result.layers, tmp, base_name, dtype=code, full_tensors=result.full_tensors,
                               full_tensor_dtype=full_code, base_copies={k: np.asarray(v) for k, v in result.base_copies.items()},
                               target_modules=targets, config_extra=extra, metadata=metadata)
    return _report(adapters, weights, result, out, fmt, code, method, rank, energy, density, seed, notes,
                   time.perf_counter() - started)


def _report(adapters: Sequence[Adapter], weights: list[float], result: BlendResult, out: Any, fmt: str, code: str,
            method: str, rank: int | None, energy: float | None, density: float | None, seed: int,
            notes: list[str], seconds: float) -> BlendReport:
    layers = result.reports
    kept = [lr.energy_kept for lr in layers if lr.energy_kept is not None]
    target_sq = sum(lr.fro_norm_target**2 for lr in layers)
    lost_sq = sum(lr.residual_fro**2 for lr in layers)
    sum_sq = sum(lr.fro_norm_sum**2 for lr in layers)
    err_sq = sum((lr.relative_error * lr.fro_norm_sum) ** 2 for lr in layers)
    return BlendReport(
        method=method, weights=weights,
        inputs=[InputSummary(a.path, a.format, w, len(a.layers), a.ranks, _base_name(a)) for a, w in zip(adapters, weights)],
        out=os.fspath(out), format=fmt, dtype=code,
        rank=None if method in ("cat", "linear") else (rank if rank is not None or energy is not None else default_rank(adapters)),
        energy=energy, density=density, seed=seed if method.startswith("dare") else None,
        normalize=result.normalize, device=result.device,
        n_layers=len(result.layers),
        n_params=sum(layer.n_params for layer in result.layers),
        energy_kept=None if not kept else (1.0 if target_sq == 0 else max(0.0, 1.0 - lost_sq / target_sq)),
        min_energy_kept=min(kept) if kept else None,
        relative_error=math.sqrt(err_sq / sum_sq) if sum_sq > 0 else 0.0,
        full_tensors=sorted(result.full_tensors), dropped_layers=result.dropped, notes=notes,
        seconds=seconds, layers=layers,
    )


def _base_name(adapter: Adapter) -> str | None:
    name = adapter.config.get("base_model_name_or_path")
    return name if isinstance(name, str) else None
