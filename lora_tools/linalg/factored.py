"""Pure math on factored low-rank updates ΔW = scale·B·A, never forming the dense matrix.

B is (m, r) and A is (r, n) with r ≪ m, n. Everything here costs O((m+n)·r²) or less,
instead of O(m·n·min(m, n)) for a dense SVD. Inputs may be any float dtype (float16,
float32, float64 numpy arrays); all arithmetic is float64 and results are float64.
No I/O, no printing, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# At fraction = 1.0 a spectral tail holding less than this share of the energy (σ below
# ~1e-6·‖σ‖, far under fp16/bf16 resolution) is not counted, so rounding cannot add a rank.
_ENERGY_RTOL = 1e-12
# The Gram sum for ‖BA‖_F² carries a rounding error ≈ eps·(Σᵢ‖bᵢ‖‖aᵢ‖)²; below this share
# of that bound cancellation has eaten too many digits and the QR core is used instead.
_GRAM_CANCELLATION = 1e-4


def _factors(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """b (m, r) and a (r, n) as float64, checked to chain."""
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"factors do not chain: b {b.shape} · a {a.shape}")
    return b, a


# CholeskyQR's R is exact for the computed Gram matrix, whose rounding (≈ eps·‖X‖²)
# perturbs σ(X)² by eps·σ₁²: fine while κ(XᵀX) stays below this, else Householder.
_CHOLESKY_MAX_CONDITION = 1e6


def _r_factor(x: np.ndarray) -> np.ndarray:
    """R of a reduced QR x = Q·R (x (m, r) → R (min(m, r), r)).

    From the Gram matrix when x is well conditioned (CholeskyQR: XᵀX = LLᵀ, R = Lᵀ;
    one level-3 product, ~10× faster than LAPACK's Householder QR on 8192×16 factors,
    which dominated `inspect` on real adapters), else by Householder QR.
    """
    m, r = x.shape
    if m >= r:
        gram = x.T @ x  # (r, r)
        diag = np.diag(gram)
        if diag.min() > 0 and diag.max() / diag.min() < _CHOLESKY_MAX_CONDITION:
            try:
                lower = np.linalg.cholesky(gram)
            except np.linalg.LinAlgError:
                lower = None
            if lower is not None:
                pivots = np.abs(np.diag(lower))
                if (pivots.max() / pivots.min()) ** 2 < _CHOLESKY_MAX_CONDITION:
                    return lower.T
    return np.linalg.qr(x, mode="r")


def _core(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """R_B·R_Aᵀ, (min(m,r), min(n,r)): with B = Q_B·R_B and Aᵀ = Q_A·R_A (reduced QR),
    B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ and the Q's are orthonormal, so the core has BA's
    singular values and Frobenius norm. Needs m, n, r ≥ 1. O((m+n)·r²)."""
    return _r_factor(b) @ _r_factor(a.T).T


def factored_svd(
    b: np.ndarray, a: np.ndarray, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compact SVD of scale·B·A from its factors: (u (m, k), s (k,), vt (k, n)).

    k = min(m, n, r); s is descending and ≥ 0 (|scale| goes into s, its sign into u);
    u and vt have orthonormal columns / rows even when BA is rank-deficient (then the
    trailing s are ~0). Identity: B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, so with R_B·R_Aᵀ = U_c·S·V_cᵀ,
    u = Q_B·U_c and vt = V_cᵀ·Q_Aᵀ. Cost O((m+n)·r² + r³). For k = 0 (r = 0, or an
    empty side) returns empty arrays of shapes (m, 0), (0,), (0, n).
    """
    b, a = _factors(b, a)
    (m, r), n = b.shape, a.shape[1]
    k = min(m, n, r)
    if k == 0:
        return np.zeros((m, 0)), np.zeros(0), np.zeros((0, n))
    q_b, r_b = np.linalg.qr(b)  # (m, p), (p, r), p = min(m, r)
    q_a, r_a = np.linalg.qr(a.T)  # (n, q), (q, r), q = min(n, r)
    u_c, s, vt_c = np.linalg.svd(r_b @ r_a.T, full_matrices=False)  # (p, k), (k,), (k, q)
    sign = -1.0 if scale < 0 else 1.0
    return sign * (q_b @ u_c), abs(scale) * s, vt_c @ q_a.T


def singular_values(b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Descending singular values of scale·B·A, exactly r of them (zero-padded when
    r > min(m, n)). σ(BA) = σ(R_B·R_Aᵀ) via QR; O((m+n)·r² + r³), no U or V formed."""
    b, a = _factors(b, a)
    (m, r), n = b.shape, a.shape[1]
    out = np.zeros(r)
    if min(m, n, r) > 0:
        s = np.linalg.svd(_core(b, a), compute_uv=False)
        out[: s.size] = abs(scale) * s
    return out


def frobenius_norm(b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> float:
    """‖scale·B·A‖_F from Gram matrices: ‖BA‖_F² = Σᵢⱼ (BᵀB)ᵢⱼ·(AAᵀ)ᵢⱼ; O((m+n)·r²).

    Rounding below zero is clamped. When the factors nearly cancel (‖BA‖ ≪ Σᵢ‖bᵢ‖‖aᵢ‖,
    e.g. duplicated columns of B against opposite rows of A) the Gram sum loses about
    twice as many digits as the dense product would, so the norm is then taken from the
    QR core, ‖BA‖_F = ‖R_B·R_Aᵀ‖_F, accurate to ≈ eps·‖B‖·‖A‖.
    """
    b, a = _factors(b, a)
    gram = float(np.sum((b.T @ b) * (a @ a.T)))
    bound = float(np.sum(np.linalg.norm(b, axis=0) * np.linalg.norm(a, axis=1))) ** 2
    if gram < _GRAM_CANCELLATION * bound:  # bound > 0 here, so m, n, r ≥ 1
        return abs(scale) * float(np.linalg.norm(_core(b, a)))
    return abs(scale) * math.sqrt(max(gram, 0.0))


def spectral_norm(b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> float:
    """‖scale·B·A‖₂ = σ₁(R_B·R_Aᵀ)·|scale| via QR; O((m+n)·r² + r³). 0.0 when r = 0."""
    s = singular_values(b, a, scale)
    return float(s[0]) if s.size else 0.0


def inner_product(
    b1: np.ndarray,
    a1: np.ndarray,
    b2: np.ndarray,
    a2: np.ndarray,
    scale1: float = 1.0,
    scale2: float = 1.0,
) -> float:
    """Frobenius inner product ⟨s₁·B₁A₁, s₂·B₂A₂⟩ = s₁s₂·Σᵢⱼ (B₁ᵀB₂)ᵢⱼ·(A₁A₂ᵀ)ᵢⱼ.

    B₁ (m, r₁), A₁ (r₁, n), B₂ (m, r₂), A₂ (r₂, n); the ranks may differ.
    Cost O((m+n)·r₁·r₂). Absolute error ≈ eps·|s₁s₂|·‖B₁‖‖A₁‖‖B₂‖‖A₂‖.
    """
    b1, a1 = _factors(b1, a1)
    b2, a2 = _factors(b2, a2)
    if b1.shape[0] != b2.shape[0] or a1.shape[1] != a2.shape[1]:
        raise ValueError(
            f"updates differ in shape: {(b1.shape[0], a1.shape[1])} vs {(b2.shape[0], a2.shape[1])}"
        )
    return scale1 * scale2 * float(np.sum((b1.T @ b2) * (a1 @ a2.T)))


def cosine_similarity(
    b1: np.ndarray,
    a1: np.ndarray,
    b2: np.ndarray,
    a2: np.ndarray,
    scale1: float = 1.0,
    scale2: float = 1.0,
) -> float:
    """⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F·‖ΔW₂‖_F), clipped to [-1, 1]; O((m+n)·(r₁+r₂)²).

    Defined as 0.0 when either update is exactly zero (zero factors or scale): a zero
    update points nowhere, and 0.0 keeps tables and JSON free of NaN. For updates whose
    factors nearly cancel, the value is as ill-conditioned as the update is small.
    """
    norm1 = frobenius_norm(b1, a1, scale1)
    norm2 = frobenius_norm(b2, a2, scale2)
    if norm1 == 0.0 or norm2 == 0.0:
        return 0.0
    cos = inner_product(b1, a1, b2, a2, scale1, scale2) / (norm1 * norm2)
    return float(min(1.0, max(-1.0, cos)))


def _spectrum(singular_values: np.ndarray) -> np.ndarray:
    """σ as a flat float64 array, sorted descending (callers may pass any order)."""
    return np.sort(np.asarray(singular_values, dtype=np.float64).ravel())[::-1]


def energy_rank(singular_values: np.ndarray, fraction: float) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ fraction·Σ σᵢ² (σ sorted descending); O(r log r).

    A relative tolerance of 1e-12 on the energy keeps fraction = 1.0 from failing by
    rounding. 0 for an all-zero or empty spectrum, and for fraction = 0.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"energy fraction must lie in [0, 1], got {fraction}")
    cum = np.cumsum(_spectrum(singular_values) ** 2)
    if cum.size == 0 or cum[-1] == 0.0:
        return 0
    target = fraction * cum[-1] * (1.0 - _ENERGY_RTOL)
    if target <= 0.0:
        return 0
    return int(np.searchsorted(cum, target, side="left")) + 1


def rank_for_energy(singular_values: np.ndarray, fraction: float) -> int:
    """max(1, energy_rank(σ, fraction)): the smallest rank keeping that share of the
    energy, at least 1 so that a written adapter always has rank ≥ 1."""
    return max(1, energy_rank(singular_values, fraction))


def energy_fraction(singular_values: np.ndarray, k: int) -> float:
    """Σ_{i≤k} σᵢ² / Σ σᵢ² for the k largest σ (k beyond r counts all); 1.0 if all zero."""
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    energy = _spectrum(singular_values) ** 2
    total = float(energy.sum())
    return 1.0 if total == 0.0 else float(energy[:k].sum()) / total


def effective_rank(singular_values: np.ndarray) -> float:
    """Entropy effective rank exp(−Σ pᵢ·log pᵢ), pᵢ = σᵢ/Σσ (Roy & Vetterli 2007).

    Zero σ contribute nothing (0·log 0 = 0). Lies in [1, number of non-zero σ]; 0.0 for
    an all-zero or empty spectrum. O(r).
    """
    s = _spectrum(singular_values)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s[s > 0.0] / total
    return float(math.exp(-float(np.sum(p * np.log(p)))))


def stable_rank(singular_values: np.ndarray) -> float:
    """Stable rank ‖·‖_F² / ‖·‖₂² = Σσ² / σ₁², in [1, rank]; 0.0 for all-zero. O(r)."""
    s = _spectrum(singular_values)
    if s.size == 0 or s[0] == 0.0:
        return 0.0
    return float(np.sum((s / s[0]) ** 2))


def concat_factors(
    terms: Sequence[tuple[np.ndarray, np.ndarray, float]],
) -> tuple[np.ndarray, np.ndarray]:
    """Exact weighted sum of updates as one factored update: Σ cᵢ·Bᵢ·Aᵢ = B_cat·A_cat.

    terms: (bᵢ (m, rᵢ), aᵢ (rᵢ, n), cᵢ). Returns B_cat = [c₁B₁ | c₂B₂ | …] (m, Σrᵢ) and
    A_cat = [A₁; A₂; …] (Σrᵢ, n), float64. No approximation; O((m+n)·Σrᵢ).
    Raises ValueError for no terms or when the m's or n's differ.
    """
    if not terms:
        raise ValueError("concat_factors needs at least one term")
    pairs = [(*_factors(b, a), float(c)) for b, a, c in terms]
    shapes = {(b.shape[0], a.shape[1]) for b, a, _ in pairs}
    if len(shapes) != 1:
        raise ValueError(f"updates differ in shape (m, n): {sorted(shapes)}")
    b_cat = np.concatenate([c * b for b, _, c in pairs], axis=1)  # (m, Σr)
    a_cat = np.concatenate([a for _, a, _ in pairs], axis=0)  # (Σr, n)
    return b_cat, a_cat


@dataclass
class TruncationResult:
    """The best rank-R approximation b·a of B·A, and what it kept."""

    b: np.ndarray  # (m, R)
    a: np.ndarray  # (R, n)
    singular_values: np.ndarray  # all r of B·A, descending (zero-padded like singular_values())
    energy_kept: float  # Σ_{i≤R} σᵢ² / Σ σᵢ²; 1.0 when B·A = 0
    residual_fro: float  # ‖B·A − b·a‖_F = sqrt(Σ_{i>R} σᵢ²)


def truncate(b: np.ndarray, a: np.ndarray, rank: int) -> TruncationResult:
    """Best rank-R approximation of B·A in Frobenius and spectral norm (Eckart–Young).

    From factored_svd: b = U_R·√S_R (m, R), a = √S_R·Vt_R (R, n), so b·a = U_R·S_R·Vt_R.
    The singular values are split evenly between the factors so that both stay in a
    similar numeric range (‖b‖₂ = ‖a‖₂ = √σ₁), which is what survives storage in
    fp16/bf16 best. If R exceeds the rank available (min(m, n, r)), b and a are padded
    with zero columns/rows so they have exactly R of them; those add nothing to b·a.
    Cost O((m+n)·r² + r³).
    """
    if rank < 0:
        raise ValueError(f"rank must be ≥ 0, got {rank}")
    u, s, vt = factored_svd(b, a)  # (m, k), (k,), (k, n)
    m, n, k = u.shape[0], vt.shape[1], s.size
    kept = min(rank, k)
    root = np.sqrt(s[:kept])
    b_out = np.zeros((m, rank))
    a_out = np.zeros((rank, n))
    b_out[:, :kept] = u[:, :kept] * root  # (m, kept)
    a_out[:kept] = root[:, None] * vt[:kept]  # (kept, n)
    all_s = np.zeros(np.shape(a)[0])
    all_s[:k] = s
    energy = all_s**2
    total = float(energy.sum())
    return TruncationResult(
        b=b_out,
        a=a_out,
        singular_values=all_s,
        energy_kept=1.0 if total == 0.0 else float(energy[:rank].sum()) / total,
        residual_fro=math.sqrt(float(energy[rank:].sum())),
    )
