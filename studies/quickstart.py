"""Quickstart study: a layered network on scikit-learn's 8x8 digits, relaxed with every integrator.

For each integrator the network is relaxed to its equilibrium (residual tolerance ``tol``), and the
same circuit is integrated over a time span to show the transient. Results go to one HDF5 archive
(written atomically, with provenance) and a figure (PNG) drawn from that archive.
"""

from __future__ import annotations

import os
import time

import numpy as np
from sklearn.datasets import load_digits
from tqdm import tqdm

import substrate as S
from substrate import archive

DEFAULT_CONFIG = {
    "network": {"sizes": [64, 32, 10], "activation": "logistic", "tau": 1.0, "feedback": "independent",
                "asymmetry_angle": 45.0},
    "batch": 256,
    "tol": 1e-8,
    "dt": {"euler": 0.5, "exp_euler": 1.0, "etd2rk": 1.0, "etdrk4": 1.0, "rk4": 1.0, "dopri5": None},
    "transient": {"t1": 15.0, "points": 151, "method": "dopri5", "rtol": 1e-8},
}


def digits(batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` digits drawn without replacement, pixels scaled to [0, 1]."""
    data = load_digits()
    idx = rng.choice(len(data.target), size=batch, replace=False)
    return data.data[idx] / 16.0, data.target[idx]


def run(out_dir: str, seed: int = 0, config: dict | None = None, progress: bool = True) -> dict:
    """Run the quickstart; returns the paths of the archive and the figure."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    rng = np.random.default_rng(seed)
    net = S.Network.from_config(cfg["network"], seed=seed)
    x, labels = digits(cfg["batch"], rng)
    data = {"inputs": {"x": x, "label": labels}, "relax": {}}
    timings = {}
    for method in tqdm(list(S.METHODS), desc="relax", disable=not progress, unit="method"):
        # one sample first, so the timing below excludes loading the compiled kernels
        S.relax(net, x[:1], method=method, dt=cfg["dt"].get(method), tol=cfg["tol"], on_failure="return")
        start = time.perf_counter()
        sol = S.relax(net, x, method=method, dt=cfg["dt"].get(method), tol=cfg["tol"], on_failure="return")
        timings[f"relax_{method}"] = time.perf_counter() - start
        data["relax"][method] = {
            "u": sol.u, "residual": sol.residual, "residual_trace": sol.residual_trace, "trace_t": sol.trace_t,
            "t_final": sol.t_final, "steps": sol.steps, "nfev": sol.nfev, "status": sol.status,
            "seconds": timings[f"relax_{method}"],
        }
    tr = cfg["transient"]
    t_eval = np.linspace(0.0, tr["t1"], tr["points"])
    start = time.perf_counter()
    sol = S.integrate(net, x, t_span=(0.0, tr["t1"]), t_eval=t_eval, method=tr["method"], rtol=tr["rtol"],
                      atol=tr["rtol"] * 1e-2)
    timings["transient"] = time.perf_counter() - start
    data["transient"] = {"t": t_eval, "y": sol.state("y"), "method": tr["method"]}
    os.makedirs(out_dir, exist_ok=True)
    h5 = archive.write_run(os.path.join(out_dir, "quickstart.h5"), data,
                           archive.provenance(cfg, seed, timings))
    from studies import plots

    fig = plots.relaxation(h5)
    png = os.path.join(out_dir, "quickstart.png")
    fig.savefig(png, dpi=120)
    return {"archive": h5, "figure": png}
