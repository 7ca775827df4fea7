"""The factored blend math: weighted sums of low-rank updates, their best rank-R
approximation, and the cosines between inputs, from factors only (numpy float64).

The algebra is linalg's: the truncation is `linalg.factored.truncate`, fed the stacked
factors as `Stack`s with their Gram matrices (so no tall copy and no tall Gram product
is made twice), and its QRs are the Gram-based ones of linalg.qr (why: see there). The
same Gram matrices give every input's ‖ΔWᵢ‖ and every ⟨ΔWᵢ, ΔWⱼ⟩ for free (the identity
of `linalg.factored.inner_product`); the identities are tested against linalg's
QR-based functions and dense SVDs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from lora_tools.adapter import LoraLayer
from lora_tools.linalg.factored import (
    GRAM_CANCELLATION,
    concat_factors,
    cosine_similarity,
    frobenius_norm,
    truncate,
)
from lora_tools.linalg.tall import Stack


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


@dataclass
class LayerBlend:
    """One layer's blended factors (b (m, R), a (R, n), product = ΔW_out) and how well
    they keep their target: Σ wᵢΔWᵢ for the factored methods, the TIES/DARE-mixed
    update for the dense ones (`blend.dense`)."""

    b: np.ndarray
    a: np.ndarray
    energy_kept: float | None  # share of ‖target‖² in b·a (None: linear, not a truncation)
    residual_fro: float  # ‖b·a − target‖_F
    target_norm: float  # ‖target‖_F
    out_norm: float  # ‖b·a‖_F
    sum_norm: float  # ‖Σ wᵢΔWᵢ‖_F
    error_vs_sum: float  # ‖b·a − Σ wᵢΔWᵢ‖_F
    cosines: dict[tuple[int, int], float] = field(default_factory=dict)  # (i, j) input positions -> cos(ΔWᵢ, ΔWⱼ)
    norms: dict[int, float] = field(default_factory=dict)  # input position -> ‖ΔWᵢ‖_F (unweighted)


def gram_cosines(
    terms: Sequence[Term], g_b: np.ndarray, g_a: np.ndarray
) -> tuple[dict[tuple[int, int], float], dict[int, float]]:
    """cos(ΔWᵢ, ΔWⱼ) and ‖ΔWᵢ‖_F of the unweighted updates from the stacked Grams.

    g_b = B_stackᵀ·B_stack and g_a = A_stack·A_stackᵀ over the terms' unscaled factors;
    ⟨sᵢBᵢAᵢ, sⱼBⱼAⱼ⟩ = sᵢsⱼ·Σ (BᵢᵀBⱼ)∘(AᵢAⱼᵀ) is a sum over their (i, j) blocks (the
    identity of linalg.factored.inner_product). Where a norm has lost its digits to
    cancellation, linalg's QR-based cosine_similarity is used for that pair instead.
    """
    edges = np.cumsum([0] + [t.layer.rank for t in terms])

    def block(i: int, j: int) -> tuple[slice, slice]:
        return np.s_[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]

    norms: dict[int, float] = {}
    reliable: dict[int, bool] = {}
    for i, t in enumerate(terms):
        square = float(np.sum(g_b[block(i, i)] * g_a[block(i, i)]))
        # (Σₖ ‖bₖ‖·‖aₖ‖)², the scale of the Gram sum's rounding error
        bound = float(np.sum(np.sqrt(np.diag(g_b[block(i, i)]) * np.diag(g_a[block(i, i)])))) ** 2
        reliable[t.index] = square >= GRAM_CANCELLATION * bound
        norms[t.index] = abs(t.layer.scale) * (
            math.sqrt(max(square, 0.0)) if reliable[t.index] else frobenius_norm(t.b, t.a)
        )
    cosines: dict[tuple[int, int], float] = {}
    for i, ti in enumerate(terms):
        for j in range(i + 1, len(terms)):
            tj = terms[j]
            if not (reliable[ti.index] and reliable[tj.index]):
                cos = cosine_similarity(ti.b, ti.a, tj.b, tj.a, ti.layer.scale, tj.layer.scale)
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


def blend_factored(terms: Sequence[Term], method: str, rank: int | None, energy: float | None) -> LayerBlend:
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
        total = frobenius_norm(b, a)
        return LayerBlend(b, a, 1.0, 0.0, total, total, total, 0.0, cosines, norms)
    if method == "linear":
        # PEFT's formula: √|c| on both factors, the sign on A only.
        b = np.zeros_like(terms[0].b)
        a = np.zeros_like(terms[0].a)
        for t in terms:
            b += math.sqrt(abs(t.coefficient)) * t.b
            a += math.copysign(math.sqrt(abs(t.coefficient)), t.coefficient) * t.a
        b_cat, a_cat = concat_factors([(t.b, t.a, t.coefficient) for t in live])
        diff_b, diff_a = concat_factors([(b, a, 1.0), (b_cat, a_cat, -1.0)])
        residual = frobenius_norm(diff_b, diff_a)
        total = frobenius_norm(b_cat, a_cat)
        return LayerBlend(b, a, None, residual, total, frobenius_norm(b, a), total, residual, cosines, norms)
    if method != "svd":
        raise ValueError(f"not a factored method: {method!r}")
    b_stack = Stack([t.b for t in live], [t.coefficient for t in live])  # (m, Σr) = [c₁B₁ | c₂B₂ | …]
    a_stack_t = Stack([t.a.T for t in live], [1.0] * len(live))  # (n, Σr) = [A₁; A₂; …]ᵀ
    gram_b = g_b[np.ix_(alive, alive)] * np.outer(coef[alive], coef[alive])  # (c∘B)ᵀ(c∘B), no tall product
    best = truncate(b_stack, a_stack_t, rank, energy=energy, pad=False, gram_b=gram_b, gram_a=g_a[np.ix_(alive, alive)])
    return LayerBlend(
        b=best.b,  # (m, R)
        a=best.a,  # (R, n)
        energy_kept=best.energy_kept,
        residual_fro=best.residual_fro,
        target_norm=best.total_fro,
        out_norm=best.kept_fro,
        sum_norm=best.total_fro,
        error_vs_sum=best.residual_fro,
        cosines=cosines,
        norms=norms,
    )
