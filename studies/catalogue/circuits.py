"""The ``circuit_train`` study: a deep resistive network (``models.circuit_learning.CircuitClassifier``:
features -> hidden nodes with antiparallel diodes to +-0.4 V -> one output node per class) trained on
digits or Fashion-MNIST by EP (a current nudge at the outputs) or coupled learning (a voltage clamp),
on conductances with device variability (docs/equations.md, sections 6 and 9): programming noise
(PCM's, redrawn at every write, through a conductance mapping), diode mismatch (each diode's I_s and n
drawn once), pulsed updates (an update preset of ``substrate.devices``), and drift after training
(the test accuracy read again after ``drift`` seconds)."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np

from models import data as D
from models.circuit_learning import CircuitClassifier, CircuitEP, CoupledLearning
from models.train import Adam, train
from studies import figures as F
from studies.config import Field, Range
from studies.runs import Result, Task, discard
from substrate import circuits
from substrate import devices as DV
from substrate.errors import SubstrateValueError

SCHEMA = {
    "data": Field(str, ("digits", "fashion_mnist"), "digits", "data set (models.data)"),
    "n_train": Field(int, Range(0, 60_000), 0, "training samples used (0: all)"),
    "n_test": Field(int, Range(0, 10_000), 0, "test samples used (0: all)"),
    "hidden": Field(int, Range(1, 4096), 32, "hidden nodes"),
    "epochs": Field(int, Range(0, 1000), 5, "training epochs"),
    "batch_size": Field(int, Range(1, 60_000), 32, "minibatch size"),
    "lr": Field(float, Range(0.0, 1.0, lo_open=True), 0.004, "Adam's learning rate (siemens)"),
    "probe": Field(int, Range(0, 10_000), 32, "training samples on which the rule is compared with the exact gradient"),
    "circuit": {
        "input_scale": Field(float, Range(0.0, 100.0, lo_open=True), 1.0, "volts per unit of a feature (inputs "
                             "drive at input_scale x and -input_scale x)"),
        "bias": Field(float, Range(0.0, 10.0), 0.4, "the hidden diodes' bias sources +-bias (volts)"),
        "diode_is": Field(float, Range(1e-18, 1.0), 1e-12, "the diodes' saturation current (amperes)"),
        "diodes": Field(bool, None, True, "hidden diodes (false: the same network, linear)"),
    },
    "rule": {
        "name": Field(str, ("circuit_ep", "coupled_learning"), "circuit_ep", "learning rule"),
        "beta": Field(float, Range(0.0, 1.0, lo_open=True), 0.01, "EP's nudge (centred)"),
        "eta": Field(float, Range(0.0, 1.0, lo_open=True), 0.1, "coupled learning's clamp fraction"),
    },
    "variability": {
        "programming_noise": Field(float, Range(0.0, 100.0), 0.0,
                                   "scale of PCM programming noise on every write (0: none)"),
        "mismatch": Field(float, Range(0.0, 1.0), 0.0, "relative spread of each diode's I_s and n"),
        "update": Field(str, ("none",) + tuple(DV.UPDATE_PRESETS), "none", "pulsed update model (preset)"),
        "weight_scale": Field(float, Range(0.0, 1.0, lo_open=True), 0.05, "siemens per device unit (pulses)"),
        "drift": Field(float, Range(0.0, 1e9), 0.0, "seconds of PCM drift after training (0: none)"),
    },
}


def make_device(v: dict):
    """The device of a ``variability`` section, or None for ideal conductances."""
    pulsed = v["update"] != "none"
    if pulsed and (v["programming_noise"] or v["drift"]):
        raise SubstrateValueError("variability: pulsed updates (update) cannot be combined with programming_noise "
                                  "or drift (those act on programmed conductances, a pulsed device holds its own)")
    if pulsed:
        return DV.Device((DV.UPDATE_PRESETS[v["update"]][0],), weight_scale=v["weight_scale"])
    effects = []
    if v["programming_noise"]:
        effects.append(DV.ProgrammingNoise(scale=v["programming_noise"]))
    if v["drift"]:
        effects.append(DV.Drift())
    return DV.Device((DV.ConductanceMapping(), *effects)) if effects else None


def _rule(config):
    r = config["rule"]
    return CircuitEP("centred", r["beta"]) if r["name"] == "circuit_ep" else CoupledLearning(r["eta"])


def run_circuit_train(config: dict, seed: int, save_partial=discard) -> Result:
    """Train the config's circuit: metrics per epoch, the final accuracy, and after drift."""
    data = D.load(config["data"])
    if config["n_train"] or config["n_test"]:
        data = data.subset(config["n_train"] or None, config["n_test"] or None)
    v = config["variability"]
    rng = np.random.default_rng(seed)
    k = config["circuit"]
    model = CircuitClassifier.layered(data.n_features, config["hidden"], data.classes, rng, device=make_device(v),
                                      seed=seed, spread=v["mismatch"], input_scale=k["input_scale"], bias=k["bias"],
                                      diode_is=k["diode_is"], diodes=k["diodes"])

    def result(history, drifted=float("nan"), conducting=float("nan")):
        a = history.arrays()
        return Result(arrays={k: (("epoch",), a[k]) for k in ("train_loss", "train_accuracy", "test_loss",
                                                              "test_accuracy", "grad_cosine", "nonconverged")},
                      scalars={"final_test_accuracy": float(a["test_accuracy"][-1]),
                               "drift_test_accuracy": drifted, "diodes_conducting": conducting},
                      coords={"epoch": [int(e) for e in a["epoch"]]})

    def on_epoch(history):
        save_partial(result(history))
        save_partial.progress(history.epoch[-1], config["epochs"])

    history = train(model, data, rule=_rule(config), optimiser=Adam(config["lr"]), epochs=config["epochs"],
                    batch_size=config["batch_size"], rng=rng, probe=config["probe"], progress=False,
                    on_epoch=on_epoch)
    # the trained network's nonlinearity: the share of (test sample, diode) pairs where a diode conducts
    conducting = model.conducting(model.free(data.x_test[:200]))
    drifted = float("nan")
    if v["drift"]:
        model.network.advance(v["drift"])
        drifted = model.evaluate(data.x_test, data.y_test)[1]
    return result(history, drifted, conducting)


def warmup_circuit_train():
    """Compiles the circuit kernels on a tiny circuit."""
    rng = np.random.default_rng(0)
    c = circuits.random_circuit(rng, 6, 2, 1, edges=6, diodes=2, fets=1)
    circuits.dc(c, rng.uniform(size=(2, 2)), linear="cg", on_failure="return")
    circuits.dc(c, rng.uniform(size=(2, 2)), on_failure="return")


def plot_circuit_train(archive_path: str):
    """Final test accuracy against the first swept variability axis, one line per rule (and per value of
    any other axis), median over seeds with the seeds' range; the test accuracy per epoch; the
    gradient's cosine with the exact one per epoch."""
    ds, axes = F.open_sweep(archive_path)
    var = [a for a in axes if a not in ("seed", "rule.name", "name")]
    x = var[0] if var else None
    others = [a for a in axes if a not in ("seed", x)]
    fig, grid = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    for i, point in enumerate(itertools.product(*(ds[a].values for a in others))):
        sel = dict(zip(others, point))
        sub = ds.sel(sel)
        label = ", ".join(F.label(ds, a, val) for a, val in sel.items()) or "runs"
        acc = 100 * sub["final_test_accuracy"]
        seeds = [d for d in acc.dims if d == "seed"]
        if x:
            xs = ds[x].values
            grid[0].plot(xs, acc.median(seeds).values if seeds else acc.values, "o-", color=f"C{i}", label=label)
            if seeds:
                grid[0].fill_between(xs, acc.min("seed").values, acc.max("seed").values, color=f"C{i}", alpha=0.2)
            if np.isfinite(sub["drift_test_accuracy"].values).any():
                d = 100 * sub["drift_test_accuracy"]
                grid[0].plot(xs, d.median(seeds).values if seeds else d.values, "s--", color=f"C{i}",
                             label=f"{label}, after drift")
        one = sub.isel({d: 0 for d in sub["test_accuracy"].dims if d != "epoch"})
        grid[1].plot(one["epoch"], 100 * one["test_accuracy"], "o-", ms=3, color=f"C{i}", label=label)
        grid[2].plot(one["epoch"], one["grad_cosine"], "o-", ms=3, color=f"C{i}", label=label)
    grid[0].set_xlabel(x.replace("variability.", "").replace("_", " ") if x else "")
    grid[0].set_ylabel("final test accuracy (%)")
    grid[0].set_title("accuracy against device variability (median, seed range)")
    grid[1].set_xlabel("epoch")
    grid[1].set_ylabel("test accuracy (%)")
    grid[1].set_title(f"training (first seed{', lowest ' + x if x else ''})")
    grid[2].set_xlabel("epoch")
    grid[2].set_ylabel("cos(rule's gradient, exact gradient)")
    grid[2].set_title("gradient alignment (probe batch)")
    for ax in grid:
        ax.grid(alpha=0.3)
    grid[0].legend(fontsize=8)
    fig.suptitle(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')}")
    return fig


TASK = Task(SCHEMA, run_circuit_train, warmup_circuit_train, plot_circuit_train,
            "a resistive network trained by EP or coupled learning on conductances with device variability")
