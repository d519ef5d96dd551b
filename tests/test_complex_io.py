"""Complex states through a device's read chain (docs/equations.md, section 6.4): a complex value is read
as its two real quadratures, each through its own converter and with its own noise draw, so that
holomorphic EP runs on ``pcm_inference``. Checked against the real chain applied to the parts, the
ideal estimate at the limit of ideal converters, and the counts (two conversions per complex read)."""

import numpy as np
import pytest

import substrate as S
from models import ep
from substrate import devices as D
from substrate.counts import crossbar_devices

CHAIN = D.Device((D.IOChain(),))  # aihwkit's defaults: 7-bit DAC, output noise 0.06, 9-bit ADC
REL = ep.Relaxation(tol=1e-6, max_steps=2000, on_failure="record")


def _linear(seed=0):
    """A 6-5-4 circuit with identity activations and no biases: the real and imaginary parts of a
    complex state then evolve apart, the imaginary one as a real sample with no input."""
    net = S.Network.layered([6, 5, 4], np.random.default_rng(seed), activation="identity", feedback="tied",
                            init_scale=0.5)
    for layer in net.layers:
        layer.bias[...] = 0.0
    return net


def test_a_complex_state_through_the_chain_is_the_chain_on_its_quadratures():
    """Complex samples (states z, inputs x) equal, bit for bit, the interleaved real batch
    (Re z_0, Im z_0, Re z_1, ...) with inputs (x_0, 0, x_1, 0, ...) on the same device (same seed):
    every DAC, ADC and noise draw of the complex phase is the real chain's on the quadratures, in the
    order of ``_kernels.quadratures`` (the per-step output noise and the input projection's noise
    drawn once per phase)."""
    net = _linear()
    rng = np.random.default_rng(1)
    B = 3
    x = rng.uniform(size=(B, 6))
    z0 = rng.normal(size=(B, net.n)) + 1j * rng.normal(size=(B, net.n))
    xr = np.zeros((2 * B, 6))
    xr[0::2] = x
    ur = z0.view(np.float64).reshape(B, net.n, 2).transpose(0, 2, 1).reshape(2 * B, net.n)  # Re, Im rows
    kw = dict(t_span=(0.0, 2.0), t_eval=[1.0, 2.0], method="euler", dt=0.1)
    c = S.integrate(D.attach(net, CHAIN, np.random.default_rng(5)), x, u0=z0, **kw)
    r = S.integrate(D.attach(net, CHAIN, np.random.default_rng(5)), xr, u0=ur, **kw)
    assert c.u.dtype == np.complex128
    assert np.array_equal(c.u.real, r.u[:, 0::2]) and np.array_equal(c.u.imag, r.u[:, 1::2])
    # the chain acted: without it the states differ (noise 0.06 of the full-scale output)
    ideal = S.integrate(net, x, u0=z0, **kw)
    assert np.max(np.abs(c.u - ideal.u)) > 1e-3


def test_a_complex_read_counts_two_conversions():
    """DAC and ADC of the products per field evaluation, and of the input crossbars once per phase,
    doubled for complex states (the inputs, real, still converted once; the MACs not doubled)."""
    net = _linear()
    hw = D.attach(net, CHAIN, np.random.default_rng(5))
    x = np.random.default_rng(1).uniform(size=(3, 6))
    kw = dict(t_span=(0.0, 1.0), method="euler", dt=0.1)
    real = S.integrate(hw, x, **kw).counts
    cplx = S.integrate(hw, x, u0=np.zeros((3, net.n), complex), **kw).counts
    B, nfev, n, width = 3, 10, net.n, 6
    assert real.nfev == cplx.nfev == nfev
    # by hand: products x->h1 (fed by the input, converted once), h1->y, y->h1 (tied), per evaluation
    pre, post = 5 + 4, 4 + 5
    assert real.dac == (width + pre * nfev) * B and cplx.dac == (width + 2 * pre * nfev) * B
    assert real.adc == (n + post * nfev + 5) * B and cplx.adc == (n + 2 * (post * nfev + 5)) * B
    state, inputs = crossbar_devices(hw)
    assert real.macs == cplx.macs == (state * nfev + inputs) * B


def test_per_step_read_and_state_noise_still_refuse_complex_states():
    net = _linear()
    for dev in ((D.StateNoise(0.01),), (D.ReadNoise(0.01, policy="step"),)):
        hw = D.attach(net, D.Device(dev), np.random.default_rng(0))
        with pytest.raises(S.SubstrateValueError, match="drawn for real states only"):
            S.integrate(hw, np.ones((1, 6)), t_span=(0, 1), method="rk4", dt=0.1, dtype=np.complex128)


@pytest.fixture(scope="module")
def ep_case():
    rng = np.random.default_rng(3)
    net = S.Network.layered([12, 10, 8, 4], rng, feedback="tied")
    x, y = rng.random((5, 12)), np.eye(4)[rng.integers(0, 4, 5)]
    return net, x, y, S.Cost("y")


def _relative_error(net, dev, case, estimator):
    _, x, y, cost = case
    hw = D.attach(net, dev, np.random.default_rng(0))
    e = ep.estimate(hw, x, y, cost, estimator, REL)
    ref = ep.estimate(net, x, y, cost, estimator, REL).gradients.flat()
    return e, float(np.linalg.norm(e.gradients.flat() - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("estimator", [ep.Holomorphic(4, 0.2), ep.RotatingHolomorphic(4, 0.2, duration=10.0)],
                         ids=["holomorphic", "rotating_holomorphic"])
def test_holomorphic_ep_on_converters_approaches_the_ideal_estimate(ep_case, estimator):
    """Fine converters without noise (30-bit DAC, 40-bit ADC: steps ~1e-9 of the bounds, 1e-12 of the
    outputs' range) leave the estimate within 1e-6 of the ideal one (the states move by ~1e-9, divided by
    |beta| = 0.2 in the estimate); aihwkit's 7/9-bit converters move it by more than 1e-3; and the
    ``pcm_inference`` preset (converters, noise, drift, read after 40 tau) runs, its estimate still
    pointing the ideal one's way."""
    net = ep_case[0]
    fine = D.Device((D.IOChain(inp_bits=30, out_bits=40, out_noise=0.0),))
    e, err = _relative_error(net, fine, ep_case, estimator)
    assert e.converged and err < 1e-6
    _, coarse = _relative_error(net, D.Device((D.IOChain(out_noise=0.0),)), ep_case, estimator)
    assert coarse > 1e-3
    e, err = _relative_error(net, D.preset("pcm_inference"), ep_case, estimator)
    assert e.converged and np.all(np.isfinite(e.gradients.flat())) and err < 0.8
