"""Forward-only training: Hinton's Forward-Forward algorithm ("The Forward-Forward algorithm: some
preliminary investigations", 2022) on the substrate.

Each layer is a circuit of its own (one crossbar, relaxed by the engine), and between layers the
activity vector is normalised to unit length (a peripheral circuit), so that a layer sees only the
direction of the one below, not its goodness:

    h_1 = rho(W_1 x~ + b_1),   h_l = rho(W_l h^_{l-1} + b_l),   h^ = h / (||h|| + 1e-4)
    G_l = (1/d_l) sum_j h_l[j]^2  (``goodness="mean"``)  or  sum_j h_l[j]^2  (``"sum"``)

x~ is the input carrying a label: positive data the true label, negative data a wrong one (each
sample's ``negatives`` N wrong labels distinct, drawn uniformly among the K-1 others from the
training generator). With ``label="replace"`` (Hinton's MNIST setting) the one-hot label overwrites
the first K inputs; with ``"append"`` it enters the first layer through input lines of its own
(W_1 x + U y). Every layer minimises its own loss, its input held fixed (no gradient between layers,
no backward pass):

    L_l = (1/B) sum_b [ softplus(theta - G_l(x+_b)) + (1/N) sum_n softplus(G_l(x-_bn) - theta) ]
    dL_l/du_l = dL_l/dG_l (2/d_l or 2) h_l * rho'(u_l),   dL_l/dG(x+) = -sigmoid(theta - G)/B,
                                                         dL_l/dG(x-) = sigmoid(G - theta)/(B N)
    dL_l/dW_l = sum_b dL_l/du_l[b] h^_{l-1}[b]^T,         dL_l/db_l = sum_b dL_l/du_l[b]

(theta = ``threshold``). ForwardGNN's layer-local forward-forward (Park et al., "Forward learning of
graph neural networks", ICLR 2024; its node-classification variant with label appending) on an MLP
is this rule with ``label="append"``, ``normalise_input=True`` (the first layer's input, features and
label together, also scaled to unit length), ``goodness="sum"`` and N >= 1 negatives; it trains the
layers one after another (greedily), a schedule that :func:`models.train.train` does not run (it
trains them together, as Hinton does). Inference is by goodness (Hinton's): the input is run with each
of the K labels, and the prediction is the label of largest goodness summed over the layers; the
model's logits are these K summed goodnesses, and its cost the cross-entropy of their softmax. Hinton
uses ReLU; the circuit's nearest activation is ``hard_sigmoid``, clip(u, 0, 1), the default here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from substrate import Connection, Input, Layer, Network, devices, persist
from substrate import counts as C
from substrate.activations import rho_prime
from substrate.errors import SubstrateValueError
from substrate.validate import choice, count, flag, positive

from .. import ep
from ..data import one_hot
from ..train import RULES, Rule, Step
from ._layers import local_gradients, step_counts

NORM_EPS = 1e-4  # added to ||h|| before normalising, so that a silent layer passes zeros on
LABELS = ("replace", "append")
GOODNESS = ("mean", "sum")


def layer_prefix(i: int) -> str:
    """The prefix of layer i's parameter names (``L0.W:x->h``, ``L0.b:h``, ``L0.W:label->h``)."""
    return f"L{i}."


@dataclass(eq=False)
class ForwardForwardModel:
    """A stack of one-layer circuits ``layers`` (input ``x``, layer ``h``; the first also ``label`` with
    ``label="append"``) for ``classes`` classes; ``normalise_input``: the first layer's input (with its
    label) scaled to unit length too. ``network`` is the first (it takes the data); ``networks`` all
    of them (each written through its device after an update)."""

    layers: list
    classes: int
    label: str = "replace"
    normalise_input: bool = False

    def __post_init__(self):
        choice(self.label, "ForwardForwardModel(label)", LABELS)
        flag(self.normalise_input, "ForwardForwardModel(normalise_input)")
        count(self.classes, "ForwardForwardModel(classes)", minimum=2)
        if self.label == "replace" and self.layers[0].inputs_by_name["x"].size < self.classes:
            raise SubstrateValueError(f"label='replace' overwrites the first {self.classes} inputs, but there are "
                                      f"{self.layers[0].inputs_by_name['x'].size}; use label='append'")

    @classmethod
    def layered(cls, sizes, rng: np.random.Generator, *, activation: str = "hard_sigmoid", tau: float = 1.0,
                label: str = "replace", normalise_input: bool = False, dtype="float64") -> ForwardForwardModel:
        """``sizes`` = (inputs, hidden..., classes): one circuit per hidden layer. Weights and biases
        uniform +-1/sqrt(fan_in) (PyTorch's nn.Linear default; fan_in counts the label lines)."""
        if len(sizes) < 3:
            raise SubstrateValueError(f"sizes={sizes!r}: forward-forward needs inputs, >= 1 hidden layer, classes")
        choice(label, "label", LABELS)
        K, dt = sizes[-1], np.dtype(dtype)
        layers = []
        for i, (d_in, d) in enumerate(itertools.pairwise(sizes[:-1])):
            extra = K if i == 0 and label == "append" else 0
            k = 1.0 / math.sqrt(d_in + extra)
            inputs, conns = [Input("x", d_in)], [Connection("x", "h", rng.uniform(-k, k, (d, d_in)).astype(dt))]
            if extra:
                inputs.append(Input("label", K))
                conns.append(Connection("label", "h", rng.uniform(-k, k, (d, K)).astype(dt)))
            layers.append(Network([Layer("h", d, tau=tau, activation=activation, bias=rng.uniform(-k, k, d).astype(dt))],
                                  conns, inputs=inputs))
        return cls(layers, K, label, normalise_input)

    def on_device(self, device: devices.Device, rng: np.random.Generator) -> ForwardForwardModel:
        """Every layer's circuit on ``device`` (its own crossbars and draws)."""
        return ForwardForwardModel([devices.attach(n, device, rng) for n in self.layers], self.classes, self.label,
                                   self.normalise_input)

    @property
    def network(self) -> Network:
        """The first layer's circuit (it takes the data)."""
        return self.layers[0]

    @property
    def networks(self) -> tuple:
        """Every layer's circuit."""
        return tuple(self.layers)

    def parameters(self) -> dict:
        """{``L{i}.W:x->h``, ``L{i}.b:h`` (and ``L0.W:label->h``): array} of every layer, updated in place."""
        params = {}
        for i, net in enumerate(self.layers):
            params.update({f"{layer_prefix(i)}W:{c.name}": c.weight for c in net.connections})
            params[f"{layer_prefix(i)}b:h"] = net.layer("h").bias
        return params

    def embed(self, x, y) -> dict:
        """The first circuit's inputs for data x (batch, features) carrying one-hot labels y."""
        x = np.array(x, dtype=float)
        if self.label == "replace":
            x[:, :self.classes] = y
        inputs = {"x": x, "label": np.asarray(y, dtype=float)} if self.label == "append" else {"x": x}
        if self.normalise_input:  # the features and the label scaled together
            norm = np.sqrt(sum(np.sum(a * a, axis=1, keepdims=True) for a in inputs.values())) + NORM_EPS
            inputs = {k: a / norm for k, a in inputs.items()}
        return inputs

    def run(self, x, y, relaxation: ep.Relaxation) -> list:
        """[(inputs, relaxed solution, activities h)] of every layer for x carrying labels y."""
        out, inputs = [], self.embed(x, y)
        for net in self.layers:
            sol = ep.free_phase(net, inputs, relaxation)
            h = net.activities(sol.u)
            out.append((inputs, sol, h))
            inputs = {"x": h / (np.linalg.norm(h, axis=1, keepdims=True) + NORM_EPS)}
        return out

    def run_flops(self, samples: int) -> int:
        """The digital operations of :meth:`run` on ``samples`` samples: the normalisations (a
        multiply-add and a division per value: of the input with ``normalise_input``, of every layer's
        activities) and each layer's mean-of-squares goodness (a multiply-add per value)."""
        widths = [net.layer("h").size for net in self.layers]
        first = sum(x.size for x in self.layers[0].inputs) if self.normalise_input else 0
        return (3 * first + 5 * sum(widths)) * samples

    def scored(self, x, relaxation: ep.Relaxation) -> tuple:
        """(goodness summed over the layers for each label (batch, K), every layer's relaxation on the
        K labelled copies of x)."""
        x = np.asarray(x, dtype=float)
        B, K = len(x), self.classes
        labels = np.repeat(np.eye(K), B, axis=0)  # all samples with label 0, then label 1, ...
        passes = self.run(np.tile(x, (K, 1)), labels, relaxation)
        g = sum(goodness(h) for _, _, h in passes)
        return g.reshape(K, B).T, [sol for _, sol, _ in passes]

    def scores(self, x, relaxation: ep.Relaxation) -> tuple:
        """(goodness summed over the layers for each label (batch, K), every relaxation converged)."""
        s, sols = self.scored(x, relaxation)
        return s, all(sol.ok for sol in sols)

    def evaluate(self, x, labels, relaxation: ep.Relaxation, batch: int = 1000) -> tuple:
        """(mean cross-entropy of softmax(scores), accuracy, fraction of batches with a relaxation that
        missed its tolerance) on a data set."""
        count(batch, "batch", relation=True)
        if len(x) == 0 or len(x) != len(labels):
            raise SubstrateValueError(f"x has {len(x)} samples and labels {len(labels)}: they must match and be >= 1")
        loss, correct, failed = 0.0, 0, 0
        for i in range(0, len(x), batch):
            s, ok = self.scores(x[i:i + batch], relaxation)
            yb = np.asarray(labels[i:i + batch])
            loss += float(np.sum(cross_entropy(s, yb)))
            correct += int(np.sum(np.argmax(s, axis=1) == yb))
            failed += 0 if ok else 1
        return loss / len(x), correct / len(x), failed / math.ceil(len(x) / batch)


def goodness(h, kind: str = "mean") -> np.ndarray:
    """G = mean_j h_j^2 (or sum_j h_j^2) per sample."""
    return np.mean(h * h, axis=1) if kind == "mean" else np.sum(h * h, axis=1)


def wrong_labels(labels, classes: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(batch, n) distinct labels other than each sample's, uniformly (a random order of the K-1 others)."""
    r = rng.random((len(labels), classes))
    r[np.arange(len(labels)), labels] = np.inf
    return np.argsort(r, axis=1)[:, :n]


def cross_entropy(scores, labels) -> np.ndarray:
    """-log softmax(scores)[label] per sample."""
    z = scores - scores.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), labels]


def softplus(z):
    """log(1 + e^z), without overflow."""
    return np.logaddexp(0.0, z)


def sigmoid(z):
    """1 / (1 + e^-z), without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True)
class ForwardForward(Rule):
    """Hinton's Forward-Forward (see the module docstring for the equations): ``threshold`` theta of
    the goodness, ``goodness`` "mean" or "sum" of squares, ``negatives`` N wrong labels per sample
    (at most K-1). Each step relaxes every layer on the positive and the negative batches ((1 + N) B
    samples), and on the K labelled copies of the batch for the prediction it reports (inference
    sums the layers' mean-of-squares goodness, whichever trained them). ``probe``: NaN (the rule
    descends no global cost whose exact gradient it could be compared with). ``Step.counts``: every
    layer's relaxations, the K-label scoring pass (the step's prediction) included, and in digital the
    normalisations, goodnesses, errors and outer products."""

    threshold: float = 0.5
    goodness: str = "mean"
    negatives: int = 1
    name = "forward_forward"

    def __post_init__(self):
        positive(self.threshold, "ForwardForward(threshold)")
        choice(self.goodness, "ForwardForward(goodness)", GOODNESS)
        count(self.negatives, "ForwardForward(negatives)")

    def step(self, model, x, y, relaxation, rng=None) -> Step:
        """Every layer relaxed on the positive and negative data, and its local gradient."""
        if not isinstance(model, ForwardForwardModel):
            raise SubstrateValueError(f"forward_forward trains a models.local.forward_forward.ForwardForwardModel, "
                                      f"got {type(model).__name__}")
        if not isinstance(rng, np.random.Generator):
            raise SubstrateValueError("forward_forward draws its negative labels from rng, a numpy.random.Generator")
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        B, K, N = len(x), model.classes, self.negatives
        if N >= K:
            raise SubstrateValueError(f"ForwardForward(negatives={N}): at most classes - 1 = {K - 1} wrong labels")
        labels = np.argmax(y, axis=1)
        scores, scoring = model.scored(x, relaxation)  # the prediction before the update
        wrong = wrong_labels(labels, K, N, rng).T.ravel()  # negative set n is samples n B .. (n + 1) B - 1
        M = (1 + N) * B
        passes = model.run(np.tile(x, (1 + N, 1)), np.concatenate([y, one_hot(wrong, K)]), relaxation)
        grads, ok = {}, all(sol.ok for sol in scoring)
        # the layers' passes, the scores' sums over layers and their cross-entropy
        flops, held = model.run_flops(K * B + M) + (len(passes) + 5) * K * B, K * B
        for i, (net, (inputs, sol, h)) in enumerate(zip(model.layers, passes)):
            g = goodness(h, self.goodness)
            dg = np.concatenate([-sigmoid(self.threshold - g[:B]) / B, sigmoid(g[B:] - self.threshold) / (B * N)])
            layer = net.layer("h")
            dgdu = 2.0 / layer.size if self.goodness == "mean" else 2.0
            e = dg[:, None] * dgdu * h * rho_prime(layer.activation, sol.u)
            grads.update(local_gradients(net, inputs, sol, {"h": e}, prefix=layer_prefix(i)))
            ok = ok and sol.ok
            # dL/dG (a sigmoid: 4 per sample), the error (4 per value) and the outer products
            flops += 4 * M + 4 * layer.size * M + C.parameter_flops(net, M)
            held += 3 * layer.size * M  # u, h and the error of the positive and negative passes
        return Step(grads, float(np.mean(cross_entropy(scores, labels))), scores, ok,
                    step_counts([sol.counts for sol in scoring] + [sol.counts for _, sol, _ in passes], B, flops, held))


def _write_model(group, model: ForwardForwardModel):
    persist.write_config(group, {"classes": model.classes, "label": model.label,
                                 "normalise_input": model.normalise_input, "layers": len(model.layers)})
    for i, net in enumerate(model.layers):
        persist.write_object(group.create_group(f"layer{i}"), net)


def _read_model(group) -> ForwardForwardModel:
    config = persist.read_config(group)
    layers = [persist.read_object(group[f"layer{i}"]) for i in range(config.pop("layers"))]
    return ForwardForwardModel(layers, **config)


RULES[ForwardForward.name] = ForwardForward
persist.register(ForwardForwardModel, _write_model, _read_model)
