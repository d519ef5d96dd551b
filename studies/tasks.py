"""Tasks a study sweeps: each is a schema (what its config may contain) and a function
``run(config, seed) -> Result``.

A run that fails (a relaxation that does not converge or diverges, a gradient that cannot be computed)
raises; the sweep records it as failed with the message, and goes on. :class:`RunFailed` carries what
was computed up to the failure (``result``), which the run's file keeps.

Tasks:

* ``relaxation``: a layered network (``substrate.Network.from_config``) relaxed to its equilibrium on a
  batch of scikit-learn's 8x8 digits (pixels / 16) by one integrator: the residual trace and the cost.
* ``gradient_accuracy``: the relative error of the gradient methods of ``substrate.gradient`` (discrete
  adjoint with the given integrator and dt, continuous adjoint with a backward ETD2RK, implicit
  differentiation at the equilibrium) against the exact gradient of RK4 steps at dt / refinement.
* ``ep_bias``: every EP estimator (one-sided, negative, centred, holomorphic with several N) against the
  exact gradient as |beta| varies: relative error and cosine, and the error against the beta -> 0
  limit (the finite-nudge part alone).
* ``ep_train``: a classifier trained with an EP estimator or the exact gradient (``models.train``),
  optionally on a device (``device`` section: one effect of ``substrate.devices`` at a level):
  metrics per epoch, saved after every epoch (:func:`studies.sweep.save_partial`).
* ``pvrnn_meta_prior``: a PV-RNN (``models.pvrnn``) trained on the probabilistic sequences of
  ``models.data`` with meta-prior w on every layer: the learned sigma (posterior and prior) per layer,
  the training reconstruction, and generalisation, the one-step prediction error of error regression
  on held-out sequences (Ahmadi & Tani 2019; docs/equations.md, section 5); history saved every 100 epochs.
* ``pvrnn_er``: a continuous-time PV-RNN trained once, then error regression on held-out sequences
  with each credit assignment (exact, continuous adjoint, truncated BPTT) and on devices (read noise,
  time-constant mismatch): prediction error, seconds per step, gradient cosines with the exact one.
* ``dpm_gradients`` (``studies.dpm_tasks``): a diffusion model's sample and the gradients of a loss on
  it (x_T, class embedding, weights) by every form of the probability-flow ODE, grid, solver and
  adjoint (discrete, continuous) at equal network evaluations, against a converged reference.
* ``dpm_customise`` (``studies.dpm_customise``): the three customisations of AdjointDPM on a digits
  diffusion model, each gradient by the continuous adjoint: the initial noise against a fixed
  classifier (security auditing), a learned class embedding and fine-tuned weights for a style
  (thicker strokes, the digit kept); the classifier's shares, ink and accuracy before and after.
* ``selftest``: a run that sleeps, then returns, raises, diverges or kills its own process: it
  exercises the sweep machinery in the tests.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import substrate as S
from models.data import PRIMITIVES, digits_arrays, probabilistic_sequences
from substrate.devices import PRESETS
from studies.config import Check, Field, ListOf, Range
from studies.dpm_customise import CUSTOMISE_SCHEMA, run_dpm_customise
from studies.dpm_tasks import GRADIENTS_SCHEMA, run_dpm_gradients


@dataclass
class Result:
    """What a run returns. arrays: name -> (dims, array), one dim name per array axis; scalars: name ->
    float; coords: optional labels of the arrays' own dims (dim -> list of values)."""

    arrays: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)
    coords: dict = field(default_factory=dict)


class RunFailed(RuntimeError):
    """A run failed in a way the study records (no convergence, divergence); ``result`` holds what was
    computed up to the failure, or None."""

    def __init__(self, message: str, result: Result | None = None):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Task:
    """schema: nested dict key -> :class:`~studies.config.Field` (type, allowed, default, doc);
    run(config, seed) -> Result; warmup(): loads (or compiles) the compiled kernels the task uses, on
    a tiny problem, so that workers find the Numba cache warm."""

    schema: dict
    run: Callable
    warmup: Callable | None = None
    doc: str = ""


# ------------------------------------------------------------------------------------ data
N_DIGITS = 1797


def digits(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` of scikit-learn's 8x8 digits drawn without replacement by ``seed``, pixels in [0, 1]."""
    x, y = digits_arrays()
    idx = np.random.default_rng([1, int(seed)]).choice(len(y), size=batch, replace=False)
    return x[idx], y[idx]


def _sizes_ok(s):
    return s[0] == 64 and s[-1] == 10


NETWORK = {
    "sizes": Field(ListOf(int, 3, 6, Range(1, 4096)), Check(_sizes_ok, "starting with 64 (the 8x8 pixels) and "
                                                                   "ending with 10 (the digit classes)"),
                   [64, 32, 10], "layer sizes: input, hidden layers, output"),
    "activation": Field(str, tuple(S.ACTIVATIONS), "logistic", "activation of every layer"),
    "tau": Field(float, Range(0.0, 1e3, lo_open=True), 1.0, "time constant of every neuron"),
    "feedback": Field(str, ("tied", "independent", "none"), "independent", "feedback connections"),
    "asymmetry_angle": Field(float, Range(0.0, 180.0), 90.0, "degrees between the feedback and W^T"),
    "init_scale": Field(float, Range(0.0, 100.0, lo_open=True), 1.0, "weights uniform in +-scale/sqrt(fan_in)"),
    "lateral": Field(bool, None, False, "all-to-all connections inside hidden layers"),
}


def _network_schema(default_sizes):
    schema = dict(NETWORK)
    schema["sizes"] = NETWORK["sizes"]._replace(default=list(default_sizes))
    return schema


# ------------------------------------------------------------------------------------ relaxation
RELAXATION_SCHEMA = {
    "network": _network_schema([64, 32, 10]),
    "method": Field(str, tuple(S.METHODS), "exp_euler", "integrator"),
    "dt": Field(float, Range(0.0, 100.0, lo_open=True), 0.5, "step (fixed-step methods); first step (dopri5)"),
    "tol": Field(float, Range(0.0, 1.0, lo_open=True), 1e-8, "residual tolerance max_i |F_i(u)|"),
    "max_steps": Field(int, Range(1, 1_000_000), 10_000, "steps before the relaxation is declared failed"),
    "batch": Field(int, Range(1, N_DIGITS), 256, "digits relaxed at once"),
    "blowup": Field(float, Range(0.0, None, lo_open=True), 1e10, "a state beyond this has diverged"),
}


def run_relaxation(config: dict, seed: int) -> Result:
    net = S.Network.from_config(config["network"], seed)
    x, _ = digits(config["batch"], seed)
    start = time.perf_counter()
    sol = S.relax(net, x, method=config["method"], dt=config["dt"], tol=config["tol"],
                  max_steps=config["max_steps"], blowup=config["blowup"], on_failure="return")
    seconds = time.perf_counter() - start
    n = config["max_steps"] + 1  # traces padded with NaN to a common length, so that runs stack
    trace = np.full(n, np.nan)
    trace[:len(sol.residual_trace)] = sol.residual_trace
    t = np.full(n, np.nan)
    t[:len(sol.trace_t)] = sol.trace_t
    residual = float(np.max(sol.residual)) if np.all(np.isfinite(sol.residual)) else float("nan")
    result = Result(arrays={"residual_trace": (("step",), trace), "trace_t": (("step",), t)},
                    scalars={"steps": sol.steps, "nfev": sol.nfev, "converged": float(sol.converged),
                             "residual": residual, "t_final": float(sol.t_final), "seconds": seconds})
    if not sol.converged:
        raise RunFailed(f"relaxation failed: {sol.report()}", result)
    return result


def warmup_relaxation():
    """Every integrator once on a tiny network (loads or compiles the float64 kernels)."""
    rng = np.random.default_rng(0)
    net = S.Network.layered([3, 4, 2], rng)
    x = rng.uniform(size=(2, 3))
    for method in S.METHODS:
        S.relax(net, x, method=method, dt=0.5, max_steps=3, on_failure="return")


# ------------------------------------------------------------------------------------ gradient accuracy
FIXED_STEP = tuple(m for m in S.METHODS if m != "dopri5")
GRADIENT_METHODS = ("discrete", "continuous", "implicit")

GRADIENT_SCHEMA = {
    "network": _network_schema([64, 16, 10]),
    "integrator": Field(str, FIXED_STEP, "rk4", "forward integrator of the discrete and continuous adjoints"),
    "dt": Field(float, Range(0.0, 2.0, lo_open=True), 0.1, "forward step"),
    "t_end": Field(float, Range(0.0, 1000.0, lo_open=True), 5.0, "the loss is on the state at t_end (the "
                                                                  "implicit method's on the equilibrium)"),
    "batch": Field(int, Range(1, N_DIGITS), 8, "digits in the loss"),
    "refinement": Field(int, Range(2, 1024), 16, "reference: discrete adjoint of RK4 at dt / refinement"),
    "implicit_tol": Field(float, Range(0.0, 1e-2, lo_open=True), 1e-12, "residual of the implicit method's "
                                                                      "equilibrium"),
}


def _parameter_vector(g: S.Gradients) -> np.ndarray:
    """Weights and biases (the learned parameters), in one vector."""
    parts = [g.weights[k] for k in sorted(g.weights)] + [g.biases[k] for k in sorted(g.biases)]
    return np.concatenate([np.ravel(p) for p in parts])


def _output_loss(net, labels):
    out = net.slices["y"]
    target = np.eye(10)[labels]

    def loss(u):
        d = u[..., out] - target
        grad = np.zeros_like(u)
        grad[..., out] = d
        return 0.5 * float(np.sum(d ** 2)), grad

    return loss


def run_gradient_accuracy(config: dict, seed: int) -> Result:
    net = S.Network.from_config(config["network"], seed)
    x, labels = digits(config["batch"], seed)
    loss = _output_loss(net, labels)
    span = (0.0, config["t_end"])
    dt = config["dt"]
    start = time.perf_counter()
    ref = S.gradient(net, x, loss, method="discrete", t_span=span, integrator="rk4",
                     dt=dt / config["refinement"])
    reference_seconds = time.perf_counter() - start
    g_ref = _parameter_vector(ref)
    norm = float(np.linalg.norm(g_ref))
    methods = {
        "discrete": dict(method=S.DiscreteAdjoint(), t_span=span, integrator=config["integrator"], dt=dt),
        "continuous": dict(method=S.ContinuousAdjoint(backward="etd2rk"), t_span=span,
                           integrator=config["integrator"], dt=dt),
        "implicit": dict(method="implicit", tol=config["implicit_tol"]),
    }
    errors, seconds = [], []
    for name in GRADIENT_METHODS:
        start = time.perf_counter()
        g = S.gradient(net, x, loss, **methods[name])
        seconds.append(time.perf_counter() - start)
        errors.append(float(np.linalg.norm(_parameter_vector(g) - g_ref)) / norm)
    return Result(arrays={"relative_error": (("gradient_method",), np.array(errors)),
                          "method_seconds": (("gradient_method",), np.array(seconds))},
                  scalars={"loss": float(ref.loss), "reference_norm": norm, "reference_seconds": reference_seconds,
                           "seconds": reference_seconds + sum(seconds)},
                  coords={"gradient_method": list(GRADIENT_METHODS)})


def warmup_gradient_accuracy():
    rng = np.random.default_rng(0)
    net = S.Network.layered([3, 4, 2], rng)
    x = rng.uniform(size=(2, 3))

    def loss(u):
        return 0.5 * float(np.sum(u ** 2)), u.copy()

    S.gradient(net, x, loss, method="discrete", t_span=(0, 0.5), integrator="rk4", dt=0.25)
    S.gradient(net, x, loss, method=S.ContinuousAdjoint(backward="etd2rk"), t_span=(0, 0.5),
               integrator="exp_euler", dt=0.25)
    S.gradient(net, x, loss, method="implicit", tol=1e-6)


# ------------------------------------------------------------------------------------ EP bias
EP_BIAS_ESTIMATORS = ("one_sided", "negative", "centred", "holomorphic")
EP_BIAS_SCHEMA = {
    "network": _network_schema([64, 32, 10]),
    "batch": Field(int, Range(1, N_DIGITS), 16, "digits in the batch-mean cost"),
    "betas": Field(ListOf(float, 1, 64, Range(0.0, 10.0, lo_open=True)), None,
                   [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8], "|beta| values"),
    "points": Field(ListOf(int, 1, 8, Range(1, 64)), None, [3, 4, 6], "N of the holomorphic estimators"),
    "tol": Field(float, Range(0.0, 1e-2, lo_open=True), 1e-12, "residual tolerance of every phase"),
    "max_steps": Field(int, Range(1, 10_000_000), 20_000, "steps of a phase before its estimate is NaN"),
}


def run_ep_bias(config: dict, seed: int) -> Result:
    """Every EP estimator against the exact gradient as |beta| varies, on a squared-error cost of
    the output units for a batch of digits (targets one-hot). An estimate whose nudged phases do not
    converge (a complex beta beyond the radius of analyticity) is recorded as NaN."""
    from models import ep
    from models import metrics as M

    net = S.Network.from_config(config["network"], seed)
    x, labels = digits(config["batch"], seed)
    y = np.eye(net.layer("y").size)[labels % net.layer("y").size]
    cost = S.Cost("y")
    rel = ep.Relaxation(tol=config["tol"], max_steps=config["max_steps"])
    free = ep.free_phase(net, x, rel)
    nudged = ep.Relaxation(tol=config["tol"], max_steps=config["max_steps"], on_failure="record")

    def parameters(est):
        e = ep.estimate(net, x, y, cost, est, nudged, free=free)
        return e.gradients if e.converged else None

    exact, limit = parameters(ep.Exact()), parameters(ep.Limit())
    names = list(EP_BIAS_ESTIMATORS[:3]) + [f"holomorphic_{n}" for n in config["points"]]
    makers = [ep.OneSided, ep.Negative, ep.Centred] + [
        functools.partial(ep.Holomorphic, n) for n in config["points"]]
    shape = (len(names), len(config["betas"]))
    err, cos, nudge_err = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    for i, make in enumerate(makers):
        for j, beta in enumerate(config["betas"]):
            g = parameters(make(beta))
            if g is None:
                continue
            c_exact, c_limit = M.compare(g, exact), M.compare(g, limit)
            err[i, j], cos[i, j] = c_exact["relative_error"]["all"], c_exact["cosine"]["all"]
            nudge_err[i, j] = c_limit["relative_error"]["all"]
    asym = M.compare(limit, exact)
    dims = ("estimator", "beta")
    return Result(arrays={"relative_error": (dims, err), "cosine": (dims, cos), "nudge_error": (dims, nudge_err)},
                  scalars={"limit_cosine": asym["cosine"]["all"], "limit_error": asym["relative_error"]["all"],
                           "weight_angle": M.weight_angles(net).get("all", 0.0),
                           "jacobian_symmetry": M.jacobian_symmetry(net, free.u)},
                  coords={"estimator": names, "beta": list(config["betas"])})


# ------------------------------------------------------------------------------------ EP training
DEVICE_EFFECTS = ("none", "read_noise", "programming_noise", "quantisation", "feedback_copy", "tau_mismatch")
DEVICE = {
    "preset": Field(str, ("none",) + tuple(PRESETS), "none",
                    "a device preset (`substrate devices` lists them); the swept effect is added to it"),
    "weight_scale": Field(float, Range(0.0, 1e3, lo_open=True), 1.0,
                          "network weight per device unit (pulsed presets: their bounds and steps are in device units)"),
    "effect": Field(str, DEVICE_EFFECTS, "none",
                    "the device effect swept: read_noise (ReadNoise, relative sigma = level), programming_noise "
                    "(aihwkit PCM programming noise x level, tied feedback reads the forward devices), "
                    "quantisation (level = conductance levels), feedback_copy (programming noise x level, "
                    "feedback programmed as its own noisy copy), tau_mismatch (relative spread = level)"),
    "level": Field(float, Range(0.0, 1e4), 0.0, "the effect's level (see effect)"),
    "read_policy": Field(str, ("step", "phase", "equilibrium", "sample"), "equilibrium",
                         "when read noise is redrawn"),
    "relaxation_time": Field(float, Range(0.0, 1e4), 0.0, "finite relaxation time of every phase (0: to tol)"),
}


def make_device(config):
    """The substrate.devices.Device of a ``device`` config section (None for effect ``none``)."""
    from substrate import devices as D

    effect, level = config["effect"], config["level"]
    mapped = (D.ConductanceMapping(),)
    if effect == "read_noise":
        effects = (D.ReadNoise(level, policy=config["read_policy"]),)
    elif effect == "programming_noise":
        effects = mapped + (D.ProgrammingNoise(scale=level),)
    elif effect == "quantisation":
        effects = mapped + (D.Quantisation(int(round(level))),)
    elif effect == "feedback_copy":
        effects = mapped + (D.ProgrammingNoise(scale=level), D.IndependentFeedback())
    elif effect == "tau_mismatch":
        effects = (D.TauMismatch(level),)
    else:
        effects = ()
    if config["relaxation_time"] > 0:
        effects += (D.RelaxationTime(config["relaxation_time"]),)
    if config["preset"] != "none":
        base = D.preset(config["preset"])
        return base.with_effects(*effects).with_weight_scale(config["weight_scale"])
    return D.Device(effects, name=f"{effect}:{level:g}", weight_scale=config["weight_scale"]) if effects else None


EP_NETWORK = {
    "sizes": Field(ListOf(int, 3, 6, Range(1, 4096)), None, [64, 128, 10],
                   "inputs (the data's features), hidden layers, classes"),
    "cost": Field(str, ("cross_entropy", "squared_error"), "cross_entropy",
                  "cross_entropy: a linear readout of the last hidden layer; squared_error: output neurons"),
    "activation": NETWORK["activation"]._replace(default="logistic"),
    "feedback": NETWORK["feedback"]._replace(default="tied"),
    "asymmetry_angle": NETWORK["asymmetry_angle"],
    "init_scale": NETWORK["init_scale"],
    "dtype": Field(str, ("float64", "float32"), "float64", "parameters and states (holomorphic EP: float64)"),
}
EP_RULE = {
    "name": Field(str, ("one_sided", "negative", "centred", "holomorphic", "rotating_holomorphic", "exact"),
                  "centred", "the gradient estimator (models.ep)"),
    "beta": Field(float, Range(0.0, 10.0, lo_open=True), 0.2, "|beta|, the nudge strength"),
    "points": Field(int, Range(1, 64), 4, "N, points on the circle (holomorphic rules)"),
    "duration": Field(float, Range(0.0, 1e4, lo_open=True), 20.0, "time per point (rotating_holomorphic)"),
    "periods": Field(int, Range(1, 100), 1, "periods averaged (rotating_holomorphic)"),
}
EP_RELAXATION = {
    "method": Field(str, tuple(S.METHODS), "exp_euler", "integrator of every phase"),
    "dt": Field(float, Range(0.0, 100.0, lo_open=True), 1.0, "step, in units of tau"),
    "tol": Field(float, Range(0.0, 1.0, lo_open=True), 1e-4, "residual tolerance of every phase"),
    "max_steps": Field(int, Range(1, 1_000_000), 1000, "steps of the free phase before it counts as failed (T1)"),
    "nudged_max_steps": Field(int, Range(1, 1_000_000), 1000, "steps of a nudged phase (T2)"),
}
EP_TRAIN_SCHEMA = {
    "data": Field(str, ("digits", "fashion_mnist"), "digits", "data set (models.data)"),
    "n_train": Field(int, Range(0, 60_000), 0, "training samples used (0: all)"),
    "n_test": Field(int, Range(0, 10_000), 0, "test samples used (0: all)"),
    "network": EP_NETWORK,
    "rule": EP_RULE,
    "relaxation": EP_RELAXATION,
    "optimiser": Field(str, ("sgd", "adam"), "sgd", "optimiser"),
    "lr": Field(float, Range(0.0, 10.0, lo_open=True), 0.05, "learning rate"),
    "momentum": Field(float, Range(0.0, 1.0, hi_open=True), 0.9, "SGD momentum"),
    "epochs": Field(int, Range(0, 1000), 10, "epochs"),
    "batch_size": Field(int, Range(1, 10_000), 32, "minibatch size"),
    "homeostasis": Field(float, Range(0.0, 1e4), 0.0, "lambda of Jacobian homeostasis (0: off)"),
    "homeostasis_draws": Field(int, Range(0, 1000), 5, "probes of the stochastic estimator (0: exact penalty)"),
    "probe": Field(int, Range(0, 10_000), 64, "training samples of the per-epoch gradient-alignment probe"),
    "device": DEVICE,
}


def _rule(config):
    from models import ep

    r = config["rule"]
    name, beta = r["name"], r["beta"]
    if name in ("holomorphic", "rotating_holomorphic"):
        extra = {} if name == "holomorphic" else {"duration": r["duration"], "periods": r["periods"]}
        return ep.make_estimator(name, points=r["points"], beta=beta, **extra)
    return ep.make_estimator(name) if name == "exact" else ep.make_estimator(name, beta=beta)


def run_ep_train(config: dict, seed: int) -> Result:
    from models import data as D
    from models import ep
    from models.homeostasis import Homeostasis
    from models.train import OPTIMISERS, Classifier, train
    from studies.sweep import save_partial

    data = D.load(config["data"])
    if config["n_train"] or config["n_test"]:
        data = data.subset(config["n_train"] or None, config["n_test"] or None)
    net = dict(config["network"])
    sizes = net.pop("sizes")
    if sizes[0] != data.n_features or sizes[-1] != data.classes:
        raise S.SubstrateValueError(f"network.sizes={sizes}: {config['data']} needs {data.n_features} inputs "
                                    f"and {data.classes} classes")
    rng = np.random.default_rng(seed)
    model = Classifier.layered(sizes, rng, cost=net.pop("cost"), **net)
    device = make_device(config["device"])
    if device is not None:  # the devices draw from their own streams, apart from training's
        from substrate.devices import attach

        model = Classifier(attach(model.network, device, np.random.default_rng([seed, 6])), model.cost)
    rel = config["relaxation"]
    relaxation = ep.Relaxation(method=rel["method"], dt=rel["dt"], tol=rel["tol"], max_steps=rel["max_steps"],
                               nudged_max_steps=rel["nudged_max_steps"], on_failure="record")
    opt = OPTIMISERS[config["optimiser"]]
    optimiser = opt(config["lr"], config["momentum"]) if config["optimiser"] == "sgd" else opt(config["lr"])
    homeo = None
    if config["homeostasis"] > 0:
        homeo = Homeostasis(config["homeostasis"], config["homeostasis_draws"] or None)

    def result(history):
        a = history.arrays()
        return Result(arrays={k: (("epoch",), v) for k, v in a.items() if k != "epoch"},
                      scalars={"final_test_accuracy": float(a["test_accuracy"][-1]),
                               "best_test_accuracy": float(np.max(a["test_accuracy"])),
                               "epochs_run": float(a["epoch"][-1]),
                               "epoch_seconds": float(np.mean(a["seconds"][1:])) if len(a["seconds"]) > 1
                               else float("nan")},
                      coords={"epoch": [int(e) for e in a["epoch"]]})

    history = train(model, data, rule=_rule(config), optimiser=optimiser, epochs=config["epochs"],
                    batch_size=config["batch_size"], relaxation=relaxation, homeostasis=homeo, rng=rng,
                    probe=config["probe"], progress=False, on_epoch=lambda h: save_partial(result(h)))
    return result(history)


def warmup_ep_train():
    """A free and a (real and complex) nudged phase on a tiny network."""
    from models import ep

    rng = np.random.default_rng(0)
    net = S.Network.layered([3, 4, 2], rng)
    x, y = rng.uniform(size=(2, 3)), np.eye(2)
    ep.estimate(net, x, y, S.Cost("y"), ep.Holomorphic(4, 0.1), ep.Relaxation(max_steps=3, on_failure="record"))


# ------------------------------------------------------------------------------------ PV-RNN meta-prior
PV_DATA = {
    "train_sequences": Field(int, Range(1, 10_000), 12, "training sequences"),
    "train_steps": Field(int, Range(2, 100_000), 200, "steps of a training sequence"),
    "test_sequences": Field(int, Range(1, 10_000), 4, "held-out sequences (error regression)"),
    "test_steps": Field(int, Range(2, 100_000), 200, "steps of a held-out sequence"),
    "primitives": Field(ListOf(str, 1, 3, tuple(PRIMITIVES)), None, list(PRIMITIVES),
                        "the 2-D cyclic primitives the finite-state machine switches among (models.data)"),
    "period": Field(int, Range(2, 10_000), 20, "steps of one cycle of a primitive"),
    "amplitude": Field(float, Range(0.0, 1.0, lo_open=True, hi_open=True), 0.8, "amplitude of the primitives"),
    "noise": Field(float, Range(0.0, 10.0), 0.02, "sigma of the Gaussian observation noise"),
    "seed": Field(int, Range(-1, 2 ** 63 - 1), -1, "seed of the data (-1: the run's seed); drawn apart from "
                                                  "the network's, so that every w sees the same sequences"),
}
PV_NETWORK = {
    "units": Field(ListOf(int, 1, 6, Range(1, 4096)), None, [30, 15], "deterministic units per layer, bottom first"),
    "latents": Field(ListOf(int, 1, 6, Range(1, 1024)), None, [3, 1], "stochastic latents per layer"),
    "tau": Field(ListOf(float, 1, 6, Range(1.0, 1e4)), None, [2.0, 8.0], "time constant per layer (>= 1)"),
    "w_first": Field(float, Range(0.0, 1e3), 1.0, "meta-prior of a sequence's first step (prior N(0, I))"),
}
PV_TRAINING = {
    "epochs": Field(int, Range(1, 1_000_000), 3000, "Adam steps on the whole training set"),
    "lr": Field(float, Range(0.0, 1.0, lo_open=True), 5e-3, "Adam's learning rate (weights and every A)"),
}
PV_ER = {
    "window": Field(int, Range(1, 1000), 10, "steps of the sliding window"),
    "iterations": Field(int, Range(1, 10_000), 50, "Adam steps on the window's A per data step"),
    "lr": Field(float, Range(0.0, 10.0, lo_open=True), 0.1, "Adam's learning rate (state reset each step)"),
    "newest": Field(str, ("copy", "prior", "zeros"), "copy", "the new step's A when the window slides"),
    "meta_prior": Field(float, Check(lambda v: v == -1 or 0 <= v < math.inf, "-1 (the training w) or a number >= 0"),
                        -1.0, "w of every layer during error regression (-1: the training w)"),
    "sample": Field(bool, None, True, "predict by sampling the prior (else its means)"),
    "train_sequences": Field(int, Range(1, 10_000), 4, "training sequences also run through error regression "
                                                         "(the first ones), for comparison"),
}
PVRNN_META_PRIOR_SCHEMA = {
    "w": Field(float, Range(0.0, 1e3), 1e-2, "the meta-prior w of every layer (steps t > 0)"),
    "data": PV_DATA,
    "network": PV_NETWORK,
    "training": PV_TRAINING,
    "error_regression": PV_ER,
}
PARTIAL_EPOCHS = 100  # a long training saves its history (save_partial) every this many epochs


def _check_layers(net):
    if not len(net["units"]) == len(net["latents"]) == len(net["tau"]):
        raise S.SubstrateValueError(f"network.units={net['units']}, network.latents={net['latents']}, "
                                    f"network.tau={net['tau']}: one value per layer, lists of equal lengths")


def _history_arrays(hist):
    return {"free_energy": (("epoch",), hist["free_energy"]), "reconstruction": (("epoch",), hist["reconstruction"]),
            "kl": (("epoch", "layer"), hist["kl"])}


def _history_coords(hist):
    return {"epoch": list(range(1, len(hist["free_energy"]) + 1)), "layer": list(range(hist["kl"].shape[1]))}


def _save_history(hist):
    """``train``'s on_epoch: the history so far every ``PARTIAL_EPOCHS`` epochs (kept if the run dies)."""
    from studies.sweep import save_partial

    n = len(hist["free_energy"])
    if n % PARTIAL_EPOCHS == 0:
        save_partial(Result(arrays=_history_arrays(hist), scalars={"epochs_run": float(n)},
                            coords=_history_coords(hist)))


def pvrnn_data(config: dict, seed: int):
    """(training sequences, held-out sequences) of ``probabilistic_sequences``, each (B, T, 2), drawn
    from streams of the data seed alone (the run's seed where ``data.seed`` is -1): the same for every w
    and every network, and the held-out set the same whatever the training set's size."""
    d = config["data"]
    data_seed = seed if d["seed"] == -1 else d["seed"]
    kw = dict(primitives=tuple(d["primitives"]), period=d["period"], amplitude=d["amplitude"], noise=d["noise"])
    x, _ = probabilistic_sequences(d["train_sequences"], d["train_steps"], np.random.default_rng([data_seed, 1]),
                                   **kw)
    test, _ = probabilistic_sequences(d["test_sequences"], d["test_steps"], np.random.default_rng([data_seed, 2]),
                                      **kw)
    return x, test


def _prediction_error(model, sequences, er, rng):
    """Per sequence: the mean one-step squared prediction error ||x_hat_{t+1} - x_{t+1}||^2 of error
    regression once its window is full (t >= window); and the mean posterior sigma per layer at the
    window's newest step, over the same steps."""
    from models.pvrnn import error_regression

    errors, sigmas = [], []
    for seq in sequences:
        out = error_regression(model, seq, er, rng)
        errors.append(float(np.mean(out["prediction_error"][er.window:-1])))
        sigmas.append(out["sigma_q"][er.window:-1].mean(axis=0))
    return np.array(errors), np.array(sigmas)


def _generation_spread(model, A, x, rng, samples: int = 8, steps: int = 40):
    """How random the learned generative model is, whatever sigma reads: from the posterior-mean
    state halfway through each training sequence, ``samples`` generations of ``steps`` steps from the
    prior; the variance of x_hat across the samples, mean over steps, outputs and sequences (0 for a
    deterministic model; small for deterministic chaos over this horizon)."""
    from models.pvrnn import State

    B, T, _ = x.shape
    half = T // 2
    state = model.run({k: v[:, :half] for k, v in A.items()},
                      [np.zeros((B, half, lay.latents)) for lay in model.layers]).end
    many = State([np.repeat(h, samples, axis=0) for h in state.h], [np.repeat(d, samples, axis=0) for d in state.d],
                 False)
    out = model.generate(B * samples, steps, rng, start=many).reshape(B, samples, steps, -1)
    return float(out.var(axis=1).mean())


def run_pvrnn_meta_prior(config: dict, seed: int) -> Result:
    """A PV-RNN (``models.pvrnn``) with meta-prior ``w`` on every layer, trained on probabilistic
    sequences, then:

    * the learned sigma per layer: the posterior's sigma^q = exp(A^sig) and the prior's sigma^p =
      exp(W_sig d_{t-1} + b_sig) along the posterior-mean pass (eps = 0), means over the training
      sequences and their steps t > 0 (step 0 has the fixed prior N(0, I), weighted by w_first);
    * the training reconstruction error mean_{b,t} ||x_t - x_hat_t||^2 of that pass;
    * generalisation: error regression over each held-out sequence (and over the first
      ``error_regression.train_sequences`` training sequences, for comparison), the mean one-step
      prediction error ||x_hat_{t+1} - x_{t+1}||^2 once the window is full;
    * the open-loop baseline: the same error of the prior-mean generation (no inference) on the
      held-out sequences, mean over every step;
    * the generation spread (:func:`_generation_spread`): how much sampling the prior changes what
      the model generates, the randomness it learned whether or not its latents carry it.

    Arrays per epoch ("free_energy", "reconstruction", "kl" per layer) and per layer; the training
    history is saved every ``PARTIAL_EPOCHS`` epochs (:func:`studies.sweep.save_partial`)."""
    from models.pvrnn import PVRNN, ErrorRegression, PVLayer, train

    net, w = config["network"], config["w"]
    _check_layers(net)
    d, e = config["data"], config["error_regression"]
    if e["train_sequences"] > d["train_sequences"]:
        raise S.SubstrateValueError(f"error_regression.train_sequences={e['train_sequences']}: at most "
                                    f"data.train_sequences={d['train_sequences']}")
    if min(d["train_steps"], d["test_steps"]) < e["window"] + 2:
        raise S.SubstrateValueError(f"data.train_steps={d['train_steps']}, data.test_steps={d['test_steps']}: "
                                    f"at least error_regression.window + 2 = {e['window'] + 2} (one prediction "
                                    "after the window is full)")
    x, test = pvrnn_data(config, seed)
    rng = np.random.default_rng(seed)
    model = PVRNN([PVLayer(u, z, tau, w, net["w_first"]) for u, z, tau in zip(net["units"], net["latents"],
                                                                              net["tau"])], x.shape[2], rng)
    layers = list(range(len(model.layers)))
    tr = config["training"]
    start = time.perf_counter()
    A, hist = train(model, x, epochs=tr["epochs"], rng=rng, lr=tr["lr"], progress=False, on_epoch=_save_history)
    train_seconds = time.perf_counter() - start

    run = model.run(A, [np.zeros(x.shape[:2] + (lay.latents,)) for lay in model.layers])
    sigma_q = [float(np.exp(A[f"l{i}.sig"][:, 1:]).mean()) for i in layers]
    sigma_p = [float(np.exp(run.logs_p[i][:, 1:]).mean()) for i in layers]
    reconstruction_error = float(np.mean(np.sum((run.x_hat - x) ** 2, axis=-1)))

    er = ErrorRegression(window=e["window"], iterations=e["iterations"], lr=e["lr"], newest=e["newest"],
                         meta_prior=None if e["meta_prior"] == -1 else (e["meta_prior"],) * len(layers),
                         sample=e["sample"])
    er_rng = np.random.default_rng([seed, 2])
    start = time.perf_counter()
    test_error, test_sigma = _prediction_error(model, test, er, er_rng)
    train_error, _ = _prediction_error(model, x[:e["train_sequences"]], er, er_rng)
    er_seconds = time.perf_counter() - start
    open_loop = model.generate(len(test), test.shape[1], None)
    open_loop_error = float(np.mean(np.sum((open_loop - test) ** 2, axis=-1)))
    spread = _generation_spread(model, A, x, np.random.default_rng([seed, 4]))

    arrays = _history_arrays(hist)
    arrays.update({"sigma_q": (("layer",), np.array(sigma_q)), "sigma_p": (("layer",), np.array(sigma_p)),
                   "test_sigma_q": (("layer",), test_sigma.mean(axis=0)),
                   "test_sequence_error": (("test_sequence",), test_error)})
    return Result(arrays=arrays,
                  scalars={"test_prediction_error": float(np.mean(test_error)),
                           "train_prediction_error": float(np.mean(train_error)),
                           "train_reconstruction_error": reconstruction_error, "open_loop_error": open_loop_error,
                           "generation_spread": spread,
                           "final_free_energy": float(hist["free_energy"][-1]),
                           "train_seconds": train_seconds, "er_seconds": er_seconds},
                  coords=_history_coords(hist))


def warmup_pvrnn():
    """A training step and error regression on a tiny PV-RNN (loads or compiles the error-regression
    kernels, ``models._pvrnn_kernels``)."""
    from models.pvrnn import PVRNN, ErrorRegression, PVLayer, error_regression, train

    rng = np.random.default_rng(0)
    model = PVRNN([PVLayer(3, 1, 2.0), PVLayer(2, 1, 4.0)], 2, rng)
    x = rng.uniform(-0.5, 0.5, size=(1, 4, 2))
    train(model, x, epochs=1, rng=rng, progress=False)
    error_regression(model, x[0], ErrorRegression(window=2, iterations=2), rng)


# ------------------------------------------------------------------------------------ PV-RNN ER: credit, devices
def _credit_ok(v):
    name, _, k = v.partition(":")
    return (name in ("exact", "continuous") and not k) or (name == "truncated" and k.isdigit() and int(k) >= 1)


PVRNN_ER_SCHEMA = {
    "data": PV_DATA,
    "network": {**PV_NETWORK,
                "w": Field(float, Range(0.0, 1e3), 1e-2, "the meta-prior w of every layer (steps t > 0)"),
                "substeps": Field(int, Range(1, 256), 4, "integration steps per data step (1: the published "
                                                        "model; more: the continuous-time circuit)"),
                "method": Field(str, ("euler", "exp_euler"), "exp_euler", "integrator of the units")},
    "training": PV_TRAINING,
    "error_regression": {k: v for k, v in PV_ER.items() if k != "train_sequences"},
    "credit": Field(ListOf(str, 1, 20, Check(_credit_ok, "'exact', 'continuous' or 'truncated:K' (K >= 1)")),
                    None, ["exact", "continuous", "truncated:1", "truncated:2", "truncated:5"],
                    "credit assignments compared inside error regression (no device)"),
    "read_noise": Field(ListOf(float, 0, 20, Range(0.0, 10.0)), None, [0.02, 0.05, 0.1, 0.2],
                        "relative read-noise sigma of every weight, redrawn every pass (exact credit)"),
    "tau_mismatch": Field(ListOf(float, 0, 20, Range(0.0, 10.0)), None, [0.1, 0.2, 0.4],
                          "spread of every unit's time constant, tau (1 + spread xi) (exact credit)"),
    "gradient_windows": Field(int, Range(0, 100_000), 40, "windows of the training sequences (posterior "
                                                           "A, posterior-mean start states) on which each "
                                                           "credit's gradient is compared with the exact one"),
}


def _credit(v):
    name, _, k = v.partition(":")
    return name, int(k) if k else None


def _window_gradient_cosines(model, x, A, window, credits, count, rng):
    """Cosine of each credit's dF/dA with the exact one on ``count`` windows of the training
    sequences: the posterior A of the window, its start state from the posterior-mean pass, fresh
    noise; one value per credit (the median over the windows)."""
    B, T, _ = x.shape
    cos = np.full((len(credits), count), np.nan)
    for c in range(count):
        b, s = int(rng.integers(B)), int(rng.integers(1, T - window + 1))
        start = model.run({k: v[b:b + 1, :s] for k, v in A.items()},
                          [np.zeros((1, s, lay.latents)) for lay in model.layers]).end
        Aw = {k: v[b:b + 1, s:s + window] for k, v in A.items()}
        eps = model.noise(1, window, rng)
        grads = [np.concatenate([g.ravel() for g in model.free_energy(
            x[b:b + 1, s:s + window], Aw, eps, start=start, weights=False, credit=name, truncation=k)[3].values()])
            for name, k in map(_credit, credits)]
        exact = np.concatenate([g.ravel() for g in model.free_energy(
            x[b:b + 1, s:s + window], Aw, eps, start=start, weights=False)[3].values()])
        for j, g in enumerate(grads):
            cos[j, c] = g @ exact / (np.linalg.norm(g) * np.linalg.norm(exact))
    return np.median(cos, axis=1)


def run_pvrnn_er(config: dict, seed: int) -> Result:
    """A continuous-time PV-RNN trained on probabilistic sequences, then error regression on the
    held-out sequences under variants, each the mean one-step prediction error once the window is
    full (mean over the held-out sequences) and the seconds per ER step:

    * credit assignment (no device): the exact discrete adjoint, the continuous adjoint of the
      continuous-time circuit, truncated BPTT (the state detached every K data steps) -- and the
      cosine of each one's window gradient with the exact one on windows of the training data;
    * the circuit on a device with exact credit (the adjoint nominal): read noise on every weight,
      redrawn every pass, at each sigma; time-constant mismatch at each spread (the device's own
      streams, ``devices.stream(seed, effect)``, apart from the ER noise).

    Every variant runs the NumPy path (comparable seconds); the compiled exact step runs last, on the
    same noise draws (its error equals the NumPy exact one up to rounding). Also the open-loop error
    (prior means, no inference)."""
    from models.pvrnn import PVRNN, DeviceCircuit, ErrorRegression, PVLayer, error_regression, train
    from substrate.devices import Device, ReadNoise, TauMismatch

    net, d, e = config["network"], config["data"], config["error_regression"]
    _check_layers(net)
    if d["test_steps"] < e["window"] + 2:
        raise S.SubstrateValueError(f"data.test_steps={d['test_steps']}: at least error_regression.window + 2 = "
                                    f"{e['window'] + 2} (one prediction after the window is full)")
    if config["gradient_windows"] and d["train_steps"] < e["window"] + 1:
        raise S.SubstrateValueError(f"data.train_steps={d['train_steps']}: at least error_regression.window + 1 "
                                    "for the gradient windows")
    x, test = pvrnn_data(config, seed)
    rng = np.random.default_rng(seed)
    model = PVRNN([PVLayer(u, z, tau, net["w"], net["w_first"]) for u, z, tau in
                   zip(net["units"], net["latents"], net["tau"])], x.shape[2], rng, substeps=net["substeps"],
                  method=net["method"])
    tr = config["training"]
    A, hist = train(model, x, epochs=tr["epochs"], rng=rng, lr=tr["lr"], progress=False, on_epoch=_save_history)
    L = len(model.layers)
    base = dict(window=e["window"], iterations=e["iterations"], lr=e["lr"], newest=e["newest"],
                meta_prior=None if e["meta_prior"] == -1 else (e["meta_prior"],) * L, sample=e["sample"])

    def regress(er, circuit=None, compiled=False):
        start = time.perf_counter()
        errors = [np.mean(error_regression(model, seq, er, np.random.default_rng([seed, 2, k]), compiled=compiled,
                                          circuit=circuit)["prediction_error"][er.window:-1])
                  for k, seq in enumerate(test)]
        return float(np.mean(errors)), (time.perf_counter() - start) / (len(test) * test.shape[1])

    # every variant by the NumPy path (like for like); the compiled exact step last (warm), the same draws
    credit = [regress(ErrorRegression(**base, credit=name, truncation=k))
              for name, k in map(_credit, config["credit"])]
    read = [regress(ErrorRegression(**base), DeviceCircuit(model, Device((ReadNoise(s),)), seed))
            for s in config["read_noise"]]
    tau = [regress(ErrorRegression(**base), DeviceCircuit(model, Device((TauMismatch(s),)), seed))
           for s in config["tau_mismatch"]]
    error_regression(model, test[0, :2], ErrorRegression(**base), np.random.default_rng(0))  # loads the kernels
    compiled_error, compiled_seconds = regress(ErrorRegression(**base), compiled=True)
    cosines = (_window_gradient_cosines(model, x, A, e["window"], config["credit"], config["gradient_windows"],
                                        np.random.default_rng([seed, 3]))
               if config["gradient_windows"] else np.full(len(config["credit"]), np.nan))
    open_loop = model.generate(len(test), test.shape[1], None)
    arrays = _history_arrays(hist)
    arrays.update({"credit_error": (("credit",), np.array([v[0] for v in credit])),
                   "credit_step_seconds": (("credit",), np.array([v[1] for v in credit])),
                   "credit_gradient_cosine": (("credit",), cosines),
                   "read_noise_error": (("read_noise",), np.array([v[0] for v in read])),
                   "tau_mismatch_error": (("tau_mismatch",), np.array([v[0] for v in tau]))})
    return Result(arrays=arrays,
                  scalars={"compiled_error": compiled_error, "compiled_step_seconds": compiled_seconds,
                           "open_loop_error": float(np.mean(np.sum((open_loop - test) ** 2, axis=-1))),
                           "final_free_energy": float(hist["free_energy"][-1])},
                  coords={**_history_coords(hist), "credit": list(config["credit"]),
                          "read_noise": list(config["read_noise"]), "tau_mismatch": list(config["tau_mismatch"])})


# ------------------------------------------------------------------------------------ selftest
SELFTEST_SCHEMA = {
    "value": Field(float, Range(-1e6, 1e6), 1.0, "scales the returned trace"),
    "size": Field(int, Range(1, 100_000), 4, "length of the returned trace"),
    "sleep": Field(float, Range(0.0, 60.0), 0.0, "seconds the run sleeps"),
    "fail": Field(str, ("none", "raise", "diverge", "crash"), "none",
                  "raise: an exception; diverge: a recorded failure; crash: the process kills itself"),
}


def run_selftest(config: dict, seed: int) -> Result:
    from studies.sweep import save_partial

    time.sleep(config["sleep"])
    trace = config["value"] * np.arange(config["size"]) + np.random.default_rng(seed).normal(size=config["size"])
    result = Result(arrays={"trace": (("step",), trace)}, scalars={"value": config["value"]})
    save_partial(result)  # what a long run does after each epoch; kept if the process then dies
    if config["fail"] == "raise":
        raise ValueError(f"selftest raised for value {config['value']:g}")
    if config["fail"] == "diverge":
        raise RunFailed(f"selftest diverged for value {config['value']:g}", result)
    if config["fail"] == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    return result


TASKS = {
    "relaxation": Task(RELAXATION_SCHEMA, run_relaxation, warmup_relaxation,
                       "a network relaxed to equilibrium on digits by one integrator"),
    "gradient_accuracy": Task(GRADIENT_SCHEMA, run_gradient_accuracy, warmup_gradient_accuracy,
                              "relative error of the gradient methods against RK4 at dt / refinement"),
    "ep_bias": Task(EP_BIAS_SCHEMA, run_ep_bias, warmup_ep_train,
                    "bias of every EP estimator against the exact gradient, as |beta| varies"),
    "ep_train": Task(EP_TRAIN_SCHEMA, run_ep_train, warmup_ep_train,
                     "a classifier trained with an EP estimator (or the exact gradient), metrics per epoch"),
    "pvrnn_meta_prior": Task(PVRNN_META_PRIOR_SCHEMA, run_pvrnn_meta_prior, warmup_pvrnn,
                             "a PV-RNN trained on probabilistic sequences at meta-prior w: sigma, generalisation"),
    "pvrnn_er": Task(PVRNN_ER_SCHEMA, run_pvrnn_er, warmup_pvrnn,
                     "PV-RNN error regression: credit assignments compared, and on a noisy device"),
    "dpm_gradients": Task(GRADIENTS_SCHEMA, run_dpm_gradients, None,
                          "a diffusion model's sample gradients by every ODE form, grid, solver and adjoint"),
    "dpm_customise": Task(CUSTOMISE_SCHEMA, run_dpm_customise, None,
                          "AdjointDPM's customisations on digits: noise vs a classifier, a learned embedding, weights"),
    "selftest": Task(SELFTEST_SCHEMA, run_selftest, None, "sleeps, then returns, raises, diverges or crashes"),
}
