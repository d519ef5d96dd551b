"""Equilibrium propagation (models.ep) against the exact gradient (implicit differentiation), and the
diagnostics of models.metrics (docs/equations.md, section 4).

Tolerances: relaxations run to max|F| <= 1e-13, so a difference quotient with |beta| >= 1e-3 carries
an equilibrium error of about 1e-13/1e-3 = 1e-10 relative, far below the nudge bias the tests
measure; identities between estimators (which share their relaxations bit for bit or up to that
error) are checked to 1e-9."""

import numpy as np
import pytest

import substrate as S
from models import ep
from models import metrics as M
from models.data import digits
from models.homeostasis import Homeostasis
from models.train import SGD, Classifier, train

TIGHT = ep.Relaxation(tol=1e-13, max_steps=200_000)


def problem(feedback="tied", angle=0.0, cost="squared_error", seed=3, activation="logistic"):
    rng = np.random.default_rng(seed)
    net = S.Network.layered([12, 10, 8, 4], rng, activation=activation, feedback=feedback, asymmetry_angle=angle)
    x = rng.random((6, 12))
    labels = rng.integers(0, 4, 6)
    if cost == "squared_error":
        c = S.Cost("y")
    else:
        c = S.Cost("y", "cross_entropy", rng.normal(size=(5, 4)), rng.normal(size=5))
        labels = rng.integers(0, 5, 6)
    y = np.eye(c.width(net))[labels]
    free = ep.free_phase(net, x, TIGHT)
    return net, x, y, c, free


def grads(problem_, estimator):
    net, x, y, c, free = problem_
    return ep.estimate(net, x, y, c, estimator, TIGHT, free=free).gradients


@pytest.fixture(scope="module", params=["squared_error", "cross_entropy"])
def symmetric(request):
    return problem("tied", cost=request.param)


def test_exact_rule_is_the_implicit_gradient(symmetric):
    net, x, y, c, free = symmetric

    def loss(u):
        value, g = ep.cost_gradient_u(net, c, u, y)
        return float(np.mean(value)), g / len(u)

    ref = S.gradient(net, x, loss, method="implicit", tol=1e-13)
    got = grads(symmetric, ep.Exact())
    # both solve J^T lambda = -dl/du at equilibria relaxed to 1e-13: agreement to solver accuracy
    assert M.relative_error(got.flat(), ref.flat()) < 1e-9
    assert got.loss == pytest.approx(ref.loss, rel=1e-12)


def test_centred_and_holomorphic_match_the_exact_gradient_on_a_symmetric_network(symmetric):
    exact = grads(symmetric, ep.Exact())
    for est in (ep.Centred(1e-3), ep.Holomorphic(6, 0.05)):
        cmp = M.compare(grads(symmetric, est), exact)
        assert cmp["cosine"]["all"] >= 0.9999, est
        assert min(cmp["cosine"].values()) >= 0.9999, (est, cmp["cosine"])


def test_the_limit_is_the_exact_gradient_on_a_symmetric_network(symmetric):
    # beta -> 0, computed by a linear solve: no nudge bias at all, and no asymmetry
    assert M.relative_error(grads(symmetric, ep.Limit()).flat(), grads(symmetric, ep.Exact()).flat()) < 1e-9


@pytest.mark.parametrize("make, order", [
    (ep.OneSided, 1), (ep.Negative, 1), (ep.Centred, 2),
    (lambda b: ep.Holomorphic(3, b), 3), (lambda b: ep.Holomorphic(4, b), 4), (lambda b: ep.Holomorphic(6, b), 6)])
def test_bias_shrinks_with_beta_at_the_order_theory_gives(make, order):
    """Relative error against the exact gradient for |beta| = 0.0125 .. 0.1 (inside the radius of
    analyticity; measured: the slope holds to 0.02 there and breaks down beyond |beta| ~ 0.4): the
    log-log slope is 1 one-sided, 2 centred, N holomorphic."""
    prob = problem("tied")
    exact = grads(prob, ep.Exact()).flat()
    betas = np.array([0.0125, 0.025, 0.05, 0.1])
    errors = np.array([M.relative_error(grads(prob, make(b)).flat(), exact) for b in betas])
    slope = np.polyfit(np.log(betas), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.15, (slope, errors)


def test_identities_between_estimators():
    prob = problem("independent", 45.0)
    b = 0.05
    one, neg, cen = (grads(prob, e(b)).flat() for e in (ep.OneSided, ep.Negative, ep.Centred))
    # (r+ - r0)/b and (r- - r0)/(-b) average to (r+ - r-)/(2b), the centred estimate
    np.testing.assert_allclose((one + neg) / 2, cen, rtol=1e-9, atol=1e-12)
    # N = 2 on the circle is the centred estimate; N = 1 the one-sided one
    np.testing.assert_allclose(grads(prob, ep.Holomorphic(2, b)).flat(), cen, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grads(prob, ep.Holomorphic(1, b)).flat(), one, rtol=1e-9, atol=1e-12)


def test_conjugate_folding_equals_the_full_sum_over_the_circle():
    """The estimator relaxes N/2 + 1 points and folds conjugates; the plain trapezoidal sum over all N
    complex points, each relaxed here, must give the same v."""
    net, x, y, c, free = problem("independent", 90.0, activation="dsilu")
    N, b = 5, 0.3
    v = np.zeros_like(free.u, dtype=complex)
    for k in range(N):
        beta = b * np.exp(2j * np.pi * k / N)
        sol = S.relax(net, x, tol=1e-13, u0=free.u, nudge=S.Nudge(c, beta, y), dtype="complex128", max_steps=200_000)
        v += ep.activity(net, sol.u) / (N * beta)
    est = ep.estimate(net, x, y, c, ep.Holomorphic(N, b), TIGHT, free=free)
    assert len(est.nudged) == 3  # k = 0, 1, 2; k = 3, 4 are the conjugates of 2, 1
    assert np.max(np.abs(v.imag)) < 1e-10  # conjugate symmetry of a real circuit
    np.testing.assert_allclose(est.error, v.real, rtol=1e-9, atol=1e-11)


def test_rotating_holomorphic_approaches_the_limit():
    """With each point held long enough (40 tau) the rotating nudge samples nearly the equilibria, and
    averaging over two periods leaves an error set by |beta|^N and the transient."""
    prob = problem("independent", 45.0)
    limit = grads(prob, ep.Limit()).flat()
    rot = grads(prob, ep.RotatingHolomorphic(6, 0.05, duration=40.0, periods=2)).flat()
    assert M.relative_error(rot, limit) < 1e-4
    short = grads(prob, ep.RotatingHolomorphic(6, 0.05, duration=1.0, periods=1)).flat()
    assert M.relative_error(short, limit) > 10 * M.relative_error(rot, limit)  # the no-reset lag shows


@pytest.mark.parametrize("angle", [45.0, 90.0])
def test_asymmetry_bias_does_not_vanish_with_beta_or_points(angle):
    prob = problem("independent", angle)
    exact = grads(prob, ep.Exact()).flat()
    limit = grads(prob, ep.Limit()).flat()
    cos_limit = M.compare(grads(prob, ep.Limit()), grads(prob, ep.Exact()))["cosine"]["all"]  # parameters only
    assert M.cosine(limit, exact) < 0.999 and cos_limit < 0.999  # the beta -> 0 limit itself is biased: J^{-1} J^T delta != delta
    for est in (ep.Centred(1e-3), ep.Holomorphic(4, 0.05), ep.Holomorphic(8, 0.05)):
        g = grads(prob, est).flat()
        assert M.cosine(g, exact) < 0.999
        assert M.relative_error(g, limit) < 1e-4  # all of it is asymmetry: the nudge part is tiny
    decomposition = M.bias_decomposition(prob[0], prob[1], prob[2], prob[3], ep.Centred(1e-3), TIGHT)
    assert decomposition["finite_nudge"]["cosine"]["all"] > 0.99999
    assert decomposition["asymmetry"]["cosine"]["all"] == pytest.approx(cos_limit, abs=1e-9)
    assert decomposition["symmetrised"]["cosine"]["all"] > 0.99999


def test_error_vector_alignment_is_one_when_symmetric_and_less_otherwise():
    net, x, y, c, free = problem("tied")
    v = ep.estimate(net, x, y, c, ep.Centred(1e-3), TIGHT, free=free).error
    lam = ep.estimate(net, x, y, c, ep.Exact(), TIGHT, free=free).error
    assert M.error_alignment(v, lam)["cosine"] > 0.99999
    net, x, y, c, free = problem("independent", 90.0)
    v = ep.estimate(net, x, y, c, ep.Centred(1e-3), TIGHT, free=free).error
    lam = ep.estimate(net, x, y, c, ep.Exact(), TIGHT, free=free).error
    assert M.error_alignment(v, lam)["mean_cosine"] < 0.99


def test_weight_angles_and_jacobian_symmetry():
    rng = np.random.default_rng(0)
    tied = S.Network.layered([5, 8, 6, 3], rng, feedback="tied")
    assert M.weight_angles(tied) == {}  # tied feedback is not an independent pair
    net = S.Network.layered([5, 8, 6, 3], rng, feedback="independent", asymmetry_angle=60.0)
    angles = M.weight_angles(net)
    W, B = net.connection("h1->h2").weight, net.connection("h2->h1").weight
    expected = np.degrees(np.arccos(np.sum(W * B.T) / np.linalg.norm(W) / np.linalg.norm(B)))
    assert angles["h1->h2"] == pytest.approx(expected, abs=1e-9)
    assert 0 < angles["all"] < 90
    u = ep.free_phase(net, rng.random((2, 5))).u
    assert M.jacobian_symmetry(M.symmetrised(net), u) == pytest.approx(1.0, abs=1e-12)
    assert M.jacobian_symmetry(net, u) < 0.99
    assert M.weight_angles(M.symmetrised(net))["all"] == pytest.approx(0.0, abs=1e-6)


def test_float32_network_trains_with_centred_ep():
    net, x, y, c, _ = problem("tied")
    net32 = S.Network.layered([12, 10, 8, 4], np.random.default_rng(3), feedback="tied", dtype="float32")
    rel = ep.Relaxation(tol=1e-5)
    e32 = ep.estimate(net32, x, y, c, ep.Centred(0.05), rel)
    e64 = ep.estimate(net, x, y, c, ep.Exact(), TIGHT)
    assert e32.gradients.weights["h1->h2"].dtype == np.float32
    # float32 equilibria to 1e-5 over beta 0.05: ~1e-4 relative noise, plus the O(beta^2) bias
    assert M.cosine(e32.gradients.flat(), e64.gradients.flat()) > 0.999


def test_relaxation_failures_raise_or_are_recorded():
    net, x, y, c, _ = problem("tied")
    with pytest.raises(S.ConvergenceError, match="free phase"):
        ep.estimate(net, x, y, c, ep.Centred(0.1), ep.Relaxation(tol=1e-12, max_steps=3))
    est = ep.estimate(net, x, y, c, ep.Centred(0.1), ep.Relaxation(tol=1e-12, max_steps=3, on_failure="record"))
    assert not est.converged
    with pytest.raises(S.ConvergenceError, match="nudged phase"):
        ep.estimate(net, x, y, c, ep.Centred(0.1), ep.Relaxation(tol=1e-9, nudged_max_steps=2))


@pytest.mark.parametrize("bad, match", [
    (lambda: ep.Centred(0.0), "beta"), (lambda: ep.Holomorphic(0, 0.1), "points"),
    (lambda: ep.RotatingHolomorphic(4, 0.1, duration=-1), "duration"),
    (lambda: ep.Relaxation(on_failure="ignore"), "on_failure"),
    (lambda: ep.make_estimator("bogus"), "allowed"), (lambda: ep.make_estimator("centred", gamma=1), "centred"),
    (lambda: Homeostasis(strength=-1.0), "strength")])
def test_bad_parameters_are_named(bad, match):
    with pytest.raises(S.SubstrateValueError, match=match):
        bad()


def test_estimate_checks_its_arguments():
    net, x, y, c, free = problem("tied")
    with pytest.raises(S.SubstrateValueError, match="estimator"):
        ep.estimate(net, x, y, c, "centred")
    with pytest.raises(S.SubstrateValueError, match="cost"):
        ep.estimate(net, x, y, "y", ep.Centred())
    with pytest.raises(S.SubstrateValueError, match="target"):
        ep.estimate(net, x, y[:, :2], c, ep.Centred(), free=free)


def test_homeostasis_lowers_the_weight_angle_and_raises_alignment():
    """90-degree asymmetric feedback, centred EP on a digits subset, with and without homeostasis
    (lambda = 1, exact penalty): after 8 epochs the weight angle must be much lower and the gradient
    cosine on the probe higher with it (measured: angle ~90 -> ~30 degrees; cosine up by ~0.1)."""
    data = digits().subset(400, 200, np.random.default_rng(0))
    out = {}
    for strength in (0.0, 1.0):
        rng = np.random.default_rng(1)
        model = Classifier.layered([64, 32, 32, 10], rng, feedback="independent", asymmetry_angle=90.0)
        h = train(model, data, rule=ep.Centred(0.1), optimiser=SGD(0.05, 0.9), epochs=8, batch_size=20,
                  relaxation=ep.Relaxation(tol=1e-6, on_failure="record"),
                  homeostasis=Homeostasis(strength, None) if strength else None, rng=rng, probe=64,
                  progress=False)
        out[strength] = h.arrays()
    assert out[1.0]["weight_angle"][-1] < out[0.0]["weight_angle"][-1] - 30
    assert out[1.0]["grad_cosine"][-1] > out[0.0]["grad_cosine"][-1] + 0.05


@pytest.mark.slow
@pytest.mark.parametrize("rule", [ep.Centred(0.2), ep.Holomorphic(4, 0.3)], ids=["centred", "holomorphic"])
def test_digits_reach_95_percent(rule):
    """The issue's bar: >= 95 % test accuracy on scikit-learn's digits (1438/359 split) with centred
    and holomorphic EP (measured: 96.7 % for both after 30 epochs, 95 % from epoch ~9)."""
    rng = np.random.default_rng(0)
    model = Classifier.layered([64, 128, 10], rng, feedback="tied")
    h = train(model, digits(), rule=rule, optimiser=SGD(0.05, 0.9), epochs=30, batch_size=32,
              relaxation=ep.Relaxation(tol=1e-4, on_failure="record"), rng=rng, probe=0, progress=False)
    assert h.test_accuracy[-1] >= 0.95
