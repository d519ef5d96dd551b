"""Training on the substrate (models.train): the optimisers against torch.optim, the Classifier's
parameters, one gradient step against the implicit gradient and torch autograd (and with Jacobian
homeostasis), a short training run on the digits, and bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import substrate as S
from models import ep
from models.data import Dataset, digits, one_hot
from models.homeostasis import Homeostasis
from models.train import (RULES, SGD, Adam, Classifier, EPRule, History, Rule, Step, gradient_step, make_rule,
                          named_gradients, train)
from substrate import SubstrateValueError as Bad


# ------------------------------------------------------------------------------------ optimisers
def _run_against_torch(ours, theirs_factory, steps=7, seed=0):
    """Apply the same gradient sequence to the same float64 arrays with our optimiser and torch's;
    after every step the parameters must agree to 1e-12 (the two compute the same formulas in a
    slightly different order: differences are a few ulp of O(1) numbers)."""
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    arrays = dict(params)  # the very objects: updated in place
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = theirs_factory(list(tensors.values()))
    moved = False
    for _ in range(steps):
        grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
        before = {k: v.copy() for k, v in params.items()}
        ours.step(params, grads)
        for k, t in tensors.items():
            t.grad = torch.tensor(grads[k])
        opt.step()
        for k in params:
            assert params[k] is arrays[k]
            np.testing.assert_allclose(params[k], tensors[k].detach().numpy(), rtol=1e-12, atol=1e-12)
            moved |= not np.array_equal(before[k], params[k])
    assert moved


@pytest.mark.parametrize("lr, momentum", [(0.1, 0.0), (0.05, 0.9), (0.3, 0.5)])
def test_sgd_matches_torch(lr, momentum):
    _run_against_torch(SGD(lr, momentum), lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum))


@pytest.mark.parametrize("kwargs", [dict(lr=1e-2), dict(lr=0.1, beta1=0.8, beta2=0.99, eps=1e-6)])
def test_adam_matches_torch(kwargs):
    k = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8) | kwargs
    _run_against_torch(Adam(**kwargs), lambda p: torch.optim.Adam(p, lr=k["lr"], betas=(k["beta1"], k["beta2"]),
                                                               eps=k["eps"]))


def test_optimiser_state_is_per_parameter():
    """A parameter without a gradient this step is left alone, and its momentum is not mixed with
    another's: stepping 'a' alone then 'b' alone equals two separate optimisers."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=3), rng.normal(size=3)
    ga, gb = rng.normal(size=3), rng.normal(size=3)
    opt = SGD(0.1, 0.9)
    params = {"a": a.copy(), "b": b.copy()}
    opt.step(params, {"a": ga})
    np.testing.assert_array_equal(params["b"], b)
    opt.step(params, {"b": gb})
    opt.step(params, {"a": ga})
    one = {"a": a.copy()}
    ref = SGD(0.1, 0.9)
    ref.step(one, {"a": ga})
    ref.step(one, {"a": ga})
    np.testing.assert_array_equal(params["a"], one["a"])


# ------------------------------------------------------------------------------------ the model
def test_classifier_parameters_cross_entropy():
    rng = np.random.default_rng(2)
    model = Classifier.layered([6, 5, 4, 3], rng, cost="cross_entropy")
    net = model.network
    assert [x.name for x in net.layers] == ["h1", "y"] and net.layer("y").size == 4
    assert model.cost.kind == "cross_entropy" and model.classes == 3
    params = model.parameters()
    assert set(params) == {"W:x->h1", "W:h1->y", "W:y->h1", "b:h1", "b:y", "readout.weight", "readout.bias"}
    for c in net.connections:
        assert params[f"W:{c.name}"] is c.weight
    for x in net.layers:
        assert params[f"b:{x.name}"] is x.bias
    assert params["readout.weight"] is model.cost.readout_weight and params["readout.weight"].shape == (3, 4)
    assert params["readout.bias"] is model.cost.readout_bias and params["readout.bias"].shape == (3,)
    bound = 1 / np.sqrt(4)  # readout drawn uniform in +-1/sqrt(fan_in)
    assert np.max(np.abs(model.cost.readout_weight)) <= bound


def test_classifier_parameters_squared_error_and_tied():
    rng = np.random.default_rng(3)
    model = Classifier.layered([6, 5, 3], rng, cost="squared_error", feedback="tied")
    assert [x.name for x in model.network.layers] == ["h1", "y"] and model.classes == 3
    assert model.cost.kind == "squared_error" and model.cost.layer == "y"
    params = model.parameters()
    assert set(params) == {"W:x->h1", "W:h1->y", "b:h1", "b:y"}  # the tied y->h1 is not a parameter


@pytest.mark.parametrize("cost, sizes", [("cross_entropy", [6, 5, 4, 3]), ("squared_error", [6, 5, 3])])
def test_step_updates_the_network_in_place(cost, sizes):
    """After one optimiser step on gradient_step's gradients the network's own arrays (and the
    readout's) hold new values, and the circuit sees them: its free equilibrium moves."""
    rng = np.random.default_rng(4)
    model = Classifier.layered(sizes, rng, cost=cost)
    x = rng.uniform(size=(5, 6))
    y = one_hot(rng.integers(0, 3, 5), 3)
    rel = ep.Relaxation(tol=1e-10)
    params = model.parameters()
    before = {k: v.copy() for k, v in params.items()}
    free_before = ep.free_phase(model.network, x, rel).u
    est, grads, penalty = gradient_step(model, x, y, ep.Centred(0.1), rel)
    assert set(grads) == set(params) and np.isnan(penalty) and est.converged
    SGD(0.5).step(params, grads)
    for c in model.network.connections:
        w = model.network.connection(c.name).weight
        assert w is params[f"W:{c.name}"] and not np.array_equal(w, before[f"W:{c.name}"]), c.name
    for x_ in model.network.layers:
        assert not np.array_equal(x_.bias, before[f"b:{x_.name}"])
    if cost == "cross_entropy":
        assert not np.array_equal(model.cost.readout_weight, before["readout.weight"])
        assert not np.array_equal(model.cost.readout_bias, before["readout.bias"])
    assert np.max(np.abs(ep.free_phase(model.network, x, rel).u - free_before)) > 1e-6


# ------------------------------------------------------------------------------------ one step
TIGHT = ep.Relaxation(tol=1e-12, max_steps=100_000)


def _batch(rng, model, batch=5):
    x = rng.uniform(size=(batch, model.network.inputs[0].size))
    labels = rng.integers(0, model.classes, batch)
    return x, labels, one_hot(labels, model.classes)


@pytest.mark.parametrize("cost, sizes", [("cross_entropy", [6, 5, 4, 3]), ("squared_error", [6, 5, 4, 3])])
def test_exact_step_matches_implicit_gradient(cost, sizes):
    """gradient_step with ep.Exact: the network gradients equal substrate.gradient(method="implicit")
    of the batch-mean cost (built from models.ep.cost_gradient_u), on an asymmetric network. Both
    relax to residual 1e-12; the equilibria then differ by ~cond(J) 1e-12 and so do the gradients:
    1e-10 absolute on O(0.01-0.1) entries."""
    rng = np.random.default_rng(5)
    model = Classifier.layered(sizes, rng, cost=cost, feedback="independent", asymmetry_angle=45.0)
    x, _, y = _batch(rng, model)
    est, grads, _ = gradient_step(model, x, y, ep.Exact(), TIGHT)

    def loss(u):
        value, g = ep.cost_gradient_u(model.network, model.cost, u, y)
        return float(np.mean(value)), g / len(u)

    ref = S.gradient(model.network, x, loss, method="implicit", tol=1e-12)
    assert set(ref.weights) == {k[2:] for k in grads if k.startswith("W:")}
    for k, w in ref.weights.items():
        assert np.max(np.abs(w)) > 1e-4, k
        np.testing.assert_allclose(grads[f"W:{k}"], w, rtol=0, atol=1e-10, err_msg=k)
    for k, b in ref.biases.items():
        np.testing.assert_allclose(grads[f"b:{k}"], b, rtol=0, atol=1e-10, err_msg=k)
    np.testing.assert_allclose(est.loss, ref.loss, rtol=1e-10)
    if cost == "squared_error":
        assert not any(k.startswith("readout") for k in grads)


def test_readout_gradient_matches_torch():
    """The readout's gradient is that of the mean cross-entropy of the logits W_o r + b_o at the free
    equilibrium's activities r (torch.nn.functional.cross_entropy, mean reduction, on the same r):
    a few float64 operations, so 1e-12. The loss reported is the same mean."""
    rng = np.random.default_rng(6)
    model = Classifier.layered([6, 5, 4, 3], rng, cost="cross_entropy", feedback="independent",
                               asymmetry_angle=45.0)
    x, labels, y = _batch(rng, model, batch=7)
    step, grads, _ = gradient_step(model, x, y, ep.Exact(), TIGHT)
    free = ep.free_phase(model.network, x, TIGHT)  # the same relaxation, the same equilibrium
    r = torch.tensor(ep.activity(model.network, free.u)[:, model.network.slices["y"]])
    w = torch.tensor(model.cost.readout_weight, requires_grad=True)
    b = torch.tensor(model.cost.readout_bias, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(r @ w.T + b, torch.tensor(labels))
    gw, gb = torch.autograd.grad(loss, (w, b))
    np.testing.assert_allclose(grads["readout.weight"], gw.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grads["readout.bias"], gb.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(step.loss, loss.item(), rtol=1e-12)
    assert np.max(np.abs(gw.numpy())) > 1e-3


@pytest.mark.parametrize("rule", [ep.Exact(), ep.Centred(0.1)])
def test_step_with_exact_homeostasis(rule):
    """With Homeostasis(strength=s, draws=None) the weight gradients are the rule's plus s times the
    penalty's gradient, exactly (the same deterministic computations); biases and readout unchanged;
    the penalty value is returned."""
    rng = np.random.default_rng(7)
    model = Classifier.layered([6, 5, 4, 3], rng, cost="cross_entropy", feedback="independent",
                               asymmetry_angle=45.0, lateral=True)
    x, _, y = _batch(rng, model)
    s = 0.3
    hom = Homeostasis(strength=s, draws=None)
    _, plain, nan = gradient_step(model, x, y, rule, TIGHT)
    _, with_h, penalty = gradient_step(model, x, y, rule, TIGHT, homeostasis=hom)
    value, hg = hom.penalty(model.network)
    assert np.isnan(nan) and penalty == value and value > 0
    assert set(with_h) == set(plain)
    for k in plain:
        if k.startswith("W:"):
            np.testing.assert_allclose(with_h[k], plain[k] + s * hg[k[2:]], rtol=1e-15, atol=1e-17, err_msg=k)
        else:
            np.testing.assert_array_equal(with_h[k], plain[k])
    assert np.max(np.abs(with_h["W:h1->y"] - plain["W:h1->y"])) > 1e-4  # the penalty does contribute
    # strength 0 switches it off (no penalty computed)
    _, off, nan = gradient_step(model, x, y, rule, TIGHT, homeostasis=Homeostasis(strength=0.0, draws=None))
    assert np.isnan(nan) and all(np.array_equal(off[k], plain[k]) for k in plain)


def test_step_with_stochastic_homeostasis_uses_the_rng():
    """The stochastic penalty in a step draws from the rng it is given: the same seed reproduces
    hom.penalty(network, default_rng(seed))."""
    rng = np.random.default_rng(8)
    model = Classifier.layered([6, 5, 4, 3], rng, cost="cross_entropy")
    x, _, y = _batch(rng, model)
    hom = Homeostasis(strength=0.5, draws=4)
    _, plain, _ = gradient_step(model, x, y, ep.Exact(), TIGHT)
    _, with_h, penalty = gradient_step(model, x, y, ep.Exact(), TIGHT, homeostasis=hom, rng=np.random.default_rng(9))
    value, hg = hom.penalty(model.network, np.random.default_rng(9))
    assert penalty == value
    for k in hg:
        np.testing.assert_allclose(with_h[f"W:{k}"], plain[f"W:{k}"] + 0.5 * hg[k], rtol=1e-15, atol=1e-17)


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def digits_small():
    return digits().subset(300, 100, np.random.default_rng(2))


def _train(data, seed=2, **kwargs):
    rng = np.random.default_rng(seed)
    model = Classifier.layered([64, 32, 10], rng)
    options = dict(rule=ep.Centred(0.2), optimiser=SGD(0.05, 0.9), epochs=3, batch_size=32, rng=rng,
                   progress=False) | kwargs
    return model, train(model, data, **options)


def test_training_learns_the_digits(digits_small):
    """3 epochs of centred EP on 300 digits (64-32-10, cross-entropy readout). Thresholds from 20
    runs with different seeds (data subset and initialisation): the training loss fell by 0.25-0.42
    (from ~2.31) and the test loss by 0.34-0.55, the final test accuracy was 0.40-0.74 (chance: 0.1,
    initial 0.05-0.22). Asserted with margin: drops >= 0.15, test accuracy >= 0.3 and >= 0.15 above
    its initial value. The run takes ~0.1 s."""
    calls = []
    model, hist = _train(digits_small, on_epoch=lambda h: calls.append((h, len(h.epoch))))
    a = hist.arrays()
    assert isinstance(hist, History)
    assert all(len(v) == 4 for v in a.values()), {k: len(v) for k, v in a.items()}
    np.testing.assert_array_equal(a["epoch"], [0, 1, 2, 3])
    assert [n for _, n in calls] == [2, 3, 4] and all(h is hist for h, _ in calls)
    assert a["train_loss"][-1] <= a["train_loss"][0] - 0.15
    assert a["test_loss"][-1] <= a["test_loss"][0] - 0.15
    assert a["test_accuracy"][-1] >= 0.3 and a["test_accuracy"][-1] >= a["test_accuracy"][0] + 0.15
    assert np.all(a["nonconverged"] == 0)
    assert np.isnan(a["asymmetry_penalty"]).all()  # no homeostasis
    assert np.all(np.isfinite(a["grad_cosine"])) and np.all(a["grad_cosine"] > 0.9)  # centred EP ~ exact
    assert np.all((a["train_accuracy"] >= 0) & (a["train_accuracy"] <= 1))


def test_training_is_reproducible(digits_small):
    _, h1 = _train(digits_small, seed=3, epochs=2)
    _, h2 = _train(digits_small, seed=3, epochs=2)
    a1, a2 = h1.arrays(), h2.arrays()
    for key in ("test_accuracy", "train_loss", "train_accuracy", "test_loss", "grad_cosine"):
        assert np.array_equal(a1[key], a2[key]), key
    _, h3 = _train(digits_small, seed=4, epochs=2)
    assert not np.array_equal(h3.arrays()["train_loss"], a1["train_loss"])


def test_zero_epochs_and_homeostasis(digits_small):
    """epochs=0 evaluates the untrained model only (one row, no callback); with stochastic
    homeostasis the penalty is recorded per epoch."""
    calls = []
    model, hist = _train(digits_small, epochs=0, on_epoch=calls.append)
    assert all(len(v) == 1 for v in hist.arrays().values()) and calls == []
    _, hist = _train(digits_small, epochs=1, homeostasis=Homeostasis(strength=0.1, draws=3), probe=0)
    a = hist.arrays()
    assert np.isnan(a["asymmetry_penalty"][0]) and np.isfinite(a["asymmetry_penalty"][1])  # row 0: before training
    assert np.isnan(a["grad_cosine"]).all()  # probe=0: no comparison


# ------------------------------------------------------------------------------------ rule protocol
class _Shadowed(Rule):
    """Centred EP written as a Rule of its own, training one extra array besides the model's: its
    gradient is the array itself (so SGD at lr shrinks it by (1 - lr) per batch)."""

    name = "shadowed"

    def __init__(self):
        self.extra = np.ones(3)

    def parameters(self, model):
        return model.parameters() | {"extra": self.extra}

    def step(self, model, x, y, relaxation, rng):
        est = ep.estimate(model.network, x, y, model.cost, ep.Centred(0.2), relaxation)
        return Step(named_gradients(est) | {"extra": self.extra.copy()}, est.loss, est.logits, est.converged)


def test_a_rule_of_its_own_trains_as_the_estimator_does(digits_small):
    """train() runs any Rule: a hand-written centred EP gives the estimator's training bit for bit (its
    probe is NaN: it compares with nothing), and the extra array it declares is updated by the optimiser:
    10 batches (300 samples, batch 32) x 2 epochs of SGD(0.05), no momentum -> 0.95^20."""
    rule = _Shadowed()
    kwargs = dict(optimiser=SGD(0.05), epochs=2)
    m1, h1 = _train(digits_small, rule=rule, **kwargs)
    m2, h2 = _train(digits_small, rule=ep.Centred(0.2), **kwargs)
    a1, a2 = h1.arrays(), h2.arrays()
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert np.array_equal(a1[key], a2[key]), key
    assert np.isnan(a1["grad_cosine"]).all() and np.all(a2["grad_cosine"] > 0.9)
    for k, p in m1.parameters().items():
        assert np.array_equal(p, m2.parameters()[k]), k
    np.testing.assert_allclose(rule.extra, 0.95 ** 20, rtol=1e-12)


def test_rules_by_name():
    """Every estimator of models.ep is a rule by name, wrapped in EPRule with the estimator's name."""
    assert set(ep.ESTIMATORS) <= set(RULES)
    r = make_rule("centred", beta=0.3)
    assert isinstance(r, EPRule) and r.estimator == ep.Centred(0.3) and r.name == "centred"
    with pytest.raises(Bad, match=r"make_rule\(name\)="):
        make_rule("backprop_through_time")
    with pytest.raises(Bad, match="rule 'centred': "):
        make_rule("centred", gamma=1.0)


def test_every_rule_by_name_in_a_fresh_process():
    """make_rule finds the rules of the modules that register them (adjoint rules, local rules, circuit
    rules) without the caller importing those modules first."""
    code = ("from models.train import make_rule; "
            "print(*(type(make_rule(n)).__name__ for n in ('implicit', 'counter_current', 'coupled_learning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ImplicitRule", "CounterCurrent", "CoupledLearning"]


def test_step_of_an_estimator_is_its_estimate():
    rng = np.random.default_rng(5)
    model = Classifier.layered([6, 5, 3], rng)
    x, y = rng.uniform(size=(4, 6)), one_hot(rng.integers(0, 3, 4), 3)
    rel = ep.Relaxation(tol=1e-10)
    step = EPRule(ep.Exact()).step(model, x, y, rel)
    est = ep.estimate(model.network, x, y, model.cost, ep.Exact(), rel)
    assert step.loss == est.loss and step.converged and np.array_equal(step.logits, est.logits)
    assert set(step.grads) == set(model.parameters())
    for k, g in named_gradients(est).items():
        assert np.array_equal(step.grads[k], g), k


def test_bad_rule(tiny):
    model = Classifier.layered([6, 5, 4, 3], np.random.default_rng(11))
    with pytest.raises(Bad, match="rule must be a models.train.Rule or an ep.Estimator, got str"):
        train(model, tiny, rule="centred", epochs=1, rng=np.random.default_rng(12), progress=False)


# ------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(10)
    data = Dataset("tiny", rng.uniform(size=(20, 6)), rng.integers(0, 3, 20), rng.uniform(size=(8, 6)),
                   rng.integers(0, 3, 8), 3, (6,))
    return data


@pytest.mark.parametrize("kwargs, match", [
    (dict(rng=None), "train needs rng, a numpy.random.Generator"),
    (dict(rng=0), "train needs rng, a numpy.random.Generator"),
    (dict(epochs=-1), "epochs=-1 must be a non-negative integer"),
    (dict(epochs=1.5), "epochs=1.5 must be a non-negative integer"),
    (dict(epochs=True), "epochs=True must be a non-negative integer"),
    (dict(batch_size=0), "batch_size=0 must be a positive integer"),
    (dict(batch_size=2.0), "batch_size=2.0 must be a positive integer"),
])
def test_bad_train_arguments(tiny, kwargs, match):
    model = Classifier.layered([6, 5, 4, 3], np.random.default_rng(11))
    options = dict(epochs=1, rng=np.random.default_rng(12), progress=False) | kwargs
    with pytest.raises(Bad, match=match):
        train(model, tiny, **options)


def test_bad_train_data_and_model(tiny):
    model = Classifier.layered([7, 5, 4, 3], np.random.default_rng(13))
    with pytest.raises(Bad, match="the data have 6 features but the network's input 'x' has 7"):
        train(model, tiny, epochs=1, rng=np.random.default_rng(14), progress=False)
    with pytest.raises(Bad, match=r"model must be a Classifier \(or have parameters, evaluate, classes, network\), "
                                  "got Network"):
        train(model.network, tiny, epochs=1, rng=np.random.default_rng(14), progress=False)


@pytest.mark.parametrize("make, match", [
    (lambda: SGD(0.0), r"lr=0.0 must be a positive finite number"),
    (lambda: SGD(-0.1), r"lr=-0.1 must be a positive finite number"),
    (lambda: SGD(float("inf")), r"lr=inf must be a positive finite number"),
    (lambda: Adam(0), r"lr=0 must be a positive finite number"),
    (lambda: Adam(1e-3, eps=0.0), r"eps=0.0 must be a positive finite number"),
    (lambda: SGD(0.1, momentum=1.0), r"momentum=1.0 must be in \[0, 1\)"),
    (lambda: SGD(0.1, momentum=1.5), r"momentum=1.5 must be in \[0, 1\)"),
    (lambda: SGD(0.1, momentum=-0.1), r"momentum=-0.1 must be in \[0, 1\)"),
    (lambda: Adam(beta1=1.0), r"beta1=1.0 must be in \[0, 1\)"),
    (lambda: Adam(beta2=1.0), r"beta2=1.0 must be in \[0, 1\)"),
])
def test_bad_optimiser_arguments(make, match):
    with pytest.raises(Bad, match=match):
        make()


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=[6, 3], cost="cross_entropy"), r"cross_entropy needs inputs, >= 1 hidden layer, classes"),
    (dict(sizes=[6, 5, 3], cost="hinge"), r"cost='hinge'; allowed: 'cross_entropy', 'squared_error'"),
])
def test_bad_classifier(kwargs, match):
    with pytest.raises(Bad, match=match):
        Classifier.layered(kwargs["sizes"], np.random.default_rng(15), cost=kwargs["cost"])


def test_labels_beyond_the_model_classes_are_named():
    data = digits().subset(50, 20, np.random.default_rng(0))
    model = Classifier.layered([64, 8, 8, 5], np.random.default_rng(0))  # 5 classes, digits has 10
    with pytest.raises(Bad, match="5 classes"):
        train(model, data, epochs=1, rng=np.random.default_rng(0), progress=False)
