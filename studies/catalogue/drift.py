"""The drift family: a trained network programmed onto a chip that drifts (docs/equations.md,
section 6.2).

* ``drift``: an ``ep_train`` classifier trained with or without noise during training (the ``device``
  section: e.g. PCM programming noise redrawn at every write, hardware-aware training), then its
  nominal weights programmed onto a device preset with drift (``pcm_inference``) and its test accuracy
  read after each drift time, with and without global drift compensation. The trained model is kept in
  the run file (``save_weights``), and the evaluation is the one ``substrate evaluate RUN.h5`` runs
  on it: :func:`accuracy_after_drift`.

The chip is drawn from its own stream (the run's seed and :data:`CHIP_STREAM`, apart from training's),
the same for both settings of the compensation: the two curves of a run differ only by it.
"""

from __future__ import annotations

import dataclasses
import json
import re

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker

from models.train import Classifier
from studies import figures as F
from studies.catalogue.ep import (EP_TRAIN_SCHEMA, task_data, task_relaxation, train_classifier, training_result,
                                  warmup_ep_train)
from studies.config import Check, Field, ListOf
from studies.runs import Result, Task, discard
from substrate.devices import PRESETS, Drift, DeviceNetwork, attach
from substrate.errors import SubstrateValueError

# seconds per unit of a drift time ("1mo", "2.5h"): a month is 30 days, a year 365 days
TIME_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0, "mo": 30 * 86400.0,
              "y": 365 * 86400.0}
_TIME = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?)\s*(s|min|h|d|w|mo|y)\s*$")
MAX_SECONDS = 100 * TIME_UNITS["y"]
TIMES_ALLOWED = (f"a number >= 0 and a unit, one of {', '.join(TIME_UNITS)} (a month is 30 days, a year 365), "
                 "at most 100 years, e.g. 1s, 1h, 1d, 1mo, 1y")
CHIP_STREAM = 7  # the chip's draws: np.random.default_rng([seed, CHIP_STREAM, chip_seed])
COMPENSATION = ("on", "off")


def seconds(text: str) -> float:
    """The seconds of a drift time such as ``"1h"`` (see :data:`TIME_UNITS`); a SubstrateValueError
    names the text and what is allowed."""
    m = _TIME.match(text) if isinstance(text, str) else None
    value = float(m.group(1)) * TIME_UNITS[m.group(2)] if m else float("nan")
    if not 0.0 <= value <= MAX_SECONDS:
        raise SubstrateValueError(f"drift time {text!r}: allowed: {TIMES_ALLOWED}")
    return value


def _valid_time(text) -> bool:
    try:
        seconds(text)
    except SubstrateValueError:
        return False
    return True


def _ascending(texts) -> bool:
    s = [seconds(t) for t in texts]
    return all(a < b for a, b in zip(s, s[1:]))


def drift_presets() -> tuple:
    """The device presets with drift (what can be programmed and left to drift)."""
    return tuple(name for name, dev in PRESETS.items() if dev.of(Drift))


def drift_device(name: str, compensation: bool):
    """The device preset ``name`` (one of :func:`drift_presets`) with its drift's global compensation
    switched on or off."""
    if name not in drift_presets():
        raise SubstrateValueError(f"device {name!r}: allowed: the presets with drift, {', '.join(drift_presets())}")
    dev = PRESETS[name]
    return dev.with_effects(dataclasses.replace(dev.of(Drift)[0], compensation=bool(compensation)))


def accuracy_after_drift(model: Classifier, x, labels, relaxation, device, times, rng: np.random.Generator):
    """Test accuracy of ``model``'s nominal network (the network it was trained to, without a training
    device) programmed onto ``device`` with ``rng``, read after each of ``times`` (seconds since
    programming, ascending: one chip, left to drift). Returns an array, one accuracy per time."""
    times = [float(t) for t in times]
    if any(b < a for a, b in zip(times, times[1:])):
        raise SubstrateValueError(f"times={times}: the drift times must be ascending (one chip drifts on)")
    nominal = model.network.nominal if isinstance(model.network, DeviceNetwork) else model.network
    chip = Classifier(attach(nominal, device, rng), model.cost)
    out = []
    for t in times:
        chip.network.advance(t - chip.network.clock)
        out.append(chip.evaluate(x, labels, relaxation)[1])
    return np.asarray(out)


def evaluate_saved(model: Classifier, config: dict, seed: int, device: str, times, compensation=COMPENSATION,
                   chip_seed: int = 0) -> np.ndarray:
    """:func:`accuracy_after_drift` of a model an ``ep_train`` or ``drift`` run (``config``, ``seed``)
    trained, on the test set of its config, with its relaxation, one row per setting of
    ``compensation`` ("on"/"off"), one column per time (seconds); each row's chip drawn alike."""
    data, relaxation = task_data(config), task_relaxation(config)
    return np.array([accuracy_after_drift(model, data.x_test, data.y_test, relaxation,
                                          drift_device(device, c == "on"), times,
                                          np.random.default_rng([seed, CHIP_STREAM, chip_seed]))
                     for c in compensation])


DRIFT_SCHEMA = dict(EP_TRAIN_SCHEMA)
DRIFT_SCHEMA["drift"] = {
    "device": Field(str, drift_presets(), "pcm_inference", "the device preset the trained network is programmed on"),
    "times": Field(ListOf(str, 1, 16, Check(_valid_time, TIMES_ALLOWED)),
                   Check(_ascending, "in ascending order (one chip drifts on)"), ["1s", "1h", "1d", "1mo", "1y"],
                   "drift times after programming"),
}


def run_drift(config: dict, seed: int, save_partial=discard) -> Result:
    """Train (``ep_train``), then the accuracy of the trained network on the drifting chip."""
    model, _, history = train_classifier(config, seed, save_partial)
    times = [seconds(t) for t in config["drift"]["times"]]
    acc = evaluate_saved(model, config, seed, config["drift"]["device"], times)
    result = training_result(history)
    result.arrays["drift_accuracy"] = (("compensation", "drift_time"), acc)
    result.coords.update(compensation=list(COMPENSATION), drift_time=times)
    result.objects["model"] = model
    return result


def time_label(s: float) -> str:
    """A drift time in its largest whole unit: 1 s, 1 h, 1 d, 1 mo, 1 y."""
    for unit, size in sorted(TIME_UNITS.items(), key=lambda kv: -kv[1]):
        n = s / size
        if n >= 1 and abs(n - round(n)) < 1e-9 * n:
            return f"{round(n)} {unit}"
    return f"{s:g} s"


def _training_label(ds, dim, value) -> str:
    """How a point of the training axis trained: without noise, or with the device effect at its level."""
    if dim is None:
        return "trained"
    if "effect" in ds.coords and "level" in ds.coords and ds["effect"].dims == (dim,):
        point = ds.sel({dim: value})
        effect, level = str(point["effect"].item()), float(point["level"].item())
        return ("trained without noise" if effect == "none"
                else f"trained with {effect.replace('_', ' ')} (x{level:g})")
    return F.label(ds, dim, value)


def plot_drift(archive_path: str):
    """Drift study: test accuracy against the drift time since programming (log axis), one line per
    training and compensation setting (median over seeds, the band from the lowest to the highest
    seed), the accuracy before programming (the trained network, ideal hardware) as dotted lines;
    beside it the training curves."""
    ds, axes = F.open_sweep(archive_path)
    train_dim = F.other_axis(ds, axes, ())
    settings = list(ds[train_dim].values) if train_dim else [None]
    fig, (ax, curve) = plt.subplots(1, 2, figsize=(12, 5), width_ratios=(3, 2), layout="constrained")
    t = ds["drift_time"].values
    for i, setting in enumerate(settings):
        one = ds.sel({train_dim: setting}) if train_dim else ds
        name = _training_label(ds, train_dim, setting)
        for comp, style in zip(COMPENSATION, ("-", "--")):
            acc = 100 * one["drift_accuracy"].sel(compensation=comp)
            seeds = [d for d in acc.dims if d != "drift_time"]
            ax.plot(t, F.median(acc, ["drift_time"]).values, "o" + style, ms=4, color=f"C{i}",
                    label=f"{name}, compensation {comp}")
            if seeds:
                ax.fill_between(t, acc.min(dim=seeds).values, acc.max(dim=seeds).values, color=f"C{i}", alpha=0.15,
                                lw=0)
        final = 100 * one["test_accuracy"].isel(epoch=-1)
        ideal = float(F.median(final, []).values)
        ax.axhline(ideal, color=f"C{i}", ls=":", lw=1.2, label=f"{name}, before programming")
        med = F.median(100 * one["test_accuracy"], ["epoch"])
        curve.plot(one["epoch"], med, "o-", ms=3, color=f"C{i}")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator(t))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, pos: time_label(v)))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("drift time since programming (s: second, h: hour, d: day, mo: month, y: year)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"programmed on {json.loads(ds.attrs['base'])['drift']['device']}, left to drift")
    ax.grid(alpha=0.3)
    curve.set_xlabel("epoch")
    F.integer_ticks(curve.xaxis)
    curve.set_ylabel("test accuracy (%), ideal hardware")
    curve.set_title("training (median over seeds)")
    curve.grid(alpha=0.3)
    F.figure_legend(fig, [ax], columns=3)
    fig.suptitle(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} (median over seeds, range)",
                 fontsize=10)
    return fig


TASK = Task(DRIFT_SCHEMA, run_drift, warmup_ep_train, plot_drift,
            "a classifier trained with or without noise, programmed on a drifting device: accuracy against time")
