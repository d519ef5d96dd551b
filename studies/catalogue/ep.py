"""The EP family (``models.ep``, docs/equations.md, section 4).

* ``ep_bias``: every EP estimator nudged at points |beta| (one-sided, negative, centred, holomorphic
  with several N: the ``PointEstimator`` classes of ``models.ep.ESTIMATORS``) against the exact
  gradient as |beta| varies: relative error and cosine, and the error against the beta -> 0 limit
  (the finite-nudge part alone).
* ``ep_train``: a classifier trained with an EP estimator or the exact gradient (``models.train``),
  optionally on a device (``device`` section, :mod:`studies.catalogue.devices`): metrics per epoch,
  saved after every epoch (``save_partial``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import matplotlib.pyplot as plt
import numpy as np

import substrate as S
from models import data as D
from models import ep
from models import metrics as M
from models.homeostasis import Homeostasis
from models.train import OPTIMISERS, Classifier, train
from studies import figures as F
from studies.catalogue.devices import DEVICE, make_device, plot_devices, plot_presets
from studies.catalogue.shared import N_DIGITS, NETWORK, digits, network_schema
from studies.config import Field, ListOf, Range
from studies.runs import Result, Task, discard
from substrate.devices import attach


# ------------------------------------------------------------------------------------ EP bias
EP_BIAS_SCHEMA = {
    "network": network_schema([64, 32, 10]),
    "batch": Field(int, Range(1, N_DIGITS), 16, "digits in the batch-mean cost"),
    "betas": Field(ListOf(float, 1, 64, Range(0.0, 10.0, lo_open=True)), None,
                   [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8], "|beta| values"),
    "points": Field(ListOf(int, 1, 8, Range(1, 64)), None, [3, 4, 6], "N of the holomorphic estimators"),
    "tol": Field(float, Range(0.0, 1e-2, lo_open=True), 1e-12, "residual tolerance of every phase"),
    "max_steps": Field(int, Range(1, 10_000_000), 20_000, "steps of a phase before its estimate is NaN"),
}


def bias_estimators(points) -> tuple[list, list]:
    """(names, makers) of the estimators ep_bias compares: every ``PointEstimator`` of
    ``models.ep.ESTIMATORS``, one per N of ``points`` (named ``<name>_<N>``) for those that take N;
    ``make(beta=...)`` builds one."""
    names, makers = [], []
    for name, cls in ep.ESTIMATORS.items():
        if not issubclass(cls, ep.PointEstimator):
            continue
        if "points" in {f.name for f in dataclasses.fields(cls)}:
            names += [f"{name}_{n}" for n in points]
            makers += [functools.partial(cls, points=n) for n in points]
        else:
            names.append(name)
            makers.append(cls)
    return names, makers


def run_ep_bias(config: dict, seed: int, save_partial=discard) -> Result:
    """Every EP estimator against the exact gradient as |beta| varies, on a squared-error cost of
    the output units for a batch of digits (targets one-hot). An estimate whose nudged phases do not
    converge (a complex beta beyond the radius of analyticity) is recorded as NaN."""
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
    names, makers = bias_estimators(config["points"])
    shape = (len(names), len(config["betas"]))
    err, cos, nudge_err = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    for i, make in enumerate(makers):
        for j, beta in enumerate(config["betas"]):
            g = parameters(make(beta=beta))
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


def plot_ep_bias(archive_path: str):
    """EP bias study: relative error of each estimator against the exact gradient as |beta| varies
    (log-log, median over seeds), one panel per asymmetry angle; the dotted line is the error of the
    beta -> 0 limit, the asymmetry part of the bias that no beta or N removes."""
    ds, axes = F.open_sweep(archive_path)
    col_axis = F.other_axis(ds, axes, ())
    cols = list(ds[col_axis].values) if col_axis else [None]
    fig, grid = plt.subplots(1, len(cols), figsize=(5.5 * len(cols) + 2.5, 4.8), squeeze=False, layout="constrained")
    betas = ds["beta"].values
    for c, col in enumerate(cols):
        ax = grid[0][c]
        sel = {col_axis: col} if col_axis else {}
        for i, est in enumerate(ds["estimator"].values):
            err = F.median(ds["relative_error"].sel(sel).sel(estimator=est), ["beta"])
            ax.loglog(betas, np.atleast_1d(err.values), "o-", ms=3, color=f"C{i}", label=str(est))
        floor = float(F.median(ds["limit_error"].sel(sel), []).values)
        if floor > 0:
            ax.axhline(floor, color="k", ls=":", lw=1, label=r"$\beta \to 0$ limit (the asymmetry part)")
        ax.set_xlabel(r"nudge strength $|\beta|$")
        ax.set_ylabel("relative error against the exact gradient")
        ax.set_title(F.panel_title(col_axis, col))
        ax.grid(True, which="both", alpha=0.3)
    F.figure_legend(fig, columns=5)
    fig.suptitle(f"{ds.attrs['study_name']}: EP estimators against implicit differentiation (median over seeds)")
    return F.readable_ticks(fig)


# ------------------------------------------------------------------------------------ EP training
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
# limit: ep_bias's diagnostic of the finite-nudge bias, not a learning rule
RULES = tuple(name for name in ep.ESTIMATORS if name != "limit")
EP_RULE = {
    "name": Field(str, RULES, "centred", "the gradient estimator (models.ep)"),
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
    """The estimator of the ``rule`` section: its class in ``models.ep.ESTIMATORS``, given the section's
    values of the class's fields."""
    r = config["rule"]
    fields = {f.name for f in dataclasses.fields(ep.ESTIMATORS[r["name"]])}
    return ep.make_estimator(r["name"], **{k: v for k, v in r.items() if k in fields})


def task_data(config: dict) -> D.Dataset:
    """The data set of an ``ep_train`` config (``data``, cut to ``n_train`` and ``n_test``)."""
    data = D.load(config["data"])
    if config["n_train"] or config["n_test"]:
        data = data.subset(config["n_train"] or None, config["n_test"] or None)
    return data


def task_relaxation(config: dict) -> ep.Relaxation:
    """The relaxation of every phase of an ``ep_train`` config (a phase that misses its tolerance is
    recorded, not raised)."""
    rel = config["relaxation"]
    return ep.Relaxation(method=rel["method"], dt=rel["dt"], tol=rel["tol"], max_steps=rel["max_steps"],
                         nudged_max_steps=rel["nudged_max_steps"], on_failure="record")


def training_result(history) -> Result:
    """An ``ep_train`` run's metrics per epoch (row 0: before training) and their summary."""
    a = history.arrays()
    return Result(arrays={k: (("epoch",), v) for k, v in a.items() if k != "epoch"},
                  scalars={"final_test_accuracy": float(a["test_accuracy"][-1]),
                           "best_test_accuracy": float(np.max(a["test_accuracy"])),
                           "epochs_run": float(a["epoch"][-1]),
                           "epoch_seconds": float(np.mean(a["seconds"][1:])) if len(a["seconds"]) > 1
                           else float("nan")},
                  coords={"epoch": [int(e) for e in a["epoch"]]})


def train_classifier(config: dict, seed: int, save_partial=discard, rule=None):
    """The classifier an ``ep_train`` config trains, trained: ``(model, data, history)``; after every
    epoch ``save_partial`` gets :func:`training_result` and the progress. ``rule``: a ``models.train`` rule
    to train with instead of the config's estimator (a study with rules of its own)."""
    data = task_data(config)
    net = dict(config["network"])
    sizes = net.pop("sizes")
    if sizes[0] != data.n_features or sizes[-1] != data.classes:
        raise S.SubstrateValueError(f"network.sizes={sizes}: {config['data']} needs {data.n_features} inputs "
                                    f"and {data.classes} classes")
    rng = np.random.default_rng(seed)
    model = Classifier.layered(sizes, rng, cost=net.pop("cost"), **net)
    device = make_device(config["device"])
    if device is not None:  # the devices draw from their own streams, apart from training's
        model = Classifier(attach(model.network, device, np.random.default_rng([seed, 6])), model.cost)
    opt = OPTIMISERS[config["optimiser"]]
    optimiser = opt(config["lr"], config["momentum"]) if config["optimiser"] == "sgd" else opt(config["lr"])
    homeo = None
    if config["homeostasis"] > 0:
        homeo = Homeostasis(config["homeostasis"], config["homeostasis_draws"] or None)

    def on_epoch(history):
        save_partial(training_result(history))
        save_partial.progress(history.epoch[-1], config["epochs"])

    history = train(model, data, rule=_rule(config) if rule is None else rule, optimiser=optimiser, epochs=config["epochs"],
                    batch_size=config["batch_size"], relaxation=task_relaxation(config), homeostasis=homeo,
                    rng=rng, probe=config["probe"], progress=False, on_epoch=on_epoch)
    return model, data, history


def run_ep_train(config: dict, seed: int, save_partial=discard) -> Result:
    """Train the config's classifier: its metrics per epoch, and the trained model (``objects``, kept
    in the run file when the study's ``save_weights`` is on)."""
    model, _, history = train_classifier(config, seed, save_partial)
    result = training_result(history)
    result.objects["model"] = model
    return result


def warmup_ep_train():
    """A free and a (real and complex) nudged phase on a tiny network."""
    rng = np.random.default_rng(0)
    net = S.Network.layered([3, 4, 2], rng)
    x, y = rng.uniform(size=(2, 3)), np.eye(2)
    ep.estimate(net, x, y, S.Cost("y"), ep.Holomorphic(4, 0.1), ep.Relaxation(max_steps=3, on_failure="record"))


def plot_ep_train(archive_path: str):
    """EP training study: test accuracy, gradient cosine with the exact gradient and, when a run has
    feedback weights of its own, the angle between W and B^T, against the epoch, one line per point of
    the sweep (every axis but the seed; the first seed)."""
    ds, axes = F.open_sweep(archive_path)
    panels = [("test_accuracy", 100, "test accuracy (%)", "classification"),
              ("grad_cosine", 1, "cos(rule's gradient, exact gradient)", "gradient alignment (probe batch)")]
    if np.isfinite(ds["weight_angle"].values).any():  # tied feedback has no angle: NaN
        panels.append(("weight_angle", 1, r"angle between $W$ and $B^\top$ (degrees)", "feedback asymmetry"))
    fig, grid = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), layout="constrained")
    swept = [a for a in axes if a != "seed"]
    for i, point in enumerate(itertools.product(*(ds[a].values for a in swept))):
        sel = dict(zip(swept, point))
        one = ds.sel(sel).isel(seed=0) if "seed" in ds.dims else ds.sel(sel)
        label = ", ".join(F.label(ds, a, v) if len(swept) == 1 else f"{a}={F.fmt(v.item())}" for a, v in sel.items())
        style = dict(marker="o", ms=3, color=f"C{i % 10}", ls="-" if i < 10 else "--")
        for ax, (name, scale, _, _) in zip(grid, panels):
            ax.plot(one["epoch"], scale * one[name], label=label, **style)
    for ax, (_, _, ylabel, title) in zip(grid, panels):
        ax.set_xlabel("epoch")
        F.integer_ticks(ax.xaxis)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    F.figure_legend(fig, grid[:1], columns=2)
    fig.suptitle(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} (first seed)")
    return fig


def plot_ep_train_or_devices(archive_path: str):
    """``plot_presets`` for a sweep over device presets, ``plot_devices`` for one over effect levels,
    else ``plot_ep_train``."""
    ds, axes = F.open_sweep(archive_path)

    def swept(name):
        return name in ds.coords and any(ds[name].dims == (a,) for a in axes)

    plot = plot_presets if swept("preset") else plot_devices if swept("level") else plot_ep_train
    return plot(archive_path)


EP_BIAS = Task(EP_BIAS_SCHEMA, run_ep_bias, warmup_ep_train, plot_ep_bias,
               "bias of every EP estimator against the exact gradient, as |beta| varies")
EP_TRAIN = Task(EP_TRAIN_SCHEMA, run_ep_train, warmup_ep_train, plot_ep_train_or_devices,
                "a classifier trained with an EP estimator (or the exact gradient), metrics per epoch")
