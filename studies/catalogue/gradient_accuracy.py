"""The ``gradient_accuracy`` study: the relative error of the gradient methods of
``substrate.gradient`` (discrete adjoint with the given integrator and dt, continuous adjoint with a
backward ETD2RK, implicit differentiation at the equilibrium) against the exact gradient of RK4 steps
at dt / refinement."""

from __future__ import annotations

import time

import matplotlib.pyplot as plt
import numpy as np

import substrate as S
from studies import figures as F
from studies.catalogue.shared import N_DIGITS, digits, network_schema
from studies.config import Field, Range
from studies.runs import Result, Task, discard

FIXED_STEP = tuple(m for m in S.METHODS if m != "dopri5")
GRADIENT_METHODS = ("discrete", "continuous", "implicit")

SCHEMA = {
    "network": network_schema([64, 16, 10]),
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


def run_gradient_accuracy(config: dict, seed: int, save_partial=discard) -> Result:
    """One run of the gradient_accuracy study (see the module docstring)."""
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
    """Compile the kernels the study uses, on a tiny network."""
    rng = np.random.default_rng(0)
    net = S.Network.layered([3, 4, 2], rng)
    x = rng.uniform(size=(2, 3))

    def loss(u):
        return 0.5 * float(np.sum(u ** 2)), u.copy()

    S.gradient(net, x, loss, method="discrete", t_span=(0, 0.5), integrator="rk4", dt=0.25)
    S.gradient(net, x, loss, method=S.ContinuousAdjoint(backward="etd2rk"), t_span=(0, 0.5),
               integrator="exp_euler", dt=0.25)
    S.gradient(net, x, loss, method="implicit", tol=1e-6)


def plot_gradient_accuracy(archive_path: str):
    """Gradient accuracy study: relative error of each gradient method against the reference, against
    the step dt (log-log, median over seeds), one colour per integrator, one marker per method; one
    panel per value of a further axis (e.g. t_end)."""
    ds, axes = F.open_sweep(archive_path)
    x = "dt" if "dt" in axes else F.other_axis(ds, axes, ())
    color_axis = "integrator" if "integrator" in axes else F.other_axis(ds, axes, (x,))
    col_axis = F.other_axis(ds, axes, (x, color_axis))
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
                err = F.median(ds["relative_error"].sel(pick).sel(gradient_method=m), [x])
                marker, ls = markers.get(str(m), ("x", "-"))
                ax.loglog(ds[x].values, np.atleast_1d(err.values), marker=marker, ls=ls, color=f"C{i}",
                          label=f"{cv} / {m}" if color_axis else str(m))
        if "implicit" in methods:
            err = F.median(ds["relative_error"].sel(sel).sel(gradient_method="implicit"), [x])
            ax.loglog(ds[x].values, np.atleast_1d(err.values), marker="^", ls=":", color="k", label="implicit")
        ax.set_xlabel("forward step dt (units of tau)" if x == "dt" else x.replace("_", " "))
        ax.set_ylabel(r"relative error of $dL/d\theta$ (median over seeds)")
        ax.set_title(F.panel_title(col_axis, col))
        ax.grid(True, which="both", alpha=0.3)
    F.figure_legend(fig, columns=5)
    fig.suptitle(f"{ds.attrs['study_name']}: gradient methods against the reference "
                 f"(markers: o discrete, s continuous, ^ implicit)")
    return F.readable_ticks(fig)


TASK = Task(SCHEMA, run_gradient_accuracy, warmup_gradient_accuracy, plot_gradient_accuracy,
            "relative error of the gradient methods against RK4 at dt / refinement")
