"""A converged relaxation is a stable equilibrium of the ODE, or it is reported with the eigenvalue
(issue 15): explicit steps damp a slow oscillation numerically and can converge to a fixed point the
ODE leaves. References: the closed-form spectrum of a linear network and dense eigenvalues of
tau^-1 J built from ``adjoint.jacobian``."""

import numpy as np
import pytest
from scipy.linalg import expm

import substrate as S
from substrate import devices as D
from substrate.adjoint import jacobian
from substrate.dynamics import rightmost_eigenvalues

BIAS = np.array([0.3, -0.2])


def spiral(a, tau=1.0):
    """Two linear neurons, W - I = [[a, 2], [-2, a]]: eigenvalues a +- 2i; a > 0 an unstable
    spiral, a = 0 a centre. The fixed point u* = -(W - I)^-1 b; u0 at distance 0.5 from it."""
    A = np.array([[a, 2.0], [-2.0, a]])
    net = S.Network([S.Layer("h", 2, tau=tau, activation="identity", bias=BIAS)],
                    [S.Connection("h", "h", A + np.eye(2))])
    ustar = -np.linalg.solve(A, BIAS)
    return net, A, ustar, (ustar + [0.5, 0.0])[None]


def dense_rightmost(sol):
    """The rightmost eigenvalue of tau^-1 J per sample, from the dense Jacobian."""
    tau = sol.field.network.tau
    ev = np.linalg.eigvals(jacobian(sol.field, sol.u) / tau[None, :, None])
    return ev[np.arange(len(ev)), np.argmax(ev.real, axis=1)]


def test_the_unstable_spiral_leaves_its_fixed_point():
    """The reproducer's premise, in closed form: from distance 0.5 the ODE's state is ~74 away at
    t = 1000 (e^{0.005 t} 0.5), while rk4 with dt = 0.5 converged to u*."""
    net, A, ustar, u0 = spiral(0.005)
    d = expm(1000 * A) @ (u0[0] - ustar)
    assert 70 < np.linalg.norm(d) < 80
    sol = S.relax(net, u0=u0, method="rk4", dt=0.5, max_steps=20_000, on_failure="return")
    assert np.abs(sol.u - ustar).max() < 1e-6  # the residual test passed at u*


@pytest.mark.parametrize("a", [0.005, 0.0])
def test_no_method_reports_success_on_an_unstable_spiral_or_a_centre(a):
    """Every method and step size either fails to converge/diverges, or converges numerically and is
    reported ``unstable`` with the eigenvalue a +- 2i (exact here: n = 2, the Krylov space is the
    whole space; 1e-12 is rounding in a 2x2 Arnoldi)."""
    net, A, ustar, u0 = spiral(a)
    statuses = []
    for method in S.integrators.METHODS:
        for dt in (0.1, 0.5) + ((None,) if method == "dopri5" else ()):
            sol = S.relax(net, u0=u0, method=method, dt=dt, max_steps=20_000, on_failure="return")
            statuses.append(sol.status)
            assert sol.status != "success", (method, dt)
            if sol.status == "unstable":
                assert abs(sol.eigenvalue[0].real - a) < 1e-12 and abs(abs(sol.eigenvalue[0].imag) - 2) < 1e-12
                assert "eigenvalue" in sol.message
    assert "unstable" in statuses  # rk4 and etdrk4 at dt = 0.5 converge numerically
    with pytest.raises(S.ConvergenceError, match=r"unstable .*eigenvalue \S+[+-]2j") as e:
        S.relax(net, u0=u0, method="rk4", dt=0.5, max_steps=20_000)
    assert abs(e.value.solution.eigenvalue[0].real - a) < 1e-12


def test_a_stable_spiral_is_accepted_with_its_eigenvalue():
    """The same circuit with a = -0.05 and tau = 2: a stable spiral, eigenvalues (-0.05 +- 2i)/2."""
    net, A, ustar, u0 = spiral(-0.05, tau=2.0)
    sol = S.relax(net, u0=u0, method="rk4", dt=0.5, tol=1e-9)
    assert sol.ok
    np.testing.assert_allclose(sol.u[0], ustar, atol=1e-8)
    assert abs(sol.eigenvalue[0] - complex(-0.025, np.sign(sol.eigenvalue[0].imag))) < 1e-12


@pytest.mark.parametrize("dtype, rel", [("float64", 1e-10), ("float32", 1e-5)])
def test_eigenvalue_matches_the_dense_spectrum(dtype, rel):
    """A layered network of n = 12 neurons (the Arnoldi space is complete) with a tau per neuron:
    the reported eigenvalue is the dense rightmost one to rounding of the state's precision
    (float32: the Jacobian products in float32, the Krylov basis in float64)."""
    rng = np.random.default_rng(3)
    net = S.Network.layered([12, 8, 4], rng, feedback="tied", dtype=dtype)
    net.layers[0].tau = rng.uniform(0.5, 2.0, 8)
    x = rng.normal(size=(6, 12)).astype(dtype)
    sol = S.relax(net, x, tol=1e-5)
    ref = dense_rightmost(sol)
    assert np.all(ref.real < 0)
    np.testing.assert_allclose(sol.eigenvalue, ref, rtol=rel, atol=rel)


def test_ritz_estimate_beyond_the_arnoldi_space():
    """n = 22 > 12: the eigenvalue is a Ritz estimate, within 0.02 of the dense one here (the
    rightmost of a bulk around -0.4), and the stable equilibria are accepted."""
    rng = np.random.default_rng(3)
    net = S.Network.layered([12, 10, 8, 4], rng, feedback="tied")
    sol = S.relax(net, rng.normal(size=(6, 12)), tol=1e-8)
    assert sol.ok
    np.testing.assert_allclose(sol.eigenvalue, dense_rightmost(sol), atol=0.02)


def test_complex_states_holomorphic_spectrum():
    """Complex states (holomorphic EP): the complex Jacobian's rightmost eigenvalue."""
    rng = np.random.default_rng(4)
    net = S.Network.layered([5, 6, 3], rng, feedback="tied", activation="tanh")
    x = rng.normal(size=(3, 5))
    u0 = 0.1j * rng.normal(size=(3, 9))
    sol = S.relax(net, x, u0=u0, dtype="complex128", tol=1e-10)
    np.testing.assert_allclose(sol.eigenvalue, dense_rightmost(sol), rtol=1e-10, atol=1e-12)


def test_krylov_finds_an_unstable_mode_of_a_large_network():
    """n = 60 > 12: the Arnoldi space is partial. The unstable spiral's block beside 58 leaky neurons
    whose spectrum is a disc of radius ~0.3 around -1: the outlying eigenvalues 0.005 +- 2i are
    resolved (Ritz residual tiny) and reported; the same network with a = -0.5 is accepted."""
    rng = np.random.default_rng(5)
    for a, ok in ((0.005, False), (-0.5, True)):
        W = np.zeros((60, 60))
        W[2:, 2:] = rng.normal(0, 0.3 / np.sqrt(58), (58, 58))
        W[:2, :2] = np.array([[a, 2.0], [-2.0, a]]) + np.eye(2)
        W[2:, :2] = rng.normal(0, 0.1, (58, 2))  # the spiral drives the rest, not the reverse
        net = S.Network([S.Layer("h", 60, activation="identity", bias=rng.normal(size=60))],
                        [S.Connection("h", "h", W)])
        ustar = -np.linalg.solve(W - np.eye(60), net.layers[0].bias)
        sol = S.relax(net, u0=ustar[None], method="rk4", dt=0.5, on_failure="return")
        assert sol.ok is ok
        # Ritz values of outliers converge fast: 1e-6 after 12 products
        assert abs(sol.eigenvalue[0].real - a) < 1e-6 and abs(abs(sol.eigenvalue[0].imag) - 2) < 1e-6


def test_arnoldi_breakdown_keeps_the_spectrum():
    """An operator with an invariant subspace the start vector hits early (a diagonal with repeated
    entries: the Krylov space of a generic vector has dimension 2 only): the fresh directions after
    breakdown keep every Ritz value an eigenvalue, so the rightmost is 0.3, not a spurious 0."""
    d = np.array([-1.0] * 5 + [0.3] * 5)
    theta, residual = rightmost_eigenvalues(lambda v: d[:, None] * v, 10, 2, np.float64)
    np.testing.assert_allclose(theta, 0.3, atol=1e-12)
    assert np.all(residual == 0)


def test_implicit_gradient_refuses_an_unstable_or_singular_fixed_point():
    """rk4 at dt = 0.5 converges to the spiral's and the centre's fixed point: the implicit gradient
    there is refused with the eigenvalue, not returned."""
    loss = lambda u: (float((u ** 2).sum()), 2 * u)  # noqa: E731
    for a in (0.005, 0.0):
        net, _, _, u0 = spiral(a)
        with pytest.raises(S.ConvergenceError, match=r"unstable or singular.*eigenvalue \S+[+-]2j"):
            S.gradient(net, None, loss, method="implicit", integrator="rk4", dt=0.5, u0=u0,
                       max_steps=20_000, tol=1e-6)


def test_nudged_equilibrium_includes_the_nudge_derivative():
    """With a teaching current C(u) the equilibrium is that of F + C and so is its stability: the
    eigenvalue matches the dense Jacobian of F + C by central differences of the whole field (an
    independent path; 1e-6 covers its O(h^2) error), and differs from that of F alone."""
    rng = np.random.default_rng(6)
    net = S.Network.layered([4, 5, 3], rng, activation="tanh", feedback="tied")
    x = rng.normal(size=(2, 4))
    cost = S.nudge.Cost("y", "cross_entropy", rng.normal(size=(2, 3)), rng.normal(size=2))
    nudge = S.nudge.Nudge(cost, 2.0, np.eye(2))
    sol = S.relax(net, x, nudge=nudge, tol=1e-10)
    u, h = sol.u, 1e-5

    def total(v):
        return sol.field(v) + nudge.current(net, v)

    J = np.stack([(total(u + h * e) - total(u - h * e)) / (2 * h) for e in np.eye(net.n)], axis=2)
    ev = np.linalg.eigvals(J / net.tau[None, :, None])
    ref = ev[np.arange(2), np.argmax(ev.real, axis=1)]
    np.testing.assert_allclose(sol.eigenvalue, ref, atol=1e-6)
    assert np.all(np.abs(dense_rightmost(sol) - ref) > 1e-4)  # 100x the tolerance above


def test_device_with_activation_mismatch():
    """Activation mismatch (rho(g (u - o)) per neuron) has no exact Jacobian-vector product in the
    engine: the check differentiates the device's field by central differences; reference: the
    dense central-difference Jacobian of that field (n = 12, complete Arnoldi space)."""
    rng = np.random.default_rng(7)
    net = S.Network.layered([5, 8, 4], rng, feedback="tied")
    hw = D.attach(net, D.Device((D.ActivationMismatch(0.3, 0.2),)), np.random.default_rng(9))
    sol = S.relax(hw, rng.random((3, 5)), tol=1e-10)
    u, h = sol.u, 1e-5
    J = np.stack([(sol.field(u + h * e) - sol.field(u - h * e)) / (2 * h) for e in np.eye(12)], axis=2)
    ev = np.linalg.eigvals(J / hw.tau[None, :, None])
    np.testing.assert_allclose(sol.eigenvalue, ev[np.arange(3), np.argmax(ev.real, axis=1)], atol=1e-6)


def test_a_feed_forward_circuit_has_its_exact_spectrum_without_arnoldi(monkeypatch):
    """No cycle of connections (feedback "none"): tau^-1 J is block triangular, its rightmost eigenvalue
    -1/max(tau) exactly (the dense spectrum's, to rounding, on 30 neurons with a tau per neuron), and the
    Arnoldi check is not run; a lateral connection (a cycle) is checked by Arnoldi again."""
    from substrate import integrators

    calls = []
    monkeypatch.setattr(integrators, "rightmost_eigenvalues", lambda *a, **k: calls.append(1) or
                        rightmost_eigenvalues(*a, **k))
    rng = np.random.default_rng(5)
    net = S.Network.layered([12, 16, 10, 4], rng, feedback="none")
    net.layers[1].tau = rng.uniform(0.5, 3.0, 10)
    sol = S.relax(net, rng.normal(size=(4, 12)), tol=1e-8)
    assert sol.ok and not calls
    np.testing.assert_allclose(sol.eigenvalue, dense_rightmost(sol).real, atol=1e-12)
    assert sol.eigenvalue[0] == -1 / net.layers[1].tau.max()
    net.connections.append(S.Connection("h2", "h2", 0.1 * rng.normal(size=(10, 10)), mask=1 - np.eye(10)))
    lateral = S.Network(net.layers, net.connections, net.inputs)
    assert S.relax(lateral, rng.normal(size=(4, 12)), tol=1e-8).ok and calls


def test_an_unstable_nudged_equilibrium_is_detected():
    """The nudge's part of the check (``Nudge.linearised``, exact) can make it fail: the spiral
    W - I = [[-0.095, 2], [-2, -0.095]] is stable alone, and a squared-error nudge with beta = 0.1 on its
    layer adds 0.1 I to the Jacobian (identity activation), so that the nudged fixed point has the
    eigenvalues 0.005 +- 2i, an unstable spiral. rk4 at dt = 0.5 converges to it numerically and the
    check reports it, with the eigenvalue (n = 2: exact up to rounding, 1e-12)."""
    from substrate.nudge import Cost, Nudge

    net, _, _, u0 = spiral(-0.095)
    alone = S.relax(net, u0=u0, method="rk4", dt=0.5, max_steps=20_000, on_failure="return")
    assert alone.ok and np.all(alone.eigenvalue.real < 0)
    nudge = Nudge(Cost("h"), 0.1, np.array([[0.2, -0.1]]))
    sol = S.relax(net, u0=u0, method="rk4", dt=0.5, max_steps=20_000, nudge=nudge, on_failure="return")
    assert sol.status == "unstable" and "eigenvalue" in sol.message
    assert abs(sol.eigenvalue[0].real - 0.005) < 1e-12 and abs(abs(sol.eigenvalue[0].imag) - 2) < 1e-12
