"""Machine-readable results of the benchmarks, beside their printed tables.

A bench records each table it prints with :func:`record` (title, column names, rows of numbers and
strings); the file ``benchmarks/results/<bench>.json`` is rewritten at every table, so that an
interrupted run keeps what it measured. Each file holds, from the same run: the machine (CPU, logical
cores, load average at the start and at each table, BLAS/Numba/torch thread counts, versions) and the
GEMM bound of the issue's step (the two products of the 784-500-10 network at batch 64, float64 and
float32, one BLAS thread, ``np.dot`` with ``out=``, minimum of 7), against which ratios are read.

Run as a script, it runs a bench and also keeps its printed output in the same file (``output``), so
that every bench of ``make bench`` leaves a JSON file whether it records tables or not:

    .venv/bin/python benchmarks/results.py benchmarks/bench_er.py [its arguments]

``benchmarks/readme_table.py`` regenerates the README's performance block from these files.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import runpy
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = 1
_run = {}  # this process's file: {"path": Path, "data": dict}


def load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def cpu_name():
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def threads():
    """Thread counts of the libraries that compute: BLAS and OpenMP pools (threadpoolctl), Numba, torch
    (if this process imported it)."""
    out = {}
    try:
        from threadpoolctl import threadpool_info
        out["pools"] = [{"api": p["internal_api"], "threads": p["num_threads"], "library": Path(p["filepath"]).name}
                        for p in threadpool_info()]
    except ImportError:
        out["pools"] = None
    import numba
    out["numba"] = numba.get_num_threads()
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].get_num_threads()
    return out


def machine():
    import numba
    versions = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    try:
        versions["substrate"] = metadata.version("substrate")
    except metadata.PackageNotFoundError:  # an uninstalled checkout
        versions["substrate"] = None
    return {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "load_average": load_average(), "threads": threads(), "versions": versions}


def gemm_bound(batch=64, repeats=7, number=200):
    """Seconds per step of the issue's two products (W (10x500) r_h and B (500x10) r_y, batch columns),
    per dtype: minimum over ``repeats`` timings of ``number`` steps, one BLAS thread."""
    from threadpoolctl import threadpool_limits

    out = {}
    rng = np.random.default_rng(0)
    with threadpool_limits(1):
        for dtype in ("float64", "float32"):
            w, b = rng.standard_normal((10, 500)).astype(dtype), rng.standard_normal((500, 10)).astype(dtype)
            r, f = rng.random((510, batch)).astype(dtype), np.empty((510, batch), dtype)
            best = np.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(number):
                    np.dot(w, r[:500], out=f[500:])
                    np.dot(b, r[500:], out=f[:500])
                best = min(best, (time.perf_counter() - t0) / number)
            out[dtype] = best
    return out


def _plain(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None  # JSON has no NaN or Inf
    return x


def _file(bench):
    if not _run:
        bench = bench or Path(sys.argv[0]).stem
        _run["path"] = RESULTS / f"{bench}.json"
        _run["data"] = {"schema": SCHEMA, "bench": bench, "argv": sys.argv[1:],
                        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "machine": machine(), "gemm_bound_s": gemm_bound(), "tables": []}
    return _run["data"]


def _write():
    RESULTS.mkdir(exist_ok=True)
    tmp = _run["path"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_run["data"], indent=1) + "\n")
    tmp.replace(_run["path"])  # atomic: a reader never sees half a file
    return _run["path"]


def record(title, columns, rows, *, key=None, bench=None, **meta):
    """Add a printed table to this run's results file (created at the first call, with the machine and
    the GEMM bound measured then) and rewrite the file; returns its path. ``rows``: sequences as long as
    ``columns`` (numbers, strings or None); ``key``: a name for :mod:`readme_table` to find the table by;
    ``meta``: anything else worth keeping (units, the baseline of the ratios)."""
    data = _file(bench)
    rows = [[_plain(v) for v in row] for row in rows]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row of {len(row)} values for {len(columns)} columns: {row}")
    data["tables"].append({"key": key, "title": title, "columns": list(columns), "rows": rows,
                           "load_average": load_average(), **meta})
    return _write()


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, s):
        self.parts.append(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()


def run(script, argv):
    """Run ``script`` as __main__ with ``argv``, keeping its printed output in its results file."""
    sys.argv = [str(script), *argv]
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.stdout = tee.stream
        data = _file(Path(script).stem)
        data["output"] = "".join(tee.parts)
        data["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        print(f"results: {_write()}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} BENCH.py [arguments]")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import results  # the module the benches import (not this __main__ copy): one file per run

    results.run(sys.argv[1], sys.argv[2:])
