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
Each block is a circuit of its own (its own crossbars, ``NoPropModel.networks``): inference step k
relaxes block k alone, and a training step relaxes each block once on its own latent (independent
circuits: on hardware they settle side by side).

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
from dataclasses import dataclass, fields, replace
from itertools import pairwise

import numpy as np

from substrate import Connection, Implicit, Input, Layer, Network, devices, persist
from substrate.adjoint import adjoint_solve, implicit_counts
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


def block_networks(features: int, classes: int, hidden, blocks: int, time_features: int, rng: np.random.Generator,
                   activation: str = "logistic", init_scale: float = 1.0) -> list:
    """``blocks`` feed-forward circuits (x, z[, t]) -> hidden layers h1..hK -> ``classes`` linear outputs
    ``u``, each a network of its own. Weights uniform in +-init_scale/sqrt(fan_in) of one block, drawn
    for all blocks at once in block-stacked arrays (block k: rows k, and for z and the hidden layers
    columns k), so that a seed gives the weights it gave when the blocks shared one block-diagonal
    circuit."""
    hidden = [int(h) for h in hidden]
    if not hidden:
        raise SubstrateValueError("hidden: a NoProp block needs at least one hidden layer")

    def uniform(shape, fan_in):
        bound = init_scale / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape)

    names = [f"h{i + 1}" for i in range(len(hidden))] + [OUT]
    widths = hidden + [classes]
    fan_in = [features + classes + time_features] + hidden
    biases = [uniform(blocks * w, f) for w, f in zip(widths, fan_in)]
    lines = [("x", features, False), ("z", classes, True)] + ([("t", time_features, False)] if time_features else [])
    drawn = [(name, uniform((blocks * hidden[0], blocks * size if per_block else size), fan_in[0]), size, per_block)
             for name, size, per_block in lines]
    inner = [uniform((blocks * w_post, blocks * w_pre), w_pre) for w_pre, w_post in pairwise(widths)]

    def cut(a, k, rows, cols=None):
        a = a[k * rows:(k + 1) * rows]
        return (a if cols is None else a[:, k * cols:(k + 1) * cols]).copy()

    nets = []
    for k in range(blocks):
        layers = [Layer(nm, w, activation=activation if nm != OUT else "identity", bias=cut(b, k, w))
                  for nm, w, b in zip(names, widths, biases)]
        conns = [Connection(name, names[0], cut(w, k, hidden[0], size if per_block else None))
                 for name, w, size, per_block in drawn]
        conns += [Connection(pre, post, cut(w, k, w_post, w_pre))
                  for (pre, post), w, (w_pre, w_post) in zip(pairwise(names), inner, pairwise(widths))]
        nets.append(Network(layers, conns, [Input(name, size) for name, size, _ in lines]))
    return nets


def time_features(t, count_: int) -> np.ndarray:
    """cos(pi j t), j = 1..count_, for times t (batch,): NoProp-CT's time input."""
    return np.cos(np.pi * np.outer(np.asarray(t, float), np.arange(1, count_ + 1)))


@dataclass(eq=False)
class NoPropModel:
    """The blocks (one substrate network each, ``block_networks``), the readout p(y | z) = softmax(W_o z +
    b_o) and the schedule; ``continuous``: NoProp-CT (one block, time input, ``steps`` of ``method`` at
    inference), else NoProp-DT (one block per step). Inference draws z_0 (and DT's noise) from a
    generator seeded by ``seed`` at every call, so evaluations are repeatable."""

    networks: list
    readout_weight: np.ndarray
    readout_bias: np.ndarray
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
        nets = block_networks(features, classes, sizes[1:-1], 1 if continuous else blocks,
                              time_features if continuous else 0, rng, activation, init_scale)
        return cls(nets, np.zeros((classes, classes)), np.zeros(classes), bool(continuous), float(s), int(steps),
                   method, int(time_features), int(rng.integers(2 ** 31)))

    @property
    def blocks(self) -> int:
        """The number of blocks (T for NoProp-DT, 1 for NoProp-CT)."""
        return len(self.networks)

    @property
    def network(self) -> Network:
        """Block 0's circuit (its input ``x`` is every block's); every block's: ``networks``."""
        return self.networks[0]

    @property
    def classes(self) -> int:
        """The number of classes (the width of the label embedding)."""
        return self.readout_bias.shape[0]

    def on_device(self, device, rng: np.random.Generator) -> NoPropModel:
        """Every block on ``device``, each its own crossbars (drawn from ``rng`` in block order); the
        readout stays digital (shared with this model)."""
        return replace(self, networks=[devices.attach(net, device, rng) for net in self.networks])

    def parameters(self) -> dict:
        """{name: array} of the blocks' weights and biases (``block{k}.W:...``, ``block{k}.b:...``) and
        the readout, updated in place."""
        params = {}
        for k, net in enumerate(self.networks):
            params.update({f"block{k}.W:{c.name}": c.weight for c in net.connections})
            params.update({f"block{k}.b:{x.name}": x.bias for x in net.layers})
        params.update({"readout.weight": self.readout_weight, "readout.bias": self.readout_bias})
        return params

    def logits(self, z):
        """The readout's logits W_o z + b_o for latents z (batch, classes)."""
        return z @ self.readout_weight.T + self.readout_bias

    def inputs(self, x, z, t=None) -> dict:
        """A block's inputs: x and z (batch, classes), and for CT the time features of t."""
        xs = {"x": x, "z": z}
        if self.continuous:
            xs["t"] = time_features(np.broadcast_to(t, (len(x),)), self.time_features)
        return xs

    def relaxed(self, k, x, z, relaxation, t=None) -> tuple:
        """(block k's output (batch, classes), its relaxation): block k alone relaxed on its inputs."""
        net = self.networks[k]
        sol = ep.free_phase(net, self.inputs(x, z, t), relaxation)
        return sol.u[:, net.slices[OUT]], sol

    def inference(self, x, relaxation, rng: np.random.Generator) -> tuple:
        """(z at the end of inference (batch, classes), every relaxation of a block it ran, its
        digital operations: DT's update a_k u + b_k z + sqrt(c_k) eps, 5 per value and step; CT's
        field, 3 per value and stage, and the stages' combination, 2 per value and stage)."""
        z = rng.standard_normal((len(x), self.classes))
        phases = []
        if not self.continuous:
            a, b, c, _ = dt_coefficients(self.blocks, self.s)
            for k in range(self.blocks):
                u, sol = self.relaxed(k, x, z, relaxation)
                phases.append(sol)
                z = a[k] * u + b[k] * z + math.sqrt(c[k]) * rng.standard_normal(z.shape)
            return z, phases, 5 * z.size * self.blocks

        def field(t, z):
            abar, _, _ = schedule(t, self.s)
            u, sol = self.relaxed(0, x, z, relaxation, t)
            phases.append(sol)
            g = 0.5 * (1 - self.s) * np.pi * math.sin(0.5 * np.pi * t) * math.cos(0.5 * np.pi * t) / (1 - abar)
            lift = 0.5 * math.sqrt(1 - self.s) * np.pi * math.cos(0.5 * np.pi * t) / (1 - abar)
            return lift * u - g * z  # abar'/(2(1 - abar)) (u/sqrt(abar) - z), finite at t = 0

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
    # GMRES: J = -I + W diag(rho') of a feed-forward block is -I plus a nilpotent part, so the Krylov space
    # closes after (layers + 1) products and the solve is exact to rounding; the dense LU per sample
    # ("direct") costs O(n^3) per sample
    adj = adjoint_solve(vf, free.u, -dl, Implicit(solver="krylov"))
    g = vf.param_vjp(free.u, adj.lam)
    nb = free.u.shape[0]
    grads = {f"W:{k}": w / nb for k, w in g["weights"].items()}
    grads.update({f"b:{k}": b / nb for k, b in g["biases"].items()})
    counts = implicit_counts(free, adj)
    return grads, free, counts.replace(flops=counts.flops + 3 * np.size(target))


class _NoProp(Rule):
    """What both NoProp rules share: the readout's cross-entropy on z_1 ~ q(z_1 | y), the blocks' weighted
    denoising loss, and the prediction before the update by inference. ``Step.counts``: the
    inference's relaxations (DT: T, CT: steps x stages) and its digital updates, each block's training
    relaxation with its implicit gradient, and the readout."""

    continuous = False

    def model(self, sizes, rng, **options) -> NoPropModel:
        """A :class:`NoPropModel` for this rule (``options``: :meth:`NoPropModel.build`'s)."""
        return NoPropModel.build(sizes, rng, continuous=self.continuous, **options)

    def training_latents(self, model, y, rng) -> tuple:
        """(times or None, [(z fed to block k (batch, classes), its loss weights (batch, classes))])."""
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
        t, latents = self.training_latents(model, y, rng)
        grads, trained, converged = {}, [], all(sol.ok for sol in inferred)
        for k, (z, w) in enumerate(latents):
            g, free, counts = weighted_squared_error_gradient(model.networks[k], model.inputs(x, z, t), y, w,
                                                              relaxation)
            grads.update({f"block{k}.{name}": v for name, v in g.items()})
            trained.append(counts)
            converged = converged and free.ok
        abar, sq, _ = schedule(1.0, model.s)
        z1 = sq * y + math.sqrt(1 - abar) * rng.standard_normal(y.shape)  # q(z_1 | y): the readout's input
        e = _cross_entropy(model.logits(z1), y)[1]
        grads.update({"readout.weight": e.T @ z1 / len(y), "readout.bias": e.mean(axis=0)})
        # the readout twice (logits of the prediction; logits, softmax error and gradients on z_1)
        K, B = model.classes, len(y)
        flops += (2 * K * K + 4 * K * K + 5 * K) * B
        counts = step_counts([sol.counts for sol in inferred] + trained, B, flops,
                             sum(net.n for net in model.networks) * B + 2 * K * B)
        return Step(grads, loss, logits, converged, counts)


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
        return None, [(z[:, k], np.broadcast_to(w[k], y.shape)) for k in range(model.blocks)]


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
        return t, [(z, np.broadcast_to(w[:, None], z.shape))]


_ARRAYS = ("networks", "readout_weight", "readout_bias")


def _write_model(group, model: NoPropModel):
    nets = group.create_group("networks")
    for k, net in enumerate(model.networks):
        persist.write_object(nets.create_group(str(k)), net)
    persist.write_arrays(group, "readout", {"weight": model.readout_weight, "bias": model.readout_bias})
    persist.write_config(group, {f.name: getattr(model, f.name) for f in fields(model) if f.name not in _ARRAYS})


def _read_model(group) -> NoPropModel:
    readout = persist.read_arrays(group, "readout")
    nets = group["networks"]
    return NoPropModel([persist.read_object(nets[str(k)]) for k in range(len(nets))], readout["weight"],
                       readout["bias"], **persist.read_config(group))


persist.register(NoPropModel, _write_model, _read_model)
RULES[NoPropDT.name] = NoPropDT
RULES[NoPropCT.name] = NoPropCT
