"""linalg.tall: low-precision factors used as float64 block by block give the products
of their float64 widening; the lazy SVD forms the same truncation as the dense one."""

from __future__ import annotations

import numpy as np
import pytest

from lora_tools.linalg import tall
from lora_tools.linalg.factored import svd_of_factors, truncate


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("fortran", [False, True])
def test_widened_products_equal_the_widened_matrix(dtype: type, fortran: bool) -> None:
    rng = np.random.default_rng(3)
    rows = 2 * tall.ROW_BLOCK + 37  # three blocks, the last one short
    x = rng.standard_normal((rows, 7)).astype(dtype)
    if fortran:
        x = np.asfortranarray(x)
    wide = x.astype(np.float64)
    small = rng.standard_normal((7, 5))
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
