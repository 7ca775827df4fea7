"""Figures of a singular-value spectrum σ alone (any order, any float dtype): how much
rank the energy needs, and the effective and stable ranks. float64 numpy, O(r log r)."""

from __future__ import annotations

import math

import numpy as np

# At fraction = 1.0 a spectral tail holding less than this share of the energy (σ below
# ~1e-6·‖σ‖, far under fp16/bf16 resolution) is not counted, so rounding cannot add a rank.
_ENERGY_RTOL = 1e-12


def descending(singular_values: np.ndarray) -> np.ndarray:
    """σ as a flat float64 array, sorted descending (callers may pass any order)."""
    return np.sort(np.asarray(singular_values, dtype=np.float64).ravel())[::-1]


def share_rank(values: np.ndarray, share: float) -> int:
    """Smallest k with Σ_{i≤k} vᵢ ≥ share·Σv, for v ≥ 0 sorted descending (σ², or σ for
    kohya's cumulative rule). A relative tolerance of 1e-12 keeps share = 1.0 from
    failing by rounding. 0 for an all-zero or empty v, and for share ≤ 0."""
    cum = np.cumsum(values)
    if cum.size == 0 or cum[-1] == 0.0:
        return 0
    target = share * cum[-1] * (1.0 - _ENERGY_RTOL)
    if target <= 0.0:
        return 0
    return int(np.searchsorted(cum, target, side="left")) + 1


def energy_rank(singular_values: np.ndarray, fraction: float) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ fraction·Σ σᵢ² (σ sorted descending); O(r log r).
    0 for an all-zero or empty spectrum, and for fraction = 0 (see `share_rank`)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"energy fraction must lie in [0, 1], got {fraction}")
    return share_rank(descending(singular_values) ** 2, fraction)


def rank_for_energy(singular_values: np.ndarray, fraction: float) -> int:
    """max(1, energy_rank(σ, fraction)): the smallest rank keeping that share of the
    energy, at least 1 so that a written adapter always has rank ≥ 1."""
    return max(1, energy_rank(singular_values, fraction))


def energy_fraction(singular_values: np.ndarray, k: int) -> float:
    """Σ_{i≤k} σᵢ² / Σ σᵢ² for the k largest σ (k beyond r counts all); 1.0 if all zero."""
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    energy = descending(singular_values) ** 2
    total = float(energy.sum())
    return 1.0 if total == 0.0 else float(energy[:k].sum()) / total


def effective_rank(singular_values: np.ndarray) -> float:
    """Entropy effective rank exp(−Σ pᵢ·log pᵢ), pᵢ = σᵢ/Σσ (Roy & Vetterli 2007).

    Zero σ contribute nothing (0·log 0 = 0). Lies in [1, number of non-zero σ]; 0.0 for
    an all-zero or empty spectrum. O(r).
    """
    s = descending(singular_values)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s[s > 0.0] / total
    return float(math.exp(-float(np.sum(p * np.log(p)))))


def stable_rank(singular_values: np.ndarray) -> float:
    """Stable rank ‖·‖_F² / ‖·‖₂² = Σσ² / σ₁², in [1, rank]; 0.0 for all-zero. O(r)."""
    s = descending(singular_values)
    if s.size == 0 or s[0] == 0.0:
        return 0.0
    return float(np.sum((s / s[0]) ** 2))
