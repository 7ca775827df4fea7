"""One difference matrix D = W_tuned − W_base at a time: its spectrum, the rank a policy
picks, and the balanced factors of the truncation. No file is read or written here.

Exact: numpy's full SVD of D (float64). Randomized: `linalg.randomized` on a sketch of
the rank asked for plus oversampling; its error is still exact, ‖D‖² − Σ kept σ², since the
factors project D onto the kept directions. Both take ‖D‖²_F from D itself, so the energy a
policy keeps is measured against the whole difference, not only what the sketch saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_tools.linalg.randomized import randomized_svd
from lora_tools.linalg.rank_policy import RankPolicy, sv_ratio_rank
from lora_tools.linalg.spectrum import descending

# randomized, no --rank: the sketch keeps at most this many directions
DEFAULT_SKETCH_RANK = 128


@dataclass
class Spectrum:
    """What a policy needs of one difference: its top singular values and ‖D‖²_F."""

    singular_values: np.ndarray  # descending; all min(m, n) of them (exact) or the sketch's
    total_sq: float  # ‖D‖²_F, from D itself
    complete: bool  # the singular values are all of them


@dataclass
class LayerExtractReport:
    """One extracted layer; field names are the JSON keys."""

    name: str
    shape: list[int]  # (rows, cols) of D: (out, in·k)
    diff_fro: float  # ‖D‖_F
    base_fro: float  # ‖W_base‖_F
    relative_diff: float  # ‖D‖_F / ‖W_base‖_F (0.0 for a zero base)
    rank: int
    energy_kept: float  # Σ kept σ² / ‖D‖²
    residual_fro: float  # ‖D − B·A‖_F, exact
    relative_error: float  # residual_fro / diff_fro
    method: str  # "exact" or "randomized"


def sketch_rank(policy: RankPolicy, shape: tuple[int, int]) -> int:
    """How many directions a randomized sketch must find for this policy."""
    return min(policy.rank if policy.rank is not None else DEFAULT_SKETCH_RANK, *shape)


def energy(d: np.ndarray) -> float:
    """‖D‖²_F (one BLAS dot, no squared copy)."""
    flat = d.reshape(-1)
    return float(np.dot(flat, flat))


def spectrum(d: Any, method: str, policy: RankPolicy, seed: int) -> Spectrum:
    """The singular values alone (what `--budget` looks at before any factor is formed)."""
    if not isinstance(d, np.ndarray):
        return decompose(d, method, policy, seed)[0]
    if method == "exact":
        return Spectrum(np.linalg.svd(d, compute_uv=False), energy(d), True)
    _, s, _ = randomized_svd(d, sketch_rank(policy, d.shape), seed=seed)
    return Spectrum(s, energy(d), s.size == min(d.shape))


def decompose(d: Any, method: str, policy: RankPolicy, seed: int,
              k: int | None = None) -> tuple[Spectrum, np.ndarray, np.ndarray, np.ndarray]:
    """(spectrum, u, s, vt): one SVD serves the policy and the factors. A randomized
    sketch finds `k` directions when given (the budget's choice), else the policy's.
    `d` is numpy (the CPU, float64) or a torch tensor on its device (`linalg.device_svd`)."""
    if not isinstance(d, np.ndarray):
        from lora_tools.linalg import device_svd

        shape = (int(d.shape[0]), int(d.shape[1]))
        u, s, vt, total_sq = device_svd.svd(d, None if method == "exact" else
                                            (k if k is not None else sketch_rank(policy, shape)), seed=seed)
        return Spectrum(s, total_sq, method == "exact" or s.size == min(shape)), u, s, vt
    if method == "exact":
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        return Spectrum(s, energy(d), True), u, s, vt
    u, s, vt = randomized_svd(d, k if k is not None else sketch_rank(policy, d.shape), seed=seed)
    return Spectrum(s, energy(d), s.size == min(d.shape)), u, s, vt


def choose_rank(spec: Spectrum, policy: RankPolicy) -> int:
    """The policy's k for this difference, its energy share taken against ‖D‖² (what a
    sketch did not see counts as not kept); capped by `rank` and by what is known."""
    s = descending(spec.singular_values)
    if s.size == 0 or s[0] == 0.0:
        return 0
    if policy.kind == "energy":
        kept = np.cumsum(s**2) / spec.total_sq if spec.total_sq > 0 else np.ones(s.size)
        reached = np.nonzero(kept >= float(policy.value or 0.0) * (1.0 - 1e-12))[0]
        k = int(reached[0]) + 1 if reached.size else s.size
    elif policy.kind == "sv_ratio":
        k = sv_ratio_rank(s, float(policy.value or 1.0))
    else:
        k = s.size
    if policy.rank is not None:
        k = min(k, policy.rank)
    return min(max(k, policy.min_rank, 1), s.size)


def balanced(u: np.ndarray, s: np.ndarray, vt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(b (m, k), a (k, n)): the truncation written balanced, b = U√Σ, a = √ΣVᵀ, so both
    factors stay in a similar range in fp16/bf16 (as resize writes them)."""
    root = np.sqrt(s[:k])
    return u[:, :k] * root, root[:, None] * vt[:k]


def report(name: str, d_shape: tuple[int, int], spec: Spectrum, sigma: np.ndarray, k: int, base_fro: float,
           method: str) -> LayerExtractReport:
    """The layer's figures: exact residual √(Σ discarded σ²) from a full spectrum, else
    √(‖D‖² − Σ kept σ²) (the projection identity of `linalg.randomized`)."""
    kept_sq = float(np.sum(sigma[:k] ** 2))
    if spec.complete and method == "exact":
        residual_sq = float(np.sum(sigma[k:] ** 2))
    else:
        residual_sq = max(spec.total_sq - kept_sq, 0.0)
    diff_fro = math.sqrt(spec.total_sq)
    residual = math.sqrt(residual_sq)
    return LayerExtractReport(
        name=name, shape=list(d_shape), diff_fro=diff_fro, base_fro=base_fro,
        relative_diff=diff_fro / base_fro if base_fro > 0 else 0.0, rank=k,
        energy_kept=kept_sq / spec.total_sq if spec.total_sq > 0 else 1.0, residual_fro=residual,
        relative_error=residual / diff_fro if diff_fro > 0 else 0.0, method=method,
    )
