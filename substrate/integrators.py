"""Integrators for tau du/dt = F(u) = -u + N(u) (docs/equations.md, section 2), and the two entry points
:func:`integrate` (a time span with saved points) and :func:`relax` (to a steady state).

A stepper is data: an explicit Runge-Kutta tableau or the name of an exponential method. One compiled
kernel, ``_kernels.run``, does the stepping for all of them; the classes below only describe a method.

* ``euler``      u+ = u + h F(u)/tau                                               order 1
* ``exp_euler``  u+ = e^{-h/tau} u + (1 - e^{-h/tau}) N(u)    (ETD1)                order 1
* ``etd2rk``     a = e^z u + (1 - e^z) N(u);  u+ = a + (h/tau) phi_2(z) [N(a) - N(u)]  order 2
* ``etdrk4``     Cox & Matthews (2002) ETDRK4                                      order 4
* ``rk4``        classical Runge-Kutta                                             order 4
* ``dopri5``     Dormand-Prince 5(4), adaptive with Hairer's PI step controller     order 5

Exponential methods treat the leak exactly: they are unconditionally stable in it and ETD1 keeps a
fixed point of F exactly fixed.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from functools import cache, cached_property

import numpy as np

from . import _kernels as K
from . import counts as _counts
from . import validate
from .dynamics import VectorField, rightmost_eigenvalues
from .errors import ConvergenceError, DivergenceError, StepSizeError, SubstrateValueError
from .network import Network, _own_reading, _shown
from .nudge import Nudge, no_nudge


# ------------------------------------------------------------------------------------ steppers
@dataclass(frozen=True)
class AbstractStepper:
    """An integrator: its name, its order, whether it adapts its step, and the compiled stepper it hands the kernel."""
    name: str
    order: int
    adaptive = False

    def kernel_args(self):
        """The method as ``_kernels.run`` takes it: a ``_kernels.Stepper``."""
        raise NotImplementedError

    @cached_property
    def _kernel(self) -> tuple:
        """:meth:`kernel_args` as a plain tuple, built once per stepper (its fields are frozen; the
        kernels only read it): an attribute read a call, no hashing of the tableau."""
        return tuple(self.kernel_args())


@dataclass(frozen=True)
class ExplicitRK(AbstractStepper):
    """An explicit Runge-Kutta method on du/dt = F(u)/tau, given by its Butcher tableau."""

    a: tuple = ()
    b: tuple = ()
    b_hat: tuple | None = None  # embedded lower-order weights (adaptive methods)
    fsal: bool = False

    @property
    def adaptive(self):
        return self.b_hat is not None

    def kernel_args(self):
        b = np.array(self.b, float)
        e = b - np.array(self.b_hat, float) if self.adaptive else np.zeros(0)
        return K.Stepper(K.EXPLICIT_RK, 0, np.array(self.a, float).reshape(len(b), len(b)), b, e, self.fsal,
                         self.adaptive)


@dataclass(frozen=True)
class ExponentialRK(AbstractStepper):
    """An exponential Runge-Kutta method: the leak -u/tau integrated exactly, N by quadrature; its
    coefficients (phi functions of z = -h/tau per neuron) are in ``_kernels.exponential_coefficients``."""

    method: int = K.ETD1
    stages: int = 1

    def kernel_args(self):
        s = self.stages
        return K.Stepper(K.EXPONENTIAL, self.method, np.zeros((s, s)), np.zeros(s), np.zeros(0), False, False)


_DOPRI_A = (
    (0, 0, 0, 0, 0, 0, 0),
    (1 / 5, 0, 0, 0, 0, 0, 0),
    (3 / 40, 9 / 40, 0, 0, 0, 0, 0),
    (44 / 45, -56 / 15, 32 / 9, 0, 0, 0, 0),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0, 0, 0),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0, 0),
    (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0),
)

METHODS = {
    m.name: m for m in (
        ExplicitRK("euler", 1, a=((0,),), b=(1,)),
        ExplicitRK("rk4", 4, a=((0, 0, 0, 0), (0.5, 0, 0, 0), (0, 0.5, 0, 0), (0, 0, 1, 0)),
                   b=(1 / 6, 1 / 3, 1 / 3, 1 / 6)),
        ExplicitRK("dopri5", 5, a=_DOPRI_A, b=_DOPRI_A[-1],
                   b_hat=(5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
                   fsal=True),
        ExponentialRK("exp_euler", 1, method=K.ETD1, stages=1),
        ExponentialRK("etd2rk", 2, method=K.ETD2RK, stages=2),
        ExponentialRK("etdrk4", 4, method=K.ETDRK4, stages=4),
    )
}


# the steppers of METHODS as the module made them (kept alive by it: their ids are never reused); a
# stepper put into METHODS later is not among them
_BUILT_IN = frozenset(map(id, METHODS.values()))


@cache
def _no_nudge(dtype) -> tuple:
    """``nudge.no_nudge(dtype)`` as a plain tuple, built once per dtype (not read with code NO_NUDGE)."""
    return tuple(no_nudge(dtype))


def get_method(method) -> AbstractStepper:
    """The integrator ``method`` names (a key of ``METHODS``), or ``method`` itself if it is one."""
    if isinstance(method, AbstractStepper):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]
    raise SubstrateValueError(f"method={method!r} is not a known integrator; allowed: {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------ results
_STATUS = {K.SUCCESS: "success", K.NOT_CONVERGED: "not_converged", K.DIVERGED: "diverged",
           K.STEP_TOO_SMALL: "step_too_small", K.MAX_STEPS: "max_steps"}


class _Deferred:
    """A field of a frozen dataclass whose value may be given as a ``_Later``: computed on first
    access and kept (the final residual of ``integrate``: one more field evaluation, paid only if read)."""

    def __set_name__(self, owner, name):
        self.name = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            raise AttributeError(self.name)  # no default (dataclasses ask the class)
        value = obj.__dict__[self.name]
        if isinstance(value, _Later):
            value = obj.__dict__[self.name] = value.compute(*value.args)
        return value

    def __set__(self, obj, value):
        obj.__dict__[self.name] = value


class _Later:
    """A value computed when first read: ``compute(*args)``."""

    __slots__ = ("compute", "args")

    def __init__(self, compute, *args):
        self.compute, self.args = compute, args


@dataclass(frozen=True)
class Solution:
    """What an integration produced, and how it went.

    u: states, (len(t), batch, n) for :func:`integrate`, (batch, n) for :func:`relax`.
    status: ``success`` (integrate reached the end / relax converged to a stable equilibrium),
    ``not_converged``, ``diverged``, ``step_too_small``, ``max_steps`` or (relax) ``unstable``: the
    residual test passed at a fixed point that is not a stable one of the ODE; ``message`` gives the
    time and step, or the eigenvalue.
    residual: per sample, max_i |F_i(u)| at the final state (F without the 1/tau).
    residual_trace, trace_t: relax only, the largest residual over the batch at every step, and the
    time of that step.
    eigenvalue: relax only, when the residual test passed: per sample the rightmost eigenvalue of
    tau^-1 dF/du at the final state (beyond 12 neurons an estimate, see :func:`stability`).
    counts: what the hardware did (:class:`~substrate.counts.Counts`, from the steps, field
    evaluations and time the kernel returned; None without the vector field, as from torchdiffeq).
    The stability check of :func:`relax` is the simulator's, not the hardware's: it is not counted.
    """

    t: np.ndarray
    u: np.ndarray
    status: str
    method: str
    steps: int
    nfev: int
    rejected: int
    residual: np.ndarray = _Deferred()
    t_final: float
    residual_trace: np.ndarray | None = None
    trace_t: np.ndarray | None = None
    message: str = ""
    eigenvalue: np.ndarray | None = None
    slices: dict = field(default_factory=dict, repr=False)
    # the vector field the states were computed with (on a device: that phase's read weights), so that
    # derivatives at them use the same circuit
    field: object = field(default=None, repr=False, compare=False)
    t_start: float = 0.0  # where the integration started (t_span[0]; relax: 0)

    @property
    def ok(self) -> bool:
        """Whether the integration succeeded (``status == "success"``); ``converged`` is the same."""
        return self.status == "success"

    converged = ok

    @cached_property
    def counts(self):
        """The :class:`~substrate.counts.Counts` of this phase (computed when first read)."""
        if self.field is None:
            return None
        # the state at t_start is the initial one, given, not read from the circuit
        reads = int(np.count_nonzero(np.atleast_1d(self.t) > self.t_start))
        return _counts.phase(self.field.network, batch=self.field.batch, steps=self.steps, nfev=self.nfev,
                             settle_time=self.t_final - self.t_start, reads=reads, dtype=self.u.dtype)

    def state(self, layer: str) -> np.ndarray:
        """The states of one layer (last axis restricted to its neurons)."""
        return self.u[..., self.slices[layer]]

    def report(self) -> str:
        """One line: the method, the status, the time reached, steps, field evaluations and the largest residual."""
        return (f"{self.method}: {self.status} at t={self.t_final:.6g} after {self.steps} steps, "
                f"{self.nfev} field evaluations ({self.rejected} rejected), "
                f"max residual {np.max(self.residual):.3e}" + (f"; {self.message}" if self.message else ""))


def _solution(t, u, status, method, steps, nfev, rejected, residual, t_final, residual_trace=None, trace_t=None,
              message="", eigenvalue=None, slices=None, field=None, t_start=0.0) -> Solution:
    """``Solution(...)`` for the engine's own calls (the same fields and defaults): its attributes
    written at once as one dictionary (the frozen dataclass's __init__ sets its 17 fields one by one
    through object.__setattr__: ~2 us, a tenth of a small network's call)."""
    sol = object.__new__(Solution)
    object.__setattr__(sol, "__dict__", {
        "t": t, "u": u, "status": status, "method": method, "steps": steps, "nfev": nfev, "rejected": rejected,
        "_residual": residual, "t_final": t_final, "residual_trace": residual_trace, "trace_t": trace_t,
        "message": message, "eigenvalue": eigenvalue, "slices": {} if slices is None else slices, "field": field,
        "t_start": t_start})  # _residual: where _Deferred keeps it
    return sol


# ------------------------------------------------------------------------------------ checks
# the engine's wording: what is no number is refused first ("dt='big' must be a positive number")
# A float in range (and an allowed None) is passed at once: a call checks up to eight numbers, ~0.3 us each through
# validate's general path
def _positive(value, name, *, allow_none=False, allow_inf=False):
    if type(value) is float and 0.0 < value and (value < math.inf or allow_inf):
        return value
    if value is None and allow_none:
        return None
    return validate.positive(value, name, allow_none=allow_none, allow_inf=allow_inf, staged=True)


def _nonnegative(value, name):
    if type(value) is float and 0.0 <= value < math.inf:
        return value
    return validate.nonnegative(value, name, staged=True)


def _count(value, name):  # the compiled kernels count steps in int64
    if type(value) is int and 1 <= value < 2 ** 63:
        return value
    return validate.count(value, name, maximum=2 ** 63 - 1, allowed="a positive integer <= 2**63 - 1")


# The largest single array (saved states, step sizes, checkpoints) a call may allocate: a typo in dt,
# t_span or max_steps is refused up front instead of exhausting the machine's memory.
MAX_ALLOCATION_GIB = 4.0


_FEW_STATES = 2 ** 20  # saved states up to this many numbers (16 MiB at most) are far below the cap: not checked


def allocate(shape, dtype, what: str, remedy: str) -> np.ndarray:
    """An uninitialised array, refused (with its size) beyond ``MAX_ALLOCATION_GIB``. ``what`` names it,
    formatted with the shape's sizes when refused: "the states at {0} t_eval points" (not at every call)."""
    gib = math.prod(map(int, shape)) * np.dtype(dtype).itemsize / 2 ** 30
    if gib > MAX_ALLOCATION_GIB:
        what = what.format(*shape)
        raise SubstrateValueError(f"{what} would take {gib:.3g} GiB, more than the cap of "
                                  f"{MAX_ALLOCATION_GIB:g} GiB (integrators.MAX_ALLOCATION_GIB); {remedy}")
    return np.empty(shape, dtype)


def check_step_count(stepper, t0, t1, dt, max_steps, what="t_span"):
    """A fixed-step method needs ceil((t1 - t0)/dt) steps: refuse at once beyond max_steps."""
    if stepper.adaptive or dt is None:
        return
    # 1e-12: a span that is a whole number of steps up to rounding does not count one more
    steps = math.ceil((t1 - t0) / dt * (1 - 1e-12))
    if steps > max_steps:
        raise SubstrateValueError(
            f"{what}=({t0:g}, {t1:g}) with dt={dt:g} needs {steps:.6g} steps of {stepper.name!r}, more than "
            f"max_steps={max_steps}; raise dt or max_steps, or shorten {what}")


_FEW_TIMES = 16  # t_eval up to this length is checked as Python floats (see _check_times)


def _check_times(t_span, t_eval, default, end_at_t1=False):
    """(t0, t1, t_eval as an array), validated; ``default(t0, t1)`` gives t_eval when it is None."""
    try:
        t0, t1 = t_span
        t0, t1 = float(t0), float(t1)  # two calls: ~0.2 us less than map(float, t_span), the same errors
    except (TypeError, ValueError):
        raise SubstrateValueError(f"t_span={t_span!r} must be a pair (t0, t1) of numbers") from None
    if not -math.inf < t0 < t1 < math.inf:  # NaN fails a comparison
        raise SubstrateValueError(f"t_span={t_span!r} must be finite with t1 > t0")
    if t_eval is None:  # the defaults are valid by construction: not checked (this runs at every call)
        return t0, t1, np.array(default(t0, t1), dtype=float)
    try:
        t_eval = np.array(t_eval, dtype=float)
    except (TypeError, ValueError):
        raise SubstrateValueError(f"t_eval={t_eval!r} must be a 1-D array of times") from None
    if t_eval.ndim != 1 or t_eval.size == 0:
        ok = False
    elif t_eval.size <= _FEW_TIMES:  # a few Python floats: ~1 us where numpy's diff, any and all take ~6
        ts = t_eval.tolist()
        # NaN fails a comparison; one time has nothing to be ordered with (all(map(...)) costs ~0.4 us)
        ok = t0 <= ts[0] and ts[-1] <= t1 and (len(ts) == 1 or all(map(operator.lt, ts, ts[1:])))
    else:
        ok = not (np.any(np.diff(t_eval) <= 0) or t_eval[0] < t0 or t_eval[-1] > t1
                  or not np.all(np.isfinite(t_eval)))
    if not ok:
        raise SubstrateValueError("t_eval must be a non-empty, strictly increasing 1-D array within t_span")
    if end_at_t1 and t_eval[-1] != t1:
        raise SubstrateValueError(f"t_eval must end at t_span[1] = {t1:g}, the state the gradient starts from")
    return t0, t1, t_eval


def _prepare(network, x, u0, dtype, batch, finite=True):
    if not isinstance(network, Network):
        raise SubstrateValueError(f"network must be a substrate Network, got {type(network).__name__}")
    if u0 is not None and batch is None and not network.inputs:
        batch = np.shape(u0)[0] if np.ndim(u0) == 2 else None
    if u0 is not None and dtype is None and (u0.dtype.kind == "c" if type(u0) is np.ndarray
                                             else np.iscomplexobj(u0)):
        dtype = np.complex128
    vf = _field(network, x, batch, dtype)
    u = vf.zero_state if u0 is None else vf.state(u0, "u0", finite)
    return vf, u


def _field(network, x, batch, dtype) -> VectorField:
    """``VectorField(network, x, batch=batch, dtype=dtype)``, or the one the last call on ``network``
    made if it would be the same: the very input array x with its shape and dtype, the same batch and
    dtype arguments, and the network's cached packed weights and drive V x + b still those of that
    field (``Network._current`` checks the parameters' and the inputs' bits). The inputs' checks and
    the field's construction are skipped (a tenth of a small network's call); a field is shared by
    the Solutions of such calls, which only read it. One such field is kept per ``dtype`` argument,
    so that phases that alternate dtypes (holomorphic EP's real and complex nudges) each find theirs."""
    try:
        memo = network._field.get(dtype)
    except TypeError:  # an unhashable dtype argument, which VectorField refuses below
        memo = None
    if memo is not None and memo[0] is x and memo[1] is batch and memo[2] is dtype and x.shape == memo[3] \
            and x.dtype is memo[4] and network._current(memo[5].dtype, memo[5].drive, memo[5].inputs):
        return memo[5]
    vf = VectorField(network, x, batch=batch, dtype=dtype)
    # only where the field is a function of the parameters and inputs alone: no device effects
    if type(x) is np.ndarray and not vf.effects and _plain(type(network)):
        network._field[dtype] = (x, batch, dtype, x.shape, x.dtype, vf)
    return vf


@cache
def _plain(cls) -> bool:
    """Does ``cls`` read its parameters as :class:`Network` does and add no device effect in the
    stepping kernel (so that a field made for the same parameters and inputs is the same)?"""
    return _own_reading(cls) and cls.kernel_effects is Network.kernel_effects


def _initial_step(vf: VectorField, u, tau_min, order, rtol, atol):
    """Hairer, Norsett & Wanner's starting step (as in scipy's select_initial_step), on du/dt = F/tau."""
    tauinv = vf.packed.tauinv[None, :]  # in the state's precision, so the trial state keeps its dtype
    ub = u.T
    f0 = vf(ub) * tauinv
    scale = np.maximum(atol + rtol * np.abs(ub), np.finfo(float).tiny)
    d0, d1 = np.sqrt(np.mean(np.abs(ub / scale) ** 2)), np.sqrt(np.mean(np.abs(f0 / scale) ** 2))
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else float(0.01 * d0 / d1)  # a Python float keeps f0's dtype
    f1 = vf(ub + h0 * f0) * tauinv
    d2 = np.sqrt(np.mean(np.abs((f1 - f0) / scale) ** 2)) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / (order + 1))
    h = min(100 * h0, h1, tau_min * 10)
    return h if np.isfinite(h) and h > 0 else 1e-6 * tau_min


def _no_record(n, nb, dtype, n_save):
    """(h_record, save_step, ckpt_every, ckpt) of ``_kernels.Record`` when nothing is recorded for a
    gradient."""
    return np.zeros(0), np.zeros(n_save, np.int64), 0, np.zeros((0, n, nb), dtype)


# buffer sets kept per network, by the shapes of a call (see _solve): a few at most in a run (a
# training loop's batch and its last, smaller one; float64 and complex128 phases; relax and integrate)
_WORK_KEEP = 6


def _take(network, key):
    """The buffers ``key`` from an earlier call on ``network``, or None. Taken out of the network's
    store while in use (a concurrent call makes its own); :func:`_give` puts them back."""
    return network._work.pop(key, None)


def _give(network, key, buffers):
    network._work[key] = buffers
    while len(network._work) > _WORK_KEEP:
        network._work.pop(next(iter(network._work)))  # the oldest


def _new_work(n, nb, dtype, s) -> tuple:
    """The stepping kernel's buffers, a ``_kernels.Work`` as a plain tuple."""
    real = np.float32 if dtype == np.float32 else np.float64
    return np.empty((10 + s, n, nb), dtype), np.empty((s + 1, n), real), np.empty((s + 1, s, n), real), np.empty(nb)


def _check_effects(effects, stepper, adaptive, dtype):
    """Refuse a device's per-step draws with an adaptive method, and with complex states where the
    effect takes real states only."""
    if adaptive and any(getattr(e, "draws_per_step", False) for e in effects):
        raise SubstrateValueError(
            f"the device draws noise at every step (per-step read noise, output noise or state noise): "
            f"it needs a fixed-step method, not {stepper.name!r}")
    # the read chain takes complex states as their two quadratures; other per-step draws are real only
    real_only = [type(e).__name__ for e in effects
                 if getattr(e, "draws_per_step", False) and not getattr(e, "quadratures", False)]
    if dtype.kind == "c" and real_only:
        raise SubstrateValueError(
            f"the device's per-step noise ({', '.join(real_only)}) is drawn for real states only: complex "
            f"states (holomorphic EP) cannot take it; use a read policy other than 'step' and no state noise")


def _solve(vf, u, stepper, *, t0, t_end, dt, rtol, atol, max_steps, blowup, t_save, relax,
           res_rtol, res_atol, record=None, nudge=None):
    kstepper = stepper._kernel
    adaptive, stages = kstepper[6], kstepper[3].shape[0]  # K.Stepper's adaptive, len(bw)
    if nudge is not None and not isinstance(nudge, Nudge):
        raise SubstrateValueError(f"nudge must be a substrate.nudge.Nudge, got {type(nudge).__name__}")
    n, nb = u.shape
    p = vf.packed
    if dt is None:
        if not adaptive:
            raise SubstrateValueError(f"dt is required for the fixed-step method {stepper.name!r}")
        dt = _initial_step(vf, u, p.tau_min, stepper.order, rtol, atol)
    h_min = 1e-12 * max(abs(t0), abs(t_end) if math.isfinite(t_end) else 0.0, p.tau_min)
    if adaptive and dt < h_min:
        raise SubstrateValueError(f"dt={dt:g}, the first step of {stepper.name!r}, is below its smallest "
                                  f"step {h_min:.3g} (1e-12 of the time scale)")
    u_out = np.empty((n, nb), u.dtype)
    # the kernel's buffers, relax's traces (rows: the time and the largest residual at each of the
    # first 1e6 steps, written as taken; copied out below), the record of a call without gradient
    # (written, never read), and what the caller does not keep: the (empty) saved states of relax and
    # the kernel's residuals of integrate (which takes its own at the final state): reused across
    # calls of this shape
    length = min(max_steps, 1_000_000) + 1 if relax else 0
    key = (n, nb, vf.dtype, stages, length, None if record else len(t_save))
    buffers = _take(vf.network, key)
    if buffers is None:
        traces = np.empty((2, length))
        buffers = (_new_work(n, nb, vf.dtype, stages), traces, traces[0], traces[1],
                   None if record else _no_record(n, nb, vf.dtype, len(t_save)),
                   np.empty((0, n, nb), vf.dtype), np.zeros(nb))
    work, traces, t_trace, res_trace, unread, no_states, residual = buffers
    ns = len(t_save)
    saved = (no_states if ns == 0 else np.empty((ns, n, nb), vf.dtype) if ns * n * nb <= _FEW_STATES else
             allocate((ns, n, nb), vf.dtype, "the states at {0} t_eval points", "pass fewer t_eval points"))
    if relax:
        residual = np.zeros(nb)
    effects = vf.effects
    if effects:
        _check_effects(effects, stepper, adaptive, vf.dtype)
    # the configurations whose argument types are fixed by construction (see _run)
    typed = (None if effects or nudge is not None or record is not None or id(stepper) not in _BUILT_IN
             or not _own_reading(type(vf.network)) else (stepper.name, vf.dtype, p.wbuf.dtype, p.layer_act[1]))
    # plain tuples of the kernel's namedtuples (K.Stepper, Circuit, Span, Relaxation, Record, Nudge,
    # Work): Numba types them in C, a namedtuple costs ~2 us a call in its Python typeof
    status, t, steps, nfev, rejected = _run(typed, (
        kstepper, vf.circuit_fields, u,
        (float(t0), float(t_end), float(dt), float(rtol), float(atol), h_min, int(max_steps), float(blowup)),
        (relax, float(res_rtol), float(res_atol), residual, res_trace, t_trace),
        (t_save, saved, u_out, *(record or unread)),
        _no_nudge(vf.dtype) if nudge is None else tuple(nudge.kernel_args(vf.network, vf.dtype, vf.batch)),
        effects, work))
    trace = traces[:, :min(steps + 1, length)].copy() if relax else None  # (times, residuals)
    _give(vf.network, key, buffers)
    return status, t, steps, nfev, rejected, saved, residual, trace, u_out


def _run(typed, args):
    """``_kernels.run(*args)``. ``typed``: None, or a key that fixes the Numba types of ``args``: a
    built-in method (its tableau's types), the state dtype, the weights' dtype and whether the kernels
    compile the complex tanh and dsilu (``_kernels.layer_activations``), on a circuit that reads its
    parameters as :class:`Network` does, with no device effects, nudge or recording. Every
    array then is the engine's own (C order, writable, aligned: the packed weights, the drive, the
    buffers, the initial state (a fresh copy of u0, or the field's ``zero_state``), ``_no_nudge``)
    and the kernel compiled for the first such call is called directly after it, without the
    dispatcher typing ~30 arrays (~3 us a call, a tenth of a small network's)."""
    compiled = _COMPILED_RUN.get(typed) if typed is not None else None
    if compiled is not None:
        return compiled(*args)
    out = K.run(*args)
    if typed is not None:
        found = K.run.overloads.get(tuple(map(K.run.typeof_pyval, args)))
        if found is not None:
            _COMPILED_RUN[typed] = found.entry_point
    return out


_COMPILED_RUN = {}


def stability(vf: VectorField, u, nudge=None):
    """Whether fixed points are stable equilibria of tau du/dt = F(u) (+ a nudge's current C(u)).

    u: the states (n, batch) in the engine's layout. Returns (eigenvalue, unstable), both (batch,):
    the rightmost eigenvalue of tau^-1 (dF/du + dC/du) per sample, and whether its real part is not
    below 0 within rounding (>= -sqrt(eps) max(|lambda|, 1/tau_min)): an unstable, marginal (a
    centre) or singular fixed point. Explicit steps damp slow oscillations numerically, so a method
    can converge to such a point; the ODE does not. The eigenvalue comes from an Arnoldi space of
    dimension min(n, 12) (:func:`~substrate.dynamics.rightmost_eigenvalues`; 12 Jacobian-vector
    products, but on small networks the batched Arnoldi's Python and eig overhead dominates: measured
    ~3.7 ms a check against ~0.4 ms for a loose exp_euler relaxation of a 138-neuron network, batch 32,
    with a nudge): exact up to rounding for n <= 12,
    beyond a Ritz estimate (a few per cent on the bulk of the spectrum), counted as unstable only if
    its Ritz residual leaves no doubt, so that a stable network is never refused; an outlying
    unstable eigenvalue, the way -I + W diag(rho') loses stability, is resolved first. Without a
    nudge, a feed-forward circuit (:func:`_feedforward`) gets its exact -1/max(tau), without Arnoldi.
    """
    n, nb = u.shape
    tauinv = vf.packed.tauinv.astype(vf.dtype)[:, None]
    if nudge is None and _feedforward(vf.packed.conn):  # exact, and no Arnoldi (most of a small relaxation's time)
        return np.full(nb, -float(tauinv.real.min()), vf.dtype), np.zeros(nb, bool)
    ut = u.T
    # a finite difference where no exact product exists (a device's activation mismatch)
    h = np.finfo(vf.dtype).eps ** (1 / 3) * (1 + float(np.max(np.abs(u))))
    jvp = None if vf.mismatch else vf.jvp_at(u)
    # the nudge's dC/du exactly (its rho' and softmax made once), on its layer's rows
    rows, nudged = (None, None) if nudge is None else (vf.network.slices[nudge.cost.layer],
                                                         nudge.linearised(vf.network, u))

    def matvec(v):
        v = np.ascontiguousarray(v)
        out = jvp(v) if jvp is not None else (vf(ut + h * v.T) - vf(ut - h * v.T)).T / (2 * h)
        if nudge is not None:
            out[rows] += nudged(v[rows])
        return out * tauinv

    eigenvalue, residual = rightmost_eigenvalues(matvec, n, nb, vf.dtype)
    margin = math.sqrt(np.finfo(vf.dtype).eps) * np.maximum(np.abs(eigenvalue), float(tauinv.real.max()))
    return eigenvalue, eigenvalue.real - residual >= -margin


def _feedforward(conn) -> bool:
    """Do the state-to-state connections ``conn`` (``Packed.conn`` rows: offset, pre start, pre size,
    post start, post size) form no cycle (no lateral, no feedback)? Then J = -I + W diag(rho') is block
    triangular in a topological order of the layers, and the eigenvalues of tau^-1 J are -1/tau_i:
    every fixed point is stable, the rightmost eigenvalue -1/max(tau)."""
    edges = {(int(pre), int(post)) for _, pre, _, post, _ in conn}
    while edges:
        sources = {pre for pre, _ in edges} - {post for _, post in edges}
        if not sources:
            return False
        edges = {e for e in edges if e[0] not in sources}
    return True


def _checked_stability(vf: VectorField, u, nudge):
    """:func:`stability` of states u (engine layout), remembered on the network for the last states
    checked with its cached packed weights, no nudge and no device effects (what the check depends
    on): relaxing again from a checked equilibrium, which takes no step, does not repeat the check
    (on a small network it costs ~20 calls). Returns (eigenvalue, unstable, whether any sample is
    unstable); the caller reads ``unstable``, never writes it."""
    if nudge is not None or vf.effects:
        eigenvalue, unstable = stability(vf, u, nudge)
        return eigenvalue, unstable, bool(unstable.any())
    p, shape, data = vf.packed, u.shape, u.tobytes()
    memo = vf.network._stability
    if memo is None or memo[0] is not p or memo[1] != shape or memo[2] != data:
        eigenvalue, unstable = stability(vf, u)
        memo = vf.network._stability = (p, shape, data, eigenvalue, unstable, bool(unstable.any()))
    return memo[3].copy(), memo[4], memo[5]  # the eigenvalues go to the caller's Solution


def _finish(sol: Solution, on_failure: str, what: str):
    if sol.status == "success" or on_failure == "return":
        return sol
    err = {"diverged": DivergenceError, "step_too_small": StepSizeError}.get(sol.status, ConvergenceError)
    raise err(f"{what} failed: {sol.report()}", sol)


def _check_on_failure(on_failure):
    if not isinstance(on_failure, str) or on_failure not in ("raise", "return"):
        raise SubstrateValueError(f"on_failure={_shown(on_failure)}; allowed: 'raise', 'return'")


# ------------------------------------------------------------------------------------ entry points
def other_substrate(network):
    """The entry points of another substrate that brings its own (a resistive circuit's ``engine``,
    :mod:`substrate.circuits.engine`), or None for a neuron :class:`Network`: the one dispatch point
    of :func:`integrate`, :func:`relax` and ``substrate.gradient``."""
    return None if isinstance(network, Network) else getattr(network, "engine", None)


def integrate(network: Network, x=None, *, t_span, t_eval=None, method="rk4", dt=None, u0=None,
              dtype=None, batch=None, rtol=1e-6, atol=1e-9, max_steps=10_000_000, blowup=1e10,
              nudge=None, on_failure="raise") -> Solution:
    """Integrate tau du/dt = F(u) over ``t_span = (t0, t1)`` and return the states at ``t_eval``
    (default: t0 and t1), shape (len(t_eval), batch, n).

    x: inputs (array (batch, size) or {input name: array}); u0: initial state (batch, n), zeros by
    default; dtype: float32, float64 or complex128 (default: the network's). method: a name of
    ``METHODS`` or a stepper; dt: the step (fixed-step methods) or first step (``dopri5``, chosen
    automatically when None); rtol/atol: dopri5's error control. Steps land exactly on the t_eval
    points. ``nudge``: a :class:`~substrate.nudge.Nudge` teaching current added to F (its residual
    included). A state that turns NaN/Inf or exceeds ``blowup`` in magnitude stops the integration with
    status ``diverged``: raised as DivergenceError, or returned when ``on_failure="return"``.
    A resistive circuit (``substrate.circuits.Circuit``) is integrated by ``circuits.engine.integrate``.
    """
    if (other := other_substrate(network)) is not None:
        return other.integrate(network, x, t_span=t_span, t_eval=t_eval, method=method, dt=dt, u0=u0, dtype=dtype,
                               batch=batch, rtol=rtol, atol=atol, max_steps=max_steps, blowup=blowup, nudge=nudge,
                               on_failure=on_failure)
    stepper = get_method(method)
    _check_on_failure(on_failure)
    t0, t1, t_eval = _check_times(t_span, t_eval, default=_ends)
    dt = _positive(dt, "dt", allow_none=True)
    rtol, atol = _nonnegative(rtol, "rtol"), _nonnegative(atol, "atol")
    if stepper.adaptive and rtol == 0 and atol == 0:
        raise SubstrateValueError("rtol and atol cannot both be 0 for an adaptive method")
    max_steps = _count(max_steps, "max_steps")
    t_end = float(t_eval[-1])
    check_step_count(stepper, t0, t_end, dt, max_steps)
    blowup = _positive(blowup, "blowup")
    vf, u = _prepare(network, x, u0, dtype, batch)
    status, t, steps, nfev, rej, saved, _, _, u_out = _solve(
        vf, u, stepper, t0=t0, t_end=t_end, dt=dt, rtol=rtol, atol=atol,
        max_steps=max_steps, blowup=blowup, t_save=t_eval, relax=False, res_rtol=0.0, res_atol=0.0,
        nudge=nudge)
    if status == K.DIVERGED:
        residual = np.full(vf.batch, np.nan)
    elif nudge is None:  # one more field evaluation: deferred until the residual is read
        residual = _Later(_final_residual, vf, u_out)
    else:  # the nudge's arrays are the caller's: its current is taken now
        residual = np.max(np.abs(vf(u_out.T) + nudge.current(network, u_out.T)), axis=1)
    message = ""
    if status != K.SUCCESS:
        n_ok = int(np.searchsorted(t_eval, t, side="right"))
        message = (f"stopped at t={t:.6g} (step {steps}); states saved for the first {n_ok} of {len(t_eval)} "
                   "t_eval points, the rest are NaN")
        saved[n_ok:] = np.nan
    sol = _solution(t=t_eval, u=saved.transpose(0, 2, 1), status=_STATUS[status], method=stepper.name,
                   steps=steps, nfev=nfev, rejected=rej, residual=residual, t_final=t,
                   message=message, slices=network.slices, field=vf, t_start=t0)
    return _finish(sol, on_failure, "integrate")


_NO_TIMES = np.zeros(0)  # relax saves no state (an empty array, never written)


def _ends(t0, t1):
    """integrate's default t_eval: the two ends of t_span."""
    return [t0, t1]


def _final_residual(vf: VectorField, u_out) -> np.ndarray:
    """max_i |F_i(u)| per sample at the final state (engine layout, private to the Solution)."""
    return np.max(np.abs(vf(u_out.T)), axis=1)


def relax(network: Network, x=None, *, method="exp_euler", dt=None, tol=1e-6, rtol=0.0, u0=None,
          dtype=None, batch=None, max_time=math.inf, max_steps=100_000, step_rtol=None, step_atol=None,
          blowup=1e10, nudge=None, on_failure="raise") -> Solution:
    """Relax the circuit to its equilibrium F(u*) = 0.

    Stops when every sample satisfies max_i |F_i(u)| <= tol + rtol max_i |u_i| (checked at every
    step, from the step's own first field evaluation), or fails with ``not_converged`` after
    ``max_time`` or ``max_steps`` (raised as ConvergenceError unless ``on_failure="return"``), or with
    ``diverged``. A converged state must be a stable equilibrium of the ODE, every eigenvalue of
    tau^-1 dF/du there with a negative real part (checked by :func:`stability`); otherwise the status
    is ``unstable``, raised as ConvergenceError with the eigenvalue. ``dt``: the step of a
    fixed-step method, default tau_min/2 for explicit methods and tau_min for exponential ones; for
    ``dopri5`` the first step, whose error control uses ``step_rtol``/``step_atol``. ``nudge``: a
    :class:`~substrate.nudge.Nudge` teaching current added to F (the equilibrium is then that of F +
    beta dl/dr, its stability that of their sum). A device network with a finite relaxation
    time (``substrate.devices.RelaxationTime``) is read at that time: reaching it is a success.
    Other arguments as in :func:`integrate`. A resistive circuit is relaxed by ``circuits.engine.relax``.
    """
    if (other := other_substrate(network)) is not None:
        return other.relax(network, x, method=method, dt=dt, tol=tol, rtol=rtol, u0=u0, dtype=dtype, batch=batch,
                           max_time=max_time, max_steps=max_steps, step_rtol=step_rtol, step_atol=step_atol,
                           blowup=blowup, nudge=nudge, on_failure=on_failure)
    stepper = get_method(method)
    _check_on_failure(on_failure)
    tol, rtol = _nonnegative(tol, "tol"), _nonnegative(rtol, "rtol")
    if tol == 0 and rtol == 0:
        raise SubstrateValueError("tol and rtol cannot both be 0: the residual never reaches 0 exactly")
    dt = _positive(dt, "dt", allow_none=True)
    max_time = _positive(max_time, "max_time", allow_inf=True)
    max_steps = _count(max_steps, "max_steps")
    step_rtol = 0.1 * rtol if step_rtol is None else _nonnegative(step_rtol, "step_rtol")
    step_atol = 0.1 * tol if step_atol is None else _nonnegative(step_atol, "step_atol")
    blowup = _positive(blowup, "blowup")
    # u0's NaN/Inf check after the kernel, and only when it diverged: the residual at u0, taken before
    # any step, is NaN or Inf if u0 is (u enters it as itself), so the kernel returns at once (that
    # check is a tenth of a small network's call). An adaptive first step is chosen from u0 before.
    vf, u = _prepare(network, x, u0, dtype, batch, finite=stepper.adaptive and dt is None)
    if dt is None and not stepper.adaptive:
        tau_min = vf.packed.tau_min
        dt = tau_min if isinstance(stepper, ExponentialRK) else 0.5 * tau_min
    read_time = network.read_time  # a device with a finite relaxation time is read at that time
    status, t, steps, nfev, rej, _, residual, trace, u_out = _solve(
        vf, u, stepper, t0=0.0, t_end=min(max_time, read_time), dt=dt, rtol=step_rtol, atol=step_atol,
        max_steps=max_steps, blowup=blowup, t_save=_NO_TIMES, relax=True, res_rtol=rtol,
        res_atol=tol, nudge=nudge)
    if status == K.DIVERGED and steps == 0 and u0 is not None:
        vf.state(u0, "u0")  # refuses a u0 with NaN or Inf
    message = "" if status == K.SUCCESS else f"stopped at t={t:.6g} (step {steps})"
    eigenvalue, name = None, _STATUS[status]
    if status == K.SUCCESS:  # the residual test passed: is the fixed point a stable one of the ODE?
        eigenvalue, unstable, any_unstable = _checked_stability(vf, u_out, nudge)
        if any_unstable:
            b, name = int(np.flatnonzero(unstable)[0]), "unstable"
            message = (f"the fixed point of sample {b} ({int(unstable.sum())} of {vf.batch} samples) is not a "
                       f"stable equilibrium of the ODE: tau^-1 dF/du has the eigenvalue {eigenvalue[b]:.6g} "
                       f"(real part not below 0 within rounding); the ODE moves away from it, the steps "
                       f"of {stepper.name!r} converged to it only by their numerical damping")
    elif status == K.NOT_CONVERGED and read_time <= max_time and t >= read_time:
        name = "success"
        message = f"read at the device's relaxation time t={t:.6g}, residual {residual.max():.3e}"
    elif status == K.NOT_CONVERGED:
        message += f"; residual {residual.max():.3e} > tol {tol:g} + rtol {rtol:g} |u|"
    sol = _solution(t=np.array(t), u=u_out.T, status=name, method=stepper.name, steps=steps,
                   nfev=nfev, rejected=rej, residual=residual, t_final=t,
                   residual_trace=trace[1], trace_t=trace[0], message=message,
                   eigenvalue=eigenvalue, slices=network.slices, field=vf)
    return _finish(sol, on_failure, "relax")
