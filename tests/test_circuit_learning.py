"""Learning in resistive circuits (models.circuit_learning): EP against the implicit gradient, coupled
learning's clamped state and update, learning a regression and the digits, devices on conductances."""

import numpy as np
import pytest

from models import circuit_learning as CL
from models import data, train
from substrate import Counts, devices
from substrate import circuits as C
from substrate.errors import SubstrateValueError


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    model = CL.CircuitClassifier.layered(8, 12, 3, rng, spread=0.2)  # diode mismatch
    x = rng.uniform(0, 1, (6, 8))
    return model, x, np.eye(3)[rng.integers(0, 3, 6)]


@pytest.mark.parametrize("estimator, beta", [("centred", 1e-3), ("one_sided", 1e-4), ("negative", 1e-4)])
def test_ep_matches_the_implicit_gradient(batch, estimator, beta):
    """The circuit is reciprocal, so EP's estimate tends to the implicit gradient as beta -> 0: cosine
    >= 0.9999 (measured 1 - 1e-11 centred, 1 - 1e-7 one-sided at these beta)."""
    model, x, y = batch
    rule = CL.CircuitEP(estimator, beta)
    g, free, ok, _ = rule.gradient(model, x, y)
    assert ok
    exact = CL.exact_gradient(model, x, y, free)
    cos = g @ exact / np.linalg.norm(g) / np.linalg.norm(exact)
    assert cos >= 0.9999
    # the implicit gradient itself: substrate.circuits.gradient on the same loss (mean over the batch)
    def loss(v):
        d = v[:, model.circuit.outputs] - model.targets(y)
        g = np.zeros_like(v)
        g[:, model.circuit.outputs] = d / len(v)
        return 0.5 * np.sum(d * d) / len(v), g
    ref = C.gradient(model.circuit, model.drive(x), loss).weights["conductance"]
    np.testing.assert_allclose(exact, ref, rtol=1e-9, atol=1e-14)


def test_coupled_learning_clamps_the_outputs_and_follows_the_gradient(batch):
    model, x, y = batch
    rule = CL.CoupledLearning(eta=0.05)
    free = model.free(x)
    out = model.outputs(free)
    clamp = C.Clamp(model.circuit.outputs, out + 0.05 * (model.targets(y) - out))
    sol = C.dc(model.circuit, model.drive(x), clamp=clamp, tol=1e-12)
    np.testing.assert_array_equal(sol.v[:, model.circuit.outputs], clamp.values)
    assert np.max(np.abs(sol.field(sol.u))) <= 1e-12  # KCL at every other node
    g = rule.gradient(model, x, y, free)[0]
    e = model.circuit.edges
    full = lambda v: np.concatenate([v, np.zeros((len(v), 1))], 1)
    dF = full(free.v)[:, e[:, 0]] - full(free.v)[:, e[:, 1]]
    dC = full(sol.v)[:, e[:, 0]] - full(sol.v)[:, e[:, 1]]
    np.testing.assert_allclose(g, (dC ** 2 - dF ** 2).sum(0) / (2 * 0.05 * len(x)), rtol=1e-6, atol=1e-12)
    exact = CL.exact_gradient(model, x, y, free)
    # not the gradient (coupled learning descends another contrast), but close to it at the start:
    # measured cosine 0.99
    assert g @ exact / np.linalg.norm(g) / np.linalg.norm(exact) > 0.95
    with pytest.raises(SubstrateValueError, match=r"eta"):
        CL.CoupledLearning(eta=2.0)


@pytest.mark.parametrize("rule", [CL.CircuitEP("centred", 0.01), CL.CoupledLearning(0.1)])
def test_a_resistive_network_learns_a_regression(rule):
    """Teacher and student share the topology (Stern et al. 2021's set-up): the student's cost on the
    teacher's outputs falls tenfold in 60 full-batch steps (measured: ~50x EP, ~30x coupled learning)."""
    rng = np.random.default_rng(3)
    kw = dict(target_low=0.0, target_high=1.0)  # targets are the voltages themselves
    teacher = CL.CircuitClassifier.layered(3, 6, 2, rng, **kw)
    student = CL.CircuitClassifier.layered(3, 6, 2, np.random.default_rng(4), **kw)
    x = rng.uniform(0, 1, (32, 3))
    y = teacher.outputs(teacher.free(x))
    opt = train.Adam(1e-3)
    params = student.parameters()
    first = None
    for _ in range(60):
        step = rule.step(student, x, y)
        first = step.loss if first is None else first
        opt.step(params, step.grads)
        student.network.write()
    last = float(np.mean(student.cost(student.free(x), y)[0]))
    assert last < first / 10


def test_digits_learned_by_ep_and_coupled_learning():
    """Both rules through train() on 400 digits, 4 epochs: test accuracy well above chance (0.1);
    measured 0.59 (EP) and 0.64 (coupled learning) on 200 test digits."""
    d = data.digits().subset(400, 200)
    for rule in (train.make_rule("circuit_ep", beta=0.01), train.make_rule("coupled_learning", eta=0.1)):
        rng = np.random.default_rng(0)
        model = CL.CircuitClassifier.layered(64, 24, 10, rng)
        hist = train.train(model, d, rule=rule, optimiser=train.Adam(4e-3), epochs=4, batch_size=32, rng=rng,
                           probe=16, progress=False)
        assert hist.test_accuracy[-1] > 0.4
        assert np.all(np.diff(hist.test_accuracy) > -0.05)
        assert hist.grad_cosine[0] > 0.99  # at the start: EP ~1, coupled learning 0.999 (measured)


def test_conductances_on_a_device():
    rng = np.random.default_rng(0)
    ideal = CL.CircuitClassifier.layered(4, 5, 2, np.random.default_rng(1))
    on_ideal = CL.CircuitClassifier.layered(4, 5, 2, np.random.default_rng(1), device=devices.Device(()))
    x = rng.uniform(0, 1, (3, 4))
    # an ideal device is no device at all, bit for bit
    np.testing.assert_array_equal(ideal.free(x).v, on_ideal.free(x).v)
    noisy = CL.CircuitClassifier.layered(4, 5, 2, np.random.default_rng(1), seed=7, device=devices.Device(
        (devices.ConductanceMapping(), devices.ProgrammingNoise(), devices.Drift())))
    g_nom, g_phys = noisy.network.nominal.conductance, noisy.circuit.conductance
    assert not np.array_equal(g_nom, g_phys) and np.all(g_phys >= 0)
    before = g_phys.copy()
    noisy.network.advance(3600.0)
    assert np.all(noisy.circuit.conductance <= before) and np.any(noisy.circuit.conductance < before)  # drift decays
    # pulsed updates: the device holds what its pulses wrote, and training continues from it
    pulsed = CL.CircuitClassifier.layered(4, 5, 2, np.random.default_rng(1), seed=3, device=devices.Device(
        (devices.ConstantStep(dw_min=0.01),), weight_scale=0.05))
    g = pulsed.network.nominal.conductance
    target = g + 1e-3  # two pulses of dw_min weight_scale = 0.5 mS
    g[...] = target
    pulsed.network.write()
    assert not np.array_equal(g, target)  # pulses, with their spread and noise, not the exact value
    np.testing.assert_array_equal(g, pulsed.circuit.conductance)
    assert np.mean(np.abs(g - target)) < 0.6e-3  # most of the way (measured 0.39 mS left of 1 mS)


@pytest.mark.parametrize("rule", [CL.CircuitEP("centred", 0.01), CL.CoupledLearning(0.1)])
def test_steps_count_what_the_circuit_did(rule):
    """A tiny circuit (2 inputs and their mirrors + 2 bias sources, 3 hidden, 2 outputs: 18 edges),
    counted by hand from the solves the step ran: the free phase and the nudged (EP centred: +-beta)
    or clamped phase, their Newton iterations and evaluations of F, every conductance read at each
    evaluation, the sources set, the free nodes read out; then the conductances written."""
    rng = np.random.default_rng(5)
    model = CL.CircuitClassifier.layered(2, 3, 2, rng)
    x, y = rng.uniform(0, 1, (4, 2)), np.eye(2)[[0, 1, 1, 0]]
    solves = []
    dc = C.dc

    def spy(*args, **kwargs):  # the solves the rule runs, to count by hand
        solves.append(dc(*args, **kwargs))
        return solves[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "dc", spy)
        step = rule.step(model, x, y)
    c = step.counts
    phases = 3 if isinstance(rule, CL.CircuitEP) else 2
    assert len(solves) == phases and c.phases == phases and c.samples == 4
    edges = len(model.circuit.edges)
    assert edges == 18
    assert c.steps == sum(s.iterations for s in solves) > 0
    assert c.nfev == sum(s.nfev for s in solves) >= c.steps
    assert c.macs == edges * c.nfev * 4
    sources = 6 * 4 * phases + (2 * 4 if phases == 2 else 0)  # inputs every phase, the clamp's 2 outputs once
    assert c.dac == sources
    free_nodes = (5 * phases - (2 if phases == 2 else 0)) * 4  # the clamp holds the 2 outputs
    assert c.adc == free_nodes
    assert c.flops == 3 * edges * 4 * phases and c.settle_time == 0
    model.parameters()["conductance"][:5] += 1e-4
    assert model.network.write() == Counts(pulses=5, write_cycles=1)
