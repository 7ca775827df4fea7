"""QR factors of tall matrices (m, k), k ≪ m, from their Gram matrices: level-3 BLAS only.

Why not LAPACK's Householder QR everywhere: it is level-2 BLAS, and tall QRs dominated
both `inspect` (8192×16 factors, ~10× slower) and the blend of a 1B model (224 tall QRs
of 8192×24: ~1.5 s on two cores, far worse when OpenBLAS threads compete). Here the Q
of a stacked factor comes from its Gram matrix (CholeskyQR2, Yamamoto et al. 2015, with
eigh instead of Cholesky so that rank-deficient stacks, e.g. an adapter blended with
itself, need no special case), and Householder takes over only where the Gram matrix
has lost the digits. numpy float64; no I/O, no torch.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np

from lora_tools.linalg.tall import Tall, dense
from lora_tools.linalg.tall import gram as tall_gram

# Eigen-directions of XᵀX below this share of the largest are too close to the Gram
# matrix's rounding (≈ k·eps·λ_max) for pass 2 to make them orthogonal: dropped. They
# hold at most 1e-6 of ‖X‖, and a Householder QR takes over unless that is ≈ 0.
_RANK_TOL = 1e-12
# Largest ‖X − Q·R‖_F / ‖X‖_F accepted from the Gram route before Householder is used.
_EXACT_TOL = 1e-13
# Loss of orthogonality of one CholeskyQR pass accepted without a second pass: far
# below float32 rounding (6e-8) of any written factor.
_ORTHO_TOL = 1e-10
_EPS = float(np.finfo(np.float64).eps)
# CholeskyQR's R is exact for the computed Gram matrix, whose rounding (≈ eps·‖X‖²)
# perturbs σ(X)² by eps·σ₁²: fine while κ(XᵀX) stays below this, else Householder.
_CHOLESKY_MAX_CONDITION = 1e6


def _householder(x: Tall) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, I, r) of LAPACK's reduced QR: q (m, min(m, k)) orthonormal, r (min(m, k), k)."""
    q, r = np.linalg.qr(dense(x))
    return q, np.eye(q.shape[1]), r


def orthonormal_factor(
    x: Tall, gram: np.ndarray | None = None, *, complete: bool = False
) -> tuple[Tall, np.ndarray, np.ndarray]:
    """x (m, k) = q·r with q = base·t (m, p) orthonormal and r (p, k).

    Returns (base, t, r) and never forms q unless it must: callers apply q to a small
    matrix as base·(t·small). From XᵀX = V·Λ·Vᵀ: t = V·Λ^(-1/2), r = Λ^(1/2)·Vᵀ, base = X
    (CholeskyQR in eigen form). That q is orthogonal to about k·eps·λ_max/λ_min; when
    that exceeds 1e-10 a second pass on q₁ = X·t (CholeskyQR2) restores orthogonality
    to rounding. A well-conditioned X (complete=False) takes plain CholeskyQR instead,
    t = R⁻¹, r = R, when that provably loses no more (`_cholesky_factor`). `gram` = XᵀX
    when the caller has it. O(m·k²), level-3 BLAS only.

    complete=False: p ≤ k is the numerical rank. Directions with λ < 1e-12·λ_max are
    dropped (rounding noise of the Gram matrix); if X has more than rounding in them, a
    Householder QR is used instead. An all-zero X gives p = 0.
    complete=True: p = min(m, k) always, as a reduced QR has, so q spans more than X's
    range when X is rank-deficient: any dropped direction (or X = 0) means Householder;
    and q orthonormal to rounding (the second pass always runs), as a QR's Q is.
    """
    m, k = x.shape
    if gram is None:
        gram = tall_gram(x)  # (k, k)
    if m == 0 or k == 0:
        return np.zeros((m, 0)), np.zeros((0, 0)), np.zeros((0, k))
    if not complete:
        quick = _cholesky_factor(gram)
        if quick is not None:
            return x, *quick
    lam, vec = np.linalg.eigh(gram)  # ascending
    if complete and (lam[-1] <= 0.0 or not (lam > lam[-1] * _RANK_TOL).all()):
        return _householder(x)
    if lam[-1] <= 0.0:
        return np.zeros((m, 0)), np.zeros((0, 0)), np.zeros((0, k))
    keep = lam > lam[-1] * _RANK_TOL
    if not keep.all():
        dropped = float(np.linalg.norm(x @ vec[:, ~keep]))
        if dropped > _EXACT_TOL * math.sqrt(float(np.trace(gram))):
            return _householder(x)  # near-dependent: (m, k), (k, k)
        lam, vec = lam[keep], vec[:, keep]
    t = vec / np.sqrt(lam)  # (k, p)
    r = np.sqrt(lam)[:, None] * vec.T  # (p, k)
    if not complete and k * _EPS * lam[-1] / lam[0] <= _ORTHO_TOL:
        return x, t, r  # orthogonal to ≤ 1e-10: enough for factors written in float32 or less
    q1 = x @ t  # (m, p)
    lam2, vec2 = np.linalg.eigh(q1.T @ q1)  # ≈ I
    return q1, vec2 / np.sqrt(lam2), (np.sqrt(lam2)[:, None] * vec2.T) @ r


def _cholesky_factor(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(t, r) = (R⁻¹, R) from XᵀX = RᵀR when X·R⁻¹ is orthogonal to `_ORTHO_TOL` without
    a second pass, else None (the eigen route decides). A Cholesky and a k×k inverse cost
    a tenth of `eigh`, which was a third of a 1B resize's spectra. The test is rigorous:
    X·R⁻¹ loses ≈ k·eps·κ(XᵀX) of orthogonality, and for the symmetric G = XᵀX and G⁻¹ =
    R⁻¹R⁻ᵀ the largest eigenvalue is at most the largest absolute row sum (Gershgorin), so
    κ(G) ≤ ‖G‖_∞·‖G⁻¹‖_∞ (within a few times κ for random factors, where a Frobenius
    bound is k times too large and would send them all to `eigh`)."""
    upper = cholesky_r(gram)
    if upper is None:
        return None
    inverse = np.linalg.inv(upper)
    bound = float(np.abs(gram).sum(axis=1).max() * np.abs(inverse @ inverse.T).sum(axis=1).max())
    if not upper.shape[0] * _EPS * bound <= _ORTHO_TOL:
        return None
    return inverse, upper


def cholesky_r(gram: np.ndarray) -> np.ndarray | None:
    """R (r, r), upper triangular with RᵀR = gram, when CholeskyQR may take it: the Gram
    matrix XᵀX of some X (m, r), m ≥ r, well enough conditioned (κ(XᵀX) < 1e6, judged by
    its diagonal and the Cholesky pivots) that R has σ(X) to ≈ eps·κ(XᵀX). None otherwise:
    the caller then needs X itself for a Householder QR (`r_factor`). Split out of
    `r_factor` for callers that get the Gram matrix more cheaply than from X (LoHa's
    Khatri–Rao factors, `hadamard.hadamard_singular_values`)."""
    if gram.size == 0:
        return None
    lower, ok = cholesky_stack(gram[None])
    return cast(np.ndarray, lower[0].T) if ok[0] else None


def cholesky_stack(grams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`cholesky_r`'s test and factor for a stack of Gram matrices (g, r, r), r ≥ 1:
    (L (g, r, r) lower, ok (g,)); where ok is False, L holds nothing to use. The one
    implementation of the test, stacked so that many layers of one shape take a few
    numpy calls (`hadamard.hadamard_spectra`)."""
    diag = np.diagonal(grams, axis1=1, axis2=2)
    low, high = diag.min(axis=1), diag.max(axis=1)
    ok = (low > 0) & (high / np.where(low > 0, low, 1.0) < _CHOLESKY_MAX_CONDITION)
    lower = np.zeros_like(grams)
    indices = np.flatnonzero(ok)
    try:
        lower[indices] = np.linalg.cholesky(grams[indices])
    except np.linalg.LinAlgError:  # one is not positive definite: find it, one by one
        for i in indices:
            try:
                lower[i] = np.linalg.cholesky(grams[i])
            except np.linalg.LinAlgError:
                ok[i] = False
    pivots = np.abs(np.diagonal(lower, axis1=1, axis2=2))
    with np.errstate(divide="ignore", invalid="ignore"):
        ok &= (pivots.max(axis=1) / pivots.min(axis=1)) ** 2 < _CHOLESKY_MAX_CONDITION
    return lower, ok


def r_factor(x: np.ndarray) -> np.ndarray:
    """R of a reduced QR x = Q·R (x (m, r) → R (min(m, r), r)), without Q.

    From the Gram matrix when x is well conditioned (CholeskyQR: XᵀX = LLᵀ, R = Lᵀ;
    one level-3 product, ~10× faster than LAPACK's Householder QR on 8192×16 factors,
    which dominated `inspect` on real adapters), else by Householder QR. Unlike
    `orthonormal_factor` it never drops a direction: σ(R) = σ(x), all r of them.
    """
    m, r = x.shape
    if m >= r:
        upper = cholesky_r(x.T @ x)  # (r, r)
        if upper is not None:
            return upper
    return cast(np.ndarray, np.linalg.qr(x, mode="r"))  # mode="r": R alone, an array
