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

``gemm_small(a, b, c)`` is c += a b by hand, for products too small for BLAS to pay (PV-RNN training's
per-step products, (12 x 30)(30 x 30) and (12 x 15)(15 x 15) in benchmarks/bench_pvrnn_train.py, ~800
calls an epoch): dgemm packs both operands into its own layout on every call, which at these sizes costs
as much as the arithmetic. The hand kernel reads them in place, in tiles of 4 rows of c by 8 columns held
in eight 4-wide registers, summed over a's columns by explicit fused multiply-adds (LLVM's ``llvm.fma``,
written as IR: Numba's loops do not vectorise into register tiles, and contraction by fastmath flags may
differ between the compiled copies of a kernel, explicit FMAs cannot), the last columns by masked loads
and stores. benchmarks/bench_pvrnn_train.py times both: over three runs 1.5-2.1x dgemm's speed on
(12 x 30)(30 x 30), 1.7-1.9x on (12 x 15)(15 x 15).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  the BLAS numba_xxgemm loads (as numba.np.linalg.ensure_blas does)
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

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


# ------------------------------------------------------------------------------------ c += a b by hand
_F64, _I64, _I32 = ir.DoubleType(), ir.IntType(64), ir.IntType(32)
_V4, _I64x4, _MASK = ir.VectorType(_F64, 4), ir.VectorType(_I64, 4), ir.VectorType(ir.IntType(1), 4)


def _tile_intrinsic(rows, masked):
    """An intrinsic (a, b, c, i0, j0, width): c[i0:i0 + rows, j0:j0 + 8] += a[i0:i0 + rows, :] b[:, j0:j0 + 8],
    its rows x 8 sums in 2 x rows registers of 4 lanes, the loop over a's columns k: the row k of b's tile
    loaded once (two vectors), each a[i, k] broadcast, one FMA per register. ``masked``: only the first
    ``width`` columns of the tile are read and written (masked loads and stores: nothing beyond them is
    touched), else width is 8. Rows of b and c need a unit stride along axis 1; a any strides."""

    @intrinsic
    def tile(typingctx, a, b, c, i0, j0, width):
        if not all(isinstance(x, types.Array) and x.dtype == types.float64 and x.ndim == 2 for x in (a, b, c)):
            return None  # a typing error: the code below reads and writes float64 matrices only

        def codegen(context, builder, signature, args):
            arrays = [context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:3], args[:3])]
            (pa, pb, pc), (i0_, j0_, width_) = arrays, args[3:]
            k_end = cgutils.unpack_tuple(builder, pa.shape, 2)[1]

            def at(array, i, j):  # the address of array[i, j], from its byte strides
                s0, s1 = cgutils.unpack_tuple(builder, array.strides, 2)
                offset = builder.add(builder.mul(i, s0), builder.mul(j, s1))
                return builder.inttoptr(builder.add(builder.ptrtoint(array.data, _I64), offset), _F64.as_pointer())

            def splat(x, vty):
                v = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(_I32, 0))
                zeros = ir.Constant(ir.VectorType(_I32, 4), [0] * 4)
                return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)

            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V4, [_V4] * 3), "llvm.fma.v4f64")
            if masked:
                ptr = _V4.as_pointer()
                load = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V4, [ptr, _I32, _MASK, _V4]),
                                                      "llvm.masked.load.v4f64.p0")
                store = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), [_V4, ptr, _I32, _MASK]), "llvm.masked.store.v4f64.p0")
                lanes = splat(width_, _I64x4)
                masks = [builder.icmp_signed("<", ir.Constant(_I64x4, [4 * h + q for q in range(4)]), lanes)
                         for h in range(2)]

            def vload(p, h):
                p = builder.bitcast(p, _V4.as_pointer())
                if masked:
                    return builder.call(load, [p, ir.Constant(_I32, 8), masks[h], ir.Constant(_V4, [0.0] * 4)])
                return builder.load(p, align=8)

            def vstore(v, p, h):
                p = builder.bitcast(p, _V4.as_pointer())
                if masked:
                    builder.call(store, [v, p, ir.Constant(_I32, 8), masks[h]])
                else:
                    builder.store(v, p, align=8)

            row = [builder.add(i0_, ir.Constant(_I64, i)) for i in range(rows)]
            col = [builder.add(j0_, ir.Constant(_I64, 4 * h)) for h in range(2)]
            start = [vload(at(pc, row[i], col[h]), h) for i in range(rows) for h in range(2)]
            entry = builder.block
            head, body, end = (builder.append_basic_block(f"tile.{x}") for x in ("head", "body", "end"))
            builder.branch(head)
            builder.position_at_end(head)
            k = builder.phi(_I64)
            k.add_incoming(ir.Constant(_I64, 0), entry)
            acc = []
            for v in start:
                acc.append(builder.phi(_V4))
                acc[-1].add_incoming(v, entry)
            builder.cbranch(builder.icmp_signed("<", k, k_end), body, end)
            builder.position_at_end(body)
            bk = [vload(at(pb, k, col[h]), h) for h in range(2)]
            new = []
            for i in range(rows):
                aik = splat(builder.load(at(pa, row[i], k)), _V4)
                new += [builder.call(fma, [aik, bk[h], acc[2 * i + h]]) for h in range(2)]
            k.add_incoming(builder.add(k, ir.Constant(_I64, 1)), builder.block)
            for p, v in zip(acc, new):
                p.add_incoming(v, builder.block)
            builder.branch(head)
            builder.position_at_end(end)
            for i in range(rows):
                for h in range(2):
                    vstore(acc[2 * i + h], at(pc, row[i], col[h]), h)
            return context.get_dummy_value()

        return types.void(a, b, c, i0, j0, width), codegen

    return tile


_TILE4, _TILE1, _TILE4_MASKED, _TILE1_MASKED = (_tile_intrinsic(r, m) for m in (False, True) for r in (4, 1))


@njit(cache=True)
def gemm_small(a, b, c):
    """c += a b for float64 a (m, k), b (k, n), c (m, n); b and c with a unit stride along axis 1 (rows
    of a larger array will do), a any strides. By hand, for small products (module docstring): every
    4 rows of c a register tile per 8 columns, the last columns (n mod 8) by a masked one, the last rows
    (m mod 4) one at a time."""
    m, k = a.shape
    n = c.shape[1]
    if b.shape[0] != k or b.shape[1] != n or c.shape[0] != m:
        raise ValueError("gemm_small: shapes do not match")
    if (b.strides[1] != 8 and n > 1) or (c.strides[1] != 8 and n > 1):
        raise ValueError("gemm_small: b or c without a unit stride along its rows")
    m4, n8 = m - m % 4, n - n % 8
    for i in range(0, m, 4):
        if i < m4:
            for j in range(0, n8, 8):
                _TILE4(a, b, c, i, j, 8)
            if n > n8:
                _TILE4_MASKED(a, b, c, i, n8, n - n8)
        else:
            for r in range(i, m):
                for j in range(0, n8, 8):
                    _TILE1(a, b, c, r, j, 8)
                if n > n8:
                    _TILE1_MASKED(a, b, c, r, n8, n - n8)
