"""Equilibrium propagation on the substrate (docs/equations.md, section 4).

Convention (Laborieux & Zenke's code): the nudged field is F_beta(u) = F(u) + beta dl/dr_L on the
nudged layer L (``substrate.nudge``), l the per-sample cost, not divided by the batch size. Every
estimator forms an estimate v (batch, n) of dr*/dbeta in ACTIVITY coordinates from relaxations that
start at the free equilibrium u*(0), and the gradient of the batch-mean loss L = (1/B) sum_b l_b is

    dL/dtheta ~= (1/B) sum_b (dF/dtheta)^T v_b      (for W: v_post r_pre^T / B; for b: mean v_post)

evaluated at the free equilibrium (``VectorField.param_vjp``). The exact reference replaces v by the
adjoint lambda = -J^{-T} dl/du in membrane coordinates (:class:`Exact`); for a symmetric network the
two coincide. A cross-entropy readout's own weights take their gradient directly at the free
equilibrium, as in Laborieux & Zenke.

Estimators are small frozen dataclasses; the point-based ones (one-sided, negative, centred,
holomorphic) share one recipe: v = c_0 r*(0) + sum_k c_k r*(beta_k), with conjugate points folded
into a real part (r*(conj beta) = conj r*(beta) for real parameters, so each pair costs one complex
relaxation, and a real beta_k runs in real arithmetic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from substrate import Cost, Gradients, Implicit, Network, Nudge, Solution, VectorField, integrate, relax
from substrate import counts as _counts
from substrate.activations import rho, rho_prime
from substrate.adjoint import check_equilibrium, check_solver, jacobian, solve_adjoint
from substrate.errors import ConvergenceError, SubstrateValueError
from substrate.validate import choice, count, positive


# ------------------------------------------------------------------------------------ relaxation
@dataclass(frozen=True)
class Relaxation:
    """How the phases relax. The free phase starts from zero (or ``u0``) and stops when max|F| <= tol;
    nudged phases start from the free equilibrium and stop when max|F + beta dl/dr| <= tol_beta =
    min(tol, nudged_rtol |beta| g), g = max|dl/dr_L| at the free equilibrium: the residual a nudged
    phase starts with is about |beta| g, so its error relative to the response it must make
    (u*(beta) - u*(0) ~ J^{-1} beta dl/dr) is at most about nudged_rtol, however small beta is. An
    absolute tol alone would leave an error O(tol/|beta|) in the difference quotient, and a phase
    whose nudge is below tol would stop at step 0 (a zero gradient reported as converged). An
    estimator that subtracts r*(0) (one-sided, negative) also re-relaxes the free phase to tol_beta.
    tol_beta stays above the state's rounding floor (``ROUNDING_MARGIN`` ulps of max|u|), and a |beta|
    whose nudge |beta| g is within 1/``COARSEST`` of that floor is refused (SubstrateValueError naming
    the smallest |beta| allowed), since float64 (or float32) cannot represent its response.
    Phases stop after ``max_steps`` (free) / ``nudged_max_steps`` (nudged; default max_steps) steps.
    ``dt``: the step (default tau_min). ``on_failure``: ``"raise"`` (ConvergenceError) or
    ``"record"`` (the estimate is returned with ``converged`` False, for training loops that count
    failures rather than stop)."""

    method: str = "exp_euler"
    dt: float | None = None
    tol: float = 1e-6
    max_steps: int = 10_000
    nudged_max_steps: int | None = None
    on_failure: str = "raise"
    nudged_rtol: float = 1e-3

    def __post_init__(self):
        choice(self.on_failure, "Relaxation(on_failure)", ("raise", "record"))
        r = self.nudged_rtol
        if isinstance(r, bool) or not isinstance(r, (int, float, np.floating)) or not 0 < r <= 1:
            raise SubstrateValueError(f"Relaxation(nudged_rtol={r!r}) must be a number in (0, 1]")
        count(self.max_steps, "Relaxation(max_steps)")
        if self.nudged_max_steps is not None:  # 0 would fall back to max_steps unseen
            count(self.nudged_max_steps, "Relaxation(nudged_max_steps)")

    def run(self, network, x, *, u0=None, nudge=None, dtype=None, nudged=False, tol=None) -> Solution:
        """Relax ``network`` at inputs ``x`` (free, or with ``nudge``) with this schedule; a phase that misses its
        tolerance raises or is returned, per ``on_failure``."""
        steps = self.nudged_max_steps if nudged and self.nudged_max_steps else self.max_steps
        tol = self.tol if tol is None else tol
        sol = relax(network, x, method=self.method, dt=self.step(network), tol=tol, u0=u0,
                    max_steps=steps, nudge=nudge, dtype=dtype, on_failure="return")
        if not sol.ok and self.on_failure == "raise":
            phase = f"nudged phase (beta={nudge.beta:.4g})" if nudge is not None else "free phase"
            raise ConvergenceError(f"EP {phase} did not reach tol={tol:g}: {sol.report()}; raise "
                                   "max_steps, loosen tol, or pass on_failure='record'", sol)
        return sol

    def step(self, network) -> float:
        """The step: ``dt``, or the smallest time constant of ``network`` when ``dt`` is None."""
        return float(np.min(network.tau)) if self.dt is None else self.dt

    def nudged_tol(self, what, beta, network, cost, free, y) -> float:
        """tol_beta for nudges of modulus |beta| from the free equilibrium ``free`` (see the class);
        a SubstrateValueError when the state's rounding cannot resolve the response to |beta|."""
        b = abs(complex(beta))
        g = float(np.max(np.abs(cost.value_and_grad(activity(network, free.u)[:, network.slices[cost.layer]], y)[1])))
        if g == 0:  # dl/dr = 0 at u*(0): u*(0) is every u*(beta), the phases stop at once, exactly
            return self.tol
        # the residual of a state cannot be resolved below about one ulp of |u| (measured: relaxations
        # stall at eps max|u|); ROUNDING_MARGIN ulps leave room for the integrators' own rounding
        floor = ROUNDING_MARGIN * np.finfo(free.u.dtype).eps * max(1.0, float(np.max(np.abs(free.u))))
        if COARSEST * b * g < floor:
            raise SubstrateValueError(
                f"{what}: |beta|={b:.3g} nudges by |beta| max|dl/dr| = {b * g:.3g}, too close to the "
                f"{free.u.dtype} rounding of the state (residual floor ~{floor:.1g}) to resolve its response "
                f"to {COARSEST:.0%} relative accuracy; the smallest |beta| allowed here is "
                f"{floor / (COARSEST * g):.2g}")
        return min(self.tol, max(self.nudged_rtol * b * g, floor))


# ulps of max|u| below which a residual is rounding noise; and the coarsest relative accuracy of a
# nudged phase's response that is still an estimate (between it and nudged_rtol, the floor is used)
ROUNDING_MARGIN = 16
COARSEST = 0.01


def activity(network: Network, u) -> np.ndarray:
    """r = rho(u), layer by layer, for states u (batch, n), real or complex (on a device, with its
    neurons' activation mismatch: what the hardware measures)."""
    return network.activities(u)


def cost_gradient_u(network: Network, cost: Cost, u, y):
    """(l per sample, dl/du (batch, n)) for the cost on the activities of states u."""
    sl = network.slices[cost.layer]
    act = network.layer(cost.layer).activation
    value, g = cost.value_and_grad(rho(act, u[:, sl]), y)
    out = np.zeros_like(u)
    out[:, sl] = rho_prime(act, u[:, sl]) * g
    return value, out


# ------------------------------------------------------------------------------------ estimators
class Estimator:
    """A way of obtaining the error vector v (batch, n) from the free equilibrium."""

    name = "estimator"

    def error_vector(self, network, x, y, cost, relaxation, free: Solution):
        """(v, nudged solutions)."""
        raise NotImplementedError


class PointEstimator(Estimator):
    """v = c_0 r*(0) + sum_k c_k r*(beta_k); subclasses give ``nodes()`` -> (c_0, [(beta_k, c_k, pair)])
    where ``pair`` means the conjugate point conj(beta_k) with weight conj(c_k) is included implicitly
    (its contribution is 2 Re(c_k r*(beta_k)))."""

    def nodes(self):
        """(c_0, [(beta_k, c_k, pair), ...]): the weight of the free phase and each nudged phase (see the class)."""
        raise NotImplementedError

    def error_vector(self, network, x, y, cost, relaxation, free):
        c0, pts = self.nodes()  # every point has the same modulus |beta|
        tol = relaxation.nudged_tol(repr(self), pts[0][0], network, cost, free, y)
        sols = []
        if c0 != 0 and tol < relaxation.tol:
            # v subtracts c0 r*(0): the free state's error (up to tol) would enter v as O(tol/|beta|);
            # estimators without that term cancel it (each nudged phase converges wherever it starts)
            free = relaxation.run(network, x, u0=free.u, tol=tol)
            sols.append(free)
        v = c0 * activity(network, free.u)
        for beta, c, pair in pts:
            dtype = np.complex128 if complex(beta).imag != 0 else None
            sol = relaxation.run(network, x, u0=free.u, nudge=Nudge(cost, beta, y), dtype=dtype, nudged=True,
                                 tol=tol)
            term = c * activity(network, sol.u)
            v = v + (2 * term.real if pair else term.real)
            sols.append(sol)
        return v, sols


# The trapezoidal rule's error (|beta|/R)^N (R the radius of analyticity) is below float64 rounding
# (2^-53) at N = 256 for any |beta|/R <= 0.86; more points only add relaxations (N/2 + 1 of them).
MAX_POINTS = 256
# the fixed steps a rotating estimate may integrate in all (points x periods x duration/dt): about
# as many as a few hundred converged relaxations, minutes for the networks this package targets
MAX_ROTATING_STEPS = 10_000_000


_POINTS_WHY = ("the trapezoidal error (|beta|/R)^N is below float64 rounding by then for |beta|/R <= 0.86; "
               "more points only add relaxations")


class _RealNudge(PointEstimator):
    """Estimators with real nudges +-beta (beta > 0, checked when built)."""

    def __post_init__(self):
        positive(self.beta, f"{type(self).__name__}(beta)")


@dataclass(frozen=True)
class OneSided(_RealNudge):
    """Classic EP (Scellier & Bengio 2017): v = (r*(beta) - r*(0)) / beta; bias O(beta)."""

    beta: float = 0.1
    name = "one_sided"

    def nodes(self):
        b = positive(self.beta, "beta")
        return -1.0 / b, [(b, 1.0 / b, False)]


@dataclass(frozen=True)
class Negative(_RealNudge):
    """Negative-sided EP (Scellier et al. 2023): v = (r*(-beta) - r*(0)) / (-beta); bias O(beta)."""

    beta: float = 0.1
    name = "negative"

    def nodes(self):
        b = positive(self.beta, "beta")
        return 1.0 / b, [(-b, -1.0 / b, False)]


@dataclass(frozen=True)
class Centred(_RealNudge):
    """Centred EP (Laborieux et al. 2021): v = (r*(beta) - r*(-beta)) / (2 beta); bias O(beta^2)."""

    beta: float = 0.1
    name = "centred"

    def nodes(self):
        b = positive(self.beta, "beta")
        return 0.0, [(b, 0.5 / b, False), (-b, -0.5 / b, False)]


@dataclass(frozen=True)
class Holomorphic(PointEstimator):
    """Holomorphic EP (Laborieux & Zenke 2022): the Cauchy integral on the circle |beta| by the
    trapezoidal rule, v = (1/N) sum_k r*(beta_k)/beta_k, beta_k = |beta| e^{2 pi i k/N}; error
    O(|beta|^N) inside the radius of analyticity. For N >= 2 the free term vanishes (sum 1/beta_k = 0);
    N = 1 is one-sided EP. Points k and N-k are conjugate: N/2 + 1 relaxations (N even), of which
    beta_0 = |beta| and beta_{N/2} = -|beta| are real."""

    points: int = 4
    beta: float = 0.1
    name = "holomorphic"

    def __post_init__(self):
        count(self.points, "Holomorphic(points)", maximum=MAX_POINTS, why=_POINTS_WHY)
        positive(self.beta, "Holomorphic(beta)")

    def nodes(self):
        N, b = self.points, positive(self.beta, "beta")
        pts = []
        for k in range(N // 2 + 1):
            beta = b if k == 0 else (-b if 2 * k == N else b * np.exp(2j * np.pi * k / N))
            pts.append((beta, 1.0 / (N * beta), 0 < k and 2 * k != N))
        return (-1.0 / b if N == 1 else 0.0), pts


@dataclass(frozen=True)
class RotatingHolomorphic(Estimator):
    """Continuous-time holomorphic EP: the teaching signal rotates, beta(t) = |beta| e^{2 pi i t/(N T)},
    held for ``duration`` T at each of the N points of a period, over ``periods`` q periods, with no
    reset of the state between points; v is the first Fourier coefficient of the activity,
    (1/(q N)) sum_j (r(t_j) - r*(0))/beta(t_j), sampled at the end of each point. The state starts at
    the free equilibrium; it is not relaxed at each point (that is the method), so its residuals are
    reported but not required to vanish. points x periods x duration/dt steps are capped at
    ``MAX_ROTATING_STEPS``."""

    points: int = 4
    beta: float = 0.1
    duration: float = 20.0
    periods: int = 1
    name = "rotating_holomorphic"

    def __post_init__(self):
        count(self.points, "RotatingHolomorphic(points)", maximum=MAX_POINTS, why=_POINTS_WHY)
        count(self.periods, "RotatingHolomorphic(periods)", maximum=MAX_ROTATING_STEPS // self.points,
              why=f"points x periods x duration/dt steps are capped at {MAX_ROTATING_STEPS:.0e}")
        positive(self.beta, "RotatingHolomorphic(beta)")
        positive(self.duration, "RotatingHolomorphic(duration)")

    def error_vector(self, network, x, y, cost, relaxation, free):
        N, b, dt = self.points, positive(self.beta, "beta"), relaxation.step(network)
        steps = N * self.periods * math.ceil(self.duration / dt)
        if steps > MAX_ROTATING_STEPS:
            raise SubstrateValueError(
                f"{self!r}: points x periods x duration/dt = {steps:.3g} steps (dt={dt:g}) exceed the cap of "
                f"{MAX_ROTATING_STEPS:.0e} (hours of integration); shorten duration or use fewer points/periods")
        tol = relaxation.nudged_tol(repr(self), b, network, cost, free, y)
        sols = []
        if tol < relaxation.tol:  # the free state's error drifts during the rotation: O(tol/|beta|) in v
            free = relaxation.run(network, x, u0=free.u, tol=tol)
            sols.append(free)
        u = free.u.astype(np.complex128)
        r0 = activity(network, free.u)
        acc = np.zeros_like(u)
        for j in range(N * self.periods):
            beta = b * np.exp(2j * np.pi * j / N)
            sol = integrate(network, x, t_span=(0.0, self.duration), method=relaxation.method,
                            dt=dt, u0=u, nudge=Nudge(cost, beta, y), dtype=np.complex128)
            u = sol.u[-1]
            # r - r*(0): the same sum for N >= 2 (sum_j 1/beta_j = 0 over whole periods) without the
            # cancellation of |r*(0)|/|beta| terms, and one-sided EP for N = 1 (as Holomorphic(1))
            acc += (activity(network, u) - r0) / beta
            sols.append(sol)
        return (acc / (N * self.periods)).real, sols


@dataclass(frozen=True)
class Limit(Estimator):
    """The beta -> 0 limit of every EP estimator, computed exactly: v = rho'(u*) du*/dbeta with
    J du*/dbeta = -dl/dr_L (dense J per sample). For a non-symmetric network it differs from the
    exact gradient by the asymmetry bias alone (docs/equations.md, section 4.2), so
    estimate - Limit is the finite-nudge part of an estimator's bias and Limit - Exact the asymmetry
    part."""

    name = "limit"

    def error_vector(self, network, x, y, cost, relaxation, free):
        vf = _field_of(network, x, free, "Limit")
        sl = network.slices[cost.layer]
        act = network.layer(cost.layer).activation
        e = np.zeros_like(free.u)
        e[:, sl] = cost.value_and_grad(rho(act, free.u[:, sl]), y)[1]
        J = jacobian(vf, free.u)
        du = np.linalg.solve(J, -e[..., None])[..., 0]
        d = np.empty_like(free.u)
        for layer in network.layers:
            s = network.slices[layer.name]
            d[:, s] = rho_prime(layer.activation, free.u[:, s])
        return d * du, []


@dataclass(frozen=True)
class Exact(Estimator):
    """The exact gradient by implicit differentiation at the free equilibrium: v = lambda with
    J^T lambda = -dl/du (membrane coordinates); ``solver`` as in :class:`substrate.Implicit`."""

    solver: str = "direct"
    name = "exact"

    def __post_init__(self):
        check_solver(self.solver, "Exact")

    def error_vector(self, network, x, y, cost, relaxation, free):
        vf = _field_of(network, x, free, "Exact", relaxation.tol)
        _, g = cost_gradient_u(network, cost, free.u, y)
        return solve_adjoint(vf, free.u, -g, Implicit(solver=self.solver)), []


def _field_of(network, x, free, what, tol=None):
    """The vector field of the free phase (on a device: the weights that phase read), for derivatives
    at its equilibrium; a device must be differentiable and, read at a finite time, at equilibrium."""
    if not getattr(network, "differentiable", True):
        raise SubstrateValueError(
            f"{what}: the device has per-step or per-sample noise, converters or activation mismatch, "
            "which the derivative kernels do not model; take the exact gradient of its nominal network")
    if tol is not None:
        check_equilibrium(network, free, tol, f"{what} (implicit differentiation)")
    return free.field if _same_field(free, network) else VectorField(network, x, dtype=free.u.dtype)


def _same_field(free, network):
    f = free.field
    return f is not None and f.network is network and f.dtype == free.u.dtype


ESTIMATORS = {"one_sided": OneSided, "negative": Negative, "centred": Centred, "holomorphic": Holomorphic,
              "rotating_holomorphic": RotatingHolomorphic, "limit": Limit, "exact": Exact}


def make_estimator(name: str, **params) -> Estimator:
    """An estimator by name (``ESTIMATORS``) with its parameters, for configs."""
    choice(name, "make_estimator(name)", tuple(ESTIMATORS))
    try:
        return ESTIMATORS[name](**params)
    except TypeError as e:
        raise SubstrateValueError(f"estimator {name!r}: {e}") from None


# ------------------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class Estimate:
    """An EP (or exact) gradient of the batch-mean cost.

    gradients: a :class:`substrate.Gradients` (same structure as the adjoint methods', so estimates
    compare element by element); readout: {"weight", "bias"} gradients of a cross-entropy readout
    (empty for squared error); error: v (batch, n); free: the free equilibrium; nudged: the phases
    after it (first, for an estimator that subtracts r*(0) and a nudge that needs it, the free phase
    re-relaxed to the nudged tolerance; see :class:`Relaxation`); converged: every relaxation reached
    its tolerance; logits: the cost layer's output at the free equilibrium (readout logits, or the
    layer's activities); counts: what the hardware did (:attr:`counts`)."""

    gradients: Gradients
    readout: dict
    error: np.ndarray
    free: Solution
    nudged: list
    converged: bool
    logits: np.ndarray

    @property
    def loss(self) -> float:
        """The cost at the free equilibrium (its real part)."""
        return float(np.real(self.gradients.loss))

    @cached_property
    def counts(self):
        """What the hardware did for this estimate (a :class:`substrate.Counts`, docs/equations.md,
        section 9): every phase (free, nudged, re-relaxed), the targets converted once (held by the
        nudge for all phases), and in digital: the error vector (a multiply-add per neuron, sample
        and phase), the parameter gradient v_post r_pre, the readout (logits, softmax error and its
        gradient) and, for the exact and limit estimators, the dense solve. Memory: the equilibria
        the estimate holds (free and nudged states) and v. None if the free phase has no circuit."""
        free = self.free
        if free.counts is None:
            return None
        network, (batch, n) = free.field.network, free.u.shape
        phases = [free] + list(self.nudged)
        run = _counts.total(p.counts for p in phases)
        flops = sum(2 * n * batch * _counts.values(p.u.dtype) for p in phases)
        flops += _counts.parameter_flops(network, batch)
        classes = self.logits.shape[1]
        if self.readout:
            width = self.readout["weight"].shape[1]
            flops += (4 * classes * width + 5 * classes) * batch  # logits, softmax error, weight and bias gradients
        if self.gradients.method in ("ep:exact", "ep:limit"):
            flops += _counts.direct_solve_flops(n, batch)
        held = sum(n * batch * _counts.values(p.u.dtype) for p in phases) + n * batch + classes * batch
        return run.replace(samples=batch, dac=run.dac + classes * batch, flops=run.flops + flops,
                           memory=held, traffic=run.traffic + 2 * n * batch)


def check_target(network, cost, y, batch) -> np.ndarray:
    """Targets y as a float array (batch, width), checked as a nudge checks them (shape, NaN/Inf) for
    every estimator: the exact and limit ones never build a nudge, and numpy would broadcast integer
    labels of length batch = width against the (batch, width) activities without a word."""
    try:
        target = np.asarray(y)
    except ValueError:  # ragged nested lists
        target = None
    # by dtype, not float(): that would take None (NaN) and strings ('1') as targets
    if target is None or target.dtype.kind not in "biuf":
        raise SubstrateValueError(f"y (the targets) must be a real array (batch, width), got "
                                  f"{y.dtype if isinstance(y, np.ndarray) else type(y).__name__}")
    target = target.astype(float)
    try:  # beta = 0 is valid: only the target's shape and values can be refused
        Nudge(cost, 0.0, target).kernel_args(network, np.float64, batch)
    except SubstrateValueError as e:
        raise SubstrateValueError(f"y (the targets): {e}") from None
    return target


def free_phase(network, x, relaxation: Relaxation = Relaxation(), u0=None) -> Solution:
    """The free equilibrium (from zero, or ``u0``). A new equilibrium: a device redraws the read
    noise it holds per equilibrium, which the nudged phases that start from it then share."""
    network.new_equilibrium()
    return relaxation.run(network, x, u0=u0)


def estimate(network: Network, x, y, cost: Cost, estimator: Estimator = Centred(),
             relaxation: Relaxation = Relaxation(), free: Solution | None = None) -> Estimate:
    """The gradient of the batch-mean cost (1/B) sum_b l(r_L; y_b) estimated by ``estimator``.

    x: inputs (batch, size) or {name: array}; y: targets (batch, width): the nudged layer's target
    activities for squared error, one-hot classes for cross-entropy, checked (:func:`check_target`)
    for every estimator. ``free``: a free equilibrium already relaxed for these inputs (so that
    several estimators share it)."""
    if not isinstance(estimator, Estimator):
        raise SubstrateValueError(f"estimator must be an ep.Estimator, got {type(estimator).__name__}")
    if not isinstance(cost, Cost):
        raise SubstrateValueError(f"cost must be a substrate.Cost, got {type(cost).__name__}")
    if not isinstance(relaxation, Relaxation):
        raise SubstrateValueError(f"relaxation must be an ep.Relaxation, got {type(relaxation).__name__}")
    if free is None and not network.inputs:  # without inputs only the free phase knows the batch
        free = free_phase(network, x, relaxation)
    batch = free.u.shape[0] if free is not None else len(next(iter(network.check_inputs(x).values())))
    y = check_target(network, cost, y, batch)  # before the free phase, when the inputs give the batch
    free = free_phase(network, x, relaxation) if free is None else free
    v, sols = estimator.error_vector(network, x, y, cost, relaxation, free)
    nb = free.u.shape[0]
    vf = free.field if _same_field(free, network) else VectorField(network, x, dtype=free.u.dtype)
    g = vf.param_vjp(free.u, v.astype(free.u.dtype))
    scale = 1.0 / nb
    weights = {k: w * scale for k, w in g["weights"].items()}
    biases = {k: b * scale for k, b in g["biases"].items()}
    inputs = {k: a * scale for k, a in g["inputs"].items()}
    tau = {layer.name: np.zeros_like(layer.tau) if np.ndim(layer.tau) else 0.0 for layer in network.layers}
    r_out = activity(network, free.u)[:, network.slices[cost.layer]]
    losses = cost.value_and_grad(r_out, y)[0]
    readout, logits = {}, r_out
    if cost.kind == "cross_entropy":
        logits = cost.readout(r_out)
        e = cost.readout_error(r_out, y)
        readout = {"weight": e.T @ r_out * scale, "bias": e.mean(axis=0)}
    grads = Gradients(float(np.mean(losses)), weights, biases, tau, inputs, np.zeros_like(free.u),
                      f"ep:{estimator.name}", free)
    converged = free.ok and all(s.ok for s in sols)
    return Estimate(grads, readout, v, free, sols, converged, logits)
