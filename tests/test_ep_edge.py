"""Edge cases of equilibrium propagation (issue 15): a nudge too small for the tolerance or for the
state's rounding, targets of the wrong shape for every estimator, counts that would hang, and the
arguments of ``train``. Every case gives the right gradient or a SubstrateValueError naming the
argument and what is allowed.

Tolerances: with ``Relaxation(tol=1e-8)`` and |beta| = 1e-9 the nudged phases stop at a residual
nudged_rtol |beta| max|dl/dr| (nudged_rtol = 1e-3), so v carries a relative error about nudged_rtol
times the conditioning of J (measured, squared error and cross-entropy: 6e-5 .. 5.1e-3, the
one-sided ones largest; rotating 1e-6); the nudge bias O(|beta|) is 1e-9. Hence 1e-2 against the
exact gradient; before the fix these estimates were exactly 0 (error 1.0)."""

import re

import numpy as np
import pytest

import substrate as S
from models import ep
from models import metrics as M
from models.data import digits
from models.homeostasis import Homeostasis
from models.train import SGD, Classifier, train

LOOSE = ep.Relaxation(tol=1e-8, max_steps=200_000)


def symmetric(cost):
    """A symmetric network (EP's limit is the exact gradient) relaxed to tol = 1e-8."""
    rng = np.random.default_rng(3)
    net = S.Network.layered([12, 10, 8, 4], rng, activation="logistic", feedback="tied")
    x = rng.random((6, 12))
    if cost == "squared_error":
        c = S.Cost("y")
    else:
        c = S.Cost("y", "cross_entropy", rng.normal(size=(5, 4)), rng.normal(size=5))
    y = np.eye(c.width(net))[rng.integers(0, c.width(net), 6)]
    free = ep.free_phase(net, x, LOOSE)
    exact = ep.estimate(net, x, y, c, ep.Exact(), LOOSE, free=free).gradients.flat()
    return net, x, y, c, free, exact


@pytest.fixture(scope="module")
def sym():
    return symmetric("squared_error")


@pytest.fixture(scope="module", params=["squared_error", "cross_entropy"])
def both(request):
    return symmetric(request.param)


ALL_NUDGED = [ep.OneSided, ep.Negative, ep.Centred, lambda b: ep.Holomorphic(1, b),
              lambda b: ep.Holomorphic(4, b), lambda b: ep.RotatingHolomorphic(4, b, duration=40.0)]
IDS = ["one_sided", "negative", "centred", "holomorphic1", "holomorphic4", "rotating"]


@pytest.mark.parametrize("make", ALL_NUDGED, ids=IDS)
def test_a_nudge_below_the_tolerance_still_gives_the_gradient(both, make):
    net, x, y, c, free, exact = both
    est = ep.estimate(net, x, y, c, make(1e-9), LOOSE, free=free)
    assert est.converged
    assert all(s.steps > 0 for s in est.nudged)  # they used to stop at step 0 (|beta dl/dr| < tol)
    assert M.relative_error(est.gradients.flat(), exact) < 1e-2


@pytest.mark.parametrize("make", ALL_NUDGED, ids=IDS)
def test_a_nudge_below_rounding_is_refused_with_the_smallest_beta_allowed(both, make):
    net, x, y, c, free, exact = both
    with pytest.raises(S.SubstrateValueError, match=r"\|beta\|=1e-300 .* float64 rounding") as info:
        ep.estimate(net, x, y, c, make(1e-300), LOOSE, free=free)
    smallest = float(re.search(r"smallest \|beta\| allowed here is (\S+)$", str(info.value)).group(1))
    assert 1e-14 < smallest < 1e-10
    with pytest.raises(S.SubstrateValueError, match="smallest"):
        ep.estimate(net, x, y, c, make(0.5 * smallest), LOOSE, free=free)
    # at the smallest beta the response is resolved to the rounding floor: about 1 % by construction
    est = ep.estimate(net, x, y, c, make(1.1 * smallest), LOOSE, free=free)
    assert est.converged and M.relative_error(est.gradients.flat(), exact) < 5e-2


def test_float32_refuses_at_its_own_rounding(sym):
    net, x, y, c, _, _ = sym
    net32 = S.Network.layered([12, 10, 8, 4], np.random.default_rng(3), activation="logistic", feedback="tied",
                              dtype="float32")
    rel = ep.Relaxation(tol=1e-5)
    with pytest.raises(S.SubstrateValueError, match=r"float32 rounding .* smallest \|beta\| allowed here is"):
        ep.estimate(net32, x.astype("float32"), y, c, ep.Centred(1e-6), rel)
    assert ep.estimate(net32, x.astype("float32"), y, c, ep.Centred(0.1), rel).converged


def test_nudged_rtol_sets_the_accuracy_of_a_tiny_nudge(sym):
    net, x, y, c, free, exact = sym
    err = {r: M.relative_error(ep.estimate(net, x, y, c, ep.Centred(1e-7), ep.Relaxation(tol=1e-8, nudged_rtol=r),
                                           free=free).gradients.flat(), exact) for r in (1e-1, 1e-4)}
    assert err[1e-4] < 1e-3 < err[1e-1] / 10  # measured: ~2e-4 and ~0.16


@pytest.mark.parametrize("r", [0.0, -1e-3, 2.0, np.nan, "tight", True])
def test_bad_nudged_rtol_is_named(r):
    with pytest.raises(S.SubstrateValueError, match=r"nudged_rtol=.* must be a number in \(0, 1\]"):
        ep.Relaxation(nudged_rtol=r)


@pytest.mark.parametrize("kwargs, match", [
    (dict(nudged_max_steps=0), r"Relaxation\(nudged_max_steps\)=0 must be a positive integer"),
    (dict(max_steps=-5), r"Relaxation\(max_steps\)=-5 must be a positive integer"),
    (dict(max_steps=1e4), r"Relaxation\(max_steps\)=10000.0 must be a positive integer")])
def test_bad_step_budgets_are_named(kwargs, match):
    with pytest.raises(S.SubstrateValueError, match=match):
        ep.Relaxation(**kwargs)


def test_targets_already_met_give_an_exact_zero(sym):
    # dl/dr = 0 at the free equilibrium: u*(beta) = u*(0) for every beta, so v = 0 with no relaxation
    net, x, _, c, free, _ = sym
    y = ep.activity(net, free.u)[:, net.slices["y"]]
    est = ep.estimate(net, x, y, c, ep.Centred(1e-9), LOOSE, free=free)
    assert est.converged and np.all(est.gradients.flat() == 0)


def test_rotating_with_one_point_is_one_sided_ep(sym):
    # a constant nudge held 40 tau: the equilibrium r*(beta), so (r - r*(0)) / beta; it used to be r / beta
    net, x, y, c, free, exact = sym
    rot = ep.estimate(net, x, y, c, ep.RotatingHolomorphic(1, 0.05, duration=40.0), LOOSE, free=free)
    one = ep.estimate(net, x, y, c, ep.OneSided(0.05), LOOSE, free=free)
    assert M.relative_error(rot.gradients.flat(), one.gradients.flat()) < 1e-4


@pytest.mark.parametrize("estimator", [ep.Exact(), ep.Limit(), ep.Centred(0.1), ep.Holomorphic(4, 0.1)],
                         ids=["exact", "limit", "centred", "holomorphic"])
@pytest.mark.parametrize("y, match", [
    (np.arange(4), r"target has shape \(4,\), expected \(batch, 4\) = \(4, 4\)"),  # labels, batch = classes
    (np.full((4, 4), np.nan), "target contains NaN or Inf"),
    (np.zeros((4, 3)), r"target has shape \(4, 3\), expected \(batch, 4\)"),
    (np.zeros((3, 4)), r"target has shape \(3, 4\), expected \(batch, 4\) = \(4, 4\)"),
    ([["a"] * 4] * 4, r"y \(the targets\) must be a real array \(batch, width\), got list"),
    (np.ones((4, 4), complex), "must be a real array .* got complex128")])
def test_every_estimator_checks_the_targets(sym, estimator, y, match):
    net, x, _, c, _, _ = sym
    with pytest.raises(S.SubstrateValueError, match=match):
        ep.estimate(net, x[:4], y, c, estimator, LOOSE)


def test_targets_are_checked_against_a_given_free_phase(sym):
    net, x, y, c, free, _ = sym
    with pytest.raises(S.SubstrateValueError, match=r"expected \(batch, 4\) = \(6, 4\)"):
        ep.estimate(net, x, y[:4], c, ep.Exact(), LOOSE, free=free)


@pytest.mark.parametrize("make, match", [
    (lambda: ep.Holomorphic(10**9), r"Holomorphic\(points\)=1000000000 must be at most 256: the trapezoidal"),
    (lambda: ep.RotatingHolomorphic(10**9), r"RotatingHolomorphic\(points\)=1000000000 must be at most 256"),
    (lambda: ep.RotatingHolomorphic(4, periods=10**9), r"periods\)=1000000000 must be at most 2500000"),
    (lambda: ep.Holomorphic(2.5), r"points\)=2.5 must be a positive integer"),
    (lambda: Homeostasis(strength="big"), r"strength='big'\) must be a finite number >= 0")])
def test_counts_that_would_hang_are_refused(make, match):
    with pytest.raises(S.SubstrateValueError, match=match):
        make()


def test_homeostasis_refuses_probes_beyond_its_memory_cap(sym):
    net = sym[0]  # 22 neurons: at most 25e6 // 22 = 1136363 draws
    with pytest.raises(S.SubstrateValueError, match=r"draws=1000000000\) on 22 neurons .* at most 1136363 draws"):
        Homeostasis(draws=10**9).penalty(net, np.random.default_rng(0))
    assert np.isfinite(Homeostasis(draws=1000).penalty(net, np.random.default_rng(0))[0])


def test_a_rotation_longer_than_the_step_cap_is_refused_before_it_runs(sym):
    net, x, y, c, free, _ = sym
    with pytest.raises(S.SubstrateValueError, match=r"points x periods x duration/dt = 4e\+12 steps .* cap of 1e\+07"):
        ep.estimate(net, x, y, c, ep.RotatingHolomorphic(4, 0.1, duration=1e12), LOOSE, free=free)


@pytest.fixture(scope="module")
def small():
    data = digits().subset(20, 10, np.random.default_rng(0))
    return Classifier.layered([64, 8, 10], np.random.default_rng(1)), data


@pytest.mark.parametrize("kwargs, match", [
    (dict(probe=-1), "probe=-1 must be a non-negative integer"),
    (dict(probe=1.5), "probe=1.5 must be a non-negative integer"),
    (dict(probe=True), "probe=True must be a non-negative integer"),
    (dict(epochs=-1), "epochs=-1 must be a non-negative integer"),
    (dict(rule="centred"), "rule must be a models.train.Rule or an ep.Estimator, got str"),
    (dict(relaxation=1e-6), "relaxation must be an ep.Relaxation, got float"),
    (dict(optimiser="sgd"), r"optimiser must be None or an Optimiser \(SGD, Adam\), got str"),
    (dict(homeostasis=1.0), "homeostasis must be None or a Homeostasis, got float"),
    (dict(on_epoch=3), "on_epoch must be None or a callable"),
    (dict(rng=0), "train needs rng, a numpy.random.Generator"),
])
def test_train_names_a_bad_argument(small, kwargs, match):
    model, data = small
    args = dict(rng=np.random.default_rng(0), epochs=1, progress=False)
    args.update(kwargs)
    with pytest.raises(S.SubstrateValueError, match=match):
        train(model, data, **args)


def test_train_refuses_an_empty_split_and_evaluate_a_zero_batch(small):
    model, data = small
    with pytest.raises(S.SubstrateValueError, match="data has 0 training and 10 test samples; both must be >= 1"):
        train(model, data.subset(0, None), rng=np.random.default_rng(0), progress=False)
    with pytest.raises(S.SubstrateValueError, match="batch=0 must be an integer >= 1"):
        model.evaluate(data.x_test, data.y_test, ep.Relaxation(), batch=0)
    with pytest.raises(S.SubstrateValueError, match="x has 10 samples and labels 9"):
        model.evaluate(data.x_test, data.y_test[:9], ep.Relaxation())
    with pytest.raises(S.SubstrateValueError, match="lr=0 must be a positive"):
        SGD(0)


ARRAY = np.ones(2)


@pytest.mark.parametrize("make, match", [
    (lambda: ep.Centred(None), r"Centred\(beta\)=None must be a positive finite number"),
    (lambda: ep.OneSided("x"), r"OneSided\(beta\)='x' must be a positive finite number"),
    (lambda: ep.Negative("0.1"), r"Negative\(beta\)='0.1' must be"),  # a string float() would have parsed
    (lambda: ep.Centred(True), r"Centred\(beta\)=True must be"),
    (lambda: ep.Holomorphic(4, ARRAY), r"Holomorphic\(beta\)=array\(\[1., 1.\]\) must be"),
    (lambda: ep.RotatingHolomorphic(4, 1j), r"RotatingHolomorphic\(beta\)=1j must be"),
    (lambda: ep.RotatingHolomorphic(4, 0.1, duration=None), r"RotatingHolomorphic\(duration\)=None must be a pos"),
    (lambda: ep.Relaxation(on_failure=ARRAY), r"Relaxation\(on_failure\)=array.*; allowed: 'raise', 'record'"),
    (lambda: ep.Relaxation(on_failure=[]), r"Relaxation\(on_failure\)=\[\]; allowed: 'raise', 'record'"),
    (lambda: ep.Exact(solver=ARRAY), r"Exact\(solver=array.*\); allowed: 'direct', 'krylov'"),
    (lambda: ep.Exact(solver="lu"), r"Exact\(solver='lu'\); allowed: 'direct', 'krylov'"),
    (lambda: S.Implicit(solver=ARRAY), r"Implicit\(solver=array.*\); allowed: 'direct', 'krylov'"),
    (lambda: ep.make_estimator("x"), r"make_estimator\(name\)='x'; allowed: 'one_sided', .*'exact'"),
    (lambda: ep.make_estimator([]), r"make_estimator\(name\)=\[\]; allowed: 'one_sided'"),  # was: unhashable
    (lambda: ep.make_estimator(ARRAY), r"make_estimator\(name\)=array")])
def test_bad_estimator_and_relaxation_parameters_are_named(make, match):
    with pytest.raises(S.SubstrateValueError, match=match):
        make()


@pytest.mark.parametrize("y, match", [
    (None, r"y \(the targets\) must be a real array \(batch, width\), got NoneType"),  # was: shape () of NaN
    ("x", r"y \(the targets\) must be a real array \(batch, width\), got str"),
    ("1", r"y \(the targets\) must be a real array \(batch, width\), got str"),  # float('1') parsed it
    ([[0.0, 1.0], [1.0]], r"y \(the targets\) must be a real array \(batch, width\), got list"),  # ragged
    (0.5, r"y \(the targets\): nudge target has shape \(\), expected \(batch, 4\) = \(6, 4\)")])
def test_targets_that_are_not_an_array_are_named(sym, y, match):
    net, x, _, c, free, _ = sym
    with pytest.raises(S.SubstrateValueError, match=match):
        ep.estimate(net, x, y, c, ep.Exact(), LOOSE, free=free)


def test_integer_and_boolean_targets_are_taken_as_numbers(sym):
    # one-hot targets as ints or bools are the same targets as floats: the same gradient, bit for bit
    net, x, y, c, free, exact = sym
    for t in (y.astype(int), y.astype(bool)):
        assert np.array_equal(ep.estimate(net, x, t, c, ep.Exact(), LOOSE, free=free).gradients.flat(), exact)


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=10**30), r"epochs=10{30} must be at most 100000: each epoch relaxes every training and test"),
    (dict(epochs=100_001), r"epochs=100001 must be at most 100000"),
    (dict(epochs=2.0), r"epochs=2.0 must be a non-negative integer"),
    (dict(batch_size=0), r"batch_size=0 must be a positive integer"),
    (dict(batch_size=None), r"batch_size=None must be a positive integer")])
def test_train_refuses_counts_that_would_hang_before_the_first_epoch(small, kwargs, match):
    model, data = small
    before = {k: v.copy() for k, v in model.parameters().items()}
    args = dict(rng=np.random.default_rng(0), progress=False)
    args.update(kwargs)
    with pytest.raises(S.SubstrateValueError, match=match):
        train(model, data, **args)
    assert all(np.array_equal(before[k], v) for k, v in model.parameters().items())  # refused up front
