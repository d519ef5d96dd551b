"""Predictive coding as relaxation (Whittington & Bogacz 2017, Neural Computation 29; the energy-based
view of Millidge, Tschantz & Buckley 2022, "Predictive coding approximates backprop along arbitrary
computation graphs", and Millidge et al. 2022, "Backpropagation at the infinitesimal inference limit of
energy-based models").

The model is a feed-forward circuit x -> h1 -> ... -> y (``feedback="none"``, the output neurons linear)
whose free equilibrium is the prediction u_l = mu_l = W_l a_{l-1} + b_l, a_{l-1} = rho(u_{l-1}) (the input
itself for l = 1). Predictive coding adds, beside every value neuron x_l, a prediction-error neuron
eps_l = x_l - mu_l(x_{l-1}), and relaxes the values on the energy

    F(x) = 1/2 sum_{l<L} ||eps_l||^2 + gamma/2 ||eps_L||^2,
    tau dx_l/dt = -dF/dx_l = -eps_l + rho'(x_l) * (W_{l+1}^T gamma_{l+1} eps_{l+1})   (gamma_l = 1 below L)

with the input clamped and the output x_L clamped to the target y, starting from the feed-forward pass
(where every hidden eps_l is 0); gamma, the output's precision (Whittington & Bogacz's inverse variance
Sigma_L^{-1}), is 1 in their rule. At the relaxed state the update is local to each crossbar, the error
of its post-synaptic neurons times the activity of its pre-synaptic ones:

    dF/dW_l = -gamma_l eps_l a_{l-1}^T,    dF/db_l = -gamma_l eps_l      (batch means)

and the rule reports dF/dtheta / gamma, a step on the scale of the loss's gradient. The relaxation is integrated with the engine's
fixed-step explicit tableaux (``models.local._ode``): the rho'-gated feedback is a product of two
neurons' signals, outside the circuit's tau du/dt = -u + W rho(u) + V x + b. The weights are read
through the device (``circuit_weight``: programming and read noise; the error neurons read each crossbar
forward and transposed) and the activities through its neurons (activation mismatch).

Relation to EP. F is an energy whose minimum with the output free is the feed-forward pass (F = 0).
Clamping the output to y is the limit beta -> infinity of the nudged energy F + beta l(x_L), l =
1/2 ||x_L - y||^2; EP's one-sided estimate on the same energy, (1/beta)(dF/dtheta(x*_beta) -
dF/dtheta(x*_0)) with dF/dtheta(x*_0) = 0, tends to dl/dtheta as beta -> 0 (Scellier & Bengio 2017).
PC's gamma plays beta's part: the output error reaches the hidden neurons as gamma eps_L, the values move
by O(gamma), eps_L -> y - mu_L and gamma_l eps_l / gamma -> backprop's errors delta_l, so dF/dtheta / gamma
differs from the exact gradient of l by O(gamma) relative: the small-error limit of Whittington & Bogacz
(their Section 2.4, the output variance large against the hidden ones) and Millidge et al.'s
infinitesimal-inference limit (tests/test_local_pc_noprop.py measures the rate). A target close to the
prediction alone is not that limit: at gamma = 1 the output error is shared between the layers in a fixed
proportion however small it is (measured there: a relative error that stays at ~16% as y -> mu_L).
"""

from __future__ import annotations

import itertools
import types
from dataclasses import dataclass

import numpy as np

from substrate import Cost, Counts, Network
from substrate import counts as C
from substrate.activations import rho_prime
from substrate.errors import SubstrateValueError
from substrate.validate import count, positive

from .. import ep
from ..train import RULES, Classifier, Rule, Step, exact_cosine
from ._layers import step_counts
from ._ode import rk_step, tableau


def pc_classifier(sizes, rng: np.random.Generator, *, activation: str = "logistic", **network_options) -> Classifier:
    """The circuit predictive coding trains: ``Network.layered(sizes, feedback="none")`` with linear
    output neurons ``y`` (the values PC clamps to the target) and the squared error on them."""
    net = Network.layered(sizes, rng, activation=activation, feedback="none", **network_options)
    net.layer("y").activation = "identity"
    return Classifier(net, Cost("y"))


def _chain(network) -> list:
    """[(layer, its one incoming connection)] from the first hidden layer to the output; a
    SubstrateValueError unless the circuit is a feed-forward chain."""
    out = []
    for i, layer in enumerate(network.layers):
        incoming = [c for c in network.connections if c.post == layer.name]
        pre = network.inputs[0].name if i == 0 else network.layers[i - 1].name
        if len(incoming) != 1 or incoming[0].pre != pre or len(network.inputs) != 1:
            raise SubstrateValueError(f"predictive coding needs a feed-forward chain input -> layers -> output "
                                      f"(Network.layered(..., feedback='none')); layer {layer.name!r} has inputs "
                                      f"{[c.pre for c in incoming]}")
        out.append((layer, incoming[0]))
    return out


@dataclass(frozen=True)
class Relaxed:
    """A predictive-coding relaxation: values x (batch, n), weighted errors gamma_l eps_l (batch, n), the activities feeding
    each layer {layer: (batch, pre size)}, whether max|dx/dt| reached ``tol``, the steps taken and the
    evaluations of the field (each reads every crossbar forward and transposed)."""

    x: np.ndarray
    eps: np.ndarray
    pre: dict
    converged: bool
    steps: int
    nfev: int


@dataclass(frozen=True)
class PredictiveCoding(Rule):
    """Predictive coding (module docstring): values relaxed with the output clamped to the target by
    ``method`` (an engine tableau: euler or rk4) at step ``dt`` (units of tau) until max|dx/dt| <= ``tol``
    or ``max_steps``; then dF/dW_l / gamma and dF/db_l / gamma (batch means), gamma = ``precision``, the
    output error's weight in F."""

    method: str = "euler"
    dt: float = 0.2
    tol: float = 1e-5
    max_steps: int = 2000
    precision: float = 1.0
    name = "predictive_coding"

    def __post_init__(self):
        tableau(self.method, "PredictiveCoding")
        positive(self.dt, "PredictiveCoding(dt)")
        positive(self.tol, "PredictiveCoding(tol)")
        count(self.max_steps, "PredictiveCoding(max_steps)")
        positive(self.precision, "PredictiveCoding(precision)")

    model = staticmethod(pc_classifier)

    def relax(self, network, x, y, u0) -> Relaxed:
        """Relax the values from ``u0`` (the feed-forward pass) with the output clamped to ``y``."""
        chain = _chain(network)
        out = network.slices[chain[-1][0].name]
        weights = {c.name: network.circuit_weight(c) for _, c in chain}  # read once: the relaxation's crossbars
        tau = network.tau

        first = x @ weights[chain[0][1].name].T + chain[0][0].bias  # the clamped input's prediction, once

        def errors(u):
            r = network.activities(u)
            eps, pre = np.empty_like(u), {chain[0][0].name: x}
            for i, (layer, c) in enumerate(chain):
                sl = network.slices[layer.name]
                if i == 0:
                    eps[:, sl] = u[:, sl] - first
                    continue
                a = r[:, network.slices[chain[i - 1][0].name]]
                eps[:, sl] = u[:, sl] - (a @ weights[c.name].T + layer.bias)
                pre[layer.name] = a
            eps[:, out] *= self.precision  # gamma_l eps_l: what the error neurons send
            return eps, pre

        def field(t, u):
            eps = errors(u)[0]
            d = -eps
            for (layer, _), (nxt, c) in itertools.pairwise(chain):
                sl = network.slices[layer.name]
                d[:, sl] += rho_prime(layer.activation, u[:, sl]) * (eps[:, network.slices[nxt.name]] @ weights[c.name])
            d[:, out] = 0.0
            return d / tau

        u = np.array(u0, dtype=float)
        u[:, out] = y
        tab, h = tableau(self.method, "PredictiveCoding"), self.dt * float(np.min(tau))
        steps, d, nfev = 0, field(0.0, u), 1
        while True:
            converged = float(np.max(np.abs(d))) <= self.tol
            if converged or steps == self.max_steps:
                break
            u = rk_step(field, 0.0, u, h, tab, d)  # the check's evaluation is the step's first stage
            d = field(0.0, u)
            steps, nfev = steps + 1, nfev + len(tab[1])
        eps, pre = errors(u)
        return Relaxed(u, eps, pre, converged, steps, nfev)

    def relax_counts(self, network, relaxed: Relaxed) -> Counts:
        """What the relaxation did (a :class:`substrate.Counts`): its steps, field evaluations and time
        (``steps`` x dt tau), every evaluation reading each state crossbar forward (the predictions)
        and transposed (the errors sent down), the input's crossbar once; the input and the target
        converted, the values and the errors read out (and, with a device's IO chain, the conversions
        of both reads at every evaluation)."""
        batch = relaxed.x.shape[0]
        run = C.phase(network, batch=batch, steps=relaxed.steps, nfev=relaxed.nfev,
                      settle_time=relaxed.steps * self.dt * float(np.min(network.tau)), reads=2)
        state, inputs = C.crossbar_devices(network)
        out = network.size_of(_chain(network)[-1][0].name)
        # with an IO chain, a transposed read converts the post-synaptic side in and the pre-synaptic out
        io_dac, io_adc, _ = C.io_conversions(network)
        return run.replace(macs=(2 * state * relaxed.nfev + inputs) * batch,
                           dac=run.dac + (out + io_adc * relaxed.nfev) * batch, adc=run.adc + io_dac * relaxed.nfev * batch)

    def gradients(self, network, relaxed: Relaxed) -> dict:
        """dF/dtheta / gamma at the relaxed state: -gamma_l eps_l a_{l-1}^T / (gamma B) and -mean gamma_l
        eps_l / gamma, by parameter name (``relaxed.eps`` holds gamma_l eps_l)."""
        grads, nb = {}, relaxed.x.shape[0]
        for layer, c in _chain(network):
            e = relaxed.eps[:, network.slices[layer.name]]
            grads[f"W:{c.name}"] = -(e.T @ relaxed.pre[layer.name]) / (nb * self.precision)
            grads[f"b:{layer.name}"] = -e.mean(axis=0) / self.precision
        return grads

    def _run(self, model, x, y, relaxation):
        free = ep.free_phase(model.network, x, relaxation)  # the feed-forward pass: the prediction, PC's start
        relaxed = self.relax(model.network, x, y, free.u)
        return free, relaxed, self.gradients(model.network, relaxed)

    def step(self, model, x, y, relaxation, rng=None) -> Step:
        free, relaxed, grads = self._run(model, x, y, relaxation)
        r = model._layer(free.u)
        loss = float(np.mean(model.cost.value_and_grad(r, y)[0]))
        net, batch = model.network, len(relaxed.x)
        # the feed-forward pass and the relaxation; in digital the outer products gamma_l eps_l a_{l-1}^T
        # (the precision's division: a multiply per parameter); held: the values and errors
        counts = step_counts([free.counts, self.relax_counts(net, relaxed)], batch,
                             C.parameter_flops(net, batch) + sum(np.size(g) for g in grads.values()),
                             2 * net.n * batch)
        return Step(grads, loss, model._logits(r), free.ok and relaxed.converged, counts)

    def probe(self, model, x, y, relaxation) -> float:
        free, _, grads = self._run(model, x, y, relaxation)
        g = types.SimpleNamespace(weights={k[2:]: v for k, v in grads.items() if k.startswith("W:")},
                                  biases={k[2:]: v for k, v in grads.items() if k.startswith("b:")})
        return exact_cosine(model, g, x, y, relaxation, free=free)


RULES[PredictiveCoding.name] = PredictiveCoding
