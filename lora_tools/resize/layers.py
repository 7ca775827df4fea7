"""Resizing loaded layers in memory: each layer's exact spectrum from its factors, the
ranks a policy chooses, and the truncated layers with their figures. No file is read or
written here (`operation` does that).

For ΔW = s·B·A: `factored.svd_of_factors(B, Aᵀ)` gives B·A = Σ σᵢ·uᵢ·vᵢᵀ with U and V
not yet formed, so every layer's spectrum is known before any tall product is made; the
written factors are the balanced U_k√Σ_k, √Σ_kV_kᵀ (the Eckart–Young rank-k truncation),
formed from the stored factors in float64 row blocks and kept in float32 unless the
output is float64 or float16 (bf16 and float32 outputs round through float32 anyway),
and ‖ΔW − ΔW_k‖_F = |s|·√(Σ_{i>k} σᵢ²) exactly. The written layer keeps s (alpha re-derived:
s·k, or s·√k under rsLoRA) or, baked, carries its scale in the factors under one global
alpha c = the most common written rank (alpha = r there, scale 1) and no rsLoRA: a layer
at another rank k folds s·k/c into its factors, so that c/k (alpha/r with r read from the
tensors, what llama.cpp, TensorRT-LLM and older vLLM apply) gives exactly ΔW_k, and no
alpha_pattern is written.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from lora_tools.adapter import Factor, LoraLayer
from lora_tools.io.encode import Deferred, Encoded, encode_blocks, overflow_error, stored_values
from lora_tools.linalg.blas import single_threaded_blas
from lora_tools.linalg.factored import FactorSVD, svd_of_factors
from lora_tools.linalg.rank_policy import RankPolicy, budget_ranks
from lora_tools.linalg.tall import Tall, Widened, as_tall, single_blocks


@dataclass
class LayerResizeReport:
    """One layer; field names are the JSON keys."""

    name: str
    kind: str
    shape: list[int]  # (rows, cols) of B·A: (out, in·k), (dim, vocab) for embeddings
    rank_in: int
    rank_out: int  # 0: the update is exactly zero and the layer was dropped
    alpha_in: float
    alpha_out: float
    fro_norm: float  # ‖ΔW‖_F of the input layer
    energy_kept: float  # Σ_{i≤k} σᵢ² / Σ σᵢ² (1.0 for a zero update)
    residual_fro: float  # ‖ΔW − ΔW_k‖_F = √(Σ_{i>k} σᵢ²)
    relative_error: float  # residual_fro / ‖ΔW‖_F (0.0 for a zero update)
    params_in: int
    params_out: int
    singular_values: list[float]  # of ΔW = s·B·A, descending, r of them
    dora: bool  # DoRA: magnitude kept, only the direction's low-rank update truncated
    merged_error: float | None = None  # with --base: ‖W'_in − W'_out‖_F of the merged weights
    merged_relative_error: float | None = None  # ... over ‖W'_in‖_F


# the stored dtype code of factors held as each numpy type
_CODES: dict[type, str] = {np.float64: "F64", np.float32: "F32", np.float16: "F16"}


def _tall(factor: Factor, transposed: bool = False) -> Tall:
    """A factor (or its transpose) as `linalg.tall` uses it, with no widened copy: bf16
    bits as read (`formats.source.keep_stored`) are widened block by block as they are used."""
    if isinstance(factor, Encoded) and factor.code == "BF16":
        return Widened(factor.bits.T if transposed else factor.bits, bf16_bits=True)
    values = np.asarray(factor)
    return as_tall(values.T if transposed else values)


def _spectrum(layer: LoraLayer) -> tuple[FactorSVD, np.ndarray]:
    """The SVD of B·A (numerical rank t, tall products unformed) and σ(ΔW) = |s|·σ(B·A),
    all r of them (zero past t)."""
    parts = svd_of_factors(_tall(layer.b_matrix), _tall(layer.a_matrix, transposed=True))  # (m, r), (n, r)
    sigma = np.zeros(layer.rank)
    sigma[: parts.s.size] = abs(layer.scale) * parts.s
    return parts, sigma


def choose_ranks(spectra: Sequence[np.ndarray], layers: Sequence[LoraLayer], policy: RankPolicy,
                 budget: int | None) -> list[int]:
    """k per layer: the per-layer policy, or the global budget (parameters per rank =
    rows + cols of B·A); 0 for a zero update, except under DoRA: its magnitude still
    rescales W0 row by row, so that layer keeps the floor rank with zero factors."""
    if budget is None:
        ranks = [policy.choose(s) for s in spectra]
    else:
        costs = [sum(layer.update_matrix_shape) for layer in layers]
        ranks = budget_ranks(spectra, costs, budget, cap=policy.rank, min_rank=policy.min_rank)
    return [policy.min_rank if k == 0 and layer.magnitude is not None else k for k, layer in zip(ranks, layers)]


def _stored(template: LoraLayer, b: Factor, a: Factor) -> tuple[Factor, Factor]:
    """Matrices b (m, k), a (k, n) in the template's stored shapes (conv kernels back)."""
    k = a.shape[0]
    if template.kind == "conv":
        extra = (1,) * (template.b.ndim - 2)
        return b.reshape(b.shape[0], k, *extra), a.reshape(k, *template.a.shape[1:])
    return b, a


def _alpha_for(layer: LoraLayer, k: int) -> float:
    """alpha under the layer's own rule giving the same scale s at rank k."""
    if k == layer.rank:
        return layer.alpha
    return layer.scale * (math.sqrt(k) if layer.use_rslora else k)


def _factors(parts: FactorSVD, keep: int, scale_b: float, scale_a: float, dtype: type,
             encode: str | None, name: str) -> tuple[Factor, Factor]:
    """The balanced rank-`keep` factors b (m, keep), a (keep, n): arrays of `dtype`, or with
    `encode` (bf16) already in their stored form, each block rounded as it is formed
    (WriteError naming layer `name` where a value does not fit)."""
    if encode is None:
        b_values, a_values = parts.balanced(keep, dtype, scale_b=scale_b, scale_a=scale_a)
        for values, side in ((b_values, "B"), (a_values, "A")):
            if dtype != np.float64 and not np.isfinite(values).all():  # float64 products past float32/16
                raise overflow_error(values, "F16" if dtype == np.float16 else "F32", f"layer {name!r}, factor {side}")
        return b_values, a_values
    small_b, small_a = parts.balanced_sides(keep, scale_b=scale_b, scale_a=scale_a)
    b = encode_blocks((parts.base_b.shape[0], keep), single_blocks(parts.base_b, small_b), encode,
                      f"layer {name!r}, factor B")
    a = encode_blocks((keep, parts.base_a.shape[0]), single_blocks(parts.base_a, small_a, transposed=True), encode,
                      f"layer {name!r}, factor A")
    return b, a


def resize_layer(layer: LoraLayer, parts: FactorSVD, sigma: np.ndarray, k: int, bake_alpha: float | None,
                 dtype: type = np.float64, encode: str | None = None,
                 pool: Executor | None = None) -> tuple[LoraLayer | None, LayerResizeReport]:
    """The layer truncated to rank k (None when k = 0), its factors stored as `dtype`, and
    its figures; with `bake_alpha` c, its scale folded into the factors under alpha = c
    (scale c/k, no rsLoRA). `encode` ("BF16"): the factors come already encoded
    (`io.encode.Encoded`), from float32 products rounded block by block. With `pool`, the
    factors are formed there and the layer holds them as `io.encode.Deferred`."""
    energies = sigma**2
    total = float(energies.sum())
    residual = math.sqrt(float(energies[k:].sum()))
    norm = math.sqrt(total)
    out: LoraLayer | None = None
    if k > 0:
        bias = None if layer.bias is None else np.asarray(layer.bias, dtype=np.float64)
        fold = 1.0
        if bake_alpha is not None:
            fold = layer.scale * k / bake_alpha  # (c/k)·fold·B_k·A_k = s·B_k·A_k
            alpha, rslora = bake_alpha, False
            bias = None if bias is None else fold * bias
        else:
            alpha, rslora = _alpha_for(layer, k), layer.use_rslora
        t = parts.s.size
        root = math.sqrt(abs(fold))  # on the small side, so each stored value is rounded once
        b: Factor
        a: Factor
        if k <= t and pool is not None:
            future = pool.submit(_factors, parts, k, math.copysign(root, fold), root, dtype, encode, layer.name)
            b, a = Deferred(future, 0, (parts.base_b.shape[0], k)), Deferred(future, 1, (k, parts.base_a.shape[0]))
        else:
            b, a = _factors(parts, min(k, t), math.copysign(root, fold), root, dtype, encode if k <= t else None,
                            layer.name)
        if k > t:  # the floor asks for more than the numerical rank: zero columns / rows
            b = np.concatenate([b, np.zeros((b.shape[0], k - t), dtype)], axis=1)
            a = np.concatenate([a, np.zeros((k - t, a.shape[1]), dtype)], axis=0)
        b, a = _stored(layer, b, a)
        # magnitude and bias as they will read back, like the factors (--base measures what is written)
        written = encode or _CODES[dtype]
        magnitude = None if layer.magnitude is None else stored_values(np.asarray(layer.magnitude), written,
                                                                        f"layer {layer.name!r}, magnitude")
        bias = None if bias is None else stored_values(bias, written, f"layer {layer.name!r}, bias")
        out = replace(layer, a=a, b=b, alpha=alpha, use_rslora=rslora, magnitude=magnitude, bias=bias, algo="lora",
                      stored_params=None, kron_sides=None, hadamard_sides=None)
    report = LayerResizeReport(
        name=layer.name, kind=layer.kind, shape=list(layer.update_matrix_shape), rank_in=layer.rank, rank_out=k,
        alpha_in=float(layer.alpha), alpha_out=float(out.alpha) if out is not None else 0.0, fro_norm=norm,
        energy_kept=1.0 if total == 0.0 else float(energies[:k].sum()) / total,
        residual_fro=residual, relative_error=residual / norm if norm > 0.0 else 0.0,
        params_in=layer.n_params, params_out=out.n_params if out is not None else 0,
        singular_values=[float(x) for x in sigma], dora=layer.magnitude is not None,
    )
    return out, report


@contextlib.contextmanager
def factor_workers(layers: int) -> Iterator[Executor]:
    """Threads for `resize_layers`, kept until the caller has written what they formed.

    Many small QRs and SVDs: one BLAS thread each, the layers spread over the cores
    (numpy releases the GIL inside LAPACK/BLAS). Leaving on an error drops the work not
    yet started."""
    workers = max(1, min(8, os.cpu_count() or 1, layers))
    with single_threaded_blas(), ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            yield pool
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def resize_layers(layers: Sequence[LoraLayer], policy: RankPolicy, pool: Executor, *, budget: int | None = None,
                  bake: bool = False, dtype: type = np.float64,
                  encode: str | None = None) -> tuple[list[LoraLayer], list[LayerResizeReport]]:
    """Every layer resized by `policy` (or the budget), factors stored as `dtype` or
    encoded (see `resize_layer`); dropped layers have no output.

    The spectra come first, on `pool` (every rank is known before any factor is formed);
    the layers come back at once, their factors `Deferred`, still being formed on `pool`
    in the order of the layers' names (about the order a file lists them), so that the
    caller's writing overlaps them. The caller keeps `pool` (`factor_workers`) until it
    has read them."""
    pairs = list(pool.map(_spectrum, layers))
    ranks = choose_ranks([sigma for _, sigma in pairs], layers, policy, budget)
    written = [k for k in ranks if k > 0]
    bake_alpha = float(max(written, key=lambda k: (written.count(k), -written.index(k)))) if bake and written else None
    done = {i: resize_layer(layers[i], pairs[i][0], pairs[i][1], ranks[i], bake_alpha, dtype, encode, pool)
            for i in sorted(range(len(layers)), key=lambda i: layers[i].name)}
    in_order = [done[i] for i in range(len(layers))]
    return [layer for layer, _ in in_order if layer is not None], [report for _, report in in_order]
