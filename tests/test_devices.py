"""Device imperfections (substrate.devices, docs/equations.md, section 6): a network on a device.

* The ideal device (``Device()``, ``preset("ideal")``) reproduces the network without a device bit for
  bit (relax, integrate, EP, gradients); a device scaled to zero does too, exactly when no
  conductance effect is present and to 1e-12 relative when weights make the round trip through
  conductances (W -> s |W| -> (g+ - g-)/s may move a weight by an ulp).
* Statistics on many devices (a 400 x 500 crossbar, 200 000 weights) against the published formulas:
  the sample mean and standard deviation are compared with their standard errors, |z| < 4.5 (the
  seeds are fixed, so the tests are deterministic; for another seed a correct implementation would
  fail one such check with probability ~7e-6, while a 2 % error in a coefficient moves z by ~7
  and the wrong integrator's variance by ~8).
* Deterministic effects (drift with a fixed exponent, compensation, mapping, quantisation) to 1e-12.
* Read-noise policies, state noise (Ornstein-Uhlenbeck against the Euler-Maruyama closed form),
  neuron mismatch, feedback crossbars, the IO chain, random streams, the digital twin of the adjoint,
  training through a pulsed update model, bad input and the ``substrate devices`` command.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import substrate as S
from models import ep
from models import metrics as M
from models.data import digits
from models.train import SGD, Classifier, train
from studies.cli import main as cli
from substrate import _kernels as K
from substrate import activations
from substrate import devices as D
from substrate.adjoint import solve_adjoint
from substrate.errors import SubstrateValueError as Bad

Z = 4.5  # standard errors allowed in the statistical tests (see the module docstring)
TIGHT = ep.Relaxation(tol=1e-12, max_steps=200_000)
POLICIES = D.READ_POLICIES


# ------------------------------------------------------------------------------------ helpers
def problem(seed=3, feedback="tied", dtype="float64", activation="logistic", sizes=(12, 10, 8, 4), batch=5):
    rng = np.random.default_rng(seed)
    net = S.Network.layered(list(sizes), rng, activation=activation, feedback=feedback, dtype=dtype)
    x = rng.random((batch, sizes[0]))
    y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], batch)]
    return net, x, y, S.Cost("y")


def attach(net, *effects, seed=0):
    return D.attach(net, D.Device(tuple(effects)), np.random.default_rng(seed))


def plain(hw):
    """A plain Network computing with the weights as the device reads them now (and its taus)."""
    layers = [S.Layer(x.name, x.size, tau=x.tau, activation=x.activation, bias=x.bias.copy()) for x in hw.layers]
    conns = [S.Connection(c.pre, c.post, None if c.tied else hw.circuit_weight(c).copy(), tied=c.tied)
             for c in hw.connections]
    return S.Network(layers, conns, hw.inputs)


def crossbar(W, *effects, seed=0):
    """One input projecting to one layer through the weight W (post, pre): (device network, its
    connection, its crossbar)."""
    post, pre = W.shape
    net = S.Network([S.Layer("h", post)], [S.Connection("x", "h", W)], [S.Input("x", pre)])
    hw = attach(net, *effects, seed=seed)
    return hw, net.connection("x->h"), hw.crossbars["x->h"]


def within(value, expected, se, k=Z):
    assert abs(value - expected) < k * se, (value, expected, se, (value - expected) / se)


def check_std(sample, sigma, what=""):
    """The sample standard deviation against sigma (normal: se = sigma / sqrt(2 (n - 1)))."""
    n = sample.size
    assert n > 1000, what
    within(float(np.std(sample)), sigma, sigma / math.sqrt(2 * (n - 1)))
    within(float(np.mean(sample)), 0.0, sigma / math.sqrt(n))


def loss_sq(u):
    return 0.5 * float(np.sum(u * u)), u


def same_solution(a, b):
    assert a.status == b.status and a.steps == b.steps and a.nfev == b.nfev
    assert np.array_equal(a.u, b.u)
    assert a.t_final == b.t_final


def level_weights(shape, levels, rng, signs=(-1.0, 1.0)):
    """A weight matrix whose |W| takes the given levels (max level 1 = w_max) with random signs."""
    W = rng.choice(np.asarray(levels, float), shape) * rng.choice(np.asarray(signs), shape)
    W.flat[0] = 1.0  # the crossbar's full scale w_max = 1
    return W


def phi(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# ====================================================================================== 1. ideal
IDEAL = [lambda: D.Device(), lambda: D.preset("ideal")]


@pytest.mark.parametrize("make", IDEAL, ids=["Device()", "preset_ideal"])
@pytest.mark.parametrize("method, dtype", [("dopri5", "float64"), ("euler", "float64"), ("exp_euler", "float64"),
                                           ("rk4", "float32"), ("etd2rk", "float32"), ("etdrk4", "float64"),
                                           ("dopri5", "float32")])
def test_ideal_device_integrates_bit_for_bit(make, method, dtype):
    net, x, _, _ = problem(dtype=dtype)
    x = x.astype(dtype)
    hw = D.attach(net, make(), np.random.default_rng(0))
    dt = None if method == "dopri5" else 0.25
    kw = dict(t_span=(0.0, 6.0), t_eval=[0.0, 1.5, 6.0], method=method, dt=dt)
    same_solution(S.integrate(hw, x, **kw), S.integrate(net, x, **kw))
    a, b = S.relax(hw, x, method=method, dt=dt, tol=1e-5), S.relax(net, x, method=method, dt=dt, tol=1e-5)
    same_solution(a, b)
    assert a.u.dtype == np.dtype(dtype)
    assert np.array_equal(a.residual_trace, b.residual_trace)


@pytest.mark.parametrize("make", IDEAL, ids=["Device()", "preset_ideal"])
def test_ideal_device_complex_states_bit_for_bit(make):
    """complex128 states of a float64 network, with a holomorphic (complex-beta) nudge."""
    net, x, y, cost = problem()
    hw = D.attach(net, make(), np.random.default_rng(0))
    free = S.relax(net, x, tol=1e-10)
    nudge = S.Nudge(cost, 0.1 * np.exp(2j * np.pi / 3), y)
    for kw in (dict(), dict(method="dopri5")):
        same_solution(S.relax(hw, x, u0=free.u, dtype=np.complex128, nudge=nudge, tol=1e-10, **kw),
                      S.relax(net, x, u0=free.u, dtype=np.complex128, nudge=nudge, tol=1e-10, **kw))
    u0 = free.u.astype(np.complex128) + 0.05j
    same_solution(S.integrate(hw, x, t_span=(0, 3), u0=u0, method="rk4", dt=0.1, nudge=nudge),
                  S.integrate(net, x, t_span=(0, 3), u0=u0, method="rk4", dt=0.1, nudge=nudge))


@pytest.mark.parametrize("make", IDEAL, ids=["Device()", "preset_ideal"])
def test_ideal_device_ep_and_gradients_bit_for_bit(make):
    net, x, y, cost = problem(feedback="independent")
    hw = D.attach(net, make(), np.random.default_rng(0))
    for est in (ep.Centred(0.05), ep.Holomorphic(4, 0.1), ep.Exact()):
        a = ep.estimate(hw, x, y, cost, est, TIGHT)
        b = ep.estimate(net, x, y, cost, est, TIGHT)
        assert np.array_equal(a.gradients.flat(), b.gradients.flat()), est
        assert np.array_equal(a.error, b.error) and np.array_equal(a.free.u, b.free.u)
    for twin in (False, True):  # the twin of an ideal device is the network itself
        for kw in (dict(method="discrete", t_span=(0, 4), integrator="rk4", dt=0.2),
                   dict(method="discrete", t_span=(0, 4), integrator="dopri5"),
                   dict(method="implicit")):
            a, b = S.gradient(hw, x, loss_sq, twin=twin, **kw), S.gradient(net, x, loss_sq, **kw)
            assert np.array_equal(a.flat(), b.flat()), (kw, twin)
            assert a.loss == b.loss


def _zero_device(policy, conductances):
    """Every effect without a systematic part, at zero strength: with the conductance path
    (mapping, programming noise, faults, drift, PCM read noise) or without it."""
    effects = [D.ReadNoise(0.1, policy=policy), D.TauMismatch(0.2), D.ActivationMismatch(0.1, 0.1),
               D.StateNoise(0.1)]
    if conductances:
        effects += [D.ConductanceMapping(), D.ProgrammingNoise(), D.StuckAt(0.1, "random"), D.Drift(),
                    D.PCMReadNoise(policy=policy)]
    return D.Device(tuple(effects)).scaled(0)


@pytest.mark.parametrize("policy", POLICIES)
def test_scaled_to_zero_is_ideal(policy):
    """Exactly ideal without conductance effects; within 1e-12 (relative to max|u|) through the
    conductance round trip (W -> s|W| -> /s moves a weight by at most an ulp)."""
    net, x, _, _ = problem()
    ref = S.relax(net, x, tol=1e-10)
    for conductances in (False, True):
        hw = D.attach(net, _zero_device(policy, conductances), np.random.default_rng(1))
        hw.advance(3600.0)  # drift and 1/f noise at zero strength: nothing
        sol = S.relax(hw, x, tol=1e-10)
        traj = S.integrate(hw, x, t_span=(0, 2), method="euler", dt=0.1)
        ref_traj = S.integrate(net, x, t_span=(0, 2), method="euler", dt=0.1)
        if conductances:
            np.testing.assert_allclose(sol.u, ref.u, rtol=0, atol=1e-12 * np.abs(ref.u).max())
            np.testing.assert_allclose(traj.u, ref_traj.u, rtol=0, atol=1e-12)
            for c in net.connections:
                if not c.tied:
                    np.testing.assert_allclose(hw.circuit_weight(c), c.weight, rtol=1e-15, atol=1e-16)
        else:
            same_solution(sol, ref)
            assert np.array_equal(traj.u, ref_traj.u)


# ====================================================================================== 2. statistics
@pytest.mark.parametrize("g_max", [25.0, 10.0])
def test_programming_noise_sigma_against_the_polynomial(g_max):
    """sigma = (0.26348 + 1.9650 gT - 1.1731 gT^2) g_max/25 uS on the programmed device of each pair;
    the other device (target g_min = 0) ends at max(N(0, sigma(0)), 0): half its values exactly 0,
    mean sigma(0)/sqrt(2 pi)."""
    levels = [0.1, 0.3, 0.6, 1.0]
    W = level_weights((400, 500), levels, np.random.default_rng(1))
    hw, c, xb = crossbar(W, D.ConductanceMapping(g_max=g_max), D.ProgrammingNoise(), seed=2)
    assert xb.g_min == 0.0 and xb.scale == g_max  # w_max = 1
    np.testing.assert_allclose(xb.g_target[0] - xb.g_target[1], W * g_max, rtol=1e-15)
    dev = xb.g_prog - xb.g_target
    sig = lambda gt: (0.26348 + 1.9650 * gt - 1.1731 * gt ** 2) * g_max / 25.0
    for level in levels:
        on = np.concatenate([dev[0][W == level], dev[1][W == -level]])
        check_std(on, sig(level), level)
    off = np.concatenate([dev[1][W > 0], dev[0][W < 0]])
    s0, n = sig(0.0), off.size
    p0 = np.mean(off == 0.0)
    within(p0, 0.5, math.sqrt(0.25 / n))
    within(off.mean(), s0 / math.sqrt(2 * math.pi), s0 * math.sqrt(0.5 - 0.5 / math.pi) / math.sqrt(n))
    assert off.min() == 0.0
    # the weights as read are the programmed pairs
    np.testing.assert_allclose(hw.circuit_weight(c), (xb.g_prog[0] - xb.g_prog[1]) / g_max, rtol=1e-15)


def test_drift_with_a_fixed_exponent():
    """nu = 0.049, no spread: after an hour every weight is W ((3600 + 20)/20)^-0.049 (~0.775,
    docs/equations.md, section 6.2); a rewritten weight is young again (age 0: factor 1), the others keep drifting."""
    rng = np.random.default_rng(4)
    W = rng.uniform(-1, 1, (40, 50))
    hw, c, xb = crossbar(W, D.Drift(nu=0.049))
    np.testing.assert_allclose(hw.circuit_weight(c), W, rtol=1e-14, atol=0)
    hw.advance(3600.0)
    factor = (3620.0 / 20.0) ** -0.049
    assert factor == pytest.approx(0.775, abs=1e-3)
    np.testing.assert_allclose(hw.circuit_weight(c), W * factor, rtol=1e-12, atol=0)
    W[3, 4] = -0.3
    W[7, 1] = 0.9
    hw.write()
    read = hw.circuit_weight(c)
    assert read[3, 4] == xb.w_prog[3, 4] and read[7, 1] == xb.w_prog[7, 1]
    assert read[3, 4] == pytest.approx(-0.3, rel=1e-14) and read[7, 1] == pytest.approx(0.9, rel=1e-14)
    assert xb.t_write[3, 4] == 3600.0 and xb.t_write[0, 0] == 0.0
    old = np.ones(W.shape, bool)
    old[3, 4] = old[7, 1] = False
    np.testing.assert_allclose(read[old], W[old] * factor, rtol=1e-12, atol=0)
    hw.advance(3600.0)  # the rewritten ones are an hour old, the others two hours
    read = hw.circuit_weight(c)
    np.testing.assert_allclose(read[3, 4], -0.3 * factor, rtol=1e-12)
    np.testing.assert_allclose(read[old], W[old] * (7220.0 / 20.0) ** -0.049, rtol=1e-12, atol=0)


def _nu_law(gt):
    gt = max(gt, 1e-6)
    mu = min(max(-0.0155 * math.log(gt) + 0.0244, 0.049), 0.1)
    s = min(max(-0.0125 * math.log(gt) - 0.0059, 0.008), 0.045)
    return mu, s


def _nu_from_weights(hw, c, xb):
    """Each programmed device's drift exponent, from its weight as read (the other device of the pair
    is at g_min = 0 and stays there): w(t) = w_prog ((age + t0)/t0)^-nu."""
    age = hw.clock - xb.t_write
    return -np.log(hw.circuit_weight(c) / xb.w_prog) / np.log((age + 20.0) / 20.0)


def test_drift_exponents_follow_the_pcm_law():
    """nu ~ |N(mu_nu(gT), s_nu(gT))| per device: the sample mean and standard deviation at each
    conductance level against the folded normal's, covering both clamps of mu_nu and s_nu."""
    levels = [1.0, 0.5, 0.2, 0.05, 0.01, 0.001]
    W = level_weights((400, 500), levels, np.random.default_rng(5))
    hw, c, xb = crossbar(W, D.Drift(), seed=3)
    hw.advance(3600.0)
    nu = _nu_from_weights(hw, c, xb)
    for level in levels:
        sample = nu[np.abs(W) == level]
        mu, s = _nu_law(level)
        mean = s * math.sqrt(2 / math.pi) * math.exp(-mu * mu / (2 * s * s)) + mu * (1 - 2 * phi(-mu / s))
        sd = math.sqrt(mu * mu + s * s - mean * mean)
        n = sample.size
        within(sample.mean(), mean, sd / math.sqrt(n))
        within(sample.std(), sd, sd / math.sqrt(2 * (n - 1)))
    assert nu.min() > 0


def test_drift_exponent_is_redrawn_at_every_write():
    """Drift: "nu ~ |N(mu_nu, s_nu)| per device and write". A device rewritten in one write and left
    alone in the next (no read in between) must get a new exponent, like one rewritten in the last
    write; untouched devices keep theirs."""
    W = np.full((2, 3), 0.5)
    W[0, 0] = 1.0
    hw, c, xb = crossbar(W, D.Drift(), seed=0)
    hw.advance(3600.0)
    old = _nu_from_weights(hw, c, xb)
    W[0, 1] = 0.4
    hw.write()
    W[1, 1] = 0.3
    hw.write()
    hw.advance(3600.0)
    new = _nu_from_weights(hw, c, xb)
    # untouched devices keep their exponent (to the precision of the log-ratio)
    np.testing.assert_allclose(new[[0, 0, 1, 1], [0, 2, 0, 2]], old[[0, 0, 1, 1], [0, 2, 0, 2]], rtol=1e-9)
    assert abs(new[1, 1] - old[1, 1]) > 1e-6  # rewritten in the last write: redrawn
    assert abs(new[0, 1] - old[0, 1]) > 1e-6  # rewritten in the write before: redrawn too


def test_drift_global_compensation_restores_the_total_weight():
    rng = np.random.default_rng(6)
    W = rng.uniform(-1, 1, (60, 80))
    hw, c, xb = crossbar(W, D.Drift(compensation=True), seed=1)
    hw.advance(86400.0)
    read = hw.circuit_weight(c)
    assert np.sum(np.abs(read)) == pytest.approx(np.sum(np.abs(xb.w_prog)), rel=1e-12)
    ratio = read / xb.w_prog  # one output scale per crossbar: per-device drift still varies
    assert ratio.std() > 1e-3
    bare, cb, _ = crossbar(W, D.Drift(compensation=False), seed=1)  # same seed: same exponents
    bare.advance(86400.0)
    raw = bare.circuit_weight(cb)
    assert np.sum(np.abs(raw)) < 0.9 * np.sum(np.abs(xb.w_prog))
    np.testing.assert_allclose(read, raw * (np.sum(np.abs(xb.w_prog)) / np.sum(np.abs(raw))), rtol=1e-12)


@pytest.mark.parametrize("levels, on_off", [(9, 10.0), (16, math.inf), (2, 4.0)])
def test_quantisation_levels(levels, on_off):
    rng = np.random.default_rng(7)
    W = rng.uniform(-1, 1, (100, 120))
    hw, c, xb = crossbar(W, D.ConductanceMapping(g_max=20.0, on_off=on_off), D.Quantisation(levels))
    g_min, g_max = 20.0 / on_off, 20.0
    step = (g_max - g_min) / (levels - 1)
    values = np.unique(xb.g_prog)
    assert len(values) == levels
    assert values.min() == g_min and values.max() <= g_max * (1 + 1e-15) and values.max() >= g_max * (1 - 1e-15)
    np.testing.assert_allclose(values, g_min + step * np.arange(levels), rtol=1e-14, atol=0)
    assert np.abs(xb.g_prog - xb.g_target).max() <= step / 2 * (1 + 1e-12)
    # the weights read are the quantised pairs
    np.testing.assert_allclose(hw.circuit_weight(c), (xb.g_prog[0] - xb.g_prog[1]) / xb.scale, rtol=1e-15)


@pytest.mark.parametrize("value", ["min", "max", "random"])
def test_stuck_at_fraction_and_persistence(value):
    """A fraction f of the devices stuck (binomial: se = sqrt(f (1 - f)/n)), at g_min, g_max or a
    uniform value; a rewrite leaves them where they are and reprograms the others."""
    f = 0.05
    rng = np.random.default_rng(8)
    W = rng.uniform(0.2, 0.8, (400, 500))
    W[0, 0] = 1.0
    hw, c, xb = crossbar(W, D.ConductanceMapping(on_off=10.0), D.StuckAt(f, value), seed=4)
    g_min, g_max = 2.5, 25.0
    plus = xb.g_prog[0].copy()  # the programmed device of each (positive) weight: target in [7, 20.5] uS
    stuck = plus != xb.g_target[0]
    stuck[0, 0] = False  # its target is g_max
    n = stuck.size - 1
    within(stuck.sum() / n, f, math.sqrt(f * (1 - f) / n))
    if value == "min":
        assert np.all(plus[stuck] == g_min)
    elif value == "max":
        assert np.all(plus[stuck] == g_max)
        minus_stuck = xb.g_prog[1] == g_max  # the g_min devices stuck high
        within(minus_stuck.mean(), f, math.sqrt(f * (1 - f) / minus_stuck.size))
    else:
        s = plus[stuck]
        assert s.min() >= g_min and s.max() <= g_max
        within(s.mean(), (g_min + g_max) / 2, (g_max - g_min) / math.sqrt(12 * s.size))
    before = xb.g_prog.copy()
    W *= 0.7  # every target changes
    hw.write()
    assert np.array_equal(xb.g_prog[0][stuck], before[0][stuck])
    free = ~stuck
    free[0, 0] = False
    assert np.array_equal(xb.g_prog[0][free], xb.g_target[0][free])


def test_on_off_ratio_and_mapping():
    """g_min = g_max/on_off; W = (g+ - g-)/s with s = (g_max - g_min)/w_max. w_max = max|W| at every
    write (a new full scale reprograms every device), or fixed by ConductanceMapping.w_max (larger
    weights saturate at g_max)."""
    rng = np.random.default_rng(9)
    W = rng.uniform(-0.5, 0.5, (30, 40))
    W[0, 0], W[1, 1], W[2, 2] = 0.0, 2.0, -2.0  # w_max = 2
    hw, c, xb = crossbar(W, D.ConductanceMapping(g_max=20.0, on_off=8.0))
    assert xb.g_min == 2.5 and xb.g_max == 20.0 and xb.w_max == 2.0
    assert xb.scale == pytest.approx((20.0 - 2.5) / 2.0, rel=1e-15)
    assert xb.g_prog.min() == 2.5 and xb.g_prog.max() == pytest.approx(20.0, rel=1e-15)
    assert xb.g_prog[0, 0, 0] == xb.g_prog[1, 0, 0] == 2.5
    assert xb.g_prog[0, 1, 1] == pytest.approx(20.0, rel=1e-15) and xb.g_prog[1, 1, 1] == 2.5
    np.testing.assert_allclose(hw.circuit_weight(c), W, rtol=1e-14, atol=1e-15)
    fixed, cf, xf = crossbar(W.copy(), D.ConductanceMapping(g_max=20.0, on_off=8.0, w_max=2.0))
    hw.advance(10.0)
    fixed.advance(10.0)
    W[5, 5] = 7.0  # a new full scale: every device rewritten
    hw.write()
    assert xb.w_max == 7.0 and xb.scale == pytest.approx(17.5 / 7.0, rel=1e-15)
    assert np.all(xb.t_write == 10.0)
    np.testing.assert_allclose(hw.circuit_weight(c), W, rtol=1e-14, atol=1e-15)
    cf.weight[5, 5] = 7.0  # beyond the fixed w_max: saturates at g_max; the others stay as written
    fixed.write()
    assert xf.w_max == 2.0 and fixed.circuit_weight(cf)[5, 5] == pytest.approx(2.0, rel=1e-14)
    assert xf.t_write[5, 5] == 10.0 and np.sum(xf.t_write == 10.0) == 1
    np.testing.assert_allclose(np.delete(fixed.circuit_weight(cf).ravel(), 5 * 40 + 5),
                               np.delete(W.ravel(), 5 * 40 + 5), rtol=1e-14, atol=1e-15)


def test_pcm_read_noise_std():
    """1/f read noise, policy "phase" (redrawn at every read): a weight's read deviation has std
    Q_s sqrt(ln((t + t_read)/(2 t_read))) |g+|/s (t = age + 20 s; the g_min = 0 device adds none),
    Q_s = min(0.0088/gT^0.65, 0.2)."""
    levels = [0.005, 0.05, 0.3, 1.0]
    W = level_weights((400, 500), levels, np.random.default_rng(10))
    hw, c, xb = crossbar(W, D.PCMReadNoise(policy="phase"), seed=5)
    hw.advance(1000.0)
    mean_w, _ = xb.read(hw.clock)
    np.testing.assert_allclose(mean_w, xb.w_prog, rtol=0, atol=0)  # no drift effect
    reads = []
    for _ in range(3):  # a phase (one pack) reads once; every new phase draws anew
        hw.pack(np.float64)
        reads.append(hw.circuit_weight(c) - mean_w)
    assert not np.array_equal(reads[0], reads[1])
    np.testing.assert_array_equal(hw.circuit_weight(c) - mean_w, reads[-1])  # the same phase: the same draw
    t = 1000.0 + 20.0
    for level in levels:
        qs = min(0.0088 / level ** 0.65, 0.2)
        sd = qs * math.sqrt(math.log((t + 250e-9) / (2 * 250e-9))) * level
        mask = np.abs(W) == level
        check_std(np.concatenate([r[mask] for r in reads]), sd, level)


@pytest.mark.parametrize("relative", [True, False])
def test_read_noise_std(relative):
    """ReadNoise(sigma): std sigma |W| (relative) or sigma w_max (additive)."""
    rng = np.random.default_rng(11)
    W = rng.choice([-1.0, -0.4, 0.25, 0.7], (400, 500))
    hw, c, xb = crossbar(W, D.ReadNoise(0.03, relative=relative, policy="phase"), seed=6)
    d = hw.circuit_weight(c) - W
    if relative:
        check_std(d / np.abs(W), 0.03)
    else:
        check_std(d, 0.03 * 1.0)


# ====================================================================================== 3. policies
def test_phase_policy_redraws_at_every_relaxation():
    net, x, _, _ = problem()
    hw = attach(net, D.ReadNoise(0.05, policy="phase"))
    a, b = S.relax(hw, x, tol=1e-10), S.relax(hw, x, tol=1e-10)
    assert np.abs(a.u - b.u).max() > 1e-5
    f = S.relax(net, x, tol=1e-10)
    assert np.abs(a.u - f.u).max() > 1e-5


def test_equilibrium_policy_holds_until_new_equilibrium():
    net, x, _, _ = problem()
    hw = attach(net, D.ReadNoise(0.05, policy="equilibrium"))
    a, b = S.relax(hw, x, tol=1e-10), S.relax(hw, x, tol=1e-10)
    same_solution(a, b)
    ta = S.integrate(hw, x, t_span=(0, 2), method="rk4", dt=0.2)
    assert np.array_equal(ta.u, S.integrate(hw, x, t_span=(0, 2), method="rk4", dt=0.2).u)
    # the held draw is the weights the device reports, and relaxes like a plain network of them
    np.testing.assert_allclose(a.u, S.relax(plain(hw), x, tol=1e-10).u, rtol=0, atol=1e-9)
    hw.new_equilibrium()
    c = S.relax(hw, x, tol=1e-10)
    assert np.abs(a.u - c.u).max() > 1e-5
    assert np.abs(a.u - S.relax(net, x, tol=1e-10).u).max() > 1e-5


def test_sample_policy_draws_per_sample():
    """Every sample of the batch its own draw, held until new_equilibrium(): the same input twice in
    one batch relaxes to two states; a sample's draw belongs to its batch position (its trajectory
    does not depend on what the other samples are)."""
    net, x, _, _ = problem()
    hw = attach(net, D.ReadNoise(0.05, policy="sample"))
    xs = np.stack([x[0], x[0], x[1]])
    a = S.relax(hw, xs, tol=1e-10)
    assert np.abs(a.u[0] - a.u[1]).max() > 1e-5
    same_solution(a, S.relax(hw, xs, tol=1e-10))  # held
    kw = dict(t_span=(0, 3), method="rk4", dt=0.1)
    t1 = S.integrate(hw, np.stack([x[0], x[1], x[2]]), **kw)
    t2 = S.integrate(hw, np.stack([x[0], x[3], x[4]]), **kw)
    np.testing.assert_allclose(t1.u[:, 0], t2.u[:, 0], rtol=0, atol=1e-14)
    t3 = S.integrate(hw, np.stack([x[1], x[0], x[2]]), **kw)  # x0 in another position: another draw
    assert np.abs(t3.u[-1, 1] - t1.u[-1, 0]).max() > 1e-5
    hw.new_equilibrium()
    b = S.relax(hw, xs, tol=1e-10)
    assert np.abs(a.u - b.u).max() > 1e-5


def test_step_policy_variance_of_one_euler_step():
    """Per-step read noise inside the kernel: from a known state u0 (identity activation, r = u0),
    one Euler step of size h gives u1 = u0 + (h/tau)(-u0 + (W + dW) u0 + b) with dW_ij ~ N(0, var_ij):
    var u1_i = (h/tau)^2 sum_j var_ij u0_j^2, var_ij = sigma^2 W_ij^2 (relative read noise); the mean
    is the noise-free step. The circuit has a forward weight, its tied feedback (the same devices read
    transposed) and a masked lateral weight; 20 000 identical samples, each its own draw."""
    rng = np.random.default_rng(12)
    na, nb, B, h, tau, sigma = 3, 4, 20_000, 0.3, 2.0, 0.2
    W, L = rng.normal(size=(nb, na)), rng.normal(size=(na, na))
    mask = 1.0 - np.eye(na)
    ba, bb = rng.normal(size=na), rng.normal(size=nb)
    net = S.Network([S.Layer("a", na, tau=tau, activation="identity", bias=ba),
                     S.Layer("b", nb, tau=tau, activation="identity", bias=bb)],
                    [S.Connection("a", "b", W), S.Connection("b", "a", tied=True),
                     S.Connection("a", "a", L, mask=mask)])
    hw = attach(net, D.ReadNoise(sigma, policy="step"), seed=7)
    u0 = rng.normal(size=na + nb)
    sol = S.integrate(hw, t_span=(0, h), method="euler", dt=h, u0=np.tile(u0, (B, 1)))
    u1 = sol.u[-1]
    A = np.zeros((na + nb, na + nb))  # the dense effective weight
    A[na:, :na], A[:na, na:], A[:na, :na] = W, W.T, L * mask
    mean = u0 + h / tau * (-u0 + A @ u0 + np.concatenate([ba, bb]))
    var = (h / tau) ** 2 * (sigma ** 2 * A ** 2) @ u0 ** 2
    for i in range(na + nb):
        sd = math.sqrt(var[i])
        within(u1[:, i].mean(), mean[i], sd / math.sqrt(B))
        within(u1[:, i].std(), sd, sd / math.sqrt(2 * (B - 1)))
    # independent draws per neuron and per sample
    within(np.corrcoef(u1[:, 0], u1[:, 1])[0, 1], 0.0, 1 / math.sqrt(B))
    within(np.corrcoef(u1[:B // 2, 0], u1[B // 2:, 0])[0, 1], 0.0, 1 / math.sqrt(B / 2))


def test_sample_policy_with_one_sample_is_the_equilibrium_policy():
    """With a batch of one, a per-sample draw is the per-equilibrium draw (both come from the
    crossbar's read stream): the kernel's per-sample products, the tied feedback's transposed
    deviations, the lateral masks and the input's per-sample drive reproduce the network read with
    the held draw, to rounding (W r + dW r against (W + dW) r)."""
    rng = np.random.default_rng(19)
    net = S.Network.layered([6, 5, 4, 3], rng, feedback="tied", lateral=True)
    x = rng.random((1, 6))
    a = S.relax(attach(net, D.ReadNoise(0.2, policy="sample"), seed=3), x, tol=1e-12)
    b = S.relax(attach(net, D.ReadNoise(0.2, policy="equilibrium"), seed=3), x, tol=1e-12)
    np.testing.assert_allclose(a.u, b.u, rtol=0, atol=1e-12)
    assert np.abs(a.u - S.relax(net, x, tol=1e-12).u).max() > 1e-2


@pytest.mark.slow  # compiles a float32 stepping kernel per policy's effect tuple: ~40 s on a cold cache
def test_every_policy_and_effect_runs_in_float32():
    net, x, _, _ = problem(dtype="float32")
    for policy in POLICIES:
        hw = attach(net, D.ReadNoise(0.05, policy=policy), D.IOChain(), D.StateNoise(0.01), D.ActivationMismatch(),
                    D.TauMismatch(), D.ProgrammingNoise(), D.RelaxationTime(10.0))
        sol = S.relax(hw, x.astype(np.float32), tol=1e-4)
        assert sol.ok and sol.u.dtype == np.float32 and np.all(np.isfinite(sol.u))
        assert np.abs(sol.u - S.relax(net, x.astype(np.float32), tol=1e-4).u).max() < 0.5


def test_ep_shares_the_read_noise_draw_between_phases_with_the_equilibrium_policy():
    """docs/equations.md, section 6: both phases must see the same device state; noise redrawn per phase adds an
    error ~ s/beta. With "equilibrium", centred EP at beta = 1e-3 matches the exact gradient of the
    network as read (the held draw) to its O(beta^2) bias (measured 2.5e-6; bound 1e-4); with
    "phase" the error is O(1) and scales as 1/beta (the same draws at beta = 1e-2 and 1e-3: ratio 10).
    Weights and biases are compared (the input gradient has its own test)."""
    net, x, y, cost = problem(sizes=(12, 10, 4), batch=6)

    def wb(g):
        return np.concatenate([g.weights[k].ravel() for k in sorted(g.weights)]
                              + [g.biases[k].ravel() for k in sorted(g.biases)])

    errs = {}
    for policy in ("equilibrium", "phase"):
        for beta in (1e-2, 1e-3):
            hw = attach(net, D.ReadNoise(0.01, policy=policy), seed=0)
            est = ep.estimate(hw, x, y, cost, ep.Centred(beta), TIGHT).gradients
            ref_net = plain(hw) if policy == "equilibrium" else net
            ref = ep.estimate(ref_net, x, y, cost, ep.Exact(), TIGHT).gradients
            errs[policy, beta] = M.relative_error(wb(est), wb(ref))
    assert errs["equilibrium", 1e-3] < 1e-4
    assert errs["equilibrium", 1e-2] < 1e-2 and errs["equilibrium", 1e-3] < errs["equilibrium", 1e-2] / 30
    assert errs["phase", 1e-3] > 1.0
    assert 8 < errs["phase", 1e-3] / errs["phase", 1e-2] < 12


# ====================================================================================== 4. state noise
def _ou(h, T, s, method, relax):
    m, B = 20, 2500
    net = S.Network([S.Layer("h", m, activation="identity")])
    dev = (D.StateNoise(s),) + ((D.RelaxationTime(T),) if relax else ())
    hw = attach(net, *dev, seed=8)
    if relax:
        # from u = 1 (from the equilibrium u = 0 relax would stop at once: F(0) = 0 before any noise)
        sol = S.relax(hw, batch=B, method=method, dt=h, tol=1e-12, u0=np.ones((B, m)))
        assert sol.ok and sol.t_final == pytest.approx(T, rel=1e-12)
        return sol.u
    return S.integrate(hw, batch=B, t_span=(0, T), method=method, dt=h).u[-1]


@pytest.mark.parametrize("method, relax", [("euler", False), ("euler", True), ("exp_euler", True)])
def test_state_noise_stationary_variance(method, relax):
    """du = -u dt + s dW with zero drive (tau = 1), stepped for T = 40 from 0 (integrate) or 1 (relax,
    read at its RelaxationTime; the initial state is forgotten to 0.9^400): Euler-Maruyama u+ = (1 - h) u + s sqrt(h) xi has the stationary variance
    s^2 h / (1 - (1 - h)^2); exponential Euler u+ = e^-h u + s sqrt(h) xi has s^2 h / (1 - e^-2h).
    50 000 independent values (20 neurons x 2500 samples)."""
    h, s = 0.1, 0.3
    u = _ou(h, 40.0, s, method, relax)
    a = 1 - h if method == "euler" else math.exp(-h)
    var = s * s * h / (1 - a * a)
    check_std(u.ravel(), math.sqrt(var))


def test_per_step_noise_needs_a_fixed_step_method():
    net, x, _, _ = problem()
    for dev in ((D.StateNoise(0.01),), (D.ReadNoise(0.01, policy="step"),), (D.IOChain(),)):
        hw = attach(net, *dev)
        with pytest.raises(Bad, match="fixed-step"):
            S.relax(hw, x, method="dopri5")
        with pytest.raises(Bad, match="dopri5"):
            S.integrate(hw, x, t_span=(0, 1), method="dopri5")
        S.integrate(hw, x, t_span=(0, 1), method="rk4", dt=0.1)  # fixed-step real: fine
    # complex states: the IO chain reads their quadratures (tests/test_complex_io.py); the other
    # per-step draws refuse them
    S.integrate(attach(net, D.IOChain()), x, t_span=(0, 1), method="rk4", dt=0.1, dtype=np.complex128)


# ====================================================================================== 5. neurons
def _device_field(hw, x, u):
    """F(u) = -u + W rho_dev(u) + V x + b in NumPy, with the weights as the device reads them."""
    r = hw.activities(u)
    F = -u.copy()
    for layer in hw.layers:
        F[:, hw.slices[layer.name]] += layer.bias
    for c in hw.connections:
        w = hw.circuit_weight(c)
        pre = x if c.pre == "x" else r[:, hw.slices[c.pre]]
        F[:, hw.slices[c.post]] += pre @ w.T
    return F


def test_activation_mismatch_activities_and_equilibrium():
    net, x, _, _ = problem()
    hw = attach(net, D.ActivationMismatch(0.3, 0.2), seed=9)
    g, o = hw.neurons.gain, hw.neurons.offset
    assert np.std(g) > 0.1 and np.std(o) > 0.05
    u = np.random.default_rng(0).normal(size=(4, net.n))
    expected = np.empty_like(u)
    for layer in net.layers:
        sl = net.slices[layer.name]
        expected[:, sl] = activations.rho(layer.activation, g[sl] * (u[:, sl] - o[sl]))
    np.testing.assert_allclose(hw.activities(u), expected, rtol=1e-15, atol=1e-16)
    sol = S.relax(hw, x, tol=1e-11)
    assert np.abs(_device_field(hw, x, sol.u)).max() < 2e-11
    assert np.abs(sol.u - S.relax(net, x, tol=1e-11).u).max() > 1e-3
    assert np.abs(_device_field(hw, x, sol.u)).max() <= sol.residual.max() * (1 + 1e-6) + 1e-15


def test_integrate_reports_the_device_residual_with_activation_mismatch():
    """Solution.residual is max_i |F_i(u)| at the final state: on a device with activation mismatch
    it must be the device's F (the kernel's), not the nominal one. Integrated to the equilibrium,
    the residual must be that of the equilibrium (tiny)."""
    net, x, _, _ = problem()
    hw = attach(net, D.ActivationMismatch(0.3, 0.2), seed=9)
    sol = S.integrate(hw, x, t_span=(0, 80), method="rk4", dt=0.25)
    true = np.abs(_device_field(hw, x, sol.u[-1])).max(axis=1)
    assert true.max() < 1e-9
    np.testing.assert_allclose(sol.residual, true, rtol=0, atol=1e-9)


def test_tau_mismatch_keeps_the_equilibrium_and_changes_the_trajectory():
    net, x, _, _ = problem()
    hw = attach(net, D.TauMismatch(0.3), seed=10)
    assert np.std(hw.tau) > 0.1 and np.array_equal(net.tau, np.ones(net.n))
    assert np.all(hw.tau >= 0.05)
    a, b = S.relax(hw, x, tol=1e-11), S.relax(net, x, tol=1e-11)
    np.testing.assert_allclose(a.u, b.u, rtol=0, atol=1e-9)  # residual 1e-11 / (1 - contraction)
    kw = dict(t_span=(0, 1.0), method="rk4", dt=0.05)
    ta, tb = S.integrate(hw, x, **kw), S.integrate(net, x, **kw)
    assert np.abs(ta.u[-1] - tb.u[-1]).max() > 1e-3
    # one Euler step: u1 = u0 + h F(u0)/tau_i with the device's taus
    u0 = np.random.default_rng(1).normal(size=(5, net.n))
    s1 = S.integrate(hw, x, t_span=(0, 0.1), method="euler", dt=0.1, u0=u0).u[-1]
    np.testing.assert_allclose(s1, u0 + 0.1 * _device_field(hw, x, u0) / hw.neurons.tau, rtol=0, atol=1e-14)


def test_relaxation_time():
    """RelaxationTime(T): a phase not converged by T is read at T (status success); a phase that
    converges earlier stops where the network without a device does."""
    net, x, _, _ = problem()
    hw = attach(net, D.RelaxationTime(0.5))
    sol = S.relax(hw, x, tol=1e-10)
    assert sol.ok and sol.status == "success" and sol.t_final == 0.5
    assert sol.residual.max() > 1e-3
    ref = S.integrate(net, x, t_span=(0, 0.5), method="exp_euler", dt=1.0)
    np.testing.assert_allclose(sol.u, ref.u[-1], rtol=0, atol=1e-15)
    with pytest.raises(S.ConvergenceError):
        S.relax(net, x, tol=1e-10, max_time=0.5)
    long = attach(net, D.RelaxationTime(1000.0))
    same_solution(S.relax(long, x, tol=1e-10), S.relax(net, x, tol=1e-10))
    with pytest.raises(S.SubstrateValueError, match="twice"):  # one effect of a class per device
        D.Device((D.RelaxationTime(5.0), D.RelaxationTime(3.0)))


# ====================================================================================== 6. feedback
def test_independent_feedback_programs_its_own_devices():
    net, _, _, _ = problem(feedback="tied")
    fw, fb = net.connection("h1->h2"), net.connection("h2->h1")
    shared = attach(net, D.ProgrammingNoise(), seed=11)
    assert "h2->h1" not in shared.crossbars
    assert np.array_equal(shared.circuit_weight(fb), shared.circuit_weight(fw).T)
    assert not np.allclose(shared.circuit_weight(fw), fw.weight, rtol=0, atol=1e-3)
    own = attach(net, D.ProgrammingNoise(), D.IndependentFeedback(), seed=11)
    assert "h2->h1" in own.crossbars
    a, b = own.circuit_weight(fb), own.circuit_weight(fw).T
    assert np.abs(a - b).max() > 1e-3
    # both are noisy copies of the same target W^T: a weight's programming error has std at most
    # sqrt(1.086^2 + 0.264^2) = 1.12 uS of g_max = 25 uS (the polynomial's maximum on the programmed
    # device, its constant term on the other); 5 standard deviations over the 80 weights
    w_max = np.abs(fw.weight).max()
    assert np.abs(a - fw.weight.T).max() < 5 * 1.12 / 25 * w_max
    np.testing.assert_allclose(own.crossbars["h2->h1"].target, fw.weight.T, rtol=0, atol=0)
    assert np.array_equal(own.circuit_weight(fw), shared.circuit_weight(fw))  # same stream per crossbar


def test_independent_feedback_alone_is_ideal():
    """IndependentFeedback without other effects is an ideal device: bit for bit."""
    net, x, _, _ = problem(feedback="tied")
    hw = attach(net, D.IndependentFeedback())
    for c in net.connections:
        assert np.array_equal(hw.circuit_weight(c), net.effective_weight(c)), c.name
    same_solution(S.relax(hw, x, tol=1e-10), S.relax(net, x, tol=1e-10))


def test_independent_feedback_reads_a_masked_source():
    """A tied feedback is (W_src * M_src)^T (Network.effective_weight). Its own crossbar must hold
    that, so an ideal device with IndependentFeedback still equals the network."""
    rng = np.random.default_rng(13)
    W = rng.normal(size=(3, 4))
    mask = (rng.random((3, 4)) > 0.5).astype(float)
    net = S.Network([S.Layer("h", 4), S.Layer("y", 3)],
                    [S.Connection("x", "h", rng.normal(size=(4, 2))), S.Connection("h", "y", W, mask=mask),
                     S.Connection("y", "h", tied=True)], [S.Input("x", 2)])
    x = rng.random((3, 2))
    hw = attach(net, D.IndependentFeedback())
    c = net.connection("y->h")
    np.testing.assert_array_equal(hw.circuit_weight(c), net.effective_weight(c))
    np.testing.assert_allclose(S.relax(hw, x, tol=1e-12).u, S.relax(net, x, tol=1e-12).u, rtol=0, atol=1e-10)


# ====================================================================================== 7. IO chain
def _np_quantise(x, bits, bound):
    """A mid-tread converter: 2^bits - 1 levels, multiples of step = 2 bound / (2^bits - 2), 0 among them."""
    bound = np.broadcast_to(np.asarray(bound, float).reshape(-1, 1), x.shape)
    step = 2 * bound / (2.0 ** bits - 2)
    return np.round(np.clip(x, -bound, bound) / step) * step


def test_quantise_kernel_against_numpy():
    rng = np.random.default_rng(14)
    for bits in (2, 3, 7, 9):
        bound = np.array([1.0, 0.5, 3.0])
        x = rng.normal(scale=2.0, size=(3, 400))
        step = 2 * bound / (2.0 ** bits - 2)
        x[:, :20] = (np.arange(20) % (2 ** bits - 2) - (2 ** (bits - 1) - 1) + 0.5) * step[:, None]  # exact ties
        x[:, 20], x[:, 21] = 10.0, -10.0
        got = x.copy()
        K.quantise(got, bits, bound)
        np.testing.assert_array_equal(got, _np_quantise(x, bits, bound))
        for i in range(3):
            k = got[i] / step[i]
            np.testing.assert_allclose(k, np.round(k), rtol=0, atol=1e-9)
            assert len(np.unique(got[i])) <= 2 ** bits - 1 and np.abs(got[i]).max() <= bound[i] * (1 + 1e-15)
            assert np.any(got[i] == 0.0) or np.all(np.abs(x[i]) >= step[i] / 2)
        one = x.copy()
        K.quantise(one, bits, np.array([0.7]))  # one bound for every row
        np.testing.assert_array_equal(one, _np_quantise(x, bits, 0.7))
        skip = x.copy()
        K.quantise(skip, bits, np.array([1.0, 0.0, 3.0]))  # bound 0: a row without a converter
        np.testing.assert_array_equal(skip[1], x[1])


def test_io_chain_products_are_quantised():
    """With IOChain(inp_bits, out_bits, out_noise=0) the kernel's product is ADC(W DAC(r)): one
    Euler step (h = tau = 1, b = 0, identity activation) from u0 lands on ADC(W DAC(u0)), on the
    ADC's levels (bound out_bound w_max, w_max = max|W|); the input goes through the DAC once."""
    rng = np.random.default_rng(15)
    m = 6
    W = rng.normal(size=(m, m))
    V = rng.normal(size=(m, 3))
    net = S.Network([S.Layer("h", m, activation="identity")], [S.Connection("h", "h", W)])
    io = D.IOChain(inp_bits=3, inp_bound=1.0, out_bits=4, out_bound=1.5, out_noise=0.0)
    hw = attach(net, io)
    u0 = rng.uniform(-1.5, 1.5, (7, m))
    u1 = S.integrate(hw, t_span=(0, 1), method="euler", dt=1.0, u0=u0).u[-1]
    bd = 1.5 * np.abs(W).max()
    expected = _np_quantise((W @ _np_quantise(u0.T, 3, 1.0)), 4, bd).T
    np.testing.assert_allclose(u1, expected, rtol=0, atol=1e-14)
    k = u1 / (2 * bd / 14)  # on the ADC's levels: multiples of its step 2 bound / (2^4 - 2)
    np.testing.assert_allclose(k, np.round(k), rtol=0, atol=1e-9)
    # a network with an input: the DAC quantises x, and a relaxation runs (read at its time limit)
    net2 = S.Network([S.Layer("h", m, activation="tanh")], [S.Connection("x", "h", V), S.Connection("h", "h", 0.3 * W)],
                     [S.Input("x", 3)])
    hw2 = attach(net2, io, D.RelaxationTime(30.0))
    x = rng.uniform(-1.2, 1.2, (4, 3))
    sol = S.relax(hw2, x, tol=1e-9)
    assert sol.ok and np.all(np.isfinite(sol.u))
    np.testing.assert_allclose(hw2.drive(x, None, np.float64), (_np_quantise(x.T, 3, 1.0).T @ V.T).T,
                               rtol=0, atol=1e-14)


def test_io_chain_leaves_rows_without_a_crossbar_alone():
    """IOChain acts on the weight products inside the kernel (and the input projection's DAC; the
    ADC of input crossbars is not modelled). A layer fed only by its input has no product inside the
    kernel, so an IO chain without noise and without a DAC must leave its equilibrium V x + b alone;
    the ADC must not touch its zero product."""
    net, x, _, _ = problem(feedback="none", sizes=(4, 3, 2), batch=2)
    hw = attach(net, D.IOChain(inp_bits=0, out_bits=9, out_noise=0.0))
    a, b = S.relax(hw, x, tol=1e-12).u, S.relax(net, x, tol=1e-12).u
    sl = net.slices["h1"]
    np.testing.assert_allclose(a[:, sl], b[:, sl], rtol=0, atol=1e-10)


# ====================================================================================== 8. streams
NOISY = (D.ProgrammingNoise(), D.ReadNoise(0.02, policy="phase"), D.TauMismatch(0.1),
         D.ActivationMismatch(0.05, 0.05), D.StateNoise(0.01))


def test_same_seed_same_bits():
    net, x, _, _ = problem()
    runs = []
    for seed in (21, 21, 22):
        hw = D.attach(net, D.Device(NOISY), np.random.default_rng(seed))
        runs.append((S.relax(hw, x, method="euler", dt=0.25, tol=1e-6, max_steps=400, on_failure="return").u,
                     S.integrate(hw, x, t_span=(0, 2), method="rk4", dt=0.1).u))
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert np.abs(runs[0][0] - runs[2][0]).max() > 1e-4


def test_switching_an_effect_does_not_move_another_effects_draws():
    W = np.random.default_rng(16).uniform(-1, 1, (50, 60))
    base = crossbar(W, D.ProgrammingNoise(), seed=3)[2]
    with_read = crossbar(W, D.ProgrammingNoise(), D.ReadNoise(0.1), seed=3)[2]
    assert np.array_equal(base.g_prog, with_read.g_prog)
    with_stuck = crossbar(W, D.ProgrammingNoise(), D.StuckAt(0.1, "random"), seed=3)[2]
    stuck = with_stuck.g_prog != base.g_prog
    within(stuck.mean(), 0.1, math.sqrt(0.09 / stuck.size))
    assert np.array_equal(with_stuck.g_prog[~stuck], base.g_prog[~stuck])
    # the faults first, then the noise (on the stuck value too): the free devices still see the same
    # noise draws
    first_stuck = crossbar(W, D.StuckAt(0.1, "random"), D.ProgrammingNoise(), seed=3)[2]
    assert np.array_equal(first_stuck.g_prog[~stuck], base.g_prog[~stuck])
    # neurons: each dynamics effect from its own stream
    net, x, _, _ = problem()
    tau = attach(net, D.TauMismatch(0.2), seed=4).neurons
    both = attach(net, D.ActivationMismatch(0.1, 0.1), D.TauMismatch(0.2), seed=4).neurons
    act = attach(net, D.ActivationMismatch(0.1, 0.1), seed=4).neurons
    assert np.array_equal(tau.tau, both.tau) and np.array_equal(act.gain, both.gain)
    assert np.array_equal(act.offset, both.offset)


def test_state_noise_draws_do_not_depend_on_output_noise():
    """A linear circuit (identity activation, zero drive, u0 = 0): the final state is a linear
    function of the state-noise and output-noise draws, u(both) = u(state noise) + u(output noise)
    exactly when each effect draws from its own stream (to rounding, 1e-12)."""
    rng = np.random.default_rng(17)
    m = 8
    W = 0.3 * rng.normal(size=(m, m))
    net = S.Network([S.Layer("h", m, activation="identity")], [S.Connection("h", "h", W)])
    io = D.IOChain(inp_bits=0, out_bits=0, out_noise=0.05)
    kw = dict(batch=6, t_span=(0, 3), method="euler", dt=0.1)
    u_s = S.integrate(attach(net, D.StateNoise(0.2), seed=5), **kw).u[-1]
    u_o = S.integrate(attach(net, io, seed=5), **kw).u[-1]
    u_b = S.integrate(attach(net, D.StateNoise(0.2), io, seed=5), **kw).u[-1]
    assert np.abs(u_s).max() > 0.05 and np.abs(u_o).max() > 0.01
    np.testing.assert_allclose(u_b, u_s + u_o, rtol=0, atol=1e-12)
    # per-step read noise scales with the state, so only one step is linear in both draws:
    # u1 = u0 + h F(u0) + h sd(u0) xi_read + s sqrt(h) xi_state
    one = dict(t_span=(0, 0.1), method="euler", dt=0.1, u0=np.ones((6, m)))
    u_0 = S.integrate(net, **one).u[-1]
    u_r = S.integrate(attach(net, D.ReadNoise(0.3, policy="step"), seed=5), **one).u[-1]
    u_s = S.integrate(attach(net, D.StateNoise(0.2), seed=5), **one).u[-1]
    u_rs = S.integrate(attach(net, D.StateNoise(0.2), D.ReadNoise(0.3, policy="step"), seed=5), **one).u[-1]
    assert np.abs(u_r - u_0).max() > 1e-3 and np.abs(u_s - u_0).max() > 1e-3
    np.testing.assert_allclose(u_rs - u_r, u_s - u_0, rtol=0, atol=1e-14)


# ====================================================================================== 9. twin
def test_gradient_on_a_programmed_device_is_that_of_its_weights():
    """Programming noise and tau mismatch (a deterministic, differentiable device): the discrete and
    implicit gradients (twin=False) are those of a plain network of the programmed weights and the
    device's taus (1e-12: the same kernels on the same numbers). Weights, biases, tau and u0."""
    net, x, _, _ = problem(feedback="tied")
    hw = attach(net, D.ProgrammingNoise(), D.TauMismatch(0.1), seed=12)
    ref = plain(hw)
    for kw in (dict(method="discrete", t_span=(0, 3), integrator="rk4", dt=0.1), dict(method="implicit")):
        a, b = S.gradient(hw, x, loss_sq, **kw), S.gradient(ref, x, loss_sq, **kw)
        for part in ("weights", "biases", "tau"):
            for k in getattr(b, part):
                np.testing.assert_allclose(getattr(a, part)[k], getattr(b, part)[k], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(a.u0, b.u0, rtol=1e-12, atol=1e-14)
        assert a.loss == pytest.approx(b.loss, rel=1e-12)


def test_device_input_gradient_uses_the_input_weights_as_read():
    """dL/dx = V^T lambda must use the input projection the forward pass used (the device's V as
    read), like every other part of the backward pass (gradient docstring: "the backward pass runs
    on the weights as read for that forward pass")."""
    net, x, _, _ = problem(feedback="tied")
    hw = attach(net, D.ProgrammingNoise(), seed=12)
    ref = plain(hw)
    for kw in (dict(method="discrete", t_span=(0, 3), integrator="rk4", dt=0.1), dict(method="implicit")):
        a, b = S.gradient(hw, x, loss_sq, **kw), S.gradient(ref, x, loss_sq, **kw)
        np.testing.assert_allclose(a.inputs["x"], b.inputs["x"], rtol=1e-12, atol=1e-14)


def test_gradient_needs_twin_on_a_nondifferentiable_device():
    net, x, _, _ = problem()
    for dev in ((D.StateNoise(0.01),), (D.ReadNoise(0.01, policy="step"),), (D.ReadNoise(0.01, policy="sample"),),
                (D.IOChain(),), (D.ActivationMismatch(),)):
        hw = attach(net, *dev)
        assert not hw.differentiable
        with pytest.raises(Bad, match="twin=True"):
            S.gradient(hw, x, loss_sq, t_span=(0, 1), integrator="euler", dt=0.1)
        with pytest.raises(Bad, match="twin=True"):
            S.gradient(hw, x, loss_sq, method="implicit")
        g = S.gradient(hw, x, loss_sq, t_span=(0, 1), integrator="euler", dt=0.1, twin=True)
        assert all(np.all(np.isfinite(v)) for v in g.weights.values())
    assert attach(net, D.ProgrammingNoise(), D.ReadNoise(0.01, policy="equilibrium")).differentiable
    with pytest.raises(Bad, match="twin=True needs a network on a device"):
        S.gradient(net, x, loss_sq, t_span=(0, 1), twin=True)


def test_twin_discrete_adjoint_by_hand():
    """Two Euler steps u_{k+1} = u_k + (h/tau)(-u_k + W rho(u_k) + b), L = sum c u_2. The twin runs the
    backward pass on the nominal network (W, tau) at the device's states u_1 (forward with the
    device's W_dev, tau_dev); twin=False on the device's own (W_dev, tau_dev). By hand:
    lam_2 = c; dW += (h/tau) lam_{k+1} rho(u_k)^T, lam_k = lam_{k+1} + J(u_k)^T ((h/tau) lam_{k+1})."""
    rng = np.random.default_rng(18)
    m, B, h = 4, 3, 0.2
    W, b = rng.normal(size=(m, m)), rng.normal(size=m)
    net = S.Network([S.Layer("h", m, activation="tanh", bias=b)], [S.Connection("h", "h", W)])
    hw = attach(net, D.ProgrammingNoise(scale=5.0), D.TauMismatch(0.3), seed=13)
    Wd, taud = hw.circuit_weight(net.connection("h->h")), hw.neurons.tau
    assert np.abs(Wd - W).max() > 1e-2 and np.abs(taud - 1).max() > 1e-2
    u0 = rng.normal(size=(B, m))
    c = rng.normal(size=(B, m))
    u1 = u0 + h / taud * (-u0 + np.tanh(u0) @ Wd.T + b)
    u2 = u1 + h / taud * (-u1 + np.tanh(u1) @ Wd.T + b)

    def by_hand(Wb, taub):
        gW, gb, lam = np.zeros_like(W), np.zeros_like(b), c.copy()
        for u in (u1, u0):
            a = h / taub * lam
            gW += a.T @ np.tanh(u)
            gb += a.sum(axis=0)
            lam = lam - a + (1 - np.tanh(u) ** 2) * (a @ Wb)
        return gW, gb, lam

    loss = lambda u: (float(np.sum(c * u)), c)
    for twin, (Wb, taub) in ((True, (W, np.ones(m))), (False, (Wd, taud))):
        g = S.gradient(hw, None, loss, t_span=(0, 2 * h), integrator="euler", dt=h, u0=u0, twin=twin)
        np.testing.assert_allclose(g.solution.u[-1], u2, rtol=0, atol=1e-14)
        gW, gb, lam = by_hand(Wb, taub)
        np.testing.assert_allclose(g.weights["h->h"], gW, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g.biases["h"], gb, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g.u0, lam, rtol=1e-12, atol=1e-14)


def test_twin_implicit_is_the_nominal_solve_at_the_device_equilibrium():
    """Implicit twin: the device relaxes (programming noise, tau and activation mismatch), then
    J_nominal(u*)^T lambda = -dL/du and (dF_nominal/dtheta)^T lambda at the device's u* (the same
    solver on the same numbers: 1e-13)."""
    net, x, _, _ = problem(feedback="independent")
    hw = attach(net, D.ProgrammingNoise(scale=3.0), D.TauMismatch(0.2), D.ActivationMismatch(0.1, 0.1), seed=14)
    g = S.gradient(hw, x, loss_sq, method="implicit", twin=True)
    sol = S.relax(hw, x, method="rk4", tol=1e-10, max_steps=1_000_000)
    same_solution(g.solution, sol)
    vf = S.VectorField(hw.nominal, x)
    lam = solve_adjoint(vf, sol.u, -sol.u)
    ref = vf.param_vjp(sol.u, lam)
    for k in ref["weights"]:
        np.testing.assert_allclose(g.weights[k], ref["weights"][k], rtol=1e-13, atol=1e-15)
    for k in ref["biases"]:
        np.testing.assert_allclose(g.biases[k], ref["biases"][k], rtol=1e-13, atol=1e-15)
    # not the nominal network's own gradient: the device's equilibrium differs
    nominal = S.gradient(net, x, loss_sq, method="implicit")
    assert M.relative_error(g.weights["x->h1"], nominal.weights["x->h1"]) > 1e-3


# ====================================================================================== 10. training
@pytest.fixture(scope="module")
def tiny_digits():
    return digits().subset(60, 30, np.random.default_rng(3))


def _model(seed=4):
    return Classifier.layered((64, 10, 8, 10), np.random.default_rng(seed))


def _train(model, data, seed=5, lr=0.05, **kw):
    return train(model, data, rule=ep.Centred(0.1), optimiser=SGD(lr, 0.9), epochs=1, batch_size=20,
                 rng=np.random.default_rng(seed), probe=10, progress=False, **kw)


def test_training_through_a_constant_step_device_stays_on_its_grid(tiny_digits):
    """Noise-free constant steps of dw: every trained weight is its first-written value plus an
    integer number of steps, and the nominal arrays are the devices' weights. (A change below half a
    step is no pulse: lr 0.2 moves a few hundred of the 800 weights.)"""
    dw = 0.002
    model0 = _model()
    first = {c.name: c.weight.copy() for c in model0.network.connections}
    step = D.ConstantStep(dw_min=dw, dw_min_dtod=0.0, dw_min_std=0.0, up_down_dtod=0.0, w_max_dtod=0.0,
                          w_min_dtod=0.0, w_max=1.0, w_min=-1.0)
    hw = D.attach(model0.network, D.Device((step,)), np.random.default_rng(6))
    model = Classifier(hw, model0.cost)
    hist = _train(model, tiny_digits, lr=0.2)
    assert len(hist.epoch) == 2
    moved = 0
    for c in hw.connections:
        xb = hw.crossbars[c.name]
        assert np.array_equal(c.weight, xb.w_prog), c.name
        k = (c.weight - first[c.name]) / dw
        np.testing.assert_allclose(k, np.round(k), rtol=0, atol=1e-6)
        moved += int(np.count_nonzero(np.round(k)))
    assert moved > 50


def test_training_on_the_ideal_device_is_training_without_one(tiny_digits):
    a, b = _model(), _model()
    ha = _train(a, tiny_digits)
    hw = D.attach(b.network, D.Device(), np.random.default_rng(0))
    hb = _train(Classifier(hw, b.cost), tiny_digits)
    ra, rb = ha.arrays(), hb.arrays()
    for k in ra:
        if k != "seconds":
            np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
    pa, pb = a.parameters(), Classifier(hw, b.cost).parameters()
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k


# ====================================================================================== 11. bad input
@pytest.mark.parametrize("make, message", [
    (lambda: D.ReadNoise(sigma=-0.1), r"ReadNoise\.sigma=-0\.1"),
    (lambda: D.ReadNoise(policy="never"), r"ReadNoise\.policy='never'; allowed: 'step'"),
    (lambda: D.PCMReadNoise(policy="always"), r"PCMReadNoise\.policy='always'"),
    (lambda: D.PCMReadNoise(t_read=0.0), r"PCMReadNoise\.t_read=0\.0"),
    (lambda: D.Quantisation(levels=1), r"Quantisation\.levels=1 must be an integer >= 2"),
    (lambda: D.Quantisation(levels=4.5), r"Quantisation\.levels=4\.5"),
    (lambda: D.StuckAt(fraction=1.5), r"StuckAt\.fraction=1\.5 must be in \[0, 1\]"),
    (lambda: D.StuckAt(value="middle"), r"StuckAt\.value='middle'"),
    (lambda: D.ConductanceMapping(on_off=0.5), r"ConductanceMapping\.on_off=0\.5"),
    (lambda: D.ConductanceMapping(on_off=1.0), r"ConductanceMapping\.on_off=1\.0 must be > 1"),
    (lambda: D.ConductanceMapping(g_max=-1.0), r"ConductanceMapping\.g_max=-1\.0"),
    (lambda: D.ConductanceMapping(w_max=0.0), r"ConductanceMapping\.w_max=0\.0"),
    (lambda: D.ProgrammingNoise(scale=-1.0), r"ProgrammingNoise\.scale=-1\.0"),
    (lambda: D.ProgrammingNoise(coefficients=()), r"ProgrammingNoise\.coefficients"),
    (lambda: D.Drift(t0=0.0), r"Drift\.t0=0\.0"),
    (lambda: D.Drift(nu=-0.01), r"Drift\.nu=-0\.01"),
    (lambda: D.Drift(nu=float("nan")), r"Drift\.nu=nan must be a number, not NaN"),
    (lambda: D.IOChain(inp_bits=-1), r"IOChain\.inp_bits=-1"),
    (lambda: D.IOChain(out_bits=2.0), r"IOChain\.out_bits=2\.0"),
    (lambda: D.IOChain(out_noise=-0.1), r"IOChain\.out_noise=-0\.1"),
    (lambda: D.TauMismatch(spread=float("inf")), r"TauMismatch\.spread=inf"),
    (lambda: D.ActivationMismatch(gain_spread=-1), r"ActivationMismatch\.gain_spread=-1"),
    (lambda: D.StateNoise(sigma="big"), r"StateNoise\.sigma='big' must be a number"),
    (lambda: D.RelaxationTime(duration=0), r"RelaxationTime\.duration=0"),
    (lambda: D.ReadNoise().scaled(-1), r"ReadNoise\.scaled\(factor\)=-1"),
    (lambda: D.Device((D.ReadNoise(policy="phase"), D.PCMReadNoise(policy="equilibrium"))),
     r"read effects with different policies \['equilibrium', 'phase'\]"),
    (lambda: D.Device((D.ConstantStep(), D.ProgrammingNoise())), "pulsed update model"),
    (lambda: D.Device((D.ConstantStep(), D.ConductanceMapping())), "pulsed update model"),
    (lambda: D.Device((D.ConstantStep(), D.Drift())), "pulsed update model"),
    (lambda: D.Device((D.ConstantStep(), D.PCMReadNoise())), "pulsed update model"),
    (lambda: D.Device((D.IOChain(), D.IOChain(out_bits=4))), "at most one 'io' effect"),
    (lambda: D.Device((D.ConstantStep(), D.SoftBounds())), "at most one 'update' effect"),
    (lambda: D.Device(("noise",)), "is not a device Effect"),
    (lambda: D.Device(weight_scale=0.0), r"Device\.weight_scale=0\.0"),
    (lambda: D.preset("nope"), r"device preset 'nope' is unknown; allowed: ideal, pcm_inference, .*rram"),
])
def test_bad_parameters(make, message):
    with pytest.raises(Bad, match=message):
        make()


def test_bad_attach():
    net, _, _, _ = problem()
    rng = np.random.default_rng(0)
    hw = D.attach(net, D.Device(), rng)
    with pytest.raises(Bad, match="already on a device; attach the nominal network"):
        D.attach(hw, D.Device(), rng)
    with pytest.raises(Bad, match="rng must be a numpy.random.Generator, got int"):
        D.attach(net, D.Device(), 0)
    with pytest.raises(Bad, match="rng must be a numpy.random.Generator, got RandomState"):
        D.attach(net, D.Device(), np.random.RandomState(0))
    with pytest.raises(Bad, match="network must be a substrate Network, got str"):
        D.attach("net", D.Device(), rng)
    with pytest.raises(Bad, match="device must be a substrate.devices.Device, got ReadNoise"):
        D.attach(net, D.ReadNoise(), rng)
    with pytest.raises(Bad, match="seconds=-1"):
        hw.advance(-1)
    assert D.ReadNoise(policy="step").policy == "step"  # every policy is accepted
    assert [D.ReadNoise(policy=p).policy for p in POLICIES] == list(POLICIES)


# ====================================================================================== 12. CLI
def test_cli_lists_the_presets():
    runner = CliRunner()
    out = runner.invoke(cli, ["devices"])
    assert out.exit_code == 0, out.output
    for name, dev in D.PRESETS.items():
        assert dev.describe().splitlines()[0] in out.output, name
    assert "ProgrammingNoise: " in out.output and "PCMReadNoise: " in out.output
    one = runner.invoke(cli, ["devices", "pcm_inference"])
    assert one.exit_code == 0 and "pcm_inference" in one.output and "reram_sb" not in one.output
    bad = runner.invoke(cli, ["devices", "nope"])
    assert bad.exit_code != 0
    assert "nope" in bad.output and all(name in bad.output for name in D.PRESETS)


def test_cli_devices_as_a_module():
    """``python -m studies.cli devices`` (the module's __main__ block) knows the command too."""
    out = subprocess.run([sys.executable, "-m", "studies.cli", "devices", "ideal"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ideal" in out.stdout


# ------------------------------------------------------------------------------------ review fixes
def test_phase_policy_one_draw_per_phase_shared_by_a_tied_transpose():
    """One phase (one pack) reads each crossbar once: a tied feedback is exactly the transpose of the
    forward read; the next phase draws anew."""
    net, x, _, _ = problem()
    hw = attach(net, D.ReadNoise(0.1, policy="phase"))
    for _ in range(2):
        p = hw.pack(np.float64)
        W = p.dense()
        fw, fb = hw.slices["h1"], hw.slices["h2"]
        np.testing.assert_array_equal(W[fw, fb], W[fb, fw].T)
    assert not np.array_equal(hw.pack(np.float64).dense(), W)


def test_implicit_gradient_differentiates_the_phase_it_relaxed():
    """With read noise per phase, the backward pass uses the weights the equilibrium was relaxed with."""
    net, x, _, _ = problem(feedback="independent")
    hw = attach(net, D.ReadNoise(0.1, policy="phase"))
    g = S.gradient(hw, x, loss_sq, method="implicit", tol=1e-12)
    sol = g.solution
    assert np.max(np.abs(sol.field(sol.u))) <= 1e-11  # the backward circuit is at equilibrium there
    lam = S.adjoint.solve_adjoint(sol.field, sol.u, -sol.u)
    expected = sol.field.param_vjp(sol.u, lam)
    for k, w in expected["weights"].items():
        np.testing.assert_allclose(g.weights[k], w, rtol=1e-12, atol=1e-15)


def test_implicit_differentiation_needs_an_equilibrium():
    net, x, y, cost = problem()
    hw = attach(net, D.RelaxationTime(0.5))
    with pytest.raises(S.ConvergenceError, match="not an equilibrium"):
        S.gradient(hw, x, loss_sq, method="implicit", tol=1e-10)
    rel = ep.Relaxation(tol=1e-8, on_failure="record")
    with pytest.raises(S.ConvergenceError, match="not an equilibrium"):
        ep.estimate(hw, x, y, cost, ep.Exact(), rel)
    with pytest.raises(S.SubstrateValueError, match="nominal network"):
        ep.estimate(attach(net, D.ReadNoise(0.1, policy="step")), x, y, cost, ep.Exact(), rel)


def test_step_noise_with_a_correlation_time_does_not_depend_on_the_step():
    """Per-step read noise with correlation time t_c: the spread of the state around its mean over a
    long window is the same for dt = 0.1 and 0.025 (within 15 %: ~4000 samples each); without t_c
    it grows with the step (by ~2 for a 4x larger step, the sqrt of the ratio)."""
    rng = np.random.default_rng(5)
    m = 20
    net = S.Network([S.Layer("h", m, activation="identity")], [S.Connection("h", "h", 0.3 * rng.normal(size=(m, m)) / np.sqrt(m))],
                    [S.Input("x", 3)])
    net.connections.append(S.Connection("x", "h", rng.normal(size=(m, 3))))
    net = S.Network(net.layers, net.connections, net.inputs)
    x = np.ones((200, 3))

    def spread(dt, tc):
        hw = attach(net, D.ReadNoise(0.3, relative=False, policy="step", correlation_time=tc), seed=1)
        sol = S.integrate(hw, x, t_span=(0.0, 40.0), t_eval=np.linspace(20.0, 40.0, 21), method="euler", dt=dt)
        return float(np.std(sol.u - sol.u.mean(axis=(0, 1))))

    with_tc = spread(0.1, 0.05) / spread(0.025, 0.05)
    without = spread(0.1, None) / spread(0.025, None)
    assert abs(with_tc - 1.0) < 0.15, with_tc
    assert without > 1.6, without


def test_compensation_scales_read_noise_with_the_weights():
    """Global drift compensation is one output scale: the read noise relative to the weight stays."""
    rng = np.random.default_rng(6)
    W = level_weights((200, 300), [0.3, 1.0], rng)
    net = S.Network([S.Layer("h", 200)], [S.Connection("x", "h", W)], [S.Input("x", 300)])
    stats = []
    for comp in (False, True):
        hw = attach(net, D.ConductanceMapping(), D.Drift(nu=0.05, compensation=comp), D.PCMReadNoise(policy="phase"))
        hw.advance(3600.0)
        c = hw.connections[0]
        w, var = hw.crossbars[c.name].read(hw.clock)
        stats.append(np.median(np.sqrt(var[0]) / np.abs(w)))
    np.testing.assert_allclose(stats[0], stats[1], rtol=1e-12)


def test_independent_feedback_keeps_the_masked_synapses_off():
    rng = np.random.default_rng(7)
    mask = (rng.random((6, 5)) < 0.5).astype(float)
    net = S.Network([S.Layer("a", 5), S.Layer("b", 6)],
                    [S.Connection("a", "b", rng.normal(size=(6, 5)), mask=mask), S.Connection("b", "a", tied=True)])
    hw = attach(net, D.ConductanceMapping(), D.ProgrammingNoise(scale=3.0), D.IndependentFeedback(),
                D.ReadNoise(0.1, policy="phase"))
    hw.pack(np.float64)
    fb = hw.circuit_weight(hw.connection("b->a"))
    assert np.all(fb[mask.T == 0] == 0.0) and np.any(fb[mask.T == 1] != 0.0)


def test_program_effects_run_in_the_fixed_order():
    """Stuck devices stay exactly at g_max whatever the order the effects are listed in."""
    rng = np.random.default_rng(8)
    W = level_weights((200, 300), [0.5, 1.0], rng)
    fracs = []
    for effects in ((D.StuckAt(0.2, "max"), D.ProgrammingNoise()), (D.ProgrammingNoise(), D.StuckAt(0.2, "max"))):
        net = S.Network([S.Layer("h", 200)], [S.Connection("x", "h", W)], [S.Input("x", 300)])
        hw = attach(net, D.ConductanceMapping(), *effects)
        g = hw.crossbars["x->h"].g_prog
        fracs.append(float(np.mean(g == hw.crossbars["x->h"].g_max)))
    assert fracs[0] == fracs[1] and abs(fracs[0] - 0.2) < 0.01


def test_device_state_follows_the_clock_and_refuses_what_it_cannot_model():
    net, x, y, cost = problem()
    hw = attach(net, D.ConductanceMapping(), D.Drift(nu=0.05), D.ReadNoise(0.1, policy="equilibrium"))
    a = hw.pack(np.float64).dense()
    hw.advance(100.0)  # a new reading: held draws are redrawn
    assert not np.array_equal(a, hw.pack(np.float64).dense())
    cnet = S.Network([S.Layer("h", 3, activation="identity")], [S.Connection("h", "h", np.eye(3) * (0.1 + 0.1j))])
    with pytest.raises(S.SubstrateValueError, match="real conductances"):
        attach(cnet, D.ReadNoise(0.1))


def test_twin_tau_gradients_have_the_nominal_layout():
    net, x, _, _ = problem()
    hw = attach(net, D.TauMismatch(0.2))
    g = S.gradient(hw, x, loss_sq, t_span=(0.0, 2.0), integrator="euler", dt=0.1, twin=True)
    assert all(np.ndim(g.tau[x.name]) == np.ndim(x.tau) for x in net.layers)


def test_a_step_effect_runs_its_hooks_in_the_kernel_and_needs_registering():
    """A user StepEffect with a ``step`` hook: after every accepted Euler step its state is moved (here
    u -= c h, a constant drain of rate c), so that the state settles at F(u) = c tau instead of 0; a
    state whose class registered no hooks is refused in the Python layer, naming the fix."""
    from collections import namedtuple

    Drain = namedtuple("Drain", "rate")

    @K.njit
    def drain(e, u, h):
        for p in range(u.shape[0]):
            for b in range(u.shape[1]):
                u[p, b] -= e.rate * h
        return True

    D.register(Drain, step=drain)

    class DrainEffect(D.StepEffect):
        def state(self, network, batch, dtype):
            return Drain(0.01)

    net, x, _, _ = problem()  # tau = 1
    sol = S.integrate(attach(net, DrainEffect()), x, t_span=(0.0, 80.0), method="euler", dt=0.1)
    np.testing.assert_allclose(S.VectorField(net, x)(sol.u[-1]), 0.01, rtol=0, atol=1e-9)

    Unregistered = namedtuple("Unregistered", "rate")

    class Forgotten(D.StepEffect):
        def state(self, network, batch, dtype):
            return Unregistered(0.01)

    with pytest.raises(Bad, match=r"Forgotten.state\(\) returned a Unregistered, whose kernel hooks are not registered"):
        S.relax(attach(net, Forgotten()), x, method="euler", dt=0.1)
