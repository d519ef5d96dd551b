"""The continuous adjoint (adjoint ODE backwards with an exponential integrator) converges to the
exact gradient at its order and agrees with torchdiffeq's odeint_adjoint."""

import numpy as np
import pytest

import substrate as S


def setting():
    rng = np.random.default_rng(0)
    layers = [S.Layer("h", 5, tau=rng.uniform(0.5, 2.0, 5), activation="tanh", bias=rng.normal(size=5) * 0.3),
              S.Layer("y", 3, tau=1.5, activation="logistic", bias=rng.normal(size=3) * 0.3)]
    conns = [S.Connection("x", "h", rng.normal(size=(5, 3))),
             S.Connection("h", "y", rng.normal(size=(3, 5))),
             S.Connection("y", "h", rng.normal(size=(5, 3))),
             S.Connection("h", "h", rng.normal(size=(5, 5)) * 0.5, mask=1 - np.eye(5))]
    net = S.Network(layers, conns, inputs=[S.Input("x", 3)])
    x = rng.normal(size=(2, 3))
    u0 = rng.normal(size=(2, net.n)) * 0.3
    target = rng.uniform(size=(2, 3))
    out = net.slices["y"]

    def loss(u):
        d = u[..., out] - target
        g = np.zeros_like(u)
        g[..., out] = d
        return 0.5 * np.sum(d ** 2), g

    return net, x, u0, loss


def relative_error(g, ref):
    return np.max(np.abs(g.flat() - ref.flat())) / np.max(np.abs(ref.flat()))


@pytest.fixture(scope="module")
def exact():
    """The exact gradient of the continuous problem: the discrete adjoint of RK4 at dt = 1e-3
    (its own error ~ dt^4 ~ 1e-12, far below what is tested here)."""
    net, x, u0, loss = setting()
    return S.gradient(net, x, loss, u0=u0, t_span=(0, 3.0), integrator="rk4", dt=1e-3)


@pytest.mark.parametrize("backward, order", [("exp_euler", 1), ("etd2rk", 2)])
def test_order_of_the_backward_integrator(exact, backward, order):
    """Forward and backward on the same grid: the error against the exact gradient falls like dt^order
    (fitted slope within 0.3); forward ETD2RK is second order, so it does not limit the slope."""
    net, x, u0, loss = setting()
    dts = np.array([0.1, 0.05, 0.025, 0.0125])
    errs = [relative_error(S.gradient(net, x, loss, u0=u0, t_span=(0, 3.0), integrator="etd2rk", dt=dt,
                                      method=S.ContinuousAdjoint(backward=backward)), exact) for dt in dts]
    slope = np.polyfit(np.log(dts), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (slope, errs)


def test_substeps_refine_the_backward_pass_only(exact):
    """With a fine forward (RK4, dt = 0.05), refining the backward grid by substeps reduces the
    error of ETD1's backward pass about in proportion (first order)."""
    net, x, u0, loss = setting()
    errs = [relative_error(S.gradient(net, x, loss, u0=u0, t_span=(0, 3.0), integrator="rk4", dt=0.05,
                                      method=S.ContinuousAdjoint(backward="exp_euler", substeps=q)), exact)
            for q in (1, 4)]
    assert 2.5 < errs[0] / errs[1] < 6.0, errs


def test_checkpoints_give_identical_bits():
    net, x, u0, loss = setting()
    runs = [S.gradient(net, x, loss, u0=u0, t_span=(0, 3.0), integrator="etd2rk", dt=0.1,
                       method=S.ContinuousAdjoint(checkpoints=c)).flat() for c in (None, 1, 4)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])


def test_against_torchdiffeq_odeint_adjoint():
    """torchdiffeq's odeint_adjoint (dopri5, rtol 1e-10) solves the same continuous adjoint problem:
    ETD2RK forward and backward at dt = 0.01 agree with it to 1e-4 relative (its error ~ 4 dt^2)."""
    from substrate.torch_backend import TorchDiffEq  # torch is a test dependency

    net, x, u0, loss = setting()
    ref = S.gradient(net, x, loss, u0=u0, t_span=(0, 3.0),
                     method=TorchDiffEq(adjoint=True, method="dopri5", rtol=1e-10, atol=1e-12))
    got = S.gradient(net, x, loss, u0=u0, t_span=(0, 3.0), integrator="etd2rk", dt=0.01,
                     method=S.ContinuousAdjoint(backward="etd2rk"))
    assert relative_error(got, ref) < 1e-4
