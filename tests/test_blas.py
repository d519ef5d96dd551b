"""substrate/_blas.py's gemm (c = a b + beta c on strided views, BLAS's dgemm called directly) and
gemm_small (c += a b by hand) against NumPy's product, on every layout the kernels pass: row-major
blocks of larger arrays (any row stride), transposed views, one row or column, an empty inner
dimension; the entries of the parent arrays outside c unchanged (gemm_small's masked columns write
nothing beyond c's). Tolerance 1e-13 of the entries (products of <= 45 terms of standard normals,
rounding ~1e-15)."""

import numpy as np
import pytest
from numba import njit
from numba.core.errors import TypingError

from substrate._blas import SCALARS, gemm, gemm_small


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


@njit(cache=False)
def _call_small(a, b, c):
    gemm_small(a, b, c)


# every remainder of the 4 x 8 tiles: rows 1..9 (4 + 4 + 1), columns 1..17 (8 + 8 + 1), the benchmark's
# (12, 30, 30) and (12, 15, 15)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 7), (4, 8, 8), (5, 3, 9), (9, 17, 16), (12, 30, 30),
                                   (12, 15, 15), (13, 17, 17), (4, 0, 6), (7, 4, 12)])
@pytest.mark.parametrize("ta", [False, True])
def test_gemm_small_equals_numpy_and_writes_nothing_else(m, k, n, ta):
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    a, b = _view(rng, m, k, ta), _view(rng, k, n, False)
    parent = rng.standard_normal((m + 2, n + 7))
    c = parent[1:1 + m, 3:3 + n]
    expected = parent.copy()
    expected[1:1 + m, 3:3 + n] = a @ b + c
    _call_small(a, b, c)
    np.testing.assert_allclose(parent, expected, rtol=0, atol=1e-13)


def test_gemm_small_refuses_mismatched_shapes_and_operands_without_unit_stride():
    a, b = np.ones((3, 4)), np.ones((4, 5))
    with pytest.raises(ValueError, match="shapes do not match"):
        _call_small(a, b, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="unit stride"):
        _call_small(a, b, np.zeros((5, 3)).T)
    with pytest.raises(ValueError, match="unit stride"):
        _call_small(a, np.ones((5, 4)).T, np.zeros((3, 5)))
    with pytest.raises(TypingError):  # the tiles read and write float64 only
        _call_small(a.astype(np.float32), b.astype(np.float32), np.zeros((3, 5), np.float32))
