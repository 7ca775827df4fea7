"""Pure math on factored low-rank updates ΔW = scale·B·A, never forming the dense matrix.

B is (m, r) and A is (r, n) with r ≪ m, n. Everything here costs O((m+n)·r²) or less,
instead of O(m·n·min(m, n)) for a dense SVD. Inputs may be any float dtype (float16,
float32, float64 numpy arrays); all arithmetic is float64 and results are float64.
The QRs come from qr.py; figures of a spectrum alone are in spectrum.py.
No I/O, no printing, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lora_tools.linalg.qr import orthonormal_factor, r_factor
from lora_tools.linalg.spectrum import rank_for_energy
from lora_tools.linalg.tall import Tall, as_tall, times

# The Gram sum for ‖BA‖_F² carries a rounding error ≈ eps·(Σᵢ‖bᵢ‖‖aᵢ‖)²; below this share
# of that bound cancellation has eaten too many digits and a QR-based norm is used instead.
GRAM_CANCELLATION = 1e-4


def _factors(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """b (m, r) and a (r, n) as float64, checked to chain."""
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"factors do not chain: b {b.shape} · a {a.shape}")
    return b, a


def _core(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """R_B·R_Aᵀ, (min(m,r), min(n,r)): with B = Q_B·R_B and Aᵀ = Q_A·R_A (reduced QR),
    B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ and the Q's are orthonormal, so the core has BA's
    singular values and Frobenius norm. Needs m, n, r ≥ 1. O((m+n)·r²)."""
    return r_factor(b) @ r_factor(a.T).T


@dataclass
class FactorSVD:
    """B·A = (base_b·left)·diag(s)·(base_a·rightᵀ)ᵀ, the tall products not yet formed.

    base_b (m, ·) and base_a (n, ·) are tall (`linalg.tall`: often the factors
    themselves), left (·, t), s (t,) descending, right (t, ·); t is the numerical rank,
    or min(m, n, k) from `complete`. Holding this instead of U and V costs only r×r
    matrices, so a caller can look at every layer's spectrum before it forms anything.
    """

    base_b: Tall
    left: np.ndarray
    s: np.ndarray
    right: np.ndarray
    base_a: Tall

    def balanced_sides(self, keep: int, *, scale_b: float = 1.0,
                       scale_a: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """The small matrices that give the rank-`keep` truncation's balanced factors from
        the tall bases: b = base_b·small_b = scale_b·U·√S, a = (base_a·small_a)ᵀ = scale_a·√S·Vᵀ.
        keep ≤ t."""
        root = np.sqrt(self.s[:keep])
        return self.left[:, :keep] * (scale_b * root), self.right[:keep].T * (scale_a * root)

    def balanced(self, keep: int, dtype: type = np.float64, *, scale_b: float = 1.0,
                 scale_a: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """The rank-`keep` truncation as b = scale_b·U·√S (m, keep) and a = scale_a·√S·Vᵀ
        (keep, n), C-ordered, computed in float64 and stored as `dtype`. keep ≤ t."""
        small_b, small_a = self.balanced_sides(keep, scale_b=scale_b, scale_a=scale_a)
        return times(self.base_b, small_b, dtype), times(self.base_a, small_a, dtype, transposed=True)


def svd_of_factors(
    b: Tall,
    a_t: Tall,
    gram_b: np.ndarray | None = None,
    gram_a: np.ndarray | None = None,
    complete: bool = False,
) -> FactorSVD:
    """The SVD of B·A for B (m, k) and a_t = Aᵀ (n, k), either a `Tall` (an array of any
    float dtype is used as float64 without a widened copy); gram_b = BᵀB and gram_a = AAᵀ
    when the caller has them.

    B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ with the factors of `orthonormal_factor`, so the SVD of
    the small core is that of the product; the tall products are left to the caller,
    which forms only the columns it keeps. t is the numerical rank, or min(m, n, k)
    with `complete` (see orthonormal_factor).
    """
    b, a_t = as_tall(b), as_tall(a_t)
    if b.shape[1] != a_t.shape[1]:
        raise ValueError(f"factors do not chain: b {b.shape} · a {(a_t.shape[1], a_t.shape[0])}")
    q1_b, w_b, r_b = orthonormal_factor(b, gram_b, complete=complete)  # (m, ·), (·, p), (p, k)
    q1_a, w_a, r_a = orthonormal_factor(a_t, gram_a, complete=complete)  # (n, ·), (·, q), (q, k)
    if r_b.shape[0] == 0 or r_a.shape[0] == 0:
        return FactorSVD(np.zeros((b.shape[0], 0)), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)),
                         np.zeros((a_t.shape[0], 0)))
    u_c, s, vt_c = np.linalg.svd(r_b @ r_a.T, full_matrices=False)  # (p, t), (t,), (t, q)
    return FactorSVD(q1_b, w_b @ u_c, s, vt_c @ w_a.T, q1_a)


def factored_svd(
    b: np.ndarray, a: np.ndarray, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compact SVD of scale·B·A from its factors: (u (m, k), s (k,), vt (k, n)).

    Contract: k = min(m, n, r); s is descending and ≥ 0 (|scale| goes into s, its sign
    into u); u and vt have orthonormal columns / rows even when BA is rank-deficient
    (then the trailing s are ~0), as a reduced QR would give. Identity: B·A =
    Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, so with R_B·R_Aᵀ = U_c·S·V_cᵀ, u = Q_B·U_c and vt = V_cᵀ·Q_Aᵀ;
    the Q's come from `orthonormal_factor(complete=True)` (Gram route, Householder when
    a side is rank-deficient). Cost O((m+n)·r² + r³). For k = 0 (r = 0, or an empty
    side) returns empty arrays of shapes (m, 0), (0,), (0, n). `truncate` is the same
    SVD limited to the numerical rank.
    """
    b, a = _factors(b, a)
    (m, r), n = b.shape, a.shape[1]
    if min(m, n, r) == 0:
        return np.zeros((m, 0)), np.zeros(0), np.zeros((0, n))
    parts = svd_of_factors(b, a.T, complete=True)
    sign = -1.0 if scale < 0 else 1.0
    return sign * (parts.base_b @ parts.left), abs(scale) * parts.s, (parts.base_a @ parts.right.T).T


def singular_values(b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Descending singular values of scale·B·A, exactly r of them (zero-padded when
    r > min(m, n)). σ(BA) = σ(R_B·R_Aᵀ) via r_factor; O((m+n)·r² + r³), no U or V formed.
    When r ≥ min(m, n), B·A is no larger than its factors (a full LoKr side is W·I) and
    its own SVD is the cheaper route, to the same rounding (≈ eps·‖B‖·‖A‖)."""
    b, a = _factors(b, a)
    (m, r), n = b.shape, a.shape[1]
    if min(m, n, r) == 0:
        return np.zeros(r)
    return padded_singular_values(b @ a if r >= min(m, n) else _core(b, a), r, scale)


def padded_singular_values(core: np.ndarray, r: int, scale: float) -> np.ndarray:
    """|scale|·σ(core), descending, zero-padded to r: a matrix with B·A's singular values
    (B·A itself, or the core R_B·R_Aᵀ) to those of scale·B·A, r of them."""
    out = np.zeros(r)
    s = np.linalg.svd(core, compute_uv=False)
    out[: s.size] = abs(scale) * s
    return out


def kron_singular_values(
    side1: tuple[np.ndarray, np.ndarray], side2: tuple[np.ndarray, np.ndarray], scale: float = 1.0
) -> np.ndarray:
    """Descending singular values of scale·kron(U₁V₁, U₂V₂), as many as U₁V₁'s factor rank
    times U₂V₂'s: σ(X⊗Y) = {σᵢ(X)·σⱼ(Y)} (Kronecker products of the two SVDs are an SVD),
    each side's σ from its factors (`singular_values`). O(cost of the two sides), never
    the product: what makes LyCORIS' LoKr cheap to inspect."""
    s1 = singular_values(*side1)
    s2 = singular_values(*side2)
    return np.sort(np.outer(s1, s2).ravel())[::-1] * abs(scale)


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
    if gram < GRAM_CANCELLATION * bound:  # bound > 0 here, so m, n, r ≥ 1
        return abs(scale) * float(np.linalg.norm(_core(b, a)))
    return abs(scale) * math.sqrt(max(gram, 0.0))


def spectral_norm(b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> float:
    """‖scale·B·A‖₂ = σ₁(R_B·R_Aᵀ)·|scale| via QR; O((m+n)·r² + r³). 0.0 when r = 0."""
    s = singular_values(b, a, scale)
    return float(s[0]) if s.size else 0.0


def inner_product(
    b1: np.ndarray, a1: np.ndarray, b2: np.ndarray, a2: np.ndarray, scale1: float = 1.0, scale2: float = 1.0
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
    b1: np.ndarray, a1: np.ndarray, b2: np.ndarray, a2: np.ndarray, scale1: float = 1.0, scale2: float = 1.0
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
    singular_values: np.ndarray  # all r of B·A, descending, zero past the numerical rank
    energy_kept: float  # Σ_{i≤R} σᵢ² / Σ σᵢ²; 1.0 when B·A = 0
    residual_fro: float  # ‖B·A − b·a‖_F = sqrt(Σ_{i>R} σᵢ²)
    total_fro: float  # ‖B·A‖_F = sqrt(Σ σᵢ²)
    kept_fro: float  # ‖b·a‖_F = sqrt(Σ_{i≤R} σᵢ²)


def truncate(
    b: Tall,
    a_t: Tall,
    rank: int | None = None,
    *,
    energy: float | None = None,
    pad: bool = True,
    gram_b: np.ndarray | None = None,
    gram_a: np.ndarray | None = None,
) -> TruncationResult:
    """Best rank-R approximation of B·A in Frobenius and spectral norm (Eckart–Young).

    Both factors come as tall matrices, B (m, r) and a_t = Aᵀ (n, r) (note: A
    transposed), each an array or a Stack of blocks (what a blend holds); gram_b = BᵀB
    and gram_a = AAᵀ (r, r) when the caller has them. From the SVD of B·A limited to its
    numerical rank t (`svd_of_factors`, Gram route): R = min(rank, t), further capped
    by `energy` (the smallest rank keeping that share of ‖BA‖_F², at least 1), and
    b = U_R·√S_R (m, R), a = √S_R·Vt_R (R, n), so b·a = U_R·S_R·Vt_R. The singular values
    are split evenly between the factors so that both stay in a similar numeric range
    (‖b‖₂ = ‖a‖₂ = √σ₁), which is what survives storage in fp16/bf16 best. With `pad`
    and a `rank`, b and a get exactly `rank` columns / rows, zero beyond the R kept;
    without it they have R. rank=None keeps all t. Cost O((m+n)·r² + r³).
    """
    if rank is not None and rank < 0:
        raise ValueError(f"rank must be ≥ 0, got {rank}")
    parts = svd_of_factors(b, a_t, gram_b, gram_a)
    s = parts.s
    keep = s.size if rank is None else min(rank, s.size)
    if energy is not None:
        keep = min(keep, rank_for_energy(s, energy))
    energies = s**2
    total_sq, kept_sq = float(energies.sum()), float(energies[:keep].sum())
    b_out, a_out = parts.balanced(keep)  # (m, R), (R, n)
    if pad and rank is not None and rank > keep:
        b_out = np.concatenate([b_out, np.zeros((b_out.shape[0], rank - keep))], axis=1)  # (m, rank)
        a_out = np.concatenate([a_out, np.zeros((rank - keep, a_out.shape[1]))], axis=0)  # (rank, n)
    all_s = np.zeros(b.shape[1])
    all_s[: s.size] = s
    return TruncationResult(
        b=b_out,
        a=a_out,
        singular_values=all_s,
        energy_kept=1.0 if total_sq == 0.0 else kept_sq / total_sq,
        residual_fro=math.sqrt(float(energies[keep:].sum())),
        total_fro=math.sqrt(total_sq),
        kept_fro=math.sqrt(kept_sq),
    )
