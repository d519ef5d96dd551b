"""The DC operating point of a circuit (damped Newton on KCL, or relaxation of C dV/dt = F in time) and
its implicit gradient.

Newton: J d = -F at the free nodes, the step capped at ``max_step`` volts (a diode's exponential
would otherwise overshoot by orders of magnitude), then halved until |F|^2 decreases (Armijo; the
Newton direction always descends |F|^2), per sample. The linear systems are solved ``dense``
(LAPACK per sample; up to a few hundred free nodes), by ``cg`` (Jacobi-preconditioned conjugate
gradients on the sparse -J, symmetric positive definite for a reciprocal circuit: a Numba kernel)
or by ``splu`` (scipy's sparse LU, any circuit).

``substrate.relax`` runs the engine's methods on a circuit (``circuits.engine``); :func:`relax` here
adds what stiff circuits need and those explicit tableaux lack: linearly implicit Euler
(C/dt - J) dV = F dt (stable for any dt; Newton is its dt -> infinity limit), beside explicit Euler
of C dV/dt = F (what the hardware does, stable while dt g/C < 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.linalg import spsolve

from ..adjoint import Gradients
from ..counts import Counts
from ..errors import ConvergenceError, SubstrateValueError
from ..validate import choice, count, positive
from . import _kernels as K
from .circuit import Circuit, CircuitField, Clamp, Teach
from .engine import phase_counts

LINEAR = ("dense", "cg", "splu")


@dataclass(frozen=True)
class DCSolution:
    """An operating point. v: every node's voltage (batch, n); u: the free nodes' (batch, free);
    residual: max |F| per sample (amperes); iterations: Newton iterations or time steps; ok: every
    sample reached ``tol``; linear_iterations: CG iterations in all (``cg`` only); field: the
    :class:`CircuitField` it solved; nfev: evaluations of F; settle_time: the simulated seconds
    (:func:`relax`; 0 for Newton, which simulates no time)."""

    v: np.ndarray
    u: np.ndarray
    residual: np.ndarray
    iterations: int
    ok: bool
    method: str
    field: CircuitField
    linear_iterations: int = 0
    nfev: int = 0
    settle_time: float = 0.0

    @property
    def counts(self) -> Counts:
        """What this solve did (:func:`substrate.circuits.engine.phase_counts`): its iterations as
        steps, its evaluations of F, every conductance read at each, the free nodes read out once."""
        return phase_counts(self.field, steps=self.iterations, nfev=self.nfev, settle_time=self.settle_time)


class _Sparse:
    """The free-free Jacobian's CSR pattern and each stamp's slot in it; built once per circuit and
    set of free nodes (:func:`sparse_pattern`)."""

    def __init__(self, f: CircuitField):
        index = np.full(f.circuit.n + 1, -1)
        index[f.free] = np.arange(f.size)
        r, c = index[f.rows], index[f.cols]
        self.keep = np.flatnonzero((r >= 0) & (c >= 0))
        keys = r[self.keep] * f.size + c[self.keep]
        diag = np.arange(f.size) * (f.size + 1)
        uniq, self.slot = np.unique(keys, return_inverse=True)
        if not np.all(np.isin(diag, uniq)):
            raise SubstrateValueError("a free node has no element attached (its row of J is empty)")
        self.diag = np.searchsorted(uniq, diag)
        self.indices = (uniq % f.size).astype(np.int64)
        self.indptr = np.searchsorted(uniq // f.size, np.arange(f.size + 1)).astype(np.int64)
        self.nnz = len(uniq)

    def data(self, f: CircuitField, vals_b) -> np.ndarray:
        """The CSR values of one sample's J (with the nudge's beta on the outputs' diagonal)."""
        d = np.bincount(self.slot, weights=vals_b[self.keep], minlength=self.nnz)
        if f.teach is not None:
            d[self.diag[f._out]] += f.teach.beta
        return d

    def matrix(self, data, n):
        return csr_matrix((data, self.indices, self.indptr), shape=(n, n))


def sparse_pattern(f: CircuitField) -> _Sparse:
    """The :class:`_Sparse` of ``f``'s circuit and free nodes, cached on the circuit (sorting the
    stamps is most of a large circuit's set-up)."""
    key = ("sparse", f.free.tobytes())
    cache = f.circuit._cache
    if key not in cache:
        cache[key] = _Sparse(f)
    return cache[key]


def newton_direction(f: CircuitField, u, F, linear="dense", cg_tol=1e-12, pattern=None):
    """(d with J d = -F per sample, CG iterations). ``pattern``: a reusable :class:`_Sparse`."""
    if linear == "dense":
        return np.linalg.solve(f.jacobian(u), -F[..., None])[..., 0], 0
    vals = f.stamp_values(u)
    d, its = np.zeros_like(F), 0
    for b in range(f.batch):
        data = pattern.data(f, vals[b])
        if linear == "cg":  # -J d = F, -J symmetric positive definite
            k = K.cg(pattern.indptr, pattern.indices, -data, np.ascontiguousarray(F[b]), d[b], cg_tol, 10 * f.size)
            if k > 10 * f.size:
                raise SubstrateValueError("linear='cg': conjugate gradients did not converge; the Jacobian is "
                                          "not symmetric definite (a FET?): use linear='splu'")
            its += k
        else:
            d[b] = spsolve(pattern.matrix(data, f.size).tocsc(), -F[b])
    return d, its


# a Newton step below VTOL max(1 V, max|V|) is rounding: the iteration has converged
VTOL = 1e-13
# Newton iterations a stage of source stepping may take before its increment is halved
STAGE_ITERATIONS = 20
# the largest step of the voltage sources between two stages of source stepping (volts): a junction
# overshoots by at most ~exp(RAMP / n V_T) (~50 at 0.1 V), which Newton removes in a few iterations
RAMP = 0.1


def _newton(f, u, tol, max_iter, max_step, linear, cg_tol, pattern):
    """Damped Newton from u: (u, residual per sample, converged per sample, iterations, CG iterations). A
    sample has converged at max|F| <= tol, or when its full Newton step is below ``VTOL`` relative
    to its voltages (the residual's rounding floor grows with the currents that cancel at a node)."""
    F = f(u)
    res, its, cg_its = np.max(np.abs(F), axis=1, initial=0.0), 0, 0
    done = res <= tol
    while its < max_iter and not np.all(done):
        its += 1
        d, k = newton_direction(f, u, F, linear, cg_tol, pattern)
        cg_its += k
        size = np.max(np.abs(d), axis=1, initial=0.0)
        # a full step this small is below the voltages' rounding: converged whatever the residual's floor
        done |= size <= VTOL * np.maximum(1.0, np.max(np.abs(u), axis=1, initial=0.0))
        alpha = np.where(done, 0.0, np.minimum(1.0, max_step / np.maximum(size, 1e-300)))
        phi0 = np.sum(F * F, axis=1)
        todo = alpha > 0
        for _ in range(60):
            un = u + alpha[:, None] * d
            Fn = f(un)
            better = np.sum(Fn * Fn, axis=1) <= (1 - 1e-4 * alpha) * phi0
            take = todo & better
            u[take], F[take] = un[take], Fn[take]
            todo &= ~better
            if not todo.any():
                break
            alpha = alpha / 2
        res = np.max(np.abs(F), axis=1, initial=0.0)
        done |= res <= tol
        if not np.all(np.isfinite(res)) or (todo.any() and np.all(alpha[todo] * size[todo] < 1e-15)):
            break  # no decrease along a vanishing step, or diverged
    return u, res, done, its, cg_its


def dc(circuit: Circuit, x, *, u0=None, clamp: Clamp | None = None, teach: Teach | None = None, tol=1e-10,
       max_iter=1000, max_step=0.5, linear="dense", cg_tol=1e-12, on_failure="raise") -> DCSolution:
    """The DC operating point F = 0 by damped Newton (see the module docstring) to max |F| <= ``tol``
    amperes at every sample (or a Newton step below rounding, ``VTOL``), from ``u0`` (batch, free
    nodes), or else from 0 V, falling back, for a sample whose Newton solve does not converge within
    ``STAGE_ITERATIONS``, to source stepping: its voltage sources ramped from 0 to their values in
    increments of at most ``RAMP`` volts, each stage solved from the last, an increment halved after
    a stage that does not converge. (Newton started far up a diode's exponential comes down only one
    n V_T per iteration: from 0 V, a diode from an input at 1.5 V takes ~60 iterations; a ramp keeps
    every stage near its solution.) ``max_iter``: Newton iterations in all."""
    choice(linear, "dc(linear)", LINEAR)
    choice(on_failure, "dc(on_failure)", ("raise", "return"))
    positive(tol, "dc(tol)")
    positive(max_step, "dc(max_step)")
    count(max_iter, "dc(max_iter)")
    f = CircuitField(circuit, x, clamp, teach)
    pattern = sparse_pattern(f) if linear != "dense" else None
    if u0 is not None:
        u, res, done, its, cg_its = _newton(f, f.state(u0), tol, max_iter, max_step, linear, cg_tol, pattern)
    else:  # source stepping, per sample
        base, u, its, cg_its = f._base, np.zeros((f.batch, f.size)), 0, 0
        first = np.minimum(1.0, RAMP / np.maximum(np.max(np.abs(base), axis=1, initial=0.0), 1e-300))
        s, ds = np.zeros(f.batch), np.ones(f.batch)  # the whole ramp first: most circuits need no more
        done = np.zeros(f.batch, bool)
        try:
            while its < max_iter and not np.all(done):
                live = ~done
                t = np.where(live, np.minimum(1.0, s + ds), 1.0)
                f._base = t[:, None] * base
                un, res, conv, k, c = _newton(f, u.copy(), tol, min(STAGE_ITERATIONS, max_iter - its), max_step,
                                              linear, cg_tol, pattern)
                its, cg_its = its + k, cg_its + c
                step = live & conv
                u[step], s[step] = un[step], t[step]
                failed = live & ~conv
                ds = np.where(step, np.minimum(2 * ds, first), ds)
                ds[failed] = np.where((ds[failed] >= 1) & (first[failed] < 1), first[failed], ds[failed] / 2)
                done = s >= 1.0
                if np.any(live & ~conv & (ds < 1e-6)):
                    break
        finally:
            f._base = base
        F = f(u)
        res = np.max(np.abs(F), axis=1, initial=0.0)
        done &= np.isfinite(res)
    ok = bool(np.all(done))
    if not ok and on_failure == "raise":
        raise ConvergenceError(f"dc: Newton did not reach max|F| <= {tol:g} A after {its} iterations (worst "
                               f"{np.max(res):.3g} A); raise max_iter or loosen tol", None)
    return DCSolution(f.full(u)[:, :-1], u, res, its, ok, f"newton/{linear}", f, cg_its, f.evaluations)


def relax(circuit: Circuit, x, *, method="implicit_euler", dt=None, u0=None, clamp=None, teach=None,
          tol=1e-10, max_steps=100_000, on_failure="raise") -> DCSolution:
    """The operating point reached by integrating C dV/dt = F(V) from ``u0`` (default 0 V) until
    max|F| <= ``tol``: ``euler`` (explicit; default dt = C_min / G_max with G the largest diagonal
    conductance at the start) or ``implicit_euler`` (linearly implicit; default dt 100 times that)."""
    choice(method, "relax(method)", ("euler", "implicit_euler"))
    choice(on_failure, "relax(on_failure)", ("raise", "return"))
    count(max_steps, "relax(max_steps)")
    positive(tol, "relax(tol)")
    f = CircuitField(circuit, x, clamp, teach)
    u = np.zeros((f.batch, f.size)) if u0 is None else np.array(u0, float)
    c = circuit.capacitance[f.free]
    if dt is None:
        G = np.max(-np.diagonal(f.jacobian(u), axis1=1, axis2=2), initial=1e-300)
        dt = float(np.min(c) / G) * (1.0 if method == "euler" else 100.0)
    dt = positive(dt, "relax(dt)")
    F, steps = f(u), 0
    res = np.max(np.abs(F), axis=1, initial=0.0)
    while steps < max_steps and np.all(np.isfinite(res)) and not np.all(res <= tol):
        steps += 1
        if method == "euler":
            u = u + dt * F / c
        else:  # (C/dt - J) du = F
            A = np.diag(c / dt)[None] - f.jacobian(u)
            u = u + np.linalg.solve(A, F[..., None])[..., 0]
        F = f(u)
        res = np.max(np.abs(F), axis=1, initial=0.0)
    ok = bool(np.all(res <= tol))
    if not ok and on_failure == "raise":
        why = "diverged (raise C or lower dt)" if not np.all(np.isfinite(res)) else f"stopped after {steps} steps"
        raise ConvergenceError(f"relax({method}, dt={dt:.3g}): {why}, worst max|F| {np.max(res):.3g} A > tol {tol:g}",
                               None)
    return DCSolution(f.full(u)[:, :-1], u, res, steps, ok, method, f, 0, f.evaluations, steps * dt)


def adjoint(f: CircuitField, u, rhs, linear="dense") -> np.ndarray:
    """lambda with J(u)^T lambda = rhs per sample."""
    if linear == "dense":
        return np.linalg.solve(np.swapaxes(f.jacobian(u), 1, 2), rhs[..., None])[..., 0]
    if f.circuit.reciprocal:  # J^T = J
        return -newton_direction(f, u, -rhs, linear, 1e-13, sparse_pattern(f))[0]
    p, vals = sparse_pattern(f), f.stamp_values(u)
    return np.stack([spsolve(p.matrix(p.data(f, vals[b]), f.size).T.tocsc(), rhs[b]) for b in range(f.batch)])


def gradient(circuit: Circuit, x, loss, *, linear="dense", tol=1e-12, **dc_options) -> Gradients:
    """dL/dtheta by implicit differentiation at the operating point: J^T lambda = -dL/du, dL/dtheta =
    (dF/dtheta)^T lambda. ``loss(v) -> (value, dL/dv)`` with v every node's voltage (batch, n).
    Returns a :class:`substrate.Gradients`: weights {"conductance"}, biases {"source_current"},
    inputs {"x"} (dL/dx: through the circuit and, at the input nodes, the loss's own dependence)."""
    sol = dc(circuit, x, tol=tol, linear=linear, **dc_options)
    f = sol.field
    value, g = loss(sol.v.copy())
    g = np.asarray(g, float)
    if g.shape != sol.v.shape or not np.all(np.isfinite(g)):
        raise SubstrateValueError(f"loss: dL/dv must be finite, shape {sol.v.shape} (batch, nodes), got {g.shape}")
    lam = adjoint(f, sol.u, -g[:, f.free], linear)
    p = f.param_vjp(sol.u, lam)
    dx = p["inputs"] + g[:, circuit.inputs]
    return Gradients(float(value), {"conductance": p["conductance"]}, {"source_current": p["source_current"]}, {},
                     {"x": dx}, np.zeros_like(sol.u), "implicit", None, adjoint=None)
