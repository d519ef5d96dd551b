"""Regenerate the README's performance block from the benches' results files (``benchmarks/results.py``).

The block lies between the markers ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` of README.md;
everything else is left as it is. Each table of :data:`TABLES` found in ``benchmarks/results/`` becomes
a markdown table under a line saying where and when it was measured (CPU, load average, the GEMM
bound of the same run); a table not measured yet is left out with a note.

    .venv/bin/python benchmarks/readme_table.py            # rewrite README.md (make bench runs it)
    .venv/bin/python benchmarks/readme_table.py --check    # exit 1 if README.md is not up to date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# (bench, table key, caption, [(column, header, format)]): the caption says what is measured and the
# baseline of the table's ratios, measured in the same run as the table.
S, F1, F2, G = "{}", "{:.1f}", "{:.2f}", "{:.1e}"
TABLES = [
    ("bench_step", "per step, 1 thread",
     ("Per Euler step (`benchmarks/bench_step.py`): the 784-500-10 network, independent feedback, batch 64, dt = "
      "0.1, one BLAS thread, minimum of 7 repeats; ratio to the GEMM bound of the same run (the step's two matrix "
      "products, `np.dot` into preallocated outputs, the first row of each dtype)"),
     [("method", "method", S), ("dtype", "dtype", S), ("min us", "us per step", F1), ("ratio", "ratio", F2)]),
    ("bench_step", "breakdown, 1 thread",
     ("The parts of one step (`benchmarks/bench_step.py`), each timed alone on the step's arrays; ratio to the "
      "GEMM bound of the same run"),
     [("method", "part", S), ("dtype", "dtype", S), ("min us", "us", F1), ("ratio", "ratio", F2)]),
    ("bench_activations", "activations",
     ("Activations (`benchmarks/bench_activations.py`, 256 x 256 values, minimum of 15 round-robin repeats): "
      "rho and rho' by the engine's kernels and NumPy's loop of the same formula; ratios to `np.exp`, `np.tanh` "
      "and NumPy's loop of the same dtype, same run"),
     [("dtype", "dtype", S), ("case", "case", S), ("ns per value", "ns per value", F2),
      ("ratio to np.exp", "/ np.exp", F2), ("ratio to np.tanh", "/ np.tanh", F2),
      ("ratio to numpy", "/ numpy loop", F2)]),
    ("bench_gradient", "gradient",
     ("Gradient through the dynamics (`benchmarks/bench_gradient.py`): the per-step problem, loss on the final "
      "state, all parameters, 100 Euler steps, forward and gradient per call, minimum of 7; ratios to 100 x the "
      "bound of a forward + gradient step (six products and one activation pass), to that plus the input "
      "products, and to substrate's discrete adjoint (checkpoints=None), all of the same run"),
     [("method", "method", S), ("min ms", "ms per call", F2), ("ratio to bound", "/ bound", F2),
      ("ratio to bound + inputs", "/ bound + inputs", F2),
      ("ratio to substrate discrete adjoint euler, checkpoints=None", "/ substrate discrete adjoint", F2)]),
    ("bench_gradient", "gradient_tanh",
     ("The tanh problem (`benchmarks/bench_gradient.py`: 784 dynamic tanh units + 500 + 10, nine products a "
      "step, 100 Euler steps): ratios to 100 x its step's bound and to substrate, same run; tanh share = the "
      "activation passes' part of substrate's time"),
     [("method", "method", S), ("min ms", "ms per call", F1), ("ratio to bound", "/ bound", F2),
      ("ratio to substrate", "/ substrate", F2), ("tanh share", "tanh share", F2)]),
    ("bench_gradient", "gradient_memory",
     ("Peak memory of a gradient (`benchmarks/bench_gradient.py`), each run in its own process: the process's "
      "peak RSS and the call's own peak above the memory in use before it; ratios to the same variant at T = 100"),
     [("variant", "variant", S), ("T", "T", S), ("peak MB", "peak MB", F1), ("call MB", "call MB", F1),
      ("call / T0", "call / T0", F2), ("kB per step", "kB per step", F1), ("note", "note", S)]),
    ("bench_implicit", "implicit",
     ("Implicit gradient at the equilibrium (`benchmarks/bench_implicit.py`), relaxation included; ratio to one "
      "relaxation (exp_euler, tol 1e-8) of the same problem, same run, round robin; products = J^T products of "
      "the solve, rel diff = against direct (else Krylov; warm rows: the cold start on the changed network)"),
     [("problem", "problem", S), ("case", "case", S), ("min ms", "ms", F2), ("ratio to relax", "/ relax", F2),
      ("products", "products", S), ("rel diff", "rel diff", G)]),
    ("bench_ep_epoch", "ep_epoch",
     ("EP training on Fashion-MNIST (`benchmarks/bench_ep_epoch.py`: 784-256-256-10, batch 50, T1 = 150, T2 = 20, "
      "one BLAS thread, 30 timed batches): ratios to the GEMM bound of the batch's phases and to centred float64 "
      "under the same policy, same run; fixed = every phase its full count, early = tol 1e-4"),
     [("rule", "rule", S), ("dtype", "dtype", S), ("policy", "policy", S), ("ms per batch", "ms per batch", F1),
      ("free steps", "free steps", F1), ("nudged steps", "steps per nudged phase", F1),
      ("s per epoch", "s per epoch", F1), ("ratio to GEMM bound", "/ GEMM bound", F2),
      ("ratio to centred float64", "/ centred float64", F2)]),
    ("bench_ep_epoch", "ep_step",
     ("Complex phases (`benchmarks/bench_ep_epoch.py`): one nudged step of the float64 model, real (beta = 0.2), "
      "complex (beta = 0.2i, real weights on the complex state's real view) and with the weights promoted to "
      "complex128; the parts timed alone; ratios to the real step (or the same part), same run"),
     [("step / part", "step / part", S), ("real us", "real us", F1), ("complex us", "complex us", F1),
      ("complex ratio", "complex / real", F2), ("promoted us", "promoted us", F1),
      ("promoted ratio", "promoted / real", F2)]),
    ("bench_step", "per call, 1 thread",
     ("Per call (`benchmarks/bench_step.py`, one thread): the Python of a call beyond its steps; ratio to a torch "
      "loop step of the same tiny network, or (n = 2048) to a marginal step, same run"),
     [("method", "method", S), ("min us", "us", F1), ("ratio", "ratio", F2), ("note", "note", S)]),
    ("bench_devices", "devices",
     ("Device effects per Euler step (`benchmarks/bench_devices.py`), ratio to the network without a device in "
      "the same run"),
     [("case", "case", S), ("marginal step us", "marginal step (us)", F1), ("ratio", "ratio", F2)]),
    ("bench_devices", "draws",
     "One step's normal draws (510 x 64) in the same run, ratio to `np.exp` of as many values",
     [("draws", "draws", S), ("us per step", "us per step", F1), ("ratio to np.exp", "ratio to np.exp", F2),
      ("ratio to the no-device step", "of the no-device step", F2)]),
    ("bench_er", "er",
     ("PV-RNN error regression (`benchmarks/bench_er.py`: layers 40/20, window 10, 50 iterations, batch 1, one "
      "thread): time per ER step; ratio to substrate's compiled step, same run"),
     [("implementation", "implementation", S), ("ms per ER step", "ms per ER step", F2),
      ("ratio to substrate", "ratio", F1)]),
    ("bench_dpm_memory", "dpm_memory",
     ("Diffusion model sample gradient (`benchmarks/bench_dpm_memory.py`: 2-D noise predictor, batch 1024, RK4, "
      "each measurement in a fresh process): peak-RSS growth and seconds, backprop through the solver against "
      "the continuous adjoint; ratio of the adjoint's seconds to backprop's, same run"),
     [("steps", "steps", S), ("backprop MB", "backprop MB", F1), ("adjoint MB", "adjoint MB", F1),
      ("backprop s", "backprop s", F2), ("adjoint s", "adjoint s", F2),
      ("adjoint s / backprop s", "adjoint / backprop time", F2)]),
    ("bench_pvrnn_train", "pvrnn_train",
     ("PV-RNN training (`benchmarks/bench_pvrnn_train.py`): ms per epoch, NumPy against the compiled kernels; "
      "ratio = NumPy / compiled, wall and CPU time, same run"),
     [("case", "case", S), ("numpy ms per epoch (min)", "numpy ms", F1),
      ("compiled ms per epoch (min)", "compiled ms", F1), ("ratio", "ratio", F1), ("CPU ratio", "CPU ratio", F1),
      ("weights rel diff", "weights rel diff", G)]),
    ("bench_pvrnn_train", "pvrnn_step_product",
     ("PV-RNN training's per-step product c += a b (`benchmarks/bench_pvrnn_train.py`): microseconds a call, "
      "BLAS's dgemm against `substrate/_blas.py`'s hand kernel `gemm_small`; ratio = dgemm / gemm_small, same run"),
     [("shape", "shape", S), ("dgemm us per call (min)", "dgemm us", F2),
      ("gemm_small us per call (min)", "gemm_small us", F2), ("ratio", "ratio", F2)]),
    ("bench_pvrnn_train", "pvrnn_train_compile",
     ("PV-RNN training's first call (`benchmarks/bench_pvrnn_train.py`), a fresh process with an empty (cold) and "
      "then the same (warm) Numba cache"),
     [("cache", "cache", S), ("process wall s", "process wall s", F1), ("import s", "import s", F1),
      ("first call s", "first call s", F1)]),
    ("bench_step", "first call",
     ("First call (`benchmarks/bench_step.py`): import substrate, then the first `integrate` per dtype in a fresh "
      "process, cold (empty Numba cache) then warm; ratio of the process's wall time to the warm one's, same run"),
     [("cache", "cache", S), ("process wall s", "process wall s", F1), ("import s", "import s", F2),
      ("float64 s", "float64 s", F2), ("float32 s", "float32 s", F2), ("complex128 s", "complex128 s", F2),
      ("wall ratio to warm", "/ warm", F1)]),
    ("bench_compile", "cold_start",
     ("Cold start (`benchmarks/bench_compile.py`): each path of `substrate warmup` in a fresh process, cold "
      "(empty Numba cache: every kernel it calls compiled) then warm (the same cache); CPU seconds are the "
      "process's own (user + system, imports excluded), less disturbed than wall seconds by other load; ratio of "
      "the warm CPU time to the cold, same run"),
     [("path", "path", "`{}`"), ("cold CPU s", "cold CPU s", F1), ("cold wall s", "cold wall s", F1),
      ("kernels compiled", "kernels compiled", S), ("warm CPU s", "warm CPU s", F2),
      ("warm wall s", "warm wall s", F2), ("warm CPU / cold CPU", "warm / cold CPU", "{:.3f}")]),
    ("bench_circuit_dc", "circuit_linear",
     ("Resistive circuits (`benchmarks/bench_circuit_dc.py`): the linear solves of a DC operating point; ratio "
      "to SciPy's `spsolve`, same run"),
     [("solver", "solver", S), ("systems", "systems", S), ("nnz", "nnz", S), ("ms (all systems)", "ms", F2),
      ("ratio to spsolve", "ratio", F2), ("rel diff", "rel diff", G)]),
    ("bench_circuit_dc", "circuit_dc",
     ("A DC operating point by Newton (`benchmarks/bench_circuit_dc.py`); ratio to the `splu` linear solver, "
      "same run"),
     [("solve", "solve", S), ("Newton iterations", "Newton iterations", S), ("s", "s", F2),
      ("ratio to splu", "ratio", F2)]),
    ("bench_circuit_dc", "circuit_growth",
     ("A circuit's DC solve as it grows (`benchmarks/bench_circuit_dc.py`); ratio to hidden = 256, same run; p = "
      "the exponent of the growth in nodes and in conductances"),
     [("hidden", "hidden", S), ("nodes", "nodes", S), ("conductances", "conductances", S), ("ms", "ms", F1),
      ("ratio to hidden=256", "ratio", F2), ("p in nodes", "p in nodes", F2),
      ("p in conductances", "p in conductances", F2)]),
]


def _cell(value, fmt):
    return "-" if value is None else fmt.format(value)


def table(result, key, caption, columns):
    """The markdown of table ``key`` of one bench's results (a dict as ``results.py`` writes it)."""
    found = [t for t in result["tables"] if t.get("key") == key]
    if not found:
        raise KeyError(f"{result['bench']} has no table {key!r}")
    t = found[-1]  # a bench run twice in one file keeps its last table
    index = [t["columns"].index(c) for c, _, _ in columns]
    m = result["machine"]
    load = t.get("load_average") or m.get("load_average")
    bound = result.get("gemm_bound_s", {}).get("float64")
    where = (f"{result['started'][:10]}, {m['cpu']} ({m['logical_cores']} logical cores), load average "
             f"{load[0]:.2f}" if load else f"{result['started'][:10]}, {m['cpu']}")
    if bound is not None:
        where += f"; GEMM bound of the step (float64) {1e6 * bound:.1f} us"
    lines = [f"{caption} ({where}):", "", "| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in t["rows"]:
        lines.append("| " + " | ".join(_cell(row[i], fmt) for i, (_, _, fmt) in zip(index, columns)) + " |")
    return "\n".join(lines)


def block(results):
    """The README block (without markers) from {bench: results dict}."""
    parts = []
    for bench, key, caption, columns in TABLES:
        if bench in results and any(t.get("key") == key for t in results[bench]["tables"]):
            parts.append(table(results[bench], key, caption, columns))
        else:
            parts.append(f"{caption}: not measured yet (`make bench`).")
    return "\n\n".join(parts)


def replace_block(text, new):
    """``text`` with the part between the markers replaced by ``new``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the README needs one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{new}\n{END}{tail}"


def load(directory):
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's block is not up to date")
    args = ap.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text()
    new = replace_block(text, block(load(args.results)))
    if args.check:
        if new != text:
            sys.exit(f"{readme}: the performance block differs from {args.results}; run {sys.argv[0]}")
        return
    if new != text:
        readme.write_text(new)
        print(f"{readme}: performance block rewritten")


if __name__ == "__main__":
    main()
