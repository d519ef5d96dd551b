"""Exact gradients through the dynamics (docs/equations.md, section 3): one entry point, :func:`gradient`,
with the method chosen by name or strategy object.

* ``implicit`` (:class:`Implicit`): at a relaxed equilibrium u*, solve J^T lambda = -dL/du and take
  dL/dtheta = (dF/dtheta)^T lambda (recurrent backprop; Almeida 1987, Pineda 1987), by LU, GMRES, or
  by relaxing the adjoint circuit dlambda/ds = J^T lambda + dL/du to its fixed point (Almeida-Pineda).
* ``continuous`` (:class:`ContinuousAdjoint`): the adjoint ODE backwards with an exponential
  integrator and an exponential quadrature of dL/dtheta (right for any dt/tau_min), the forward
  state re-anchored at stored states.
* ``torchdiffeq`` (``torch_backend.TorchDiffEq``): the same circuit mirrored in torch, gradient by
  torchdiffeq's ``odeint_adjoint`` or by backprop through ``odeint``, for comparison.
* ``discrete`` (:class:`DiscreteAdjoint`): the exact gradient of the integrator's own steps (every
  integrator of ``integrators.METHODS``; for ``dopri5`` the accepted steps, their sizes held fixed),
  backpropagated by hand with the engine's kernels; memory bounded by checkpointing: the state is
  stored every k steps and states in between are replayed (bisection), bit for bit, so the result
  is identical for every number of checkpoints. The one-stage methods (euler, exp_euler) replay
  nothing where the state is stored; the others replay each step once for its stages.

The loss is a callable ``loss(u) -> (value, dL/du)``: u is the final state (batch, n), or with
``trajectory=True`` the states at all ``t_eval`` points (len(t_eval), batch, n), or the equilibrium
(batch, n) for ``implicit``. Gradients are of the loss as given (no averaging is added).

Sign convention: dL/dtheta, the gradient to descend. For complex states the derivatives are
holomorphic (no conjugation), matching :class:`~substrate.dynamics.VectorField`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from . import _kernels as K
from . import counts as _counts
from .dynamics import VectorField, resolve_dtype
from .errors import ConvergenceError, SubstrateValueError
from .integrators import (Solution, _STATUS, _check_on_failure, _check_times, _count, _finish,
                          _nonnegative, _positive, _prepare, _solve, allocate, check_step_count,
                          get_method, other_substrate, relax)
from .network import Network
from .validate import as_real, count, positive


# ------------------------------------------------------------------------------------ strategies
class AbstractAdjoint:
    """A way of computing dL/dtheta; see the module docstring."""

    name = "abstract"


@dataclass(frozen=True)
class Implicit(AbstractAdjoint):
    """Implicit differentiation at the equilibrium: J^T lambda = -dL/du, solved by ``solver``:

    * ``"direct"``: dense J per sample, LU (for small networks); ``cond_max``: J^T with a larger
      condition number is reported as singular;
    * ``"krylov"``: GMRES on J^T products, to the relative residual ``krylov_tol``;
    * ``"almeida_pineda"``: the adjoint circuit relaxed to its fixed point, what the physical system
      would run (Almeida 1987, Pineda 1987): Euler steps of size ``ap_step`` (in units of tau) of
      dlambda/ds = J^T lambda + dL/du, i.e. lambda <- lambda + ap_step (-lambda + rho'(u*) W^T lambda
      + dL/du), rho'(u*) evaluated once, one W^T product a step; it stops at the relative residual
      ``krylov_tol``. It converges at the rate of the spectral radius of I + ap_step J^T (for
      ap_step = 1: of rho'(u*) W^T); where that is >= 1 it cannot, and the error (or, with
      ``on_failure="return"``, a warning and a Krylov solve) says so. A smaller ap_step contracts
      whenever the equilibrium is stable (every eigenvalue of J with a negative real part).

    The iterative solvers start from ``adjoint0`` when :func:`gradient` is given one (e.g. the
    previous call's ``Gradients.adjoint.lam``), else from lambda = dL/du (exact for W = 0), and stop
    after ``max_iter`` J^T products. ``krylov_tol=None`` (the default) is, in :func:`gradient`,
    max(1e-12, tol / 10) with ``tol`` the relaxation's residual: the equilibrium is only that
    accurate, so a finer solve does not change the gradient's error (measured in
    benchmarks/bench_implicit.py: 3e-9 to 2e-8 against the exact gradient at tol 1e-8, whether the
    solve stops at 1e-9 or 1e-12); elsewhere 1e-12. In float32 the tolerance is at least 100 eps."""

    solver: str = "direct"
    krylov_tol: float | None = None
    cond_max: float = 1e12
    ap_step: float = 1.0
    max_iter: int = 10_000
    name = "implicit"

    def __post_init__(self):
        check_solver(self.solver, "Implicit")
        positive(self.krylov_tol, "Implicit(krylov_tol)", allow_none=True)
        positive(self.cond_max, "Implicit(cond_max)")
        v = as_real(self.ap_step)
        if v is None or not 0 < v <= 1:
            raise SubstrateValueError(f"Implicit(ap_step={self.ap_step!r}) must be in (0, 1]")
        count(self.max_iter, "Implicit(max_iter)")


SOLVERS = ("direct", "krylov", "almeida_pineda")


def check_solver(solver, what):
    """A SubstrateValueError naming ``what(solver=...)`` unless ``solver`` is one of ``SOLVERS``
    (tested as a str first: an array would make ``in`` ambiguous)."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise SubstrateValueError(f"{what}(solver={solver!r}); allowed: {', '.join(map(repr, SOLVERS))}")


@dataclass(frozen=True)
class DiscreteAdjoint(AbstractAdjoint):
    """Backpropagation through the integrator's steps. checkpoints: how many states the forward
    pass stores (None: every step's, the fastest: euler and exp_euler then replay no step, their
    backward takes one activation pass a step, which costs less than storing the activities; k: every
    ceil(steps/k)-th step's). Between two checkpoints, states are brought back by bisection: memory
    k + O(log(steps/k)) states whatever the horizon, at the cost of O(log(steps/k)) replays per step."""

    checkpoints: int | None = None
    name = "discrete"


@dataclass(frozen=True)
class ContinuousAdjoint(AbstractAdjoint):
    """Optimise-then-discretise: the adjoint ODE dlam/dt = -(df/du)^T lam integrated backwards with an
    exponential integrator (``backward``: ``"exp_euler"`` or ``"etd2rk"``; the leak exactly, as
    AdjointDPM does for diffusion ODEs), dL/dtheta by a quadrature exact for lam's exponential
    interpolant (so a transient of lam at a stiff neuron counts once, whatever dt/tau), on the forward
    grid refined ``substeps`` times (the backward accuracy, set apart from the forward's dt/rtol).
    Where a step is longer than the smallest tau, its cells are graded down to tau_min/10 at the
    transients (the start, and wherever a loss enters lam). The forward state is re-anchored at
    stored states (``checkpoints`` as in DiscreteAdjoint), never integrated backwards. Its error
    against the exact gradient of the steps is O(h^order); on a stiff network O(h), the order the
    exponential forward integrators keep there. With ``euler``/``rk4`` forward, dt/tau_min must be at
    most 1 (beyond it the explicit steps do not follow the fastest neuron)."""

    backward: str = "etd2rk"
    substeps: int = 1
    checkpoints: int | None = None
    name = "continuous"


ADJOINTS = {"implicit": Implicit, "discrete": DiscreteAdjoint, "continuous": ContinuousAdjoint}


def get_adjoint(method) -> AbstractAdjoint:
    """The adjoint method ``method`` names (a key of ``ADJOINTS``, or "torchdiffeq"), or ``method`` itself if it is
    one."""
    if isinstance(method, AbstractAdjoint):
        return method
    if isinstance(method, str) and method in ADJOINTS:
        return ADJOINTS[method]()
    if method == "torchdiffeq":  # imports torch, so only when asked for
        return _torch_backend().TorchDiffEq()
    raise SubstrateValueError(f"method={method!r} is not a gradient method; "
                              f"allowed: {', '.join(ADJOINTS)}, torchdiffeq")


def _torch_backend():
    """The torchdiffeq comparison backend (torch is imported here, never by ``import substrate``)."""
    try:
        from . import torch_backend
    except ImportError as e:
        raise SubstrateValueError(f"method='torchdiffeq' needs torch and torchdiffeq ({e}); "
                                  "install them with: pip install 'substrate[torch]'") from e
    return torch_backend


# ------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class AdjointSolve:
    """The solution of J^T lambda = rhs at an equilibrium. lam: (batch, n); solver: its name;
    products: the J^T (or, for ``direct``, J) products it took; residual: per sample
    max_i |J^T lambda - rhs| / max_i |rhs| (0 where rhs = 0); rate: for ``almeida_pineda``, the
    factor its residual shrank by per step over its last steps, an estimate of the spectral radius
    of I + ap_step J^T (None for the others)."""

    lam: np.ndarray
    solver: str
    products: int
    residual: np.ndarray
    rate: float | None = None


@dataclass(frozen=True)
class Gradients:
    """dL/dtheta for every parameter, in the network's own layout.

    weights: {connection name: array} (tied connections add to their source); biases and tau:
    {layer: array or scalar, as the layer's tau}; inputs: {input: (batch, size)}; u0: (batch, n)
    (zeros for ``implicit``: the equilibrium does not depend on it). step_sizes: for the discrete
    adjoint, the sizes of the steps that were differentiated (dopri5: the accepted ones). adjoint:
    for ``implicit``, lambda and how it was solved (:class:`AdjointSolve`). counts: what the
    hardware did (a :class:`substrate.Counts`, docs/equations.md, section 9): the forward phase on
    the circuit, every state stored for the backward pass read out (ADC), the backward pass, its
    replays and the parameter gradient in digital, the memory it allocated (None from torchdiffeq)."""

    loss: complex | float
    weights: dict
    biases: dict
    tau: dict
    inputs: dict
    u0: np.ndarray
    method: str
    solution: Solution = field(repr=False, default=None)
    step_sizes: np.ndarray | None = field(repr=False, default=None)  # the steps differentiated
    adjoint: AdjointSolve | None = field(repr=False, default=None)  # implicit: lambda and its solve
    counts: _counts.Counts | None = field(repr=False, default=None, compare=False)  # what the hardware did

    def flat(self) -> np.ndarray:
        """Every gradient in one vector (sorted by name), for comparisons between methods."""
        parts = [self.weights[k] for k in sorted(self.weights)] + [self.biases[k] for k in sorted(self.biases)]
        parts += [np.atleast_1d(self.tau[k]) for k in sorted(self.tau)]
        parts += [self.inputs[k] for k in sorted(self.inputs)] + [self.u0]
        return np.concatenate([np.ravel(p) for p in parts])


def _evaluate_loss(loss, u, what):
    if not callable(loss):
        raise SubstrateValueError(f"loss must be a callable u -> (value, dL/du), got {type(loss).__name__}")
    try:
        value, grad = loss(u)
    except (TypeError, ValueError) as e:
        if isinstance(e, SubstrateValueError):
            raise
        raise SubstrateValueError(f"loss must return (value, dL/du) for the {what}: {e}") from e
    grad = np.asarray(grad)
    if grad.shape != u.shape:
        raise SubstrateValueError(f"loss: dL/du has shape {grad.shape}, expected {u.shape} (the {what})")
    if grad.dtype.kind not in "iufc" or (grad.dtype.kind == "c" and u.dtype.kind != "c"):
        raise SubstrateValueError(f"loss: dL/du has dtype {grad.dtype} but the states are {u.dtype} "
                                  f"(the {what}); return a real gradient for real states")
    if not np.all(np.isfinite(value)) or np.ndim(value) != 0:
        raise SubstrateValueError(f"loss: the value {value!r} is not a finite scalar (the {what})")
    if not np.all(np.isfinite(grad)):
        raise SubstrateValueError(f"loss: dL/du contains NaN or Inf (the {what})")
    return value, grad.astype(u.dtype, copy=False)


def _tau_gradients(network: Network, gtau) -> dict:
    out = {}
    for x in network.layers:
        g = gtau[network.slices[x.name]]
        out[x.name] = g.sum() if np.ndim(x.tau) == 0 else g
    return out


# ------------------------------------------------------------------------------------ entry point
def gradient(network: Network, x=None, loss=None, *, method="discrete", t_span=None, t_eval=None,
             trajectory=False, integrator="rk4", dt=None, u0=None, dtype=None, batch=None, rtol=1e-6,
             atol=1e-9, tol=None, max_steps=1_000_000, blowup=1e10, on_failure="raise",
             twin=False, adjoint0=None) -> Gradients:
    """dL/dtheta, dL/du0 and dL/dx of ``loss`` through the circuit's dynamics.

    ``method="implicit"``: the loss is on the equilibrium, relaxed with ``integrator`` to residual
    ``tol`` (default 1e-10, 1e-5 for float32 states; a relaxation that does not converge raises
    ConvergenceError); ``adjoint0`` (batch, n), a first guess for lambda for the iterative solvers
    (e.g. the previous call's ``Gradients.adjoint.lam``); ``on_failure="return"`` turns an
    Almeida-Pineda solve that does not converge into a warning and a Krylov solve. ``method="discrete"``:
    the loss is on the state at ``t_span[1]`` (or, with ``trajectory=True``, on the states at every
    ``t_eval`` point), integrated with ``integrator``, ``dt``, ``rtol``, ``atol`` as in
    :func:`~substrate.integrate`.

    On a device (``substrate.devices.DeviceNetwork``) the forward pass runs on the device. The
    backward pass runs on the weights as read for that forward pass, which is exact only for a
    circuit without per-step noise, activation mismatch and converters; ``twin=True`` runs it on the
    nominal network instead (a digital twin): its Jacobians at the device's states (every state
    stored: no checkpointing), the gradient that hardware-in-the-loop training can compute.

    A resistive circuit (``substrate.circuits.Circuit``) is differentiated by ``circuits.engine.gradient``
    (``implicit`` and ``discrete``).
    """
    if (other := other_substrate(network)) is not None:
        return other.gradient(network, x, loss, method=method, t_span=t_span, t_eval=t_eval, trajectory=trajectory,
                              integrator=integrator, dt=dt, u0=u0, dtype=dtype, batch=batch, rtol=rtol, atol=atol,
                              tol=tol, max_steps=max_steps, blowup=blowup, on_failure=on_failure, twin=twin,
                              adjoint0=adjoint0)
    strategy = get_adjoint(method)
    _check_on_failure(on_failure)
    _check_twin(network, twin)
    if strategy.name == "torchdiffeq":  # solver, tolerances and dt come from the strategy
        return _torch_backend().torchdiffeq_gradient(strategy, network, x, loss, t_span, t_eval,
                                                     trajectory, dt, u0, dtype, batch)
    if isinstance(strategy, Implicit):
        if t_span is not None or trajectory:
            raise SubstrateValueError("method='implicit' differentiates a loss on the equilibrium: "
                                      "t_span and trajectory do not apply")
        return _implicit(strategy, network, x, loss, integrator, dt, u0, dtype, batch, tol, max_steps, blowup,
                         twin, adjoint0, on_failure)
    if adjoint0 is not None:
        raise SubstrateValueError(f"adjoint0 is a first guess for the implicit gradient's lambda; "
                                  f"method={strategy.name!r} does not take one")
    if t_span is None:
        raise SubstrateValueError(f"t_span is required for method={strategy.name!r}")
    return _through_time(strategy, network, x, loss, t_span, t_eval, trajectory, integrator, dt, u0, dtype,
                     batch, rtol, atol, max_steps, blowup, on_failure, twin)


def _check_twin(network, twin):
    """A device's backward pass: on its twin, or on its own read weights when that is exact."""
    nominal = getattr(network, "nominal", None)
    if twin and nominal is None:
        raise SubstrateValueError("twin=True needs a network on a device (substrate.devices.attach)")
    if nominal is not None and not twin and not network.differentiable:
        raise SubstrateValueError(
            f"the device {network.device.name!r} has per-step or per-sample read noise, output noise, "
            "converters, state noise or activation mismatch: its own backward pass is not defined; "
            "pass twin=True to run it on the nominal network")


def check_equilibrium(network, sol, tol, what):
    """Implicit differentiation needs a stable equilibrium: a device read at a finite relaxation time
    may not have reached one, and at a fixed point where tau^-1 dF/du has an eigenvalue with real
    part >= 0 (relax's status ``unstable``) the ODE does not stay, and J may be singular."""
    if sol.status == "unstable":
        raise ConvergenceError(f"{what}: the fixed point is unstable or singular, so implicit "
                               f"differentiation does not apply: {sol.message}", sol)
    worst = float(np.max(sol.residual))
    if math.isfinite(network.read_time) and not worst <= tol:
        raise ConvergenceError(
            f"{what}: the device was read at its relaxation time t={network.read_time:g} with residual "
            f"{worst:.3e} > tol {tol:g}: not an equilibrium, so implicit differentiation does not apply", sol)


def _backward_field(network, x, batch, dtype, twin):
    """The vector field the backward pass uses: the nominal network's for a twin."""
    return VectorField(network.nominal if twin else network, x, batch=batch, dtype=dtype)


def _implicit(strategy, network, x, loss, integrator, dt, u0, dtype, batch, tol, max_steps, blowup,
              twin=False, adjoint0=None, on_failure="raise"):
    if tol is None:  # a residual float32 states can reach
        tol = 1e-5 if resolve_dtype(network, dtype) == np.float32 else 1e-10
    sol = relax(network, x, method=integrator, dt=dt, tol=tol, u0=u0, dtype=dtype, batch=batch,
                max_steps=max_steps, blowup=blowup, on_failure="return")
    check_equilibrium(network, sol, tol, "implicit gradient")
    _finish(sol, "raise", "implicit gradient: the relaxation")  # not reached: ConvergenceError
    # the backward pass on the circuit the equilibrium was relaxed with (its packed weights and drive;
    # or on the nominal twin)
    vf = _backward_field(network, x, sol.u.shape[0], sol.u.dtype, twin) if twin else sol.field
    value, g = _evaluate_loss(loss, sol.u, "equilibrium")
    adj = adjoint_solve(vf, sol.u, -g, strategy, adjoint0, on_failure, relax_tol=tol)
    grads = vf.param_vjp(sol.u, adj.lam)
    zeros_tau = _tau_gradients(network.nominal if twin else network, np.zeros(network.n, sol.u.dtype))
    return Gradients(value, grads["weights"], grads["biases"], zeros_tau, grads["inputs"],
                     np.zeros_like(sol.u), "implicit", sol, adjoint=adj, counts=implicit_counts(sol, adj))


def implicit_counts(sol: Solution, adj) -> _counts.Counts:
    """The :class:`~substrate.counts.Counts` of an implicit gradient (docs/equations.md, section 9): the
    relaxation ``sol`` (its own counts), then in digital the solve of J^T lambda = rhs that ``adj`` (an
    :func:`adjoint_solve` result) made (dense LU; or per J^T product a W^T product and ~4 operations
    per neuron, GMRES's orthogonalisation left out) and the parameter gradient; memory: u*, lambda, rhs
    and the solver's own (J, or the GMRES basis). For callers that solve the adjoint themselves (a
    training rule at the free phase's equilibrium), as :func:`gradient` does with ``Implicit``."""
    network, (nb, n) = sol.field.network, sol.u.shape
    dtype, state = sol.u.dtype, _counts.crossbar_devices(network)[0]
    v = _counts.values(dtype)
    if adj.solver == "direct":
        flops, work = _counts.direct_solve_flops(n, nb, dtype), n * n * nb
    else:
        flops = adj.products * (2 * state + 4 * n) * nb * _counts.values(dtype) ** 2
        work = (min(adj.products, max(1, min(n * nb, 200))) + 1) * n * nb if adj.solver == "krylov" else 0
    flops += _counts.parameter_flops(network, nb, dtype)
    held = (3 * n * nb + work) * v
    fwd = sol.counts
    return fwd.replace(flops=fwd.flops + flops, memory=max(fwd.memory, held), traffic=fwd.traffic + held)


def jacobian(vf: VectorField, u) -> np.ndarray:
    """J(u) = dF/du = -I + W diag(rho'(u)) for every sample, (batch, n, n)."""
    vf._nominal_neurons("jacobian")
    ut = vf.state(u)
    p = vf.packed
    d = np.empty_like(ut)
    K.activate_prime(ut, p.layer_off, p.layer_act, d)
    J = p.dense()[None, :, :] * d.T[:, None, :]
    idx = np.arange(p.n)
    J[:, idx, idx] -= 1
    return J


def solve_adjoint(vf: VectorField, u, rhs, strategy: Implicit = Implicit(), lam0=None):
    """lambda with J(u)^T lambda = rhs for every sample (batch, n); see :func:`adjoint_solve`."""
    return adjoint_solve(vf, u, rhs, strategy, lam0).lam


def adjoint_solve(vf: VectorField, u, rhs, strategy: Implicit = Implicit(), lam0=None,
                  on_failure="raise", relax_tol=None) -> AdjointSolve:
    """J(u)^T lambda = rhs for every sample by ``strategy.solver`` (:class:`Implicit`), as an
    :class:`AdjointSolve`. ``lam0`` (batch, n): the iterative solvers' first guess (default -rhs,
    exact for W = 0). ``relax_tol``: the residual u was relaxed to, which sets the default
    tolerance (see :class:`Implicit`). An Almeida-Pineda iteration that does not converge raises
    ConvergenceError, or with ``on_failure="return"`` warns and solves by Krylov instead."""
    _check_on_failure(on_failure)
    vf._nominal_neurons("the implicit gradient")
    ut = vf.state(u)
    rhs_t = vf.state(rhs, "rhs")
    p = vf.packed
    d = np.empty_like(ut)  # rho'(u*), once for every product
    K.activate_prime(ut, p.layer_off, p.layer_act, d)
    scale = np.max(np.abs(rhs_t), axis=0) if ut.size else np.zeros(ut.shape[1])
    if strategy.solver == "direct":
        lam, products = _direct(vf, u, rhs, strategy), vf.network.n
        return AdjointSolve(lam, "direct", products,
                            _relative_residual(vf, d, np.ascontiguousarray(lam.T), rhs_t, scale))
    start = -rhs_t if lam0 is None else vf.state(lam0, "adjoint0")
    start[:, scale == 0] = 0  # rhs = 0: lambda = 0 exactly (J is regular at a stable equilibrium)
    # a tolerance the dtype can reach: the products' rounding is ~n eps relative
    rtol = strategy.krylov_tol
    if rtol is None:
        rtol = 1e-12 if relax_tol is None else max(1e-12, 0.1 * relax_tol)
    rtol = max(rtol, 100 * float(np.finfo(ut.dtype).eps))
    if strategy.solver == "almeida_pineda":
        adj, message = _almeida_pineda(vf, d, rhs_t, start, scale, rtol, strategy)
        if message is None:
            return adj
        if on_failure == "raise":
            raise ConvergenceError(message)
        warnings.warn(message + "; solved by Krylov (GMRES) instead", RuntimeWarning, stacklevel=3)
    return _krylov(vf, d, rhs_t, start, scale, rtol, strategy)


def _transpose_product(vf, d, w):
    """J^T w = -w + rho'(u*) (W^T w), with rho'(u*) = d given, (n, batch) arrays."""
    p = vf.packed
    out = np.empty_like(w)
    K.weights_transpose_times(w, p.wbuf, p.conn, p.layer_off, vf._tmp, out)
    out *= d
    out -= w
    return out


def _relative_residual(vf, d, lam_t, rhs_t, scale):
    r = np.max(np.abs(_transpose_product(vf, d, lam_t) - rhs_t), axis=0) if lam_t.size else scale
    return np.divide(r, scale, out=np.zeros_like(r), where=scale > 0)


def _almeida_pineda(vf, d, rhs_t, start, scale, rtol, strategy):
    """(AdjointSolve, None), or (None, why it did not converge)."""
    p = vf.packed
    lam = start.copy()  # a failed run leaves the start to the Krylov fallback
    tol = rtol * scale
    tol[scale == 0] = 1.0  # lambda = 0 there: its residual stays 0; any positive tolerance
    r, res = np.empty_like(lam), np.empty(lam.shape[1])
    trace = np.empty(strategy.max_iter + 1)
    status, k = K.almeida_pineda(d, rhs_t, p.wbuf, p.conn, p.layer_off, vf._tmp, float(strategy.ap_step),
                                 tol, strategy.max_iter, lam, r, res, trace)
    # the residual's shrink factor per step over the last (up to 20) steps: a power iteration's
    # estimate of the spectral radius of the iteration matrix I + ap_step J^T
    m = min(k, 20)
    first, last = float(trace[k - m]), float(trace[k])  # Python floats: inf / inf is NaN, no warning
    rate = (last / first) ** (1 / m) if m and first > 0 else None
    if status == K.SUCCESS:
        residual = np.divide(res, scale, out=np.zeros_like(res), where=scale > 0)
        return AdjointSolve(lam.T.copy(), "almeida_pineda", k + 1, residual, rate), None
    what = "diverged" if status == K.DIVERGED else f"did not converge within max_iter={strategy.max_iter} steps"
    shown = "not finite" if rate is None or not math.isfinite(rate) else f"{rate:.4g}"
    return None, (
        f"implicit gradient: the Almeida-Pineda iteration {what} (after {k} steps its worst residual is "
        f"{trace[k]:.3g} x the tolerance, shrink factor a step {shown}): lambda <- lambda + ap_step "
        f"(J^T lambda + dL/du) contracts only if the spectral radius of I + ap_step J^T "
        f"(ap_step={strategy.ap_step:g}) is below 1; use a smaller ap_step (it contracts for a small enough "
        "step at a stable equilibrium) or solver='krylov'")


def _krylov(vf, d, rhs_t, start, scale, rtol, strategy):
    """GMRES on the whole batch (J^T is block diagonal over the samples)."""
    from scipy.sparse.linalg import LinearOperator, gmres

    n, nb = rhs_t.shape
    products = [0]

    def matvec(v):
        products[0] += 1
        return _transpose_product(vf, d, np.ascontiguousarray(v).reshape(n, nb)).ravel()

    op = LinearOperator((n * nb, n * nb), dtype=rhs_t.dtype, matvec=matvec)
    restart = max(1, min(n * nb, 200))
    lam, info = gmres(op, rhs_t.ravel(), x0=start.ravel(), rtol=rtol, atol=0.0, restart=restart,
                      maxiter=-(-strategy.max_iter // restart))  # about max_iter products
    if info != 0:
        raise SubstrateValueError(f"implicit gradient: GMRES did not converge (info={info}); "
                                  "J may be singular at the equilibrium, try solver='direct'")
    lam = lam.reshape(n, nb)
    return AdjointSolve(lam.T.copy(), "krylov", products[0], _relative_residual(vf, d, lam, rhs_t, scale))


def _direct(vf, u, rhs, strategy):
    nb = u.shape[0]
    # scipy.linalg and scipy.sparse.linalg are imported here, by the implicit gradient that alone uses them:
    # at module level they would add ~0.2 s (CPU, measured) to the ~0.37 s of ``import substrate``
    from scipy.linalg import get_lapack_funcs, lu_factor, lu_solve

    J = jacobian(vf, u)
    lam = np.empty_like(rhs)
    for b in range(nb):
        # LU once; LAPACK's 1-norm condition estimate from it costs O(n^2), not an SVD
        Jt = np.ascontiguousarray(J[b].T)
        lu, piv = lu_factor(Jt, check_finite=False)
        gecon, = get_lapack_funcs(("gecon",), (lu,))
        rcond, _ = gecon(lu, np.linalg.norm(Jt, 1), norm="1")
        if not (rcond * strategy.cond_max >= 1):
            raise SubstrateValueError(
                f"implicit gradient: the Jacobian at the equilibrium of sample {b} is singular "
                f"(condition number ~{1 / rcond if rcond > 0 else np.inf:.3g} > cond_max "
                f"{strategy.cond_max:g}, 1-norm estimate)")
        lam[b] = lu_solve((lu, piv), rhs[b], check_finite=False)
    return lam


def _through_time(strategy, network, x, loss, t_span, t_eval, trajectory, integrator, dt, u0, dtype,
                  batch, rtol, atol, max_steps, blowup, on_failure, twin=False):
    """Discrete or continuous adjoint: a recorded forward pass (step sizes, checkpoints), the loss,
    then the backward kernel."""
    stepper = get_method(integrator)
    t0, t1, t_eval = _check_times(t_span, t_eval, default=(lambda t0, t1: [t1]), end_at_t1=True)
    if strategy.checkpoints is not None:
        _count(strategy.checkpoints, "checkpoints")
    if isinstance(strategy, ContinuousAdjoint):
        backward = {"exp_euler": K.ETD1, "etd2rk": K.ETD2RK}.get(strategy.backward)
        if backward is None:
            raise SubstrateValueError(f"ContinuousAdjoint(backward={strategy.backward!r}); "
                                      "allowed: 'exp_euler', 'etd2rk'")
        _count(strategy.substeps, "substeps")
    dt = _positive(dt, "dt", allow_none=True)
    rtol, atol = _nonnegative(rtol, "rtol"), _nonnegative(atol, "atol")
    if stepper.adaptive and rtol == 0 and atol == 0:
        raise SubstrateValueError("rtol and atol cannot both be 0 for an adaptive method")
    max_steps = _count(max_steps, "max_steps")
    check_step_count(stepper, t0, t1, dt, max_steps)
    blowup = _positive(blowup, "blowup")
    vf, u = _prepare(network, x, u0, dtype, batch)
    n, nb = u.shape
    kstepper = stepper.kernel_args()
    fam, adaptive = kstepper.family, kstepper.adaptive
    if (isinstance(strategy, ContinuousAdjoint) and fam == K.EXPLICIT_RK and not adaptive and n > 0
            and dt is not None):  # a missing dt is reported by the forward pass
        # Past dt/tau = 1 an explicit step no longer follows the fastest neuron's relaxation (Euler's
        # factor 1 - dt/tau turns negative, RK4's grows again past 1.6): the states the adjoint is
        # re-anchored at are not near a solution of the ODE it integrates (measured: 11% off the
        # discrete adjoint for Euler at dt/tau = 2, 100% for RK4 at 2.5, even where no blow-up is seen).
        stiff = dt * float(np.max(np.abs(vf.packed.tauinv)))
        if stiff > 1.0:
            raise SubstrateValueError(
                f"method='continuous' with integrator={stepper.name!r}: dt/tau_min = {stiff:.3g} is "
                "outside the allowed range (0, 1]; use an exponential integrator (exp_euler, etd2rk, "
                "etdrk4: any dt/tau_min), a smaller dt, or method='discrete'")

    def forward(n_steps, ckpt_every, n_ckpt):
        # sized by the steps that will be taken; only those are written and read (no zeroing)
        hs = allocate((n_steps,), float, "the sizes of {0} steps",
                      "lower max_steps" if adaptive or dt is None else "raise dt or shorten t_span")
        save_step = np.zeros(len(t_eval), np.int64)
        ckpt = allocate((n_ckpt, n, nb), vf.dtype, "{0} stored states (checkpoints)",
                        "raise dt or shorten t_span" if twin else
                        "store fewer: checkpoints=k in DiscreteAdjoint or ContinuousAdjoint")
        # states only, not their activities: the backward's one activation pass a step costs less than
        # writing, zeroing (fresh pages) and reading them back (784-500-10, batch 64, 100 Euler steps:
        # 2.13 against 2.40 x the bound; the tanh problem 1.23 against 1.39; benchmarks/bench_gradient.py)
        out = _solve(vf, u, stepper, t0=t0, t_end=t1, dt=dt, rtol=rtol, atol=atol, max_steps=max_steps,
                     blowup=blowup, t_save=t_eval, relax=False, res_rtol=0.0, res_atol=0.0,
                     record=(hs, save_step, ckpt_every, ckpt))
        return out, hs, save_step, ckpt

    if adaptive or dt is None:
        # the number of steps is known only after a first pass, which also fixes the step sizes
        out, hs, save_step, _ = forward(max_steps, 0, 0)
        steps = out[2]
    else:  # an upper bound (steps land on the t_eval points), within max_steps by check_step_count
        steps = min(max_steps, int(math.ceil((t1 - t0) / dt * (1 + 1e-12))) + len(t_eval) + 1)
    every = 1 if strategy.checkpoints is None or twin else max(1, -(-steps // strategy.checkpoints))
    out, hs, save_step, ckpt = forward(steps, every, steps // every + 1)
    status, t, steps, nfev, rej, saved, _, _, u_out = out
    sol = Solution(t=t_eval, u=saved.transpose(0, 2, 1), status=_STATUS[status], method=stepper.name,
                   steps=steps, nfev=nfev, rejected=rej,
                   residual=np.full(nb, np.nan), t_final=t, slices=network.slices, field=vf, t_start=t0,
                   message="" if status == K.SUCCESS else f"stopped at t={t:.6g} (step {steps})")
    _finish(sol, on_failure if status == K.SUCCESS else "raise", "gradient: the forward integration")
    states = sol.u if trajectory else sol.u[-1]
    value, g = _evaluate_loss(loss, states, "states at t_eval" if trajectory else "final state")
    dl = np.ascontiguousarray((g if trajectory else g[None]).transpose(0, 2, 1))
    if not trajectory:
        save_step = save_step[-1:]
    if twin:  # replays of single steps from the device's stored states, on the nominal circuit
        vf = _backward_field(network, x, nb, vf.dtype, twin)
    p = vf.packed
    gflat = np.zeros(p.wbuf.shape, vf.dtype)  # complex states: complex gradients of real weights
    gdrive = np.zeros((n, nb), vf.dtype)
    gtau = np.zeros(n, vf.dtype)
    lam0 = np.empty((n, nb), vf.dtype)
    tape, grads = K.Tape(hs, steps, ckpt, every, save_step, dl), K.Grads(gflat, gdrive, gtau, lam0)
    if isinstance(strategy, ContinuousAdjoint):
        K.continuous_adjoint_run(kstepper, tape, backward, strategy.substeps, vf.circuit, grads)
    else:
        tauinv_step = 1.0 / (p.tau.astype(float) + 1e-30j)
        K.adjoint_run(kstepper, tape, vf.circuit, tauinv_step, grads)
    grads = vf.parameter_gradients(gflat, gdrive)
    counts = _through_time_counts(strategy, sol, kstepper, steps, every, ckpt.shape[0])
    return Gradients(value, grads["weights"], grads["biases"],
                     _tau_gradients(network.nominal if twin else network, gtau),
                     grads["inputs"], lam0.T.copy(), strategy.name, sol, hs[:steps].copy(), counts=counts)


@lru_cache(maxsize=256)
def replayed_steps(segment: int) -> int:
    """Steps replayed by the bisection of ``_kernels._state_at`` to bring back, in reverse order, the
    states of a segment of ``segment`` steps from its checkpoint (the kernel's schedule, followed step
    for step)."""
    stack, total = [0], 0
    for m in range(segment - 1, -1, -1):
        while stack[-1] > m:
            stack.pop()
        while stack[-1] < m:
            start = stack[-1]
            target = m if m - start <= 1 else start + (m - start + 1) // 2
            total += target - start
            stack.append(target)
    return total


def _through_time_counts(strategy, sol, kstepper, steps, every, n_ckpt):
    """The recorded forward phase (the states it stores read out), then in digital: the
    backward steps (per stage a W^T product, the weight gradient's outer product and ~6 operations per
    neuron), the forward steps replayed (bisection between checkpoints; the multi-stage methods'
    stages once more per step) and the input weights' gradient. The continuous adjoint counts its
    backward grid as the forward steps times ``substeps`` (its grading near transients adds cells
    that are not counted). Memory: checkpoints, the bisection's slots, step sizes
    and the stages' work arrays."""
    network, (nb, n) = sol.field.network, sol.u.shape[1:]
    dtype = sol.u.dtype
    state, inputs = _counts.crossbar_devices(network)
    v, c = _counts.values(dtype), _counts.values(dtype) ** 2
    stages = kstepper.bw.shape[0]
    if isinstance(strategy, ContinuousAdjoint):
        back = steps * strategy.substeps * (2 if strategy.backward == "etd2rk" else 1)
        replays = steps * strategy.substeps * stages  # the forward re-anchored on each cell
    else:
        back = steps * stages
        replays = 0 if stages == 1 else steps * stages
    if every > 1:
        full, last = divmod(steps, every)
        replays += (full * replayed_steps(every) + replayed_steps(last)) * stages
    flops = (back * (4 * state + 6 * n) + replays * (2 * state + 4 * n)) * nb * c + 2 * inputs * nb * c
    slots = 0 if every == 1 else int(K._slot_count(every))
    held = (n_ckpt + slots + 3 * stages + 4) * n * nb * v + steps
    fwd = sol.counts
    read = max(0, -(-steps // every) - 1)  # the stored states but the initial one, given
    return fwd.replace(adc=fwd.adc + read * n * nb, flops=fwd.flops + flops,
                       memory=max(fwd.memory, held), traffic=fwd.traffic + 2 * n_ckpt * n * nb * v + held)

