"""DC operating point of a deep resistive network (substrate.circuits): substrate's sparse Newton solve
against scipy's sparse solver on the same Newton systems, and how the cost grows with the node count.

Problem: ``circuits.layered((784, hidden, 10))`` (Scellier et al. 2024's deep resistive network: 784
input voltage sources plus two bias sources at +-0.4 V, every hidden node joined to every input and
every output by a conductance in [1, 20] mS, an antiparallel diode pair from each hidden node to the
bias nodes, I_s 1e-12 A), inputs uniform in [0, 1) V, batch 2, tol 1e-10 A.

* ``linear solve``: the Newton systems J d = -F of one DC solve (collected at every iteration), each
  solved by substrate's Jacobi-preconditioned conjugate gradients (a Numba kernel on -J, symmetric
  positive definite for this reciprocal circuit, relative residual 1e-12) and by
  ``scipy.sparse.linalg.spsolve`` (SuperLU) on the same CSR matrix; ratio = cg / spsolve (min over
  repeats of the total over the systems); ``rel diff`` the largest |d_cg - d_lu| / max|d_lu|.
* ``dc solve``: the whole ``circuits.dc(..., linear="cg")`` against ``linear="splu"`` (same Newton
  iterations; the stamps, currents and the CSR assembly are shared, so the ratio shows how much of a
  solve the linear algebra is).
* ``growth``: ``dc(linear="cg")`` for hidden = 256, 1024, 4096; the time ratio to the smallest and the
  exponent p of time ~ size^p between consecutive sizes, in nodes and in conductances (794 per hidden
  node: the conductances, not the nodes, set the cost of the currents and stamps).

Times are minima over repeats, so they exclude the sparsity pattern (sorted once per circuit at its
first solve and cached; ~3 s at hidden = 4096).

Run:  .venv/bin/python benchmarks/results.py benchmarks/bench_circuit_dc.py   (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import results

from substrate import circuits
from substrate.circuits import _kernels as K
from substrate.circuits import solve as S

TOL = 1e-10
BATCH = 2


def problem(hidden, seed=0):
    rng = np.random.default_rng(seed)
    c = circuits.layered((784, hidden, 10), rng)
    return c, circuits.bias_inputs(rng.uniform(0, 1, (BATCH, 784)))


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def newton_systems(c, x):
    """The (CSR pattern, [(data, rhs)]) of every Newton iteration of a DC solve from 0 V."""
    f = circuits.CircuitField(c, x)
    p = S.sparse_pattern(f)
    u = np.zeros((f.batch, f.size))
    systems = []
    for _ in range(50):
        F = f(u)
        if np.max(np.abs(F)) <= TOL:
            break
        vals = f.stamp_values(u)
        systems += [(p.data(f, vals[b]), F[b].copy()) for b in range(f.batch)]
        d, _ = S.newton_direction(f, u, F, "cg", 1e-12, p)
        u = u + d
    return p, f.size, systems


def linear_solves(p, n, systems, repeats):
    from scipy.sparse.linalg import spsolve

    mats = [p.matrix(data, n).tocsc() for data, _ in systems]

    def cg():
        out = []
        for data, rhs in systems:
            d = np.zeros(n)
            K.cg(p.indptr, p.indices, -data, rhs, d, 1e-12, 10 * n)
            out.append(d)
        return out

    def lu():
        return [spsolve(m, -rhs) for m, (_, rhs) in zip(mats, systems)]

    diff = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in zip(cg(), lu()))
    return best(cg, repeats), best(lu, repeats), diff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(__doc__.split("\n\n")[0])
    circuits.dc(*problem(8), linear="cg")  # compiles the kernels
    c, x = problem(4096)
    print(f"784-4096-10: {c.n} nodes, {len(c.edges)} conductances, {len(c.diodes)} diodes, batch {BATCH}")
    p, n, systems = newton_systems(c, x)
    t_cg, t_lu, diff = linear_solves(p, n, systems, args.repeats)
    rows = [("cg (substrate)", len(systems), p.nnz, t_cg * 1e3, t_cg / t_lu, diff),
            ("spsolve (scipy SuperLU)", len(systems), p.nnz, t_lu * 1e3, 1.0, 0.0)]
    cols = ["solver", "systems", "nnz", "ms (all systems)", "ratio to spsolve", "rel diff"]
    print(f"\nlinear solve: {' | '.join(cols)}")
    for r in rows:
        print(f"  {r[0]:24s} {r[1]:4d} {r[2]:8d} {r[3]:10.2f} {r[4]:8.3f} {r[5]:.2e}")
    results.record("Newton systems of the 784-4096-10 DC solve: substrate's CG vs scipy spsolve", cols, rows,
                   key="circuit_linear", baseline="spsolve")
    t_dc_cg = best(lambda: circuits.dc(c, x, tol=TOL, linear="cg"), args.repeats)
    t_dc_lu = best(lambda: circuits.dc(c, x, tol=TOL, linear="splu"), args.repeats)
    sol = circuits.dc(c, x, tol=TOL, linear="cg")
    rows = [("dc linear=cg", sol.iterations, t_dc_cg, t_dc_cg / t_dc_lu),
            ("dc linear=splu", sol.iterations, t_dc_lu, 1.0)]
    cols = ["solve", "Newton iterations", "s", "ratio to splu"]
    print(f"\ndc solve: {' | '.join(cols)}")
    for r in rows:
        print(f"  {r[0]:16s} {r[1]:4d} {r[2]:8.3f} {r[3]:8.3f}")
    results.record("DC solve of the 784-4096-10 network, batch 2", cols, rows, key="circuit_dc", baseline="splu")
    sizes = []
    for hidden in (256, 1024, 4096):
        c, x = problem(hidden)
        sizes.append((hidden, c.n, len(c.edges), best(lambda: circuits.dc(c, x, tol=TOL, linear="cg"), args.repeats)))
    def exponent(k, i):  # of time ~ size^p between sizes k-1 and k, size the i-th column
        return None if k == 0 else float(np.log(sizes[k][3] / sizes[k - 1][3]) / np.log(sizes[k][i] / sizes[k - 1][i]))

    rows = [(h, nodes, edges, t * 1e3, t / sizes[0][3], exponent(k, 1), exponent(k, 2))
            for k, (h, nodes, edges, t) in enumerate(sizes)]
    cols = ["hidden", "nodes", "conductances", "ms", "ratio to hidden=256", "p in nodes", "p in conductances"]
    print(f"\ngrowth: {' | '.join(cols)}")
    show = lambda v: "" if v is None else f"{v:.2f}"
    for r in rows:
        print(f"  {r[0]:6d} {r[1]:6d} {r[2]:9d} {r[3]:10.1f} {r[4]:8.2f} {show(r[5]):>6s} {show(r[6]):>6s}")
    results.record("DC solve (linear=cg) against the hidden layer's size", cols, rows, key="circuit_growth",
                   baseline="hidden=256")


if __name__ == "__main__":
    main()
