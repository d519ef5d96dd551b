"""Compiled kernels of the resistive-circuit substrate (``substrate.circuits``).

The neuron engine's kernels (``substrate._kernels``) take layered weight blocks and a per-neuron
activation rho(u); a circuit has two-terminal and three-terminal elements between arbitrary nodes,
so it has these small kernels of its own. Layout: node voltages are (batch, N + 1), sample-major, the
last column the ground (always 0), so that an element wired to ground needs no branch. Every
element's derivative is a list of *stamps* (row, column, value): dF_row/dV_column, as SPICE stamps
a matrix; J v, J^T w, a dense or sparse Jacobian are products with the stamps.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
from numba import njit as _njit

njit = partial(_njit, cache=True, error_model="numpy")


@njit(inline="always")
def _softplus(x, phi):
    """phi ln(1 + e^{x/phi}) and its derivative sigmoid(x/phi), without overflow."""
    z = x / phi
    if z > 0:
        e = math.exp(-z)
        return x + phi * math.log1p(e), 1.0 / (1.0 + e)
    e = math.exp(z)
    return phi * math.log1p(e), e / (1.0 + e)


@njit
def currents(V, ea, eb, g, da, db, dis, dnvt, fd, fg, fs, fk, fvth, fphi, snode, scur, out):
    """out[b, i] = the net current into node i (KCL residual F), for every sample b."""
    nb = V.shape[0]
    for b in range(nb):
        v, o = V[b], out[b]
        o[:] = 0.0
        for i in range(snode.shape[0]):
            o[snode[i]] += scur[i]
        for e in range(ea.shape[0]):
            a, c = ea[e], eb[e]
            i = g[e] * (v[a] - v[c])
            o[a] -= i
            o[c] += i
        for e in range(da.shape[0]):
            a, c = da[e], db[e]
            i = dis[e] * math.expm1((v[a] - v[c]) / dnvt[e])
            o[a] -= i
            o[c] += i
        for e in range(fd.shape[0]):
            d, gt, s = fd[e], fg[e], fs[e]
            s1, _ = _softplus(v[gt] - v[s] - fvth[e], fphi[e])
            s2, _ = _softplus(v[gt] - v[d] - fvth[e], fphi[e])
            i = fk[e] * (s1 * s1 - s2 * s2)  # drain to source through the channel
            o[d] -= i
            o[s] += i


@njit
def stamps(V, ea, eb, g, da, db, dis, dnvt, fd, fg, fs, fk, fvth, fphi, vals):
    """vals[b, k]: the k-th stamp's dF_row/dV_col at V (rows and columns: ``Circuit.stamp_rows/cols``):
    4 per conductance and diode (+-its differential conductance), 6 per FET (drain and source rows,
    drain, gate and source columns)."""
    nb = V.shape[0]
    ne, nd = ea.shape[0], da.shape[0]
    for b in range(nb):
        v, w = V[b], vals[b]
        for e in range(ne):
            k = 4 * e
            w[k], w[k + 1], w[k + 2], w[k + 3] = -g[e], g[e], g[e], -g[e]
        for e in range(nd):
            gd = dis[e] / dnvt[e] * math.exp((v[da[e]] - v[db[e]]) / dnvt[e])
            k = 4 * (ne + e)
            w[k], w[k + 1], w[k + 2], w[k + 3] = -gd, gd, gd, -gd
        for e in range(fd.shape[0]):
            s1, t1 = _softplus(v[fg[e]] - v[fs[e]] - fvth[e], fphi[e])
            s2, t2 = _softplus(v[fg[e]] - v[fd[e]] - fvth[e], fphi[e])
            did = 2.0 * fk[e] * s2 * t2  # dI/dV_drain
            dis_ = -2.0 * fk[e] * s1 * t1  # dI/dV_source
            dig = -(did + dis_)  # dI/dV_gate
            k = 4 * (ne + nd) + 6 * e
            w[k], w[k + 1], w[k + 2] = -did, -dig, -dis_
            w[k + 3], w[k + 4], w[k + 5] = did, dig, dis_


@njit
def stamp_product(vals, rows, cols, v, out):
    """out[b, rows[k]] += vals[b, k] v[b, cols[k]] (J v; with rows and cols swapped, J^T v)."""
    for b in range(vals.shape[0]):
        o, x, w = out[b], v[b], vals[b]
        o[:] = 0.0
        for k in range(rows.shape[0]):
            o[rows[k]] += w[k] * x[cols[k]]


@njit
def dense_stamps(vals, rows, cols, J):
    """J[b, rows[k], cols[k]] += vals[b, k] (J zeroed here)."""
    for b in range(vals.shape[0]):
        J[b] = 0.0
        for k in range(rows.shape[0]):
            J[b, rows[k], cols[k]] += vals[b, k]


@njit
def cg(indptr, indices, data, rhs, x, tol, max_iter):
    """Jacobi-preconditioned conjugate gradients for A x = rhs, A symmetric positive definite in CSR
    (the negated Jacobian of a reciprocal circuit); x holds the start and the result. Stops at
    ||A x - rhs|| <= tol ||rhs||; returns the iterations (max_iter + 1 if it did not converge)."""
    n = rhs.shape[0]
    dinv = np.empty(n)
    for i in range(n):
        d = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            if indices[k] == i:
                d += data[k]
        dinv[i] = 1.0 / d
    r, z, p, q = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    _csr_times(indptr, indices, data, x, q)
    bnorm = 0.0
    for i in range(n):
        r[i] = rhs[i] - q[i]
        bnorm += rhs[i] * rhs[i]
    stop = tol * tol * bnorm
    rz = 0.0
    for i in range(n):
        z[i] = dinv[i] * r[i]
        p[i] = z[i]
        rz += r[i] * z[i]
    for it in range(max_iter):
        rr = 0.0
        for i in range(n):
            rr += r[i] * r[i]
        if rr <= stop:
            return it
        _csr_times(indptr, indices, data, p, q)
        pq = 0.0
        for i in range(n):
            pq += p[i] * q[i]
        alpha = rz / pq
        rz_new = 0.0
        for i in range(n):
            x[i] += alpha * p[i]
            r[i] -= alpha * q[i]
            z[i] = dinv[i] * r[i]
            rz_new += r[i] * z[i]
        beta = rz_new / rz
        rz = rz_new
        for i in range(n):
            p[i] = z[i] + beta * p[i]
    return max_iter + 1


@njit
def _csr_times(indptr, indices, data, x, out):
    for i in range(out.shape[0]):
        s = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            s += data[k] * x[indices[k]]
        out[i] = s
