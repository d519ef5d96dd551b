"""What device effects cost per integration step, against the ideal circuit measured in the same run.

The problem of ``bench_step.py`` (784-500-10 layered network, logistic, independent feedback, batch
64, tau = 1, dt = 0.1, Euler): ``substrate.integrate`` with 100 and 1000 steps per call, and the
marginal step (T_1000 - T_100) / 900, for

* ``no device``: the plain network (the baseline: ratio 1);
* ``ideal device``: the same network attached to ``Device()`` (the claim: the ideal path costs
  nothing, i.e. a ratio of 1 within the noise);
* ``read noise (phase)``: ReadNoise drawn once per call, shared by the batch (costs once per call,
  not per step);
* ``read noise (step)``: redrawn at every product inside the kernel (one extra product of the
  variances with r^2, plus 510 x 64 normal draws per step, a block at a time:
  ``substrate.devices.normals``);
* ``read noise (sample)``: per-sample deviations held over the relaxation (an elementwise product
  over all weights and samples per step: O(n_w B), not a GEMM);
* ``state noise``: u += s sqrt(h) xi after every step (510 x 64 draws);
* ``IO chain``: aihwkit defaults (7-bit DAC, output noise, 9-bit ADC);
* ``activation mismatch``: rho(g (u - o)) per neuron.

One BLAS thread (threadpoolctl), minimum and median of ``--repeats`` runs, the cases taken in turn
(round robin) so that a noisy moment of the shared machine hits them alike; trust the minimum. The first
call (compile or cache load) is done before timing. The last row times the normal draws alone
(``normals.fill`` of 510 x 64 values, per step) against ``np.exp`` of as many values and numpy's
``Generator.standard_normal``. The table is also written to ``benchmarks/results/bench_devices.json``
(``benchmarks/results.py``).

Run:  .venv/bin/python benchmarks/bench_devices.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

import results
import substrate as S
from substrate import devices as D
from substrate.devices import normals


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    net = S.Network.layered([784, 500, 10], rng, feedback="independent", asymmetry_angle=90.0)
    x = rng.uniform(0, 1, (args.batch, 784))
    cases = {
        "no device": None,
        "ideal device": D.Device(),
        "read noise (phase)": D.Device((D.ReadNoise(0.05, policy="phase"),)),
        "read noise (step)": D.Device((D.ReadNoise(0.05, policy="step"),)),
        "read noise (sample)": D.Device((D.ReadNoise(0.05, policy="sample"),)),
        "state noise": D.Device((D.StateNoise(0.01),)),
        "IO chain": D.Device((D.IOChain(),)),
        "activation mismatch": D.Device((D.ActivationMismatch(),)),
    }
    dt = 0.1
    calls = {}
    for name, dev in cases.items():
        circuit = net if dev is None else D.attach(net, dev, np.random.default_rng(1))
        for k in (1, 10):
            calls[name, k] = (lambda c=circuit, steps=k * args.steps:
                              S.integrate(c, x, t_span=(0.0, steps * dt), method="euler", dt=dt))
    size = net.n * args.batch  # the draws of one step
    stream, z, e = normals.new_stream(np.random.default_rng(2)), np.empty(size), np.empty(size)
    gen = np.random.default_rng(3)
    draws = {"normals.fill": lambda: [normals.fill(stream, z) for _ in range(args.steps)],
             "np.exp": lambda: [np.exp(z, out=e) for _ in range(args.steps)],
             "numpy standard_normal": lambda: [gen.standard_normal(out=z) for _ in range(args.steps)]}
    calls.update({(name, 0): fn for name, fn in draws.items()})
    times = {key: [] for key in calls}
    with threadpool_limits(1):
        for fn in calls.values():  # the first call compiles or loads the kernels
            fn()
        for _ in range(args.repeats):  # round robin: a noisy moment hits every case alike
            for key, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    rows = []
    for name in cases:
        r1, r10 = [(min(times[name, k]), float(np.median(times[name, k]))) for k in (1, 10)]
        rows.append((name, r1, r10, (r10[0] - r1[0]) / (9 * args.steps)))
    base = rows[0][3]
    title = f"784-500-10, batch {args.batch}, Euler dt {dt}, float64, 1 BLAS thread, min (median) of {args.repeats}"
    print(title)
    head = (f"{'case':<22} {f'{args.steps} steps ms':>18} {f'{10 * args.steps} steps ms':>20} "
            f"{'marginal step us':>17} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for name, r1, r10, m in rows:
        print(f"{name:<22} {1e3 * r1[0]:>8.2f} ({1e3 * r1[1]:>7.2f}) {1e3 * r10[0]:>9.2f} ({1e3 * r10[1]:>8.2f}) "
              f"{1e6 * m:>17.1f} {m / base:>6.2f}")
    results.record(title, ["case", "ms per call of 100 steps (min)", "(median)", "ms per call of 1000 steps (min)",
                           "(median)", "marginal step us", "ratio"],
                   [(name, 1e3 * r1[0], 1e3 * r1[1], 1e3 * r10[0], 1e3 * r10[1], 1e6 * m, m / base)
                    for name, r1, r10, m in rows], key="devices", baseline="no device")
    exp = min(times["np.exp", 0]) / args.steps
    drawn = [(name, min(times[name, 0]) / args.steps) for name in draws]
    title = f"{size} normal draws (one step's), per step, min of {args.repeats}; ratios to np.exp of as many values"
    print(f"\n{title}")
    for name, t in drawn:
        print(f"{name:<22} {1e6 * t:>9.1f} us {t / exp:>6.2f}  ({t / base:.2f} of the no-device step)")
    results.record(title, ["draws", "us per step", "ratio to np.exp", "ratio to the no-device step"],
                   [(name, 1e6 * t, t / exp, t / base) for name, t in drawn], key="draws", baseline="np.exp")

if __name__ == "__main__":
    main()
