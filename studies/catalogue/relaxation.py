"""The ``relaxation`` study: a layered network (``substrate.Network.from_config``) relaxed to its
equilibrium on a batch of scikit-learn's 8x8 digits (pixels / 16) by one integrator: the residual
trace and the cost."""

from __future__ import annotations

import json
import time

import matplotlib.pyplot as plt
import numpy as np

import substrate as S
from studies import figures as F
from studies.catalogue.shared import N_DIGITS, digits, network_schema
from studies.config import Field, Range
from studies.runs import Result, RunFailed, Task, discard

SCHEMA = {
    "network": network_schema([64, 32, 10]),
    "method": Field(str, tuple(S.METHODS), "exp_euler", "integrator"),
    "dt": Field(float, Range(0.0, 100.0, lo_open=True), 0.5, "step (fixed-step methods); first step (dopri5)"),
    "tol": Field(float, Range(0.0, 1.0, lo_open=True), 1e-8, "residual tolerance max_i |F_i(u)|"),
    "max_steps": Field(int, Range(1, 1_000_000), 10_000, "steps before the relaxation is declared failed"),
    "batch": Field(int, Range(1, N_DIGITS), 256, "digits relaxed at once"),
    "blowup": Field(float, Range(0.0, None, lo_open=True), 1e10, "a state beyond this has diverged"),
}


def run_relaxation(config: dict, seed: int, save_partial=discard) -> Result:
    """One run of the relaxation study (see the module docstring)."""
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


def plot_relaxation(archive_path: str):
    """Relaxation study: cost (field evaluations to reach the tolerance, median over seeds), the
    fraction of failed runs against the swept parameter (the asymmetry angle) for each integrator, and
    the residual trace of one sample point. One row per value of a further axis (e.g. init_scale)."""
    ds, axes = F.open_sweep(archive_path)
    integ = ds["method"].dims[0] if "method" in ds.coords else F.other_axis(ds, axes, ())
    x = "asymmetry_angle" if "asymmetry_angle" in axes else F.other_axis(ds, axes, (integ,))
    row_axis = F.other_axis(ds, axes, (integ, x))
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
            label = F.label(ds, integ, value) if integ else "runs"
            xs = sub[x].values if x else [0]
            ax_cost.plot(xs, np.atleast_1d(F.median(sub["nfev"], [x] if x else []).values), "o-", color=f"C{i}",
                         label=label)
            ax_fail.plot(xs, np.atleast_1d(failed.sel(pick).mean(dim=[d for d in failed.sel(pick).dims
                                                                       if d != x]).values),
                         "o-", color=f"C{i}")
            point = sub.isel({d: 0 for d in sub["residual_trace"].dims if d not in ("step",) and d != x})
            if x:
                point = point.isel({x: len(xs) // 2})
            ax_trace.semilogy(point["trace_t"].values, point["residual_trace"].values, color=f"C{i}",
                              label=label)
        where = f" ({F.panel_title(row_axis, row)})" if row_axis else ""
        ax_cost.set_yscale("log")
        ax_cost.set_ylabel("field evaluations to tolerance (median)")
        ax_cost.set_title("cost of relaxation" + where)
        ax_fail.set_ylabel("fraction of runs failed")
        ax_fail.set_ylim(-0.05, 1.05)
        ax_fail.set_title("failures (no convergence, divergence)" + where)
        for a in (ax_cost, ax_fail):
            a.set_xlabel(x.replace("_", " ") + (" (degrees)" if x == "asymmetry_angle" else "") if x else "")
        if tol:
            ax_trace.axhline(tol, color="k", lw=0.8, ls=":", label="tolerance")
        ax_trace.set_xlabel("simulated time (units of tau)")
        ax_trace.set_ylabel(r"residual $\max_i |F_i(u)|$")
        mid = f"{F.panel_title(x, ds[x].values[len(ds[x]) // 2])}, " if x else ""
        ax_trace.set_title(f"residual trace ({mid}first seed)", fontsize=10)
        ax_cost.legend(fontsize=8)
        ax_trace.legend(fontsize=8)
    fig.suptitle(f"{ds.attrs['study_name']}: {int(ds.attrs['n_done'])} runs done, "
                 f"{int(ds.attrs['n_failed'])} failed, {int(ds.attrs['n_missing'])} missing")
    return F.readable_ticks(fig)


TASK = Task(SCHEMA, run_relaxation, warmup_relaxation, plot_relaxation,
            "a network relaxed to equilibrium on digits by one integrator")
