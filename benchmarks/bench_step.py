"""Cost of one integration step of substrate's engine, against what the same step costs elsewhere.

The problem (from the issue): a 784-500-10 layered network, logistic activations, independent feedback
weights (asymmetry angle 90 degrees), batch 64, tau = 1, dt = 0.1, 100 explicit Euler steps over
t in [0, 10]. The input layer x is clamped: its projection V x + b (the *drive*) is computed once per
call, so a step is

    r = rho(u) = 1 / (1 + exp(2 - 4 u))           (510 x 64 activations: 32,640 exponentials)
    N = drive + W r                               (W r = two GEMMs: W1 (10x500) @ r_h, B (500x10) @ r_y)
    u = u + dt (N - u) / tau

with the state stored neurons-major, (n, batch) = (510, 64), as the engine stores it.

What is timed, per step, in float64 and float32:

* ``GEMM bound``: exactly the two matrix products of a step, numpy ``np.dot`` with preallocated
  ``out=`` arrays in the same layout and dtype, measured in this run. A step cannot be cheaper, so it
  is the yardstick: every row's ``ratio`` is its time over this bound (same dtype, same threads).
* ``substrate``: ``substrate.integrate(..., method="euler")`` end to end (packing, drive V x + b,
  stepping) with ``steps`` and with ``10 * steps`` steps per call; the second amortises the per-call
  overhead. ``marginal`` is the slope between the two, (T_10s - T_s) / (9 s): the pure stepping cost.
  The same for ``exp_euler`` (ETD1).
* ``numpy loop``, ``torch loop``: the same Euler loop written plainly in numpy (preallocated arrays,
  ``out=``) and in torch (``torch.sigmoid``, ``torch.addmm``, ``no_grad``), drive precomputed.
* ``torchdiffeq``: ``odeint(method="euler", options=dict(step_size=dt))`` over [0, 10], no grad.

Threads: numpy's and scipy's OpenBLAS (the engine's ``np.dot`` inside Numba calls scipy's BLAS) and
torch are pinned to the same count with threadpoolctl and ``torch.set_num_threads``; each count in
``--threads`` gets its own table. The machine may be shared and noisy: every time is taken ``--repeats``
times and the minimum and the median are reported.

The breakdown (skip it with ``--no-breakdown``) times the engine's own parts of an Euler step, on the
packed arrays of ``substrate.VectorField(net, x).packed``: the activation alone (the engine's
``_kernels.activate``, against numpy's and torch's sigmoid(4u - 2)), the weight products alone
(``_kernels.weights_times``, against the GEMM bound), and the rest of a step, i.e. the marginal Euler
step minus those two (the update and blow-up check of the fused ``stage_pass``, and the loop). A row
whose private kernel no longer accepts these arguments is reported as skipped.

The per-call overhead (skip it with ``--no-calls``): what a call costs beyond its steps, in float64,
one thread. A tiny network (4-8-3, batch 1): ``integrate`` of one Euler step minus a marginal step
(the slope between 1 and 1001 steps a call), and ``relax`` from an equilibrium it already holds
(``u0`` converged: no step is taken; its stability check, remembered from the relaxation that found
it, is timed alone), each against a torch loop step of the same network (measured here). A
large one (784-1024-1024, n = 2048 state neurons, batch 256): a one-step call minus a marginal step
(slope between 1 and 3 steps a call), as a fraction of a step, with unchanged weights (the cached
packed weights and drive V x + b are checked, not recomputed) and after an in-place edit of one
weight (recomputed).

Also reported: the first-call cost of the compiled kernels, in a fresh subprocess with an empty
``NUMBA_CACHE_DIR`` (cold: Numba compiles) and again with the same directory (warm: Numba loads its
cache); and with ``--quickstart`` the wall time of ``substrate quickstart``.

Run:  .venv/bin/python benchmarks/bench_step.py   (``make bench``; about 40 s on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import results  # noqa: E402
import substrate  # noqa: E402
from substrate import _kernels as K  # noqa: E402

try:
    import torch
except ImportError:  # torch is an optional dependency of substrate
    torch = None
try:
    import torchdiffeq
except ImportError:
    torchdiffeq = None
try:
    from threadpoolctl import threadpool_info, threadpool_limits
except ImportError:
    threadpool_info = threadpool_limits = None

SIZES = (784, 500, 10)
TAU = 1.0
DT = 0.1
DTYPES = ("float64", "float32")


# ============================================================================================ timing
def timeit(fn, repeats, number=1):
    """(min, median) seconds per call of fn() over ``repeats`` timings of ``number`` calls each,
    after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return min(times), float(np.median(times))


# ============================================================================================ problem
class Problem:
    """The benchmark network in one dtype, its inputs, and the arrays the reference loops use."""

    def __init__(self, dtype, batch):
        self.dtype = np.dtype(dtype)
        self.net = substrate.Network.layered(list(SIZES), np.random.default_rng(0), activation="logistic",
                                             feedback="independent", asymmetry_angle=90.0, tau=TAU,
                                             dtype=dtype)
        self.x = np.random.default_rng(1).random((batch, SIZES[0]))
        self.n_h = SIZES[1]
        self.W1 = np.ascontiguousarray(self.net.effective_weight(self.net.connection("h1->y")))  # (10, 500)
        self.B = np.ascontiguousarray(self.net.effective_weight(self.net.connection("y->h1")))   # (500, 10)
        self.drive = self.net.drive(self.x, None, self.dtype)                                    # (510, B)

    def substrate(self, steps, method="euler"):
        t1 = steps * DT
        return substrate.integrate(self.net, self.x, t_span=(0.0, t1), t_eval=[t1], method=method, dt=DT)


# ============================================================================================ reference loops
def gemm_step(p: Problem):
    """The two matrix products of a step, and nothing else."""
    n_h = p.n_h
    r = np.random.default_rng(2).random(p.drive.shape).astype(p.dtype)
    f = np.empty_like(r)
    r_h, r_y, f_h, f_y = r[:n_h], r[n_h:], f[:n_h], f[n_h:]
    W1, B = p.W1, p.B

    def step():
        np.dot(W1, r_h, out=f_y)
        np.dot(B, r_y, out=f_h)
    return step


def numpy_euler(p: Problem, steps):
    n_h, W1, B, drive = p.n_h, p.W1, p.B, p.drive
    u = np.zeros_like(drive)
    r = np.empty_like(u)
    f = np.empty_like(u)
    for _ in range(steps):
        np.multiply(u, -4, out=r)
        r += 2
        np.exp(r, out=r)
        r += 1
        np.reciprocal(r, out=r)              # r = 1 / (1 + exp(2 - 4u))
        np.dot(B, r[n_h:], out=f[:n_h])
        np.dot(W1, r[:n_h], out=f[n_h:])     # f = W r
        f += drive
        f -= u
        f *= DT / TAU
        u += f
    return u


def torch_arrays(p: Problem):
    return tuple(torch.from_numpy(a) for a in (p.W1, p.B, p.drive))


def torch_euler(p: Problem, steps, arrays):
    W1, B, drive = arrays
    n_h = p.n_h
    with torch.no_grad():
        u = torch.zeros_like(drive)
        z, r, f = torch.empty_like(u), torch.empty_like(u), torch.empty_like(u)
        for _ in range(steps):
            torch.mul(u, 4, out=z)
            z.sub_(2)
            torch.sigmoid(z, out=r)
            torch.addmm(drive[:n_h], B, r[n_h:], out=f[:n_h])
            torch.addmm(drive[n_h:], W1, r[:n_h], out=f[n_h:])
            f.sub_(u)
            u.add_(f, alpha=DT / TAU)
    return u.numpy()


class TorchField(torch.nn.Module if torch is not None else object):
    """F(u)/tau for torchdiffeq; counts its evaluations."""

    def __init__(self, p: Problem, arrays):
        super().__init__()
        self.W1, self.B, self.drive = arrays
        self.n_h = p.n_h
        self.nfev = 0

    def forward(self, t, u):
        self.nfev += 1
        n_h = self.n_h
        r = torch.sigmoid(4 * u - 2)
        f = torch.empty_like(u)
        torch.addmm(self.drive[:n_h], self.B, r[n_h:], out=f[:n_h])
        torch.addmm(self.drive[n_h:], self.W1, r[:n_h], out=f[n_h:])
        return (f - u) / TAU


def torchdiffeq_euler(p: Problem, steps, field):
    t = torch.tensor([0.0, steps * DT], dtype=field.drive.dtype)
    with torch.no_grad():
        u = torchdiffeq.odeint(field, torch.zeros_like(field.drive), t, method="euler",
                               options=dict(step_size=DT))
    return u[-1].numpy()


# ============================================================================================ tables
class Table:
    def __init__(self):
        self.rows = []

    def add(self, method, dtype, threads, tmin, tmed, bound=None, note=""):
        self.rows.append((method, dtype, threads, tmin, tmed, bound, note))

    def skip(self, method, dtype, threads, why):
        """A row that could not be measured, printed with the reason instead of times."""
        self.rows.append((method, dtype, threads, None, None, None, f"skipped: {why}"))

    def print(self, title, key=None):
        """Print the rows and record them under ``key`` (default: the title up to its colon, lower case)."""
        print(f"\n{title}")
        head = f"{'method':<46} {'dtype':<8} {'thr':>3} {'min us/step':>12} {'median':>9} {'ratio':>6} {'(med)':>6}  note"
        print(head)
        print("-" * len(head))
        for method, dtype, threads, tmin, tmed, bound, note in self.rows:
            if tmin is None:
                print(f"{method:<46} {dtype:<8} {threads:>3} {'-':>12} {'-':>9} {'':6} {'':6}  {note}")
                continue
            ratio = f"{tmin / bound[0]:6.2f} {tmed / bound[1]:6.2f}" if bound else f"{'':6} {'':6}"
            print(f"{method:<46} {dtype:<8} {threads:>3} {tmin * 1e6:12.1f} {tmed * 1e6:9.1f} {ratio}  {note}")
        results.record(title, ["method", "dtype", "threads", "min us", "median us", "ratio", "ratio (median)", "note"],
                       [(m, d, n, *(None if t is None else 1e6 * t for t in (tmin, tmed)),
                         *((tmin / b[0], tmed / b[1]) if b and tmin is not None else (None, None)), note)
                        for m, d, n, tmin, tmed, b, note in self.rows], key=key or title.split(":")[0].lower())
        self.rows = []


def step_table(args, threads, table):
    """The main comparison at one thread count; returns the GEMM bounds and the marginal Euler steps of
    the engine, per dtype, each as (min, median) seconds per step."""
    s, reps = args.steps, args.repeats
    bounds, marginals = {}, {}
    for dtype in DTYPES:
        p = Problem(dtype, args.batch)
        bound = timeit(gemm_step(p), reps, number=2000)
        bounds[dtype] = bound
        table.add("GEMM bound (np.dot out=, the 2 products)", dtype, threads, *bound, bound)

        u_ref = numpy_euler(p, s)
        for method in ("euler", "exp_euler"):
            sol = p.substrate(s, method)
            assert sol.steps == s, (sol.steps, s)
            short = timeit(lambda: p.substrate(s, method), reps)
            long = timeit(lambda: p.substrate(10 * s, method), reps)
            marginal = tuple((lt - st) / (9 * s) for st, lt in zip(short, long))
            if method == "euler":
                marginals[dtype] = marginal
            err = "" if method != "euler" else f"max|u - numpy| = {np.max(np.abs(sol.u[-1] - u_ref.T)):.1e}"
            table.add(f"substrate {method}, {s} steps/call", dtype, threads,
                      *(t / s for t in short), bound, err)
            table.add(f"substrate {method}, {10 * s} steps/call", dtype, threads,
                      *(t / (10 * s) for t in long), bound)
            table.add(f"substrate {method}, marginal step", dtype, threads, *marginal, bound,
                      f"per-call overhead ~ {(short[0] - s * marginal[0]) * 1e3:.2f} ms")

        t = timeit(lambda: numpy_euler(p, s), reps)
        table.add("numpy loop", dtype, threads, *(x / s for x in t), bound)

        if torch is not None:
            arrays = torch_arrays(p)
            err = np.max(np.abs(torch_euler(p, s, arrays) - u_ref))
            t = timeit(lambda: torch_euler(p, s, arrays), reps)
            table.add("torch loop", dtype, threads, *(x / s for x in t), bound, f"max|u - numpy| = {err:.1e}")
            if torchdiffeq is not None:
                field = TorchField(p, arrays)
                err = np.max(np.abs(torchdiffeq_euler(p, s, field) - u_ref))
                field.nfev = 0
                torchdiffeq_euler(p, s, field)
                n = field.nfev  # the steps torchdiffeq actually took
                t = timeit(lambda: torchdiffeq_euler(p, s, field), reps)
                table.add("torchdiffeq odeint euler", dtype, threads, *(x / n for x in t), bound,
                          f"{n} steps; max|u - numpy| = {err:.1e}")
    return bounds, marginals


def engine_kernel(table, name, dtype, threads, fn, check=None):
    """Call one of the engine's private kernels once; if that fails (its signature changed), add a
    skipped row with the reason and return None, else return ``check()`` (or True)."""
    try:
        fn()
    except Exception as exc:
        why = str(exc).strip().splitlines()
        table.skip(name, dtype, threads, f"{type(exc).__name__}: {why[0] if why else ''}"[:120])
        return None
    return check() if check is not None else True


def breakdown_table(args, threads, bounds, marginals, table):
    """Where a step's time goes. An engine Euler step (``_kernels.run``) is one ``weights_times``
    (W r, the two GEMMs) and one fused ``stage_pass`` (slope, update, blow-up check and the activation
    of the new state). The activation (``_kernels.activate``, the same row loops as in ``stage_pass``)
    and ``weights_times`` are timed alone on the benchmark's packed arrays; the rest of a step is the
    marginal Euler step of the main table minus the two."""
    reps = args.repeats
    for dtype in DTYPES:
        p = Problem(dtype, args.batch)
        bound = bounds[dtype]
        pk = substrate.VectorField(p.net, p.x).packed
        u = np.random.default_rng(3).normal(0.5, 1.0, p.drive.shape).astype(dtype)
        r = np.empty_like(u)
        ref = 1.0 / (1.0 + np.exp(2.0 - 4.0 * u.astype(np.float64)))

        def rel_err(a):
            return f"max rel. error vs f64 {np.max(np.abs(a - ref) / ref):.1e}"

        # --- the activation alone, (510, 64)
        name = "activation: engine (_kernels.activate)"
        act = None
        ok = engine_kernel(table, name, dtype, threads, lambda: K.activate(u, pk.layer_off, pk.layer_act, r),
                           lambda: rel_err(r))
        if ok is not None:
            act = timeit(lambda: K.activate(u, pk.layer_off, pk.layer_act, r), reps, 200)
            table.add(name, dtype, threads, *act, bound, ok)
        r_np = np.empty_like(u)

        def numpy_activation():
            np.multiply(u, -4, out=r_np)
            np.add(r_np, 2, out=r_np)
            np.exp(r_np, out=r_np)
            np.add(r_np, 1, out=r_np)
            np.reciprocal(r_np, out=r_np)
        t = timeit(numpy_activation, reps, 200)
        table.add("activation: numpy (5 passes)", dtype, threads, *t, bound, rel_err(r_np))
        if torch is not None:
            r_t = np.empty_like(u)
            tu, tz, tr = torch.from_numpy(u), torch.from_numpy(np.empty_like(u)), torch.from_numpy(r_t)

            def torch_activation():
                torch.mul(tu, 4, out=tz)
                tz.sub_(2)
                torch.sigmoid(tz, out=tr)
            t = timeit(torch_activation, reps, 200)
            table.add("activation: torch.sigmoid(4u - 2)", dtype, threads, *t, bound, rel_err(r_t))

        # --- the weight products, W r, on the activations of a typical state
        r = ref.astype(dtype)
        wr = np.empty_like(u)
        tmp = np.empty((max([1] + [int(v) for v in pk.conn[:, [2, 4]].ravel()]), u.shape[1]), p.dtype)
        n_h = p.n_h
        wr_ref = np.concatenate([p.B @ r[n_h:], p.W1 @ r[:n_h]])
        name = "engine weights_times (W r)"
        wt = None
        ok = engine_kernel(table, name, dtype, threads,
                           lambda: K.weights_times(r, pk.wbuf, pk.conn, pk.layer_off, tmp, wr),
                           lambda: f"np.dot in Numba (scipy BLAS); max|W r - numpy| = "
                                   f"{np.max(np.abs(wr - wr_ref)):.1e}")
        if ok is not None:
            wt = timeit(lambda: K.weights_times(r, pk.wbuf, pk.conn, pk.layer_off, tmp, wr), reps, 2000)
            table.add(name, dtype, threads, *wt, bound, ok)

        # --- the rest of a step
        name = "rest of a step: marginal - (W r + activation)"
        if act is None or wt is None:
            table.skip(name, dtype, threads, "needs both kernels above")
        else:
            m = marginals[dtype]
            rest = tuple(m[i] - wt[i] - act[i] for i in (0, 1))
            table.add(name, dtype, threads, *rest, bound,
                      f"update + check, loop; marginal step {m[0] * 1e6:.1f} / {m[1] * 1e6:.1f} us")


# ============================================================================================ compile time
_COMPILE_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np
import substrate
from substrate import _kernels as K
out = {"import": time.perf_counter() - t0}
x = np.zeros((2, 6))
for dtype in sys.argv[1].split(","):
    t0 = time.perf_counter()
    net = substrate.Network.layered([6, 5, 3], np.random.default_rng(0),
                                    dtype="float32" if dtype == "float32" else "float64")
    substrate.integrate(net, x, t_span=(0.0, 1.0), method="euler", dt=0.1, dtype=dtype)
    out[dtype] = time.perf_counter() - t0
out["cache_hits"] = sum(K.run.stats.cache_hits.values())
out["cache_misses"] = sum(K.run.stats.cache_misses.values())
assert os.path.abspath(substrate.__file__).startswith(os.getcwd()), substrate.__file__  # the snapshot
print(json.dumps(out))
"""


def compile_times(dtypes):
    """First-call times in a subprocess with an empty Numba cache, then again with that cache. The
    subprocesses import a snapshot of the package, so that an edit of the working tree between the two
    runs (which would invalidate Numba's cache) does not spoil the warm measurement."""
    work = Path(tempfile.mkdtemp(prefix="substrate-compile-"))
    shutil.copytree(ROOT / "substrate", work / "substrate", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(work / "numba-cache"))
    runs = []
    try:
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, ",".join(dtypes)], env=env,
                                  cwd=work, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"\ncompile-time run ({label}) failed:\n{proc.stderr.strip()}")
                return
            runs.append((label, wall, json.loads(proc.stdout.strip().splitlines()[-1])))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nFirst call: import substrate, then the first integrate (euler, tiny network) per dtype, in a fresh"
          "\nsubprocess; cold = empty NUMBA_CACHE_DIR, warm = the same directory again")
    head = f"{'cache':<6} {'process wall s':>14} {'import s':>9} " + " ".join(f"{d + ' s':>12}" for d in dtypes) \
        + "  run(): cache hits/misses"
    print(head)
    print("-" * len(head))
    for label, wall, r in runs:
        print(f"{label:<6} {wall:14.2f} {r['import']:9.2f} " + " ".join(f"{r[d]:12.2f}" for d in dtypes)
              + f"  {r['cache_hits']}/{r['cache_misses']}")
    print("(each dtype after the first compiles one more specialisation of the kernels)")
    warm = runs[-1][1]
    results.record("First call: import substrate, then the first integrate (euler, tiny network) per dtype, in a "
                   "fresh subprocess; cold = empty NUMBA_CACHE_DIR, warm = the same directory again",
                   ["cache", "process wall s", "import s", *(f"{d} s" for d in dtypes), "cache hits", "cache misses",
                    "wall ratio to warm"],
                   [(label, wall, r["import"], *(r[d] for d in dtypes), r["cache_hits"], r["cache_misses"], wall / warm)
                    for label, wall, r in runs], key="first call", baseline="the warm process")


def quickstart_time():
    exe = Path(sys.executable).with_name("substrate")
    probe = subprocess.run([str(exe), "quickstart", "--help"], capture_output=True, text=True) \
        if exe.exists() else None
    if probe is None or probe.returncode != 0:
        why = "no substrate script" if probe is None else (probe.stderr.strip().splitlines() or ["?"])[-1]
        print(f"\nquickstart: skipped, `{exe} quickstart --help` does not work ({why})")
        return
    out = tempfile.mkdtemp(prefix="qs_bench-")
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([str(exe), "quickstart", "--out", out], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"\nquickstart: `substrate quickstart --out DIR` took {wall:.1f} s wall (exit code {proc.returncode})")


# ============================================================================================ per call
def torch_step_of(net, x):
    """One Euler step of ``net`` (layered, logistic) in torch, as the reference loops take it."""
    ws = {c.name: torch.from_numpy(np.ascontiguousarray(net.effective_weight(c)))
          for c in net.connections if c.pre != "x"}
    sl = net.slices
    drive = torch.from_numpy(net.drive(x, None, net.dtype))
    u, r, f = torch.zeros_like(drive), torch.empty_like(drive), torch.empty_like(drive)
    (h, hs), (y, ys) = sl.items()

    def step():
        with torch.no_grad():
            torch.sigmoid(4 * u - 2, out=r)
            torch.addmm(drive[hs], ws[f"{y}->{h}"], r[ys], out=f[hs])
            torch.addmm(drive[ys], ws[f"{h}->{y}"], r[hs], out=f[ys])
            f.sub_(u)
            u.add_(f, alpha=DT / TAU)
    return step


def call_table(args, table):
    """The per-call overhead rows (see the module docstring); float64, the current thread count."""
    reps = args.repeats
    net = substrate.Network.layered([4, 8, 3], np.random.default_rng(0), tau=TAU)
    x = np.random.default_rng(1).random((1, 4))

    def integrate(steps, network=net, xx=x):
        return substrate.integrate(network, xx, t_span=(0.0, steps * DT), t_eval=[steps * DT], dt=DT,
                                   method="euler")
    # many short windows: on a shared machine their minimum is the least disturbed
    short = dict(repeats=40 * reps, number=50)
    one = timeit(lambda: integrate(1), **short)
    many = timeit(lambda: integrate(1001), reps, number=20)
    step = tuple((m - o) / 1000 for o, m in zip(one, many))
    over = tuple(o - s for o, s in zip(one, step))
    torch_step = None
    if torch is not None:
        torch_step = timeit(torch_step_of(net, x), **short)
        table.add("torch loop step, 4-8-3, batch 1", "float64", 1, *torch_step, torch_step)
    table.add("substrate marginal Euler step, 4-8-3", "float64", 1, *step, torch_step)
    table.add("integrate 1 step: call minus a step", "float64", 1, *over, torch_step)
    eq = substrate.relax(net, x, tol=1e-12)
    call = timeit(lambda: substrate.relax(net, x, u0=eq.u, tol=1e-6), **short)
    sol = substrate.relax(net, x, u0=eq.u, tol=1e-6)
    assert sol.steps == 0, sol.steps
    from substrate.integrators import stability
    ut = np.ascontiguousarray(sol.u.T)
    check = timeit(lambda: stability(sol.field, ut), 4 * reps, number=20)
    table.add("relax at its equilibrium (0 steps), whole call", "float64", 1, *call, torch_step,
              "the stability check remembered")
    table.add("  the stability check (paid once an equilibrium)", "float64", 1, *check, torch_step)

    big = substrate.Network.layered([784, 1024, 1024], np.random.default_rng(0), tau=TAU)
    xb = np.random.default_rng(1).random((256, 784))
    integrate(1, big, xb)
    n_reps = max(3, reps // 2)
    one = timeit(lambda: integrate(1, big, xb), n_reps)
    three = timeit(lambda: integrate(3, big, xb), n_reps)
    step = tuple((t - o) / 2 for o, t in zip(one, three))
    w = big.connection("h1->y").weight

    def edited():
        w[0, 0] += 1e-3  # in place: the cache must notice and repack (and recompute the drive)
        return integrate(1, big, xb)
    miss = timeit(edited, n_reps)
    table.add("n=2048 b=256: marginal Euler step", "float64", 1, *step, step)
    table.add("n=2048 b=256: 1-step call minus a step", "float64", 1, *(o - s for o, s in zip(one, step)), step,
              "ratio = fraction of a step")
    table.add("  the same after an in-place weight edit", "float64", 1, *(m - s for m, s in zip(miss, step)), step,
              "repacked: weights and V x + b")


# ============================================================================================ main
def describe_machine():
    import numba
    print(f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
          f"torch {torch.__version__ if torch else '-'}, torchdiffeq {getattr(torchdiffeq, '__version__', '-')}")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else "?"
    print(f"cpu: {cpu}, {os.cpu_count()} logical cores; load average {' '.join(load)}")
    if load != "?" and float(load[0]) > 0.5:
        print("NOTE: the machine is busy (load average above 0.5): expect noisy medians; minima are more reliable")


def describe_threads():
    if threadpool_info is None:
        env = {v: os.environ.get(v, "unset") for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
        print(f"threads: threadpoolctl not installed, BLAS threads not pinned; {env}")
    else:
        for lib in threadpool_info():
            path = lib["filepath"]
            owner = ("numpy's (np.dot, the GEMM bound and numpy loop)" if "numpy" in path else
                     "scipy's (np.dot inside Numba: the engine)" if "scipy" in path else
                     "torch's" if "torch" in path else "")
            print(f"  {lib['user_api']:<7} {lib['internal_api']:<9} {lib.get('version') or '':<12} "
                  f"threads={lib['num_threads']}  {Path(path).name}  {owner}")
    if torch is not None:
        print(f"  torch   intra-op threads={torch.get_num_threads()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="Euler steps per call (default 100; also 10x that)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--repeats", type=int, default=7, help="timings per measurement (default 7)")
    ap.add_argument("--threads", default="1,2", help="comma-separated BLAS/torch thread counts (default 1,2)")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the per-part timings")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compile-time runs")
    ap.add_argument("--no-calls", dest="calls", action="store_false", help="skip the per-call overhead rows")
    ap.add_argument("--only-calls", action="store_true", help="only the per-call overhead rows (one thread)")
    ap.add_argument("--compile-dtypes", default="float64,float32,complex128",
                    help="dtypes whose first call is timed (default float64,float32,complex128)")
    ap.add_argument("--quickstart", action="store_true", help="also time `substrate quickstart`")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]

    print(__doc__[:__doc__.index("What is timed")].strip())
    describe_machine()
    # load scipy's BLAS (what np.dot in Numba calls) so that threadpoolctl sees and limits it
    Problem("float64", args.batch).substrate(args.steps)
    t_start = time.perf_counter()
    table = Table()
    if args.calls:
        limits = threadpool_limits(limits=1) if threadpool_limits else None
        if torch is not None:
            torch.set_num_threads(1)
        try:
            call_table(args, table)
            table.print("Per call, 1 thread: time per call; ratio to the torch loop step (tiny network) or to a "
                        "marginal step (n = 2048)")
        finally:
            if limits is not None:
                limits.restore_original_limits()
    if args.only_calls:
        threads, args.compile = [], False
    for n in threads:
        limits = threadpool_limits(limits=n) if threadpool_limits else None
        if torch is not None:
            torch.set_num_threads(n)
        try:
            print(f"\n==== {n} thread(s) ====")
            describe_threads()
            bounds, marginals = step_table(args, n, table)
            table.print(f"Per step: batch {args.batch}, sizes {SIZES}, dt {DT}; ratio = time / GEMM bound "
                        "(min/min, median/median)", key=f"per step, {n} thread{'s' if n > 1 else ''}")
            if args.breakdown:
                try:
                    breakdown_table(args, n, bounds, marginals, table)
                except Exception as exc:  # it calls the engine's internal kernels, which may change
                    table.rows = []
                    print(f"\nbreakdown skipped: {type(exc).__name__}: {exc}")
                else:
                    table.print("Breakdown: parts of one step (time per call = per step); ratio to the GEMM bound",
                                key=f"breakdown, {n} thread{'s' if n > 1 else ''}")
        finally:
            if limits is not None:
                limits.restore_original_limits()
    if args.compile:
        compile_times(args.compile_dtypes.split(","))
    if args.quickstart:
        quickstart_time()
    print(f"\n(benchmark took {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
