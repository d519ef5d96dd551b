"""The implicit gradient's linear solvers (docs/equations.md, section 3.1): ``Implicit(solver=...)``
with ``"direct"`` (LU), ``"krylov"`` (GMRES) and ``"almeida_pineda"`` (the adjoint dynamics
dlam/ds = J^T lam + dL/du relaxed by Euler steps to its fixed point).

The circuits are ``test_adjoint``'s (five layers, tied and independent feedback, masked laterals,
per-neuron tau) scaled to a contracting equilibrium, plus a one-layer circuit with strong self-inhibition
whose equilibrium is stable (J's eigenvalues near -4) but where the plain iteration (ap_step = 1)
multiplies the residual by ~3 a step.

Tolerances. Every solver stops at a relative residual max|J^T lam - rhs| / max|rhs| <= 1e-12; the
error in lambda is at most cond(J) times that, and J^T of the contracting cases has cond(J) < 100
(its eigenvalues lie in a disc of radius < 0.6 around -1), so two solvers agree within ~1e-10 of
max|lambda| and the gradients (linear in lambda) too: we allow 1e-9. Against central differences of
the relaxed equilibrium, as in test_adjoint (relaxation residual 1e-13, step 1e-5): 1e-6. float32
against float64: the equilibrium itself is float32 (relative rounding ~1e-7 amplified by cond(J)),
the solve stops at 100 eps = 1.2e-5: 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_adjoint import (BATCH, H_IMPLICIT, IMPLICIT_ENTRIES, REL_FD, RELAX_TOL, check, check_against_fd,
                          contracting_case, make_case, rel_error, show)
from test_derivatives import cast_network
from test_ep import TIGHT as EP_TIGHT
from test_ep import problem as ep_problem

from models import ep
from substrate import (ConvergenceError, Connection, Implicit, Input, Layer, Network, SubstrateValueError,
                       VectorField, gradient, relax)
from substrate.adjoint import adjoint_solve, jacobian

SOLVERS = ("direct", "krylov", "almeida_pineda")
AGREE = 1e-9


def implicit(case, loss, solver="almeida_pineda", **kw):
    options = {k: kw.pop(k) for k in ("ap_step", "max_iter", "krylov_tol") if k in kw}
    return gradient(case.net, case.x, loss, method=Implicit(solver=solver, **options), tol=RELAX_TOL, **kw)


# ------------------------------------------------------------------------------------------------ accuracy
def test_almeida_pineda_matches_central_differences():
    case = contracting_case(60)
    loss = case.loss()
    g = implicit(case, loss)
    assert g.adjoint.solver == "almeida_pineda" and np.all(g.adjoint.residual <= 1e-12)
    objective = lambda net, x, u0: loss(relax(net, x, tol=RELAX_TOL).u)[0]  # noqa: E731
    show("almeida_pineda vs central differences",
         check_against_fd(g, objective, case, IMPLICIT_ENTRIES, REL_FD, "almeida_pineda", H_IMPLICIT))


@pytest.mark.parametrize("seed", [61, 62])
def test_the_three_solvers_agree(seed):
    case = contracting_case(seed)
    loss = case.loss()
    got = {s: implicit(case, loss, s) for s in SOLVERS}
    for s in ("krylov", "almeida_pineda"):
        show(f"{s} vs direct", check(got[s].flat(), got["direct"].flat(), AGREE, f"{s} vs direct"))
        np.testing.assert_allclose(got[s].adjoint.lam, got["direct"].adjoint.lam, rtol=0,
                                   atol=AGREE * np.max(np.abs(got["direct"].adjoint.lam)))
    # the iterative solvers report their products and the residual they reached
    assert got["krylov"].adjoint.products > 0 and np.all(got["krylov"].adjoint.residual <= 1e-11)
    assert got["almeida_pineda"].adjoint.products > 1


def test_complex_states_almeida_pineda_matches_direct():
    """Holomorphic states (complex128 on a float64 network): the plain transpose, no conjugation."""
    case = make_case(64, gain=0.25)
    loss = case.loss(complex_=True)
    kw = dict(dtype="complex128", u0=case.u0 + 0.2j)
    direct, ap = (implicit(case, loss, s, **kw) for s in ("direct", "almeida_pineda"))
    assert ap.adjoint.lam.dtype == np.complex128 and np.max(np.abs(ap.adjoint.lam.imag)) > 1e-3
    show("complex almeida_pineda vs direct", check(ap.flat(), direct.flat(), AGREE, "complex AP vs direct"))


def test_float32_almeida_pineda_matches_float64():
    case = make_case(65, gain=0.25)
    net32 = cast_network(case.net, np.float32)
    net64 = cast_network(net32, np.float64)
    x32 = {k: v.astype(np.float32) for k, v in case.x.items()}
    x64 = {k: v.astype(np.float64) for k, v in x32.items()}
    loss = case.loss()
    m = Implicit(solver="almeida_pineda")
    g64 = gradient(net64, x64, loss, method=m, tol=RELAX_TOL)
    g32 = gradient(net32, x32, lambda u: (loss(u)[0], loss(u)[1].astype(np.float32)), method=m)
    assert g32.adjoint.lam.dtype == np.float32
    show("float32 almeida_pineda vs float64", check(g32.flat(), g64.flat(), 1e-4, "float32 AP"))


def test_default_tolerance_follows_the_relaxation():
    """krylov_tol=None stops the solve at max(1e-12, tol / 10) for a relaxation to tol: fewer steps
    than at 1e-12, and no larger error against the exact gradient (equilibrium to 1e-13, LU), which
    the equilibrium's own error of ~tol dominates."""
    case = contracting_case(61)
    loss = case.loss()
    exact = implicit(case, loss, "direct").flat()
    kw = dict(tol=1e-8)
    default = gradient(case.net, case.x, loss, method=Implicit(solver="almeida_pineda"), **kw)
    fine = gradient(case.net, case.x, loss, method=Implicit(solver="almeida_pineda", krylov_tol=1e-12), **kw)
    assert 1e-12 < np.max(default.adjoint.residual) <= 1e-9 and np.max(fine.adjoint.residual) <= 1e-12
    assert default.adjoint.products < fine.adjoint.products
    err_default, err_fine = rel_error(default.flat(), exact), rel_error(fine.flat(), exact)
    print(f"  error against the exact gradient: {err_default:.2e} at the default tolerance "
          f"({default.adjoint.products} steps), {err_fine:.2e} at 1e-12 ({fine.adjoint.products} steps)")
    assert err_fine > 1e-10  # the relaxation's error, which a finer solve does not remove
    assert err_default <= 2 * err_fine


# ------------------------------------------------------------------------------------------------ rate
def spectral_radius(case, u, step):
    """max over samples of the spectral radius of I + step J^T, J dense from the exact products."""
    J = jacobian(VectorField(case.net, case.x), u)
    return max(np.max(np.abs(np.linalg.eigvals(np.eye(case.net.n) + step * Jb.T))) for Jb in J)


@pytest.mark.parametrize("step", [1.0, 0.5])
def test_almeida_pineda_converges_at_the_spectral_radius(step):
    """The residual shrinks per step by the spectral radius rho of I + ap_step J^T (a power iteration
    on the residual): the measured rate within 10% of rho (it averages the last 20 steps, where the
    dominant eigenvector has taken over), and the step count that of a geometric decay at rate rho
    from the first residual to the tolerance, within 25%."""
    case = contracting_case(62)
    loss = case.loss()
    g = implicit(case, loss, ap_step=step)
    rho = spectral_radius(case, g.solution.u, step)
    assert 0.2 < rho < 1
    rate, steps = g.adjoint.rate, g.adjoint.products - 1
    print(f"  ap_step {step}: spectral radius {rho:.4f}, measured rate {rate:.4f}, {steps} steps")
    assert rate == pytest.approx(rho, rel=0.1)
    dl = loss(g.solution.u)[1]  # the default start is lambda = dL/du; its relative residual:
    r0 = np.max(np.abs(VectorField(case.net, case.x).vjp(g.solution.u, dl) + dl)
                / np.max(np.abs(dl), axis=1)[:, None])
    predicted = np.log(1e-12 / r0) / np.log(rho)
    assert steps == pytest.approx(predicted, rel=0.25)


# ------------------------------------------------------------------------------------------------ failure
def inhibited_case(seed=67):
    """One tanh layer with strong self-inhibition W = -3 I + small coupling: J = -I + W diag(rho')
    has eigenvalues near -1 - 3 rho' (stable), but rho'(u*) W^T ~ -3 rho' has spectral radius > 1."""
    rng = np.random.default_rng(seed)
    n = 6
    net = Network([Layer("h", n, tau=1.0, activation="tanh", bias=rng.normal(0, 0.1, n))],
                  [Connection("x", "h", rng.normal(0, 0.3, (n, 3))),
                   Connection("h", "h", -3.0 * np.eye(n) + rng.normal(0, 0.05, (n, n)))],
                  inputs=[Input("x", 3)])
    x = {"x": rng.normal(0, 0.5, (BATCH, 3))}
    target = rng.normal(0, 0.5, (BATCH, n))
    loss = lambda u: (0.5 * float(np.sum((u - target) ** 2)), u - target)  # noqa: E731
    return net, x, loss


def test_almeida_pineda_reports_a_non_contracting_iteration():
    """A stable equilibrium where the plain iteration cannot converge: a ConvergenceError that names
    the shrink factor (the spectral radius, > 1) and the way out, never a wrong number; with
    on_failure="return" a warning and the Krylov solution; with a small ap_step it converges."""
    net, x, loss = inhibited_case()
    kw = dict(integrator="rk4", tol=RELAX_TOL)
    direct = gradient(net, x, loss, method="implicit", **kw)
    u = direct.solution.u
    J = jacobian(VectorField(net, x), u)
    assert max(np.max(np.linalg.eigvals(Jb).real) for Jb in J) < -2  # a stable equilibrium
    rho = max(np.max(np.abs(np.linalg.eigvals(np.eye(net.n) + Jb.T))) for Jb in J)
    assert rho > 2
    with pytest.raises(ConvergenceError, match=r"Almeida-Pineda iteration diverged .*shrink factor a step "
                                               r"(\d+\.\d+).*spectral radius of I \+ ap_step J\^T") as err:
        gradient(net, x, loss, method=Implicit(solver="almeida_pineda"), **kw)
    factor = float(err.value.args[0].split("shrink factor a step ")[1].split(")")[0])
    assert factor == pytest.approx(rho, rel=0.1)
    with pytest.warns(RuntimeWarning, match="Almeida-Pineda iteration diverged.*solved by Krylov"):
        fallback = gradient(net, x, loss, method=Implicit(solver="almeida_pineda"), on_failure="return", **kw)
    assert fallback.adjoint.solver == "krylov"
    check(fallback.flat(), direct.flat(), AGREE, "fallback vs direct")
    # I + 0.25 J^T has eigenvalues near 1 - 0.25 (1 + 3 rho') ~ 0: a fast contraction
    damped = gradient(net, x, loss, method=Implicit(solver="almeida_pineda", ap_step=0.25), **kw)
    assert damped.adjoint.rate < 0.5
    show("almeida_pineda ap_step=0.25 vs direct", check(damped.flat(), direct.flat(), AGREE, "damped AP"))


def test_almeida_pineda_max_iter():
    case = contracting_case(61)
    with pytest.raises(ConvergenceError, match=r"did not converge within max_iter=3 steps"):
        implicit(case, case.loss(), max_iter=3)


# ------------------------------------------------------------------------------------------------ warm start
@pytest.mark.parametrize("solver", ["krylov", "almeida_pineda"])
def test_warm_start_from_the_previous_adjoint(solver):
    """The previous call's lambda as adjoint0: after a small change of the weights (a training step)
    fewer products for the same answer; from the exact lambda, one product (the residual check)."""
    case = contracting_case(61)
    loss = case.loss()
    first = implicit(case, loss, solver)
    again = implicit(case, loss, solver, adjoint0=first.adjoint.lam)
    assert again.adjoint.products <= 2 and np.array_equal(again.solution.u, first.solution.u)
    check(again.flat(), first.flat(), 1e-11, "warm start at the solution")
    c = case.net.connection("h2->h3")
    c.weight = c.weight * 1.001
    cold = implicit(case, loss, solver)
    warm = implicit(case, loss, solver, adjoint0=first.adjoint.lam)
    print(f"  {solver}: {cold.adjoint.products} products cold, {warm.adjoint.products} warm")
    assert warm.adjoint.products < cold.adjoint.products
    check(warm.flat(), cold.flat(), AGREE, f"{solver} warm vs cold")


def test_adjoint_solve_on_rhs_zero_is_zero():
    case = contracting_case(61)
    u = relax(case.net, case.x, tol=RELAX_TOL).u
    vf = VectorField(case.net, case.x)
    rhs = np.zeros_like(u)
    rhs[1] = 1.0  # sample 0 has rhs 0: lambda 0 exactly, whatever the start
    for s in SOLVERS:
        adj = adjoint_solve(vf, u, rhs, Implicit(solver=s), lam0=np.ones_like(u))
        assert np.all(adj.lam[0] == 0) and adj.residual[0] == 0 and adj.residual[1] <= 1e-11, s


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("kw,message", [
    (dict(solver="ap"), r"Implicit\(solver='ap'\); allowed: 'direct', 'krylov', 'almeida_pineda'"),
    (dict(ap_step=0.0), r"Implicit\(ap_step=0.0\) must be in \(0, 1\]"),
    (dict(ap_step=1.5), r"Implicit\(ap_step=1.5\) must be in \(0, 1\]"),
    (dict(ap_step=float("nan")), r"Implicit\(ap_step=nan\) must be in \(0, 1\]"),
    (dict(ap_step="1"), r"Implicit\(ap_step='1'\) must be in \(0, 1\]"),
    (dict(max_iter=0), r"Implicit\(max_iter\)=0 must be a positive integer"),
    (dict(krylov_tol=-1.0), r"Implicit\(krylov_tol\)=-1.0 must be a positive finite number"),
])
def test_bad_options_are_named(kw, message):
    with pytest.raises(SubstrateValueError, match=message):
        Implicit(**kw)


def test_bad_adjoint0_is_named():
    case = contracting_case(61)
    loss = case.loss()
    with pytest.raises(SubstrateValueError, match=r"adjoint0 has shape \(3,\), expected \(batch, n\)"):
        implicit(case, loss, adjoint0=np.zeros(3))
    with pytest.raises(SubstrateValueError, match="adjoint0 contains NaN"):
        implicit(case, loss, "krylov", adjoint0=np.full((BATCH, case.net.n), np.nan))
    with pytest.raises(SubstrateValueError, match="method='discrete' does not take one"):
        gradient(case.net, case.x, loss, t_span=(0.0, 1.0), adjoint0=np.zeros((BATCH, case.net.n)))


def test_ep_exact_passes_the_solver_through():
    """models.ep's exact estimator with the Almeida-Pineda solver: the direct one's error vector."""
    net, x, y, c, free = ep_problem("independent", 45.0)
    got = {s: ep.estimate(net, x, y, c, ep.Exact(solver=s), EP_TIGHT, free=free).error
           for s in ("direct", "almeida_pineda")}
    check(got["almeida_pineda"], got["direct"], AGREE, "ep.Exact almeida_pineda vs direct")
