"""Integrators against closed forms and scipy.integrate.solve_ivp, convergence orders, equilibria,
and the reporting of divergence and non-convergence."""

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.linalg import expm

import substrate as S
from substrate.integrators import METHODS, ExplicitRK

FIXED = [m for m in METHODS if not METHODS[m].adaptive]
ALL = list(METHODS)
# Dormand-Prince's 5th-order weights used as a fixed-step method: its order can then be measured.
DOPRI5_FIXED = ExplicitRK("dopri5_fixed", 5, a=METHODS["dopri5"].a, b=METHODS["dopri5"].b)


def small_network(rng, activation="tanh", n_in=3, sizes=(4, 3), dtype="float64", scale=1.0):
    """Asymmetric layered network with per-neuron tau, a loop and a lateral connection."""
    (h, y) = sizes
    layers = [S.Layer("h", h, tau=rng.uniform(0.5, 2.0, h), activation=activation, bias=rng.normal(size=h)),
              S.Layer("y", y, tau=1.3, activation=activation, bias=rng.normal(size=y))]
    conns = [S.Connection("x", "h", rng.normal(size=(h, n_in))),
             S.Connection("h", "y", scale * rng.normal(size=(y, h))),
             S.Connection("y", "h", scale * rng.normal(size=(h, y))),
             S.Connection("h", "h", scale * rng.normal(size=(h, h)), mask=1 - np.eye(h))]
    net = S.Network(layers, conns, inputs=[S.Input("x", n_in)])
    if dtype != "float64":
        for x in net.layers:
            x.bias = x.bias.astype(dtype)
        for c in net.connections:
            c.weight = c.weight.astype(dtype)
        net = S.Network(net.layers, net.connections, net.inputs)
    return net


def reference(net, x, u0, t_eval, dtype=np.float64):
    """solve_ivp (DOP853, rtol 1e-13) on du/dt = F(u)/tau, complex states split into real parts."""
    vf = S.VectorField(net, x, dtype=dtype)
    tau = net.tau
    shape = u0.shape
    cplx = np.iscomplexobj(u0)

    def f(t, y):
        u = (y[: y.size // 2] + 1j * y[y.size // 2:]) if cplx else y
        du = (vf(u.reshape(shape)) / tau).ravel()
        return np.concatenate([du.real, du.imag]) if cplx else du

    y0 = np.concatenate([u0.real.ravel(), u0.imag.ravel()]) if cplx else u0.ravel()
    sol = solve_ivp(f, (0.0, t_eval[-1]), y0, method="DOP853", t_eval=t_eval, rtol=1e-13, atol=1e-13)
    assert sol.success
    y = sol.y.T
    if cplx:
        y = y[:, : y.shape[1] // 2] + 1j * y[:, y.shape[1] // 2:]
    return y.reshape((len(t_eval),) + shape)


def test_linear_network_matches_matrix_exponential():
    """Identity activation: du/dt = A u + c with A = diag(1/tau)(W - I), so
    u(t) = expm(tA) u0 + A^{-1} (expm(tA) - I) c. Every method at a small step (dopri5 at rtol 1e-11)
    must match it; tolerances are each method's global error at that step, with margin."""
    rng = np.random.default_rng(1)
    net = small_network(rng, activation="identity", scale=0.4)
    x = rng.normal(size=(2, 3))
    u0 = rng.normal(size=(2, net.n))
    vf = S.VectorField(net, x)
    n = net.n
    W = np.zeros((n, n))
    for c in net.connections:
        if c.pre in net.slices:
            W[net.slices[c.post], net.slices[c.pre]] += net.effective_weight(c)
    A = (W - np.eye(n)) / net.tau[:, None]
    c = vf.drive / net.tau[:, None]  # (n, batch)
    t = 2.0
    E = expm(t * A)
    exact = (E @ u0.T + np.linalg.solve(A, (E - np.eye(n)) @ c)).T
    tol = {"euler": 2e-2, "exp_euler": 2e-2, "etd2rk": 1e-4, "rk4": 1e-9, "etdrk4": 1e-9, "dopri5": 1e-9}
    for m in ALL:
        sol = S.integrate(net, x, u0=u0, t_span=(0, t), method=m, dt=1e-3 if m in ("euler", "exp_euler") else 1e-2,
                          rtol=1e-11, atol=1e-12)
        err = np.max(np.abs(sol.u[-1] - exact)) / np.max(np.abs(exact))
        assert err < tol[m], (m, err)


def test_exponential_euler_is_exact_for_a_constant_drive():
    """Without connections N = V x + b is constant: ETD1 is exact at any step,
    u(t) = N + (u0 - N) e^{-t/tau}."""
    rng = np.random.default_rng(2)
    net = S.Network([S.Layer("h", 5, tau=rng.uniform(0.2, 3, 5), activation="tanh", bias=rng.normal(size=5))],
                    [S.Connection("x", "h", rng.normal(size=(5, 2)))], inputs=[S.Input("x", 2)])
    x = rng.normal(size=(3, 2))
    u0 = rng.normal(size=(3, 5))
    sol = S.integrate(net, x, u0=u0, t_span=(0, 7.0), t_eval=[1.0, 7.0], method="exp_euler", dt=2.5)
    N = S.VectorField(net, x).drive.T
    exact = N + (u0 - N) * np.exp(-7.0 / net.tau)
    np.testing.assert_allclose(sol.u[-1], exact, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("method", ALL)
def test_against_solve_ivp(method, dtype):
    """A nonlinear (tanh) asymmetric network with per-neuron tau against DOP853 at rtol 1e-13, saved at
    several points; complex states exercise the holomorphic path."""
    rng = np.random.default_rng(3)
    net = small_network(rng)
    x = rng.normal(size=(2, 3))
    u0 = rng.normal(size=(2, net.n)) * 0.5
    if dtype == np.complex128:
        u0 = u0 + 0.2j * rng.normal(size=u0.shape)
    t_eval = np.array([0.0, 0.37, 1.0, 2.5])
    ref = reference(net, x, u0, t_eval, dtype)
    dt = {"euler": 1e-4, "exp_euler": 1e-4, "etd2rk": 2e-3}.get(method, 1e-2)
    sol = S.integrate(net, x, u0=u0, t_span=(0, 2.5), t_eval=t_eval, method=method, dt=dt,
                      rtol=1e-11, atol=1e-12)
    assert sol.ok and sol.u.dtype == dtype
    # first-order methods at dt=1e-4 have global error ~1e-4 x (solution curvature ~1): 2e-4;
    # ETD2RK at 2e-3: ~1e-6; fourth/fifth order at 1e-2 (or rtol 1e-11): ~1e-9
    tol = {"euler": 2e-4, "exp_euler": 2e-4, "etd2rk": 1e-5}.get(method, 1e-8)
    assert np.max(np.abs(sol.u - ref)) < tol
    np.testing.assert_array_equal(sol.u[0], u0)


def _order(net, x, u0, stepper, dts, T, ref):
    errs = [np.max(np.abs(S.integrate(net, x, u0=u0, t_span=(0, T), method=stepper, dt=h).u[-1] - ref))
            for h in dts]
    return np.polyfit(np.log(dts), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("stepper", FIXED + [DOPRI5_FIXED], ids=lambda s: getattr(s, "name", s))
def test_convergence_order(stepper, dtype):
    """The fitted slope of log(error) against log(dt) is within 0.3 of the method's order. The dt
    range is chosen per order so that the error stays well above rounding (1e-13) and in the
    asymptotic regime."""
    stepper = S.integrators.get_method(stepper)
    rng = np.random.default_rng(4)
    net = small_network(rng, activation="logistic")
    x = rng.normal(size=(2, 3))
    u0 = rng.normal(size=(2, net.n))
    if dtype == np.complex128:
        u0 = u0 + 0.1j * rng.normal(size=u0.shape)  # away from the poles of the complex logistic
    T = 2.0
    ref = reference(net, x, u0, np.array([T]), dtype)[-1]
    dts = {1: [0.04, 0.02, 0.01, 0.005], 2: [0.05, 0.025, 0.0125, 0.00625],
           4: [0.05, 0.025, 0.0125, 0.00625], 5: [0.05, 0.035, 0.025, 0.0175, 0.0125]}[stepper.order]
    slope, errs = _order(net, x, u0, stepper, np.array(dts), T, ref)
    assert abs(slope - stepper.order) < 0.3, (stepper.name, slope, errs)


def test_dopri5_tolerance_controls_error():
    """Adaptive Dormand-Prince: tighter rtol, smaller error, and more steps; errors stay within
    a factor 100 of the requested tolerance (the controller bounds the local, not global, error)."""
    rng = np.random.default_rng(5)
    net = small_network(rng, activation="logistic", scale=2.0)
    x = rng.normal(size=(2, 3))
    u0 = rng.normal(size=(2, net.n))
    ref = reference(net, x, u0, np.array([3.0]))[-1]
    prev_steps = 0
    for rtol in (1e-4, 1e-7, 1e-10):
        sol = S.integrate(net, x, u0=u0, t_span=(0, 3.0), method="dopri5", rtol=rtol, atol=rtol * 1e-2)
        err = np.max(np.abs(sol.u[-1] - ref))
        assert err < 100 * rtol, (rtol, err)
        assert sol.steps > prev_steps
        prev_steps = sol.steps


def test_equilibria_agree_across_integrators():
    """Relaxing with every integrator reaches the same u*: each residual is below tol, and two
    equilibria differ by at most ||J^{-1}|| (tol_1 + tol_2)."""
    rng = np.random.default_rng(6)
    net = S.Network.layered([6, 8, 4], rng, activation="logistic", feedback="independent")
    x = rng.uniform(size=(5, 6))
    tol = 1e-10
    sols = {m: S.relax(net, x, method=m, tol=tol) for m in ALL}
    vf = S.VectorField(net, x)
    for m, s in sols.items():
        assert s.ok and np.all(s.residual <= tol), (m, s.report())
        np.testing.assert_allclose(np.max(np.abs(vf(s.u)), axis=1), s.residual, rtol=1e-12, atol=1e-16)
    ustar = sols["rk4"].u
    # bound the inverse Jacobian per sample: J = -I + W diag(rho')
    eye = np.eye(net.n)
    jinv = max(np.linalg.norm(np.linalg.inv(np.stack([vf.jvp(ustar, np.tile(e, (5, 1)))[b] for e in eye], 1)), np.inf)
               for b in range(5))
    for m, s in sols.items():
        assert np.max(np.abs(s.u - ustar)) <= jinv * 2 * tol * 1.01, m


def test_exponential_euler_keeps_a_fixed_point_at_any_step():
    """At an equilibrium N(u*) = u*, ETD1 gives u+ = e^z u* + (1 - e^z) u* = u*: with a step of 20 tau,
    where explicit Euler is unstable, the state moves only by rounding."""
    rng = np.random.default_rng(7)
    net = S.Network.layered([4, 6, 3], rng, activation="tanh", feedback="tied")
    x = rng.normal(size=(3, 4))
    ustar = S.relax(net, x, method="rk4", tol=1e-14).u
    sol = S.integrate(net, x, u0=ustar, t_span=(0, 2000.0), method="exp_euler", dt=20.0)
    assert np.max(np.abs(sol.u[-1] - ustar)) < 1e-13


def test_relax_stops_at_the_first_state_that_meets_the_tolerance():
    rng = np.random.default_rng(8)
    net = S.Network.layered([4, 6, 3], rng, activation="tanh")
    x = rng.normal(size=(3, 4))
    s = S.relax(net, x, method="euler", dt=0.5, tol=1e-8)
    trace = s.residual_trace
    assert trace[-1] <= 1e-8 < trace[-2] and len(trace) == s.steps + 1
    assert s.nfev == s.steps + 1  # the residual test reuses each step's first evaluation


def test_divergence_is_reported_with_time_and_step():
    """A self-exciting linear neuron blows up like e^{t (w - 1)/tau}: reported, not returned as numbers."""
    net = S.Network([S.Layer("h", 2, activation="identity", bias=np.ones(2))],
                    [S.Connection("h", "h", np.array([[4.0, 0.0], [0.0, 4.0]]))])
    with pytest.raises(S.DivergenceError, match=r"diverged at t=.*step") as info:
        S.integrate(net, t_span=(0, 100.0), t_eval=np.linspace(0, 100, 11), method="rk4", dt=0.1, batch=1)
    sol = info.value.solution
    # |u| ~ e^{3t} reaches 1e10 near t = 7.7
    assert 6.0 < sol.t_final < 9.0 and sol.status == "diverged"
    assert np.all(np.isfinite(sol.u[:1])) and np.all(np.isnan(sol.u[1:]))
    ret = S.integrate(net, t_span=(0, 100.0), method="euler", dt=0.1, batch=1, on_failure="return")
    assert not ret.ok and ret.status == "diverged"
    with pytest.raises(S.DivergenceError):
        S.relax(net, method="exp_euler", batch=1)


def test_synchronous_iteration_fails_where_the_ode_converges():
    """docs/equations.md, section 1: Euler with dt = tau on a stiff, strongly self-inhibiting circuit oscillates
    and blows up, while the ODE itself (adaptive Dormand-Prince) converges; both are reported."""
    net = S.Network([S.Layer("h", 3, activation="tanh", bias=np.array([0.5, -0.2, 0.1]))],
                    [S.Connection("h", "h", -6.0 * np.eye(3))])
    with pytest.raises((S.DivergenceError, S.ConvergenceError)):
        S.relax(net, method="euler", dt=1.0, batch=1, max_steps=2000)
    assert S.relax(net, method="dopri5", batch=1, tol=1e-10).ok


def test_not_converged_is_reported():
    rng = np.random.default_rng(9)
    net = S.Network.layered([4, 6, 3], rng)
    x = rng.normal(size=(2, 4))
    with pytest.raises(S.ConvergenceError, match="not_converged"):
        S.relax(net, x, method="euler", dt=0.1, tol=1e-12, max_steps=10)
    sol = S.relax(net, x, method="euler", dt=0.1, tol=1e-12, max_time=0.5, on_failure="return")
    assert sol.status == "not_converged" and sol.t_final == pytest.approx(0.5) and not sol.converged


def test_float32_follows_float64():
    rng = np.random.default_rng(10)
    net64 = S.Network.layered([5, 7, 3], np.random.default_rng(11), dtype="float64")
    net32 = S.Network.layered([5, 7, 3], np.random.default_rng(11), dtype="float32")
    x = rng.normal(size=(4, 5))
    for m in ALL:
        a = S.integrate(net64, x, t_span=(0, 3), method=m, dt=0.05)
        b = S.integrate(net32, x.astype(np.float32), t_span=(0, 3), method=m, dt=0.05)
        assert b.u.dtype == np.float32
        assert np.max(np.abs(a.u - b.u)) < 1e-5, m


def test_batch_is_independent_samples_and_runs_are_reproducible():
    rng = np.random.default_rng(12)
    net = S.Network.layered([5, 7, 3], rng, feedback="independent", asymmetry_angle=45.0)
    x = rng.normal(size=(4, 5))
    full = S.integrate(net, x, t_span=(0, 2), method="etd2rk", dt=0.1).u
    one = S.integrate(net, x[2:3], t_span=(0, 2), method="etd2rk", dt=0.1).u
    np.testing.assert_allclose(full[:, 2:3], one, rtol=1e-13, atol=1e-14)
    again = S.integrate(net, x, t_span=(0, 2), method="etd2rk", dt=0.1).u
    np.testing.assert_array_equal(full, again)
    same = S.Network.layered([5, 7, 3], np.random.default_rng(13))
    twin = S.Network.layered([5, 7, 3], np.random.default_rng(13))
    for a, b in zip(same.connections, twin.connections):
        np.testing.assert_array_equal(a.weight, b.weight)


def test_time_points_are_hit_exactly_and_layers_are_sliced():
    rng = np.random.default_rng(14)
    net = S.Network.layered([3, 4, 2], rng)
    t_eval = np.array([0.0, 0.05, 0.33, 1.0])
    sol = S.integrate(net, rng.normal(size=(2, 3)), t_span=(0, 1), t_eval=t_eval, method="rk4", dt=0.1)
    assert sol.u.shape == (4, 2, 6)
    assert sol.state("y").shape == (4, 2, 2)
    np.testing.assert_array_equal(sol.state("h1"), sol.u[..., :4])
    ref = S.integrate(net, rng.normal(size=(2, 3)) * 0, t_span=(0, 0.33), method="rk4", dt=0.1)
    assert ref.steps == 4  # 0.1, 0.1, 0.1, then 0.03 to land on t1
