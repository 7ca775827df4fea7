"""Blending loaded adapters layer by layer, in memory: the math of every method applied to
each module's terms (`factored` for cat, svd and linear, `dense` for TIES and DARE), with
the figures of each layer. No file is read or written here (`operation` does that).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lora_tools.adapter import Adapter, Factor, LoraLayer
from lora_tools.blend.factored import Term, blend_factored
from lora_tools.blend.inputs import DENSE_METHODS, align_layers, base_copies, blend_full_tensors, check_inputs, resolve_weights
from lora_tools.errors import LoraToolsError, RequestError
from lora_tools.linalg.blas import single_threaded_blas


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
class BlendResult:
    """The blended layers and full tensors, before anything is written."""

    layers: list[LoraLayer]
    reports: list[LayerBlendReport]
    full_tensors: dict[str, np.ndarray] = field(default_factory=dict)  # blended modules_to_save
    base_copies: dict[str, Factor] = field(default_factory=dict)  # W0 copies, carried as they are
    dropped: list[str] = field(default_factory=list)  # modules whose every weight is 0
    device: str | None = None  # where TIES/DARE ran
    normalize: bool | None = None  # TIES/DARE: divide by the weights' sum (resolved default)


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
    method: str = "svd", rank: int | None = None, energy: float | None = None,  # what to keep
    density: float | None = None, seed: int = 0, normalize: bool | None = None,  # TIES/DARE
    device: str = "auto", compute_dtype: str = "float32",  # TIES/DARE
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
        raise RequestError(recipe.paths[terms[-1].index], f"layer {name!r}: --method linear needs equal ranks, got "
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


def default_rank(adapters: Sequence[Adapter]) -> int:
    """R when --rank is not given: the largest rank of any input layer."""
    return max(max(a.ranks, default=1) for a in adapters)
