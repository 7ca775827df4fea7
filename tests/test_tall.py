"""linalg.tall: low-precision factors used as float64 block by block give the products
of their float64 widening; the lazy SVD forms the same truncation as the dense one."""

from __future__ import annotations

import numpy as np
import pytest

from lora_tools.linalg import tall
from lora_tools.linalg.factored import svd_of_factors, truncate


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bf16 bits"])
@pytest.mark.parametrize("fortran", [False, True])
def test_widened_products_equal_the_widened_matrix(dtype: type | str, fortran: bool) -> None:
    from lora_tools.io.encode import float32_to_bf16_bits

    rng = np.random.default_rng(3)
    rows = 2 * tall.ROW_BLOCK + 37  # three blocks, the last one short
    x = rng.standard_normal((rows, 7)).astype(np.float32 if dtype == "bf16 bits" else dtype)
    if dtype == "bf16 bits":  # x as a file stores bf16: uint16 patterns, the top half of each float32
        bits = float32_to_bf16_bits(x)
        x = (bits.astype(np.uint32) << 16).view(np.float32)
    if fortran:
        x = np.asfortranarray(x)
    wide = x.astype(np.float64)
    small = rng.standard_normal((7, 5))
    if dtype == "bf16 bits":
        widened = tall.Widened(np.asfortranarray(bits) if fortran else bits, bf16_bits=True)
        np.testing.assert_array_equal(widened.dense(), wide)
        blocks = list(tall.single_blocks(widened, small))
        assert np.abs(np.concatenate([blk.copy() for _, blk in blocks]) - wide @ small).max() < 1e-5
    else:
        widened = tall.as_tall(x)
    assert isinstance(widened, tall.Widened)
    np.testing.assert_allclose(tall.gram(widened), wide.T @ wide, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(widened @ small, wide @ small, rtol=1e-13, atol=1e-12)
    as32 = tall.times(widened, small, np.float32)
    assert as32.dtype == np.float32 and as32.flags.c_contiguous
    np.testing.assert_array_equal(as32, (wide @ small).astype(np.float32))
    flipped = tall.times(widened, small, np.float32, transposed=True)
    assert flipped.shape == (5, rows) and flipped.flags.c_contiguous
    np.testing.assert_array_equal(flipped, (wide @ small).T.astype(np.float32))
    for dense in (wide, tall.Stack([wide[:, :3], wide[:, 3:]], [1.0, 1.0])):
        np.testing.assert_allclose(tall.times(dense, small, transposed=True), (wide @ small).T, rtol=1e-13, atol=1e-12)


def test_lazy_svd_of_float32_factors_matches_the_float64_truncation() -> None:
    rng = np.random.default_rng(4)
    b = (rng.standard_normal((3000, 9)) * np.logspace(0, -3, 9)).astype(np.float32)
    a = rng.standard_normal((9, 2500)).astype(np.float32)
    reference = truncate(b.astype(np.float64), a.astype(np.float64).T, 4)
    parts = svd_of_factors(b, a.T)
    np.testing.assert_allclose(parts.s, reference.singular_values, rtol=1e-12)
    b4, a4 = parts.balanced(4, np.float32, scale_b=-2.0, scale_a=0.5)
    assert b4.dtype == a4.dtype == np.float32 and a4.flags.c_contiguous
    np.testing.assert_allclose(b4.astype(np.float64) @ a4, -(reference.b @ reference.a), rtol=1e-5,
                               atol=1e-6 * np.abs(reference.b @ reference.a).max())


@pytest.mark.parametrize("spread", [1.0, 10.0, 60.0, 1e3])
def test_cholesky_route_only_where_it_is_as_orthogonal_as_the_eigen_route(spread: float) -> None:
    """orthonormal_factor's Cholesky shortcut: its κ bound must never be below the true
    κ(XᵀX), and the q it gives must be orthonormal to the eigen route's 1e-10."""
    from lora_tools.linalg.qr import _ORTHO_TOL, _cholesky_factor, orthonormal_factor

    rng = np.random.default_rng(int(spread))
    m, k = 2048, 64
    x = rng.standard_normal((m, k)) * np.geomspace(1.0, 1.0 / spread, k)  # κ(X) ≈ spread
    gram = x.T @ x
    eig = np.linalg.eigvalsh(gram)
    quick = _cholesky_factor(gram)
    if quick is None:
        assert k * np.finfo(float).eps * eig[-1] / eig[0] > _ORTHO_TOL / 1e3  # refused only near the line
    else:
        t, r = quick
        q = x @ t
        assert np.abs(q.T @ q - np.eye(k)).max() <= _ORTHO_TOL
        np.testing.assert_allclose(q @ r, x, atol=1e-13 * np.abs(x).max())
    base, t, r = orthonormal_factor(x)
    q = np.asarray(base) @ t
    assert np.abs(q.T @ q - np.eye(q.shape[1])).max() <= _ORTHO_TOL
    if spread in (1.0, 1e3):  # random factors take the shortcut, badly skewed ones never
        assert (quick is not None) == (spread == 1.0)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("stored", [np.float32, np.float64, np.float16])
def test_single_blocks_tile_the_product_within_float32_rounding(transposed: bool, stored: type) -> None:
    """Blocks cover the result exactly once, and each equals the float64 product to float32's
    accuracy (float32-stored X multiplied in float32, others in float64)."""
    from lora_tools.io.encode import encode_blocks, float32_to_bf16_bits

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3001, 24)).astype(stored)
    base = tall.as_tall(x.T.copy().T if transposed else x)  # Aᵀ of a C-ordered A is F-ordered
    small = rng.standard_normal((24, 7))
    exact = x.astype(np.float64) @ small
    exact = exact.T if transposed else exact
    seen = np.zeros(exact.shape, dtype=int)
    for index, block in tall.single_blocks(base, small, transposed=transposed):
        seen[index] += 1
        bound = 1e-6 * np.abs(x.astype(np.float64)).max() * np.abs(small).sum(axis=0).max()
        assert np.abs(block - exact[index]).max() <= bound
    assert (seen == 1).all()
    encoded = encode_blocks(exact.shape, tall.single_blocks(base, small, transposed=transposed), "BF16")
    # each element rounds to the same bf16 as the exact value, or to a neighbour when the
    # float32 product sits on the other side of a rounding boundary: at most one bf16 step
    reference = float32_to_bf16_bits(exact).astype(np.int32)
    assert np.abs(encoded.bits.astype(np.int32) - reference).max() <= 1
    assert (np.asarray(encoded) == np.asarray(encoded.reshape(-1)).reshape(exact.shape)).all()


def test_encode_blocks_equals_whole_encoding_and_refuses_overflow() -> None:
    from lora_tools.io.encode import Encoded, WriteError, encode_array, encode_blocks, float32_to_bf16_bits

    rng = np.random.default_rng(4)
    values = (rng.standard_normal((300, 17)) * 1e3).astype(np.float32)
    rows = [(np.s_[lo:lo + 64, :], values[lo:lo + 64].copy()) for lo in range(0, 300, 64)]
    columns = [(np.s_[:, lo:lo + 5], np.ascontiguousarray(values[:, lo:lo + 5])) for lo in range(0, 17, 5)]
    for blocks in (rows, columns):
        encoded = encode_blocks(values.shape, blocks, "BF16")
        assert isinstance(encoded, Encoded) and encoded.shape == values.shape
        assert (encoded.bits == float32_to_bf16_bits(values)).all()
    for code in ("F16", "F32", "F64"):
        assert (encode_blocks(values.shape, [(np.s_[:], values)], code).bits == encode_array(values, code)).all()
    too_big = values.astype(np.float64)
    too_big[7, 3] = 1e300
    with pytest.raises(WriteError, match="overflow BF16"):
        encode_blocks(values.shape, [(np.s_[:], too_big)], "BF16")
    with pytest.raises(WriteError, match="overflow F16"):
        encode_blocks(values.shape, [(np.s_[:], values * 100)], "F16")


def test_deferred_tensor_reshapes_waits_and_passes_errors_on() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from lora_tools.io.encode import Deferred, WriteError, storable

    values = np.arange(24, dtype=np.float32).reshape(6, 4)
    with ThreadPoolExecutor(1) as pool:
        ok = pool.submit(lambda: (values, values.T))
        first, second = Deferred(ok, 0, (6, 4)), Deferred(ok, 1, (4, 6))
        assert storable(first) is first and np.shape(first) == (6, 4) and first.size == 24
        conv = second.reshape(4, -1, 1, 1)
        assert conv.shape == (4, 6, 1, 1) and (np.asarray(conv)[..., 0, 0] == values.T).all()
        with pytest.raises(ValueError, match="cannot reshape"):
            first.reshape(5, 5)

        def fails() -> tuple[np.ndarray, np.ndarray]:
            raise WriteError("layer: values overflow BF16")

        broken = Deferred(pool.submit(fails), 0, (2, 2))
        with pytest.raises(WriteError, match="overflow"):
            np.asarray(broken)
