"""Cost of the implicit gradient at the equilibrium, by solver, against one relaxation.

``substrate.gradient(net, x, loss, method=Implicit(solver=...), integrator="exp_euler", tol=1e-8)``
relaxes the circuit to its equilibrium and solves J^T lambda = -dL/du there; this script times it for
each solver against ``substrate.relax(net, x, method="exp_euler", tol=1e-8)`` alone, measured in the
same run (``/ relax``: min over min; the target is <= 1.5):

* ``krylov``: GMRES on J^T products (the whole batch as one block-diagonal system);
* ``almeida_pineda``: the adjoint dynamics lambda <- lambda + (J^T lambda + dL/du) relaxed to its fixed
  point (ap_step 1: one W^T product a step, rho'(u*) evaluated once);
* ``warm``: krylov and almeida_pineda after a 0.1% change of every state-to-state weight (a training
  step), started from the previous call's lambda (``adjoint0=previous.adjoint.lam``); the label gives
  the products of a cold start on the changed network, the rel diff is against that cold start;
* ``direct``: dense J and LU per sample, where it is estimated to take under 60 s.

Columns: ``products`` (J^T products of the solve; direct: the n J products that build J), ``residual``
(the worst per-sample max|J^T lambda + dL/du| / max|dL/du|), ``rate`` (Almeida-Pineda: the residual's
shrink factor a step, i.e. the spectral radius of I + J^T) and ``rel diff`` (max|dL/dW - reference| /
max|reference| over the state-to-state and input weights; the reference is direct where it runs, else
krylov; for the warm rows the cold start on the changed network) and ``vs exact`` (the same against
the gradient at an equilibrium relaxed to 1e-12: the error the 1e-8 relaxation leaves). The solvers
stop at their default relative residual max(1e-12, tol / 10) = 1e-9, one row at 1e-12.

Problems: layered networks (``Network.layered``, logistic, independent feedback at 90 degrees, tau 1,
float64, inputs uniform in [0, 1), the loss 0.5 sum((u_y - onehot)^2) on the output layer): 20-50-10
batch 16, the engine benchmark's 784-500-10 batch 64, and 784-500-500-10 batch 64. A network whose
relaxation does not converge at 90 degrees is rebuilt at 45 (printed). BLAS is pinned to ``--threads``
threads (default 1). The variants of a problem are timed round robin (one call of each per round, so
that all see the same load); every time is the minimum (and median) of at least ``--repeats`` rounds
(more, up to 300, within 4 s) after a warm-up.

Run:  .venv/bin/python benchmarks/bench_implicit.py          (about a minute on 2 cores)
      .venv/bin/python benchmarks/bench_implicit.py --json results.json   (also writes the numbers)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import results  # noqa: E402  (benchmarks/results.py, beside this script)
import substrate  # noqa: E402  (the repository first on sys.path)

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # the timings then use whatever BLAS threads are configured
    threadpool_limits = None

PROBLEMS = (((20, 50, 10), 16), ((784, 500, 10), 64), ((784, 500, 500, 10), 64))
TOL = 1e-8          # the relaxation's residual, for the baseline and every gradient
DIRECT_LIMIT = 60.0  # seconds: direct is skipped above this estimate


def race(fns, repeats, budget=4.0, most=300):
    """{name: (min, median) seconds} of every fn() in ``fns``, timed round robin (one call of each per
    round, so that all see the same load on a shared machine) for at least ``repeats`` rounds, and
    more (up to ``most``) until ``budget`` seconds are spent: a millisecond call needs many tries for
    a clean minimum. One untimed warm-up call of each first."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    spent, rounds = 0.0, 0
    while rounds < repeats or (spent < budget and rounds < most):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
            spent += times[k][-1]
        rounds += 1
    return {k: (min(v), float(np.median(v))) for k, v in times.items()}


def make_problem(sizes, batch):
    for angle in (90.0, 45.0):
        net = substrate.Network.layered(list(sizes), np.random.default_rng(0), activation="logistic",
                                        feedback="independent", asymmetry_angle=angle, dtype="float64")
        x = np.random.default_rng(1).random((batch, sizes[0]))
        try:
            sol = substrate.relax(net, x, method="exp_euler", tol=TOL)
        except substrate.ConvergenceError:
            continue
        return net, x, output_loss(net.slices["y"], sizes[-1], batch), angle, sol
    raise SystemExit(f"{sizes}: the relaxation does not converge at 90 or 45 degrees")


def output_loss(out, classes, batch):
    """L = 0.5 sum((u_y - onehot)^2) on the output layer's columns ``out``."""
    target = np.eye(classes)[np.random.default_rng(2).integers(0, classes, batch)]

    def loss(u):
        d = u[:, out] - target
        g = np.zeros_like(u)
        g[:, out] = d
        return 0.5 * float(np.sum(d * d)), g
    return loss


def weights(g):
    return np.concatenate([np.ravel(g.weights[k]) for k in sorted(g.weights)])


def run_problem(sizes, batch, repeats):
    net, x, loss, angle, sol = make_problem(sizes, batch)
    name = "-".join(map(str, sizes))
    print(f"\n{name}, batch {batch} (n = {net.n}, asymmetry {angle:g} degrees): relax converges in "
          f"{sol.steps} exp_euler steps")

    def grad(solver, adjoint0=None, network=net, krylov_tol=None):
        return substrate.gradient(network, x, loss, method=substrate.Implicit(solver, krylov_tol=krylov_tol),
                                  integrator="exp_euler", tol=TOL, adjoint0=adjoint0)

    # the exact gradient up to an equilibrium error of 1e-12 (Krylov)
    exact = weights(substrate.gradient(net, x, loss, method=substrate.Implicit("krylov"),
                                       integrator="exp_euler", tol=1e-12))

    results = {s: grad(s) for s in ("krylov", "almeida_pineda")}
    vf = substrate.VectorField(net, x)
    t0 = time.perf_counter()
    vf.jvp(sol.u, np.ones_like(sol.u))
    estimate = net.n * (time.perf_counter() - t0) + batch * 4e-11 * net.n ** 3  # n products, LU per sample
    if estimate < DIRECT_LIMIT:
        t0 = time.perf_counter()
        results["direct"] = grad("direct")
        t_direct = time.perf_counter() - t0
    else:
        print(f"  direct: skipped (estimated {estimate:.0f} s > {DIRECT_LIMIT:g} s)")
    reference = weights(results.get("direct", results["krylov"]))
    # a solve to 1e-12, finer than the error the 1e-8 equilibrium leaves (column "vs exact")
    results["fine"] = grad("almeida_pineda", krylov_tol=1e-12)
    # a training step later: every state-to-state weight 0.1% larger (a deep copy), started from the
    # previous lambda; its rel diff is against the cold start on the changed network
    moved = copy.deepcopy(net)
    for c in moved.connections:
        if c.pre in moved.slices and not c.tied:
            c.weight = c.weight * 1.001
    lam = results["almeida_pineda"].adjoint.lam
    cold = {s: grad(s, None, moved) for s in ("krylov", "almeida_pineda")}
    for s in ("krylov", "almeida_pineda"):
        results[f"{s} warm"] = grad(s, lam, moved)
    times = race({
        "relax": lambda: substrate.relax(net, x, method="exp_euler", tol=TOL),
        "krylov": lambda: grad("krylov"),
        "almeida_pineda": lambda: grad("almeida_pineda"),
        "fine": lambda: grad("almeida_pineda", krylov_tol=1e-12),
        "krylov warm": lambda: grad("krylov", lam, moved),
        "almeida_pineda warm": lambda: grad("almeida_pineda", lam, moved)}, repeats)
    t_relax = times["relax"]
    rows = [("relax (exp_euler, tol 1e-8)", t_relax, None, None)]
    for s in ("krylov", "almeida_pineda"):
        rows.append((f"gradient, {s}", times[s], results[s], rel(weights(results[s]), reference)))
    rows.append(("gradient, almeida_pineda, krylov_tol 1e-12", times["fine"], results["fine"],
                 rel(weights(results["fine"]), reference)))
    for s in ("krylov", "almeida_pineda"):
        warm = results[f"{s} warm"]
        rows.append((f"gradient, {s} warm (0.1% step; cold {cold[s].adjoint.products})", times[f"{s} warm"],
                     warm, rel(weights(warm), weights(cold[s]))))
    if "direct" in results:
        rows.append(("gradient, direct (1 run)", (t_direct, t_direct), results["direct"], 0.0))
    print(f"  {'':<46} {'min ms':>9} {'median':>9} {'/ relax':>8} {'products':>9} {'residual':>9} "
          f"{'rate':>6} {'rel diff':>9} {'vs exact':>9}")
    out = {"problem": name, "batch": batch, "n": net.n, "asymmetry_angle": angle, "relax_steps": sol.steps,
           "rows": []}
    for label, (t_min, t_med), g, diff in rows:
        ratio = t_min / t_relax[0]
        row = {"label": label, "min_s": t_min, "median_s": t_med, "ratio_to_relax": ratio}
        if g is None:
            cells = ""
        else:
            a = g.adjoint
            rate = f"{a.rate:6.3f}" if a.rate is not None else f"{'':>6}"
            err = rel(weights(g), exact) if g.solution.u.shape == sol.u.shape and "warm" not in label else None
            cells = (f"{a.products:9d} {np.max(a.residual):9.1e} {rate} {diff:9.1e} "
                     f"{'' if err is None else format(err, '9.1e')}")
            row.update(products=a.products, residual=float(np.max(a.residual)), rate=a.rate, rel_diff=diff,
                       error_vs_exact=err)
        print(f"  {label:<46} {t_min * 1e3:9.2f} {t_med * 1e3:9.2f} {ratio:8.2f} {cells}")
        out["rows"].append(row)
    return out


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    ap.add_argument("--repeats", type=int, default=7, help="timings per measurement (default 7)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    print(__doc__.split("\n\n")[0])
    load = os.getloadavg()
    print(f"{os.cpu_count()} logical cores; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{args.threads} BLAS thread(s)")
    substrate.relax(*make_problem((4, 8, 3), 2)[:2], method="exp_euler", tol=TOL)  # loads the BLAS
    limits = threadpool_limits(limits=args.threads) if threadpool_limits else None
    try:
        problems = [run_problem(sizes, batch, args.repeats) for sizes, batch in PROBLEMS]
    finally:
        if limits is not None:
            limits.restore_original_limits()
    columns = ["problem", "case", "min ms", "median ms", "ratio to relax", "products", "residual", "rate",
               "rel diff", "vs exact"]
    results.record(f"Implicit gradient at the equilibrium against one relaxation (exp_euler, tol {TOL:g}) of the "
                   f"same problem, {args.threads} BLAS thread(s), min of at least {args.repeats} round-robin rounds",
                   columns, [(f"{p['problem']} batch {p['batch']}", r["label"], 1e3 * r["min_s"], 1e3 * r["median_s"],
                              r["ratio_to_relax"], r.get("products"), r.get("residual"), r.get("rate"),
                              r.get("rel_diff"), r.get("error_vs_exact")) for p in problems for r in p["rows"]],
                   key="implicit", baseline="relax (exp_euler, tol 1e-8) of the same problem")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "implicit", "threads": args.threads,
                                         "load_average": list(os.getloadavg()), "problems": problems}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
