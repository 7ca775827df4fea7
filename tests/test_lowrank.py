"""linalg (factored.py, spectrum.py) against dense float64 numpy: every number is
recomputed from scale·B·A."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.linalg import factored as lr
from lora_tools.linalg import hadamard as hd
from lora_tools.linalg import spectrum as sp

DTYPES = (np.float16, np.float32, np.float64)
# How the factors are made degenerate; "cancel" makes B·A exactly zero with non-zero factors.
KINDS = ("random", "dup_cols", "zero_rows", "low_rank", "zero_b", "zero_a", "cancel")
PROPERTY = settings(max_examples=150, deadline=None)


def make_factors(seed: int, m: int, n: int, r: int, dtype, kind: str):
    """Seeded (b (m, r), a (r, n)) in `dtype`, made degenerate as `kind` says."""
    rng = np.random.default_rng(seed)
    magnitude = 10.0 ** rng.uniform(-2, 2)
    b = rng.standard_normal((m, r)) * magnitude
    a = rng.standard_normal((r, n))
    if kind == "dup_cols" and r >= 2:
        b[:, 1::2] = b[:, 0:1]  # every other column of B repeats the first
    elif kind == "zero_rows" and r >= 1:
        a[rng.random(r) < 0.5] = 0.0
    elif kind == "low_rank" and r >= 2:
        inner = rng.integers(1, r)
        b = b[:, :inner] @ rng.standard_normal((inner, r))
    elif kind == "zero_b":
        b[:] = 0.0
    elif kind == "zero_a":
        a[:] = 0.0
    elif kind == "cancel" and r >= 2:
        half = r // 2
        b[:, half : 2 * half] = b[:, :half]
        a[half : 2 * half] = -a[:half]
        b[:, 2 * half :] = 0.0
    return b.astype(dtype), a.astype(dtype)


def dense(b, a, scale=1.0) -> np.ndarray:
    """The reference: scale·B·A formed densely in float64."""
    return scale * (b.astype(np.float64) @ a.astype(np.float64))


def dense_sv(w: np.ndarray) -> np.ndarray:
    return np.linalg.svd(w, compute_uv=False) if w.size else np.zeros(0)


def factor_size(b, a, scale=1.0) -> float:
    """|scale|·‖B‖_F·‖A‖_F: the scale of the rounding in forming B·A at all."""
    b, a = b.astype(np.float64), a.astype(np.float64)
    return abs(scale) * float(np.linalg.norm(b) * np.linalg.norm(a))


def tolerance(b, a, scale, sigma1) -> float:
    """1e-9 relative to σ₁, plus the absolute rounding floor of forming B·A at all
    (≈ eps·|scale|·‖B‖‖A‖, which dominates only when the factors cancel)."""
    return 1e-9 * sigma1 + 1e-12 * factor_size(b, a, scale)


@st.composite
def updates(draw, max_dim: int = 40, max_rank: int = 12):
    m = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_dim))
    r = draw(st.integers(0, max_rank))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    b, a = make_factors(seed, m, n, r, dtype, kind)
    return b, a, draw(scales())


def scales():
    """0, ±1, and ±10^e for e in [-3, 3]: negative and tiny/huge, never subnormal."""
    signed = st.tuples(st.sampled_from([-1.0, 1.0]), st.floats(-3, 3)).map(
        lambda t: t[0] * 10.0 ** t[1]
    )
    return st.one_of(st.sampled_from([0.0, 1.0, -1.0]), signed)


# --- hand-computable examples: these fail loudly if the math is wrong ------------------


def test_rank_one_example_by_hand():
    b = np.array([[1.0], [0.0]])
    a = np.array([[3.0, 4.0]])  # B·A = [[3, 4], [0, 0]]: σ = 5
    assert lr.singular_values(b, a) == pytest.approx([5.0])
    assert lr.singular_values(b, a, scale=-2.0) == pytest.approx([10.0])
    assert lr.frobenius_norm(b, a) == pytest.approx(5.0)
    assert lr.spectral_norm(b, a, 0.5) == pytest.approx(2.5)
    u, s, vt = lr.factored_svd(b, a, scale=-1.0)
    assert s == pytest.approx([5.0])
    assert u * s @ vt == pytest.approx(np.array([[-3.0, -4.0], [0.0, 0.0]]))
    assert abs(vt) == pytest.approx(np.array([[0.6, 0.8]]))
    result = lr.truncate(b, a.T, 1)
    assert result.b @ result.a == pytest.approx(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert abs(result.b) == pytest.approx(np.array([[math.sqrt(5.0)], [0.0]]))
    assert result.residual_fro == 0.0 and result.energy_kept == pytest.approx(1.0)


def test_inner_product_and_cosine_by_hand():
    b1, a1 = np.array([[1.0], [0.0]]), np.array([[1.0, 0.0]])  # [[1, 0], [0, 0]]
    b2, a2 = np.array([[1.0], [0.0]]), np.array([[1.0, 1.0]])  # [[1, 1], [0, 0]]
    assert lr.inner_product(b1, a1, b2, a2) == pytest.approx(1.0)
    assert lr.inner_product(b1, a1, b2, a2, 2.0, -3.0) == pytest.approx(-6.0)
    assert lr.cosine_similarity(b1, a1, b2, a2) == pytest.approx(1 / math.sqrt(2))
    assert lr.cosine_similarity(b1, a1, b2, a2, 1.0, -4.0) == pytest.approx(-1 / math.sqrt(2))


def test_spectrum_metrics_by_hand():
    sv = np.array([4.0, 3.0])  # energies 16 and 9 of 25
    assert sp.energy_rank(sv, 0.64) == 1
    assert sp.energy_rank(sv, 0.65) == 2
    assert sp.energy_rank(sv, 1.0) == 2
    assert sp.energy_rank(sv, 0.0) == 0
    assert sp.energy_rank([3.0, 4.0], 0.64) == 1  # order does not matter
    assert sp.energy_fraction(sv, 1) == pytest.approx(0.64)
    assert sp.energy_fraction(sv, 0) == 0.0
    assert sp.energy_fraction(sv, 5) == pytest.approx(1.0)
    assert sp.stable_rank(sv) == pytest.approx(25 / 16)
    assert sp.effective_rank([1.0, 1.0, 0.0]) == pytest.approx(2.0)
    assert sp.effective_rank([2.0]) == pytest.approx(1.0)
    p = np.array([4.0, 3.0]) / 7.0
    assert sp.effective_rank(sv) == pytest.approx(math.exp(-np.sum(p * np.log(p))))
    assert sp.rank_for_energy(sv, 0.5) == 1
    assert sp.rank_for_energy([0.0, 0.0], 0.9) == 1


def test_energy_rank_is_not_fooled_by_rounding():
    sv = np.full(10, 0.1)
    assert sp.energy_rank(sv, 1.0) == 10
    assert sp.energy_rank(sv, 0.9) == 9
    assert sp.energy_rank(sv, 0.3) == 3
    assert sp.energy_rank([1.0, 1e-9, 0.0], 1.0) == 1  # tail below the 1e-12 tolerance


def test_all_zero_spectrum():
    for sv in (np.zeros(4), np.zeros(0)):
        assert sp.energy_rank(sv, 0.9) == 0
        assert sp.effective_rank(sv) == 0.0
        assert sp.stable_rank(sv) == 0.0
        assert sp.energy_fraction(sv, 2) == 1.0


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError):
        sp.energy_rank([1.0], 1.5)
    with pytest.raises(ValueError):
        sp.energy_rank([1.0], float("nan"))
    with pytest.raises(ValueError):
        sp.energy_fraction([1.0], -1)
    with pytest.raises(ValueError):
        lr.truncate(np.ones((3, 2)), np.ones((2, 4)).T, -1)
    with pytest.raises(ValueError):
        lr.singular_values(np.ones((3, 2)), np.ones((3, 4)))
    with pytest.raises(ValueError):
        lr.inner_product(np.ones((3, 1)), np.ones((1, 4)), np.ones((2, 1)), np.ones((1, 4)))


# --- edge cases ----------------------------------------------------------------------


def test_rank_zero_gives_empty_results_of_the_right_shapes():
    b, a = np.zeros((5, 0), np.float32), np.zeros((0, 7), np.float32)
    u, s, vt = lr.factored_svd(b, a)
    assert (u.shape, s.shape, vt.shape) == ((5, 0), (0,), (0, 7))
    assert u.dtype == s.dtype == vt.dtype == np.float64
    assert lr.singular_values(b, a).shape == (0,)
    assert lr.frobenius_norm(b, a) == 0.0
    assert lr.spectral_norm(b, a) == 0.0
    assert lr.cosine_similarity(b, a, np.ones((5, 1)), np.ones((1, 7))) == 0.0
    result = lr.truncate(b, a.T, 2)
    assert result.b.shape == (5, 2) and result.a.shape == (2, 7)
    assert not result.b.any() and not result.a.any()
    assert result.energy_kept == 1.0 and result.residual_fro == 0.0


def test_rank_above_matrix_size_pads_singular_values():
    b, a = make_factors(1, 3, 2, 6, np.float64, "random")
    s = lr.singular_values(b, a)
    assert s.shape == (6,)
    assert not s[2:].any()
    np.testing.assert_allclose(s[:2], dense_sv(dense(b, a)), rtol=1e-12)
    u, s_k, vt = lr.factored_svd(b, a)
    assert (u.shape, s_k.shape, vt.shape) == ((3, 2), (2,), (2, 2))


def test_all_zero_factors():
    b, a = np.zeros((4, 3), np.float16), np.zeros((3, 5), np.float16)
    u, s, vt = lr.factored_svd(b, a)
    assert not s.any()
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-12)  # still orthonormal
    assert lr.frobenius_norm(b, a, 3.0) == 0.0
    assert lr.cosine_similarity(b, a, b, a) == 0.0
    assert lr.inner_product(b, a, b, a) == 0.0


def test_cancelling_factors_have_norm_near_zero():
    b, a = make_factors(7, 30, 20, 8, np.float64, "cancel")
    assert np.abs(dense(b, a)).max() < 1e-12
    size = np.linalg.norm(b) * np.linalg.norm(a)
    assert lr.frobenius_norm(b, a) <= 1e-14 * size  # Gram alone would give ~1e-8 · size
    assert lr.spectral_norm(b, a) <= 1e-14 * size


def test_nearly_cancelling_factors_keep_their_norm():
    # B·A = b₀x − (b₀+d)x = −d·x, tiny against ‖B‖‖A‖: the bare Gram sum gives ~5e-7 here.
    rng = np.random.default_rng(0)
    b0, d = rng.standard_normal((30, 1)), rng.standard_normal((30, 1))
    x = rng.standard_normal((1, 20))
    b, a = np.hstack([b0, b0 + 1e-10 * d]), np.vstack([x, -x])
    exact = 1e-10 * np.linalg.norm(d) * np.linalg.norm(x)  # ‖d·x‖_F, rank one
    assert lr.frobenius_norm(b, a) == pytest.approx(exact, rel=1e-5)
    assert lr.spectral_norm(b, a) == pytest.approx(exact, rel=1e-5)


def test_zero_scale_gives_orthonormal_u():
    b, a = make_factors(3, 6, 5, 2, np.float64, "random")
    u, s, _ = lr.factored_svd(b, a, scale=0.0)
    assert not s.any()
    np.testing.assert_allclose(u.T @ u, np.eye(2), atol=1e-12)


def test_concat_factors_rejects_mismatched_shapes():
    b, a = np.ones((3, 2)), np.ones((2, 4))
    with pytest.raises(ValueError):
        lr.concat_factors([(b, a, 1.0), (np.ones((5, 2)), a, 1.0)])
    with pytest.raises(ValueError):
        lr.concat_factors([(b, a, 1.0), (b, np.ones((2, 6)), 1.0)])
    with pytest.raises(ValueError):
        lr.concat_factors([])


def test_concat_factors_by_hand():
    b1, a1 = np.array([[1.0], [2.0]]), np.array([[1.0, 0.0, 1.0]])
    b2, a2 = np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
    b_cat, a_cat = lr.concat_factors([(b1, a1, 2.0), (b2, a2, -1.0)])
    assert b_cat.shape == (2, 3) and a_cat.shape == (3, 3)
    expected = 2.0 * b1 @ a1 - b2 @ a2
    np.testing.assert_array_equal(b_cat @ a_cat, expected)


# --- properties against the dense float64 reference -----------------------------------


@PROPERTY
@given(updates())
def test_singular_values_match_dense(update):
    b, a, scale = update
    ref = dense_sv(dense(b, a, scale))
    s = lr.singular_values(b, a, scale)
    assert s.shape == (b.shape[1],) and s.dtype == np.float64
    assert np.all(s >= 0) and np.all(np.diff(s) <= 0)
    padded = np.zeros(b.shape[1])
    padded[: min(ref.size, s.size)] = ref[: s.size]
    sigma1 = ref[0] if ref.size else 0.0
    np.testing.assert_allclose(s, padded, rtol=0, atol=tolerance(b, a, scale, sigma1))
    assert lr.spectral_norm(b, a, scale) == pytest.approx(
        sigma1, rel=0, abs=tolerance(b, a, scale, sigma1)
    )


@PROPERTY
@given(updates())
def test_factored_svd_reconstructs_and_is_orthonormal(update):
    b, a, scale = update
    (m, r), n = b.shape, a.shape[1]
    k = min(m, n, r)
    u, s, vt = lr.factored_svd(b, a, scale)
    assert (u.shape, s.shape, vt.shape) == ((m, k), (k,), (k, n))
    assert np.all(s >= 0) and np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(vt @ vt.T, np.eye(k), atol=1e-12)
    w = dense(b, a, scale)
    sigma1 = dense_sv(w)[0] if w.size else 0.0
    np.testing.assert_allclose(u * s @ vt, w, rtol=0, atol=tolerance(b, a, scale, sigma1))


@PROPERTY
@given(updates())
def test_frobenius_norm_matches_dense(update):
    b, a, scale = update
    w = dense(b, a, scale)
    ref = float(np.linalg.norm(w))
    assert lr.frobenius_norm(b, a, scale) == pytest.approx(
        ref, rel=0, abs=tolerance(b, a, scale, ref)
    )


@PROPERTY
@given(st.data())
def test_inner_product_and_cosine_match_dense(data):
    b1, a1, s1 = data.draw(updates())
    m, n = b1.shape[0], a1.shape[1]
    r2 = data.draw(st.integers(0, 12))
    kind = data.draw(st.sampled_from(KINDS))
    b2, a2 = make_factors(data.draw(st.integers(0, 2**32 - 1)), m, n, r2, np.float32, kind)
    s2 = data.draw(scales())
    w1, w2 = dense(b1, a1, s1), dense(b2, a2, s2)
    ref = float(np.sum(w1 * w2))
    size1, size2 = factor_size(b1, a1, s1), factor_size(b2, a2, s2)
    got = lr.inner_product(b1, a1, b2, a2, s1, s2)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-12 * size1 * size2)
    swapped = lr.inner_product(b2, a2, b1, a1, s2, s1)
    assert swapped == pytest.approx(got, rel=1e-12, abs=1e-12 * size1 * size2)

    cos = lr.cosine_similarity(b1, a1, b2, a2, s1, s2)
    assert -1.0 <= cos <= 1.0
    norm1, norm2 = np.linalg.norm(w1), np.linalg.norm(w2)
    if size1 == 0.0 or size2 == 0.0:  # a zero factor or scale: defined as 0.0
        assert cos == 0.0
    elif norm1 > 1e-6 * size1 and norm2 > 1e-6 * size2:  # well-conditioned: compare
        assert cos == pytest.approx(ref / (norm1 * norm2), abs=1e-9)


@PROPERTY
@given(updates())
def test_cosine_with_itself_and_its_negation(update):
    b, a, scale = update
    size = factor_size(b, a, scale)
    norm = np.linalg.norm(dense(b, a, scale))
    if size == 0.0:
        assert lr.cosine_similarity(b, a, b, a, scale, scale) == 0.0
    elif norm > 1e-6 * size:
        assert lr.cosine_similarity(b, a, b, a, scale, scale) == pytest.approx(1.0, abs=1e-12)
        assert lr.cosine_similarity(b, a, b, a, scale, -scale) == pytest.approx(-1.0, abs=1e-12)


@PROPERTY
@given(updates(), st.integers(0, 14))
def test_truncate_is_the_best_rank_r_approximation(update, rank):
    b, a, scale = update
    b = b.astype(np.float64) * scale  # truncate has no scale: fold it into B
    w = dense(b, a)
    ref = dense_sv(w)
    sigma1 = ref[0] if ref.size else 0.0
    tol = tolerance(b, a, 1.0, sigma1)
    result = lr.truncate(b, a.T, rank)
    assert result.b.shape == (b.shape[0], rank) and result.a.shape == (rank, a.shape[1])
    assert result.singular_values.shape == (b.shape[1],)
    dropped = math.sqrt(float(np.sum(ref[rank:] ** 2)))
    assert result.residual_fro == pytest.approx(dropped, rel=0, abs=tol)
    assert result.residual_fro == pytest.approx(
        float(np.linalg.norm(w - result.b @ result.a)), rel=0, abs=tol
    )
    total = float(np.sum(ref**2))
    size = factor_size(b, a)
    if sigma1 > 1e-6 * size:  # not cancelled to rounding noise: the ratio is meaningful
        assert result.energy_kept == pytest.approx(float(np.sum(ref[:rank] ** 2)) / total, abs=1e-9)
    assert 0.0 <= result.energy_kept <= 1.0 + 1e-12
    # Balanced split: column j of b and row j of a have the same norm, √σⱼ.
    np.testing.assert_allclose(
        np.linalg.norm(result.b, axis=0), np.linalg.norm(result.a, axis=1), atol=1e-12
    )
    if rank >= min(b.shape[1], *w.shape):  # full rank: reproduces B·A
        np.testing.assert_allclose(result.b @ result.a, w, rtol=0, atol=tol)


@PROPERTY
@given(st.data())
def test_concat_factors_equals_weighted_dense_sum(data):
    m, n = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    count = data.draw(st.integers(1, 4))
    terms, expected = [], np.zeros((m, n))
    for _ in range(count):
        r = data.draw(st.integers(0, 12))
        dtype = data.draw(st.sampled_from(DTYPES))
        kind = data.draw(st.sampled_from(KINDS))
        b, a = make_factors(data.draw(st.integers(0, 2**32 - 1)), m, n, r, dtype, kind)
        weight = data.draw(scales())
        terms.append((b, a, weight))
        expected += dense(b, a, weight)
    b_cat, a_cat = lr.concat_factors(terms)
    total_rank = sum(b.shape[1] for b, _, _ in terms)
    assert b_cat.shape == (m, total_rank) and a_cat.shape == (total_rank, n)
    assert b_cat.dtype == a_cat.dtype == np.float64
    size = sum(factor_size(b, a, c) for b, a, c in terms)
    np.testing.assert_allclose(b_cat @ a_cat, expected, rtol=0, atol=1e-12 * size)


@PROPERTY
@given(updates(), st.floats(0.0, 1.0))
def test_spectrum_metrics_match_their_definitions(update, fraction):
    b, a, scale = update
    sv = lr.singular_values(b, a, scale)
    energy = sv**2
    total = float(energy.sum())
    k = sp.energy_rank(sv, fraction)
    assert 0 <= k <= sv.size
    if total == 0.0:
        assert k == 0 and sp.stable_rank(sv) == 0.0 and sp.effective_rank(sv) == 0.0
        return
    cum = np.cumsum(energy)
    assert k == 0 or cum[k - 1] >= fraction * total * (1 - 1e-12)  # k keeps enough energy
    assert k == 0 or k == 1 or cum[k - 2] < fraction * total  # and k - 1 would not
    assert sp.rank_for_energy(sv, fraction) == max(1, k)
    assert sp.energy_fraction(sv, k) == pytest.approx(cum[k - 1] / total if k else 0.0)
    nonzero = int(np.count_nonzero(sv))
    assert sp.energy_rank(sv, 1.0) <= nonzero
    assert 1.0 - 1e-12 <= sp.stable_rank(sv) <= nonzero + 1e-9
    assert sp.stable_rank(sv) == pytest.approx(total / sv[0] ** 2)
    p = sv[sv > 0] / sv.sum()
    assert sp.effective_rank(sv) == pytest.approx(math.exp(-np.sum(p * np.log(p))))
    assert 1.0 - 1e-12 <= sp.effective_rank(sv) <= nonzero + 1e-9


# --- LoHa: scale·(U₁V₁)∘(U₂V₂) from its factors, never from B and A where it can --------

# "same_u": U₂ = U₁, so B = U₁⊙ᵣU₁ has equal columns (i,j) and (j,i) and a singular Gram
# matrix (the Householder fallback); "low_rank_u": U₁ of rank 1; "zero_v": ΔW = 0.
LOHA_KINDS = ("random", "same_u", "low_rank_u", "zero_v")


def make_loha(seed: int, m: int, n: int, r1: int, r2: int, dtype, kind: str):
    """Seeded (U₁ (m, r₁), V₁ (r₁, n), U₂ (m, r₂), V₂ (r₂, n)) in `dtype`, made degenerate as `kind` says."""
    rng = np.random.default_rng(seed)
    u1 = rng.standard_normal((m, r1)) * 10.0 ** rng.uniform(-1, 1)
    v1 = rng.standard_normal((r1, n))
    u2 = u1.copy() if kind == "same_u" else rng.standard_normal((m, r2))
    v2 = rng.standard_normal((u2.shape[1], n)) * 10.0 ** rng.uniform(-1, 1)
    if kind == "low_rank_u":
        u1 = u1[:, :1] @ rng.standard_normal((1, r1))
    elif kind == "zero_v":
        v2[:] = 0.0
    return tuple(x.astype(dtype) for x in (u1, v1, u2, v2))


def khatri_rao(u1, v1, u2, v2) -> tuple[np.ndarray, np.ndarray]:
    """B = U₁⊙ᵣU₂ (m, r₁r₂) and A = V₁⊙꜀V₂ (r₁r₂, n), formed by their definition in float64:
    B[o, (i,j)] = U₁[o,i]·U₂[o,j], A[(i,j), c] = V₁[i,c]·V₂[j,c], so B·A = (U₁V₁)∘(U₂V₂)."""
    u1, v1, u2, v2 = (x.astype(np.float64) for x in (u1, v1, u2, v2))
    b = np.einsum("oi,oj->oij", u1, u2).reshape(u1.shape[0], -1)
    a = np.einsum("ic,jc->ijc", v1, v2).reshape(-1, v1.shape[1])
    return b, a


def loha_dense(u1, v1, u2, v2, scale=1.0) -> np.ndarray:
    """The reference: scale·(U₁V₁)∘(U₂V₂), LyCORIS' ΔW, formed densely in float64."""
    return scale * dense(u1, v1) * dense(u2, v2)


@st.composite
def loha_updates(draw):
    m = draw(st.integers(1, 50))
    n = draw(st.integers(1, 50))
    r1 = draw(st.integers(1, 5))
    r2 = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(LOHA_KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    return (*make_loha(seed, m, n, r1, r2, dtype, kind), draw(scales()))


@PROPERTY
@given(loha_updates())
def test_hadamard_singular_values_match_dense(update):
    u1, v1, u2, v2, scale = update
    ref = dense_sv(loha_dense(u1, v1, u2, v2, scale))
    b, a = khatri_rao(u1, v1, u2, v2)
    s = hd.hadamard_singular_values((u1, v1), (u2, v2), b, a, scale)
    r = u1.shape[1] * u2.shape[1]
    assert s.shape == (r,) and s.dtype == np.float64
    assert np.all(s >= 0) and np.all(np.diff(s) <= 0)
    padded = np.zeros(r)
    padded[: min(ref.size, r)] = ref[:r]
    sigma1 = ref[0] if ref.size else 0.0
    np.testing.assert_allclose(s, padded, rtol=0, atol=tolerance(b, a, scale, sigma1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("r1", "r2", "m"), [(5, 3, 1000), (8, 8, 2049), (1, 4, 7), (3, 1, 1)])
def test_khatri_rao_gram_is_the_gram_of_the_formed_factor(dtype, r1: int, r2: int, m: int) -> None:
    """KKᵀ from the r×r pair products equals that of K = X₁⊙X₂ formed (the textbook
    X₁ᵀX₁∘X₂ᵀX₂ is KᵀK, the m×m one), r₁ ≠ r₂ included."""
    rng = np.random.default_rng(r1 * 100 + r2 + m)
    x1, x2 = rng.standard_normal((r1, m)).astype(dtype), rng.standard_normal((r2, m)).astype(dtype)
    k = np.einsum("ic,jc->ijc", x1.astype(np.float64), x2.astype(np.float64)).reshape(r1 * r2, m)
    want = k @ k.T
    got = hd.khatri_rao_gram(x1, x2)
    assert got.shape == (r1 * r2, r1 * r2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max())
    np.testing.assert_allclose(hd.khatri_rao_gram(x1.T.copy().T, x2), want, rtol=0, atol=1e-13 * np.abs(want).max())


class Unformed:
    """Stands in for B or A where the Gram route must not need them."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("formed a factor the Gram matrices made unnecessary")


def test_hadamard_of_well_conditioned_factors_never_forms_them():
    """SDXL-like shapes (out 640, in 2048, r = 8): σ from the two r²×r² Grams alone, equal to
    the σ of the formed B and A (`singular_values`) and of the dense ΔW."""
    u1, v1, u2, v2 = make_loha(3, 640, 2048, 8, 8, np.float32, "random")
    s = hd.hadamard_singular_values((u1, v1), (u2, v2), Unformed((640, 64)), Unformed((64, 2048)), 0.5)
    b, a = khatri_rao(u1, v1, u2, v2)
    np.testing.assert_allclose(s, lr.singular_values(b, a, 0.5), rtol=0, atol=1e-12 * s[0])
    ref = dense_sv(loha_dense(u1, v1, u2, v2, 0.5))
    np.testing.assert_allclose(s, ref[:64], rtol=0, atol=1e-12 * ref[0])


@pytest.mark.parametrize("out_dim", [4, 30])
def test_hadamard_of_a_conv_layer_takes_its_stored_shapes(out_dim: int):
    """A 3×3 conv LoHa: V (r, in·9) flattened as LyCORIS does, and B, A in a conv layer's
    shapes (out, r, 1, 1) and (r, in, 3, 3); out = 4 < r₁r₂ = 6 makes B's Gram singular,
    so B is read in that shape (Householder), out = 30 takes the Gram route."""
    u1, v1, u2, v2 = make_loha(5, out_dim, 5 * 9, 3, 2, np.float32, "random")
    b, a = khatri_rao(u1, v1, u2, v2)
    s = hd.hadamard_singular_values((u1, v1), (u2, v2), b.reshape(out_dim, 6, 1, 1), a.reshape(6, 5, 3, 3), 2.0)
    ref = dense_sv(loha_dense(u1, v1, u2, v2, 2.0))
    k = min(6, ref.size)
    np.testing.assert_allclose(s[:k], ref[:k], rtol=0, atol=1e-12 * ref[0])
    assert not s[k:].any() or np.all(s[k:] <= 1e-12 * ref[0])


def test_hadamard_spectra_of_a_whole_file_equal_the_layer_by_layer_ones(monkeypatch: pytest.MonkeyPatch):
    """The batched σ (layers of one shape stacked) against `hadamard_singular_values` per
    layer, and the float64 dense SVD: every degenerate kind (those go the one-by-one
    route), shapes repeated across batches (a small batch size forces several), a conv
    side, a side shorter than r₁r₂, mixed dtypes and scales, order kept."""
    monkeypatch.setattr(hd, "_BATCH_ELEMENTS", 20_000)
    items = []
    for seed in range(40):
        kind = LOHA_KINDS[seed % len(LOHA_KINDS)] if seed % 3 == 0 else "random"
        m, n, r1, r2 = [(64, 48, 3, 4), (40, 90, 2, 2), (5, 30, 2, 3), (30, 45, 3, 2)][seed % 4]
        u1, v1, u2, v2 = make_loha(seed, m, n, r1, r2, [np.float32, np.float64][seed % 2], kind)
        b, a = khatri_rao(u1, v1, u2, v2)
        items.append(((u1, v1), (u2, v2), b, a, [0.5, -2.0, 1.0][seed % 3]))
    batched = hd.hadamard_spectra(items)
    assert len(batched) == len(items)
    for item, s in zip(items, batched):
        one = hd.hadamard_singular_values(*item)
        assert s.shape == one.shape
        np.testing.assert_allclose(s, one, rtol=0, atol=1e-12 * max(one[0], 1e-300))
        (u1, v1), (u2, v2), b, a, scale = item
        ref = dense_sv(loha_dense(u1, v1, u2, v2, scale))
        k = min(s.size, ref.size)
        np.testing.assert_allclose(s[:k], ref[:k], rtol=0, atol=tolerance(b, a, scale, ref[0] if ref.size else 0.0))
