"""The engine's entry points on a circuit: :func:`substrate.relax`, :func:`substrate.integrate` and
:func:`substrate.gradient` dispatch here when given a :class:`~substrate.circuits.Circuit`
(docs/equations.md, section 10).

The neuron engine's compiled stepping kernel (``_kernels.run``) computes F through packed layered
weight blocks and a per-neuron activation; a circuit's F is a sum over elements between arbitrary
nodes (``circuits._kernels``), which that kernel cannot call (Numba would need the field as a
compiled first-class function, and the kernel's fused stage passes assume W rho(u)). So the circuit
is stepped here, in Python, with the engine's own steppers: the same ``METHODS`` (their tableaux,
and the exponential methods' coefficients from ``_kernels.coefficients``), in the engine's
coefficient form

    Y_0 = u,  Y_i = alpha_i u + sum_{j<i} coef_ij S_j,  u_next = Y_s,

with the slope S = F(Y)/C for an explicit Runge-Kutta method and S = N(Y) = Y + F(Y)/G for an
exponential one, where C dV/dt = F = -G V + G N(V) splits off the leak G = -diag J at the start
(treated exactly; tau = C/G). The field protocol this needs is a :class:`CircuitField`'s: F, J v,
J^T v, the dense J, the parameter VJP and the state's shape. Gradients: ``implicit`` (J^T lambda =
-dL/du at the relaxed operating point, by LU or GMRES) and ``discrete`` (backpropagation through the
steps above, every step's state stored and its stages recomputed; explicit methods only, as an
exponential method's leak, and so its coefficients, depend on the conductances).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.sparse.linalg import LinearOperator, gmres

from .. import _kernels as EK
from ..adjoint import AdjointSolve, Gradients, check_solver, get_adjoint
from ..counts import Counts
from ..errors import (
    ConvergenceError,
    DivergenceError,
    StepSizeError,
    SubstrateValueError,
)
from ..integrators import Solution, _check_times, get_method
from ..validate import choice, count, nonnegative, positive
from .circuit import Circuit, CircuitField, Teach


def phase_counts(f: CircuitField, *, steps: int, nfev: int, settle_time: float = 0.0, reads: int = 1) -> Counts:
    """What one phase (a relaxation or a DC solve) of ``f``'s circuit over its batch did: ``steps``
    (time steps or Newton iterations), ``nfev`` evaluations of the currents F, ``settle_time`` (the
    simulated seconds, 0 for a DC solve, which simulates no time), per sample every conductance read
    by each evaluation (macs: E x nfev), the voltage sources set once (dac: the inputs and any clamp),
    the free nodes read out ``reads`` times (adc), held in digital memory."""
    b, c = f.batch, f.circuit
    held = f.size * b * reads
    sources = len(c.inputs) + (len(f.clamp.nodes) if f.clamp is not None else 0)
    return Counts(samples=b, phases=1, steps=steps, nfev=nfev, settle_time=float(settle_time) * b,
                  macs=len(c.edges) * nfev * b, dac=sources * b, adc=held, memory=held, traffic=held)


@dataclass(frozen=True)
class CircuitSolution(Solution):
    """A :class:`substrate.Solution` of a circuit: u are the free nodes' voltages (``field.free``);
    ``v`` every node's voltage (the last axis ``circuit.n`` long); ``counts`` from
    :func:`phase_counts`."""

    v: np.ndarray | None = None

    @cached_property
    def counts(self):
        reads = int(np.count_nonzero(np.atleast_1d(self.t) > self.t_start))
        return phase_counts(self.field, steps=self.steps, nfev=self.nfev, settle_time=self.t_final - self.t_start,
                            reads=max(reads, 1))


class _Stepper:
    """One of the engine's methods on a circuit field (see the module docstring): ``step(u, h)`` ->
    (u_next, error estimate or None, the stage points and slopes)."""

    def __init__(self, method, f: CircuitField, u0):
        self.method = get_method(method)
        family, self.kind, self.a, self.bw, self.e, self.fsal, self.adaptive = self.method.kernel_args()
        self.family = family
        self.exponential = family == EK.EXPONENTIAL
        self.s = len(self.bw)
        self.f = f
        c = f.circuit.capacitance[f.free]
        # the leak G = -diag J at the start (the smallest over the batch), and tau = C/G, the default step's scale
        g = -_diagonal(f, u0).min(axis=0)
        if np.any(g <= 0):
            raise SubstrateValueError("a free node has no conductance to ground or a source at the start (-diag J "
                                      "<= 0): the circuit's time constants C/G are undefined")
        self.tau = c / g
        self.w, self.sigma = (1.0 / g, 1.0) if self.exponential else (1.0 / c, 0.0)
        self.nfev = 0
        self._h = None

    def slope(self, y):
        self.nfev += 1
        return self.f(y) * self.w + self.sigma * y

    def coefficients(self, h):
        if h != self._h:
            n = self.f.size
            alpha, coef = np.empty((self.s + 1, n)), np.zeros((self.s + 1, self.s, n))
            EK.coefficients(self.family, self.kind, float(h), self.a, self.bw, 1.0 / self.tau, alpha, coef)
            self._h, self._c = h, (alpha, coef)
        return self._c

    def step(self, u, h, s0=None):
        alpha, coef = self.coefficients(h)
        ys, ss = [u], [self.slope(u) if s0 is None else s0]
        for i in range(1, self.s + 1):
            y = alpha[i] * u
            for j in range(i):
                if np.any(coef[i, j]):
                    y = y + coef[i, j] * ss[j]
            ys.append(y)
            if i < self.s:
                ss.append(self.slope(y))
        err = h * sum(e * s for e, s in zip(self.e, ss) if e) if self.adaptive else None
        return ys[-1], err, ys, ss

    def backward(self, u, h, ybar_next, grads):
        """dL/du of one step from dL/du_next (recomputing its stages), adding its parameter VJP to
        ``grads``."""
        alpha, coef = self.coefficients(h)
        _, _, ys, _ = self.step(u, h)
        ybar = {self.s: ybar_next}
        ubar = alpha[self.s] * ybar_next
        for i in range(self.s - 1, -1, -1):
            sbar = sum(coef[k, i] * ybar[k] for k in range(i + 1, self.s + 1) if np.any(coef[k, i]))
            if np.isscalar(sbar):  # the stage feeds nothing (dopri5's last, FSAL stage): no adjoint
                ybar[i] = np.zeros_like(ybar_next)
                continue
            ws = self.w * sbar
            yb = self.sigma * sbar + self.f.vjp(ys[i], ws)
            p = self.f.param_vjp(ys[i], ws)
            for k in grads:
                grads[k] = grads[k] + p[k]
            if i == 0:
                ubar = ubar + yb
            else:
                ybar[i] = yb
                ubar = ubar + alpha[i] * yb
        return ubar


def _diagonal(f: CircuitField, u) -> np.ndarray:
    """diag J per sample (batch, free nodes), from the stamps on the diagonal (no dense J)."""
    on = np.flatnonzero(f.rows == f.cols)
    index = np.full(f.circuit.n + 1, -1)
    index[f.free] = np.arange(f.size)
    col = index[f.rows[on]]
    keep = col >= 0
    vals = f.stamp_values(u)[:, on[keep]]
    d = np.zeros((f.batch, f.size))
    np.add.at(d, (slice(None), col[keep]), vals)
    if f.teach is not None:
        d[:, f._out] += f.teach.beta
    return d


def _field(circuit, x, nudge, dtype, batch, clamp):
    if not isinstance(circuit, Circuit):
        raise SubstrateValueError(f"expected a substrate.circuits.Circuit, got {type(circuit).__name__}")
    if nudge is not None and not isinstance(nudge, Teach):
        raise SubstrateValueError(f"a circuit's nudge is a current at its outputs, a substrate.circuits.Teach(beta, "
                                  f"target); got {type(nudge).__name__}")
    if dtype is not None and np.dtype(dtype) != np.float64:
        raise SubstrateValueError(f"dtype={dtype!r}: a circuit's voltages are float64")
    if batch is not None:
        raise SubstrateValueError("batch: a circuit's batch is the first axis of x (one row of input voltages "
                                  "per sample)")
    return CircuitField(circuit, x, clamp, nudge)


def _start(f, u0):
    return np.zeros((f.batch, f.size)) if u0 is None else f.state(u0)


def _initial_step(st: _Stepper, u, rtol, atol):
    """Hairer, Norsett & Wanner's starting step, as the engine's ``_initial_step``."""
    f0 = st.slope(u)
    scale = np.maximum(atol + rtol * np.abs(u), np.finfo(float).tiny)
    d0, d1 = np.sqrt(np.mean((u / scale) ** 2)), np.sqrt(np.mean((f0 / scale) ** 2))
    h0 = 1e-6 * st.tau.min() if d0 < 1e-5 or d1 < 1e-5 else float(0.01 * d0 / d1)
    f1 = st.slope(u + h0 * f0)
    d2 = np.sqrt(np.mean(((f1 - f0) / scale) ** 2)) / h0
    order = st.method.order
    h1 = max(1e-6 * st.tau.min(), h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / (order + 1))
    return min(100 * h0, h1, 10 * st.tau.min())


# the PI controller of the engine's dopri5 (Hairer & Wanner II, IV.2): exponents, safety, bounds
_PI_ALPHA, _PI_BETA, _SAFETY, _GROW, _SHRINK = 0.7, 0.4, 0.9, 5.0, 0.2


def _march(st: _Stepper, u, t0, stops, *, dt, rtol, atol, max_steps, blowup, done=None, record=None):
    """Steps from t0 through the times ``stops`` (landing on each), or, with ``done(u, s0)`` (the
    residual test of :func:`relax`, given the step's first slope), until it holds. Returns (status,
    t, u, steps, rejected, saved states, the step sizes taken). ``record``: a list the accepted
    steps' start states are appended to (the discrete adjoint's)."""
    t, steps, rejected, saved, hs = t0, 0, 0, [], []
    h = dt if dt is not None else _initial_step(st, u, rtol, atol)
    h_min = 1e-12 * max(abs(t0), abs(stops[-1]) if math.isfinite(stops[-1]) else 0.0, st.tau.min())
    err_prev, s0, k = 1e-4, None, 0
    while True:
        while k < len(stops) and t >= stops[k]:
            saved.append(u)
            k += 1
        if k == len(stops):
            return "success", t, u, steps, rejected, saved, hs
        if s0 is None:
            s0 = st.slope(u)
        if done is not None and done(u, s0):
            return "converged", t, u, steps, rejected, saved, hs
        if steps >= max_steps:
            return "max_steps", t, u, steps, rejected, saved, hs
        hh = min(h, stops[k] - t)
        un, err, _, ss = st.step(u, hh, s0)
        if st.adaptive:
            sc = atol + rtol * np.maximum(np.abs(u), np.abs(un))
            e = float(np.sqrt(np.mean((err / sc) ** 2))) if err.size else 0.0
            if not e <= 1.0:  # NaN too
                rejected += 1
                h = hh * max(_SHRINK, _SAFETY * e ** (-1 / 5)) if math.isfinite(e) else hh * _SHRINK
                if h < h_min:
                    return "step_too_small", t, u, steps, rejected, saved, hs
                continue
            fac = _SAFETY * max(e, 1e-10) ** (-_PI_ALPHA / 5) * err_prev ** (_PI_BETA / 5)
            h = hh * min(_GROW, max(_SHRINK, fac))
            err_prev = max(e, 1e-4)
        if record is not None:
            record.append(u)
        steps += 1
        hs.append(hh)
        t = stops[k] if hh == stops[k] - t else t + hh  # landing on a stop exactly
        u = un
        # FSAL: the last stage point is u_next (bit for bit), its slope the next step's first
        s0 = ss[-1] if st.fsal else None
        if not np.all(np.isfinite(u)) or np.max(np.abs(u), initial=0.0) > blowup:
            return "diverged", t, u, steps, rejected, saved, hs


def _finish(sol, on_failure, what):
    if sol.ok or on_failure == "return":
        return sol
    err = {"diverged": DivergenceError, "step_too_small": StepSizeError}.get(sol.status, ConvergenceError)
    raise err(f"{what} failed: {sol.report()}", sol)


def _solution(f, st, status, t, t_eval, u_saved, u_final, steps, rejected, t0, message=""):
    v = np.stack([f.full(u)[:, :-1] for u in u_saved]) if u_saved.ndim == 3 else f.full(u_saved)[:, :-1]
    return CircuitSolution(t=t_eval, u=u_saved, status=status, method=st.method.name, steps=steps, nfev=st.nfev,
                           rejected=rejected, residual=np.max(np.abs(f(u_final)), axis=1, initial=0.0), t_final=t,
                           message=message, field=f, t_start=t0, v=v)


def relax(circuit, x=None, *, method="exp_euler", dt=None, tol=1e-6, rtol=0.0, u0=None, dtype=None, batch=None,
          max_time=math.inf, max_steps=100_000, step_rtol=None, step_atol=None, blowup=1e10, nudge=None,
          on_failure="raise", clamp=None) -> CircuitSolution:
    """:func:`substrate.relax` on a circuit: C dV/dt = F(V) stepped by ``method`` (a name of
    ``substrate.METHODS``) until max|F| <= tol + rtol max|u| amperes at every sample. ``dt`` defaults
    to tau_min/2 (explicit) or tau_min (exponential), tau = C/G with G = -diag J at the start; times
    in seconds. ``nudge``: EP's current at the outputs, a :class:`~substrate.circuits.Teach`;
    ``clamp`` (this function only, not ``substrate.relax``): coupled learning's clamp. The stability check of the neuron engine is not needed: at an
    operating point of a reciprocal circuit J is symmetric negative definite."""
    choice(on_failure, "relax(on_failure)", ("raise", "return"))
    tol, rtol = nonnegative(tol, "relax(tol)"), nonnegative(rtol, "relax(rtol)")
    if tol == 0 and rtol == 0:
        raise SubstrateValueError("relax: tol and rtol cannot both be 0: the residual never reaches 0 exactly")
    max_steps = count(max_steps, "relax(max_steps)")
    max_time = positive(max_time, "relax(max_time)", allow_inf=True)
    f = _field(circuit, x, nudge, dtype, batch, clamp)
    u = _start(f, u0)
    st = _Stepper(method, f, u)
    if dt is None and not st.adaptive:
        dt = st.tau.min() * (1.0 if st.exponential else 0.5)
    dt = positive(dt, "relax(dt)", allow_none=True)

    def done(u, s0):  # the residual from the step's own first slope
        F = (s0 - st.sigma * u) / st.w
        return bool(np.all(np.max(np.abs(F), axis=1, initial=0.0) <= tol + rtol * np.max(np.abs(u), axis=1, initial=0)))

    status, t, u, steps, rej, _, _ = _march(st, u, 0.0, [max_time], dt=dt, rtol=0.1 * rtol if step_rtol is None
                                            else step_rtol, atol=0.1 * tol if step_atol is None else step_atol,
                                            max_steps=max_steps, blowup=blowup, done=done)
    # "success" from _march: max_time reached before the residual test passed
    status = {"converged": "success", "success": "not_converged"}.get(status, status)
    sol = _solution(f, st, status, t, np.array(t), u, u, steps, rej, 0.0,
                    "" if status == "success" else f"stopped at t={t:.6g} (step {steps})")
    return _finish(sol, on_failure, "relax")


def integrate(circuit, x=None, *, t_span, t_eval=None, method="rk4", dt=None, u0=None, dtype=None, batch=None,
              rtol=1e-6, atol=1e-9, max_steps=10_000_000, blowup=1e10, nudge=None, on_failure="raise",
              clamp=None) -> CircuitSolution:
    """:func:`substrate.integrate` on a circuit: the free nodes' voltages at ``t_eval`` (default t0
    and t1), shape (len(t_eval), batch, free nodes), steps landing on the t_eval points."""
    choice(on_failure, "integrate(on_failure)", ("raise", "return"))
    t0, _, t_eval = _check_times(t_span, t_eval, default=(lambda t0, t1: [t0, t1]))
    dt = positive(dt, "integrate(dt)", allow_none=True)
    f = _field(circuit, x, nudge, dtype, batch, clamp)
    u = _start(f, u0)
    st = _Stepper(method, f, u)
    if dt is None and not st.adaptive:
        raise SubstrateValueError(f"dt is required for the fixed-step method {st.method.name!r}")
    status, t, u, steps, rej, saved, _ = _march(st, u, t0, list(t_eval), dt=dt, rtol=rtol, atol=atol,
                                                max_steps=count(max_steps, "integrate(max_steps)"), blowup=blowup)
    states = np.full((len(t_eval), f.batch, f.size), np.nan)
    states[:len(saved)] = saved
    sol = _solution(f, st, status, t, t_eval, states, u, steps, rej, t0,
                    "" if status == "success" else f"stopped at t={t:.6g} (step {steps})")
    return _finish(sol, on_failure, "integrate")


def _loss(loss, u):
    value, g = loss(u.copy())
    g = np.asarray(g, float)
    if g.shape != u.shape or not np.all(np.isfinite(g)):
        raise SubstrateValueError(f"loss: dL/du must be finite, shape {u.shape} (batch, free nodes), got {g.shape}")
    return float(value), g


def _gradients(f, value, p, method, sol, adjoint=None, counts=None, u0bar=None):
    return Gradients(value, {"conductance": p["conductance"]}, {"source_current": p["source_current"]}, {},
                     {"x": p["inputs"]}, np.zeros_like(sol.u) if u0bar is None else u0bar, method, sol,
                     adjoint=adjoint, counts=counts)


def gradient(circuit, x=None, loss=None, *, method="discrete", t_span=None, t_eval=None, trajectory=False,
             integrator="rk4", dt=None, u0=None, dtype=None, batch=None, rtol=1e-6, atol=1e-9, tol=None,
             max_steps=1_000_000, blowup=1e10, on_failure="raise", twin=False, adjoint0=None, nudge=None,
             clamp=None) -> Gradients:
    """:func:`substrate.gradient` on a circuit, ``loss(u) -> (value, dL/du)`` on the free nodes'
    voltages u (batch, free nodes; ``CircuitSolution.field.free`` orders them). ``implicit``: the
    loss on the operating point relaxed with ``integrator`` to ``tol`` amperes (default 1e-10),
    J^T lambda = -dL/du by ``Implicit(solver="direct")`` (dense LU) or ``"krylov"`` (GMRES on J^T
    products). ``discrete``: the loss on the state at ``t_span[1]``, backpropagated through the
    steps of ``integrator``. Returns weights {"conductance"}, biases {"source_current"}, inputs
    {"x"} (dL/dx through the circuit) and, for ``discrete``, u0 (dL/du0)."""
    strategy = get_adjoint(method)
    if twin or adjoint0 is not None or trajectory:
        raise SubstrateValueError("a circuit's gradient takes no twin, adjoint0 or trajectory")
    if not callable(loss):
        raise SubstrateValueError(f"loss must be a callable u -> (value, dL/du), got {type(loss).__name__}")
    if strategy.name == "implicit":
        if t_span is not None:
            raise SubstrateValueError("method='implicit' differentiates a loss on the equilibrium: t_span does "
                                      "not apply")
        check_solver(strategy.solver, "Implicit")
        if strategy.solver == "almeida_pineda":
            raise SubstrateValueError("Implicit(solver='almeida_pineda') is the neuron engine's adjoint circuit; "
                                      "for a circuit use 'direct' or 'krylov'")
        tol = 1e-10 if tol is None else tol
        sol = relax(circuit, x, method=integrator, dt=dt, tol=tol, u0=u0, dtype=dtype, batch=batch,
                    max_steps=max_steps, blowup=blowup, nudge=nudge, clamp=clamp, on_failure=on_failure)
        f = sol.field
        value, g = _loss(loss, sol.u)
        lam, products = _adjoint(f, sol.u, -g, strategy, tol)
        res = np.max(np.abs(f.vjp(sol.u, lam) + g), axis=1, initial=0.0)
        scale = np.max(np.abs(g), axis=1, initial=0.0)
        adj = AdjointSolve(lam, strategy.solver, products, np.divide(res, scale, out=np.zeros_like(res),
                                                                     where=scale > 0))
        n, b = f.size, f.batch
        flops = (2 * n ** 3 // 3 + 4 * n * n) * b if strategy.solver == "direct" else products * 2 * len(
            circuit.edges) * b
        counts = sol.counts.replace(flops=sol.counts.flops + flops + 2 * len(circuit.edges) * b)
        return _gradients(f, value, f.param_vjp(sol.u, lam), "implicit", sol, adj, counts)
    if strategy.name != "discrete":
        raise SubstrateValueError(f"method={strategy.name!r}: a circuit's gradient is 'implicit' or 'discrete'")
    if strategy.checkpoints is not None:
        raise SubstrateValueError("DiscreteAdjoint(checkpoints=...): a circuit stores every step's state")
    if t_span is None:
        raise SubstrateValueError("t_span is required for method='discrete'")
    t0, t1 = _check_times(t_span, None, default=(lambda t0, t1: [t1]))[:2]
    f = _field(circuit, x, nudge, dtype, batch, clamp)
    u = _start(f, u0)
    st = _Stepper(integrator, f, u)
    if st.exponential:  # their coefficients depend on the conductances through the leak G = -diag J
        raise SubstrateValueError(f"integrator={st.method.name!r}: on a circuit the discrete adjoint takes the "
                                  "explicit methods (euler, rk4, dopri5); an exponential method's leak depends on "
                                  "the conductances, a derivative it does not propagate")
    if dt is None and not st.adaptive:
        raise SubstrateValueError(f"dt is required for the fixed-step method {st.method.name!r}")
    starts = []
    status, t, uT, steps, rej, _, hs = _march(st, u, t0, [t1], dt=dt, rtol=rtol, atol=atol,
                                              max_steps=count(max_steps, "gradient(max_steps)"), blowup=blowup,
                                              record=starts)
    sol = _finish(_solution(f, st, status, t, np.array([t1]), uT[None], uT, steps, rej, t0), on_failure,
                  "gradient: the forward pass")
    value, g = _loss(loss, uT)
    p0 = f.param_vjp(uT, np.zeros_like(uT))
    grads = {k: np.zeros_like(v) for k, v in p0.items()}
    ubar = g
    for u_k, h in zip(reversed(starts), reversed(hs)):
        ubar = st.backward(u_k, h, ubar, grads)
    counts = sol.counts.replace(flops=sol.counts.flops + 2 * len(circuit.edges) * f.batch * st.s * steps,
                                memory=sol.counts.memory + f.size * f.batch * steps)
    return _gradients(f, value, grads, "discrete", sol, counts=counts, u0bar=ubar)


def _adjoint(f, u, rhs, strategy, tol):
    """(lambda with J^T lambda = rhs per sample, J products taken)."""
    if strategy.solver == "direct":
        return np.linalg.solve(np.swapaxes(f.jacobian(u), 1, 2), rhs[..., None])[..., 0], f.size
    b, n = rhs.shape
    products = [0]

    def matvec(v):
        products[0] += 1
        return f.vjp(u, v.reshape(b, n)).ravel()

    rtol = strategy.krylov_tol if strategy.krylov_tol is not None else max(1e-12, 0.1 * tol)
    lam, info = gmres(LinearOperator((b * n, b * n), matvec=matvec), rhs.ravel(), x0=-rhs.ravel(), rtol=rtol,
                      atol=0.0, restart=max(1, min(b * n, 200)), maxiter=-(-strategy.max_iter // 200))
    if info != 0:
        raise SubstrateValueError(f"implicit gradient: GMRES did not converge (info={info}); try solver='direct'")
    return lam.reshape(b, n), products[0]
