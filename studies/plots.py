"""Figure functions: each reads an archive and returns a matplotlib Figure; they compute nothing."""

from __future__ import annotations

import json
import textwrap

import matplotlib

matplotlib.use("Agg")  # figures are written to files; no display is needed  # noqa: E402
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from substrate import archive  # noqa: E402
from substrate.errors import ArchiveError  # noqa: E402
from studies.dpm_customise import plot_dpm_customise  # noqa: E402
from studies.dpm_tasks import plot_dpm_gradients  # noqa: E402


def ep_training(path: str):
    """Quickstart figure: test accuracy, training loss, and the misalignment 1 - cos of each rule's
    gradient with the exact one (probe batch), against the epoch, one line per learning rule."""
    a = archive.read(path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for i, (name, r) in enumerate(archive.members(a["rules"]).items()):
        label = f"{r['attrs'].get('rule', name)} ({float(r['seconds_total']):.0f} s)"
        epoch = r["epoch"]
        axes[0].plot(epoch, 100 * r["test_accuracy"], "o-", ms=3, color=f"C{i}", label=label)
        axes[1].semilogy(epoch[1:], r["train_loss"][1:], "o-", ms=3, color=f"C{i}")
        miss = np.maximum(1 - r["grad_cosine"], 1e-16)
        axes[2].semilogy(epoch, miss, "o-", ms=3, color=f"C{i}")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(bottom=max(0, axes[0].get_ylim()[0]))
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title("learning curves (digits, held-out set)")
    axes[1].set_ylabel("training loss (running, per epoch)")
    axes[1].set_title("training loss")
    axes[2].set_ylabel(r"$1 - \cos(g, g_{\mathrm{exact}})$ on the probe batch")
    axes[2].set_title("gradient alignment with implicit differentiation")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return fig


# ------------------------------------------------------------------------------------ sweep archives
def _sweep(path: str):
    from studies.sweep import open_dataset

    ds = open_dataset(path)
    axes = list(json.loads(ds.attrs["axes"]))
    return ds, axes


def _other_axis(ds, axes, exclude):
    """The first sweep axis not in ``exclude`` and not the seed, or None."""
    return next((a for a in axes if a not in exclude and a != "seed"), None)


def _label(ds, dim, value):
    """A legend label for one point of ``dim``, with the coordinates that vary along it."""
    point = ds.sel({dim: value}) if dim in ds.indexes else ds.isel({dim: value})
    extra = [f"{c}={_fmt(point[c].item())}" for c in ds.coords
             if c != dim and ds[c].dims == (dim,) and c != "method"]
    name = str(value)
    return f"{name} ({', '.join(extra)})" if extra else name


def _fmt(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def _median(da, keep):
    """Median over every dimension but ``keep``, ignoring NaN (failed and missing runs)."""
    import warnings

    drop = [d for d in da.dims if d not in keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        return da.median(dim=drop, skipna=True) if drop else da


def plot_relaxation(archive_path: str):
    """Relaxation study: cost (field evaluations to reach the tolerance, median over seeds), the
    fraction of failed runs against the swept parameter (the asymmetry angle) for each integrator, and
    the residual trace of one sample point. One row per value of a further axis (e.g. init_scale)."""
    ds, axes = _sweep(archive_path)
    integ = ds["method"].dims[0] if "method" in ds.coords else _other_axis(ds, axes, ())
    x = "asymmetry_angle" if "asymmetry_angle" in axes else _other_axis(ds, axes, (integ,))
    row_axis = _other_axis(ds, axes, (integ, x))
    rows = list(ds[row_axis].values[:4]) if row_axis else [None]
    fig, grid = plt.subplots(len(rows), 3, figsize=(15, 3.8 * len(rows)), squeeze=False, constrained_layout=True)
    failed = (ds["status"] == "failed").astype(float).where(ds["status"] != "missing")
    tol = json.loads(ds.attrs["base"]).get("tol")
    for r, row in enumerate(rows):
        sel = {row_axis: row} if row_axis else {}
        ax_cost, ax_fail, ax_trace = grid[r]
        for i, value in enumerate(ds[integ].values if integ else [None]):
            pick = dict(sel, **({integ: value} if integ else {}))
            sub = ds.sel(pick)
            label = _label(ds, integ, value) if integ else "runs"
            xs = sub[x].values if x else [0]
            ax_cost.plot(xs, np.atleast_1d(_median(sub["nfev"], [x] if x else []).values), "o-", color=f"C{i}",
                         label=label)
            ax_fail.plot(xs, np.atleast_1d(failed.sel(pick).mean(dim=[d for d in failed.sel(pick).dims
                                                                       if d != x]).values),
                         "o-", color=f"C{i}")
            point = sub.isel({d: 0 for d in sub["residual_trace"].dims if d not in ("step",) and d != x})
            if x:
                point = point.isel({x: len(xs) // 2})
            ax_trace.semilogy(point["trace_t"].values, point["residual_trace"].values, color=f"C{i}",
                              label=label)
        where = f" ({row_axis} = {_fmt(row)})" if row_axis else ""
        ax_cost.set_yscale("log")
        ax_cost.set_ylabel("field evaluations to tolerance (median)")
        ax_cost.set_title("cost of relaxation" + where)
        ax_fail.set_ylabel("fraction of runs failed")
        ax_fail.set_ylim(-0.05, 1.05)
        ax_fail.set_title("failures (no convergence, divergence)" + where)
        for a in (ax_cost, ax_fail):
            a.set_xlabel(x.replace("_", " ") + (" (degrees)" if x == "asymmetry_angle" else "") if x else "")
        if tol:
            ax_trace.axhline(tol, color="k", lw=0.8, ls=":")
        ax_trace.set_xlabel("simulated time (units of tau)")
        ax_trace.set_ylabel(r"residual $\max_i |F_i(u)|$")
        mid = f"{x} = {_fmt(ds[x].values[len(ds[x]) // 2].item())}, " if x else ""
        ax_trace.set_title(f"residual trace ({mid}first seed)", fontsize=10)
        ax_cost.legend(fontsize=8)
    fig.suptitle(f"{ds.attrs['study_name']}: {int(ds.attrs['n_done'])} runs done, "
                 f"{int(ds.attrs['n_failed'])} failed, {int(ds.attrs['n_missing'])} missing")
    return fig


def plot_gradient_accuracy(archive_path: str):
    """Gradient accuracy study: relative error of each gradient method against the reference, against
    the step dt (log-log, median over seeds), one colour per integrator, one marker per method; one
    panel per value of a further axis (e.g. t_end)."""
    ds, axes = _sweep(archive_path)
    x = "dt" if "dt" in axes else _other_axis(ds, axes, ())
    color_axis = "integrator" if "integrator" in axes else _other_axis(ds, axes, (x,))
    col_axis = _other_axis(ds, axes, (x, color_axis))
    cols = list(ds[col_axis].values[:4]) if col_axis else [None]
    fig, grid = plt.subplots(1, len(cols), figsize=(6.5 * len(cols) + 2.5, 5), squeeze=False, layout="constrained")
    markers = {"discrete": ("o", "-"), "continuous": ("s", "--"), "implicit": ("^", ":")}
    methods = list(ds["gradient_method"].values) if "gradient_method" in ds.dims else []
    for c, col in enumerate(cols):
        ax = grid[0][c]
        sel = {col_axis: col} if col_axis else {}
        for i, cv in enumerate(ds[color_axis].values if color_axis else [None]):
            pick = dict(sel, **({color_axis: cv} if color_axis else {}))
            for m in methods:
                if m == "implicit":  # at the equilibrium: no integrator, no step
                    continue
                err = _median(ds["relative_error"].sel(pick).sel(gradient_method=m), [x])
                marker, ls = markers.get(str(m), ("x", "-"))
                ax.loglog(ds[x].values, np.atleast_1d(err.values), marker=marker, ls=ls, color=f"C{i}",
                          label=f"{cv} / {m}" if color_axis else str(m))
        if "implicit" in methods:
            err = _median(ds["relative_error"].sel(sel).sel(gradient_method="implicit"), [x])
            ax.loglog(ds[x].values, np.atleast_1d(err.values), marker="^", ls=":", color="k", label="implicit")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(x)
        ax.set_ylabel("relative error of dL/dtheta (median over seeds)")
        ax.set_title(f"{col_axis} = {_fmt(col.item() if hasattr(col, 'item') else col)}" if col_axis else "")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside right upper")
    fig.suptitle(f"{ds.attrs['study_name']}: gradient methods against the reference "
                 f"(markers: o discrete, s continuous, ^ implicit)")
    return fig


def plot_ep_bias(archive_path: str):
    """EP bias study: relative error of each estimator against the exact gradient as |beta| varies
    (log-log, median over seeds), one panel per asymmetry angle; the dotted line is the error of the
    beta -> 0 limit, the asymmetry part of the bias that no beta or N removes."""
    ds, axes = _sweep(archive_path)
    col_axis = _other_axis(ds, axes, ())
    cols = list(ds[col_axis].values) if col_axis else [None]
    fig, grid = plt.subplots(1, len(cols), figsize=(5.5 * len(cols) + 2.5, 4.8), squeeze=False, layout="constrained")
    betas = ds["beta"].values
    for c, col in enumerate(cols):
        ax = grid[0][c]
        sel = {col_axis: col} if col_axis else {}
        for i, est in enumerate(ds["estimator"].values):
            err = _median(ds["relative_error"].sel(sel).sel(estimator=est), ["beta"])
            ax.loglog(betas, np.atleast_1d(err.values), "o-", ms=3, color=f"C{i}", label=str(est))
        floor = float(_median(ds["limit_error"].sel(sel), []).values)
        if floor > 0:
            ax.axhline(floor, color="k", ls=":", lw=1, label="beta -> 0 limit (asymmetry)")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("|beta|")
        ax.set_ylabel("relative error against the exact gradient")
        ax.set_title(f"{col_axis} = {_fmt(col.item() if hasattr(col, 'item') else col)}" if col_axis else "")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside right upper")
    fig.suptitle(f"{ds.attrs['study_name']}: EP estimators against implicit differentiation (median over seeds)")
    return fig


def plot_ep_train(archive_path: str):
    """EP training study: test accuracy, gradient cosine with the exact gradient and the weight angle
    against the epoch, one line per point of the sweep (every axis but the seed; the first seed)."""
    import itertools

    ds, axes = _sweep(archive_path)
    fig, grid = plt.subplots(1, 3, figsize=(17, 4.5), layout="constrained")
    swept = [a for a in axes if a != "seed"]
    for i, point in enumerate(itertools.product(*(ds[a].values for a in swept))):
        sel = dict(zip(swept, point))
        one = ds.sel(sel).isel(seed=0) if "seed" in ds.dims else ds.sel(sel)
        label = ", ".join(_label(ds, a, v) if len(swept) == 1 else f"{a}={_fmt(v.item())}" for a, v in sel.items())
        style = dict(marker="o", ms=3, color=f"C{i % 10}", ls="-" if i < 10 else "--")
        grid[0].plot(one["epoch"], 100 * one["test_accuracy"], label=label, **style)
        grid[1].plot(one["epoch"], one["grad_cosine"], **style)
        grid[2].plot(one["epoch"], one["weight_angle"], **style)
    for ax, name in zip(grid, ("test accuracy (%)", "cos(rule's gradient, exact) on the probe batch",
                               "angle between W and B^T (degrees)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    handles, labels = grid[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside right upper")
    fig.suptitle(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')}")
    return fig


def plot_devices(archive_path: str):
    """Device study (``ep_train`` with a zipped ``device.*`` axis): the final test accuracy and the
    final cosine of each rule's gradient with the nominal implicit gradient, against the level of each
    effect (one column per effect, median over seeds); read noise drawn per equilibrium (solid) and per
    phase (dashed); the effect-free run is the point at level 0 (quantisation: the dotted line)."""
    ds, axes = _sweep(archive_path)
    dim = next(a for a in axes if a != "seed" and "level" in ds.coords and ds["level"].dims == (a,))
    rule_dim = _other_axis(ds, axes, (dim,))
    kinds = ds[dim].values
    effects = [e for e in dict.fromkeys(kinds) if e != "none"]
    fig, grid = plt.subplots(2, len(effects), figsize=(3.6 * len(effects) + 2.5, 7), squeeze=False,
                             layout="constrained")
    rules = list(ds[rule_dim].values) if rule_dim else [None]
    none = [i for i, k in enumerate(kinds) if k == "none"]
    for r, rule in enumerate(rules):
        one = ds.sel({rule_dim: rule}) if rule_dim else ds
        acc = _median(100 * one["test_accuracy"].isel(epoch=-1), [dim])
        cos = _median(one["grad_cosine"].isel(epoch=-1), [dim])
        for c, effect in enumerate(effects):
            idx = [i for i, k in enumerate(kinds) if k == effect]
            policies = dict.fromkeys(str(ds["read_policy"].values[i]) for i in idx)
            for p, policy in enumerate(policies):
                pts = sorted((float(ds["level"].values[i]), i) for i in idx
                             if str(ds["read_policy"].values[i]) == policy)
                # the effect-free run is the level-0 point, when the effect has none of its own
                # (tau mismatch comes with its own, at the same relaxation time)
                if effect != "quantisation" and none and all(v > 0 for v, _ in pts):
                    pts = [(0.0, none[0])] + pts
                x = [v for v, _ in pts]
                for row, da in enumerate((acc, cos)):
                    ax = grid[row][c]
                    ax.plot(x, [float(da.values[i]) for _, i in pts], "o" + ("-" if p == 0 else "--"), ms=3,
                            color=f"C{r}", label=f"{rule}" + (f" ({policy})" if len(policies) > 1 else ""))
                    if effect == "quantisation" and none:
                        ax.axhline(float(da.values[none[0]]), color=f"C{r}", ls=":", lw=1)
            for row in range(2):
                ax = grid[row][c]
                if effect == "quantisation":
                    ax.set_xscale("log", base=2)
                    ax.invert_xaxis()
                ax.set_xlabel({"read_noise": "read noise sigma (relative)", "programming_noise":
                               "programming noise (x aihwkit PCM)", "quantisation": "conductance levels",
                               "feedback_copy": "programming noise of a separate feedback copy",
                               "tau_mismatch": "tau spread (relaxation time 8 tau)"}.get(effect, "level"))
                ax.grid(alpha=0.3)
            grid[0][c].set_title(effect)
    grid[0][0].set_ylabel("final test accuracy (%)")
    grid[1][0].set_ylabel("final cos(rule's gradient, nominal implicit)")
    handles = {}
    for ax in grid[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), fontsize=8, loc="outside right upper")
    fig.suptitle(textwrap.fill(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} "
                               "(median over seeds)", 140), fontsize=10)
    return fig


def plot_presets(archive_path: str):
    """Device-preset study (``ep_train`` with a swept ``device.preset``): the final test accuracy and
    the final gradient cosine with the nominal implicit gradient per preset, one bar per rule (median
    over seeds, whiskers from the lowest to the highest seed)."""
    ds, axes = _sweep(archive_path)
    dim = next(a for a in axes if ds["preset"].dims == (a,))
    rule_dim = _other_axis(ds, axes, (dim,))
    rules = list(ds[rule_dim].values) if rule_dim else [None]
    presets = [str(p) for p in ds["preset"].values]
    fig, grid = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(presets) + 3), 7.5), layout="constrained")
    width = 0.8 / len(rules)
    x = np.arange(len(presets))
    for r, rule in enumerate(rules):
        one = ds.sel({rule_dim: rule}) if rule_dim else ds
        for ax, da in zip(grid, (100 * one["test_accuracy"].isel(epoch=-1), one["grad_cosine"].isel(epoch=-1))):
            seeds = [d for d in da.dims if d != dim]
            med = _median(da, [dim]).values
            lo, hi = da.min(dim=seeds, skipna=True).values, da.max(dim=seeds, skipna=True).values
            ax.bar(x + (r - (len(rules) - 1) / 2) * width, med, width, yerr=[med - lo, hi - med],
                   color=f"C{r}", capsize=2, label=str(rule))
    for ax, name in zip(grid, ("final test accuracy (%)", "final cos(rule's gradient, nominal implicit)")):
        ax.set_xticks(x, presets, rotation=30, ha="right")
        ax.set_ylabel(name)
        ax.grid(axis="y", alpha=0.3)
    grid[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} "
                               "(median over seeds, range)", 110), fontsize=10)
    return fig


def plot_ep_train_or_devices(archive_path: str):
    """``plot_presets`` for a sweep over device presets, ``plot_devices`` for one over effect levels,
    else ``plot_ep_train``."""
    ds, axes = _sweep(archive_path)

    def swept(name):
        return name in ds.coords and any(ds[name].dims == (a,) for a in axes)

    plot = plot_presets if swept("preset") else plot_devices if swept("level") else plot_ep_train
    return plot(archive_path)


def _vs_x(ax, da, x, color, label, marker="o", ls="-"):
    """The median over every dimension but ``x`` as a line, and every value (the seeds) as points."""
    xs = da[x].values
    ax.plot(xs, np.atleast_1d(_median(da, [x]).values), marker=marker, ls=ls, color=color, label=label)
    points = da.transpose(x, ...).values.reshape(len(xs), -1)
    ax.plot(np.repeat(xs, points.shape[1]), points.ravel(), ls="none", marker=marker, ms=3, alpha=0.35,
            color=color)


def plot_pvrnn_meta_prior(archive_path: str):
    """PV-RNN meta-prior study, against w (log axes; the median over seeds as lines, the seeds as
    points): the one-step prediction error of error regression on the held-out sequences and on
    training sequences, and the open-loop generation's error on the held-out ones; the learned sigma
    per layer, posterior sigma^q = exp(A^sig) and prior sigma^p along the posterior-mean pass (training
    sequences, t > 0), and the posterior sigma that error regression infers on the held-out sequences;
    the training reconstruction error of the posterior means and the spread of prior-sampled
    generations; and the reconstruction term of the free energy during training for every w (first
    seed)."""
    ds, axes = _sweep(archive_path)
    x = "w" if "w" in axes else _other_axis(ds, axes, ())
    ds = ds.sel({x: ds[x].values[ds[x].values > 0]})  # a log axis
    fig, grid = plt.subplots(1, 4, figsize=(20, 4.6), layout="constrained")
    ax_er, ax_sigma, ax_rec, ax_curve = grid
    _vs_x(ax_er, ds["test_prediction_error"], x, "C0", "error regression, held-out sequences")
    _vs_x(ax_er, ds["train_prediction_error"], x, "C1", "error regression, training sequences", marker="s")
    _vs_x(ax_er, ds["open_loop_error"], x, "0.5", "open loop (prior means, no inference)", marker="^", ls=":")
    ax_er.set_ylabel(r"one-step prediction error $\|\hat x_{t+1} - x_{t+1}\|^2$")
    ax_er.set_title("generalisation (after the window is full)")
    for i, layer in enumerate(ds["layer"].values):
        one = ds.sel(layer=layer)
        _vs_x(ax_sigma, one["sigma_q"], x, f"C{i}", rf"layer {layer}: posterior $\sigma^q$ (training)")
        _vs_x(ax_sigma, one["sigma_p"], x, f"C{i}", rf"layer {layer}: prior $\sigma^p$ (training)", marker="s",
              ls="--")
        _vs_x(ax_sigma, one["test_sigma_q"], x, f"C{i}", rf"layer {layer}: posterior $\sigma^q$ (ER, held-out)",
              marker="^", ls=":")
    ax_sigma.set_ylabel(r"mean $\sigma$ of the latents")
    ax_sigma.set_title("learned sigma")
    _vs_x(ax_rec, ds["train_reconstruction_error"], x, "C0", r"reconstruction error $\|\hat x_t - x_t\|^2$ "
          "(posterior means)")
    _vs_x(ax_rec, ds["generation_spread"], x, "C3", r"variance of $\hat x$ across prior samples (40 steps)",
          marker="^", ls=":")
    ax_rec.set_ylabel("training sequences")
    ax_rec.set_title("training fit, and the randomness the model generates")
    first = ds.isel(seed=0) if "seed" in ds.dims else ds
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(ds[x])))
    for c, value in zip(colors, ds[x].values):
        rec = _median(first["reconstruction"].sel({x: value}), ["epoch"])
        ax_curve.semilogy(first["epoch"].values, rec.values, color=c, lw=1, label=f"{x} = {_fmt(value.item())}")
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("reconstruction term of F (training set)")
    ax_curve.set_title("training (first seed)")
    ax_curve.legend(fontsize=7)
    for ax in grid[:3]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"meta-prior {x}")
        ax.legend(fontsize=7)
    for ax in grid:
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(textwrap.fill(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} "
                               "(median over seeds, seeds as points)", 160), fontsize=10)
    return fig


def plot_pvrnn_er(archive_path: str):
    """PV-RNN error regression under variants (median over seeds as lines or bars, seeds as points;
    one colour per value of the other sweep axis, e.g. substeps): the one-step prediction error of
    each credit assignment and the cosine of its window gradient with the exact one; the error
    against the read-noise sigma and the time-constant spread (at 0: no device, exact credit); and
    the seconds per ER step of each credit in the NumPy path against the compiled exact step."""
    ds, axes = _sweep(archive_path)
    other = _other_axis(ds, axes, ())
    groups = list(ds[other].values) if other else [None]
    fig, grid = plt.subplots(1, 5, figsize=(24, 4.6), layout="constrained")
    ax_err, ax_cos, ax_read, ax_tau, ax_time = grid
    credits = [str(c) for c in ds["credit"].values]
    width = 0.8 / len(groups)
    for g, value in enumerate(groups):
        one = ds.sel({other: value}) if other else ds
        color, label = f"C{g}", _label(ds, other, value) if other else ""
        label = f"{other} {label}" if other else "median"
        pos = np.arange(len(credits)) + (g - (len(groups) - 1) / 2) * width
        for ax, name in ((ax_err, "credit_error"), (ax_cos, "credit_gradient_cosine"),
                         (ax_time, "credit_step_seconds")):
            ax.bar(pos, _median(one[name], ["credit"]).values, width, color=color, alpha=0.6, label=label)
            pts = one[name].transpose("credit", ...).values.reshape(len(credits), -1)
            ax.plot(np.repeat(pos, pts.shape[1]), pts.ravel(), "k.", ms=3)
        ax_time.axhline(float(_median(one["compiled_step_seconds"], []).values), color=color, ls="--",
                        label=f"compiled exact step ({label})")
        ax_err.axhline(float(_median(one["open_loop_error"], []).values), color=color, ls=":",
                       label=f"open loop, no inference ({label})")
        exact = one["credit_error"].sel(credit="exact")
        for ax, axis in ((ax_read, "read_noise"), (ax_tau, "tau_mismatch")):
            da = one[f"{axis}_error"]
            xs = np.concatenate([[0.0], da[axis].values])
            med = np.concatenate([[float(_median(exact, []).values)], _median(da, [axis]).values])
            ax.plot(xs, med, "o-", color=color, label=label)
            pts = np.concatenate([exact.values.reshape(1, -1), da.transpose(axis, ...).values.reshape(len(xs) - 1, -1)])
            ax.plot(np.repeat(xs, pts.shape[1]), pts.ravel(), ".", color=color, ms=3, alpha=0.5)
    for ax in (ax_err, ax_cos, ax_time):
        ax.set_xticks(np.arange(len(credits)), credits, rotation=20)
    ax_err.set_yscale("log")
    ax_err.set_ylabel(r"one-step prediction error $\|\hat x_{t+1} - x_{t+1}\|^2$")
    ax_err.set_title("credit assignment inside ER (held-out)")
    ax_cos.set_ylabel("cosine with the exact window gradient (median over windows)")
    ax_cos.set_title("how close each credit is to BPTT")
    ax_time.set_yscale("log")
    ax_time.set_ylabel("seconds per ER step")
    ax_time.set_title("cost (NumPy path; dashed: compiled)")
    for ax, title, xlabel in ((ax_read, "read noise, redrawn every pass", r"read-noise $\sigma$ (relative)"),
                              (ax_tau, "time-constant mismatch", r"spread of $\tau$")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("one-step prediction error")
        ax.set_title(title)
    for ax in grid:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} "
                               "(median over seeds, seeds as points)", 160), fontsize=10)
    return fig


PLOTS = {"relaxation": plot_relaxation, "gradient_accuracy": plot_gradient_accuracy, "ep_bias": plot_ep_bias,
         "ep_train": plot_ep_train_or_devices, "pvrnn_meta_prior": plot_pvrnn_meta_prior,
         "pvrnn_er": plot_pvrnn_er, "dpm_customise": plot_dpm_customise,
         "dpm_gradients": plot_dpm_gradients}


def draw(path: str):
    """The figure of a sweep archive, chosen by its task, and the name to save it under (the checked
    ``study_name``: a plain file name). Raises :class:`~substrate.errors.ArchiveError` naming the file
    when the archive cannot be read or lacks what the figure needs."""
    from studies.sweep import read_header

    with archive.open_file(path) as f:
        head = read_header(f, path)
    if not head["n_done"]:
        raise ArchiveError(path, "has no finished run to draw")
    task = head["task"]
    if task not in PLOTS:
        raise ArchiveError(path, f"has no figure for task {task!r}; figures exist for {', '.join(PLOTS)}")
    try:
        return PLOTS[task](path), head["study_name"]
    except ArchiveError:
        raise
    except (KeyError, IndexError, ValueError, TypeError) as e:
        # open_dataset checked the layout; what remains is a result or coordinate the figure needs that
        # the archive does not hold (or holds with another shape or type)
        plt.close("all")
        raise ArchiveError(path, f"lacks what the figure for task {task!r} needs ({type(e).__name__}: {e})") \
            from None
