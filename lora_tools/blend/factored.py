"""The factored blend math: weighted sums of low-rank updates, their best rank-R
approximation, and the cosines between inputs, from factors only (numpy float64).

Why not `lowrank.truncate` as is: it takes Householder QRs (LAPACK, level-2 BLAS),
which dominate the blend of a 1B model (224 tall QRs of 8192×24: ~1.5 s on two cores,
far worse when OpenBLAS threads compete). Here the QR of a stacked factor comes from
its Gram matrix (CholeskyQR2, Yamamoto et al. 2015, with eigh instead of Cholesky so
that rank-deficient stacks, e.g. an adapter blended with itself, need no special case):
level-3 BLAS only, orthogonal to rounding after the second pass, and checked against a
Householder QR whenever a direction had to be dropped. The same Gram matrices give
every input's ‖ΔWᵢ‖ and every ⟨ΔWᵢ, ΔWⱼ⟩ for free (the identity of
`lowrank.inner_product`); the identities are tested against `lowrank` and dense SVDs.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lora_tools.linalg import factored as lowrank
from lora_tools.adapter import LoraLayer

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
# Gram sums below this share of their rounding bound have lost their digits to
# cancellation (see lowrank._GRAM_CANCELLATION): such norms come from lowrank instead.
_CANCELLATION = 1e-4


# OpenBLAS entry points to get/set its thread count, as numpy's wheels (scipy-openblas,
# 64-bit ints) and system builds name them.
_OPENBLAS_THREADS = [
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
]


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the block with numpy's OpenBLAS on one thread, and restore it after.

    Why: a factored blend is thousands of small products (8192×24 by 24×24), for which
    OpenBLAS's thread hand-offs cost more than they save: equal on an idle two-core
    machine, 2-3× slower on a busy one (its threads spin-wait). OPENBLAS_NUM_THREADS
    only acts before numpy's import, so the thread count is set through the library's
    own API (found in the process's loaded libraries, as threadpoolctl does). Anything
    else (another BLAS, another OS) is left as it is.
    """
    controls = []
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            for get_name, set_name in _OPENBLAS_THREADS:
                if hasattr(lib, get_name) and hasattr(lib, set_name):
                    getter, setter = getattr(lib, get_name), getattr(lib, set_name)
                    getter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
                    controls.append((setter, getter()))
                    setter(1)
                    break
    try:
        yield
    finally:
        for setter, threads in controls:
            setter(threads)


@dataclass
class Term:
    """One input's contribution to one layer: weight · scale · B·A."""

    index: int  # position of the input on the command line
    layer: LoraLayer
    weight: float

    @property
    def coefficient(self) -> float:
        """c = w·s: the input's weight with its own scale rule (alpha/r, rsLoRA, patterns) folded in."""
        return self.weight * self.layer.scale

    @cached_property
    def b(self) -> np.ndarray:
        return np.asarray(self.layer.b_matrix, dtype=np.float64)  # (out, r)

    @cached_property
    def a(self) -> np.ndarray:
        return np.asarray(self.layer.a_matrix, dtype=np.float64)  # (r, in·k)


class Stack:
    """X = [c₁·X₁ | c₂·X₂ | …] (m, Σkᵢ), kept as its blocks: the tall side of a blend.

    Copying 8192×24 factors side by side costs as much as their Gram product (rows of a
    C-ordered array are short), so X is only ever applied to small matrices, block by
    block, with the coefficients moved onto the small side.
    """

    def __init__(self, blocks: Sequence[np.ndarray], coefficients: Sequence[float]) -> None:
        self.blocks = list(blocks)  # each (m, kᵢ)
        self.coefficients = [float(c) for c in coefficients]
        self.edges = np.cumsum([0] + [blk.shape[1] for blk in self.blocks])
        self.shape = (self.blocks[0].shape[0], int(self.edges[-1]))

    def __matmul__(self, small: np.ndarray) -> np.ndarray:
        """X·small (m, j) = Σ Xᵢ·(cᵢ·smallᵢ); O(m·k·j)."""
        out = None
        for blk, c, lo, hi in zip(self.blocks, self.coefficients, self.edges[:-1], self.edges[1:]):
            part = blk @ (c * small[lo:hi])
            out = part if out is None else out + part
        assert out is not None
        return out

    def dense(self) -> np.ndarray:
        return np.concatenate([c * blk for blk, c in zip(self.blocks, self.coefficients)], axis=1)


@dataclass
class FactoredBlend:
    """One layer's blended factors (b (m, R), a (R, n), product = ΔW_out) and figures."""

    b: np.ndarray
    a: np.ndarray
    energy_kept: float | None  # share of ‖Σ wᵢΔWᵢ‖² in b·a (None: linear, not a truncation)
    residual_fro: float  # ‖b·a − Σ wᵢΔWᵢ‖_F
    sum_norm: float  # ‖Σ wᵢΔWᵢ‖_F
    out_norm: float  # ‖b·a‖_F
    cosines: dict[tuple[int, int], float]  # (i, j) input positions -> cos(ΔWᵢ, ΔWⱼ)
    norms: dict[int, float]  # input position -> ‖ΔWᵢ‖_F (unweighted)


def orthonormal_factor(x: np.ndarray | Stack, gram: np.ndarray | None = None) -> tuple[np.ndarray | Stack, np.ndarray, np.ndarray]:
    """x (m, k) = q·r with q = base·t (m, p) orthonormal, r (p, k), p ≤ k the numerical rank.

    Returns (base, t, r) and never forms q unless it must: callers apply q to a small
    matrix as base·(t·small). From XᵀX = V·Λ·Vᵀ: t = V·Λ^(-1/2), r = Λ^(1/2)·Vᵀ, base = X
    (CholeskyQR in eigen form). That q is orthogonal to about k·eps·λ_max/λ_min; when
    that exceeds 1e-10 a second pass on q₁ = X·t (CholeskyQR2) restores orthogonality
    to rounding. Directions with λ < 1e-12·λ_max are dropped (rounding noise of the
    Gram matrix); if X has more than rounding in them, a Householder QR is used instead.
    `gram` = XᵀX when the caller has it. O(m·k²), level-3 BLAS only.
    """
    m, k = x.shape
    if gram is None:
        x = x.dense() if isinstance(x, Stack) else x
        gram = x.T @ x  # (k, k)
    if m == 0 or k == 0:
        return np.zeros((m, 0)), np.zeros((0, 0)), np.zeros((0, k))
    lam, vec = np.linalg.eigh(gram)  # ascending
    if lam[-1] <= 0.0:
        return np.zeros((m, 0)), np.zeros((0, 0)), np.zeros((0, k))
    keep = lam > lam[-1] * _RANK_TOL
    if not keep.all():
        dropped = float(np.linalg.norm(x @ vec[:, ~keep]))
        if dropped > _EXACT_TOL * math.sqrt(float(np.trace(gram))):
            q, r = np.linalg.qr(x.dense() if isinstance(x, Stack) else x)  # near-dependent: (m, k), (k, k)
            return q, np.eye(q.shape[1]), r
        lam, vec = lam[keep], vec[:, keep]
    t = vec / np.sqrt(lam)  # (k, p)
    r = np.sqrt(lam)[:, None] * vec.T  # (p, k)
    if k * _EPS * lam[-1] / lam[0] <= _ORTHO_TOL:
        return x, t, r
    q1 = x @ t  # (m, p)
    lam2, vec2 = np.linalg.eigh(q1.T @ q1)  # ≈ I
    return q1, vec2 / np.sqrt(lam2), (np.sqrt(lam2)[:, None] * vec2.T) @ r


def _svd_parts(
    b: np.ndarray | Stack, a_t: np.ndarray | Stack, gram_b: np.ndarray | None = None, gram_a: np.ndarray | None = None
) -> tuple[np.ndarray | Stack, np.ndarray, np.ndarray, np.ndarray, np.ndarray | Stack]:
    """B·A = (base_B·L)·diag(s)·(base_A·Rtᵀ)ᵀ for B (m, k) and a_t = Aᵀ (n, k): returns
    base_B (m, ·), L (·, t), s (t,), Rt (t, ·), base_A (n, ·).

    B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ with the factors of `orthonormal_factor`, so the SVD of
    the small core is that of the product; the tall products are left to the caller,
    which forms only the R columns it keeps.
    """
    q1_b, w_b, r_b = orthonormal_factor(b, gram_b)  # (m, ·), (·, p), (p, k)
    q1_a, w_a, r_a = orthonormal_factor(a_t, gram_a)  # (n, ·), (·, q), (q, k)
    if r_b.shape[0] == 0 or r_a.shape[0] == 0:
        return np.zeros((b.shape[0], 0)), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)), np.zeros((a_t.shape[0], 0))
    u_c, s, vt_c = np.linalg.svd(r_b @ r_a.T, full_matrices=False)  # (p, t), (t,), (t, q)
    return q1_b, w_b @ u_c, s, vt_c @ w_a.T, q1_a


def factored_svd(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compact SVD of B·A (B (m, k), A (k, n)): u (m, t), s (t,) descending, vt (t, n).

    Same result as lowrank.factored_svd, through Gram matrices instead of Householder
    QRs. O((m+n)·k² + k³), no m×n matrix.
    """
    q1_b, left, s, right, q1_a = _svd_parts(np.asarray(b, np.float64), np.asarray(a, np.float64).T)
    return q1_b @ left, s, (q1_a @ right.T).T


def gram_cosines(
    terms: Sequence[Term], g_b: np.ndarray, g_a: np.ndarray
) -> tuple[dict[tuple[int, int], float], dict[int, float]]:
    """cos(ΔWᵢ, ΔWⱼ) and ‖ΔWᵢ‖_F of the unweighted updates from the stacked Grams.

    g_b = B_stackᵀ·B_stack and g_a = A_stack·A_stackᵀ over the terms' unscaled factors;
    ⟨sᵢBᵢAᵢ, sⱼBⱼAⱼ⟩ = sᵢsⱼ·Σ (BᵢᵀBⱼ)∘(AᵢAⱼᵀ) is a sum over their (i, j) blocks (the
    identity of lowrank.inner_product). Where a norm has lost its digits to cancellation,
    lowrank's QR-based cosine_similarity is used for that pair instead.
    """
    edges = np.cumsum([0] + [t.layer.rank for t in terms])

    def block(i: int, j: int) -> np.ndarray:
        return np.s_[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]

    norms: dict[int, float] = {}
    reliable: dict[int, bool] = {}
    for i, t in enumerate(terms):
        square = float(np.sum(g_b[block(i, i)] * g_a[block(i, i)]))
        # (Σₖ ‖bₖ‖·‖aₖ‖)², the scale of the Gram sum's rounding error
        bound = float(np.sum(np.sqrt(np.diag(g_b[block(i, i)]) * np.diag(g_a[block(i, i)])))) ** 2
        reliable[t.index] = square >= _CANCELLATION * bound
        norms[t.index] = abs(t.layer.scale) * (
            math.sqrt(max(square, 0.0)) if reliable[t.index] else lowrank.frobenius_norm(t.b, t.a)
        )
    cosines: dict[tuple[int, int], float] = {}
    for i, ti in enumerate(terms):
        for j in range(i + 1, len(terms)):
            tj = terms[j]
            if not (reliable[ti.index] and reliable[tj.index]):
                cos = lowrank.cosine_similarity(ti.b, ti.a, tj.b, tj.a, ti.layer.scale, tj.layer.scale)
            elif norms[ti.index] == 0.0 or norms[tj.index] == 0.0:
                cos = 0.0
            else:
                inner = ti.layer.scale * tj.layer.scale * float(np.sum(g_b[block(i, j)] * g_a[block(i, j)]))
                cos = min(1.0, max(-1.0, inner / (norms[ti.index] * norms[tj.index])))
            cosines[(ti.index, tj.index)] = cos
    return cosines, norms


def stacked_grams(terms: Sequence[Term]) -> tuple[np.ndarray, np.ndarray]:
    """B_stackᵀ·B_stack and A_stack·A_stackᵀ (each (Σr, Σr)) of the terms' unscaled factors,
    block by block (no tall copy), each symmetric pair of blocks computed once."""
    edges = np.cumsum([0] + [t.layer.rank for t in terms])
    g_b = np.empty((edges[-1], edges[-1]))
    for i, ti in enumerate(terms):
        for j in range(i, len(terms)):
            block = ti.b.T @ terms[j].b  # (rᵢ, rⱼ)
            g_b[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = block
            g_b[edges[j]:edges[j + 1], edges[i]:edges[i + 1]] = block.T
    a_stack = np.concatenate([t.a for t in terms], axis=0)  # (Σr, n): whole rows, a cheap copy
    return g_b, a_stack @ a_stack.T


def blend_factored(terms: Sequence[Term], method: str, rank: int | None, energy: float | None) -> FactoredBlend:
    """cat, svd or linear for one layer's terms (see blend.py for the semantics)."""
    g_b, g_a = stacked_grams(terms)
    cosines, norms = gram_cosines(terms, g_b, g_a)
    live = [t for t in terms if t.coefficient != 0.0]
    coef = np.concatenate([np.full(t.layer.rank, t.coefficient) for t in terms])  # per column of B
    alive = coef != 0.0
    if method == "cat":  # √|c| on each side keeps both factors in range for fp16/bf16
        roots = [math.sqrt(abs(t.coefficient)) for t in live]
        b = np.concatenate([math.copysign(r, t.coefficient) * t.b for r, t in zip(roots, live)], axis=1)
        a = np.concatenate([r * t.a for r, t in zip(roots, live)], axis=0)
        total = lowrank.frobenius_norm(b, a)
        return FactoredBlend(b, a, 1.0, 0.0, total, total, cosines, norms)
    if method == "linear":
        # PEFT's formula: √|c| on both factors, the sign on A only.
        b = sum(math.sqrt(abs(t.coefficient)) * t.b for t in terms)
        a = sum(math.copysign(math.sqrt(abs(t.coefficient)), t.coefficient) * t.a for t in terms)
        b_cat, a_cat = lowrank.concat_factors([(t.b, t.a, t.coefficient) for t in live])
        diff_b, diff_a = lowrank.concat_factors([(b, a, 1.0), (b_cat, a_cat, -1.0)])
        residual = lowrank.frobenius_norm(diff_b, diff_a)
        total = lowrank.frobenius_norm(b_cat, a_cat)
        return FactoredBlend(b, a, None, residual, total, lowrank.frobenius_norm(b, a), cosines, norms)
    if method != "svd":
        raise ValueError(f"not a factored method: {method!r}")
    b_cat = Stack([t.b for t in live], [t.coefficient for t in live])  # (m, Σr) = [c₁B₁ | c₂B₂ | …]
    a_cat_t = Stack([t.a.T for t in live], [1.0] * len(live))  # (n, Σr) = [A₁; A₂; …]ᵀ
    gram_b = g_b[np.ix_(alive, alive)] * np.outer(coef[alive], coef[alive])  # (c∘B)ᵀ(c∘B), no tall product
    base_b, left, s, right, base_a = _svd_parts(b_cat, a_cat_t, gram_b, g_a[np.ix_(alive, alive)])
    keep = s.size if rank is None else min(rank, s.size)
    if energy is not None:
        keep = min(keep, lowrank.rank_for_energy(s, energy))
    root = np.sqrt(s[:keep])
    energies = s**2
    total_sq, kept_sq = float(energies.sum()), float(energies[:keep].sum())
    return FactoredBlend(
        b=base_b @ (left[:, :keep] * root),  # (m, R)
        a=np.ascontiguousarray((base_a @ (right[:keep].T * root)).T),  # (R, n)
        energy_kept=1.0 if total_sq == 0.0 else kept_sq / total_sq,
        residual_fro=math.sqrt(float(energies[keep:].sum())),
        sum_norm=math.sqrt(total_sq),
        out_norm=math.sqrt(kept_sq),
        cosines=cosines,
        norms=norms,
    )
