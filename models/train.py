"""Training a classifier on the substrate with a learning rule: EP, the exact gradient, or any :class:`Rule`.

The model is a :class:`Classifier`: a network, the cost on its last layer (squared error on the
output units, or cross-entropy through a linear readout whose weights take their gradient directly).
The rule computes each minibatch's update: an :mod:`models.ep` estimator (through :class:`EPRule`), or
any :class:`Rule` (:data:`RULES` names them for configs; :func:`make_rule`). :func:`train` runs
minibatch epochs with SGD (momentum) or Adam, optional Jacobian homeostasis, evaluation on the
held-out set and a probe of the gradient's alignment with the exact one; it returns the metrics per
epoch as arrays (row 0: before training). Its only file is an optional checkpoint (``checkpoint=PATH``:
the model, the optimiser's state, the history and the random generator's state, written atomically
every ``checkpoint_every`` epochs), from which the same call, rerun after a kill, resumes and ends
bit-identical to an uninterrupted run; ``on_epoch`` lets a caller save other results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from substrate import Cost, Network, persist
from substrate.devices import DeviceNetwork
from substrate.errors import SubstrateValueError
from substrate.validate import choice, count, fraction, positive

from . import ep
from .data import Dataset, minibatches, one_hot
from .homeostasis import Homeostasis
from .metrics import compare, weight_angles


# ------------------------------------------------------------------------------------ model
@dataclass(eq=False)
class Classifier:
    """A network and its cost; predictions are the argmax of the cost layer's output at the free
    equilibrium (readout logits, or the output units' activities)."""

    network: Network
    cost: Cost

    @classmethod
    def layered(cls, sizes, rng: np.random.Generator, *, cost: str = "cross_entropy", **network_options):
        """``sizes`` = (inputs, hidden..., classes). With ``cost="cross_entropy"`` the classes are a
        linear readout of the last hidden layer (the dynamical layers are sizes[:-1], the last one named
        ``y``); with ``"squared_error"`` they are output neurons ``y``. Readout weights are drawn like
        the network's (uniform +-1/sqrt(fan_in), PyTorch's default)."""
        if cost == "cross_entropy":
            if len(sizes) < 3:
                raise SubstrateValueError(f"sizes={sizes!r}: cross_entropy needs inputs, >= 1 hidden layer, classes")
            net = Network.layered(sizes[:-1], rng, **network_options)
            k = 1.0 / math.sqrt(sizes[-2])
            dt = net.dtype
            w = rng.uniform(-k, k, (sizes[-1], sizes[-2])).astype(dt)
            b = rng.uniform(-k, k, sizes[-1]).astype(dt)
            return cls(net, Cost("y", "cross_entropy", w, b))
        if cost == "squared_error":
            return cls(Network.layered(sizes, rng, **network_options), Cost("y"))
        raise SubstrateValueError(f"cost={cost!r}; allowed: 'cross_entropy', 'squared_error'")

    @property
    def classes(self) -> int:
        """The number of classes (the width of the cost's output)."""
        return self.cost.width(self.network)

    def parameters(self) -> dict:
        """{name: array} of everything trained, updated in place: independent weights, biases and
        the readout."""
        params = {f"W:{c.name}": c.weight for c in self.network.connections if not c.tied}
        params.update({f"b:{x.name}": x.bias for x in self.network.layers})
        if self.cost.kind == "cross_entropy":
            params.update({"readout.weight": self.cost.readout_weight, "readout.bias": self.cost.readout_bias})
        return params

    def evaluate(self, x, labels, relaxation: ep.Relaxation, batch: int = 1000) -> tuple:
        """(mean cost, accuracy, fraction of free phases that did not converge) on a data set."""
        count(batch, "batch", relation=True)
        if len(x) == 0 or len(x) != len(labels):
            raise SubstrateValueError(f"x has {len(x)} samples and labels {len(labels)}: they must match and be >= 1")
        losses, correct, failed = 0.0, 0, 0
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], labels[i:i + batch]
            free = ep.free_phase(self.network, xb, relaxation)
            r = self._layer(free.u)
            out = self._logits(r)
            losses += float(np.sum(self.cost.value_and_grad(r, one_hot(yb, self.classes))[0]))
            correct += int(np.sum(np.argmax(out, axis=1) == yb))
            failed += 0 if free.ok else 1
        batches = math.ceil(len(x) / batch)
        return losses / len(x), correct / len(x), failed / batches

    def output(self, u):
        """What predictions are the argmax of, at states u: the readout's logits, or the activities."""
        return self._logits(self._layer(u))

    def _layer(self, u):
        """The cost layer's activities at states u."""
        return self.network.activities(u)[:, self.network.slices[self.cost.layer]]

    def _logits(self, r):
        return self.cost.readout(r) if self.cost.kind == "cross_entropy" else r


# ------------------------------------------------------------------------------------ optimisers
class Optimiser:
    """Updates parameters in place from their gradients; state is kept per parameter name."""

    def __init__(self):
        self.state = {}

    def step(self, params: dict, grads: dict):
        """Update every parameter of ``params`` in place with its gradient in ``grads``."""
        for name, g in grads.items():
            self.update(name, params[name], np.asarray(g, dtype=params[name].dtype))

    def update(self, name, p, g):
        """Update the parameter ``name``, ``p``, in place with its gradient ``g``."""
        raise NotImplementedError


class SGD(Optimiser):
    """p <- p - lr m, m <- momentum m + g (PyTorch's SGD with momentum, dampening 0)."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.0):
        super().__init__()
        self.lr, self.momentum = positive(lr, "lr"), fraction(momentum, "momentum", upper_open=True)

    def update(self, name, p, g):
        if self.momentum:
            m = self.state.get(name)
            m = g.copy() if m is None else np.add(self.momentum * m, g, out=m)
            self.state[name] = m
            g = m
        p -= self.lr * g


class Adam(Optimiser):
    """Adam (Kingma & Ba 2015) with bias correction."""

    def __init__(self, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        super().__init__()
        self.lr, self.eps = positive(lr, "lr"), positive(eps, "eps")
        self.beta1, self.beta2 = fraction(beta1, "beta1", upper_open=True), fraction(beta2, "beta2", upper_open=True)

    def update(self, name, p, g):
        m, v, t = self.state.get(name, (np.zeros_like(p), np.zeros_like(p), 0))
        t += 1
        m = self.beta1 * m + (1 - self.beta1) * g
        v = self.beta2 * v + (1 - self.beta2) * g * g
        self.state[name] = (m, v, t)
        p -= self.lr * (m / (1 - self.beta1 ** t)) / (np.sqrt(v / (1 - self.beta2 ** t)) + self.eps)


OPTIMISERS = {"sgd": SGD, "adam": Adam}


# ------------------------------------------------------------------------------------ saving
def _write_classifier(group, model: Classifier):
    persist.write_object(group.create_group("network"), model.network)
    persist.write_object(group.create_group("cost"), model.cost)


def _read_classifier(group) -> Classifier:
    return Classifier(persist.read_object(group["network"]), persist.read_object(group["cost"]))


def _hyperparameters(optimiser: Optimiser) -> dict:
    return {k: v for k, v in vars(optimiser).items() if k != "state"}


def _write_optimiser(group, optimiser: Optimiser):
    persist.write_config(group, _hyperparameters(optimiser))
    persist.write_state(group, "state", optimiser.state)  # SGD's momenta; Adam's (m, v, t) per parameter


def _read_optimiser(group) -> Optimiser:
    optimiser = persist.KINDS[group.attrs["kind"]].cls(**persist.read_config(group))
    optimiser.state = persist.read_state(group["state"])
    return optimiser


persist.register(Classifier, _write_classifier, _read_classifier)
persist.register(SGD, _write_optimiser, _read_optimiser)
persist.register(Adam, _write_optimiser, _read_optimiser)


# ------------------------------------------------------------------------------------ training
# what train() needs of a model (a Classifier, or the model of a rule that trains something else); a
# model of several circuits also has ``networks``, all of them, each written after every update
MODEL_MEMBERS = ("parameters", "evaluate", "classes", "network")
# every epoch relaxes each training and test sample at least once: EP runs take tens to hundreds of
# epochs, so a count beyond 10^5 is a typo (10**30 would loop for ever), refused before the first epoch
MAX_EPOCHS = 100_000
_EPOCHS_WHY = "each epoch relaxes every training and test sample; EP runs take hundreds at most"
@dataclass
class History:
    """Metrics per epoch; row 0 is the untrained model. ``grad_cosine``: cosine of the rule's
    gradient with the exact one on the probe batch (NaN without a probe; on a device, the exact
    gradient of the nominal network); ``train_loss`` and
    ``train_accuracy`` are running values, at each batch's free phase before its update; ``nonconverged``: the
    fraction of training batches with a relaxation that missed its tolerance."""

    epoch: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    train_accuracy: list = field(default_factory=list)
    test_loss: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    grad_cosine: list = field(default_factory=list)
    weight_angle: list = field(default_factory=list)
    asymmetry_penalty: list = field(default_factory=list)
    nonconverged: list = field(default_factory=list)
    seconds: list = field(default_factory=list)

    def arrays(self) -> dict:
        """Every metric as a float array over the epochs (row 0: before training)."""
        return {k: np.asarray(v, dtype=float) for k, v in self.__dict__.items()}


@dataclass(eq=False)
class Checkpoint:
    """What :func:`train` saves to resume from: the model, the optimiser (with its state), the history
    so far, the training generator (its state) and ``call``, a description of the training call (its
    arguments, digests of the data and of the model it started from) that a resuming call must match.
    ``substrate.load`` reads one."""

    model: Classifier
    optimiser: Optimiser
    history: History
    rng: np.random.Generator
    call: dict

    @property
    def epoch(self) -> int:
        """The last epoch the checkpoint holds."""
        return self.history.epoch[-1]


def _write_checkpoint(group, ck: Checkpoint):
    persist.write_config(group, {"call": ck.call})
    persist.write_object(group.create_group("model"), ck.model)
    persist.write_object(group.create_group("optimiser"), ck.optimiser)
    persist.write_arrays(group, "history", {k: np.asarray(v) for k, v in vars(ck.history).items()})
    persist.write_state(group, "rng", ck.rng)


def _read_checkpoint(group) -> Checkpoint:
    history = persist.read_arrays(group, "history")
    return Checkpoint(persist.read_object(group["model"]), persist.read_object(group["optimiser"]),
                      History(**{k: history[k].tolist() for k in vars(History())}),
                      persist.read_state(group["rng"]), persist.read_config(group)["call"])


persist.register(Checkpoint, _write_checkpoint, _read_checkpoint)


# ------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Step:
    """What a rule did on one minibatch. ``grads``: {parameter name: gradient of the batch-mean cost}, names
    as the rule's ``parameters(model)``; ``loss``: the batch-mean cost at the prediction made before the
    update; ``logits``: (batch, classes), the prediction is their argmax; ``converged``: every relaxation
    of the step reached its tolerance; ``counts``: what the hardware did (the cost model's input), None
    where the rule does not count."""

    grads: dict
    loss: float
    logits: np.ndarray
    converged: bool
    counts: object = None


class Rule:
    """A learning rule that :func:`train` accepts.

    ``step(model, x, y, relaxation, rng) -> Step`` computes one minibatch's gradients (y one-hot,
    (batch, classes)); ``probe(model, x, y, relaxation)`` the cosine of the rule's gradient with the
    exact one on a fixed batch (NaN where the rule has none to compare); ``parameters(model)`` what the
    rule trains, updated in place by the optimiser (the model's parameters; a rule that trains more,
    e.g. a feedback network of its own, returns those too). The model needs ``parameters()``,
    ``evaluate(x, labels, relaxation)``, ``classes`` and ``network`` (written through its device after
    every update): a :class:`Classifier` has them. An ``ep.Estimator`` is a rule through :class:`EPRule`;
    a new rule is a subclass in its own module, named in :data:`RULES`."""

    name = "rule"

    def step(self, model, x, y, relaxation, rng) -> Step:
        """One minibatch: the gradients, and what the model predicted before the update."""
        raise NotImplementedError

    def probe(self, model, x, y, relaxation) -> float:
        """Cosine of this rule's gradient with the exact gradient on (x, y); NaN: nothing to compare."""
        return float("nan")

    def parameters(self, model) -> dict:
        """{name: array} of everything the rule trains, updated in place."""
        return model.parameters()


def named_gradients(est: ep.Estimate) -> dict:
    """An estimate's gradients by parameter name (``Classifier.parameters``'s names)."""
    g = est.gradients
    grads = {f"W:{k}": w for k, w in g.weights.items()}
    grads.update({f"b:{k}": b for k, b in g.biases.items()})
    grads.update({f"readout.{k}": v for k, v in est.readout.items()})
    return grads


def exact_cosine(model: Classifier, estimate, x, y, relaxation: ep.Relaxation, free=None) -> float:
    """Cosine over the network's weights and biases of ``estimate`` (a ``substrate.Gradients``) with the
    exact gradient at the free equilibrium of the nominal circuit (for a network on a device: what ideal
    hardware with the same weights would compute). ``free``: the free phase of ``model.network`` on x,
    reused when the network is its own nominal circuit."""
    nominal = getattr(model.network, "nominal", model.network)
    if free is None or nominal is not model.network:
        free = ep.free_phase(nominal, x, relaxation)
    exact = ep.estimate(nominal, x, y, model.cost, ep.Exact(), relaxation, free=free).gradients
    return compare(estimate, exact)["cosine"]["all"]


@dataclass(frozen=True)
class EPRule(Rule):
    """An estimator of :mod:`models.ep` (EP in any of its forms, or the exact gradient) as a training
    rule on a :class:`Classifier`: the gradient of the batch-mean cost from the estimator's phases."""

    estimator: ep.Estimator

    @property
    def name(self) -> str:
        return self.estimator.name

    def estimate(self, model: Classifier, x, y, relaxation, free=None) -> ep.Estimate:
        """The estimator's :class:`models.ep.Estimate` on one batch."""
        return ep.estimate(model.network, x, y, model.cost, self.estimator, relaxation, free=free)

    def step(self, model, x, y, relaxation, rng=None) -> Step:
        est = self.estimate(model, x, y, relaxation)
        return Step(named_gradients(est), est.loss, est.logits, est.converged)

    def probe(self, model, x, y, relaxation) -> float:
        free = ep.free_phase(model.network, x, relaxation)
        return exact_cosine(model, self.estimate(model, x, y, relaxation, free=free).gradients, x, y, relaxation,
                            free=free)


# rules by name for configs: every estimator of models.ep, and the rules other modules add (a module
# defining a rule registers it here: RULES["name"] = cls; importing models.local registers its rules)
RULES = dict(ep.ESTIMATORS)


def make_rule(name: str, **params) -> Rule:
    """A training rule by name (:data:`RULES`) with its parameters: an estimator of ``models.ep``
    becomes an :class:`EPRule`."""
    choice(name, "make_rule(name)", tuple(RULES))
    try:
        rule = RULES[name](**params)
    except TypeError as e:
        raise SubstrateValueError(f"rule {name!r}: {e}") from None
    return as_rule(rule)


def as_rule(rule) -> Rule:
    """``rule`` as a :class:`Rule` (an ``ep.Estimator`` is wrapped in :class:`EPRule`)."""
    if isinstance(rule, ep.Estimator):
        return EPRule(rule)
    if isinstance(rule, Rule):
        return rule
    raise SubstrateValueError(f"rule must be a models.train.Rule or an ep.Estimator, got {type(rule).__name__}")


def gradient_step(model: Classifier, x, y, rule, relaxation: ep.Relaxation,
                  homeostasis: Homeostasis | None = None, rng=None):
    """(the rule's :class:`Step`, {parameter name: gradient}, homeostasis penalty or NaN) for one
    minibatch; ``rule`` a :class:`Rule` or an ``ep.Estimator``."""
    step = as_rule(rule).step(model, x, y, relaxation, rng)
    grads = dict(step.grads)
    penalty = float("nan")
    if homeostasis is not None and homeostasis.strength > 0:
        penalty, hg = homeostasis.penalty(model.network, rng)
        for k, w in hg.items():
            grads[f"W:{k}"] = grads[f"W:{k}"] + homeostasis.strength * w
    return step, grads, penalty


def train(model: Classifier, data: Dataset, *, rule: Rule | ep.Estimator = ep.Centred(0.1),
          optimiser: Optimiser | None = None, epochs: int = 10, batch_size: int = 32,
          relaxation: ep.Relaxation = ep.Relaxation(on_failure="record"),
          homeostasis: Homeostasis | None = None, rng: np.random.Generator | None = None,
          probe: int = 64, progress: bool = True, on_epoch=None, checkpoint: str | os.PathLike | None = None,
          checkpoint_every: int = 1) -> History:
    """Train ``model`` on ``data`` for ``epochs`` epochs of shuffled minibatches; see the module
    docstring. ``probe``: the number of training samples (fixed, the first ones; all of them when
    there are fewer) on which the rule's gradient is compared with the exact one after every epoch
    (0: skip). ``on_epoch(history)`` is called after every epoch (to save partial results).

    ``checkpoint``: a file (HDF5, :class:`Checkpoint`) written atomically after every
    ``checkpoint_every`` epochs and after the last one. If it exists when training starts, training
    resumes from it: ``model``, ``optimiser`` and ``rng`` are set to their saved state in place and
    the epochs after it are run, so that a killed run, rerun with the same call, ends bit-identical to
    an uninterrupted one (apart from the wall-clock ``seconds``); a larger ``epochs`` continues a
    finished run. A checkpoint of another training (other arguments, data, or starting model) is
    refused."""
    if not isinstance(model, Classifier) and not all(hasattr(model, a) for a in MODEL_MEMBERS):
        raise SubstrateValueError(f"model must be a Classifier (or have {', '.join(MODEL_MEMBERS)}), "
                                  f"got {type(model).__name__}")
    if not isinstance(data, Dataset):
        raise SubstrateValueError(f"data must be a models.data.Dataset, got {type(data).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise SubstrateValueError("train needs rng, a numpy.random.Generator (seeded, passed explicitly)")
    count(epochs, "epochs", minimum=0, maximum=MAX_EPOCHS, why=_EPOCHS_WHY)
    count(batch_size, "batch_size")  # larger than the training set: one batch of all of it
    count(probe, "probe", minimum=0)  # larger than the training set: all of it
    for name, v, kind, what in (("rule", rule, (Rule, ep.Estimator), "a models.train.Rule or an ep.Estimator"),
                                ("relaxation", relaxation, ep.Relaxation, "an ep.Relaxation"),
                                ("optimiser", optimiser, (Optimiser, type(None)), "None or an Optimiser (SGD, Adam)"),
                                ("homeostasis", homeostasis, (Homeostasis, type(None)), "None or a Homeostasis")):
        if not isinstance(v, kind):
            raise SubstrateValueError(f"{name} must be {what}, got {type(v).__name__}")
    if on_epoch is not None and not callable(on_epoch):
        raise SubstrateValueError(f"on_epoch must be None or a callable(history), got {type(on_epoch).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise SubstrateValueError(f"checkpoint must be None or a file path, got {type(checkpoint).__name__}")
    count(checkpoint_every, "checkpoint_every")  # beyond epochs: the last epoch only
    if len(data.x_train) == 0 or len(data.x_test) == 0:
        raise SubstrateValueError(f"data has {len(data.x_train)} training and {len(data.x_test)} test samples; "
                                  "both must be >= 1")
    if data.n_features != model.network.inputs[0].size:
        raise SubstrateValueError(f"the data have {data.n_features} features but the network's input "
                                  f"{model.network.inputs[0].name!r} has {model.network.inputs[0].size}")
    labels = np.concatenate([data.y_train, data.y_test])
    if labels.min() < 0 or labels.max() >= model.classes:
        raise SubstrateValueError(f"the data's labels span {labels.min()}..{labels.max()} but the model has "
                                  f"{model.classes} classes (0..{model.classes - 1})")
    optimiser = optimiser or SGD(0.01, 0.9)
    learner = as_rule(rule)
    params = learner.parameters(model)
    xp, yp = data.x_train[:probe], one_hot(data.y_train[:probe], model.classes)
    call = None if checkpoint is None else _call(model, data, rule, optimiser, batch_size, relaxation, homeostasis,
                                                 rng, probe)
    resume = checkpoint is not None and os.path.exists(checkpoint)
    hist = _resume(checkpoint, call, model, optimiser, rng, epochs) if resume else History()

    def record(epoch, train_loss, train_acc, penalty, failed, seconds):
        test_loss, test_acc, _ = model.evaluate(data.x_test, data.y_test, relaxation)
        cos = learner.probe(model, xp, yp, relaxation) if probe else float("nan")
        angles = weight_angles(model.network)
        for key, value in (("epoch", epoch), ("train_loss", train_loss), ("train_accuracy", train_acc),
                           ("test_loss", test_loss), ("test_accuracy", test_acc), ("grad_cosine", cos),
                           ("weight_angle", angles.get("all", float("nan"))), ("asymmetry_penalty", penalty),
                           ("nonconverged", failed), ("seconds", seconds)):
            getattr(hist, key).append(value)

    live = live_progress()  # off a terminal: the line per epoch below, no bar per batch
    if not resume:
        tr_loss, tr_acc, _ = model.evaluate(data.x_train, data.y_train, relaxation)
        record(0, tr_loss, tr_acc, float("nan"), 0.0, 0.0)
    for epoch in range(hist.epoch[-1] + 1, epochs + 1):
        t0 = time.perf_counter()
        batches = minibatches(len(data.x_train), batch_size, rng)
        loss_sum = correct = failed = 0
        penalty = float("nan")
        bar = tqdm(batches, desc=f"epoch {epoch}/{epochs} {learner.name}", disable=not (progress and live), leave=False)
        for idx in bar:
            x, labels = data.x_train[idx], data.y_train[idx]
            step, grads, penalty = gradient_step(model, x, one_hot(labels, model.classes), learner, relaxation,
                                                 homeostasis, rng)
            optimiser.step(params, grads)
            for net in getattr(model, "networks", (model.network,)):
                net.write()  # through the device's programming or update model, if any
            loss_sum += step.loss * len(idx)
            correct += int(np.sum(np.argmax(step.logits, axis=1) == labels))
            failed += 0 if step.converged else 1
            bar.set_postfix(loss=f"{step.loss:.3f}")
        n = len(data.x_train)
        record(epoch, loss_sum / n, correct / n, penalty, failed / len(batches), time.perf_counter() - t0)
        if progress:
            tqdm.write(f"epoch {epoch}: train {hist.train_accuracy[-1]:.3f}, test {hist.test_accuracy[-1]:.3f}, "
                       f"grad cosine {hist.grad_cosine[-1]:.4f}, {hist.seconds[-1]:.1f} s")
        if on_epoch is not None:
            on_epoch(hist)
        if checkpoint is not None and (epoch % checkpoint_every == 0 or epoch == epochs):
            persist.save(Checkpoint(model, optimiser, hist, rng, call), checkpoint)
    return hist


def live_progress(stream=None) -> bool:
    """Whether a progress bar on ``stream`` (default stderr) redraws itself in place: in a notebook
    (tqdm.auto's widget) or on a terminal. In a log file or a pipe every redraw stays, one copy of the
    bar per update (180 kB for the quickstart), so progress is then written as lines."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
    return notebook or bool(isatty is not None and isatty())


def _call(model, data, rule, optimiser, batch_size, relaxation, homeostasis, rng, probe) -> dict:
    """What a resumed training must share with the one that wrote the checkpoint (JSON)."""
    cost = getattr(model, "cost", None)  # a rule's own model may have none
    return {"model": _digest([repr(model.network), getattr(cost, "layer", None), getattr(cost, "kind", None),
                              repr(getattr(model.network, "device", None)), getattr(model.network, "seed", None)]
                             + [x.tau for x in model.network.layers]
                             + [c.mask for c in model.network.connections if c.mask is not None]),
            "start": _digest(list(model.parameters().values())),  # the weights training starts from
            "data": _digest([data.x_train, data.y_train, data.x_test, data.y_test]),
            "rule": _described(rule), "optimiser": _described(optimiser), "batch_size": int(batch_size),
            "relaxation": _described(relaxation), "homeostasis": _described(homeostasis),
            "generator": type(rng.bit_generator).__name__, "probe": int(probe)}


def _described(obj) -> str:
    if isinstance(obj, Optimiser):
        return f"{type(obj).__name__}({_hyperparameters(obj)})"
    return repr(obj) if obj is None or dataclasses.is_dataclass(obj) else type(obj).__qualname__


def _digest(items) -> str:
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, np.ndarray) or isinstance(item, float):
            a = np.ascontiguousarray(item)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(repr(item).encode())
    return h.hexdigest()


def _resume(path, call: dict, model: Classifier, optimiser: Optimiser, rng, epochs: int) -> History:
    """Set ``model``, ``optimiser`` and ``rng`` in place to the state saved in the checkpoint ``path``;
    return its history."""
    ck = persist.load(path)
    if not isinstance(ck, Checkpoint):
        raise SubstrateValueError(f"checkpoint={os.fspath(path)!r} holds a {type(ck).__name__}, not a training "
                                  "checkpoint; pass another path")
    saved = ck.model.parameters()
    differ = [k for k in call if ck.call.get(k) != call[k]]
    if differ == ["start"] and all(np.array_equal(p, saved[k]) for k, p in model.parameters().items()):
        differ = []  # the model is the checkpoint's, trained further in this process: a continuation
    if differ:
        raise SubstrateValueError(f"checkpoint={os.fspath(path)!r} was written by another training: its "
                                  f"{', '.join(differ)} differ from this call's; delete it to start afresh, or "
                                  "pass another checkpoint path")
    if ck.epoch > epochs:
        raise SubstrateValueError(f"checkpoint={os.fspath(path)!r} holds {ck.epoch} epochs, more than epochs={epochs}")
    for k, p in model.parameters().items():
        p[...] = saved[k]
    if isinstance(model.network, DeviceNetwork):
        persist.set_device_state(model.network, persist.device_state(ck.model.network))
    optimiser.state = ck.optimiser.state
    rng.bit_generator.state = ck.rng.bit_generator.state
    return ck.history
