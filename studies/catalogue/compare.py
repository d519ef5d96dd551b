"""The comparison: every learning rule that trains a ``models.train.Classifier`` on the same circuit,
from the same initial weights, under the same device imperfections, and what each costs on the
hardware (``substrate.cost``).

* ``compare``: an ``ep_train`` classifier (the schema of :mod:`studies.catalogue.ep`) trained with one
  rule of :data:`RULES` (EP in its forms, or an exact-gradient method of ``models.adjoint_rules``) on
  one device setting; per epoch the test accuracy and the cosine of the rule's gradient with the
  exact one (``test_accuracy``, ``grad_cosine``), and from the counts of the whole training priced by
  the ``hardware`` preset: ``energy_per_sample`` (J) and ``latency_per_sample`` (s) per training
  sample, ``memory_bytes`` (the peak of digital memory).

Its figures (:func:`plot_compare`, :func:`plot_compare_costs`) and tables (:func:`markdown`, ``substrate
table ARCHIVE``: the winners per device, then every rule and device) read a compare archive.

The initial weights depend on the seed only (``train_classifier`` draws them first), and no rule
draws from the training generator, so the runs of a seed see the same weights and minibatches.
"""

from __future__ import annotations

import dataclasses
import textwrap

import matplotlib.pyplot as plt
import numpy as np

from models import adjoint_rules, ep
from models.train import RULES as ALL_RULES
from models.train import Classifier, make_rule
from studies import figures as F
from studies.catalogue.ep import EP_RULE, EP_TRAIN_SCHEMA, train_classifier, training_result, warmup_ep_train
from studies.config import Field, Range
from studies.runs import Result, Task, discard
from substrate import cost
from substrate.validate import nonnegative
from substrate.counts import total

# the rules compared: EP's estimators that train (not the exact one, which ``implicit`` is, nor the
# negative-sided one, one-sided EP mirrored) and the exact-gradient methods
RULES = ("one_sided", "centred", "holomorphic", "rotating_holomorphic") + tuple(adjoint_rules.ADJOINT_RULES)
OPTIONS = dict({k: v for k, v in EP_RULE.items() if k != "name"},
               window=Field(int, Range(1, 1_000_000), 10, "steps backpropagated (truncated_adjoint)"),
               solver=Field(str, ("krylov", "direct", "almeida_pineda"), "krylov",
                            "the adjoint solve of implicit (almeida_pineda: the adjoint circuit relaxed)"))
SCHEMA = dict({k: v for k, v in EP_TRAIN_SCHEMA.items() if k != "rule"},
              rule=Field(str, RULES, "centred", "the learning rule (models.train.RULES)"),
              options=OPTIONS,
              setting=Field(str, None, "ideal", "the device setting's name (the figures' panels)"),
              hardware=Field(str, tuple(cost.PRESETS), "isaac_reram",
                             "the hardware the counts are priced on (substrate.cost.PRESETS)"))
COSTS = ("energy_per_sample", "latency_per_sample", "memory_bytes")


def rule_of(config):
    """The config's ``rule``, given the values of ``options`` its class (``models.train.RULES``) takes."""
    name = config["rule"]
    fields = {f.name for f in dataclasses.fields(ALL_RULES[name])}
    return make_rule(name, **{k: v for k, v in config["options"].items() if k in fields})


def training_costs(history, hardware) -> dict:
    """``energy_per_sample`` (J) and ``latency_per_sample`` (s) per training sample, and ``memory_bytes``
    (the peak of digital memory), of every epoch's counts (``History.epoch_counts``: the rule's steps,
    the optimiser, the writes) priced on ``hardware``; NaN where an epoch was not counted or none ran."""
    epochs = history.epoch_counts()[1:]
    if not epochs or any(c is None for c in epochs):
        return dict.fromkeys(COSTS, float("nan"))
    report = cost.estimate(total(epochs), hardware, per_sample=True)
    return {"energy_per_sample": report.energy, "latency_per_sample": report.latency,
            "memory_bytes": report.memory_bytes}


def run_compare(config: dict, seed: int, save_partial=discard) -> Result:
    """Train the config's classifier with its rule: the metrics per epoch and what the training cost."""
    _, _, history = train_classifier(config, seed, save_partial, rule=rule_of(config))
    result = training_result(history)
    result.scalars.update(training_costs(history, config["hardware"]))
    return result


def warmup_compare():
    """EP's phases, and a step of each exact-gradient rule, on a tiny network."""
    warmup_ep_train()
    rng = np.random.default_rng(0)
    model = Classifier.layered([3, 4, 3, 2], rng)
    x, y = rng.uniform(size=(2, 3)), np.eye(2)
    rel = ep.Relaxation(max_steps=3, on_failure="record")
    for name in adjoint_rules.ADJOINT_RULES:
        make_rule(name, **({"window": 1} if name == "truncated_adjoint" else {})).step(model, x, y, rel)


def _front(energy, accuracy):
    """Indices of the Pareto front (no other point is cheaper and at least as accurate), by energy."""
    order = np.lexsort((-np.asarray(accuracy), energy))  # by energy, the more accurate first at equal energy
    front, best = [], -np.inf
    for i in order:
        if np.isfinite(energy[i]) and accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return front


MARKERS = "osD^v<>Ph*X"
# each cost's axis label and scale from the archive's SI units to the figures' and tables' units (the
# values then read as plain numbers, not with a x 1e-8 offset on a log axis spanning under a decade)
COST_LABELS = {"energy_per_sample": ("energy per training sample (nJ)", 1e9),
               "latency_per_sample": ("latency per training sample (µs)", 1e6),
               "memory_bytes": ("digital memory, peak (kB)", 1e-3)}


def _grid(ds, axes, variables, title):
    """Final test accuracy against each cost of ``variables`` (rows, log x), one panel per device
    setting (columns), one marker per rule (median over seeds), the Pareto front of each panel."""
    rule_dim, dev_dim = "rule", F.other_axis(ds, axes, ("rule",))
    devices = list(ds[dev_dim].values) if dev_dim else [None]
    rules = [str(r) for r in ds[rule_dim].values]
    fig, grid = plt.subplots(len(variables), len(devices), figsize=(3.6 * len(devices) + 1, 3.4 * len(variables) + 1),
                             squeeze=False, layout="constrained")
    acc = F.median(100 * ds["test_accuracy"].isel(epoch=-1), [rule_dim] + ([dev_dim] if dev_dim else []))
    for row, var in enumerate(variables):
        label, scale = COST_LABELS[var]
        cost_med = F.median(ds[var] * scale, [rule_dim] + ([dev_dim] if dev_dim else []))
        for c, dev in enumerate(devices):
            ax = grid[row][c]
            sel = {dev_dim: dev} if dev_dim else {}
            a = np.atleast_1d(acc.sel(sel).values).astype(float)
            e = np.atleast_1d(cost_med.sel(sel).values).astype(float)
            for i, rule in enumerate(rules):
                ax.plot(e[i], a[i], MARKERS[i % len(MARKERS)], color=f"C{i % 10}", ms=7, label=rule)
            front = _front(e, a)
            if front:
                ax.plot(e[front], a[front], "k--", lw=1, label="Pareto front", zorder=0)
            ax.set_xscale("log")
            ax.margins(0.12)  # markers at the ends of the view stay whole
            ax.set_xlabel(label)
            ax.set_ylabel("final test accuracy (%)")
            ax.set_title(f"device: {dev}" if dev is not None else "")
            ax.grid(True, which="both", alpha=0.3)
    F.figure_legend(fig, columns=5)
    fig.suptitle(textwrap.fill(f"{ds.attrs['study_name']}: {title} (median over seeds)", 120), fontsize=10)
    return F.readable_ticks(fig)


def plot_compare(archive_path: str):
    """Comparison study: final test accuracy against the energy per training sample (nJ, log), one panel
    per device setting, one marker per rule (median over seeds), the Pareto front dashed."""
    ds, axes = F.open_sweep(archive_path)
    return _grid(ds, axes, ["energy_per_sample"], "accuracy against energy per training sample")


def plot_compare_costs(archive_path: str):
    """Comparison study: final test accuracy against the latency per training sample (top row) and
    against the digital memory a rule holds (bottom row), as :func:`plot_compare`."""
    ds, axes = F.open_sweep(archive_path)
    return _grid(ds, axes, ["latency_per_sample", "memory_bytes"], "accuracy against latency and memory")


def table(archive_path: str) -> list:
    """Rows {device, rule, accuracy (%), cosine, energy_per_sample, latency_per_sample, memory_bytes} of
    every device setting and rule, medians over seeds of the final epoch (the figures' medians: NaN
    where no run of the pair finished)."""
    ds, axes = F.open_sweep(archive_path)
    dev_dim = F.other_axis(ds, axes, ("rule",))
    keep = ["rule"] + ([dev_dim] if dev_dim else [])
    med = {"accuracy": F.median(100 * ds["test_accuracy"].isel(epoch=-1), keep),
           "cosine": F.median(ds["grad_cosine"].isel(epoch=-1), keep),
           **{k: F.median(ds[k], keep) for k in COSTS}}
    rows = []
    for dev in (ds[dev_dim].values if dev_dim else [None]):
        for rule in ds["rule"].values:
            sel = {"rule": rule, **({dev_dim: dev} if dev_dim else {})}
            rows.append({"device": str(dev), "rule": str(rule), **{k: float(v.sel(sel)) for k, v in med.items()}})
    return rows


# "as accurate as the best": within this many percentage points of the most accurate rule's median
WITHIN = 1.0


def winners(rows: list, within: float = WITHIN) -> list:
    """The rows of :func:`table` that win on their device, by energy, each with ``wins``: ``most
    accurate`` (the highest median accuracy), ``cheapest within {within} pt`` (the least energy per
    sample among the rules within ``within`` percentage points of the most accurate) and ``Pareto
    front`` (no other rule of the device is cheaper and at least as accurate; :func:`_front`). Rules
    without a finished run or without counts (NaN accuracy or energy) win nothing."""
    within = nonnegative(within, "within")
    out = []
    for dev in dict.fromkeys(r["device"] for r in rows):
        mine = [r for r in rows if r["device"] == dev and np.isfinite(r["accuracy"])]
        if not mine:
            continue
        acc = np.array([r["accuracy"] for r in mine])
        energy = np.array([r["energy_per_sample"] for r in mine])
        wins = [[] for _ in mine]
        wins[int(np.argmax(acc))].append("most accurate")
        near = np.flatnonzero((acc >= acc.max() - within) & np.isfinite(energy))
        if near.size:
            wins[int(near[np.argmin(energy[near])])].append(f"cheapest within {within:g} pt")
        for i in _front(energy, acc):
            wins[i].append("Pareto front")
        picked = sorted((i for i in range(len(mine)) if wins[i]),
                        key=lambda i: (energy[i] if np.isfinite(energy[i]) else np.inf, -acc[i]))
        out += [dict(mine[i], wins=", ".join(wins[i])) for i in picked]
    return out


# (column header, row key, scale to the unit, format)
_COLUMNS = (("accuracy %", "accuracy", 1.0, ".1f"), ("cosine", "cosine", 1.0, ".3f"),
            *((unit, k, COST_LABELS[k][1], ".3g") for unit, k in (("energy nJ", "energy_per_sample"),
                                                                  ("latency µs", "latency_per_sample"),
                                                                  ("memory kB", "memory_bytes"))))


def _markdown(rows, first):
    """A markdown table of ``rows``: the columns ``first`` (row keys shown as they are), then
    :data:`_COLUMNS` (``n/a``: NaN, no finished run or nothing measured)."""
    head = list(first) + [c[0] for c in _COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[k]) for k in first]
        cells += [format(r[k] * scale, f) if np.isfinite(r[k]) else "n/a" for _, k, scale, f in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(archive_path: str, within: float = WITHIN) -> tuple[str, str]:
    """The comparison's two tables as markdown, from a compare archive (medians over seeds, final epoch):
    the winners per device (:func:`winners`: the most accurate rule, the cheapest in energy within
    ``within`` percentage points of it, the Pareto front in accuracy and energy), and every device and
    rule (:func:`table`); each with accuracy (%), the cosine with the exact gradient, energy (nJ) and
    latency (µs) per training sample and the peak digital memory (kB)."""
    rows = table(archive_path)
    note = (f"Winners per device (medians over seeds): the most accurate rule, the cheapest in energy among "
            f"the rules within {within:g} percentage point(s) of it, and the Pareto front in accuracy and "
            f"energy per training sample.\n\n")
    return (note + _markdown(winners(rows, within), ("device", "rule", "wins")),
            _markdown(rows, ("device", "rule")))


def markdown_text(archive_path: str) -> str:
    """:func:`markdown`'s two tables, the winners first, as one text (``substrate table``)."""
    short, full = markdown(archive_path)
    return f"{short}\n\nEvery rule and device (medians over seeds):\n\n{full}\n"


TASK = Task(SCHEMA, run_compare, warmup_compare, plot_compare,
            "every learning rule on the same circuit and devices: accuracy, energy, latency, memory",
            table=markdown_text)
