"""Rank policies for `resize`: how many singular values of each layer's update to keep.

Pure functions of the singular values σ (descending, any float dtype, float64 math), so
they never see a matrix. Per layer: `--rank` (a cap on every policy), `--energy p` (the
smallest k keeping p of Σσ²) and kohya sd-scripts' three dynamic methods under their own
names and semantics (networks/resize_lora.py, `index_sv_ratio/_fro/_cumulative`):

- sv_ratio x:      k = #{i : σᵢ > σ₁/x} (kohya's strict comparison), at least 1;
- sv_fro p:        smallest k with Σ_{i≤k} σᵢ² / Σσ² ≥ p² (√ of the kept σ² share ≥ p);
- sv_cumulative p: smallest k with Σ_{i≤k} σᵢ / Σσ ≥ p (σ, not σ²: kohya's own measure).

kohya also clamps k to len(S) − 1 of the *dense* spectrum (min(m, n) values); here σ has
r values and the clamp is r, the layer's rank. Global: `budget_ranks` (a parameter budget
over all layers, greedy on kept relative energy per parameter; docs/math.md).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lora_tools.errors import RequestError
from lora_tools.linalg.spectrum import descending, energy_rank, share_rank

PER_LAYER = ("energy", "sv_ratio", "sv_fro", "sv_cumulative")


def sv_ratio_rank(singular_values: np.ndarray, ratio: float) -> int:
    """kohya's sv_ratio: the number of σᵢ > σ₁/ratio; 0 for an all-zero spectrum."""
    s = descending(singular_values)
    if s.size == 0 or s[0] == 0.0:
        return 0
    return max(1, int(np.count_nonzero(s > s[0] / ratio)))


def sv_fro_rank(singular_values: np.ndarray, fraction: float) -> int:
    """kohya's sv_fro: smallest k with √(Σ_{i≤k} σᵢ² / Σσ²) ≥ fraction."""
    return share_rank(descending(singular_values) ** 2, fraction**2)


def sv_cumulative_rank(singular_values: np.ndarray, fraction: float) -> int:
    """kohya's sv_cumulative: smallest k with Σ_{i≤k} σᵢ / Σσ ≥ fraction (σ, not σ²)."""
    return share_rank(descending(singular_values), fraction)


@dataclass(frozen=True)
class RankPolicy:
    """One per-layer policy (`kind` in PER_LAYER, or None: the rank alone) with its
    value, a cap `rank` and a floor `min_rank`."""

    kind: str | None = None
    value: float | None = None
    rank: int | None = None
    min_rank: int = 1

    def choose(self, singular_values: np.ndarray) -> int:
        """k for this layer: the policy's rank, capped by `rank` and by r = len(σ),
        floored by `min_rank`; 0 when the update is exactly zero (the layer is dropped)."""
        s = descending(singular_values)
        if s.size == 0 or s[0] == 0.0:
            return 0
        if self.kind is None:
            k = s.size
        elif self.kind == "energy":
            k = energy_rank(s, float(self.value or 0.0))
        elif self.kind == "sv_ratio":
            k = sv_ratio_rank(s, float(self.value or 1.0))
        elif self.kind == "sv_fro":
            k = sv_fro_rank(s, float(self.value or 0.0))
        elif self.kind == "sv_cumulative":
            k = sv_cumulative_rank(s, float(self.value or 0.0))
        else:
            raise ValueError(f"unknown rank policy {self.kind!r}")
        if self.rank is not None:
            k = min(k, self.rank)
        return min(max(k, self.min_rank, 1), s.size)


def policy_from_options(rank: int | None, min_rank: int, chosen: dict[str, float]) -> tuple[RankPolicy, str | None]:
    """The policy the command-line options ask for (`chosen`: the given ones of energy,
    sv_ratio, sv_fro, sv_cumulative, budget) and its kind (None: --rank alone or nothing);
    RequestError for a conflicting or out-of-range one. resize and extract share it."""
    if len(chosen) > 1:
        flags = ", ".join("--" + name.replace("_", "-") for name in chosen)
        raise RequestError(None, f"choose one of these policies, not several (got {flags}); --rank caps any of them")
    for name, value in chosen.items():
        if not np.isfinite(value):
            raise RequestError(None, f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("energy", "sv_fro", "sv_cumulative"):
        if name in chosen and not 0.0 < chosen[name] <= 1.0:
            raise RequestError(None, f"--{name.replace('_', '-')} must lie in (0, 1], got {chosen[name]}")
    if "sv_ratio" in chosen and chosen["sv_ratio"] < 1.0:
        raise RequestError(None, f"--sv-ratio must be ≥ 1 (keep σ > σ₁/x), got {chosen['sv_ratio']}")
    if "budget" in chosen and chosen["budget"] < 1:
        raise RequestError(None, f"--budget must be a positive number of parameters, got {chosen['budget']}")
    if rank is not None and rank < 1:
        raise RequestError(None, f"--rank must be ≥ 1, got {rank}")
    if min_rank < 1:
        raise RequestError(None, f"--min-rank must be ≥ 1, got {min_rank}")
    if rank is not None and min_rank > rank:
        raise RequestError(None, f"--min-rank {min_rank} exceeds --rank {rank}")
    kind = next(iter(chosen), None)
    per_layer = None if kind == "budget" else kind
    return RankPolicy(per_layer, None if per_layer is None else float(chosen[per_layer]), rank, min_rank), kind


def kept_relative_energy(spectra: Sequence[np.ndarray], ranks: Sequence[int]) -> float:
    """Σ over layers of Σ_{i≤kₗ} σᵢ² / Σσ² (each layer's kept share; zero layers count 0)."""
    total = 0.0
    for s, k in zip(spectra, ranks):
        energy = descending(s) ** 2
        if energy.sum() > 0.0:
            total += float(energy[:k].sum() / energy.sum())
    return total


def uniform_ranks(spectra: Sequence[np.ndarray], costs: Sequence[int], budget: int, *, cap: int | None = None,
                  min_rank: int = 1) -> list[int] | None:
    """The largest uniform rank u (kₗ = clamp(u) as `RankPolicy(rank=u)` would give) whose
    parameters fit `budget`; None when not even the floors fit."""
    best = None
    top = max((len(s) for s in spectra), default=0) if cap is None else cap
    for u in range(1, top + 1):
        ranks = [RankPolicy(rank=u, min_rank=min_rank).choose(s) for s in spectra]
        if sum(k * c for k, c in zip(ranks, costs)) > budget:
            break
        best = ranks
    return best


def budget_ranks(spectra: Sequence[np.ndarray], costs: Sequence[int], budget: int, *, cap: int | None = None,
                 min_rank: int = 1) -> list[int]:
    """Ranks kₗ with Σ kₗ·costₗ ≤ budget maximising Σ kept relative energy (costₗ = rows +
    cols: a layer's parameters per rank).

    Every layer starts at its floor (min(min_rank, rₗ); 0 for a zero update). Then greedy:
    the next rank step with the largest marginal relative energy σ²ₖ/‖ΔWₗ‖² per parameter
    is taken if it fits, else that layer stops (its later steps cost the same and gain
    less). Each layer's kept-energy curve is concave in k, so this is within one rank step
    of the fractional-knapsack bound (docs/math.md); the best uniform rank that fits is
    taken instead when it keeps more. Raises ValueError when the floors alone do not fit.
    """
    floor = RankPolicy(rank=min_rank, min_rank=min_rank)
    ranks = [floor.choose(s) for s in spectra]
    used = sum(k * c for k, c in zip(ranks, costs))
    if used > budget:
        raise ValueError(f"the budget {budget} is below the {used} parameters the minimum ranks need")
    shares = []
    for s in spectra:
        energy = descending(s) ** 2
        shares.append(energy / energy.sum() if energy.sum() > 0.0 else np.zeros_like(energy))
    limits = [min(len(s), cap) if cap is not None else len(s) for s in spectra]
    heap = [(-float(shares[i][ranks[i]]) / costs[i], i) for i in range(len(spectra))
            if 0 < ranks[i] < limits[i] and shares[i][ranks[i]] > 0.0]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if used + costs[i] > budget:
            continue
        used += costs[i]
        ranks[i] += 1
        if ranks[i] < limits[i] and shares[i][ranks[i]] > 0.0:
            heapq.heappush(heap, (-float(shares[i][ranks[i]]) / costs[i], i))
    uniform = uniform_ranks(spectra, costs, budget, cap=cap, min_rank=min_rank)
    if uniform is not None and kept_relative_energy(spectra, uniform) > kept_relative_energy(spectra, ranks):
        return uniform
    return ranks
