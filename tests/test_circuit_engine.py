"""The engine's entry points on a resistive circuit (substrate.circuits.engine): substrate.relax,
integrate and gradient take a Circuit and run the engine's methods on it. References: the circuit's
own Newton solve, scipy's solve_ivp, finite differences of the forward passes."""

import dataclasses

import numpy as np
import pytest
from scipy.integrate import solve_ivp

import substrate
from substrate import circuits as C
from substrate.adjoint import Implicit
from substrate.errors import SubstrateValueError

T = 2.0  # the integration horizon (seconds; C = 1 F, conductances 0.1-1 S: a few time constants)


@pytest.fixture(scope="module")
def setup():
    """A random circuit with diodes (mildly driven: the explicit methods' default step is stable),
    its inputs and its operating point by Newton."""
    rng = np.random.default_rng(1)
    c = C.random_circuit(rng, 10, 2, 2, edges=15, diodes=4, sources=2)
    x = rng.uniform(-0.4, 0.4, (3, 2))
    return c, x, C.dc(c, x, tol=1e-13)


@pytest.fixture(scope="module")
def reference(setup):
    """The state at T by solve_ivp (DOP853 at rtol = atol = 1e-12)."""
    c, x, ref = setup
    f = ref.field
    cap = c.capacitance[f.free]
    sol = solve_ivp(lambda t, y: (f(y.reshape(len(x), -1)) / cap).ravel(), (0, T), np.zeros(f.batch * f.size),
                    method="DOP853", rtol=1e-12, atol=1e-12)
    return sol.y[:, -1].reshape(len(x), -1)


@pytest.mark.parametrize("method", list(substrate.METHODS))
def test_relax_reaches_newtons_operating_point(setup, method):
    c, x, ref = setup
    sol = substrate.relax(c, x, method=method, tol=1e-11)
    assert sol.ok and sol.method == method
    # |J^-1| <= 1/6.2 S^-1 here (its smallest eigenvalue), so a residual of 1e-11 A is < 2e-12 V; 1e-10 with rounding
    assert np.abs(sol.u - ref.u).max() < 1e-10
    np.testing.assert_allclose(sol.v, ref.v, atol=1e-10)
    assert sol.counts.nfev == sol.nfev and sol.counts.macs == len(c.edges) * sol.nfev * len(x)


@pytest.mark.parametrize("method,dt,order", [("euler", 0.01, 1), ("exp_euler", 0.01, 1), ("rk4", 0.1, 4),
                                             ("etd2rk", 0.05, 2), ("etdrk4", 0.1, 4)])
def test_integrate_converges_to_solve_ivp_at_the_methods_order(setup, reference, method, dt, order):
    c, x, _ = setup
    err = [np.abs(substrate.integrate(c, x, t_span=(0, T), method=method, dt=h).u[-1] - reference).max()
           for h in (dt, dt / 2)]
    assert err[1] < 1e-3
    # halving the step divides the error by ~2^order (the observed order within 0.3)
    assert abs(np.log2(err[0] / err[1]) - order) < 0.3


def test_dopri5_lands_on_t_eval_and_matches_solve_ivp(setup, reference):
    c, x, _ = setup
    sol = substrate.integrate(c, x, t_span=(0, T), t_eval=[0.5, 1.0, T], method="dopri5", rtol=1e-10, atol=1e-12)
    assert sol.u.shape == (3, 3, 8) and sol.rejected >= 0
    assert np.abs(sol.u[-1] - reference).max() < 1e-8


def test_nudge_is_a_teach_current(setup):
    c, x, ref = setup
    teach = C.Teach(0.5, np.full((3, 2), 0.1))
    sol = substrate.relax(c, x, method="etd2rk", tol=1e-11, nudge=teach)
    np.testing.assert_allclose(sol.u, C.dc(c, x, teach=teach, tol=1e-13).u, atol=1e-10)
    assert np.abs(sol.u - ref.u).max() > 1e-3  # the nudge moved the operating point


def _perturbed(c, g):
    return dataclasses.replace(c, conductance=g)


def _central(fun, p, h):
    return np.array([(fun(p + h * e) - fun(p - h * e)) / (2 * h) for e in np.eye(len(p))])


@pytest.mark.parametrize("solver", ["direct", "krylov"])
def test_implicit_gradient_matches_finite_differences(setup, solver):
    c, x, _ = setup
    w = np.random.default_rng(3).standard_normal((3, 8))
    g = substrate.gradient(c, x, lambda u: (float(np.sum(w * u)), w), method=Implicit(solver=solver),
                           integrator="exp_euler", tol=1e-12)
    fd = _central(lambda p: np.sum(w * C.dc(_perturbed(c, p), x, tol=1e-14).u), c.conductance, 1e-6)
    # central differences of a solve to 1e-14 A at h = 1e-6 S: truncation ~h^2, rounding ~1e-14/1e-6
    np.testing.assert_allclose(g.weights["conductance"], fd, rtol=0, atol=1e-7 * np.abs(fd).max())
    assert g.adjoint.residual.max() < 1e-9 and g.counts.flops > g.solution.counts.flops
    # the same as the circuit's own implicit gradient (a Newton operating point, the same adjoint)
    free = g.solution.field.free
    own = C.gradient(c, x, lambda v: (float(np.sum(w * v[:, free])), _spread(w, free, c.n)), tol=1e-13)
    np.testing.assert_allclose(g.weights["conductance"], own.weights["conductance"], atol=1e-9 * np.abs(fd).max())


def _spread(w, free, n):
    out = np.zeros((len(w), n))
    out[:, free] = w
    return out


@pytest.mark.parametrize("integrator,dt", [("rk4", 0.1), ("euler", 0.05), ("dopri5", None)])
def test_discrete_gradient_matches_finite_differences(setup, integrator, dt):
    c, x, _ = setup
    rng = np.random.default_rng(4)
    w, u0 = rng.standard_normal((3, 8)), 0.1 * rng.standard_normal((3, 8))

    def L(circuit=c, xs=x, start=u0):
        return np.sum(w * substrate.integrate(circuit, xs, t_span=(0, T), method=integrator, dt=dt, u0=start,
                                              rtol=1e-10, atol=1e-12).u[-1])

    g = substrate.gradient(c, x, lambda u: (float(np.sum(w * u)), w), method="discrete", integrator=integrator,
                           t_span=(0, T), dt=dt, u0=u0, rtol=1e-10, atol=1e-12)
    assert g.loss == pytest.approx(L())
    # the discrete adjoint is the exact derivative of the steps: only the differences' error remains
    # (dopri5's accepted steps are differentiated as fixed; at rtol 1e-10 their sizes move too little to show)
    fd = _central(lambda p: L(circuit=_perturbed(c, p)), c.conductance, 1e-6)
    np.testing.assert_allclose(g.weights["conductance"], fd, atol=1e-7 * np.abs(fd).max())
    fd_u0 = _central(lambda p: L(start=p.reshape(u0.shape)), u0.ravel(), 1e-6).reshape(u0.shape)
    np.testing.assert_allclose(g.u0, fd_u0, atol=1e-7 * np.abs(fd_u0).max())
    fd_x = _central(lambda p: L(xs=p.reshape(x.shape)), x.ravel(), 1e-6).reshape(x.shape)
    np.testing.assert_allclose(g.inputs["x"], fd_x, atol=1e-7 * np.abs(fd_x).max())


def test_refusals(setup):
    c, x, _ = setup
    from substrate.nudge import Nudge

    with pytest.raises(SubstrateValueError, match="Teach"):
        substrate.relax(c, x, nudge=Nudge.__new__(Nudge))
    with pytest.raises(SubstrateValueError, match="almeida_pineda"):
        substrate.gradient(c, x, lambda u: (0.0, np.zeros_like(u)), method=Implicit(solver="almeida_pineda"))
    with pytest.raises(SubstrateValueError, match="float64"):
        substrate.relax(c, x, dtype=np.float32)
    with pytest.raises(SubstrateValueError, match="explicit methods"):
        substrate.gradient(c, x, lambda u: (0.0, np.zeros_like(u)), integrator="etd2rk", t_span=(0, 1), dt=0.1)
    with pytest.raises(SubstrateValueError, match="dt is required"):
        substrate.integrate(c, x, t_span=(0, 1), method="rk4")
