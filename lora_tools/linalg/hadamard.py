"""LyCORIS LoHa's update (U₁V₁)∘(U₂V₂) from its two sides: Gram matrices of its exact
Khatri–Rao factors without forming them, and its singular values, one layer at a time or
for a whole file at once (`hadamard_spectra`, grouped by shape: per-layer calls were ~100
small numpy calls each, so GIL-bound that two threads ran slower than one).
Pure float64 math: no I/O, no torch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from lora_tools.linalg.factored import padded_singular_values
from lora_tools.linalg.qr import cholesky_r, cholesky_stack, r_factor
from lora_tools.linalg.tall import ROW_BLOCK

Side = tuple[np.ndarray, np.ndarray]  # (U (out, r), V (r, in)): W = U·V

# Scratch elements one batch of `hadamard_spectra` may use (16 MB of float64 per thread,
# within the L3 cache two threads share here): at 4 MB, two threads gained 1.3× over one
# (a batch's many small calls hold the GIL), at 16 MB 1.65× (700 SDXL LoHa layers: 0.41 s).
_BATCH_ELEMENTS = 1 << 21


def hadamard_singular_values(
    side1: tuple[np.ndarray, np.ndarray], side2: tuple[np.ndarray, np.ndarray], b: Any, a: Any, scale: float = 1.0
) -> np.ndarray:
    """Descending singular values of scale·(U₁V₁)∘(U₂V₂), LyCORIS' LoHa, all r₁·r₂ of them:
    those of `singular_values(b, a, scale)` for its exact factors B = U₁⊙ᵣU₂ (out, r₁r₂) and
    A = V₁⊙꜀V₂ (r₁r₂, in), which are formed only where their Gram matrices cannot stand in.

    U₁ (out, r₁), V₁ (r₁, in), U₂ (out, r₂), V₂ (r₂, in), any float dtype. BᵀB and AAᵀ come
    from `khatri_rao_gram` (pair products: ~0.6× the flops of B's own Gram and no (out, r₁r₂)
    float64 copy; forming B and A and their Grams was 0.9 s of 1.25 s per 700 SDXL-sized
    modules, the pair products are 0.4 s); their Cholesky factors are R_B and R_A
    (CholeskyQR, `qr.cholesky_r`, as `r_factor` does) and σ(BA) = σ(R_B·R_Aᵀ). A Gram too
    ill-conditioned for that (κ ≥ 1e6, e.g. U₁ = U₂ makes B's columns (i,j) and (j,i) equal)
    or a side shorter than r₁r₂ takes a Householder R of the factor itself: `b` and `a`
    (arrays or anything np.asarray forms, e.g. formats.lycoris' lazy BuiltFactor, in any
    shape with out / r₁r₂ rows) are read only then. O((out+in)·r₁²r₂²/2 + (r₁r₂)³).
    """
    (u1, v1), (u2, v2) = side1, side2
    out_dim, in_dim, r = u1.shape[0], v1.shape[1], u1.shape[1] * u2.shape[1]
    if min(out_dim, in_dim, r) == 0:
        return np.zeros(r)
    r_b = cholesky_r(khatri_rao_gram(u1.T, u2.T)) if out_dim >= r else None
    if r_b is None:
        r_b = r_factor(np.asarray(b, dtype=np.float64).reshape(out_dim, r))
    r_a = cholesky_r(khatri_rao_gram(v1, v2)) if in_dim >= r else None
    if r_a is None:
        r_a = r_factor(np.asarray(a, dtype=np.float64).reshape(r, in_dim).T)
    return padded_singular_values(r_b @ r_a.T, r, scale)


def khatri_rao_gram(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """K·Kᵀ ((r₁r₂)×(r₁r₂), float64) of K = X₁⊙X₂ (r₁r₂, m), K[(i,j), c] = X₁[i,c]·X₂[j,c],
    for X₁ (r₁, m) and X₂ (r₂, m) of any float dtype, without forming K.

    Why not the textbook identity (X₁⊙X₂)ᵀ(X₁⊙X₂) = X₁ᵀX₁ ∘ X₂ᵀX₂: that is the m×m Gram
    KᵀK. The small one is a fourth moment, (KKᵀ)[(i,j),(k,l)] = Σ_c X₁[i,c]X₁[k,c]·
    X₂[j,c]X₂[l,c], symmetric in i↔k and in j↔l, so it is M[{i,k}, {j,l}] with M = P₁·P₂ᵀ
    and P_t[{i,k}, c] = X_t[i,c]·X_t[k,c] over the pairs i ≤ k: 2·m·(r₁(r₁+1)/2)·(r₂(r₂+1)/2)
    flops (2592·m for r = 8) against m·(r₁r₂)² (4096·m) for K's own Gram, and P has 36
    rows where K has 64. Products of two float32 values are exact in float64, so P is
    exact for stored float32/bf16/fp16 factors and only the sums round, as in K's Gram.
    X and P are made ROW_BLOCK columns at a time in this thread's `_SCRATCH` (`_stacked_gram`).
    """
    return _stacked_gram([x1], [x2], x1.shape[0], x2.shape[0])[0]


def _pair_products(x: np.ndarray, out: np.ndarray) -> None:
    """out[…, {i,k}, :] = x[…, i, :]·x[…, k, :] for the pairs i ≤ k, row-major over the upper
    triangle, x (…, r, m), out (…, r(r+1)/2, m): one product over whole rows per i."""
    r = x.shape[-2]
    row = 0
    for i in range(r):
        np.multiply(x[..., i:i + 1, :], x[..., i:, :], out=out[..., row:row + r - i, :])
        row += r - i


class _Scratch(threading.local):
    """float64 memory reused by one thread across calls. Why: fresh arrays of a MB or
    more per call cost more in page faults than the products that fill them, since the
    allocator hands blocks that size back to the system when freed (LoHa's whole P per
    factor: 94 K faults per 700-module file, 1.5× the time of the products). Grows to the
    largest request and is kept: (2r + r(r+1))·ROW_BLOCK·8 bytes per layer stacked, 1.4 MB
    for r = 8, and at most about _BATCH_ELEMENTS·8 bytes (16 MB) per thread for a batch."""

    def __init__(self) -> None:
        self.memory = np.empty(0)

    def arrays(self, *shapes: tuple[int, ...]) -> list[np.ndarray]:
        """Arrays of these shapes over disjoint parts of the memory, contents undefined."""
        sizes = [math.prod(shape) for shape in shapes]
        if self.memory.size < sum(sizes):
            self.memory = np.empty(sum(sizes))
        views, start = [], 0
        for shape, size in zip(shapes, sizes):
            views.append(self.memory[start:start + size].reshape(shape))
            start += size
        return views


_SCRATCH = _Scratch()


@lru_cache(maxsize=64)
def _gram_index(r1: int, r2: int) -> np.ndarray:
    """(r₁r₂, r₁r₂) int: where KKᵀ[(i,j), (k,l)] lies in M.ravel(), M[{i,k}, {j,l}]."""
    rows1, rows2 = _pair_rows(r1), _pair_rows(r2)  # (r, r): the row of P holding x[i]·x[k]
    index = rows1[:, None, :, None] * (r2 * (r2 + 1) // 2) + rows2[None, :, None, :]  # [i, j, k, l]
    index = index.reshape(r1 * r2, r1 * r2)
    index.setflags(write=False)
    return index


def _pair_rows(r: int) -> np.ndarray:
    """(r, r) int: the row of P holding x[min(i,k)]·x[max(i,k)]."""
    rows = np.zeros((r, r), dtype=np.intp)
    upper = np.triu_indices(r)  # row-major, as `_pair_products` writes them
    rows[upper] = np.arange(upper[0].size)
    rows.T[upper] = rows[upper]
    return rows


def hadamard_spectra(items: Sequence[tuple[Side, Side, Any, Any, float]]) -> list[np.ndarray]:
    """`hadamard_singular_values(*item)` for every item, in order, with the same arithmetic
    (pair products, the Gram matrices they give, Cholesky, the core's σ), done for all the
    items of one shape together as stacked arrays: a few large numpy calls per shape
    instead of ~100 small ones per layer. An item whose Gram matrix fails `cholesky_r`'s
    test, or whose side is shorter than r₁r₂, goes through `hadamard_singular_values`
    (its Householder route)."""
    out: list[np.ndarray | None] = [None] * len(items)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, ((u1, v1), (u2, v2), _, _, _) in enumerate(items):
        shape = (u1.shape[0], v1.shape[1], u1.shape[1], u2.shape[1])
        if u1.ndim == v1.ndim == u2.ndim == v2.ndim == 2 and min(shape[0], shape[1]) >= shape[2] * shape[3] > 0:
            groups.setdefault(shape, []).append(index)
        else:
            out[index] = hadamard_singular_values(*items[index])
    for (out_dim, in_dim, r1, r2), members in groups.items():
        per_item = min(max(out_dim, in_dim), ROW_BLOCK) * (r1 + r2 + r1 * (r1 + 1) // 2 + r2 * (r2 + 1) // 2)
        step = max(1, _BATCH_ELEMENTS // per_item)
        for lo in range(0, len(members), step):
            batch = members[lo:lo + step]
            sides = [items[i][:2] for i in batch]
            gram_b = _stacked_gram([s1[0].T for s1, _ in sides], [s2[0].T for _, s2 in sides], r1, r2)
            gram_a = _stacked_gram([s1[1] for s1, _ in sides], [s2[1] for _, s2 in sides], r1, r2)
            lower_b, lower_a = cholesky_stack(gram_b), cholesky_stack(gram_a)
            good = lower_b[1] & lower_a[1]
            if good.any():  # R_B·R_Aᵀ = L_Bᵀ·L_A
                sigma = np.linalg.svd(lower_b[0][good].transpose(0, 2, 1) @ lower_a[0][good], compute_uv=False)
                for i, row in zip(np.asarray(batch)[good], sigma):
                    out[i] = abs(items[i][4]) * row
            for i in np.asarray(batch)[~good]:
                out[i] = hadamard_singular_values(*items[i])
    assert all(s is not None for s in out)
    return [s for s in out if s is not None]


def _stacked_gram(x1: Sequence[np.ndarray], x2: Sequence[np.ndarray], r1: int, r2: int) -> np.ndarray:
    """`khatri_rao_gram` of each pair (X₁ (r₁, m), X₂ (r₂, m)), stacked: (g, r₁r₂, r₁r₂).
    X is widened and P formed ROW_BLOCK columns at a time in this thread's `_SCRATCH`
    (fresh arrays cost more than the products here, in page faults and numpy's gathers),
    and the blocks' P₁·P₂ᵀ are summed: memory bounded whatever m is."""
    g, m = len(x1), x1[0].shape[1]
    width = max(1, min(m, ROW_BLOCK))
    w1, w2, p1, p2 = _SCRATCH.arrays((g, r1, width), (g, r2, width), (g, r1 * (r1 + 1) // 2, width),
                                     (g, r2 * (r2 + 1) // 2, width))
    moment = np.zeros((g, p1.shape[1], p2.shape[1]))  # M per item
    for lo in range(0, m, width):
        n = min(width, m - lo)
        for k in range(g):  # widened to float64: products of two stored values are exact
            np.copyto(w1[k, :, :n], x1[k][:, lo:lo + n])
            np.copyto(w2[k, :, :n], x2[k][:, lo:lo + n])
        _pair_products(w1[:, :, :n], p1[:, :, :n])
        _pair_products(w2[:, :, :n], p2[:, :, :n])
        moment += p1[:, :, :n] @ p2[:, :, :n].transpose(0, 2, 1)
    return moment.reshape(g, -1)[:, _gram_index(r1, r2)]  # [(i,j), (k,l)] = M[{i,k}, {j,l}]
