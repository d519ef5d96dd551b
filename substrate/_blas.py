"""BLAS's matrix product for compiled kernels, on strided views and accumulating: ``gemm(a, b, c, beta)``
is c = a b + beta c.

Numba's ``np.dot`` computes c = a b only, into a contiguous ``out``, and copies a strided operand to a
contiguous one first. The kernels of ``models/_pvrnn_kernels.py`` take products of blocks of larger
arrays (a layer's rows of a weight matrix, a step's columns of a trajectory) and sum products into one
array (gradients over steps, jumps from several layers), so they call BLAS's dgemm directly: a view
with a unit stride along one axis is passed as it is (its other stride is BLAS's leading dimension),
beta = 1 accumulates without a temporary. The call goes through ``numba_xxgemm``, the C function of
Numba's helper library that Numba's own ``np.dot`` and ``np.linalg`` call (it calls SciPy's
``scipy.linalg.cython_blas.dgemm``, the BLAS ``np.dot`` uses): a symbol resolved by name, so the
kernels that call it are cached. tests/test_blas.py checks it against ``np.dot`` on every layout.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  the BLAS numba_xxgemm loads (as numba.np.linalg.ensure_blas does)
from numba import njit, types

# int numba_xxgemm(char kind, char transa, char transb, Py_ssize_t m, n, k, void *alpha, void *a,
# Py_ssize_t lda, void *b, Py_ssize_t ldb, void *beta, void *c, Py_ssize_t ldc): column-major
# C = alpha op(A) op(B) + beta C (numba/_lapack.c)
_xxgemm = types.ExternalFunction("numba_xxgemm", types.intc(
    types.char, types.char, types.char, types.intp, types.intp, types.intp, types.CPointer(types.float64),
    types.CPointer(types.float64), types.intp, types.CPointer(types.float64), types.intp,
    types.CPointer(types.float64), types.CPointer(types.float64), types.intp))
_D, _N, _T = ord("d"), ord("n"), ord("t")

# alpha = 1 and the betas, as pointers (BLAS takes every argument by reference)
SCALARS = np.array([1.0, 0.0, 1.0])


@njit(inline="always")
def _operand(x):
    """(op, leading dimension) of a 2-D float64 view x (r, q) as a column-major BLAS operand: row-major
    storage (unit stride along axis 1) is x^T column-major, op 'n' on x^T; a transposed view (unit stride
    along axis 0) is x column-major, op 't'. A view of one row or column counts as row-major (its other
    stride is then not a dimension: the leading dimension is q, as BLAS requires ld >= q)."""
    r, q = x.shape
    if x.strides[1] == 8 or q == 1:
        return _N, max(x.strides[0] // 8, q, 1) if r > 1 else max(q, 1)
    if x.strides[0] == 8 or r == 1:
        return _T, max(x.strides[1] // 8, r, 1)
    raise ValueError("gemm: an operand without a unit stride")


@njit(cache=True)
def gemm(a, b, c, beta, scalars):
    """c = a b + beta c for float64 views a (m, k), b (k, n), c (m, n); beta 0 or 1; c row-major
    (unit stride along axis 1), a and b row-major or transposes of row-major arrays (``w.T``); any row
    stride. ``scalars``: :data:`SCALARS`. Row-major c = a b is column-major c^T = b^T a^T: BLAS's A is
    b's storage, its B a's. Not inlined: PV-RNN training calls it at ~25 places, and inlined there its
    first call (benchmarks/bench_pvrnn_train.py's cold child) compiled in 82 CPU s against 51."""
    m, k = a.shape
    n = c.shape[1]
    if b.shape[0] != k or b.shape[1] != n or c.shape[0] != m:
        raise ValueError("gemm: shapes do not match")
    if m == 0 or n == 0:
        return
    if c.strides[1] != 8 and n > 1:
        raise ValueError("gemm: the output without a unit stride along its rows")
    ldc = max(c.strides[0] // 8, n, 1) if m > 1 else max(n, 1)
    op_b, ldb = _operand(b)
    op_a, lda = _operand(a)
    _xxgemm(_D, op_b, op_a, n, m, k, scalars[0:].ctypes, b.ctypes, ldb, a.ctypes, lda,
            scalars[2 if beta else 1:].ctypes, c.ctypes, ldc)
