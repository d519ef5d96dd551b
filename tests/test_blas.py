"""substrate/_blas.py's gemm (c = a b + beta c on strided views, BLAS's dgemm called directly) against
NumPy's product, on every layout the kernels pass: row-major blocks of larger arrays (any row stride),
transposed views, one row or column, an empty inner dimension; the entries of the parent arrays
outside c unchanged. Tolerance 1e-13 of the entries (products of <= 45 terms of standard normals,
rounding ~1e-15)."""

import numpy as np
import pytest
from numba import njit

from substrate._blas import SCALARS, gemm


@njit(cache=False)
def _call(a, b, c, beta, scalars):
    gemm(a, b, c, beta, scalars)


def _view(rng, rows, cols, transposed):
    """A (rows, cols) view inside a larger array: a block of it, or a block's transpose."""
    if transposed:
        return rng.standard_normal((cols + 3, rows + 4))[1:1 + cols, 2:2 + rows].T
    return rng.standard_normal((rows + 2, cols + 5))[1:1 + rows, 2:2 + cols]


@pytest.mark.parametrize("m,k,n", [(3, 4, 5), (1, 4, 5), (3, 1, 5), (3, 4, 1), (1, 1, 1), (30, 45, 12), (4, 0, 3)])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("beta", [0, 1])
def test_gemm_equals_numpy_on_every_layout(m, k, n, ta, tb, beta):
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    a, b = _view(rng, m, k, ta), _view(rng, k, n, tb)
    parent = rng.standard_normal((m + 2, n + 7))
    c = parent[1:1 + m, 3:3 + n]
    expected = parent.copy()
    expected[1:1 + m, 3:3 + n] = a @ b + beta * c
    _call(a, b, c, beta, SCALARS)
    np.testing.assert_allclose(parent, expected, rtol=0, atol=1e-13)


def test_gemm_refuses_mismatched_shapes_and_an_output_without_unit_stride():
    a, b = np.ones((3, 4)), np.ones((4, 5))
    with pytest.raises(ValueError, match="shapes do not match"):
        _call(a, b, np.zeros((3, 4)), 0, SCALARS)
    with pytest.raises(ValueError, match="unit stride"):
        _call(a, b, np.zeros((5, 3)).T, 0, SCALARS)
