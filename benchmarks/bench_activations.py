"""What the compiled activations cost per value, against NumPy's exp and tanh of the same count in the same run.

For each dtype (float64, float32, complex128) and activation, ``_kernels.activate`` (rho) and
``_kernels.activate_prime`` (rho') on a (rows, batch) state, and NumPy's own loop of the same formula
(``substrate.activations.rho`` with ``out=`` buffers where it has them), against ``np.exp`` and
``np.tanh`` of the same number of values of that dtype. The cases are taken in turn (round robin) so
that a noisy moment of the shared machine hits them alike; the minimum of the repeats is reported,
per value in ns and as ratios to np.exp and np.tanh. The targets of issue 17: tanh at np.tanh's
speed or better, the logistic within 1.1x np.exp, the float32 rows no slower than NumPy's float32 loop.

Run:  .venv/bin/python benchmarks/bench_activations.py [--rows 256 --batch 256 --repeats 15]
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import numpy as np
from numpy._core._multiarray_umath import __cpu_features__

import results
from substrate import _kernels as K
from substrate import activations

NAMES = ("logistic", "tanh", "dsilu", "hard_sigmoid", "identity")


def numpy_rho(name, u, out, tmp):
    """NumPy's loop of rho, in place where NumPy allows (the reference implementation allocates)."""
    if name == "logistic":
        np.multiply(u, -4.0, out=tmp)
        np.add(tmp, 2.0, out=tmp)
        np.exp(tmp, out=tmp)
        np.add(tmp, 1.0, out=tmp)
        np.reciprocal(tmp, out=out)
    elif name == "tanh":
        np.tanh(u, out=out)
    else:
        out[...] = activations.rho(name, u)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # NumPy's float64 exp and tanh have SIMD loops (Intel's SVML) for AVX-512 hosts only: the ratios to them
    # depend on the host
    avx512 = "yes" if __cpu_features__.get("AVX512F") else "no"
    print(f"{args.rows} x {args.batch} values, minimum of {args.repeats} round-robin repeats; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; AVX-512: {avx512}")
    rows = []
    for dtype in (np.float64, np.float32, np.complex128):
        u = rng.normal(scale=2.0, size=(args.rows, args.batch)).astype(dtype)
        if dtype == np.complex128:
            u = u + 0.3j * rng.normal(size=u.shape)
        out, tmp = np.empty_like(u), np.empty_like(u)
        off = np.array([0, args.rows])
        cases = {"np.exp": partial(np.exp, u, out=out), "np.tanh": partial(np.tanh, u, out=out)}
        names = [n for n in NAMES if dtype != np.complex128 or n in activations.HOLOMORPHIC]
        for name in names:
            code = K.layer_activations([activations.CODES[name]], dtype)
            cases[f"{name} rho"] = partial(K.activate, u, off, code, out)
            cases[f"{name} rho'"] = partial(K.activate_prime, u, off, code, out)
            cases[f"{name} numpy"] = partial(numpy_rho, name, u, out, tmp)
        best = dict.fromkeys(cases, np.inf)
        for f in cases.values():  # compile or load from the cache before timing
            f()
        for _ in range(args.repeats):
            for key, f in cases.items():
                t = time.perf_counter()
                f()
                best[key] = min(best[key], time.perf_counter() - t)
        ns = {k: v / u.size * 1e9 for k, v in best.items()}
        print(f"\n{np.dtype(dtype).name:<22}{'ns/value':>9}{'/ np.exp':>10}{'/ np.tanh':>11}{'/ numpy':>10}")
        for key, v in ns.items():
            name = key.split()[0]
            vs_numpy = v / ns[name + ' numpy'] if name in names and "numpy" not in key else None
            print(f"{key:<22}{v:9.2f}{v / ns['np.exp']:10.2f}{v / ns['np.tanh']:11.2f}"
                  + ("" if vs_numpy is None else f"{vs_numpy:10.2f}"))
            rows.append((np.dtype(dtype).name, key, v, v / ns["np.exp"], v / ns["np.tanh"], vs_numpy))
        results.record(f"Activations: {args.rows} x {args.batch} values, minimum of {args.repeats} round-robin "
                       f"repeats, AVX-512: {avx512}; ratios to np.exp, np.tanh and NumPy's loop of the same formula, "
                       "same dtype",
                       ["dtype", "case", "ns per value", "ratio to np.exp", "ratio to np.tanh", "ratio to numpy"],
                       rows, key="activations", baseline="np.exp, np.tanh, numpy of the same dtype")


if __name__ == "__main__":
    main()
