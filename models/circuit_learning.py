"""Learning in resistive circuits (``substrate.circuits``; docs/equations.md, section 10): EP and coupled
learning as rules that :func:`models.train.train` accepts, and the circuit's classifier.

* EP (:class:`CircuitEP`): an estimator of :mod:`models.ep` (unchanged) gives its recipe
  v = c_0 u*(0) + sum_k c_k u*(beta_k) (``PointEstimator.nodes``, real nudges); each u*(beta) is the
  operating point with the current beta (V_out - y) injected at the outputs, solved from the free
  one; dL/dg = (1/B) sum_b (dF/dg)^T v_b = -(1/B) sum_b (v_a - v_b)(V_a - V_b), per edge a product
  of voltage drops across it (local). ``ep.Exact`` gives the implicit gradient.
* Coupled learning (:class:`CoupledLearning`, Stern et al. 2021): the free state, the clamped state
  with the outputs held at V_O^F + eta (y - V_O^F), and the gradient
  (1/(2 eta B)) sum_b [(dV_e^C)^2 - (dV_e^F)^2] (the update -lr times it is the paper's
  alpha/eta [(dV^F)^2 - (dV^C)^2]).

The cost is l = |V_out - T|^2 / 2 per sample, T the target voltages (``target_high`` for the class,
``target_low`` for the others); the prediction is the output with the highest voltage. Conductances
are written through a device (:class:`CircuitHardware`): conductance mapping, programming noise,
drift and pulsed updates of ``substrate.devices`` act on them as on a crossbar's weights; the
elements' mismatch is drawn when the circuit is built (``spread``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from substrate import Counts, circuits
from substrate.adjoint import Gradients
from substrate.devices import Device
from substrate.devices.device import Crossbar
from substrate.errors import SubstrateValueError
from substrate.validate import count, positive

from . import ep
from .data import one_hot
from .metrics import compare
from .train import RULES, Rule, Step


# ------------------------------------------------------------------------------------ hardware
class CircuitHardware:
    """A circuit on a device. ``nominal``: the circuit whose conductances the optimiser trains (in
    place); ``physical``: the same circuit with the conductances as the devices hold them, which
    every solve uses. :meth:`write` sends the trained conductances through the device (clipped at
    ``g_floor``: a conductance cannot be negative) and reads them back at the simulated ``clock``."""

    def __init__(self, nominal: circuits.Circuit, device: Device | None = None, seed: int = 0,
                 g_floor: float = 1e-6):
        self.nominal, self.device, self.seed = nominal, device, seed
        self.g_floor = positive(g_floor, "g_floor")
        self.physical = dataclasses.replace(nominal, conductance=nominal.conductance.copy())
        self.crossbar = Crossbar("conductance", device, seed) if device is not None else None
        self.clock = 0.0
        self.inputs = [SimpleNamespace(name="x", size=None)]  # set by the classifier (train() reads it)
        self.connections = ()  # no forward/feedback weight pairs (models.metrics.weight_angles)
        self.write()

    def write(self) -> Counts:
        """Write the nominal conductances (all of them the first time) and read the device back.
        Returns its :class:`substrate.Counts`: the pulses (a programmed conductance counts as one; on
        ideal conductances, one per conductance that changed) and the write cycles (1: the
        conductances are written in parallel)."""
        g = self.nominal.conductance
        np.maximum(g, self.g_floor, out=g)
        if self.crossbar is not None:
            w = self.crossbar.write(g.copy(), self.clock)
            if self.device.update is not None:
                g[...] = np.maximum(w, self.g_floor)  # the devices are the weights: training continues from them
            pulses, cycles = self.crossbar.pulses, self.crossbar.write_cycles
        else:
            pulses = int(np.count_nonzero(g != self.physical.conductance))
            cycles = int(pulses > 0)
        self.read()
        return Counts(pulses=pulses, write_cycles=cycles)

    def read(self):
        """The physical circuit's conductances as the devices hold them at ``clock``."""
        g = self.nominal.conductance if self.crossbar is None else self.crossbar.read(self.clock)[0]
        self.physical.conductance[...] = np.maximum(g, 0.0)

    def advance(self, seconds: float):
        """Move the simulated clock (drift)."""
        self.clock += positive(seconds, "seconds")
        self.read()


# ------------------------------------------------------------------------------------ model
@dataclass(eq=False)
class CircuitClassifier:
    """A layered resistive network (``circuits.layered``) as a classifier: features x in [0, 1] drive
    the input nodes at ``input_scale`` x volts (with ``mirror``, also -x on a second set, so that
    positive conductances can subtract); one output node per class, with target voltages
    ``target_low``/``target_high`` (volts: within the range the diodes let the hidden nodes reach)."""

    network: CircuitHardware
    classes: int
    features: int
    mirror: bool = True
    bias: float = 0.4
    target_low: float = -0.1
    target_high: float = 0.1
    tol: float = 1e-10
    linear: str = "dense"
    input_scale: float = 1.0

    @classmethod
    def layered(cls, features: int, hidden, classes: int, rng: np.random.Generator, *, device: Device | None = None,
                seed: int = 0, mirror: bool = True, bias: float = 0.4, g_range=(1e-3, 2e-2), spread: float = 0.0,
                diodes: bool = True, diode_is: float = 1e-12, **options):
        """(features, hidden..., classes); conductances uniform in ``g_range``, diodes of saturation
        current ``diode_is`` (A) with mismatch ``spread``, or none (``diodes=False``: a linear network)."""
        features, classes = count(features, "features"), count(classes, "classes")
        hidden = [count(h, "hidden") for h in np.atleast_1d(hidden)]
        positive(options.get("input_scale", 1.0), "input_scale")
        c = circuits.layered([features * (2 if mirror else 1), *hidden, classes], rng, g_range=g_range, bias=bias,
                             spread=spread, diodes=diodes, diode_is=diode_is)
        model = cls(CircuitHardware(c, device, seed), classes, features, mirror, bias, **options)
        model.network.inputs[0].size = features
        return model

    @property
    def circuit(self) -> circuits.Circuit:
        """The physical circuit (conductances as the devices hold them)."""
        return self.network.physical

    def parameters(self) -> dict:
        """{"conductance": the nominal conductances}, trained in place."""
        return {"conductance": self.network.nominal.conductance}

    def drive(self, x) -> np.ndarray:
        """The input nodes' voltages for features x (batch, features)."""
        x = self.input_scale * np.asarray(x, float)
        parts = [x, -x] if self.mirror else [x]
        return circuits.bias_inputs(np.concatenate(parts, axis=1), self.bias)

    def targets(self, y) -> np.ndarray:
        """Target output voltages for one-hot (or soft) y."""
        return self.target_low + (self.target_high - self.target_low) * np.asarray(y, float)

    def free(self, x, **options) -> circuits.DCSolution:
        """The free operating point at features x."""
        return circuits.dc(self.circuit, self.drive(x), tol=self.tol, linear=self.linear, on_failure="return",
                           **options)

    def outputs(self, sol) -> np.ndarray:
        """The output voltages of a solution (batch, classes)."""
        return sol.v[:, self.circuit.outputs]

    def conducting(self, sol, share: float = 0.1) -> float:
        """The fraction of (sample, diode) pairs at which the diode bends its node's response: its
        differential conductance at least ``share`` of the linear conductances at its hidden node (the
        hidden node's voltage then moves measurably less than a linear network's). 0 without diodes."""
        c = self.circuit
        if not len(c.diodes):
            return 0.0
        full = np.concatenate([sol.v, np.zeros((len(sol.v), 1))], axis=1)
        d = c.internal(c.diodes)
        nvt = c.diode_n * c.v_t
        gd = c.diode_is / nvt * np.exp((full[:, d[:, 0]] - full[:, d[:, 1]]) / nvt)
        e = c.internal(c.edges)
        g_node = np.bincount(e.ravel(), np.repeat(c.conductance, 2), minlength=c.n + 1)
        node = np.where(np.isin(d[:, 0], c.inputs), d[:, 1], d[:, 0])  # the diode's hidden end
        return float(np.mean(gd >= share * g_node[node]))

    def cost(self, sol, y) -> tuple:
        """(per-sample cost |V_out - T|^2 / 2, dl/dV_out) at a solution, y one-hot."""
        d = self.outputs(sol) - self.targets(y)
        return 0.5 * np.sum(d * d, axis=1), d

    def evaluate(self, x, labels, relaxation=None, batch: int = 100) -> tuple:
        """(mean cost, accuracy, fraction of batches whose operating point missed its tolerance).
        ``relaxation`` is accepted for train()'s protocol; the circuit is solved by Newton. ``batch``:
        samples solved at once (the stamps take batch x 4 x conductances floats)."""
        losses, correct, failed = 0.0, 0, 0
        for i in range(0, len(x), batch):
            sol = self.free(x[i:i + batch])
            yb = labels[i:i + batch]
            losses += float(np.sum(self.cost(sol, one_hot(yb, self.classes))[0]))
            correct += int(np.sum(np.argmax(self.outputs(sol), axis=1) == yb))
            failed += 0 if sol.ok else 1
        return losses / len(x), correct / len(x), failed / -(-len(x) // batch)


# ------------------------------------------------------------------------------------ gradients
def _edge_drops(circuit, v) -> np.ndarray:
    """V_a - V_b across every edge (batch, E), v every node's voltage (batch, n)."""
    full = np.concatenate([v, np.zeros((len(v), 1))], axis=1)
    e = circuit.internal(circuit.edges)
    return full[:, e[:, 0]] - full[:, e[:, 1]]


def exact_gradient(model: CircuitClassifier, x, y, free=None) -> np.ndarray:
    """dL/dg of the batch-mean cost by implicit differentiation at the free operating point."""
    free = model.free(x) if free is None else free
    f = free.field
    g = np.zeros_like(free.v)
    g[:, model.circuit.outputs] = model.cost(free, y)[1]
    lam = circuits.adjoint(f, free.u, -g[:, f.free], model.linear)
    return f.param_vjp(free.u, lam)["conductance"] / len(x)


def _local_flops(circuit, batch: int, phases: int) -> int:
    """Digital FLOPs of an update from the voltage drops of ``phases`` operating points: per edge,
    sample and phase a drop (a subtraction) and a product or square with its accumulation (2)."""
    return 3 * len(circuit.edges) * batch * phases


def ep_gradient(model: CircuitClassifier, x, y, estimator: ep.Estimator, free=None):
    """(dL/dg of the batch-mean cost by ``estimator``'s recipe, the free solution, converged, the
    :class:`substrate.Counts` of its phases and arithmetic)."""
    free = model.free(x) if free is None else free
    b, c = len(x), model.circuit
    if isinstance(estimator, ep.Exact):  # in digital: J's LU per sample and the parameter VJP
        n = free.field.size
        flops = (2 * n ** 3 // 3 + 4 * n * n) * b + _local_flops(c, b, 1)
        counts = free.counts.replace(flops=flops, memory=free.counts.memory + n * n * b)
        return exact_gradient(model, x, y, free), free, free.ok, counts
    if not isinstance(estimator, ep.PointEstimator):
        raise SubstrateValueError(f"EP on a circuit takes a point estimator (one_sided, negative, centred) or "
                                  f"exact; got {estimator.name!r}")
    c0, points = estimator.nodes()
    target = model.targets(y)
    v, ok, parts = c0 * free.u, free.ok, [free.counts]
    for beta, coef, pair in points:
        if complex(beta).imag != 0 or pair:
            raise SubstrateValueError(f"{estimator!r}: the circuit solver is real; complex nudges (holomorphic EP "
                                      "with more than 2 points) are not supported")
        sol = circuits.dc(model.circuit, model.drive(x), u0=free.u, teach=circuits.Teach(float(np.real(beta)), target),
                          tol=model.tol, linear=model.linear, on_failure="return")
        v = v + np.real(coef) * sol.u
        ok = ok and sol.ok
        parts.append(sol.counts)
    counts = sum(parts).replace(samples=b, flops=_local_flops(c, b, len(parts)))
    return free.field.param_vjp(free.u, v)["conductance"] / len(x), free, ok, counts


# ------------------------------------------------------------------------------------ rules
def _probe(rule, model, x, y):
    free = model.free(x)
    exact = exact_gradient(model, x, y, free)
    g = rule.gradient(model, x, y, free)[0]
    return compare(_as_gradients(g), _as_gradients(exact))["cosine"]["all"]


def _as_gradients(g) -> Gradients:
    return Gradients(0.0, {"conductance": g}, {}, {}, {}, np.zeros(0), "circuit")


class _CircuitRule(Rule):
    """A rule on a :class:`CircuitClassifier`: its ``gradient`` is the step's and the probe's."""

    def gradient(self, model, x, y, free=None):
        """(dL/dg estimate of the batch-mean cost (E,), the free solution, every solve converged, the
        :class:`substrate.Counts` of its phases and arithmetic), from the free operating point
        ``free`` when given."""
        raise NotImplementedError

    def step(self, model, x, y, relaxation=None, rng=None) -> Step:
        g, free, ok, counts = self.gradient(model, x, y)
        return Step({"conductance": g}, float(np.mean(model.cost(free, y)[0])), model.outputs(free), bool(ok),
                    counts)

    def probe(self, model, x, y, relaxation=None) -> float:
        return _probe(self, model, x, y)


@dataclass(frozen=True)
class CircuitEP(_CircuitRule):
    """EP on a :class:`CircuitClassifier` with the estimator of :mod:`models.ep` named ``estimator``
    (``one_sided``, ``negative``, ``centred``, ``holomorphic`` with 2 points, or ``exact``) at nudge
    ``beta``. Default beta = 0.01: the cost's gradient is O(0.1 V) and the nudge current beta times
    it, against conductances of ~10 mS, moves the outputs by ~0.1 mV, well inside the linear response."""

    estimator: str = "centred"
    beta: float = 0.01

    def __post_init__(self):
        self.make()  # refuses an unknown name or a bad beta now, not at the first batch

    def make(self) -> ep.Estimator:
        """The :mod:`models.ep` estimator."""
        if self.estimator == "exact":
            return ep.Exact()
        return ep.make_estimator(self.estimator, beta=self.beta)

    @property
    def name(self) -> str:
        return f"circuit_ep:{self.estimator}"

    def gradient(self, model, x, y, free=None):
        return ep_gradient(model, x, y, self.make(), free)


@dataclass(frozen=True)
class CoupledLearning(_CircuitRule):
    """Coupled learning (Stern et al. 2021) on a :class:`CircuitClassifier`; ``eta`` in (0, 1]: how
    far the clamp moves the outputs toward their targets."""

    eta: float = 0.1
    name = "coupled_learning"

    def __post_init__(self):
        e = positive(self.eta, "CoupledLearning(eta)")
        if e > 1:
            raise SubstrateValueError(f"CoupledLearning(eta={self.eta!r}) must be in (0, 1]")

    def gradient(self, model, x, y, free=None):
        free = model.free(x) if free is None else free
        out = model.outputs(free)
        clamp = circuits.Clamp(model.circuit.outputs, out + self.eta * (model.targets(y) - out))
        # the clamped state from the free one (its free nodes: the free state's minus the outputs)
        keep = ~np.isin(free.field.free, model.circuit.outputs)
        sol = circuits.dc(model.circuit, model.drive(x), u0=free.u[:, keep], clamp=clamp, tol=model.tol,
                          linear=model.linear, on_failure="return")
        df, dc_ = _edge_drops(model.circuit, free.v), _edge_drops(model.circuit, sol.v)
        g = np.sum(dc_ * dc_ - df * df, axis=0) / (2 * self.eta * len(x))
        b = len(x)
        counts = (free.counts + sol.counts).replace(samples=b, flops=_local_flops(model.circuit, b, 2))
        return g, free, free.ok and sol.ok, counts


RULES["circuit_ep"] = CircuitEP
RULES["coupled_learning"] = CoupledLearning
