"""Cost of an epoch of PV-RNN training, compiled (``models.pvrnn.train(..., compiled=True)``) against
the NumPy path (``compiled=False``, the reference) measured in the same run (issue 19's benchmark).

The problem: the meta-prior study's training (studies/configs/meta_prior.toml, base): 12 sequences
of 200 steps of the probabilistic Lissajous machine (``models.data.probabilistic_sequences``), two
layers of 30 and 15 units with 3 and 1 latents (tau 2 and 8), w = 1e-3, w_first = 1, Adam 0.005;
float64, one BLAS thread. An epoch is a pass of the whole set: the noise draws, the forward pass,
the exact adjoint and Adam on the weights and every sequence's A. Time per epoch: the minimum over
``--repeats`` of a run of ``--epochs`` epochs (NumPy: ``--numpy-epochs``) divided by its epochs;
``ratio`` = NumPy's over compiled (the target is >= 20), on wall time and on the process's CPU
time (which an oversubscribed machine inflates less). Both paths start from the same weights and
draw the same noise; the largest relative difference of their weights after the NumPy run's epochs
is printed (rounding). Also with substeps 4 (exp_euler) and with posterior weights, and the first
call of the compiled path in a fresh subprocess with an empty ``NUMBA_CACHE_DIR`` (cold: Numba
compiles) and again with that directory (warm: Numba loads its cache). And the per-step product of
the two layers alone, (12 x 30)(30 x 30) and (12 x 15)(15 x 15), by BLAS's dgemm (``substrate._blas.gemm``)
against the hand kernel the training uses (``gemm_small``), microseconds a call in a compiled loop.

Run:  .venv/bin/python benchmarks/results.py benchmarks/bench_pvrnn_train.py   # or make bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results

from numba import njit

from models.data import probabilistic_sequences
from models.pvrnn import PVRNN, PVLayer, train
from substrate._blas import SCALARS, gemm, gemm_small

ROOT = Path(__file__).resolve().parent.parent


def problem(substeps=1, method="euler", posterior_weights=False, sequences=12, steps=200):
    x, _ = probabilistic_sequences(sequences, steps, np.random.default_rng(0))

    def model():
        return PVRNN([PVLayer(30, 3, 2.0, 1e-3, 1.0), PVLayer(15, 1, 8.0, 1e-3, 1.0)], 2, np.random.default_rng(1),
                     substeps=substeps, method=method, posterior_weights=posterior_weights)

    return x, model


def per_epoch(x, model, epochs, repeats, compiled):
    """Min over repeats of (seconds of ``epochs`` epochs) / epochs, wall and this process's CPU time
    (on an oversubscribed machine the CPU time is what the work itself costs), and the last run's
    weights."""
    wall = cpu = np.inf
    for _ in range(repeats):
        net = model()
        t0, c0 = time.perf_counter(), time.process_time()
        train(net, x, epochs=epochs, rng=np.random.default_rng(2), lr=0.005, progress=False, compiled=compiled)
        wall = min(wall, (time.perf_counter() - t0) / epochs)
        cpu = min(cpu, (time.process_time() - c0) / epochs)
    return wall, cpu, net.params


_COMPILE_CHILD = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
from models.pvrnn import PVRNN, PVLayer, train
out = {"import": time.perf_counter() - t0}
t0 = time.perf_counter()
net = PVRNN([PVLayer(3, 1, 2.0), PVLayer(2, 1, 4.0)], 2, np.random.default_rng(0))
train(net, np.zeros((1, 4, 2)), epochs=1, rng=np.random.default_rng(0), progress=False, compiled=True)
out["first_call"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def compile_times():
    """(label, process wall s, import s, first compiled train call s) with an empty Numba cache, then
    warm. The subprocesses import a snapshot of the package (as bench_step.py does)."""
    work = Path(tempfile.mkdtemp(prefix="substrate-compile-"))
    for package in ("substrate", "models"):
        shutil.copytree(ROOT / package, work / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(work / "numba-cache"), PYTHONPATH=str(work))
    rows = []
    try:
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _COMPILE_CHILD], env=env, cwd=work, capture_output=True,
                                  text=True, check=False)
            if proc.returncode != 0:
                print(f"compile-time run ({label}) failed:\n{proc.stderr.strip()}")
                return rows
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append([label, time.perf_counter() - t0, r["import"], r["first_call"]])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


@njit(cache=False)
def _dgemm_calls(a, b, c, calls, scalars):
    for _ in range(calls):
        gemm(a, b, c, 1, scalars)


@njit(cache=False)
def _small_calls(a, b, c, calls):
    for _ in range(calls):
        gemm_small(a, b, c)


def step_products(repeats, calls=2000):
    """(shape, dgemm us, gemm_small us, ratio) per call of c += a b for the per-step shapes, the
    minimum over ``repeats`` runs of ``calls`` calls."""
    rng = np.random.default_rng(0)
    rows = []
    for units in (30, 15):
        a, b, c = rng.standard_normal((12, units)), rng.standard_normal((units, units)), np.zeros((12, units))
        times = []
        for run in (lambda k: _dgemm_calls(a, b, c, k, SCALARS), lambda k: _small_calls(a, b, c, k)):
            run(1)
            best = np.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                run(calls)
                best = min(best, (time.perf_counter() - t0) / calls)
            times.append(1e6 * best)
        rows.append([f"(12 x {units})({units} x {units})", times[0], times[1], times[0] / times[1]])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=50, help="epochs per timed compiled run")
    ap.add_argument("--numpy-epochs", type=int, default=5, help="epochs per timed NumPy run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-variants", dest="variants", action="store_false", help="only the study's problem")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compile-time runs")
    args = ap.parse_args()
    cases = [("meta_prior base (substeps 1, euler)", {})]
    if args.variants:
        cases += [("substeps 4, exp_euler", {"substeps": 4, "method": "exp_euler"}),
                  ("posterior weights", {"posterior_weights": True})]
    print(f"PV-RNN training epoch: 12 sequences x 200 steps, units 30/15, latents 3/1, float64, 1 thread; "
          f"min over {args.repeats} repeats of {args.epochs} (compiled) and {args.numpy_epochs} (NumPy) epochs")
    print(f"load average at start: {results.load_average()}")
    rows = []
    import scipy.linalg  # noqa: F401  loads scipy's BLAS (Numba's np.dot calls it) so that threadpoolctl pins it
    with threadpool_limits(1):
        for name, kw in cases:
            x, model = problem(**kw)
            train(model(), x, epochs=1, rng=np.random.default_rng(2), progress=False, compiled=True)  # compile/load
            ref, ref_cpu, p_ref = per_epoch(x, model, args.numpy_epochs, args.repeats, False)
            fast, fast_cpu, _ = per_epoch(x, model, args.epochs, args.repeats, True)
            net = model()
            train(net, x, epochs=args.numpy_epochs, rng=np.random.default_rng(2), lr=0.005, progress=False,
                  compiled=True)
            diff = max(np.max(np.abs(net.params[k] - v)) / np.max(np.abs(v)) for k, v in p_ref.items())
            rows.append([name, 1e3 * ref, 1e3 * fast, ref / fast, 1e3 * ref_cpu, 1e3 * fast_cpu, ref_cpu / fast_cpu,
                         diff])
        steps = step_products(args.repeats)
    head = (f"{'case':<36} {'numpy ms':>9} {'compiled ms':>12} {'ratio':>6} {'CPU: numpy':>11} {'compiled':>9} "
            f"{'ratio':>6}  {'weights rel diff':>16}")
    print(head)
    print("-" * len(head))
    for name, ref, fast, ratio, ref_cpu, fast_cpu, ratio_cpu, diff in rows:
        print(f"{name:<36} {ref:9.2f} {fast:12.3f} {ratio:6.1f} {ref_cpu:11.2f} {fast_cpu:9.3f} {ratio_cpu:6.1f}  "
              f"{diff:16.1e}")
    results.record("PV-RNN training epoch, compiled against NumPy (same run)",
                   ["case", "numpy ms per epoch (min)", "compiled ms per epoch (min)", "ratio",
                    "numpy CPU ms per epoch (min)", "compiled CPU ms per epoch (min)", "CPU ratio", "weights rel diff"],
                   rows, key="pvrnn_train", baseline="models.pvrnn.train(compiled=False), same run")
    print(f"\nPer-step product c += a b, us a call: {'shape':<22} {'dgemm':>7} {'gemm_small':>10} {'ratio':>6}")
    for shape, t_blas, t_small, ratio in steps:
        print(f"{'':<43}{shape:<22} {t_blas:7.3f} {t_small:10.3f} {ratio:6.2f}")
    results.record("PV-RNN per-step product: BLAS dgemm against the hand kernel",
                   ["shape", "dgemm us per call (min)", "gemm_small us per call (min)", "ratio"], steps,
                   key="pvrnn_step_product", baseline="substrate._blas.gemm (dgemm), same run")
    if args.compile:
        crows = compile_times()
        if crows:
            print("\nFirst compiled train call in a fresh subprocess; cold = empty NUMBA_CACHE_DIR, warm = again")
            print(f"{'cache':<6} {'process wall s':>14} {'import s':>9} {'first call s':>13}")
            for label, wall, imp, first in crows:
                print(f"{label:<6} {wall:14.2f} {imp:9.2f} {first:13.2f}")
            results.record("PV-RNN compiled training: first call", ["cache", "process wall s", "import s",
                                                                    "first call s"], crows, key="pvrnn_train_compile")


if __name__ == "__main__":
    main()
