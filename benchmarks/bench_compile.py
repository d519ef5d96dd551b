"""Cold start: what the first run of each common path spends compiling, and what it costs once cached.

Each path of ``substrate warmup`` (``studies/warmup.py``: a tiny workload with the types of the real
run) runs in a fresh Python process (the paths of this tree, the code of the tree measured):

* ``cold``: with an empty ``NUMBA_CACHE_DIR``: Numba compiles every kernel the path calls;
* ``warm``: again with the same directory: Numba loads the kernels from its cache.

Reported per path: wall and CPU seconds of the path (imports excluded; CPU = the process's user + system
time, less disturbed than wall by other load on a shared machine), the number of kernel specialisations
compiled, and the Numba dispatchers with the most (``--detail``). The machine's load average is recorded
before and after. ``--baseline DIR`` also runs every cold measurement on another checkout (DIR on
PYTHONPATH), alternating with this one, and reports this tree's cold time as a ratio to it.

Results: the printed lines and the table recorded by ``benchmarks/results.py`` in
``benchmarks/results/bench_compile.json`` (key ``cold_start``), from which ``benchmarks/readme_table.py``
makes the README's table.

Run:  .venv/bin/python benchmarks/results.py benchmarks/bench_compile.py [--paths quickstart float64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import results

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import importlib.util, json, os, sys, time
from collections import Counter
t0 = time.perf_counter()
spec = importlib.util.spec_from_file_location("warmup_paths", sys.argv[2])  # this tree's paths, any tree's code
warmup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(warmup)
from numba.core.registry import CPUDispatcher
imports = time.perf_counter() - t0
c1 = time.process_time()
wall = warmup.run(sys.argv[1])
cpu = time.process_time() - c1
compiled = Counter()
for name, m in list(sys.modules.items()):
    for attr, d in list(vars(m).items()):
        if isinstance(d, CPUDispatcher) and sum(d.stats.cache_misses.values()):
            compiled[f"{d.py_func.__module__}.{d.py_func.__qualname__}"] = sum(d.stats.cache_misses.values())
print(json.dumps({"wall": wall, "cpu": cpu, "imports": imports, "compiled": dict(compiled)}))
"""


def measure(path: str, cache: str, pythonpath: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": pythonpath, "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, path, str(ROOT / "studies" / "warmup.py")], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if done.returncode:
        raise RuntimeError(f"path {path} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    sys.path.insert(0, str(ROOT))
    from studies.warmup import PATHS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--repeats", type=int, default=1, help="cold/warm pairs per path (the minimum is reported)")
    ap.add_argument("--baseline", help="another checkout: its cold time per path, alternated with this tree's")
    ap.add_argument("--detail", action="store_true", help="print the dispatchers compiled by each path")
    args = ap.parse_args(argv)

    trees = {"this": str(ROOT)}
    if args.baseline:
        trees["baseline"] = str(Path(args.baseline).resolve())
    load_before = os.getloadavg()
    rows = []
    for path in args.paths:
        runs = {tree: {"cold": [], "warm": []} for tree in trees}
        for _ in range(args.repeats):
            for tree, where in trees.items():
                with tempfile.TemporaryDirectory() as cache:
                    runs[tree]["cold"].append(measure(path, cache, where))
                    if tree == "this":
                        runs[tree]["warm"].append(measure(path, cache, where))
        row = {"path": path, "what": PATHS[path][0]}
        for tree, got in runs.items():
            for label, measured in got.items():
                if measured:
                    best = min(measured, key=lambda r: r["cpu"])
                    row[f"{tree}_{label}"] = {"wall": min(r["wall"] for r in measured),
                                              "cpu": best["cpu"], "imports": min(r["imports"] for r in measured),
                                              "specialisations": sum(best["compiled"].values()),
                                              "compiled": best["compiled"]}
        if "baseline_cold" in row:
            row["cpu_ratio_to_baseline"] = row["this_cold"]["cpu"] / row["baseline_cold"]["cpu"]
        rows.append(row)
        _print_row(row)
        if args.detail:
            for name, count in sorted(row["this_cold"]["compiled"].items(), key=lambda kv: -kv[1]):
                print(f"      {count:3d}  {name}")
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}; {os.cpu_count()} cores")
    # the results file is committed: it names the baseline by its commit, never by a path of this machine
    baseline = args.baseline and _commit_of(args.baseline)
    sys.argv = [baseline if a == args.baseline else a for a in sys.argv]
    table = []
    for row in rows:
        cold, warm, old = row["this_cold"], row["this_warm"], row.get("baseline_cold")
        table.append((row["path"], cold["cpu"], cold["wall"], cold["specialisations"], warm["cpu"], warm["wall"],
                      warm["cpu"] / cold["cpu"], old and old["cpu"], old and old["specialisations"],
                      row.get("cpu_ratio_to_baseline")))
    results.record("Cold start: each path of `substrate warmup` in a fresh process, cold (empty Numba cache) then "
                   f"warm (the same cache); minimum CPU of {args.repeats} pair(s); imports excluded",
                   ["path", "cold CPU s", "cold wall s", "kernels compiled", "warm CPU s", "warm wall s",
                    "warm CPU / cold CPU", "baseline cold CPU s", "baseline kernels compiled",
                    "cold CPU / baseline"], table, key="cold_start",
                   baseline="the same path's cold run; --baseline: the other checkout's cold run",
                   baseline_tree=baseline, load_before=list(load_before),
                   compiled={row["path"]: row["this_cold"]["compiled"] for row in rows})


def _commit_of(tree):
    """``commit <hash>`` of the checkout ``tree`` (``checkout <name>`` if it is not a git checkout)."""
    out = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"commit {out.stdout.strip()}" if out.returncode == 0 else f"checkout {Path(tree).name}"


def _print_row(row):
    cold, warm = row["this_cold"], row["this_warm"]
    text = (f"{row['path']:<17} cold {cold['wall']:6.1f} s wall {cold['cpu']:6.1f} s cpu "
            f"({cold['specialisations']:3d} compiled)   warm {warm['wall']:5.2f} s wall {warm['cpu']:5.2f} s cpu")
    if "baseline_cold" in row:
        base = row["baseline_cold"]
        text += (f"   baseline cold {base['cpu']:6.1f} s cpu ({base['specialisations']} compiled): "
                 f"ratio {row['cpu_ratio_to_baseline']:.2f}")
    print(text, flush=True)


if __name__ == "__main__":
    main()
