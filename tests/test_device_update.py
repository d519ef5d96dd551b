"""Pulsed weight updates (substrate.devices.update): each model against its closed form or a NumPy
reimplementation of its formula, the statistics of its device-to-device and cycle-to-cycle noise, the
pulse count, determinism, and bad input."""

import dataclasses
import math

import numpy as np
import pytest

from substrate.devices.base import stream
from substrate.devices.update import (UPDATE_MODELS, UPDATE_PRESETS, ConstantStep, ExpStep, LinearStep,
                                      NeuroSimNonlinear, SoftBounds, neurosim_a)
from substrate.errors import SubstrateValueError as Bad

N = 200_000  # devices of the statistical tests


def rng(seed=0):
    return np.random.default_rng(seed)


def within(sample_value, expected, se, k=3.0):
    assert abs(sample_value - expected) < k * se, (sample_value, expected, se)


def pulses(model, w, n, devices, g):
    """Apply n (signed, per device or scalar) pulses in one update."""
    return model.apply(w, np.broadcast_to(np.asarray(n, dtype=float) * model.dw_step, w.shape), devices, g)


# ------------------------------------------------------------------------------------ soft bounds
@pytest.mark.parametrize("model", [SoftBounds().scaled(0), dataclasses.replace(SoftBounds(), dw_min_std=0.0),
                                   dataclasses.replace(UPDATE_PRESETS["reram_sb"][0], dw_min_std=0.0)])
@pytest.mark.parametrize("n", [1, 7, 31])
def test_soft_bounds_closed_form(model, n):
    g = rng(1)
    dev = model.devices(1000, g)
    w0 = model.initial(g.uniform(-0.5, 0.5, 1000), dev)
    hi, lo, up, down = dev["w_max"], dev["w_min"], dev["dw_up"], dev["dw_down"]
    w = pulses(model, w0.copy(), n, dev, g)
    np.testing.assert_allclose(w, hi - (hi - w0) * (1 - up / hi) ** n, rtol=0, atol=1e-12)
    w = pulses(model, w0.copy(), -n, dev, g)
    np.testing.assert_allclose(w, lo - (lo - w0) * (1 + down / lo) ** n, rtol=0, atol=1e-12)
    # many updates: the weight approaches the soft bound and never crosses it
    w = w0.copy()
    for _ in range(40):
        pulses(model, w, 31, dev, g)
    np.testing.assert_allclose(w, hi - (hi - w0) * (1 - up / hi) ** (40 * 31), rtol=0, atol=1e-12)
    assert (w <= hi).all()


# ------------------------------------------------------------------------------------ constant step
def test_constant_step_moves_n_steps_and_clips():
    m = ConstantStep().scaled(0)
    dev = m.devices(4, rng())
    assert (dev["dw_up"] == m.dw_min).all() and (dev["dw_down"] == m.dw_min).all()
    w = np.zeros(4)
    pulses(m, w, [1, 5, -17, 31], dev, rng())
    np.testing.assert_allclose(w, np.array([1, 5, -17, 31]) * m.dw_min, rtol=1e-12, atol=0)
    w = np.array([0.59, -0.59, 0.59, 0.0])
    pulses(m, w, [31, -31, -31, 31], dev, rng())
    np.testing.assert_allclose(w, [0.6, -0.6, 0.59 - 0.031, 0.031], rtol=1e-12, atol=0)
    assert w[0] == 0.6 and w[1] == -0.6  # exactly at the bound


@pytest.mark.parametrize("up_down, ratio", [(0.2, 1 / 0.8), (-0.2, 0.8), (0.0, 1.0)])
def test_constant_step_up_down_asymmetry(up_down, ratio):
    m = ConstantStep(up_down=up_down).scaled(0)
    dev = m.devices(3, rng())
    np.testing.assert_allclose(dev["dw_up"] / dev["dw_down"], ratio, rtol=1e-12)
    w = np.zeros(3)
    pulses(m, w, 10, dev, rng())
    pulses(m, w, -10, dev, rng())
    np.testing.assert_allclose(w, 10 * (dev["dw_up"] - dev["dw_down"]), rtol=1e-9, atol=1e-15)
    # with device-to-device spread the mean ratio follows (aihwkit: the bias shrinks one direction)
    m = ConstantStep(up_down=up_down, dw_min_dtod=0.1, up_down_dtod=0.0)
    dev = m.devices(N, rng(2))
    mean_up, mean_down = dev["dw_up"].mean(), dev["dw_down"].mean()
    within(mean_up, m.dw_min * (1 + min(up_down, 0)), 0.1 * m.dw_min / math.sqrt(N))
    within(mean_down, m.dw_min * (1 - max(up_down, 0)), 0.1 * m.dw_min / math.sqrt(N))


# ------------------------------------------------------------------------------------ linear and exp step
@pytest.mark.parametrize("mean_bound_reference", [True, False])
def test_linear_step_single_pulse(mean_bound_reference):
    m = LinearStep(gamma_up=0.3, gamma_down=0.6, gamma_up_dtod=0.0, gamma_down_dtod=0.0, dw_min=0.01,
                   dw_min_std=0.0, mean_bound_reference=mean_bound_reference)
    g = rng(3)
    dev = m.devices(5000, g)
    w0 = m.initial(g.uniform(-0.7, 0.7, 5000), dev)
    ref_up = m.w_max if mean_bound_reference else dev["w_max"]
    ref_down = m.w_min if mean_bound_reference else dev["w_min"]
    gp, gm = -abs(m.gamma_up) / ref_up, -abs(m.gamma_down) / ref_down  # aihwkit gamma^+, gamma^-
    up = np.clip(w0 + dev["dw_up"] * (gp * w0 + 1), dev["w_min"], dev["w_max"])
    down = np.clip(w0 - dev["dw_down"] * (gm * w0 + 1), dev["w_min"], dev["w_max"])
    np.testing.assert_allclose(pulses(m, w0.copy(), 1, dev, g), up, rtol=0, atol=1e-15)
    np.testing.assert_allclose(pulses(m, w0.copy(), -1, dev, g), down, rtol=0, atol=1e-15)
    # gamma = 1 referenced to the device's bounds is soft bounds
    sb = SoftBounds(dw_min_std=0.0)
    ls = LinearStep(gamma_up=1.0, gamma_down=1.0, gamma_up_dtod=0.0, gamma_down_dtod=0.0, dw_min_std=0.0,
                    mean_bound_reference=False)
    a, b = sb.devices(100, rng(4)), ls.devices(100, rng(4))
    w = np.linspace(-0.3, 0.3, 100)
    np.testing.assert_allclose(pulses(sb, w.copy(), 9, a, rng()), pulses(ls, w.copy(), 9, b, rng()), atol=1e-15)


@pytest.mark.parametrize("mult_noise", [True, False])
def test_linear_step_noise_kind(mult_noise):
    # at w = w_max/2 with gamma_up = 0.5 the mean step is 0.75 dw: multiplicative noise scales with it,
    # additive noise does not
    m = LinearStep(gamma_up=0.5, gamma_up_dtod=0.0, dw_min_dtod=0.0, up_down_dtod=0.0, w_max_dtod=0.0,
                   w_min_dtod=0.0, dw_min_std=0.3, mult_noise=mult_noise)
    dev = m.devices(N, rng(5))
    w = np.full(N, m.w_max / 2)
    pulses(m, w, 1, dev, rng(6))
    rel = (w - m.w_max / 2) / m.dw_min
    within(rel.mean(), 0.75, 0.3 / math.sqrt(N))
    expected = 0.3 * (0.75 if mult_noise else 1.0)
    within(rel.std(), expected, expected / math.sqrt(2 * N))


def exp_step_reference(m, w, dev, direction):
    """aihwkit ExpStepDevice update_once, noise-free, in NumPy."""
    z = 2 * m.a * w / (dev["w_max"] - dev["w_min"]) + m.b
    if direction > 0:
        w = w + np.maximum(1 - m.A_up * np.exp(m.gamma_up * z), 0) * dev["dw_up"]
    else:
        w = w - np.maximum(1 - m.A_down * np.exp(-m.gamma_down * z), 0) * dev["dw_down"]
    return np.clip(w, dev["w_min"], dev["w_max"])


@pytest.mark.parametrize("model", [ExpStep(dw_min=0.01), UPDATE_PRESETS["reram_es"][0]])
def test_exp_step_single_pulse(model):
    m = dataclasses.replace(model, dw_min_std=0.0)
    g = rng(7)
    dev = m.devices(5000, g)
    w0 = m.initial(g.uniform(-1, 1, 5000), dev)
    for d in (1, -1):
        w = pulses(m, w0.copy(), d, dev, g)
        np.testing.assert_allclose(w, exp_step_reference(m, w0, dev, d), rtol=0, atol=1e-15)
    ref = w0.copy()
    for _ in range(7):
        ref = exp_step_reference(m, ref, dev, 1)
    np.testing.assert_allclose(pulses(m, w0.copy(), 7, dev, g), ref, rtol=0, atol=1e-14)


def test_exp_step_saturates():
    # aihwkit's default ExpStep: the up step shrinks as w grows (y = 1 at w_min to 0.655 at w_max),
    # then the hard bound stops it
    m = ExpStep(dw_min=0.01).scaled(0)
    dev = m.devices(1, rng())
    w, trace = np.array([-0.6]), [-0.6]
    for _ in range(200):
        trace.append(pulses(m, w, 1, dev, rng())[0])
    steps = np.diff(trace)
    moving = steps[steps > 0][:-1]  # the last step is cut by the bound
    assert (np.diff(moving) < 0).all() and 0.6 < moving[-1] / moving[0] < 0.7
    assert trace[-1] == 0.6 and (steps >= 0).all()


# ------------------------------------------------------------------------------------ NeuroSim
NEUROSIM_TABLE = {  # getParamA (MLP_NeuroSim V3.0 formula.cpp; the last five from documents/Nonlinearity-NormA.htm)
    0.01: 126.268958, 0.02: 63.134314, 0.06: 21.044185, 0.10: 12.625807, 0.96: 1.304709, 1.00: 1.251653,
    1.51: 0.8195, 3.01: 0.3853, 4.51: 0.2266, 6.01: 0.1351, 7.51: 0.0702}


def test_neurosim_a_matches_table():
    for nl, a in NEUROSIM_TABLE.items():
        np.testing.assert_allclose(neurosim_a(nl), a, rtol=2e-6 if a > 1 else 0, atol=6e-5)
        assert neurosim_a(-nl) == -neurosim_a(nl)
    assert neurosim_a(0.0) == math.inf


def closed_form(p, a, p_max, g_min, g_max=1.0):
    b = (g_max - g_min) / (1 - np.exp(-p_max / a))
    return b * (1 - np.exp(-p / a)) + g_min


@pytest.mark.parametrize("name", [k for k in UPDATE_PRESETS if k.startswith("neurosim")])
def test_neurosim_curve(name):
    m = UPDATE_PRESETS[name][0]
    p = np.arange(m.states + 1.0)
    a_up, a_down = neurosim_a(m.nl_up) * m.states, neurosim_a(m.nl_down) * m.states
    up, down = m.curve("up"), m.curve("down")
    np.testing.assert_allclose(up, closed_form(p, a_up, m.states, m.g_min), rtol=0, atol=1e-12)
    np.testing.assert_allclose(down, closed_form(m.states - p, a_down, m.states, m.g_min), rtol=0, atol=1e-12)
    assert abs(up[0] - m.g_min) < 1e-12 and abs(up[-1] - 1.0) < 1e-12   # G_max at P_max
    assert abs(down[0] - 1.0) < 1e-12 and abs(down[-1] - m.g_min) < 1e-12
    assert (np.diff(up) > 0).all() and (np.diff(down) < 0).all()
    np.testing.assert_allclose(m.curve("up", weight=True)[[0, -1]], [m.w_min, m.w_max], atol=1e-12)
    for d in ("up", "down"):  # round trip P -> G -> P
        np.testing.assert_allclose(m.position(m.conductance(p, d), d), p, rtol=0, atol=1e-9)


def test_neurosim_ltd_is_the_mirrored_ltp_curve():
    # a negative LTD label is the point mirror of the LTP curve of the same |label|
    ltd = NeuroSimNonlinear(nl_down=-4.88).curve("down")
    ltp = NeuroSimNonlinear(nl_up=4.88).curve("up")
    g_min = NeuroSimNonlinear().g_min
    np.testing.assert_allclose(ltd, 1.0 + g_min - ltp, rtol=0, atol=1e-12)
    # a linear label is a straight line
    lin = NeuroSimNonlinear(nl_up=0.0, states=10, on_off=math.inf).curve("up")
    np.testing.assert_allclose(lin, np.linspace(0, 1, 11), atol=1e-15)


def test_neurosim_nonlinearity_orders_as_labels():
    labels = [0.1, 0.5, 1.0, 2.0, 4.0, 8.0]
    x = np.linspace(0, 1, 20001)
    dev = []
    for nl in labels:
        m = NeuroSimNonlinear(states=100, nl_up=nl, on_off=math.inf)
        dev.append(np.max(m.conductance(x * m.states, "up") - x))
    assert np.all(np.diff(dev) > 0)
    np.testing.assert_allclose(dev, 0.07 * math.sqrt(2) * np.array(labels), rtol=1e-6)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_neurosim_apply_follows_curve(direction):
    m = NeuroSimNonlinear(max_pulses=7).scaled(0)
    dev = m.devices(1, rng())
    sign = 1 if direction == "up" else -1
    w = np.array([m.w_min if sign > 0 else m.w_max])
    trace = [w[0]]
    for _ in range(m.states):
        trace.append(pulses(m, w, sign, dev, rng())[0])
    np.testing.assert_allclose(trace, m.curve(direction, weight=True), rtol=0, atol=1e-9)
    # n pulses in one update land where n single pulses do; beyond P_max the weight saturates
    w = np.array([m.w_min if sign > 0 else m.w_max])
    pulses(m, w, 5 * sign, dev, rng())
    np.testing.assert_allclose(w, m.curve(direction, weight=True)[5], atol=1e-9)
    w = np.array([trace[-3]])
    pulses(m, w, 7 * sign, dev, rng())
    assert w[0] == (m.w_max if sign > 0 else m.w_min)


def test_neurosim_c2c_noise():
    m = NeuroSimNonlinear(c2c=0.02)
    dev = m.devices(N, rng())
    w = np.zeros(N)
    quiet = pulses(m.scaled(0), w.copy(), 4, dev, rng())
    noisy = pulses(m, w.copy(), 4, dev, rng(8))
    dev_w = noisy - quiet
    sigma = 0.02 * math.sqrt(4) * (m.w_max - m.w_min)  # c2c (G_max - G_min) sqrt(n), in weight units
    within(dev_w.mean(), 0.0, sigma / math.sqrt(N))
    within(dev_w.std(), sigma, sigma / math.sqrt(2 * N))


# ------------------------------------------------------------------------------------ statistics
def test_device_to_device_spread():
    m = ConstantStep()
    dev = m.devices(N, rng(9))
    sd = m.dw_min * math.hypot(m.dw_min_dtod, m.up_down_dtod)
    within(dev["dw_up"].std(), sd, sd / math.sqrt(2 * N))
    within(dev["dw_up"].mean(), m.dw_min, sd / math.sqrt(N))
    within(dev["dw_down"].std(), sd, sd / math.sqrt(2 * N))
    # aihwkit's structure: dw_up + dw_down = 2 dw_min gain_ij, dw_up - dw_down = 2 dw_min r_ij
    m = ConstantStep(up_down_dtod=0.05)
    dev = m.devices(N, rng(9))
    s_sum, s_diff = 2 * m.dw_min * m.dw_min_dtod, 2 * m.dw_min * m.up_down_dtod
    within((dev["dw_up"] + dev["dw_down"]).std(), s_sum, s_sum / math.sqrt(2 * N))
    within((dev["dw_up"] - dev["dw_down"]).std(), s_diff, s_diff / math.sqrt(2 * N))
    within(dev["w_max"].std(), m.w_max * m.w_max_dtod, m.w_max * m.w_max_dtod / math.sqrt(2 * N))
    assert (dev["w_min"] <= 0).all() and (dev["w_max"] >= 0).all()
    # LinearStep: the slopes carry gamma_ij = |gamma + gamma_dtod xi| (additive spread)
    m = LinearStep(gamma_up=0.5, gamma_up_dtod=0.05)
    dev = m.devices(N, rng(10))
    gamma = -dev["slope_up"] * m.w_max / dev["dw_up"]
    within(gamma.std(), 0.05, 0.05 / math.sqrt(2 * N))
    within(gamma.mean(), 0.5, 0.05 / math.sqrt(N))


@pytest.mark.parametrize("model", [ConstantStep(), SoftBounds(), ExpStep()])
def test_cycle_to_cycle_noise(model):
    m = dataclasses.replace(model, w_max_dtod=0.0, w_min_dtod=0.0)
    dev = m.devices(N, rng(11))
    quiet = pulses(dataclasses.replace(m, dw_min_std=0.0), np.zeros(N), 1, dev, rng())
    w = pulses(m, np.zeros(N), 1, dev, rng(12))
    rel = w / quiet - 1  # the relative deviation of the step: (1 + std xi) - 1
    within(rel.mean(), 0.0, m.dw_min_std / math.sqrt(N))
    within(rel.std(), m.dw_min_std, m.dw_min_std / math.sqrt(2 * N))


# ------------------------------------------------------------------------------------ pulse count, bits
def test_same_seed_same_bits():
    for name, (m, _) in UPDATE_PRESETS.items():
        out = []
        for seed in (5, 5, 6):
            g = stream(seed, m.stream)
            dev = m.devices((30, 20), g)
            w = m.initial(g.uniform(-0.5, 0.5, (30, 20)), dev)
            out.append(m.apply(w, g.normal(0, 5 * m.dw_step, (30, 20)), dev, g))
        np.testing.assert_array_equal(out[0], out[1], err_msg=name)
        assert not np.array_equal(out[0], out[2]), name


def test_kernel_draws_numpys_normals():
    # one pulse per device from 0 on identical devices: w = dw (1 + std xi) with xi the generator's
    # next standard normals, as NumPy draws them
    m = ConstantStep(dw_min_dtod=0.0, up_down_dtod=0.0, w_max_dtod=0.0, w_min_dtod=0.0)
    g1, g2 = rng(13), rng(13)
    w = pulses(m, np.zeros(1000), 1, m.devices(1000, g1), g1)
    m.devices(1000, g2)
    np.testing.assert_allclose(w, m.dw_min * (1 + m.dw_min_std * g2.standard_normal(1000)), rtol=1e-15, atol=0)
    assert g1.standard_normal() == g2.standard_normal()  # both generators advanced alike


def test_pulse_count_rounds_half_up():
    m = ConstantStep().scaled(0)
    dev = m.devices(9, rng())
    asked = np.array([0.0, 0.49, 0.51, 1.49, 1.51, 2.6, -0.51, -1.49, -0.3])
    w = pulses(m, np.zeros(9), asked, dev, rng())
    np.testing.assert_allclose(w / m.dw_min, [0, 0, 1, 1, 2, 3, -1, -1, 0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(UPDATE_PRESETS))
def test_small_delta_does_nothing_and_max_pulses_caps(name):
    m = UPDATE_PRESETS[name][0]
    g = rng(14)
    dev = m.devices(500, g)
    w0 = m.initial(g.uniform(-0.3, 0.3, 500), dev)
    w = w0.copy()
    state = g.bit_generator.state
    m.apply(w, g.choice([-0.499, 0.499], 500) * m.dw_step, dev, g)
    np.testing.assert_array_equal(w, w0)
    g.bit_generator.state = state
    # a change of 1000 steps is capped at max_pulses: same as asking for exactly max_pulses
    q = dataclasses.replace(m.scaled(0), max_pulses=5)
    a = pulses(q, w0.copy(), 1000, dev, g)
    b = pulses(q, w0.copy(), 5, dev, g)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pulses(q, w0.copy(), -7, dev, g), pulses(q, w0.copy(), -5, dev, g))
    assert not np.array_equal(a, pulses(q, w0.copy(), 4, dev, g))


def test_scaled_zero_is_noise_free():
    for cls in UPDATE_MODELS:
        m = cls().scaled(0)
        assert m.hook == "update"
        assert all(getattr(m, f) == 0 for f in cls.scalable)
        a = m.devices(50, rng(1))
        b = m.devices(50, rng(2))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        w = m.initial(np.linspace(-0.5, 0.5, 50), a)
        np.testing.assert_array_equal(pulses(m, w.copy(), 3, a, rng(1)), pulses(m, w.copy(), 3, a, rng(2)))


def test_apply_non_contiguous_and_2d():
    m = SoftBounds()
    g = rng(15)
    dev = m.devices((10, 8), g)
    base = np.zeros((8, 10)).T  # a non-C-contiguous view, updated in place
    out = m.apply(base, np.full((10, 8), 3 * m.dw_min), dev, g)
    assert out is base and (base > 0).all()


def test_presets():
    expected = {"reram_sb", "reram_es", "ecram", "capacitor", "gokmen_vlasov", "idealized", "neurosim_ag_a_si",
                "neurosim_taox_hfox", "neurosim_pcmo", "neurosim_epiram"}
    assert expected <= set(UPDATE_PRESETS)
    for name, (m, cite) in UPDATE_PRESETS.items():
        assert m.hook == "update" and isinstance(cite, str) and len(cite) > 20, name
        assert m.describe().startswith(type(m).__name__)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("make, match", [
    (lambda: ConstantStep(dw_min=-0.001), r"ConstantStep\.dw_min=-0\.001 must be a finite number > 0"),
    (lambda: ConstantStep(dw_min_std=-0.1), r"ConstantStep\.dw_min_std"),
    (lambda: ConstantStep(w_min=0.5, w_max=0.4), r"ConstantStep\.w_min=0\.5 must be < w_max=0\.4"),
    (lambda: ConstantStep(w_min=0.1, w_max=0.4), r"ConstantStep\.w_min=0\.1, w_max=0\.4: \[w_min, w_max\] must contain 0"),
    (lambda: SoftBounds(w_min=0.0), r"SoftBounds\.w_min=0\.0, w_max=0\.6: need w_min < 0 < w_max"),
    (lambda: ConstantStep(up_down=1.5), r"ConstantStep\.up_down=1\.5 must be in \(-1, 1\)"),
    (lambda: ConstantStep(max_pulses=0), r"ConstantStep\.max_pulses=0 must be an integer >= 1"),
    (lambda: SoftBounds(mult_noise=1), r"SoftBounds\.mult_noise=1 must be True or False"),
    (lambda: LinearStep(gamma_up=-0.1), r"LinearStep\.gamma_up=-0\.1 must be a finite number >= 0"),
    (lambda: ExpStep(A_up=float("nan")), r"ExpStep\.A_up=nan must be a number, not NaN"),
    (lambda: ExpStep(a=float("inf")), r"ExpStep\.a=inf must be a finite number"),
    (lambda: NeuroSimNonlinear(states=1), r"NeuroSimNonlinear\.states=1 must be an integer >= 2"),
    (lambda: NeuroSimNonlinear(states=9.5), r"NeuroSimNonlinear\.states=9\.5 must be an integer >= 2"),
    (lambda: NeuroSimNonlinear(nl_up=12), r"NeuroSimNonlinear\.nl_up=12 must be in \[-9, 9\]"),
    (lambda: NeuroSimNonlinear(on_off=1.0), r"NeuroSimNonlinear\.on_off=1\.0 must be > 1"),
    (lambda: NeuroSimNonlinear(c2c=-0.01), r"NeuroSimNonlinear\.c2c=-0\.01 must be a finite number >= 0"),
    (lambda: ConstantStep().scaled(-1), r"ConstantStep\.scaled\(factor\)=-1"),
    (lambda: NeuroSimNonlinear().curve("sideways"), r"direction='sideways'; allowed: 'up', 'down'"),
    (lambda: ConstantStep().devices(-3, rng()), r"ConstantStep\.devices\(shape\)=-3"),
])
def test_bad_parameters(make, match):
    with pytest.raises(Bad, match=match):
        make()


def test_bad_apply_arguments():
    m = ConstantStep()
    dev = m.devices(4, rng())
    with pytest.raises(Bad, match=r"ConstantStep\.apply: w must be a float64 numpy array"):
        m.apply(np.zeros(4, dtype=np.float32), np.zeros(4), dev, rng())
    frozen = np.zeros(4)
    frozen.flags.writeable = False
    with pytest.raises(Bad, match=r"ConstantStep\.apply: w must be writeable"):
        m.apply(frozen, np.zeros(4), dev, rng())
    with pytest.raises(Bad, match=r"ConstantStep\.apply: delta must be finite"):
        m.apply(np.zeros(4), np.array([0, np.nan, 0, 0]), dev, rng())
    with pytest.raises(Bad, match=r"delta must be real and broadcast to w's shape \(4,\)"):
        m.apply(np.zeros(4), np.zeros(3), dev, rng())
    with pytest.raises(Bad, match=r"devices\['w_max'\] has shape \(4,\), expected \(5,\)"):
        m.apply(np.zeros(5), np.zeros(5), {**m.devices(5, rng()), "w_max": np.ones(4)}, rng())
    with pytest.raises(Bad, match=r"missing 'dw_up'"):
        m.apply(np.zeros(4), np.zeros(4), {}, rng())
    with pytest.raises(Bad, match=r"rng must be a numpy\.random\.Generator"):
        m.apply(np.zeros(4), np.zeros(4), dev, np.random.RandomState(0))
    with pytest.raises(Bad, match=r"ConstantStep\.initial: w must be finite"):
        m.initial(np.array([0, np.inf, 0, 0]), dev)
