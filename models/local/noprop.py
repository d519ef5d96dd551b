"""NoProp (Li, Teh & Pascanu 2025, "NoProp: training neural networks without full back-propagation or
full forward-propagation", arXiv:2503.24322): every block learns on its own to denoise a noisy label
embedding; no error crosses from one block to another.

Label embedding u_y: the one-hot vector of the class (the paper's fixed one-hot embedding; then the
KL term of its objective is 0). Noise schedule, t in [0, 1] (0: pure noise, 1: the label), a cosine
schedule kept below 1 by ``s``:

    abar(t) = (1 - s) sin^2(pi t / 2),    SNR(t) = abar / (1 - abar),    q(z_t | y) = N(sqrt(abar) u_y, (1 - abar) I).

A block u_theta(z, x[, t]) is a feed-forward substrate circuit x, z[, t] -> hidden -> linear outputs (its
prediction of u_y), relaxed on the device; its gradient within the block is the circuit's exact
(implicit) gradient, backprop inside the block and nowhere else. A digital linear readout p(y | z_1)
= softmax(W_o z + b_o) classifies the last latent.

Discrete time (NoProp-DT, ``noprop_dt``), T blocks, t_k = k/T, abar_k = abar(t_k). Block k is trained on
z_{k-1} ~ q(z_{k-1} | y), independently of every other block, on

    L = E_q[-log p(y | z_T)] + (eta / 2) sum_{k=1}^T (SNR_k - SNR_{k-1}) ||u_k(z_{k-1}, x) - u_y||^2.

Inference from z_0 ~ N(0, I): z_k = a_k u_k(z_{k-1}, x) + b_k z_{k-1} + sqrt(c_k) eps_k, the posterior
q(z_k | z_{k-1}, u_y) with u_y replaced by the block's prediction: with alpha = abar_{k-1} / abar_k,
c_k = 1 / (1/(1 - abar_k) + alpha/(1 - alpha)), a_k = c_k sqrt(abar_k)/(1 - abar_k), b_k = c_k sqrt(alpha)/(1 - alpha).
The T blocks are disjoint sub-circuits of one chip (one network, block-diagonal masks); block k reads z
on its own input lines, so one relaxation trains them all.

Continuous time (NoProp-CT, ``noprop_ct``), one block u(z, x, t) with t fed as Fourier features
cos(pi j t), j = 1..F, trained at t ~ U(0, 1), z_t ~ q(z_t | y) on

    L = E_q[-log p(y | z_1)] + (eta / 2) E_t[SNR'(t) ||u(z_t, x, t) - u_y||^2].

Inference is the probability-flow ODE of the schedule from z(0) ~ N(0, I) (z_t = sqrt(abar) u +
sqrt(1 - abar) eps with eps held, u replaced by the block's prediction):

    dz/dt = abar' / (2 (1 - abar)) (u(z, x, t) / sqrt(abar) - z),

integrated with the engine's fixed-step tableaux (``models.local._ode``; every stage a relaxation of the
circuit on its device); abar'/sqrt(abar) = sqrt(1 - s) pi cos(pi t / 2) keeps the field finite at t = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from substrate import Connection, Implicit, Input, Layer, Network, persist
from substrate.adjoint import implicit_counts, adjoint_solve
from substrate.errors import SubstrateValueError
from substrate.validate import count, fraction, positive

from .. import ep
from ..data import one_hot
from ..train import RULES, Rule, Step
from ._layers import step_counts
from ._ode import rk_step, tableau

OUT = "u"  # the blocks' output layer


def schedule(t, s: float):
    """(abar, sqrt(abar), d abar/dt) at times t of the schedule (module docstring)."""
    t = np.asarray(t, float)
    sin, cos = np.sin(0.5 * np.pi * t), np.cos(0.5 * np.pi * t)
    return (1 - s) * sin * sin, math.sqrt(1 - s) * sin, (1 - s) * np.pi * sin * cos


def snr(abar):
    """abar / (1 - abar)."""
    return abar / (1 - abar)


def dt_coefficients(blocks: int, s: float) -> tuple:
    """(a, b, c, weights) of NoProp-DT's T = ``blocks`` steps: inference z_k = a_k u_k + b_k z_{k-1} +
    sqrt(c_k) eps, and each block's loss weight SNR_k - SNR_{k-1} (arrays of length T)."""
    abar = schedule(np.arange(blocks + 1) / blocks, s)[0]
    alpha = abar[:-1] / abar[1:]
    c = 1.0 / (1.0 / (1.0 - abar[1:]) + alpha / (1.0 - alpha))
    a = c * np.sqrt(abar[1:]) / (1.0 - abar[1:])
    b = c * np.sqrt(alpha) / (1.0 - alpha)
    return a, b, c, snr(abar[1:]) - snr(abar[:-1])


def block_network(features: int, classes: int, hidden, blocks: int, time_features: int, rng: np.random.Generator,
                  activation: str = "logistic", init_scale: float = 1.0) -> Network:
    """``blocks`` disjoint feed-forward circuits (x, z[, t]) -> hidden layers -> ``classes`` linear outputs
    in one network: layers h1..hK of blocks x width and ``u`` of blocks x classes, block-diagonal masks
    between them and on the z lines (block k reads z[k classes:(k+1) classes]). Weights uniform in
    +-init_scale/sqrt(fan_in) of one block."""
    hidden = [int(h) for h in hidden]
    if not hidden:
        raise SubstrateValueError("hidden: a NoProp block needs at least one hidden layer")

    def uniform(shape, fan_in):
        bound = init_scale / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape)

    def diagonal(post, pre):
        return np.kron(np.eye(blocks), np.ones((post, pre)))

    names = [f"h{i + 1}" for i in range(len(hidden))] + [OUT]
    widths = hidden + [classes]
    fan_in = [features + classes + time_features] + hidden
    layers = [Layer(nm, blocks * w, activation=activation if nm != OUT else "identity",
                    bias=uniform(blocks * w, f)) for nm, w, f in zip(names, widths, fan_in)]
    inputs = [Input("x", features), Input("z", blocks * classes)]
    conns = [Connection("x", "h1", uniform((blocks * hidden[0], features), fan_in[0])),
             Connection("z", "h1", uniform((blocks * hidden[0], blocks * classes), fan_in[0]),
                        mask=diagonal(hidden[0], classes))]
    if time_features:
        inputs.append(Input("t", time_features))
        conns.append(Connection("t", "h1", uniform((blocks * hidden[0], time_features), fan_in[0])))
    for pre, post, w_pre, w_post in zip(names, names[1:], widths, widths[1:]):
        conns.append(Connection(pre, post, uniform((blocks * w_post, blocks * w_pre), w_pre),
                                mask=diagonal(w_post, w_pre)))
    return Network(layers, conns, inputs)


def time_features(t, count_: int) -> np.ndarray:
    """cos(pi j t), j = 1..count_, for times t (batch,): NoProp-CT's time input."""
    return np.cos(np.pi * np.outer(np.asarray(t, float), np.arange(1, count_ + 1)))


@dataclass(eq=False)
class NoPropModel:
    """The blocks (one substrate network, ``block_network``), the readout p(y | z) = softmax(W_o z + b_o)
    and the schedule; ``continuous``: NoProp-CT (one block, time input, ``steps`` of ``method`` at
    inference), else NoProp-DT (``blocks`` blocks). Inference draws z_0 (and DT's noise) from a generator
    seeded by ``seed`` at every call, so evaluations are repeatable."""

    network: Network
    readout_weight: np.ndarray
    readout_bias: np.ndarray
    blocks: int
    continuous: bool = False
    s: float = 0.01
    steps: int = 20
    method: str = "rk4"
    time_features: int = 8
    seed: int = 0

    @classmethod
    def build(cls, sizes, rng: np.random.Generator, *, continuous: bool = False, blocks: int = 10, s: float = 0.01,
              steps: int = 20, method: str = "rk4", time_features: int = 8, activation: str = "logistic",
              init_scale: float = 1.0) -> NoPropModel:
        """``sizes`` = (inputs, hidden..., classes) of one block; NoProp-DT with ``blocks`` blocks, or
        NoProp-CT (``continuous``) with one. The readout starts at zero."""
        if len(sizes) < 3:
            raise SubstrateValueError(f"sizes={sizes!r}: a NoProp block needs inputs, >= 1 hidden layer, classes")
        count(blocks, "blocks", maximum=1000, why="one block per step of the discrete schedule")
        if not 0 < fraction(s, "s", upper_open=True):  # 1 - abar >= s: SNR stays finite
            raise SubstrateValueError(f"s={s!r} must be in (0, 1): abar(1) = 1 - s < 1 keeps SNR(1) finite")
        count(steps, "steps")
        tableau(method, "NoPropModel")
        count(time_features, "time_features", maximum=64, why="Fourier features of t")
        features, classes = sizes[0], sizes[-1]
        nb = 1 if continuous else blocks
        net = block_network(features, classes, sizes[1:-1], nb, time_features if continuous else 0, rng,
                            activation, init_scale)
        return cls(net, np.zeros((classes, classes)), np.zeros(classes), nb, bool(continuous), float(s), int(steps),
                   method, int(time_features), int(rng.integers(2 ** 31)))

    @property
    def classes(self) -> int:
        """The number of classes (the width of the label embedding)."""
        return self.readout_bias.shape[0]

    def parameters(self) -> dict:
        """{name: array} of the blocks' weights and biases and the readout, updated in place."""
        params = {f"W:{c.name}": c.weight for c in self.network.connections}
        params.update({f"b:{x.name}": x.bias for x in self.network.layers})
        params.update({"readout.weight": self.readout_weight, "readout.bias": self.readout_bias})
        return params

    def logits(self, z):
        """The readout's logits W_o z + b_o for latents z (batch, classes)."""
        return z @ self.readout_weight.T + self.readout_bias

    def inputs(self, x, z, t=None) -> dict:
        """The network's inputs: z (batch, classes) on every block's lines (DT) or with the time features (CT)."""
        xs = {"x": x, "z": np.tile(z, (1, self.blocks))}
        if self.continuous:
            xs["t"] = time_features(np.broadcast_to(t, (len(x),)), self.time_features)
        return xs

    def relaxed(self, x, z, relaxation, t=None) -> tuple:
        """(the blocks' outputs (batch, blocks, classes), the relaxation of the circuit)."""
        sol = ep.free_phase(self.network, self.inputs(x, z, t), relaxation)
        u = sol.u[:, self.network.slices[OUT]]
        return u.reshape(len(x), self.blocks, self.classes), sol

    def predict(self, x, z, relaxation, t=None) -> tuple:
        """(the blocks' outputs (batch, blocks, classes), converged): one relaxation of the circuit."""
        u, sol = self.relaxed(x, z, relaxation, t)
        return u, sol.ok

    def inference(self, x, relaxation, rng: np.random.Generator) -> tuple:
        """(z at the end of inference (batch, classes), every relaxation of the circuit it ran, its
        digital operations: DT's update a_k u + b_k z + sqrt(c_k) eps, 5 per value and step; CT's
        field, 3 per value and stage, and the stages' combination, 2 per value and stage)."""
        z = rng.standard_normal((len(x), self.classes))
        phases = []
        if not self.continuous:
            a, b, c, _ = dt_coefficients(self.blocks, self.s)
            for k in range(self.blocks):
                u, sol = self.relaxed(x, z, relaxation)
                phases.append(sol)
                z = a[k] * u[:, k] + b[k] * z + math.sqrt(c[k]) * rng.standard_normal(z.shape)
            return z, phases, 5 * z.size * self.blocks

        def field(t, z):
            abar, _, _ = schedule(t, self.s)
            u, sol = self.relaxed(x, z, relaxation, t)
            phases.append(sol)
            g = 0.5 * (1 - self.s) * np.pi * math.sin(0.5 * np.pi * t) * math.cos(0.5 * np.pi * t) / (1 - abar)
            lift = 0.5 * math.sqrt(1 - self.s) * np.pi * math.cos(0.5 * np.pi * t) / (1 - abar)
            return lift * u[:, 0] - g * z  # abar'/(2(1 - abar)) (u/sqrt(abar) - z), finite at t = 0

        tab, h = tableau(self.method, "NoPropModel"), 1.0 / self.steps
        for i in range(self.steps):
            z = rk_step(field, i * h, z, h, tab)
        return z, phases, 5 * z.size * len(phases)

    def infer(self, x, relaxation, rng: np.random.Generator) -> tuple:
        """(z at the end of inference (batch, classes), every relaxation converged)."""
        z, phases, _ = self.inference(x, relaxation, rng)
        return z, all(sol.ok for sol in phases)

    def evaluate(self, x, labels, relaxation, batch: int = 1000) -> tuple:
        """(mean cross-entropy of the readout at the inferred z, accuracy, fraction of batches with a
        relaxation that missed its tolerance)."""
        count(batch, "batch", relation=True)
        if len(x) == 0 or len(x) != len(labels):
            raise SubstrateValueError(f"x has {len(x)} samples and labels {len(labels)}: they must match and be >= 1")
        rng = np.random.default_rng(self.seed)
        loss, correct, failed = 0.0, 0, 0
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], labels[i:i + batch]
            z, ok = self.infer(xb, relaxation, rng)
            logits = self.logits(z)
            loss += float(np.sum(_cross_entropy(logits, one_hot(yb, self.classes))[0]))
            correct += int(np.sum(np.argmax(logits, axis=1) == yb))
            failed += 0 if ok else 1
        return loss / len(x), correct / len(x), failed / math.ceil(len(x) / batch)


def _cross_entropy(logits, y):
    """(-log softmax(logits)_y per sample, softmax - y)."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.sum(y * logp, axis=1), np.exp(logp) - y


def weighted_squared_error_gradient(network, xs, target, weights, relaxation) -> tuple:
    """The exact gradient of (1/B) sum_b 1/2 sum_j w_bj (u_bj - target_bj)^2 of the linear output layer
    ``u`` at the circuit's equilibrium (implicit differentiation: backprop through the feed-forward
    block): ({parameter name: gradient}, free phase, counts: the relaxation, the error (3 operations
    per output) and the implicit gradient's digital work, as ``substrate.adjoint`` counts it)."""
    free = ep.free_phase(network, xs, relaxation)
    vf = ep._field_of(network, xs, free, "NoProp", relaxation.tol)
    sl = network.slices[OUT]
    dl = np.zeros_like(free.u)
    dl[:, sl] = weights * (free.u[:, sl] - target)  # the outputs are linear: dl/du = dl/dr
    adj = adjoint_solve(vf, free.u, -dl, Implicit())
    g = vf.param_vjp(free.u, adj.lam)
    nb = free.u.shape[0]
    grads = {f"W:{k}": w / nb for k, w in g["weights"].items()}
    grads.update({f"b:{k}": b / nb for k, b in g["biases"].items()})
    counts = implicit_counts(free, adj)
    return grads, free, counts.replace(flops=counts.flops + 3 * np.size(target))


class _NoProp(Rule):
    """What both NoProp rules share: the readout's cross-entropy on z_1 ~ q(z_1 | y), the blocks' weighted
    denoising loss, and the prediction before the update by inference. ``Step.counts``: the
    inference's relaxations (DT: T, CT: steps x stages) and its digital updates, the training
    relaxation with its implicit gradient, and the readout."""

    continuous = False

    def model(self, sizes, rng, **options) -> NoPropModel:
        """A :class:`NoPropModel` for this rule (``options``: :meth:`NoPropModel.build`'s)."""
        return NoPropModel.build(sizes, rng, continuous=self.continuous, **options)

    def training_latents(self, model, y, rng) -> tuple:
        """(z fed to the blocks (batch, blocks x classes), times or None, loss weights (batch, blocks x classes))."""
        raise NotImplementedError

    def step(self, model, x, y, relaxation, rng) -> Step:
        if not isinstance(model, NoPropModel):
            raise SubstrateValueError(f"{self.name} trains a NoPropModel (rule.model(sizes, rng)), got "
                                      f"{type(model).__name__}")
        if not isinstance(rng, np.random.Generator):
            raise SubstrateValueError(f"{self.name} draws its latents from rng, a numpy.random.Generator")
        z_pred, inferred, flops = model.inference(x, relaxation, rng)  # the prediction before the update
        logits = model.logits(z_pred)
        loss = float(np.mean(_cross_entropy(logits, y)[0]))
        z, t, w = self.training_latents(model, y, rng)
        xs = {"x": x, "z": z}
        if model.continuous:
            xs["t"] = time_features(t, model.time_features)
        grads, free, trained = weighted_squared_error_gradient(model.network, xs, np.tile(y, (1, model.blocks)), w,
                                                               relaxation)
        abar, sq, _ = schedule(1.0, model.s)
        z1 = sq * y + math.sqrt(1 - abar) * rng.standard_normal(y.shape)  # q(z_1 | y): the readout's input
        e = _cross_entropy(model.logits(z1), y)[1]
        grads.update({"readout.weight": e.T @ z1 / len(y), "readout.bias": e.mean(axis=0)})
        # the readout twice (logits of the prediction; logits, softmax error and gradients on z_1)
        K, B = model.classes, len(y)
        flops += (2 * K * K + 4 * K * K + 5 * K) * B
        counts = step_counts([sol.counts for sol in inferred] + [trained], B, flops,
                             model.network.n * B + 2 * K * B)
        return Step(grads, loss, logits, all(sol.ok for sol in inferred) and free.ok, counts)


@dataclass(frozen=True)
class NoPropDT(_NoProp):
    """NoProp-DT (module docstring): block k on z_{k-1} ~ q(z_{k-1} | y) with weight
    ``eta`` (SNR_k - SNR_{k-1}); the model's ``blocks`` and ``s`` give the schedule."""

    eta: float = 0.1
    name = "noprop_dt"
    continuous = False

    def __post_init__(self):
        positive(self.eta, "NoPropDT(eta)")

    def training_latents(self, model, y, rng):
        abar = schedule(np.arange(model.blocks) / model.blocks, model.s)[0]  # of z_{k-1}, k = 1..T
        noise = rng.standard_normal((len(y), model.blocks, model.classes))
        z = np.sqrt(abar)[None, :, None] * y[:, None, :] + np.sqrt(1 - abar)[None, :, None] * noise
        w = self.eta * dt_coefficients(model.blocks, model.s)[3]
        return z.reshape(len(y), -1), None, np.broadcast_to(np.repeat(w, model.classes), z.reshape(len(y), -1).shape)


@dataclass(frozen=True)
class NoPropCT(_NoProp):
    """NoProp-CT (module docstring): t ~ U(0, 1) per sample, z_t ~ q(z_t | y), weight ``eta`` SNR'(t)."""

    eta: float = 0.1
    name = "noprop_ct"
    continuous = True

    def __post_init__(self):
        positive(self.eta, "NoPropCT(eta)")

    def training_latents(self, model, y, rng):
        t = rng.uniform(size=len(y))
        abar, sq, dabar = schedule(t, model.s)
        z = sq[:, None] * y + np.sqrt(1 - abar)[:, None] * rng.standard_normal(y.shape)
        w = self.eta * dabar / (1 - abar) ** 2  # SNR'(t)
        return z, t, np.broadcast_to(w[:, None], z.shape)


_ARRAYS = ("network", "readout_weight", "readout_bias")


def _write_model(group, model: NoPropModel):
    persist.write_object(group.create_group("network"), model.network)
    persist.write_arrays(group, "readout", {"weight": model.readout_weight, "bias": model.readout_bias})
    persist.write_config(group, {f.name: getattr(model, f.name) for f in fields(model) if f.name not in _ARRAYS})


def _read_model(group) -> NoPropModel:
    readout = persist.read_arrays(group, "readout")
    return NoPropModel(persist.read_object(group["network"]), readout["weight"], readout["bias"],
                       **persist.read_config(group))


persist.register(NoPropModel, _write_model, _read_model)
RULES[NoPropDT.name] = NoPropDT
RULES[NoPropCT.name] = NoPropCT
