"""Plain digital torch implementations of predictive coding and NoProp (DT and CT), written from the
papers' equations without substrate's circuits, for the tests' comparison of accuracy (same data, same
initial weights, same hyper-parameters, and the same random draws in the same order as
models.train.train and the substrate rules, so that the two runs differ only by the circuit's
relaxation tolerance).

* predictive coding: values relaxed by Euler steps on autograd's dF/dx of F = 1/2 sum_l ||x_l - W_l f(x_{l-1}) - b_l||^2
  (output clamped to the target), weight gradients dF/dW from autograd at the relaxed values.
* NoProp: one MLP per block (nn.Linear layers), each trained on its own weighted denoising loss by
  autograd; inference coefficients from Gaussian conditioning of the noising process (DT) or the
  probability-flow ODE by hand-written RK4 (CT).
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import torch

from models.data import minibatches, one_hot

T = torch.float64


def rho(v):
    """substrate's ``logistic`` activation, s(4v - 2) (Laborieux & Zenke's MLP)."""
    return torch.sigmoid(4 * v - 2)


def _tensor(a):
    return torch.tensor(np.asarray(a), dtype=T)


# ------------------------------------------------------------------------------------ predictive coding
class TorchPC:
    """A feed-forward MLP (hidden layers s(4v - 2), linear output) trained by predictive coding.
    ``layers``: [(W, b)] from the first hidden layer to the output (numpy arrays, copied)."""

    def __init__(self, layers, dt=0.2, tol=1e-5, max_steps=2000):
        self.params = [(_tensor(w).requires_grad_(), _tensor(b).requires_grad_()) for w, b in layers]
        self.dt, self.tol, self.max_steps = dt, tol, max_steps

    def parameters(self):
        return [p for wb in self.params for p in wb]

    def forward(self, x):
        """The values of the feed-forward pass, hidden and output."""
        out, a = [], x
        for i, (w, b) in enumerate(self.params):
            v = a @ w.T + b
            out.append(v)
            a = rho(v)
        return out

    def energy(self, x, values):
        f, a = 0.0, x
        for (w, b), v in zip(self.params, values):
            f = f + 0.5 * ((v - a @ w.T - b) ** 2).sum()
            a = rho(v)
        return f

    def gradients(self, x, y):
        """Relax, then set every parameter's .grad to dF/dtheta / batch."""
        with torch.no_grad():
            hidden = [v.clone() for v in self.forward(x)[:-1]]
        for _ in range(self.max_steps + 1):
            hidden = [h.detach().requires_grad_() for h in hidden]
            grads = torch.autograd.grad(self.energy(x, hidden + [y]), hidden)
            if max(float(g.abs().max()) for g in grads) <= self.tol:
                break
            hidden = [h - self.dt * g for h, g in zip(hidden, grads)]
        f = self.energy(x, [h.detach() for h in hidden] + [y]) / len(x)
        for p in self.parameters():
            p.grad = None
        f.backward()

    def predict(self, x):
        with torch.no_grad():
            return self.forward(x)[-1]


# ------------------------------------------------------------------------------------ NoProp
def abar(t, s):
    return (1 - s) * math.sin(0.5 * math.pi * t) ** 2


class TorchNoProp:
    """NoProp with one MLP per block. ``blocks``: per block [(W, b)] of its layers, the first layer's
    W over [x, z(, time features)] concatenated; ``readout``: (W_o, b_o)."""

    def __init__(self, blocks, readout, *, continuous, s, eta, steps=20, time_features=8, seed=0):
        self.blocks = [[(_tensor(w).requires_grad_(), _tensor(b).requires_grad_()) for w, b in blk] for blk in blocks]
        self.readout = (_tensor(readout[0]).requires_grad_(), _tensor(readout[1]).requires_grad_())
        self.continuous, self.s, self.eta, self.steps = continuous, s, eta, steps
        self.time_features, self.seed = time_features, seed
        self.T = len(blocks)
        self.classes = readout[1].shape[0]

    def parameters(self):
        return [p for blk in self.blocks for wb in blk for p in wb] + list(self.readout)

    def block(self, k, x, z, t=None):
        parts = [x, z]
        if self.continuous:
            j = torch.arange(1, self.time_features + 1, dtype=T)
            parts.append(torch.cos(math.pi * t[:, None] * j[None, :]))
        a = torch.cat(parts, dim=1)
        for i, (w, b) in enumerate(self.blocks[k]):
            a = a @ w.T + b
            if i < len(self.blocks[k]) - 1:
                a = rho(a)
        return a

    def logits(self, z):
        return z @ self.readout[0].T + self.readout[1]

    def infer(self, x, rng):
        z = _tensor(rng.standard_normal((len(x), self.classes)))
        with torch.no_grad():
            if not self.continuous:
                for k in range(1, self.T + 1):
                    ak, ak1 = abar(k / self.T, self.s), abar((k - 1) / self.T, self.s)
                    # z_k | z_{k-1}, u by Gaussian conditioning: Cov(z_k, z_{k-1}) = sqrt(ak1/ak) (1 - ak)
                    cov, var1 = math.sqrt(ak1 / ak) * (1 - ak), 1 - ak1
                    u = self.block(k - 1, x, z)
                    mean = math.sqrt(ak) * u + cov / var1 * (z - math.sqrt(ak1) * u)
                    var = (1 - ak) - cov * cov / var1
                    z = mean + math.sqrt(var) * _tensor(rng.standard_normal(tuple(z.shape)))
                return z

            def field(t, z):
                a, da = abar(t, self.s), (1 - self.s) * math.pi * math.sin(math.pi * t / 2) * math.cos(math.pi * t / 2)
                u = self.block(0, x, z, torch.full((len(x),), t, dtype=T))
                # dz/dt = abar'/(2(1 - abar)) (u/sqrt(abar) - z), with abar'/sqrt(abar) in closed form
                return (math.sqrt(1 - self.s) * math.pi * math.cos(math.pi * t / 2) * u / 2 - da / 2 * z) / (1 - a)

            h = 1.0 / self.steps
            for i in range(self.steps):
                t = i * h
                k1 = field(t, z)
                k2 = field(t + h / 2, z + h / 2 * k1)
                k3 = field(t + h / 2, z + h / 2 * k2)
                k4 = field(t + h, z + h * k3)
                z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return z

    def loss(self, x, y, rng):
        """The training objective on one batch with latents drawn from rng (the substrate rule's order)."""
        B, C = y.shape
        total = 0.0
        if not self.continuous:
            noise = rng.standard_normal((B, self.T, C))
            for k in range(1, self.T + 1):
                a1 = abar((k - 1) / self.T, self.s)
                z = math.sqrt(a1) * y + math.sqrt(1 - a1) * _tensor(noise[:, k - 1])
                ak = abar(k / self.T, self.s)
                w = self.eta * (ak / (1 - ak) - a1 / (1 - a1))
                total = total + 0.5 * w * ((self.block(k - 1, x, z) - y) ** 2).sum() / B
        else:
            t = rng.uniform(size=B)
            a = (1 - self.s) * np.sin(0.5 * np.pi * t) ** 2
            noise = rng.standard_normal((B, C))
            z = _tensor(np.sqrt(a))[:, None] * y + _tensor(np.sqrt(1 - a)[:, None] * noise)
            da = (1 - self.s) * np.pi * np.sin(0.5 * np.pi * t) * np.cos(0.5 * np.pi * t)
            w = _tensor(self.eta * da / (1 - a) ** 2)
            total = total + 0.5 * (w[:, None] * (self.block(0, x, z, _tensor(t)) - y) ** 2).sum() / B
        a1 = abar(1.0, self.s)
        z1 = math.sqrt(a1) * y + math.sqrt(1 - a1) * _tensor(rng.standard_normal((B, C)))
        return total + torch.nn.functional.cross_entropy(self.logits(z1), y.argmax(dim=1))

    def predict(self, x):
        with torch.no_grad():
            return self.logits(self.infer(x, np.random.default_rng(self.seed)))


def train_reference(model, data, *, lr, epochs, batch_size, rng):
    """Adam on ``model`` (TorchPC or TorchNoProp) over shuffled minibatches drawn as models.train.train
    draws them; the test accuracy after every epoch (row 0: before training)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt = _tensor(data.x_test)

    def accuracy():
        return float((model.predict(xt).argmax(dim=1).numpy() == data.y_test).mean())

    acc = [accuracy()]
    classes = data.classes
    for _ in range(epochs):
        for idx in minibatches(len(data.x_train), batch_size, rng):
            x, y = _tensor(data.x_train[idx]), _tensor(one_hot(data.y_train[idx], classes))
            opt.zero_grad()
            if isinstance(model, TorchPC):
                model.gradients(x, y)
            else:
                model.infer(x, rng)  # the prediction before the update draws first, as the substrate rule's
                model.loss(x, y, rng).backward()
            opt.step()
        acc.append(accuracy())
    return np.array(acc)


# ------------------------------------------------------------------------------------ from substrate models
def pc_from(model):
    """A TorchPC with the weights of a substrate PC classifier (models.local.pc.pc_classifier)."""
    net = model.network
    layers = []
    for layer in net.layers:
        c = next(c for c in net.connections if c.post == layer.name)
        layers.append((c.weight, layer.bias))
    return TorchPC(layers)


def noprop_from(model, rule):
    """A TorchNoProp with the weights of a substrate NoPropModel (one circuit per block)."""
    blocks = []
    for net in model.networks:
        names = [x.name for x in net.layers]
        first = [net.connection(f"{line}->{names[0]}").weight for line in ("x", "z", "t")[:2 + model.continuous]]
        weights = [np.concatenate(first, axis=1)] + [net.connection(f"{pre}->{post}").weight
                                                     for pre, post in pairwise(names)]
        blocks.append([(w, net.layer(name).bias) for w, name in zip(weights, names)])
    return TorchNoProp(blocks, (model.readout_weight, model.readout_bias), continuous=model.continuous, s=model.s,
                       eta=rule.eta, steps=model.steps, time_features=model.time_features, seed=model.seed)
