"""The exact-gradient training rules (models.adjoint_rules) against independent references: central
finite differences of the batch-mean loss after the same settling (the equilibrium, the relaxation's
own steps, the last K of them, or the ODE solved to 1e-11), on a tiny asymmetric network with a
cross-entropy readout; their registration, bad parameters, and one epoch of train() with each."""

import numpy as np
import pytest

import substrate as S
from models import ep
from models.adjoint_rules import ADJOINT_RULES, ImplicitRule, TruncatedAdjointRule
from models.data import digits
from models.train import RULES, Adam, Classifier, EPRule, make_rule, train
from substrate import SubstrateValueError as Bad

DT, WINDOW = 0.5, 5
REL = ep.Relaxation(tol=1e-12, max_steps=100_000, dt=DT)


def _flat(d):
    return np.concatenate([np.ravel(d[k]) for k in sorted(d)])


@pytest.fixture(scope="module")
def case():
    """A 3-5-4 circuit (feedback at 60 degrees from W^T, so the gradient is not EP's), readout to 3
    classes, 4 samples; and the finite-difference gradients of its loss after each settling."""
    rng = np.random.default_rng(0)
    m = Classifier.layered([3, 5, 4, 3], rng, feedback="independent", asymmetry_angle=60.0)
    x, y = rng.uniform(size=(4, 3)), np.eye(3)[[0, 1, 2, 1]]
    n = ep.free_phase(m.network, x, REL).steps
    u_head = S.integrate(m.network, x, t_span=(0, (n - WINDOW) * DT), method="exp_euler", dt=DT).u[-1]

    def loss(u):
        return float(np.mean(ep.cost_gradient_u(m.network, m.cost, u, y)[0]))

    def fd(settle, h=1e-6):
        # every parameter, central differences: truncation O(h^2) ~1e-12, rounding ~1e-16/h = 1e-10
        out = {}
        for k, p in m.parameters().items():
            g = np.zeros_like(p)
            for i in np.ndindex(p.shape):
                old = p[i]
                p[i] = old + h
                up = loss(settle())
                p[i] = old - h
                g[i] = (up - loss(settle())) / (2 * h)
                p[i] = old
            out[k] = g
        return out

    refs = {"implicit": fd(lambda: S.relax(m.network, x, method="exp_euler", dt=DT, tol=1e-13,
                                             max_steps=100_000).u),
            "discrete_adjoint": fd(lambda: S.integrate(m.network, x, t_span=(0, n * DT), method="exp_euler",
                                                       dt=DT).u[-1]),
            "truncated_adjoint": fd(lambda: S.integrate(m.network, x, t_span=(0, WINDOW * DT), method="exp_euler",
                                                        dt=DT, u0=u_head).u[-1]),
            "continuous_adjoint": fd(lambda: S.integrate(m.network, x, t_span=(0, n * DT), method="dopri5",
                                                         rtol=1e-11, atol=1e-13).u[-1])}
    return m, x, y, refs


# relative max error allowed: 1e-7 where the rule is exact (finite differences are good to ~1e-9,
# measured), the continuous adjoint's O(h^2) backward quadrature at dt = 0.5 tau (measured 1.9e-3; 1.1e-4
# with 4 substeps)
@pytest.mark.parametrize("name, params, tol", [("implicit", {}, 1e-7), ("implicit", {"solver": "direct"}, 1e-7),
                                               ("implicit", {"solver": "almeida_pineda"}, 1e-7),
                                               ("discrete_adjoint", {}, 1e-7),
                                               ("discrete_adjoint", {"checkpoints": 3}, 1e-7),
                                               ("truncated_adjoint", {"window": WINDOW}, 1e-7),
                                               ("continuous_adjoint", {}, 5e-3),
                                               ("continuous_adjoint", {"substeps": 4}, 3e-4)])
def test_rule_matches_finite_differences(case, name, params, tol):
    m, x, y, refs = case
    rule = make_rule(name, **params)
    step = rule.step(m, x, y, REL)
    assert step.converged and set(step.grads) == set(m.parameters())
    got, ref = _flat(step.grads), _flat(refs[name])
    assert np.max(np.abs(got - ref)) <= tol * np.max(np.abs(ref))
    free = ep.free_phase(m.network, x, REL)
    assert step.loss == pytest.approx(float(np.mean(ep.cost_gradient_u(m.network, m.cost, free.u, y)[0])))
    np.testing.assert_allclose(step.logits, m.output(free.u))


def test_truncation_differs_from_the_full_adjoint(case):
    """The window really truncates: its gradient is off the full settling's by more than the tolerances above
    (5.6% relative, measured), and the probe says so (cosine < 1)."""
    m, x, y, refs = case
    a, b = _flat(refs["truncated_adjoint"]), _flat(refs["discrete_adjoint"])
    assert np.max(np.abs(a - b)) > 1e-2 * np.max(np.abs(b))
    assert TruncatedAdjointRule(WINDOW).probe(m, x, y, REL) < 0.9999
    assert make_rule("discrete_adjoint").probe(m, x, y, REL) == pytest.approx(1.0, abs=1e-9)


def test_implicit_is_the_exact_estimator(case):
    m, x, y, _ = case
    a = ImplicitRule().step(m, x, y, REL).grads
    b = EPRule(ep.Exact()).step(m, x, y, REL).grads
    np.testing.assert_allclose(_flat(a), _flat(b), rtol=0, atol=1e-9 * np.max(np.abs(_flat(b))))


def test_registered_and_checked():
    assert set(ADJOINT_RULES) == {"implicit", "discrete_adjoint", "truncated_adjoint", "continuous_adjoint"}
    assert all(RULES[k] is v for k, v in ADJOINT_RULES.items())
    assert make_rule("truncated_adjoint", window=3).window == 3
    for name, params, match in [("truncated_adjoint", {"window": 0}, r"window"),
                                ("discrete_adjoint", {"checkpoints": -1}, r"checkpoints"),
                                ("continuous_adjoint", {"backward": "rk4"}, r"backward.*'exp_euler'"),
                                ("implicit", {"solver": "lu"}, r"solver.*'direct'"),
                                ("implicit", {"beta": 0.1}, r"rule 'implicit'")]:
        with pytest.raises(Bad, match=match):
            make_rule(name, **params)


# the probe's cosine with the implicit gradient at the free state (tol 1e-6):
COSINE = {"implicit": (1 - 1e-9, 1 + 1e-9), "discrete_adjoint": (1 - 1e-6, 1 + 1e-9),
          "continuous_adjoint": (0.99, 1 + 1e-9), "truncated_adjoint": (0.5, 0.999)}


@pytest.mark.parametrize("name", sorted(ADJOINT_RULES))
def test_train_one_epoch(name):
    """Every rule trains through train(): one epoch on 60 digits lowers the test loss, and the probe
    of an exact rule is ~1 (the truncated one's below it)."""
    data = digits(seed=0).subset(60, 30)
    m = Classifier.layered([64, 10, 8, 10], np.random.default_rng(1))
    rel = ep.Relaxation(tol=1e-6, max_steps=500, on_failure="record")
    h = train(m, data, rule=make_rule(name, **({"window": 1} if name == "truncated_adjoint" else {})),
              optimiser=Adam(0.03), epochs=1, batch_size=20, relaxation=rel, rng=np.random.default_rng(2), probe=8,
              progress=False)
    assert h.test_loss[1] < h.test_loss[0] and h.nonconverged[1] == 0
    lo, hi = COSINE[name]
    assert lo < h.grad_cosine[1] < hi


@pytest.mark.parametrize("name, phases, residual", [("implicit", 1, 1), ("discrete_adjoint", 1, 0),
                                                    ("truncated_adjoint", 2, 0), ("continuous_adjoint", 1, 0)])
def test_a_step_counts_one_settling(case, name, phases, residual):
    """What a step counts, by hand: one settling of as many exp-Euler steps as the free phase took (one
    field evaluation each, and a relaxation one more for its residual: the truncated rule in two phases,
    the head and the window), every crossbar
    device read per evaluation and the input crossbar once, the inputs and the targets converted once,
    the samples of the batch; the readout's digital work on top of the method's own."""
    m, x, y, _ = case
    rule = make_rule(name, **({"window": WINDOW} if name == "truncated_adjoint" else {}))
    c = rule.step(m, x, y, REL).counts
    B, n_steps = len(x), ep.free_phase(m.network, x, REL).steps
    state, inputs = (sum(c_.weight.size for c_ in m.network.connections if (c_.pre in m.network.inputs_by_name) == k)
                     for k in (False, True))
    assert (c.samples, c.phases, c.steps, c.nfev) == (B, phases, n_steps, n_steps + residual)
    assert c.macs == (state * (n_steps + residual) + inputs * phases) * B
    assert c.dac == (3 * phases + 3) * B  # 3 inputs per phase, 3 classes' targets
    assert c.settle_time == pytest.approx(n_steps * DT * B)  # one circuit settles the samples one by one
    g_flops = rule.gradients(m, x, y, REL, ep.free_phase(m.network, x, REL))
    own = sum(p.flops for p in g_flops[2]) + g_flops[0].counts.flops
    assert c.flops == own + (4 * 3 * 4 + 5 * 3) * B  # readout: 3 classes from 4 units


def test_implicit_leaves_out_states_off_equilibrium(case):
    """A free state that missed the tolerance is no fixed point, where J^T lambda = -dL/du does not hold (in
    the compare study's Fashion runs such a sample's lambda was 900x the others' and its gradient pointed
    uphill): the implicit rule warns and leaves those samples out; the rest of the batch is unchanged."""
    m, x, y, _ = case
    short = ep.Relaxation(tol=1e-12, max_steps=3, dt=DT, on_failure="record")
    free = ep.free_phase(m.network, x, short)
    assert np.all(np.asarray(free.residual) > short.tol)
    with pytest.warns(RuntimeWarning, match="not at a fixed point"):
        step = ImplicitRule().step(m, x, y, short)
    assert not step.converged
    for k, g in step.grads.items():  # only the readout, taken directly at the states, is left
        assert np.all(g == 0) != k.startswith("readout."), k
    # at equilibrium nothing is left out and nothing is said
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImplicitRule().step(m, x, y, REL)
