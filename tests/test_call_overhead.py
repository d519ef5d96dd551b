"""The per-call fast paths of integrate and relax (issue 17) refuse and accept exactly what the general
paths do, and the stepping kernel's state noise takes the activity of the moved state.

Fast paths checked against the general ones: t_eval as Python floats (up to 16 times) against numpy's
checks (longer arrays), the engine's number checks against ``substrate.validate``, the Solution filled
at once against the dataclass's own __init__, the inputs' finiteness (checked only when the cached drive
is recomputed) after an in-place edit to NaN."""

import dataclasses
import math

import numpy as np
import pytest

import substrate as S
from substrate import devices as D
from substrate import integrators as I
from substrate import validate
from substrate.errors import SubstrateValueError as Bad


@pytest.fixture(scope="module")
def net():
    return S.Network.layered([4, 8, 3], np.random.default_rng(0))


X = np.random.default_rng(1).random((2, 4))


# ------------------------------------------------------------------------------------ t_eval
def _times_bad_or_ok(t_eval):
    try:
        return tuple(I._check_times((0.0, 1.0), t_eval, None)[2])
    except Bad as e:
        return str(e)


@pytest.mark.parametrize("case", [
    [0.5], [0.0, 1.0], [0.2, 0.2], [0.3, 0.2], [-0.1], [1.5], [math.nan], [0.5, math.nan], [math.inf],
    [-math.inf, 0.5], [0.1, 0.5, 0.4], [0.1, math.nan, 0.4], [], [[0.5]], list(np.linspace(0, 1, 16)),
    (0.25, 0.75), (0.75, 0.25), [0, 1], [True], [0.5, "0.75"], ["x"], [0.5, None], [complex(0.5)]])
def test_short_t_eval_checked_as_numpy_would(case, monkeypatch):
    """A short t_eval (checked as Python floats) is refused or returned as numpy's checks of longer
    arrays would (the same case with the fast path turned off)."""
    fast = _times_bad_or_ok(case)
    monkeypatch.setattr(I, "_FEW_TIMES", 0)
    general = _times_bad_or_ok(case)
    assert fast == general
    try:
        times = np.array(case, dtype=float)
    except (TypeError, ValueError):
        times = np.zeros((1, 1))  # not times at all: refused
    valid = times.ndim == 1 and times.size > 0 and all(np.diff(times) > 0) and 0 <= times[0] and times[-1] <= 1
    assert isinstance(fast, tuple) == bool(valid), fast


def _span_reference(t_span):
    """t_span's check as written before (map(float, ...), math.isfinite): the message or (t0, t1)."""
    try:
        t0, t1 = map(float, t_span)
    except (TypeError, ValueError):
        return f"t_span={t_span!r} must be a pair (t0, t1) of numbers"
    if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
        return f"t_span={t_span!r} must be finite with t1 > t0"
    return t0, t1


@pytest.mark.parametrize("t_span", [(0.0, 1.0), (0, 1), [0.5, 2], "12", (1.0,), (1, 2, 3), 5.0, None, ("a", 1),
                                    (math.nan, 1.0), (0.0, math.inf), (-math.inf, 0.0), (1.0, 0.0), (1.0, 1.0),
                                    np.array([0.0, 1.0]), (np.float32(0.5), True), (1j, 2.0)])
def test_t_span_checked_as_before(t_span):
    """t_span unpacked and converted in two steps refuses and returns what map(float, t_span) with
    math.isfinite did."""
    try:
        got = I._check_times(t_span, None, I._ends)[:2]
    except Bad as e:
        got = str(e)
    assert got == _span_reference(t_span)


# ------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("value", [0.1, 1, np.float64(0.1), np.float32(0.5), 0.0, -1.0, math.nan, math.inf,
                                   True, "0.1", None, 2 ** 63, 10 ** 400, 1e308])
def test_number_checks_as_validate(value):
    """The engine's checks (a float in range passes at once) return or refuse what validate does."""
    pairs = [(lambda v: I._positive(v, "dt", allow_none=True),
              lambda v: validate.positive(v, "dt", allow_none=True, staged=True)),
             (lambda v: I._positive(v, "max_time", allow_inf=True),
              lambda v: validate.positive(v, "max_time", allow_inf=True, staged=True)),
             (lambda v: I._nonnegative(v, "tol"), lambda v: validate.nonnegative(v, "tol", staged=True)),
             (lambda v: I._count(v, "max_steps"),
              lambda v: validate.count(v, "max_steps", maximum=2 ** 63 - 1,
                                       allowed="a positive integer <= 2**63 - 1"))]
    for fast, general in pairs:
        outcomes = []
        for check in (fast, general):
            try:
                got = check(value)
                outcomes.append((type(got), got))
            except Bad as e:
                outcomes.append(str(e))
        assert outcomes[0] == outcomes[1], (value, outcomes)


# ------------------------------------------------------------------------------------ Solution
def test_solution_filled_at_once_is_the_dataclass(net):
    """_solution(...) equals Solution(...) field by field (defaults included) and reads alike."""
    sol = S.integrate(net, X, t_span=(0.0, 1.0), dt=0.1, method="euler")
    given = {f.name: getattr(sol, f.name) for f in dataclasses.fields(I.Solution)
             if f.name not in ("residual_trace", "trace_t", "eigenvalue", "message")}
    a, b = I._solution(**given), I.Solution(**given)
    assert a.__dict__.keys() == b.__dict__.keys()
    for f in dataclasses.fields(I.Solution):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert type(x) is type(y) and (x is y or np.array_equal(x, y)), f.name
    assert a.report() == b.report() and a.counts == b.counts
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.status = "diverged"
    late = I._solution(t=sol.t, u=sol.u, status="success", method="euler", steps=1, nfev=1, rejected=0,
                       residual=I._Later(lambda: np.array([7.0])), t_final=1.0)
    assert late.slices == {} and late.field is None and late.t_start == 0.0 and late.residual[0] == 7.0


# ------------------------------------------------------------------------------------ inputs
def test_inputs_turned_nan_in_place_are_refused(net):
    """The inputs' NaN check is made when the drive is recomputed: x edited in place to NaN after a
    call (the cached drive is of the finite x) is refused, by integrate and relax alike."""
    x = X.copy()
    S.integrate(net, x, t_span=(0.0, 0.1), dt=0.1, method="euler")
    x[1, 2] = math.nan
    with pytest.raises(Bad, match=r"x\['x'\] contains NaN or Inf"):
        S.integrate(net, x, t_span=(0.0, 0.1), dt=0.1, method="euler")
    with pytest.raises(Bad, match="contains NaN or Inf"):
        S.relax(net, x)
    with pytest.raises(Bad, match="contains NaN or Inf"):
        S.relax(net, np.full((2, 4), math.inf))


def test_inputs_dict_with_wrong_names_refused(net):
    with pytest.raises(Bad, match=r"inputs missing \['x'\], unknown \['z'\]"):
        S.relax(net, {"z": X})


# ------------------------------------------------------------------------------------ state noise
def test_state_noise_moves_the_state_before_its_activity():
    """Euler with state noise on a nonlinear network, u+ = u + h (-u + W rho(u) + b) + s sqrt(h) xi,
    against numpy with the same draws: xi recovered from a linear network with the same device seed
    and shape (identity, no weight: u+ = (1 - h) u + s sqrt(h) xi). The next step's products must take
    rho of the moved state. Tolerance 1e-12: rounding of a few operations per step over 8 steps."""
    m, batch, h, steps, s = 6, 3, 0.1, 8, 0.2
    rng = np.random.default_rng(3)
    W, b = rng.normal(size=(m, m)), rng.normal(size=m)
    times = h * np.arange(steps + 1)
    kw = dict(batch=batch, t_span=(0.0, times[-1]), t_eval=times, method="euler", dt=h)
    free = S.Network([S.Layer("h", m, activation="identity")])
    u_lin = S.integrate(D.attach(free, D.Device((D.StateNoise(s),)), np.random.default_rng(9)), **kw).u
    kicks = u_lin[1:] - (1 - h) * u_lin[:-1]
    assert np.abs(kicks).max() > 0.05
    net = S.Network([S.Layer("h", m, activation="logistic", bias=b)], [S.Connection("h", "h", W)])
    got = S.integrate(D.attach(net, D.Device((D.StateNoise(s),)), np.random.default_rng(9)), **kw).u
    u = np.zeros((batch, m))
    for k in range(steps):
        r = 1 / (1 + np.exp(2 - 4 * u))
        u = u + h * (-u + r @ W.T + b) + kicks[k]
        np.testing.assert_allclose(got[k + 1], u, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ compiled run
def test_run_called_directly_gives_the_dispatchers_bits(monkeypatch):
    """The compiled stepping kernel called without the dispatcher (``integrators._run``, kept for the
    configurations whose argument types are fixed) returns what the dispatcher's call returned, bit
    for bit, for each built-in method and dtype; a nudge, a device effect or a network reading its
    own parameters or a stepper of the user's never takes that path."""
    monkeypatch.setattr(I, "_COMPILED_RUN", {})
    net = S.Network.layered([4, 8, 3], np.random.default_rng(0), activation="tanh")
    for dtype in ("float64", "complex128"):
        for method in ("euler", "dopri5", "etd2rk"):  # the families: fixed step, adaptive, exponential
            def phase():
                sol = S.integrate(net, X, t_span=(0.0, 0.6), t_eval=[0.2, 0.6], dt=0.1, method=method,
                                  dtype=dtype)
                return sol.u, sol.steps, S.relax(net, X, method=method, dtype=dtype, tol=1e-7).u
            first = phase()  # by the dispatcher, which leaves its compiled kernel in _COMPILED_RUN
            assert (method, np.dtype(dtype), np.dtype("float64"), True) in I._COMPILED_RUN  # tanh: costly
            again = phase()
            for a, b in zip(first, again):
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # complex states of logistic layers: the kernel without the tanh and dsilu rows
    # (_kernels.layer_activations), its own key, and the dispatcher's bits (through a nudge of beta 0,
    # which adds exact zeros and is never called directly)
    y = np.eye(3)[[0, 1]]
    logistic = S.Network.layered([4, 8, 3], np.random.default_rng(0))
    for _ in range(2):  # the dispatcher's call, then the direct one
        direct = S.integrate(logistic, X, t_span=(0.0, 0.6), dt=0.1, method="euler", dtype="complex128").u
        np.testing.assert_array_equal(direct, S.integrate(logistic, X, t_span=(0.0, 0.6), dt=0.1, method="euler",
                                                          dtype="complex128", nudge=S.Nudge(S.Cost("y"), 0.0, y)).u)
    assert ("euler", np.dtype("complex128"), np.dtype("float64"), None) in I._COMPILED_RUN
    known = dict(I._COMPILED_RUN)
    S.relax(net, X, method="rk4", nudge=S.Nudge(S.Cost("y"), 0.5, y))
    S.integrate(D.attach(net, D.Device((D.StateNoise(0.1),)), np.random.default_rng(1)), X,
                t_span=(0.0, 0.2), dt=0.1, method="rk4")

    class OwnWeights(S.Network):  # reads its weights its own way: its arrays are not the engine's
        def circuit_weight(self, c):
            return super().circuit_weight(c)
    S.integrate(OwnWeights(net.layers, net.connections, net.inputs), X, t_span=(0.0, 0.2), dt=0.1, method="rk4")
    # a user's stepper, even put into METHODS, may have types of its own (an integer fsal, say): not
    # one of METHODS' own (a copy of Euler here, which compiles nothing new)
    mine = I.ExplicitRK("mine", 1, a=((0,),), b=(1,))
    monkeypatch.setitem(I.METHODS, "mine", mine)
    np.testing.assert_array_equal(S.integrate(net, X, t_span=(0.0, 0.2), dt=0.1, method="mine").u,
                                  S.integrate(net, X, t_span=(0.0, 0.2), dt=0.1, method="euler").u)
    assert I._COMPILED_RUN == known


def test_a_read_only_initial_state_of_one_sample():
    """A batch of one's u0 transposed is already C-ordered: the engine's state is still a copy (its
    own array, writable, as the direct kernel call needs), and a read-only u0 relaxes as a writable
    one does."""
    x = X[:1]
    net = S.Network.layered([4, 8, 3], np.random.default_rng(0))
    u0 = S.integrate(net, x, t_span=(0.0, 0.5), dt=0.1, method="euler").u[-1]
    frozen = u0.copy()
    frozen.flags.writeable = False
    state = S.VectorField(net, x).state(frozen)
    assert not np.shares_memory(state, frozen) and state.flags.writeable and state.flags.c_contiguous
    a, b = S.relax(net, x, u0=u0, tol=1e-9), S.relax(net, x, u0=frozen, tol=1e-9)
    assert a.steps > 0 and a.u.tobytes() == b.u.tobytes()


@pytest.mark.parametrize("method", ["exp_euler", "euler", "rk4", "dopri5"])
def test_relax_refuses_a_non_finite_u0(net, method):
    """relax checks u0's finiteness after the kernel (which diverges at once on it): the same refusal
    as before the kernel, whatever the method, nudge, dtype or on_failure; a finite u0 whose
    relaxation diverges is a DivergenceError, not a refusal."""
    y = np.eye(3)[[0, 1]]
    for bad in (math.nan, math.inf, -math.inf):
        for dtype in ("float64", "complex128"):
            u0 = np.zeros((2, net.n), dtype)
            u0[1, 3] = bad
            for nudge in (None, S.Nudge(S.Cost("y"), 0.5, y)):
                with pytest.raises(Bad, match="u0 contains NaN or Inf"):
                    S.relax(net, X, u0=u0, method=method, nudge=nudge, on_failure="return")
    with pytest.raises(S.DivergenceError):
        S.relax(net, X, u0=np.full((2, net.n), 1e11), method=method, blowup=1e10)


def test_states_refused_beyond_the_allocation_cap():
    """The saved states' size is checked before they are allocated; the message names the t_eval
    points (formatted only when refused)."""
    net = S.Network.layered([4, 8, 3], np.random.default_rng(0))
    x = np.zeros((100_000, 4))  # 500 points x 11 neurons x 1e5 samples x 8 bytes = 4.1 GiB
    with pytest.raises(Bad, match=r"the states at 500 t_eval points would take 4\.1 GiB, more than the cap"):
        S.integrate(net, x, t_span=(0.0, 1.0), t_eval=np.linspace(0.01, 1.0, 500), dt=0.1, method="euler")
