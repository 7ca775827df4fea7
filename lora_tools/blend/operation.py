"""`blend`: exact and optimal combinations of adapters that share a base, in factored form.

Each input's update at a layer is ΔWᵢ = sᵢ·Bᵢ·Aᵢ (its own scale rule: alpha/r, rsLoRA,
rank/alpha patterns, already resolved per layer by the readers). The blend is
Σ wᵢ·ΔWᵢ, and everything below works on factors (numpy float64, never a dense out×in
matrix) except TIES/DARE, which act on matrix entries (see blend_dense.py):

- cat:    [c₁B₁ | c₂B₂ | …]·[A₁; A₂; …] with cᵢ = wᵢ·sᵢ: exact, rank Σ rᵢ.
- svd:    the best rank-R approximation of that sum (Eckart–Young) from QR of the
          stacked factors and an SVD of the small core (linalg.factored.truncate); the
          residual ‖ΔW − ΔW_R‖_F it reports is exact, from the discarded singular values.
- linear: PEFT's add_weighted_adapter(combination_type="linear") bit for bit in the
          factors: A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ, B = Σ √|cᵢ|·Bᵢ. Its product has cross terms
          Bᵢ·Aⱼ, so it is *not* the weighted sum; the report says how far it is.
- ties, dare_linear, dare_ties: blend_dense.py.
Every output layer stores its scale folded into the factors (alpha = r, so s = 1, no
rsLoRA), which every consumer reads the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.adapter import Adapter, Factor, LoraLayer
from lora_tools.blend.factored import Term, blend_factored
from lora_tools.blend.inputs import (
    DENSE_METHODS,
    DTYPES,
    align_layers,
    base_copies,
    blend_full_tensors,
    check_inputs,
    check_options,
    resolve_weights,
)
from lora_tools.errors import LoraToolsError, UsageError
from lora_tools.linalg.blas import single_threaded_blas

# PEFT config fields that decide which modules an adapter creates: copied to the
# output only when every input agrees on them and adapts the same modules.
_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass
class LayerBlendReport:
    """One output layer; field names are the JSON keys."""

    name: str
    kind: str
    shape: list[int]  # (out, in) of the update as PEFT names them, kernel dims appended for conv
    weight_shape: list[int]  # the base weight as stored: (in, out) for Conv1D, (vocab, dim) for embeddings
    ranks_in: list[int | None]  # per input, None where it does not adapt this module
    rank_out: int
    cosine_similarity: list[list[float | None]]  # between the inputs' updates ΔWᵢ, n×n
    fro_norm_in: list[float | None]  # ‖ΔWᵢ‖_F (unweighted)
    fro_norm_sum: float  # ‖Σ wᵢ·ΔWᵢ‖_F, the exact blend
    fro_norm_target: float  # ‖target‖_F; target = Σ wᵢΔWᵢ, or the TIES/DARE mix
    fro_norm_out: float  # ‖ΔW_out‖_F as written (before storage rounding)
    energy_kept: float | None  # share of the target's energy kept (None for linear)
    residual_fro: float  # ‖ΔW_out − target‖_F
    relative_error: float  # ‖ΔW_out − Σ wᵢΔWᵢ‖_F / ‖Σ wᵢΔWᵢ‖_F (0 if the sum is 0)


@dataclass
class InputSummary:
    path: str
    format: str
    weight: float
    n_layers: int
    ranks: list[int]
    base_model: str | None


@dataclass
class BlendResult:
    """The blended layers and full tensors, before anything is written."""

    layers: list[LoraLayer]
    reports: list[LayerBlendReport]
    full_tensors: dict[str, np.ndarray] = field(default_factory=dict)  # blended modules_to_save
    base_copies: dict[str, Factor] = field(default_factory=dict)  # W0 copies, carried as they are
    dropped: list[str] = field(default_factory=list)  # modules whose every weight is 0
    device: str | None = None  # where TIES/DARE ran
    normalize: bool | None = None  # TIES/DARE: divide by the weights' sum (resolved default)


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


# -- the per-layer math --------------------------------------------------------------


def _shaped(template: LoraLayer, b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Matrices b (out, R), a (R, in·k) in the layer's stored shapes (conv kernels back)."""
    rank = a.shape[0]
    if template.kind == "conv":
        kernel = template.kernel_size
        return b.reshape(b.shape[0], rank, *([1] * len(kernel))), a.reshape(rank, template.a.shape[1], *kernel)
    return b, a


@dataclass
class _Recipe:
    """What every layer is blended with (resolved options)."""

    method: str
    rank: int | None  # None: the energy target alone decides
    energy: float | None
    density: float
    seed: int
    normalize: bool
    paths: list[str]  # the inputs', for error messages
    dense: Any = None  # the blend_dense module, for TIES/DARE
    device: Any = None  # torch.device, for TIES/DARE
    compute_dtype: str = "float32"


def blend_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    method: str = "svd",
    rank: int | None = None,
    energy: float | None = None,
    density: float | None = None,
    seed: int = 0,
    normalize: bool | None = None,
    device: str = "auto",
    compute_dtype: str = "float32",
) -> BlendResult:
    """Blend loaded adapters layer by layer (no I/O). See the module docstring."""
    check_inputs(adapters)
    weights = resolve_weights(len(adapters), weights)
    groups = align_layers(adapters, weights)
    full = blend_full_tensors(adapters, weights)
    if rank is None and energy is None:
        rank = default_rank(adapters)  # with --energy alone, the energy decides
    recipe = _Recipe(method, rank, energy, float(density or 1.0), seed, bool(normalize), [a.path for a in adapters],
                     compute_dtype=compute_dtype)
    if method in DENSE_METHODS:
        from lora_tools.blend import dense as blend_dense

        recipe.dense, recipe.device = blend_dense, blend_dense.resolve_device(device)
        recipe.normalize = blend_dense.DEFAULT_NORMALIZE[method] if normalize is None else normalize
    result = BlendResult([], [], full, base_copies(adapters), device=None if recipe.device is None else str(recipe.device),
                         normalize=recipe.normalize if recipe.dense is not None else None)
    threads = recipe.dense.cpu_threads(recipe.device) if recipe.dense is not None else contextlib.nullcontext()
    with single_threaded_blas(), threads:  # set once: thread pools are resized on every change
        for name, terms in groups.items():
            if all(t.coefficient == 0.0 for t in terms):
                result.dropped.append(name)
            else:
                layer, report = _blend_layer(name, terms, recipe)
                result.layers.append(layer)
                result.reports.append(report)
    return result


def _blend_layer(name: str, terms: list[Term], recipe: _Recipe) -> tuple[LoraLayer, LayerBlendReport]:
    """One module's blended layer (scale folded, alpha = r) and its report."""
    template, n = terms[0].layer, len(recipe.paths)
    if recipe.method == "linear" and len({t.layer.rank for t in terms}) != 1:
        raise UsageError(recipe.paths[terms[-1].index], f"layer {name!r}: --method linear needs equal ranks, got "
                         f"{[t.layer.rank for t in terms]} (PEFT's linear sums A's and B's; use svd or cat)")
    # the cosines, the norms and ‖Σ wᵢΔWᵢ‖ come from here for every method
    try:
        with np.errstate(over="raise", invalid="raise"):
            mixed = blend_factored(terms, "cat" if recipe.dense is not None else recipe.method, recipe.rank, recipe.energy)
            if not (np.isfinite(mixed.b).all() and np.isfinite(mixed.a).all()):
                raise FloatingPointError
    except (FloatingPointError, np.linalg.LinAlgError):
        # finite factors whose products overflow float64: the input is absurd, not OUT
        culprit = max(terms, key=lambda t: float(np.abs(t.b).max(initial=0.0)) * float(np.abs(t.a).max(initial=0.0)))
        raise LoraToolsError(
            recipe.paths[culprit.index], f"layer {name!r}: the update overflows float64 (factors too large to blend)"
        ) from None
    result = mixed
    if recipe.dense is not None:
        import torch

        result = recipe.dense.blend_layer_dense(
            name, [t for t in terms if t.coefficient != 0.0],
            recipe.method, rank=recipe.rank, energy=recipe.energy, density=recipe.density, normalize=recipe.normalize,
            seed=recipe.seed, device=recipe.device, dtype=getattr(torch, recipe.compute_dtype),
        )
    b, a = result.b, result.a
    bias = None
    if any(t.layer.bias is not None for t in terms):
        bias = np.zeros(template.b.shape[0])
        for t in terms:
            if t.layer.bias is not None:
                bias += t.coefficient * np.asarray(t.layer.bias, dtype=np.float64)
    b_out, a_out = _shaped(template, b, a)
    layer = LoraLayer(name=name, a=a_out, b=b_out, alpha=float(a.shape[0]), kind=template.kind,
                      fan_in_fan_out=template.fan_in_fan_out, bias=bias, dtype="F64")
    cosines: list[list[float | None]] = [[1.0 if i == j and i in mixed.norms else None for j in range(n)] for i in range(n)]
    for (i, j), cos in mixed.cosines.items():
        cosines[i][j] = cosines[j][i] = cos
    report = LayerBlendReport(
        name=name, kind=template.kind,
        shape=[int(template.b.shape[0]), int(template.a.shape[1]), *template.kernel_size],
        weight_shape=list(template.weight_shape),
        ranks_in=[next((t.layer.rank for t in terms if t.index == i), None) for i in range(n)],
        rank_out=int(a.shape[0]), cosine_similarity=cosines,
        fro_norm_in=[mixed.norms.get(i) for i in range(n)],
        fro_norm_sum=mixed.sum_norm, fro_norm_target=result.target_norm, fro_norm_out=result.out_norm,
        energy_kept=result.energy_kept, residual_fro=result.residual_fro,
        relative_error=result.error_vs_sum / mixed.sum_norm if mixed.sum_norm > 0 else 0.0,
    )
    return layer, report


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
    method: str = "svd",
    rank: int | None = None,
    energy: float | None = None,
    density: float | None = None,
    seed: int = 0,
    normalize: bool | None = None,
    out_format: str = "auto",
    dtype: str = "keep",
    device: str = "auto",
    alpha: float | None = None,
    base_model_name_or_path: str | None = None,
    force: bool = False,
) -> BlendReport:
    """Read the inputs, blend them, write OUT atomically, and report per layer."""
    from lora_tools.formats import load_adapter
    from lora_tools.formats.kohya import write_kohya
    from lora_tools.formats.peft import write_peft_adapter
    from lora_tools.io.atomic import atomic_output, wrap_write_errors
    from lora_tools.io.encode import WriteError

    started = time.perf_counter()
    check_options(method, rank, energy, density, out_format, dtype)
    if not inputs:
        raise UsageError(None, "blend needs at least one adapter")
    adapters = [load_adapter(path, alpha=alpha) for path in inputs]
    weights = resolve_weights(len(adapters), weights)
    check_inputs(adapters)
    kohya_inputs = all(a.format == "kohya" for a in adapters)
    fmt = ("kohya" if kohya_inputs else "peft") if out_format == "auto" else out_format
    if (fmt == "kohya") != kohya_inputs:
        raise UsageError(out, f"--format {fmt} needs {'kohya' if fmt == 'kohya' else 'PEFT'} inputs (names are not converted)")
    result = blend_adapters(adapters, weights, method=method, rank=rank, energy=energy, density=density,
                            seed=seed, normalize=normalize, device=device)
    if not result.layers:
        raise UsageError(None, "every weight is 0: nothing to write")
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
    try:
        with wrap_write_errors(out), atomic_output(out, force, [Path(p) for p in inputs]) as tmp:
            if fmt == "kohya":
                write_kohya(result.layers, tmp, dtype=code, metadata=metadata)
            else:
                extra, targets = _peft_extras(adapters, result)
                write_peft_adapter(result.layers, tmp, base_name, dtype=code, full_tensors=result.full_tensors,
                                   full_tensor_dtype=full_code, base_copies={k: np.asarray(v) for k, v in result.base_copies.items()},
                                   target_modules=targets, config_extra=extra, metadata=metadata)
    except WriteError as error:
        raise LoraToolsError(out, str(error)) from None
    return _report(adapters, weights, result, out, fmt, code, method, rank, energy, density, seed, notes,
                   time.perf_counter() - started)


def default_rank(adapters: Sequence[Adapter]) -> int:
    """R when --rank is not given: the largest rank of any input layer."""
    return max(max(a.ranks, default=1) for a in adapters)


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
