"""Counter-current learning (Kao & Hariharan, "Counter-current learning: a biologically plausible
dual network approach for deep learning", NeurIPS 2024) on the substrate.

Two anti-parallel networks, each a feed-forward circuit of its own (``feedback="none"``, separate
crossbars, no weight transport): the forward network carries the input up, a_0 = x,
a_l = rho(W_l a_{l-1} + b_l) (l = 1..L-1), logits z = V a_{L-1} + c (the digital readout of a
:class:`~models.train.Classifier`); the feedback network carries the classes down, from the K one-hot
class vectors t_k (its input, a batch of K), c_{L-1} = rho(B_L t + e_L), c_{l-1} = rho(B_l c_l + e_l),
and c_0 = B_1 c_1 + e_1 (linear, the input's width). Both relax on the engine; at their fixed points
they are these feed-forward passes. Layer l's pair is compared through the class scores
S_l = a_l c_l^T (batch, K), a_l and c_l stopped (no gradient flows between layers):

    L = sum_{l=0}^{L-1} s / (d_l K B) sum_{b,k} (S_l[b, k] - y[b, k])^2 + (1/B) sum_b CE(z_b, y_b)

(s = ``scale``, the paper's code's loss_scale_C x 256 = 128; d_l the width of layer l; y one-hot).
Each parameter receives the gradient of the one term that reads it directly:

    R_l = (2 s / (d_l K B)) (S_l - y)                                  (batch, K)
    dL/dW_l = [(R_l c_l) * rho'(u_l)]^T a_{l-1},  dL/db_l = sum_b (R_l c_l) * rho'(u_l)   (l >= 1)
    dL/dB_{l+1} = [(R_l^T a_l) * rho'(v_l)]^T c_{l+1}   (c_L = t; rho' = 1 for c_0)
    dL/dV = (softmax(z) - y)^T a_{L-1} / B                              (the readout, from CE alone)

so W_l learns from the feedback layer it faces, B_{l+1} from the forward layer it faces, and the
pair (x, c_0) trains the feedback network's last layer. As in the paper's code, each network's
gradient is clipped to a global norm ``clip`` (forward: W, b and the readout; feedback: B, e). On
the substrate each update is an outer product of a layer's local error and its own input, read at
the relaxed states (``VectorField.param_vjp``). The paper trains MLPs without biases (ELU; SGD, lr 1,
batch 256); substrate's layers carry biases, here zero at the start and trained, and the activation
is one the circuit has (tanh by default).

The paper's nearest setting: the authors' code (GitHub IandRover/CCL-NeurIPS24, its Fashion-MNIST MLP config)
trains Fashion-MNIST on 784-256x5-10 (ELU, no biases) by SGD at lr 1, batch 256, both networks clipped
to norm 1, 100 epochs; its README reports no accuracy, and the paper's table could not be reached from
here, so no paper number is quoted. With tanh and biases (784-256-256-10), lr 1 is chaotic: the clip
is active at every step, so every update has norm lr, 7.5% of the forward weights' norm at lr 1;
successive updates are nearly uncorrelated (median cosine -0.16, against -0.87 and -0.92 at lr 0.3 and
0.1, a bounce across the steepest direction), and a 1e-6 perturbation of the initial weights moves the
accuracy after 2 epochs on 20000 samples by 16 points (68.6 to 52.3), against < 0.01 point at lr 0.3
and 0.1 (measured on the torch twin). lr 0.3 is the stable rate used for the comparisons (71.6%).

The step's counts (``Step.counts``, docs/equations.md section 9): the two relaxations (the batch up,
the K classes down), and in digital the class scores and errors of every pair, the outer products of
both networks, the readout and the clipping; :func:`models.train.train` adds the optimiser and the
writes of both circuits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from substrate import Connection, Input, Layer, Network, devices, persist
from substrate import counts as C
from substrate.activations import rho_prime
from substrate.errors import SubstrateValueError
from substrate.validate import nonnegative, positive

from .. import ep
from ..metrics import cosine
from ..train import RULES, Classifier, EPRule, Rule, Step
from ._layers import clip_norm, local_gradients, step_counts

FEEDBACK = "feedback."  # the prefix of the feedback network's parameter names


@dataclass(eq=False)
class CounterCurrentModel:
    """A forward :class:`~models.train.Classifier` (feed-forward network and cross-entropy readout) and
    the feedback network that runs anti-parallel to it: input ``t`` (the K classes), layers
    ``c{L-1}`` .. ``c1`` (the forward hidden layers' widths, mirrored) and ``c0`` (the input's width,
    linear). ``network`` is the forward one; ``networks`` both (each written through its device after
    an update)."""

    forward: Classifier
    feedback: Network

    @classmethod
    def layered(cls, sizes, rng: np.random.Generator, *, activation: str = "tanh", tau: float = 1.0,
                dtype="float64") -> CounterCurrentModel:
        """``sizes`` = (inputs, hidden..., classes). Weights uniform +-1/sqrt(fan_in) (PyTorch's
        default, as in the paper's code), biases zero."""
        if len(sizes) < 3:
            raise SubstrateValueError(f"sizes={sizes!r}: counter-current learning needs inputs, >= 1 hidden "
                                      "layer and classes")
        forward = Classifier.layered(sizes, rng, cost="cross_entropy", activation=activation, tau=tau,
                                     feedback="none", dtype=dtype)
        for layer in forward.network.layers:
            layer.bias[...] = 0
        forward.cost.readout_bias[...] = 0
        dt = forward.network.dtype
        down = list(sizes[::-1])  # K, d_{L-1}, ..., d_1, d_0
        names = [f"c{i}" for i in range(len(sizes) - 2, -1, -1)]
        layers = [Layer(nm, sz, tau=tau, activation=activation if nm != "c0" else "identity", bias=np.zeros(sz, dt))
                  for nm, sz in zip(names, down[1:])]
        pre = ["t"] + names[:-1]
        conns = [Connection(p, nm, rng.uniform(-1, 1, (sz, fan)).astype(dt) / math.sqrt(fan))
                 for p, nm, sz, fan in zip(pre, names, down[1:], down[:-1])]
        return cls(forward, Network(layers, conns, inputs=[Input("t", sizes[-1])]))

    def on_device(self, device: devices.Device, rng: np.random.Generator) -> CounterCurrentModel:
        """Both networks on ``device``, each its own crossbars (and draws); the readout stays digital."""
        return CounterCurrentModel(Classifier(devices.attach(self.forward.network, device, rng), self.forward.cost),
                                   devices.attach(self.feedback, device, rng))

    @property
    def network(self) -> Network:
        """The forward network (it takes the data)."""
        return self.forward.network

    @property
    def networks(self) -> tuple:
        """Both circuits, forward and feedback."""
        return self.forward.network, self.feedback

    @property
    def classes(self) -> int:
        """The number of classes (the readout's outputs)."""
        return self.forward.classes

    def parameters(self) -> dict:
        """The forward classifier's parameters, and the feedback network's prefixed ``feedback.``."""
        params = self.forward.parameters()
        params.update({f"{FEEDBACK}W:{c.name}": c.weight for c in self.feedback.connections})
        params.update({f"{FEEDBACK}b:{x.name}": x.bias for x in self.feedback.layers})
        return params

    def evaluate(self, x, labels, relaxation: ep.Relaxation, batch: int = 1000) -> tuple:
        """The forward classifier's (mean cost, accuracy, fraction of non-converged relaxations)."""
        return self.forward.evaluate(x, labels, relaxation, batch)


@dataclass(frozen=True)
class CounterCurrent(Rule):
    """Counter-current learning (see the module docstring for the equations): ``scale`` s of the
    layer-pair losses, ``clip`` the global gradient norm of each network (0: no clipping). ``probe``:
    the cosine of the forward network's gradient (weights and biases) with the exact gradient of the
    cross-entropy (on a device, of the nominal circuit)."""

    scale: float = 128.0
    clip: float = 1.0
    name = "counter_current"

    def __post_init__(self):
        positive(self.scale, "CounterCurrent(scale)")
        nonnegative(self.clip, "CounterCurrent(clip)")

    def step(self, model, x, y, relaxation, rng=None) -> Step:
        """Both networks relaxed (the batch up, the K classes down) and every parameter's local gradient."""
        if not isinstance(model, CounterCurrentModel):
            raise SubstrateValueError(f"counter_current trains a models.local.ccl.CounterCurrentModel, got "
                                      f"{type(model).__name__}")
        fwd, fb, K, B = model.forward.network, model.feedback, model.classes, len(x)
        y = np.asarray(y, dtype=float)
        t = np.eye(K)
        free = ep.free_phase(fwd, x, relaxation)
        down = ep.free_phase(fb, t, relaxation)
        a, c = fwd.activities(free.u), fb.activities(down.u)
        forward_errors, feedback_errors, flops = {}, {}, 0
        pairs = [(np.asarray(x, dtype=float), None)] + [(a[:, fwd.slices[layer.name]], layer) for layer in fwd.layers]
        for i, (ai, layer) in enumerate(pairs):
            cl, ci = fb.layer(f"c{i}"), c[:, fb.slices[f"c{i}"]]
            r = (2 * self.scale / (ai.shape[1] * K * B)) * (ai @ ci.T - y)
            d = ai.shape[1]
            flops += 2 * d * K * B + 2 * K * B + 2 * d * K * B + 2 * d * K  # S_l, R_l, (R_l^T a_l) * rho'
            if layer is not None:
                forward_errors[layer.name] = (r @ ci) * rho_prime(layer.activation, free.u[:, fwd.slices[layer.name]])
                flops += 2 * d * K * B + 2 * d * B  # (R_l c_l) * rho'
            feedback_errors[cl.name] = (r.T @ ai) * rho_prime(cl.activation, down.u[:, fb.slices[cl.name]])
        grads = local_gradients(fwd, x, free, forward_errors)
        top = a[:, fwd.slices[model.forward.cost.layer]]
        e = model.forward.cost.readout_error(top, y)
        grads.update({"readout.weight": e.T @ top / B, "readout.bias": e.mean(axis=0)})
        back = local_gradients(fb, t, down, feedback_errors, prefix=FEEDBACK)
        flops += clip_norm(grads, list(grads), self.clip) + clip_norm(back, list(back), self.clip)
        loss = float(np.mean(model.forward.cost.value_and_grad(top, y)[0]))
        # the outer products of both networks, and the readout (logits, softmax error, its gradients)
        flops += C.parameter_flops(fwd, B) + C.parameter_flops(fb, K) + (4 * K * top.shape[1] + 5 * K) * B
        held = 2 * (fwd.n * B + fb.n * K) + K * B  # both networks' states and errors, and S_l
        return Step({**grads, **back}, loss, model.forward.cost.readout(top), free.ok and down.ok,
                    step_counts([free.counts, down.counts], B, flops, held))

    def probe(self, model, x, y, relaxation) -> float:
        """Cosine of the forward network's gradient with backprop's (the exact gradient of the CE)."""
        grads = self.step(model, x, y, relaxation).grads
        nominal = Classifier(getattr(model.network, "nominal", model.network), model.forward.cost)
        exact = EPRule(ep.Exact()).step(nominal, x, y, relaxation).grads
        names = [k for k in exact if k.startswith(("W:", "b:"))]
        return cosine(np.concatenate([grads[k].ravel() for k in names]),
                      np.concatenate([exact[k].ravel() for k in names]))


def _write_model(group, model: CounterCurrentModel):
    persist.write_object(group.create_group("forward"), model.forward)
    persist.write_object(group.create_group("feedback"), model.feedback)


def _read_model(group) -> CounterCurrentModel:
    return CounterCurrentModel(persist.read_object(group["forward"]), persist.read_object(group["feedback"]))


RULES[CounterCurrent.name] = CounterCurrent
persist.register(CounterCurrentModel, _write_model, _read_model)
