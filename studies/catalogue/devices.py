"""The device family: the ``device`` section of the ``ep_train`` study (one effect of
``substrate.devices`` at a level, or a device preset), the device it builds, and the figures of a
sweep over effect levels or over presets."""

from __future__ import annotations

import dataclasses
import textwrap

import matplotlib.pyplot as plt
import numpy as np

from studies import figures as F
from studies.config import Field, Range
from substrate import devices as D

# The effects a study sweeps, by their names in substrate.devices.EFFECTS, and feedback_copy: programming
# noise with the feedback programmed as its own noisy copy (independent_feedback).
COMPOSED = {"feedback_copy": ("programming_noise", "independent_feedback")}
DEVICE_EFFECTS = ("none", "read_noise", "programming_noise", "quantisation", "feedback_copy", "tau_mismatch")
DEVICE = {
    "preset": Field(str, ("none",) + tuple(D.PRESETS), "none",
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


def _level_field(cls):
    """The field a level sets: the effect's one non-ideality (``scalable``), else its only field."""
    names = cls.scalable or tuple(f.name for f in dataclasses.fields(cls))
    return names[0] if len(names) == 1 else None


def swept_effects(effect: str, level: float, read_policy: str) -> tuple:
    """The effects of ``effect`` (a name of ``DEVICE_EFFECTS`` but none) at ``level``: the level sets
    each effect's one parameter (rounded where it is a count, as Quantisation's levels); a read effect
    is redrawn per ``read_policy``; effects on conductances (``ProgramEffect``) come after a
    ``ConductanceMapping``."""
    classes = [D.EFFECTS[name] for name in COMPOSED.get(effect, (effect,))]
    effects = []
    for cls in classes:
        params = {}
        name = _level_field(cls)
        if name is not None:
            default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
            params[name] = int(round(level)) if isinstance(default, int) else level
        if issubclass(cls, D.ReadEffect):
            params["policy"] = read_policy
        effects.append(cls(**params))
    mapped = (D.ConductanceMapping(),) if any(issubclass(c, D.ProgramEffect) for c in classes) else ()
    return mapped + tuple(effects)


def make_device(config):
    """The substrate.devices.Device of a ``device`` config section (None for effect ``none``)."""
    effect, level = config["effect"], config["level"]
    effects = () if effect == "none" else swept_effects(effect, level, config["read_policy"])
    if config["relaxation_time"] > 0:
        effects += (D.RelaxationTime(config["relaxation_time"]),)
    if config["preset"] != "none":
        base = D.preset(config["preset"])
        return base.with_effects(*effects).with_weight_scale(config["weight_scale"])
    return D.Device(effects, name=f"{effect}:{level:g}", weight_scale=config["weight_scale"]) if effects else None


# the x axis of each swept effect, with its unit (docs of the effects in substrate.devices)
LEVEL_LABELS = {
    "read_noise": r"read-noise $\sigma$ (fraction of $|W|$)",
    "programming_noise": r"programming-noise scale ($\times$ aihwkit PCM $\sigma(g)$, $\mu$S)",
    "quantisation": "conductance levels (count)",
    "feedback_copy": r"feedback copy's programming-noise scale ($\times$ PCM $\sigma$)",
    "tau_mismatch": r"relative s.d. of $\tau$",
    "pulsed": r"pulse step $\Delta w_{min}$ (constant-step device, device units)",
}


def level_label(ds, effect: str, runs) -> str:
    """The x label of ``effect`` (:data:`LEVEL_LABELS`); for time-constant mismatch, with the phases'
    relaxation time when the sweep sets it (``device.relaxation_time`` of the ``runs`` of that effect; 0:
    relaxed to tolerance, where tau cannot move an equilibrium)."""
    label = LEVEL_LABELS.get(effect, "level")
    if effect != "tau_mismatch" or "relaxation_time" not in ds:
        return label
    times = sorted({float(ds["relaxation_time"].values[i]) for i in runs})
    if times == [0.0]:
        return label + " (phases relaxed to tolerance)"
    return label + " (relaxation time " + ", ".join(f"{t:g}" for t in times) + r" $\tau$)"


def plot_devices(archive_path: str):
    """Device study (``ep_train`` with a zipped ``device.*`` axis): the final test accuracy and the
    final cosine of each rule's gradient with the nominal implicit gradient, against the level of each
    effect (one column per effect, median over seeds); an effect swept under several read policies
    (read noise per equilibrium and per phase): solid for the first, dashed for the others; the run without a device, when the sweep has one, is the dotted line in every
    panel (the baseline)."""
    ds, axes = F.open_sweep(archive_path)
    dim = next(a for a in axes if a != "seed" and "level" in ds.coords and ds["level"].dims == (a,))
    rule_dim = F.other_axis(ds, axes, (dim,))
    kinds = ds[dim].values
    effects = [e for e in dict.fromkeys(kinds) if e != "none"]
    fig, grid = plt.subplots(2, len(effects), figsize=(3.8 * len(effects) + 1, 7.5), squeeze=False,
                             layout="constrained")
    rules = list(ds[rule_dim].values) if rule_dim else [None]
    none = [i for i, k in enumerate(kinds) if k == "none"]
    for r, rule in enumerate(rules):
        one = ds.sel({rule_dim: rule}) if rule_dim else ds
        acc = F.median(100 * one["test_accuracy"].isel(epoch=-1), [dim])
        cos = F.median(one["grad_cosine"].isel(epoch=-1), [dim])
        name = str(rule) if rule is not None else "rule"
        for c, effect in enumerate(effects):
            idx = [i for i, k in enumerate(kinds) if k == effect]
            policies = dict.fromkeys(str(ds["read_policy"].values[i]) for i in idx)
            for p, policy in enumerate(policies):
                pts = sorted((float(ds["level"].values[i]), i) for i in idx
                             if str(ds["read_policy"].values[i]) == policy)
                for row, da in enumerate((acc, cos)):
                    grid[row][c].plot([v for v, _ in pts], [float(da.values[i]) for _, i in pts],
                                      "o" + ("-" if p == 0 else "--"), ms=3, color=f"C{r}",
                                      label=name + (f", read noise per {policy}" if p else ""))
            for row, da in enumerate((acc, cos)):
                if none:
                    grid[row][c].axhline(float(da.values[none[0]]), color=f"C{r}", ls=":", lw=1.2,
                                         label=f"{name}, no device")
    for c, effect in enumerate(effects):
        for row, ylabel in enumerate(("final test accuracy (%)", "final cos(rule's gradient, nominal implicit)")):
            ax = grid[row][c]
            if effect == "quantisation":
                ax.set_xscale("log", base=2)
                ax.invert_xaxis()
            ax.set_xlabel(level_label(ds, effect, [i for i, k in enumerate(kinds) if k == effect]))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        grid[0][c].set_title(effect.replace("_", " "))
    F.figure_legend(fig, grid[0], columns=4)
    fig.suptitle(textwrap.fill(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} "
                               "(median over seeds)", 140), fontsize=10)
    return fig


def plot_presets(archive_path: str):
    """Device-preset study (``ep_train`` with a swept ``device.preset``): the final test accuracy and
    the final gradient cosine with the nominal implicit gradient per preset, one bar per rule (median
    over seeds, whiskers from the lowest to the highest seed)."""
    ds, axes = F.open_sweep(archive_path)
    dim = next(a for a in axes if ds["preset"].dims == (a,))
    rule_dim = F.other_axis(ds, axes, (dim,))
    rules = list(ds[rule_dim].values) if rule_dim else [None]
    presets = [str(p) for p in ds["preset"].values]
    fig, grid = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(presets) + 3), 7.5), layout="constrained")
    width = 0.8 / len(rules)
    x = np.arange(len(presets))
    for r, rule in enumerate(rules):
        one = ds.sel({rule_dim: rule}) if rule_dim else ds
        for ax, da in zip(grid, (100 * one["test_accuracy"].isel(epoch=-1), one["grad_cosine"].isel(epoch=-1))):
            seeds = [d for d in da.dims if d != dim]
            med = F.median(da, [dim]).values
            lo, hi = da.min(dim=seeds, skipna=True).values, da.max(dim=seeds, skipna=True).values
            ax.bar(x + (r - (len(rules) - 1) / 2) * width, med, width, yerr=[med - lo, hi - med],
                   color=f"C{r}", capsize=2, label=str(rule))
    for ax, name in zip(grid, ("final test accuracy (%)", "final cos(rule's gradient, nominal implicit)")):
        ax.set_xticks(x, presets, rotation=30, ha="right")
        ax.set_xlabel("device preset")
        ax.set_ylabel(name)
        ax.grid(axis="y", alpha=0.3)
    F.figure_legend(fig, grid[:1])
    fig.suptitle(textwrap.fill(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} "
                               "(median over seeds, range)", 110), fontsize=10)
    return fig
