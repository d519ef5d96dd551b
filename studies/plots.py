"""Figure functions: each reads an archive and returns a matplotlib Figure; they compute nothing."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")  # figures are written to files; no display is needed  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from substrate import archive  # noqa: E402


def relaxation(path: str, sample: int = 0):
    """Quickstart figure: residual max_i |F_i(u)| (worst sample) against simulated time and against
    field evaluations for every integrator, and the transient of the output units of one sample."""
    a = archive.read(path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for i, (method, r) in enumerate(archive.members(a["relax"]).items()):
        trace = r["residual_trace"]
        label = f"{method} ({int(r['nfev'])} evals, {float(r['seconds']) * 1e3:.0f} ms)"
        # evaluations spread evenly over the steps (exact for fixed-step methods)
        evals = 1 + np.arange(len(trace)) * (int(r["nfev"]) - 1) / max(len(trace) - 1, 1)
        axes[0].semilogy(r["trace_t"], trace, label=label, color=f"C{i}")
        axes[1].semilogy(evals, trace, color=f"C{i}")
    tol = json.loads(a["attrs"]["config"])["tol"]
    for ax in axes[:2]:
        ax.axhline(tol, color="k", lw=0.8, ls=":")
        ax.set_ylabel(r"residual $\max_i |F_i(u)|$ (worst sample)")
    axes[0].set_xlabel("simulated time (units of tau)")
    axes[1].set_xlabel("vector-field evaluations (spread evenly over steps)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("relaxation to equilibrium")
    axes[1].set_title("cost of relaxation")
    tr = a["transient"]
    y = tr["y"][:, sample, :]
    for j in range(y.shape[1]):
        axes[2].plot(tr["t"], y[:, j], lw=1.2)
    ystar = a["relax"]["dopri5"]["u"][sample, -y.shape[1]:]
    axes[2].plot(np.full_like(ystar, tr["t"][-1]), ystar, "k_", ms=12, label="relaxed u* (dopri5)")
    label = int(a["inputs"]["label"][sample])
    axes[2].set_title(f"output units, digit sample {sample} (label {label})")
    axes[2].set_xlabel("simulated time (units of tau)")
    axes[2].set_ylabel("membrane potential u")
    axes[2].legend(fontsize=8, loc="lower right")
    return fig
