"""Compile the engine's kernels ahead of a first run (``substrate warmup``).

Numba compiles a kernel the first time it meets a combination of argument types (dtype, device effect
tuple, ...) and caches the machine code on disk (next to the sources, or under ``NUMBA_CACHE_DIR``).
Each path below runs a tiny workload that meets the same types as the real run does (a specialisation
depends on the types only, never on the sizes), so that the run afterwards loads every kernel from the
cache instead of compiling it. Paths share kernels: warming one makes the next cheaper. A complex
kernel has two specialisations, with and without the complex tanh and dsilu rows
(``_kernels.layer_activations``): the dsilu paths (``complex128``, ``gradient-complex128``, ``ep``) warm
the first, ``quickstart`` (logistic layers) the second.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
from numba.core import caching

import substrate as S
from models import ep
from models.pvrnn import PVRNN, ErrorRegression, PVLayer, error_regression, train
from studies import quickstart as qs
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
    """0.5 sum(u^2) and its gradient u (holomorphic: complex states give a complex value)."""
    value = 0.5 * np.sum(u * u)
    return complex(value) if np.iscomplexobj(u) else float(value), u


def _gradients(dtype):
    """The discrete and continuous adjoints and the implicit gradient (complex128: of a float64
    network with holomorphic activations, from a complex state, as holomorphic EP's phases run)."""
    complex_ = dtype == "complex128"
    net, x = _network("dsilu" if complex_ else "logistic", "float64" if complex_ else dtype), _inputs()
    u0 = np.full((2, net.n), 0.1 + 0.1j) if complex_ else None
    for method in ("discrete", "continuous"):
        if dtype == "float32" and method == "continuous":
            continue
        S.gradient(net, x, _quadratic_loss, method=method, t_span=(0.0, 1.0), integrator="exp_euler", dt=0.25,
                   dtype=dtype, u0=u0)
    S.gradient(net, x, _quadratic_loss, method="implicit", integrator="exp_euler", dtype=dtype, u0=u0)


def _quickstart():
    """What ``substrate quickstart`` compiles: centred and holomorphic EP and the exact gradient."""
    with tempfile.TemporaryDirectory() as out:
        qs.run(out, config={"epochs": 1, "n_train": 16, "probe": 8}, progress=False)


def _ep():
    """EP's nudged phases (real and complex), squared error and cross-entropy costs."""
    net, x = _network("dsilu"), _inputs(4)
    y = np.eye(_SIZES[-1])[[0, 1, 2, 0]]
    for cost in (S.Cost("y"), S.Cost("y", "cross_entropy", np.eye(_SIZES[-1]), np.zeros(_SIZES[-1]))):
        for estimator in (ep.Centred(), ep.Holomorphic(points=4)):
            ep.estimate(net, x, y, cost, estimator, ep.Relaxation(tol=1e-4))


def _devices():
    """The stepping kernel on devices (each combination of kernel effects compiles its own): per-step
    read noise with state noise, per-step and per-sample read noise alone (the noisy rows of
    benchmarks/bench_devices.py), and the pcm_inference preset (IO chain, read noise per equilibrium)."""
    net, x = _network(), _inputs()
    for effects in ((D.ReadNoise(0.05, policy="step"), D.StateNoise(0.01)), (D.ReadNoise(0.05, policy="step"),),
                    (D.ReadNoise(0.05, policy="sample"),)):
        hw = D.attach(net, D.Device(effects), np.random.default_rng(2))
        S.integrate(hw, x, t_span=(0.0, 1.0), method="euler", dt=0.25)
    S.relax(D.attach(net, D.preset("pcm_inference"), np.random.default_rng(2)), x, tol=1e-3)


def _pvrnn():
    """PV-RNN error regression's compiled window."""
    rng = np.random.default_rng(0)
    net = PVRNN([PVLayer(6, 2, tau=2.0, w=1e-3), PVLayer(4, 1, tau=4.0, w=1e-3)], outputs=2, rng=rng)
    x = np.sin(np.linspace(0.0, 3.0, 6))[:, None] * np.ones((1, 2))
    error_regression(net, x, ErrorRegression(window=3, iterations=2, lr=0.1, sample=False, draws=1), rng)


def _pvrnn_train():
    """PV-RNN's compiled training (``train(..., compiled=True)``: forward, exact adjoint and Adam over
    whole epochs): one kernel for every option of the model, so one small model covers the studies'."""
    rng = np.random.default_rng(0)
    net = PVRNN([PVLayer(6, 2, tau=2.0, w=1e-3), PVLayer(4, 1, tau=4.0, w=1e-3)], outputs=2, rng=rng)
    train(net, np.zeros((2, 5, 2)), epochs=1, rng=rng, progress=False, compiled=True)


# name -> (what it covers, function). The order spreads kernels over the workers of a parallel warm-up
# (float64 and complex128 first, each with its own kernels, then PV-RNN training, the longest alone (~60 s)
# and sharing none; the paths that reuse them last).
PATHS = {
    "float64": ("integrate and relax, float64", lambda: _dynamics("float64")),
    "complex128": ("integrate and relax, complex128 (holomorphic activations)", lambda: _dynamics("complex128", "dsilu")),
    "pvrnn-train": ("PV-RNN compiled training", _pvrnn_train),
    "float32": ("integrate and relax, float32", lambda: _dynamics("float32")),
    "gradient": ("discrete, continuous and implicit gradients, float64", lambda: _gradients("float64")),
    "pvrnn": ("PV-RNN error regression", _pvrnn),
    "gradient-float32": ("discrete and implicit gradients, float32", lambda: _gradients("float32")),
    "gradient-complex128": ("discrete, continuous and implicit gradients, complex128 states",
                            lambda: _gradients("complex128")),
    "devices": ("devices: per-step and per-sample read noise, state noise, pcm_inference", _devices),
    "quickstart": ("substrate quickstart: float64 and complex128 relaxations, implicit gradient", _quickstart),
    "ep": ("EP estimators, both costs, real and complex", _ep),
}


def run(name: str) -> float:
    """Run the warm-up path ``name`` (a key of ``PATHS``); returns its seconds."""
    start = time.perf_counter()
    PATHS[name][1]()
    return time.perf_counter() - start


def run_all(names, jobs: int = 1):
    """Run the paths ``names``, in ``jobs`` processes at once; yields (name, seconds) as each ends."""
    if jobs <= 1 or len(names) <= 1:
        for name in names:
            yield name, run(name)
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing compiled or imported twice
    with ProcessPoolExecutor(min(jobs, len(names)), mp_context=ctx, initializer=locked_cache_writes) as pool:
        futures = {pool.submit(run, name): name for name in names}
        for future in as_completed(futures):
            yield futures[future], future.result()


def locked_cache_writes():
    """Serialise Numba's cache writes between processes. Numba keeps one index per function (read it,
    add the new signature's data file, write it back) with no lock: two processes saving different
    signatures of one kernel at the same moment can lose an entry, or leave it naming the other's data
    file. Each worker of a parallel warm-up takes an exclusive file lock around a save."""
    save = caching.IndexDataCacheFile.save
    if getattr(save, "locked", False):
        return

    def locked(self, key, data):
        with open(os.path.join(self._cache_path, ".substrate-cache.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            save(self, key, data)

    locked.locked = True
    caching.IndexDataCacheFile.save = locked
