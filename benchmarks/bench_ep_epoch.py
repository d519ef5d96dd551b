"""Seconds per training epoch of equilibrium propagation on Fashion-MNIST, against the GEMM bound.

The problem (the issue's performance item): Laborieux & Zenke's MLP 784-256-256-10, logistic
activations, tied (symmetric) feedback, a cross-entropy readout 256 -> 10
(``models.train.Classifier.layered([784, 256, 256, 10], rng, cost="cross_entropy", activation="logistic",
feedback="tied", dtype=...)``), batch 50, SGD(0.01, momentum 0.9), phases integrated by explicit Euler
at dt = tau = 1: ``ep.Relaxation(method="euler", dt=1.0, tol=TOL, max_steps=150, nudged_max_steps=20,
on_failure="record")``, i.e. at most T1 = 150 free steps and T2 = 20 steps per nudged phase. One
training step is ``models.train.EPRule(estimator).estimate(model, x, y_onehot, relaxation)`` followed by
``optimiser.step(model.parameters(), named_gradients(estimate))``: what ``models.train.train`` does with an
EP rule, keeping the estimate for its phases' step counts.

Rows (rule, dtype, policy): ``ep.Centred(0.2)`` in float32 and float64 (two real nudged phases,
beta = +-0.2) and ``ep.Holomorphic(4, 0.2)`` in float64 (three nudged phases: beta = 0.2 and -0.2 in
float64, beta = 0.2i in complex128; no float32 row, its complex phase needs complex128 states), each
under two step policies, and ``hol-promoted``: the holomorphic row with the weights promoted to complex128
for its complex phase (``PromotedWeights``), how the engine ran it before it kept the weights real, under
the fixed policy only:

* ``fixed``: the published schedule, every phase runs its full step count (T1 = 150, T2 = 20). This is
  done with tol = 1e-30, so that the convergence test max|F| <= tol never stops a phase early; the
  script checks that every phase did take its full count.
* ``early``: tol = 1e-4, a phase stops as soon as max|F| <= 1e-4. The step counts then depend on the
  training progress (near initialisation phases converge fast), so the mean steps actually taken per
  batch are reported next to the time.

What is timed, with BLAS pinned to ``--threads`` threads (default 1; numpy's and scipy's OpenBLAS, the
engine's ``np.dot`` inside Numba calls scipy's): ``--batches`` consecutive shuffled minibatches of
Fashion-MNIST's training set (default 30), after 3 warm-up minibatches that are not timed (Numba
compilation and cache loading excluded), extrapolated to an epoch of 1200 minibatches (60,000 images);
then, separately, the test evaluation: the free phase (and readout argmax) on ``--test-chunks`` chunks
of 1000 test images (default 2), scaled to the 10,000 test images. If Fashion-MNIST is not installed,
random data of the same shape are used and the output says so.

``GEMM bound``: the matrix products a batch must do, numpy ``np.dot`` into preallocated outputs, same
dtype and threads, measured in this run. Per step, W21 (256x256) @ r1 (256x50) and W21^T @ r2 (two
256x256x50 GEMMs); a nudged step adds the readout's teaching current, W_o (10x256) @ r2 and
W_o^T @ (softmax - y) (tiny); a step of a complex nudged phase (holomorphic, beta = 0.2i) does these
products with the real weights on the complex states' real views, (rows, 2 x batch): real GEMMs twice as
wide. Per batch, once: the input drive V (256x784) @ x (784x50). The bound of a
batch is the sum over its phases of (steps taken) x (product time per step, real or complex), plus the
drive; ``ratio`` = measured time per batch / bound. Not in the bound (printed below the table for
reference): the weight-gradient outer products of the update (dV = v1 x^T, dW21 = v2 r1^T, readout),
the activations, the SGD update. The engine computes the drive V x + b once per batch, as the bound
counts it (kept on the network while its parameters and the inputs are unchanged; the complex phase
takes the real phases' drive and packed weights).

The machine may be shared: the load average is printed at the start and at the end; ``--repeat``
repeats the whole measurement (fresh model, same seeds, so the same steps) and reports each row's
minimum.

Run:  .venv/bin/python benchmarks/bench_ep_epoch.py      (about 30 s on 2 cores)
      .venv/bin/python benchmarks/bench_ep_epoch.py --only centred/float64 --batches 10   # quick look
Options: ``--batches`` (30), ``--repeat`` (1), ``--only`` (comma-separated substrings of the row names
``rule/dtype/policy``, e.g. ``holomorphic`` or ``float32/early``), ``--test-chunks`` (2), ``--threads``
(1), ``--gemm-repeats`` (200).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import results  # noqa: E402  (benchmarks/results.py, beside this script)
from models import ep  # noqa: E402
from models.data import Dataset, fashion_mnist, minibatches, one_hot  # noqa: E402
from models.train import SGD, Classifier, EPRule, named_gradients  # noqa: E402
from substrate import Network  # noqa: E402

try:
    from threadpoolctl import threadpool_info, threadpool_limits
except ImportError:
    threadpool_info = threadpool_limits = None

SIZES = [784, 256, 256, 10]
BATCH = 50
T1, T2 = 150, 20                     # free and nudged step budgets
EPOCH_BATCHES = 60_000 // BATCH      # 1200
N_TEST, TEST_CHUNK = 10_000, 1000
WARMUP = 3
POLICIES = {"fixed": 1e-30, "early": 1e-4}
RULES = {"centred": lambda: ep.Centred(0.2), "holomorphic": lambda: ep.Holomorphic(4, 0.2),
         "hol-promoted": lambda: ep.Holomorphic(4, 0.2)}  # with PromotedWeights: the old complex path
ROWS = [(rule, dtype, policy)
        for rule, dtype in (("centred", "float32"), ("centred", "float64"), ("holomorphic", "float64"))
        for policy in POLICIES] + [("hol-promoted", "float64", "fixed")]


def relaxation(policy):
    return ep.Relaxation(method="euler", dt=1.0, tol=POLICIES[policy], max_steps=T1, nudged_max_steps=T2,
                         on_failure="record")


# ============================================================================================ data
def load_data(n_train, n_test):
    """(Dataset, note): Fashion-MNIST, or random data of the same shape when it is not installed."""
    try:
        return fashion_mnist(), "Fashion-MNIST"
    except FileNotFoundError as err:
        rng = np.random.default_rng(0)
        data = Dataset("random", rng.random((n_train, SIZES[0])), rng.integers(0, 10, n_train),
                       rng.random((n_test, SIZES[0])), rng.integers(0, 10, n_test), 10, (28, 28))
        return data, f"RANDOM DATA of Fashion-MNIST's shape ({err})"


# ============================================================================================ timing
def timeit(fn, repeats, number):
    """Minimum seconds per call of fn() over ``repeats`` timings of ``number`` calls, after one warm-up.
    The blocks are kept short (a few ms) so that on a busy machine some of them run undisturbed."""
    fn()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def gemm_times(dtype, repeats):
    """The products of the GEMM bound in one dtype, seconds per call: {free step, nudged step, complex
    nudged step, drive, weight gradients (not in the bound)}."""
    n_in, n_h, n_y, n_c = SIZES
    rng = np.random.default_rng(2)

    def arr(*shape, dt=dtype):
        a = rng.uniform(-0.1, 0.1, shape)
        if np.dtype(dt).kind == "c":
            a = a + 1j * rng.uniform(-0.1, 0.1, shape)
        return np.ascontiguousarray(a, dtype=dt)

    def step_products(dt):
        # complex states meet the real weights as real (rows, 2 batch) views: real GEMMs, twice as wide
        W, Wo = arr(n_y, n_h), arr(n_c, n_y)
        r1, r2, f1, f2 = (arr(n, BATCH, dt=dt).view(dtype) for n in (n_h, n_y, n_h, n_y))
        z, t = arr(n_c, BATCH, dt=dt).view(dtype), arr(n_y, BATCH, dt=dt).view(dtype)

        def free():
            np.dot(W, r1, out=f2)          # W21 r1 into layer y
            np.dot(W.T, r2, out=f1)        # B12 r2 = W21^T r2 into layer h1 (tied)

        def nudged():
            free()
            np.dot(Wo, r2, out=z)          # readout logits
            np.dot(Wo.T, z, out=t)         # W_o^T (softmax - y): the teaching current
        return free, nudged

    free, nudged = step_products(dtype)
    V, x, d = arr(n_h, n_in), arr(n_in, BATCH), arr(n_h, BATCH)
    v1, v2, r1, r2 = arr(n_h, BATCH), arr(n_y, BATCH), arr(n_h, BATCH), arr(n_y, BATCH)
    e, gV, gW, gO = arr(n_c, BATCH), arr(n_h, n_in), arr(n_y, n_h), arr(n_c, n_y)

    def grads():
        np.dot(v1, x.T, out=gV)
        np.dot(v2, r1.T, out=gW)
        np.dot(e, r2.T, out=gO)
    complex_step = {}
    if dtype == "float64":  # only float64 networks run complex128 phases
        complex_step["nudged_complex"] = timeit(step_products(np.complex128)[1], repeats, 5)
    return {"free": timeit(free, repeats, 10), "nudged": timeit(nudged, repeats, 10), **complex_step,
            "drive": timeit(lambda: np.dot(V, x, out=d), repeats, 5), "grads": timeit(grads, repeats, 3)}


# ============================================================================================ one row
def measure(row, data, args):
    """Train ``--batches`` minibatches (after WARMUP untimed ones) and evaluate ``--test-chunks`` test
    chunks; returns the times and the steps taken."""
    rule_name, dtype, policy = row
    model = Classifier.layered(SIZES, np.random.default_rng(0), cost="cross_entropy", activation="logistic",
                               feedback="tied", dtype=dtype)
    if rule_name == "hol-promoted":
        net = model.network
        model = Classifier(PromotedWeights(net.layers, net.connections, net.inputs), model.cost)
    rule, rel = EPRule(RULES[rule_name]()), relaxation(policy)
    opt, params = SGD(0.01, 0.9), model.parameters()
    order = minibatches(len(data.x_train), BATCH, np.random.default_rng(1))[:WARMUP + args.batches]

    def train_step(idx):
        # the estimate itself (a rule's Step keeps only its gradients): the phases' steps are timed below
        est = rule.estimate(model, data.x_train[idx], one_hot(data.y_train[idx], model.classes), rel)
        opt.step(params, named_gradients(est))
        return est

    for idx in order[:WARMUP]:
        train_step(idx)
    phases = []   # per timed batch: (free steps, [(nudged steps, complex?), ...])
    t0 = time.perf_counter()
    for idx in order[WARMUP:]:
        est = train_step(idx)
        phases.append((est.free.steps, [(s.steps, s.u.dtype.kind == "c") for s in est.nudged]))
    per_batch = (time.perf_counter() - t0) / len(order[WARMUP:])

    test_steps = []
    t0 = time.perf_counter()
    for i in range(args.test_chunks):
        xb = data.x_test[i * TEST_CHUNK:(i + 1) * TEST_CHUNK]
        free = ep.free_phase(model.network, xb, rel)
        np.argmax(model.output(free.u), axis=1)
        test_steps.append(free.steps)
    test = (time.perf_counter() - t0) * N_TEST / (args.test_chunks * TEST_CHUNK)
    return per_batch, test, phases, test_steps


def bound_per_batch(phases, g):
    """Mean over the timed batches of the GEMM bound of each batch's phases, seconds."""
    total = 0.0
    for free_steps, nudged in phases:
        total += g["drive"] + free_steps * g["free"]
        total += sum(s * (g["nudged_complex"] if cplx else g["nudged"]) for s, cplx in nudged)
    return total / len(phases)


# ============================================================================================ the complex step
class PromotedWeights(Network):
    """The same circuit with its weights promoted to the states' dtype when packed: how complex phases
    ran before the engine kept the weights real (a zgemm per product), for comparison."""

    def pack(self, dtype):
        p = super().pack(dtype)
        return dataclasses.replace(p, wbuf=p.wbuf.astype(dtype))


def step_costs(data, args):
    """Seconds per step of one nudged phase of the float64 model after its free phase (T1 steps) on
    the first training batch: real (beta = 0.2), complex (beta = 0.2i, real weights) and complex with
    the weights promoted. A step is the slope between phases of T2 and 11 T2 steps (tol = 1e-30, the
    same path as the ``fixed`` rows: ``relax`` with a teaching current), which removes the per-call
    cost; the minimum over ``--step-repeats``. The parts of a step are the engine's kernels timed
    alone on the phase's own arrays: the weight products (``weights_times``), the activation
    (``activate``, inside the fused stage pass of a step) and the teaching current (``teach``)."""
    from substrate import Nudge, VectorField
    from substrate import _kernels as K

    model = Classifier.layered(SIZES, np.random.default_rng(0), cost="cross_entropy", activation="logistic",
                               feedback="tied", dtype="float64")
    net = model.network
    promoted = PromotedWeights(net.layers, net.connections, net.inputs)
    x, y = data.x_train[:BATCH], one_hot(data.y_train[:BATCH], model.classes)
    free = ep.free_phase(net, x, relaxation("fixed"))

    def phase(network, beta, steps):
        rel = dataclasses.replace(relaxation("fixed"), nudged_max_steps=steps)
        dtype = np.complex128 if isinstance(beta, complex) else None
        return rel.run(network, x, u0=free.u, nudge=Nudge(model.cost, beta, y), dtype=dtype, nudged=True)

    def per_step(network, beta):
        assert phase(network, beta, T2).steps == T2
        short = timeit(lambda: phase(network, beta, T2), args.step_repeats, 1)
        long = timeit(lambda: phase(network, beta, 11 * T2), args.step_repeats, 1)
        return (long - short) / (10 * T2)

    steps = {"real": per_step(net, 0.2), "complex": per_step(net, 0.2j), "promoted": per_step(promoted, 0.2j)}
    parts = {}
    for kind, network, beta in (("real", net, 0.2), ("complex", net, 0.2j), ("promoted", promoted, 0.2j)):
        dtype = np.complex128 if isinstance(beta, complex) else np.float64
        p = VectorField(network, x, dtype=dtype).packed
        u = phase(network, beta, T2).u.T.copy()
        r, out = np.empty_like(u), np.empty_like(u)
        tmp = np.empty((max(int(v) for v in p.conn[:, [2, 4]].ravel()), BATCH), dtype)
        nudge = Nudge(model.cost, beta, y).kernel_args(network, np.dtype(dtype), BATCH)
        K.activate(u, p.layer_off, p.layer_act, r)
        parts[kind] = {
            "products": timeit(lambda: K.weights_times(r, p.wbuf, p.conn, p.layer_off, tmp, out), args.step_repeats, 20),
            "activation": timeit(lambda: K.activate(u, p.layer_off, p.layer_act, r), args.step_repeats, 20),
            "teaching current": timeit(lambda: K.teach(nudge, r, out), args.step_repeats, 20)}
    return steps, parts


def print_step_costs(steps, parts):
    real = steps["real"]
    print(f"\nOne nudged step of the float64 model, batch {BATCH} (slope between {T2} and {11 * T2} steps; min of "
          "the repeats), and its parts timed alone; ratio = time / the real nudged step (or the same part of it)")
    head = f"{'step / part':<36} {'real us':>9} {'complex us':>11} {'ratio':>6} {'promoted us':>12} {'ratio':>6}  share of complex"
    print(head)
    print("-" * len(head))
    c = steps["complex"]
    print(f"{'nudged step (marginal)':<36} {real * 1e6:9.1f} {c * 1e6:11.1f} {c / real:6.2f} "
          f"{steps['promoted'] * 1e6:12.1f} {steps['promoted'] / real:6.2f}")
    rest = {k: steps[k] - sum(parts[k].values()) for k in steps}
    table = [("nudged step (marginal)", real * 1e6, c * 1e6, c / real, steps["promoted"] * 1e6,
              steps["promoted"] / real, None)]
    for name in list(parts["real"]) + ["rest (update, residual, loop)"]:
        r, cp, pp = ((parts[k].get(name, rest[k])) for k in ("real", "complex", "promoted"))
        print(f"{'  ' + name:<36} {r * 1e6:9.1f} {cp * 1e6:11.1f} {cp / r:6.2f} {pp * 1e6:12.1f} {pp / r:6.2f}  "
              f"{cp / c:6.1%}")
        table.append((name, r * 1e6, cp * 1e6, cp / r, pp * 1e6, pp / r, cp / c))
    results.record(f"One nudged step of the float64 EP model, batch {BATCH}, real (beta 0.2), complex (beta 0.2i, "
                   "real weights) and with the weights promoted to complex128; ratio to the real step (or its part)",
                   ["step / part", "real us", "complex us", "complex ratio", "promoted us", "promoted ratio",
                    "share of complex"], table, key="ep_step", baseline="the real nudged step, same part")
    print("complex: real weights, the complex state's real view (the engine); promoted: the weights copied to "
          "complex128 (zgemm), as before")


# ============================================================================================ output
def describe_machine(load):
    import numba
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}")
    print(f"cpu: {cpu}, {os.cpu_count()} logical cores; load average at start "
          f"{' '.join(f'{v:.2f}' for v in load)}")
    if load[0] > 0.5:
        print(f"NOTE: the machine is busy (1-minute load {load[0]:.2f} on {os.cpu_count()} cores: another long "
              "job is running), so these times are noisy; each is the minimum over --repeat measurements")


def describe_threads():
    if threadpool_info is None:
        print("threads: threadpoolctl not installed, BLAS threads NOT pinned")
        return
    for lib in threadpool_info():
        path = lib["filepath"]
        owner = ("numpy's (the GEMM bound)" if "numpy" in path else
                 "scipy's (np.dot inside Numba: the engine)" if "scipy" in path else "")
        print(f"  {lib['user_api']:<5} {lib['internal_api']:<9} {lib.get('version') or '':<12} "
              f"threads={lib['num_threads']}  {Path(path).name}  {owner}")


def print_table(rows, measured, bounds):
    head = (f"{'rule':<12} {'dtype':<8} {'policy':<6} {'ms/batch':>9} {'steps free / nudged':>25} "
            f"{'s/epoch':>8} {'s test':>7} {'test free steps':>15} {'GEMM ms/batch':>13} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    notes, table = [], []
    for row in rows:
        per_batch, test, phases, test_steps = measured[row]
        rule, dtype, policy = row
        free = np.mean([p[0] for p in phases])
        nudged = [s for p in phases for s in p[1]]
        n_phases = len(phases[0][1])
        n_complex = sum(c for _, c in phases[0][1])
        steps = (f"{free:6.1f} / {n_phases}x{np.mean([s for s, _ in nudged]):.1f}"
                 + (f" ({n_complex} cplx)" if n_complex else ""))
        bound = bound_per_batch(phases, bounds[dtype])
        print(f"{rule:<12} {dtype:<8} {policy:<6} {per_batch * 1e3:9.1f} {steps:>25} "
              f"{per_batch * EPOCH_BATCHES:8.1f} {test:7.1f} {np.mean(test_steps):15.1f} "
              f"{bound * 1e3:13.2f} {per_batch / bound:6.1f}")
        centred = measured.get(("centred", "float64", policy))
        table.append((rule, dtype, policy, per_batch * 1e3, free, n_phases, np.mean([s for s, _ in nudged]), n_complex,
                      per_batch * EPOCH_BATCHES, test, np.mean(test_steps), bound * 1e3, per_batch / bound,
                      per_batch / centred[0] if centred and dtype == "float64" else None))
        if policy == "fixed":
            short = sum(p[0] != T1 for p in phases) + sum(s != T2 for p in phases for s, _ in p[1]) \
                + sum(s != T1 for s in test_steps)
            if short:
                notes.append(f"{'/'.join(row)}: {short} phases stopped before their full step count")
    for note in notes:
        print("WARNING " + note)
    for rule in ("holomorphic", "hol-promoted"):
        for policy in POLICIES:
            pair = [(rule, "float64", policy), ("centred", "float64", policy)]
            if all(r in measured for r in pair):
                print(f"{rule} / centred, float64, {policy}: {measured[pair[0]][0] / measured[pair[1]][0]:.2f} "
                      "(time per training batch, same run)")
    results.record(f"EP training on Fashion-MNIST, 784-256-256-10, batch {BATCH}, T1 = {T1}, T2 = {T2}: per training "
                   "batch; ratio to the GEMM bound of the batch's phases and to centred float64 under the same policy",
                   ["rule", "dtype", "policy", "ms per batch", "free steps", "nudged phases", "nudged steps",
                    "complex phases", "s per epoch", "s test", "test free steps", "GEMM ms per batch",
                    "ratio to GEMM bound", "ratio to centred float64"], table, key="ep_epoch",
                   baseline="GEMM bound of the same phases; centred float64, same policy")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=30, help="timed minibatches per row (default 30)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="repeat the whole measurement, report each row's minimum (default 1)")
    ap.add_argument("--only", default="", help="comma-separated substrings of the row names rule/dtype/policy "
                                               f"({', '.join('/'.join(r) for r in ROWS)})")
    ap.add_argument("--test-chunks", type=int, default=2,
                    help=f"test chunks of {TEST_CHUNK} images timed, scaled to {N_TEST} (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    ap.add_argument("--gemm-repeats", type=int, default=200,
                    help="timings (blocks of a few ms) of each GEMM-bound product; the minimum is used (default 200)")
    ap.add_argument("--step-repeats", type=int, default=7,
                    help="timings of each nudged-step measurement (real/complex step table); 0 skips it (default 7)")
    args = ap.parse_args(argv)
    if args.batches < 1 or args.repeat < 1 or args.step_repeats < 0 or not 1 <= args.test_chunks <= N_TEST // TEST_CHUNK:
        ap.error("--batches and --repeat must be >= 1, --step-repeats >= 0, --test-chunks in 1..10")
    wanted = [s for s in args.only.split(",") if s]
    rows = [r for r in ROWS if not wanted or any(w in "/".join(r) for w in wanted)]
    if not rows:
        ap.error(f"--only {args.only!r} matches no row of {', '.join('/'.join(r) for r in ROWS)}")

    print(__doc__.split("\n\n")[0])
    describe_machine(os.getloadavg())
    t_start = time.perf_counter()
    data, source = load_data((WARMUP + args.batches) * BATCH, args.test_chunks * TEST_CHUNK)
    print(f"data: {source}")
    import scipy.linalg  # noqa: F401  loads scipy's BLAS (the engine's) so that threadpoolctl sees and pins it
    limits = threadpool_limits(limits=args.threads) if threadpool_limits else None
    try:
        print(f"BLAS pinned to {args.threads} thread(s):")
        describe_threads()
        bounds = {dt: gemm_times(dt, args.gemm_repeats) for dt in sorted({r[1] for r in rows})}
        measured = {}
        for rep in range(args.repeat):
            for row in rows:
                res = measure(row, data, args)
                if row in measured:
                    best = measured[row]
                    res = (min(best[0], res[0]), min(best[1], res[1]), res[2], res[3])
                measured[row] = res
                print(f"  [{rep + 1}/{args.repeat}] {'/'.join(row)}: {res[0] * 1e3:.1f} ms/batch", flush=True)
        steps = step_costs(data, args) if args.step_repeats > 0 else None
    finally:
        if limits is not None:
            limits.restore_original_limits()

    print(f"\nPer training batch of {BATCH} (min of {args.repeat} measurement(s) of {args.batches} consecutive "
          f"batches after {WARMUP} warm-up ones), T1 = {T1}, T2 = {T2}, Euler dt = tau = 1; "
          f"fixed: tol = 1e-30 (every phase runs its full count), early: tol = 1e-4")
    print_table(rows, measured, bounds)
    print(f"""
steps: mean per batch, free phase / (nudged phases) x (mean steps per nudged phase); cplx = complex128 phases
s/epoch: ms/batch x {EPOCH_BATCHES} batches (60,000 images), training only; s test: free phase on
  {args.test_chunks} x {TEST_CHUNK} test images scaled to {N_TEST} (evaluated after the timed batches)
ratio: ms/batch / GEMM bound; early-stop step counts are those of training batches {WARMUP + 1}..{WARMUP + args.batches}
  from initialisation; later in training the phases may take a different number of steps, so s/epoch (early)
  describes this stage of training only""")
    print("\nGEMM bound parts, microseconds per call (np.dot into preallocated outputs):")
    for dt, g in bounds.items():
        cplx = any(r[0] == "holomorphic" and r[1] == dt for r in rows)
        print(f"  {dt}: free step {g['free'] * 1e6:.1f}, nudged step {g['nudged'] * 1e6:.1f}, "
              + (f"complex128 nudged step {g['nudged_complex'] * 1e6:.1f}, " if cplx else "")
              + f"drive V x {g['drive'] * 1e6:.1f}; not in the bound: weight-gradient products "
              f"(dV, dW21, readout) {g['grads'] * 1e6:.1f} per batch")
    if steps is not None:
        print_step_costs(*steps)
    print(f"\nload average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"benchmark took {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
