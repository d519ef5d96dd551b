"""Jacobian homeostasis (models.homeostasis): the exact penalty against its closed forms, its gradient
against central finite differences for every connection kind (forward, independent feedback,
lateral, loop, tied, masked), the stochastic estimator's unbiasedness and reproducibility, float32,
and bad input."""

import numpy as np
import pytest

import substrate as S
from models.homeostasis import Homeostasis, dense_weights
from substrate import SubstrateValueError as Bad
from test_nudge import widen  # the float64 copy of a network, the reference for float32

SIZES = [4, 5, 4, 3]  # x -> h1 -> h2 -> y


def asymmetric(rng, dtype="float64"):
    """Independent feedback at 45 degrees, lateral connections (diagonal masked) and a loop y->h1."""
    return S.Network.layered(SIZES, rng, feedback="independent", asymmetry_angle=45.0, lateral=True, loop=True,
                             dtype=dtype)


def reference_w(net):
    """The dense n x n W assembled here from ``effective_weight`` (independent of ``dense_weights``)."""
    W = np.zeros((net.n, net.n))
    for c in net.connections:
        if c.pre in net.slices:
            W[net.slices[c.post], net.slices[c.pre]] += net.effective_weight(c)
    return W


def finite_difference(net, hom, connection, entries, h=1e-3):
    """Central differences of the exact penalty in the raw weight entries of ``connection``. The
    penalty is a quadratic in the weights, so the central difference has no truncation error; only
    rounding, ~1e-16 |L| / h ~ 1e-13 at h = 1e-3."""
    w = net.connection(connection).weight
    out = []
    for i, j in entries:
        w0 = w[i, j]
        w[i, j] = w0 + h
        up = hom.penalty(net)[0]
        w[i, j] = w0 - h
        down = hom.penalty(net)[0]
        w[i, j] = w0
        out.append((up - down) / (2 * h))
    return np.array(out)


def sample_entries(rng, shape, k=4, extra=()):
    """k random (row, column) entries of a weight of ``shape``, plus ``extra`` ones."""
    rows, cols = rng.integers(0, shape[0], k), rng.integers(0, shape[1], k)
    return list(zip(rows.tolist(), cols.tolist())) + list(extra)


def flat(grads):
    return np.concatenate([np.ravel(grads[k]) for k in sorted(grads)])


# ------------------------------------------------------------------------------------ exact value
@pytest.mark.parametrize("normalise", [True, False])
def test_exact_value_closed_forms(normalise):
    """L = 2 ||A||_F^2 (/ n when normalised), A = (W - W^T)/2, and the same number as
    ||J||_F^2 - tr(J^2) with J = W - I. All float64 sums of ~150 O(0.1) squares: 1e-13 relative."""
    rng = np.random.default_rng(0)
    net = asymmetric(rng)
    W = reference_w(net)
    np.testing.assert_array_equal(dense_weights(net), W)
    A = 0.5 * (W - W.T)
    J = W - np.eye(net.n)
    scale = 1.0 / net.n if normalise else 1.0
    value, grads = Homeostasis(strength=3.0, draws=None, normalise=normalise).penalty(net)
    assert isinstance(value, float) and value > 0.1  # strength does not scale the penalty itself
    np.testing.assert_allclose(value, scale * 2 * np.sum(A * A), rtol=1e-13)
    np.testing.assert_allclose(value, scale * (np.sum(J * J) - np.trace(J @ J)), rtol=1e-13)
    # the gradient is 4 A restricted to each connection's block (masked)
    for c in net.connections:
        if c.pre in net.slices:
            block = 4 * scale * A[net.slices[c.post], net.slices[c.pre]]
            expected = block if c.mask is None else block * c.mask
            np.testing.assert_allclose(grads[c.name], expected, rtol=1e-13, atol=1e-16)


def test_normalise_divides_by_n():
    rng = np.random.default_rng(1)
    net = asymmetric(rng)
    v1, g1 = Homeostasis(draws=None).penalty(net)
    v0, g0 = Homeostasis(draws=None, normalise=False).penalty(net)
    np.testing.assert_allclose(v0, net.n * v1, rtol=1e-14)
    np.testing.assert_allclose(flat(g0), net.n * flat(g1), rtol=1e-14, atol=1e-16)


# ------------------------------------------------------------------------------------ exact gradient
@pytest.mark.parametrize("normalise", [True, False])
def test_exact_gradient_finite_differences(normalise):
    """Every independent connection (x->h1, forward, independent feedback, lateral, loop), several
    entries each (the lateral ones include a masked diagonal entry), against central differences.
    Tolerance 1e-10 absolute on O(0.01-0.1) derivatives: the differences are exact up to ~1e-13
    rounding (see ``finite_difference``)."""
    rng = np.random.default_rng(2)
    net = asymmetric(rng)
    hom = Homeostasis(draws=None, normalise=normalise)
    _, grads = hom.penalty(net)
    names = [c.name for c in net.connections if not c.tied]
    assert set(grads) == set(names)
    assert {"x->h1", "h1->h2", "h2->h1", "h2->y", "y->h2", "h1->h1", "h2->h2", "y->h1"} <= set(names)
    for c in net.connections:
        entries = sample_entries(rng, c.weight.shape, extra=[(1, 1)] if c.pre == c.post else ())
        fd = finite_difference(net, hom, c.name, entries)
        got = np.array([grads[c.name][e] for e in entries])
        np.testing.assert_allclose(got, fd, rtol=0, atol=1e-10, err_msg=c.name)
        if c.pre in net.inputs_by_name:
            assert np.all(grads[c.name] == 0)  # inputs are clamped: not part of J
        else:
            assert np.max(np.abs(grads[c.name])) > 1e-3, c.name  # each connection really contributes


def test_tied_network_has_no_penalty():
    """Tied feedback makes W symmetric: the penalty is 0 and every gradient is exactly 0."""
    net = S.Network.layered(SIZES, np.random.default_rng(3), feedback="tied")
    value, grads = Homeostasis(draws=None).penalty(net)
    assert value == 0.0
    assert set(grads) == {"x->h1", "h1->h2", "h2->y"}
    assert all(np.all(g == 0) for g in grads.values())


def test_tied_network_with_lateral_and_loop():
    """With tied feedback, lateral connections and a loop: the tied pairs get zero gradient (a change
    of W moves W^T with it, checked by finite differences too), the lateral and loop connections do
    count, and the value is 2 ||A||^2 / n of those alone."""
    rng = np.random.default_rng(4)
    net = S.Network.layered(SIZES, rng, feedback="tied", lateral=True, loop=True)
    hom = Homeostasis(draws=None)
    value, grads = hom.penalty(net)
    A = np.zeros((net.n, net.n))
    for name in ("h1->h1", "h2->h2", "y->h1"):
        c = net.connection(name)
        A[net.slices[c.post], net.slices[c.pre]] += 0.5 * net.effective_weight(c)
        A[net.slices[c.pre], net.slices[c.post]] -= 0.5 * net.effective_weight(c).T
    np.testing.assert_allclose(value, 2 * np.sum(A * A) / net.n, rtol=1e-13)
    for name in ("h1->h2", "h2->y"):
        assert np.all(grads[name] == 0), name
    for c in net.connections:
        if c.tied:
            continue
        entries = sample_entries(rng, c.weight.shape)
        fd = finite_difference(net, hom, c.name, entries)
        np.testing.assert_allclose([grads[c.name][e] for e in entries], fd, rtol=0, atol=1e-10, err_msg=c.name)
    for name in ("h1->h1", "h2->h2", "y->h1"):
        assert np.max(np.abs(grads[name])) > 1e-3, name


def masked_network(rng):
    """A hand-built network with random 0/1 masks on a forward, an independent feedback and a tied
    connection (whose mask differs from its source's, so W is not symmetric)."""
    def mask(shape):
        return (rng.uniform(size=shape) < 0.6).astype(float)

    layers = [S.Layer("a", 4, bias=rng.normal(size=4)), S.Layer("b", 5, bias=rng.normal(size=5)),
              S.Layer("c", 3, bias=rng.normal(size=3))]
    conns = [S.Connection("x", "a", rng.normal(size=(4, 2))),
             S.Connection("a", "b", rng.normal(size=(5, 4)), mask=mask((5, 4))),
             S.Connection("b", "a", rng.normal(size=(4, 5)), mask=mask((4, 5))),
             S.Connection("b", "c", rng.normal(size=(3, 5)), mask=mask((3, 5))),
             S.Connection("c", "b", tied=True, mask=mask((5, 3))),
             S.Connection("a", "a", rng.normal(size=(4, 4)), mask=1 - np.eye(4))]
    return S.Network(layers, conns, inputs=[S.Input("x", 2)])


def test_masked_gradients():
    """A masked connection's gradient is zero wherever its mask is zero, and every entry (masked or
    not) matches central differences in the raw weight, including the source of a tied connection
    that carries its own mask (its gradient folds both masks). Tolerance as above."""
    rng = np.random.default_rng(5)
    net = masked_network(rng)
    hom = Homeostasis(draws=None)
    value, grads = hom.penalty(net)
    assert value > 0.1
    for c in net.connections:
        if c.tied or c.pre in net.inputs_by_name:
            continue
        g = grads[c.name]
        if c.mask is not None:
            assert np.all(g[c.mask == 0] == 0), c.name
            if c.name != "b->c":  # (b->c: see below)
                assert np.all(np.abs(g[c.mask == 1]) > 0), c.name
        entries = [(i, j) for i in range(g.shape[0]) for j in range(g.shape[1])]
        fd = finite_difference(net, hom, c.name, entries)
        np.testing.assert_allclose(g.ravel(), fd, rtol=0, atol=1e-10, err_msg=c.name)
    # a raw entry w of b->c enters W twice: w M1 (b->c) and w M1 M2^T (tied c->b), so A = w M1 (1 - M2^T)/2
    # on that pair: the gradient is nonzero exactly where b->c's mask is 1 and the tied one's is 0
    m1, m2t = net.connection("b->c").mask, net.connection("c->b").mask.T
    np.testing.assert_array_equal(grads["b->c"] != 0, (m1 == 1) & (m2t == 0))
    assert np.any((m1 == 1) & (m2t == 0)) and np.any((m1 == 1) & (m2t == 1))  # both cases occur


# ------------------------------------------------------------------------------------ stochastic
@pytest.mark.parametrize("draws, calls", [(1, 2000), (500, 200)])
def test_stochastic_estimator_is_unbiased(draws, calls):
    """The mean of M independent calls against the exact value and gradient, entry by entry, within
    5 standard errors, the standard error taken from the spread of the calls (std / sqrt(M)). With
    ~150 entries a 5-sigma bound leaves a false-alarm chance ~1e-4 for a correct estimator; the seed
    is fixed, so the test is deterministic. The standard errors are also checked to be small (value:
    < 1/20 of the exact value; gradient: < 1/10 of its largest entry), so a wrongly scaled estimator
    fails; draws=1 makes a wrong normalisation by the number of draws show (e.g. 1/(D+1) would halve
    it). Entries with zero spread (masked diagonal, the clamped input's weights) must be exactly equal."""
    rng = np.random.default_rng(6)
    net = asymmetric(rng)
    exact_value, exact = Homeostasis(draws=None).penalty(net)
    exact = flat(exact)
    hom = Homeostasis(draws=draws)
    draw_rng = np.random.default_rng(7)
    values, grads = [], []
    for _ in range(calls):
        v, g = hom.penalty(net, draw_rng)
        values.append(v)
        grads.append(flat(g))
    values, grads = np.array(values), np.array(grads)
    m = len(values)
    se_value = values.std(ddof=1) / np.sqrt(m)
    assert se_value > 0 and abs(values.mean() - exact_value) <= 5 * se_value
    assert se_value < exact_value / 20
    se = grads.std(axis=0, ddof=1) / np.sqrt(m)
    spread = se > 0
    z = np.abs(grads.mean(axis=0)[spread] - exact[spread]) / se[spread]
    assert np.max(z) <= 5.0, f"largest z-score {np.max(z):.2f}"
    assert np.max(se) < np.max(np.abs(exact)) / 10
    np.testing.assert_array_equal(grads[:, ~spread], np.broadcast_to(exact[~spread], grads[:, ~spread].shape))
    assert np.sum(~spread) == 5 + 4 + 5 * 4  # h1->h1 and h2->h2 diagonals, x->h1


def test_stochastic_many_draws_in_one_call():
    """One call with 20000 probes: its value and gradient are within 5 standard errors of the exact
    ones, the standard error of one call estimated from 40 independent calls of the same size (a
    t-distribution with 39 degrees of freedom: false-alarm chance ~1e-5 per entry)."""
    rng = np.random.default_rng(8)
    net = asymmetric(rng)
    exact_value, exact = Homeostasis(draws=None).penalty(net)
    exact = flat(exact)
    hom = Homeostasis(draws=20000)
    calls = [hom.penalty(net, np.random.default_rng(100 + k)) for k in range(40)]
    values = np.array([v for v, _ in calls])
    grads = np.array([flat(g) for _, g in calls])
    se_value, se = values.std(ddof=1), grads.std(axis=0, ddof=1)  # of ONE call
    value, g = hom.penalty(net, np.random.default_rng(9))
    g = flat(g)
    assert abs(value - exact_value) <= 5 * se_value
    spread = se > 0
    assert np.max(np.abs(g - exact)[spread] / se[spread]) <= 5.0
    np.testing.assert_array_equal(g[~spread], exact[~spread])


def test_stochastic_reproducible():
    """The same seed gives bit-identical results; another seed different ones; the generator is
    advanced (successive calls differ)."""
    net = asymmetric(np.random.default_rng(10))
    hom = Homeostasis(draws=5)
    v1, g1 = hom.penalty(net, np.random.default_rng(11))
    v2, g2 = hom.penalty(net, np.random.default_rng(11))
    assert v1 == v2 and all(np.array_equal(g1[k], g2[k]) for k in g1)
    v3, g3 = hom.penalty(net, np.random.default_rng(12))
    assert v3 != v1 and not np.array_equal(flat(g3), flat(g1))
    r = np.random.default_rng(11)
    a, b = hom.penalty(net, r), hom.penalty(net, r)
    assert a[0] == v1 and b[0] != a[0]


def test_draws_none_is_exact_and_ignores_rng():
    """draws=None needs no generator and does not consume one; an integer number of draws (also a
    NumPy integer) gives a stochastic estimate, different from the exact value; draws=1 works."""
    net = asymmetric(np.random.default_rng(13))
    exact = Homeostasis(draws=None).penalty(net)
    r = np.random.default_rng(14)
    state = r.bit_generator.state
    with_rng = Homeostasis(draws=None).penalty(net, r)
    assert r.bit_generator.state == state
    assert with_rng[0] == exact[0] and np.array_equal(flat(with_rng[1]), flat(exact[1]))
    for draws in (1, np.int64(3), 5):
        v, g = Homeostasis(draws=draws).penalty(net, np.random.default_rng(15))
        assert np.isfinite(v) and v != exact[0]
        assert set(g) == set(exact[1]) and all(g[k].shape == exact[1][k].shape for k in g)
    assert Homeostasis().draws == 5  # Laborieux & Zenke's default


@pytest.mark.parametrize("draws", [None, 7])
def test_float32_network(draws):
    """A float32 network: exact and stochastic penalties agree with the same network cast exactly to
    float64 (same seed: the float32 probes are the float64 ones rounded). Tolerance 1e-5 relative:
    float32 sums of ~150 products, eps 6e-8. State-connection gradients stay float32."""
    net = asymmetric(np.random.default_rng(16), dtype="float32")
    net64 = widen(net)
    hom = Homeostasis(draws=draws)
    v32, g32 = hom.penalty(net, np.random.default_rng(17))
    v64, g64 = hom.penalty(net64, np.random.default_rng(17))
    assert np.isfinite(v32) and v32 > 0
    np.testing.assert_allclose(v32, v64, rtol=1e-5)
    scale = np.max(np.abs(flat(g64)))
    for k in g64:
        if net.connection(k).pre in net.slices:
            assert g32[k].dtype == np.float32, k
        np.testing.assert_allclose(g32[k], g64[k], rtol=0, atol=1e-5 * scale, err_msg=k)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(strength=-0.1), r"strength=-0.1\) must be a finite number >= 0"),
    (dict(strength=np.nan), r"strength=nan\) must be a finite number >= 0"),
    (dict(strength=np.inf), r"strength=inf\) must be a finite number >= 0"),
    (dict(draws=0), r"draws=0\) must be None \(exact\) or a positive integer"),
    (dict(draws=-3), r"draws=-3\) must be None"),
    (dict(draws=2.5), r"draws=2.5\) must be None"),
    (dict(draws=True), r"draws=True\) must be None"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(Bad, match=match):
        Homeostasis(**kwargs)


def test_zero_strength_is_allowed():
    assert Homeostasis(strength=0.0).strength == 0.0


@pytest.mark.parametrize("rng", [None, 0, np.random.RandomState(0)])
def test_stochastic_needs_a_generator(rng):
    net = asymmetric(np.random.default_rng(18))
    with pytest.raises(Bad, match="stochastic homeostasis estimator needs rng, a numpy.random.Generator"):
        Homeostasis(draws=3).penalty(net, rng)
