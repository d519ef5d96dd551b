"""Compile the engine's kernels ahead of a first run (``substrate warmup``).

Numba compiles a kernel the first time it meets a combination of argument types (dtype, device effect
tuple, ...) and caches the machine code on disk (next to the sources, or under ``NUMBA_CACHE_DIR``).
Each path below runs a tiny workload that meets the same types as the real run does (a specialisation
depends on the types only, never on the sizes), so that the run afterwards loads every kernel from the
cache instead of compiling it. Paths share kernels: warming one makes the next cheaper.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

import substrate as S
from models import ep
from models.pvrnn import PVRNN, ErrorRegression, PVLayer, error_regression
from substrate import devices as D

_SIZES = [4, 6, 3]


def _network(activation="logistic", dtype="float64"):
    return S.Network.layered(_SIZES, np.random.default_rng(0), activation=activation, dtype=dtype)


def _inputs(batch=2):
    return np.random.default_rng(1).uniform(-1.0, 1.0, (batch, _SIZES[0]))


def _dynamics(dtype, activation="logistic"):
    """integrate (every stepper shares one kernel) and relax (with its stability check)."""
    net, x = _network(activation, "float64" if dtype == "complex128" else dtype), _inputs()
    S.integrate(net, x, t_span=(0.0, 1.0), method="rk4", dt=0.25, dtype=dtype)
    S.relax(net, x, dtype=dtype, tol=1e-3 if dtype == "float32" else 1e-6)


def _quadratic_loss(u):
    return 0.5 * float(np.sum(u * u)), u


def _gradients(dtype):
    """The discrete and continuous adjoints and the implicit gradient."""
    net, x = _network(dtype=dtype), _inputs()
    for method in ("discrete", "continuous"):
        if dtype == "float32" and method == "continuous":
            continue
        S.gradient(net, x, _quadratic_loss, method=method, t_span=(0.0, 1.0), integrator="exp_euler", dt=0.25)
    S.gradient(net, x, _quadratic_loss, method="implicit", integrator="exp_euler")


def _quickstart():
    """What ``substrate quickstart`` compiles: centred and holomorphic EP and the exact gradient."""
    from studies import quickstart as qs

    with tempfile.TemporaryDirectory() as out:
        qs.run(out, config={"epochs": 1, "n_train": 16, "probe": 8}, progress=False)


def _ep():
    """EP's nudged phases (real and complex), squared error and cross-entropy costs."""
    net, x = _network("dsilu"), _inputs(4)
    y = np.eye(_SIZES[-1])[[0, 1, 2, 0]]
    for cost in (S.Cost("y"), S.Cost("y", "cross_entropy", np.eye(_SIZES[-1]), np.zeros(_SIZES[-1]))):
        for estimator in (ep.Centred(), ep.Holomorphic(points=2)):
            ep.estimate(net, x, y, cost, estimator, ep.Relaxation(tol=1e-4))


def _devices():
    """The stepping kernel on a device with per-step read noise and state noise (the noisy rows of
    benchmarks/bench_devices.py); each other combination of effects compiles its own kernel."""
    net, x = _network(), _inputs()
    hw = D.attach(net, D.Device((D.ReadNoise(0.05, policy="step"), D.StateNoise(0.01))), np.random.default_rng(2))
    S.integrate(hw, x, t_span=(0.0, 1.0), method="euler", dt=0.25)


def _pvrnn():
    """PV-RNN error regression's compiled window."""
    rng = np.random.default_rng(0)
    net = PVRNN([PVLayer(6, 2, tau=2.0, w=1e-3), PVLayer(4, 1, tau=4.0, w=1e-3)], outputs=2, rng=rng)
    x = np.sin(np.linspace(0.0, 3.0, 6))[:, None] * np.ones((1, 2))
    error_regression(net, x, ErrorRegression(window=3, iterations=2, lr=0.1, sample=False, draws=1), rng)


# name -> (what it covers, function); the order is that of `substrate warmup`.
PATHS = {
    "quickstart": ("substrate quickstart: float64 and complex128 relaxations, implicit gradient", _quickstart),
    "float64": ("integrate and relax, float64", lambda: _dynamics("float64")),
    "float32": ("integrate and relax, float32", lambda: _dynamics("float32")),
    "complex128": ("integrate and relax, complex128 (holomorphic activations)", lambda: _dynamics("complex128", "dsilu")),
    "gradient": ("discrete, continuous and implicit gradients, float64", lambda: _gradients("float64")),
    "gradient-float32": ("discrete and implicit gradients, float32", lambda: _gradients("float32")),
    "ep": ("EP estimators, both costs, real and complex", _ep),
    "devices": ("a device with per-step read noise and state noise", _devices),
    "pvrnn": ("PV-RNN error regression", _pvrnn),
}


def run(name: str) -> float:
    """Run the warm-up path ``name`` (a key of ``PATHS``); returns its seconds."""
    start = time.perf_counter()
    PATHS[name][1]()
    return time.perf_counter() - start
