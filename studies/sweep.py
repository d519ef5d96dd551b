"""Run a study's grid and consolidate it into one archive.

Layout of an output folder::

    <out>/runs/<run_id>.h5     one file per run, written atomically by the worker that ran it
    <out>/runs/<run_id>.progress   while a run that reports progress executes: how far it is (JSON)
    <out>/runs/<run_id>.scratch/   a run's own folder (``save_partial.scratch()``), e.g. a checkpoint
                                   from which the next sweep resumes a killed run; removed when it ends
    <out>/<study name>.h5      the archive: every run, and the results stacked over the sweep axes
    <out>/.sweep.lock          held (flock) by the driver while it runs

Crash safety. Every file is written under a temporary name (``.tmp-*``) and renamed into place when
complete, so a run file or an archive is either absent or whole, whenever the driver or a worker is
killed. Temporary files are never taken for runs and are removed by the next driver. A run counts as
finished when its file exists with status ``done`` (or ``failed``, unless ``retry_failed``); resuming
runs only the others. Workers die with the driver (Linux: ``PR_SET_PDEATHSIG``), so a restarted
driver never races a worker of the previous one; the lock keeps two drivers out of one folder.

Executors. :func:`run_sweep` hands the runs to an executor: any object with a method
``run(runs, task_name, runs_dir, progress) -> iterator of summaries`` that arranges for
:func:`execute_run` (module-level, picklable) to be called once per run, anywhere that can write to
``runs_dir``, and yields each run's summary as it finishes. :class:`LocalExecutor` is a local process
pool; a Dask backend plugs in the same way. A run executes the task of that name in the catalogue
(``studies.catalogue.TASKS``), the same registry in the driver and in every worker.

Archive layout (plain h5py; :func:`studies.archives.open_dataset` gives an ``xarray.Dataset``)::

    /                 attrs: format, study (the TOML text), study_name, task, profile, axes (JSON),
                      base config, counts, provenance (git commit, versions, host, created)
    /runs/<run_id>    a copy of each run file: attrs (config JSON, seed, status, error, traceback,
                      timings, git commit, versions, host, coords), arrays/, scalars/
    /data/<axis>      one dimension scale per sweep axis (seed last) and per result dimension
    /data/<name>      results stacked over the axes: dims = axes + the result's own dims, NaN where a
                      run failed or is missing; attribute ``dims`` (JSON) names them
    /data/status      "done", "failed" or "missing" for every point; /data/error, /data/run_id
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from typing import Iterable, Iterator, Mapping, Protocol

import h5py
import numba
import numpy as np
import scipy.linalg  # noqa: F401  (loads scipy's BLAS, so that single_thread's limit reaches it)
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from models.train import live_progress
from studies.archives import FORMAT, read_run, run_status
from studies.catalogue import TASKS
from studies.config import Run, Study, run_id as compute_run_id
from studies.runs import (RESERVED, PartialSave, Result, RunFailed, check_result, list_run_files, partial_file,
                          progress_file, read_progress, run_file, scratch_folder, write_run_file)
from substrate import SubstrateValueError, archive

try:
    from numba.np.ufunc import parallel as _nparallel
except ImportError:  # pragma: no cover - numba internals moved
    _nparallel = None
try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS", "NUMBA_NUM_THREADS")
MAX_RUNS = 100_000  # default cap of run_sweep's max_runs (substrate sweep --max-runs)


# ------------------------------------------------------------------------------------ paths
def runs_folder(out_dir: str) -> str:
    """The folder of the run files of the output folder ``out_dir``."""
    return os.path.join(out_dir, "runs")


def archive_file(study: Study, out_dir: str) -> str:
    """The archive of ``study`` in ``out_dir``."""
    return os.path.join(out_dir, f"{study.name}.h5")


# ------------------------------------------------------------------------------------ one run
@contextlib.contextmanager
def single_thread():
    """One BLAS thread (threadpoolctl; scipy's BLAS, the one Numba's np.dot calls, is loaded with this
    module so that the limit reaches it) and one Numba thread where Numba's threading layer is in use."""
    if getattr(_nparallel, "_is_initialized", False) and numba.get_num_threads() > 1:
        numba.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield


def execute_run(run: Run | Mapping, task_name: str, runs_dir: str) -> dict:
    """Run one point of a study and write ``runs_dir/<run_id>.h5`` atomically; the function a worker
    calls (module-level, picklable; ``run`` may be a :class:`Run` or its dict).

    Runs with one BLAS and one Numba thread; the task's ``save_partial`` writes the run's partial file
    (:class:`~studies.runs.PartialSave`). Any exception of the task (including
    ``substrate.IntegrationError`` and :class:`~studies.runs.RunFailed`) is recorded: status
    ``"failed"``, the message and the traceback; the file is written either way. Returns
    ``{run_id, status, error, seconds}``.
    """
    if not isinstance(run, Run):
        run = Run.from_dict(run)
    expected = compute_run_id(task_name, run.config, run.seed)
    if run.run_id != expected:
        raise ValueError(f"run_id {run.run_id!r} does not match its task, config and seed ({expected!r})")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    status, error, tb, result = "done", "", "", None
    try:
        with single_thread():
            task = TASKS[task_name]
            result = check_result(task.run(copy.deepcopy(run.config), int(run.seed),
                                           PartialSave(run, task_name, runs_dir)))
    except RunFailed as e:
        status, error, tb = "failed", str(e), traceback.format_exc()
        try:
            result = check_result(e.result) if e.result is not None else None
        except (TypeError, ValueError):
            result = None
    except Exception as e:  # noqa: BLE001 - every failure of a run is recorded, the sweep goes on
        status, error, tb = "failed", f"{type(e).__name__}: {e}", traceback.format_exc()
        result = None
    seconds = time.perf_counter() - t0
    write_run_file(run, task_name, runs_dir, status, error, tb, result,
                   {"run_seconds": seconds, "started": started})
    _remove_run_leftovers(runs_dir, run.run_id, scratch=True)
    return {"run_id": run.run_id, "status": status, "error": error, "seconds": seconds}


def record_failure(run: Run | Mapping, task_name: str, runs_dir: str, message: str) -> dict:
    """Write a ``failed`` run file for a run whose worker could not report (it died): the driver's
    record of it, with the results it saved with its ``save_partial``, if any. Returns the summary."""
    if not isinstance(run, Run):
        run = Run.from_dict(run)
    partial, result = partial_file(runs_dir, run.run_id), None
    if os.path.exists(partial):  # a long run saved progress before it died: keep it
        saved = read_run(partial)
        result = Result(arrays=saved["arrays"], scalars=saved["scalars"], coords=saved["coords"])
        message += "; the results it saved before (save_partial) are kept"
    write_run_file(run, task_name, runs_dir, "failed", message, "", result, {})
    _remove_run_leftovers(runs_dir, run.run_id)
    return {"run_id": run.run_id, "status": "failed", "error": message, "seconds": float("nan")}


def _remove_run_leftovers(runs_dir: str, rid: str, scratch: bool = False):
    """A finished run's partial results and progress report, now in its run file or obsolete, and
    with ``scratch`` its scratch folder (kept for a run whose process died: a retry resumes from it)."""
    for path in (partial_file(runs_dir, rid), progress_file(runs_dir, rid)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    if scratch:
        shutil.rmtree(scratch_folder(runs_dir, rid), ignore_errors=True)


# ------------------------------------------------------------------------------------ local executor
_EVENTS = None  # in a worker: the queue it announces the runs it starts on


def _init_worker(driver_pid: int, events):
    """Worker initializer: one thread for BLAS, OpenMP and Numba; die with the driver (its child: spawn);
    ignore Ctrl-C (the driver handles it)."""
    global _EVENTS
    for v in THREAD_VARIABLES:
        os.environ[v] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover
            _watch_parent(driver_pid)
    else:  # pragma: no cover - no PDEATHSIG: a thread polls (it waits for a compiled kernel to return)
        _watch_parent(driver_pid)
    if os.getppid() != driver_pid:  # the driver died before the lines above took effect
        os._exit(1)
    _EVENTS = events


def _watch_parent(driver_pid: int):
    def watch():
        while os.getppid() == driver_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="watch-driver", daemon=True).start()


def _pool_execute(run: dict, task_name: str, runs_dir: str) -> dict:
    if _EVENTS is not None:
        _EVENTS.put(run["run_id"])
    return execute_run(run, task_name, runs_dir)


WORKER_DIED = ("the worker process died while running this run (killed by a signal, out of memory, or "
               "a crash in compiled code); it died again when retried alone")


class LocalExecutor:
    """A local process pool: one BLAS and Numba thread per worker, workers that die with the driver.
    When a worker process dies (a crash, the OOM killer), the runs it may have been running are retried
    one at a time in a fresh process; one that kills its process again is recorded as failed and the
    sweep goes on.

    Workers are started with ``spawn``: each is a child of the driver, so that the kernel kills it when
    the driver dies (``PR_SET_PDEATHSIG``). (A ``forkserver`` worker is the fork server's child, and the
    fork server outlives a killed driver for as long as its workers do; ``fork`` copies the driver's
    threads and locks.)"""

    warm_driver_cache = True  # workers share this machine's Numba cache: warm it once in the driver

    def __init__(self, workers: int = 2):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r} must be a positive integer")
        self.workers = workers

    def _context(self):
        return mp.get_context("spawn")

    def run(self, runs: Iterable[Run], task_name: str, runs_dir: str, progress: bool = False) -> Iterator[dict]:
        """Execute ``runs``; yields each run's summary as it finishes (in completion order)."""
        pending = [r.to_dict() if isinstance(r, Run) else dict(r) for r in runs]
        saved = {v: os.environ.get(v) for v in THREAD_VARIABLES}
        os.environ.update({v: "1" for v in THREAD_VARIABLES})  # inherited by the workers started now
        try:
            while pending:
                suspects, pending = yield from self._batch(pending, task_name, runs_dir, self.workers)
                # a run whose file was written before the pool broke is finished: only its summary was lost
                written = set()
                for summary in _written_before_the_break(suspects + pending, runs_dir):
                    written.add(summary["run_id"])
                    yield summary
                suspects = [r for r in suspects if r["run_id"] not in written]
                pending = [r for r in pending if r["run_id"] not in written]
                for run in suspects:  # alone, in a fresh process
                    again, _ = yield from self._batch([run], task_name, runs_dir, 1)
                    if again:
                        yield record_failure(run, task_name, runs_dir, WORKER_DIED)
        finally:
            for v, old in saved.items():
                if old is None:
                    os.environ.pop(v, None)
                else:
                    os.environ[v] = old

    def _batch(self, runs: list, task_name: str, runs_dir: str, workers: int):
        """Run ``runs`` on a fresh pool. Returns (suspects, rest) if the pool broke: the runs that had
        started without finishing, and those that had not started."""
        ctx = self._context()
        events = ctx.SimpleQueue()
        pool = ProcessPoolExecutor(max_workers=min(workers, len(runs)), mp_context=ctx,
                                   initializer=_init_worker, initargs=(os.getpid(), events))
        finished = set()
        broken = False
        try:
            futures = {pool.submit(_pool_execute, r, task_name, runs_dir): r for r in runs}
            for fut in as_completed(futures):
                try:
                    summary = fut.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                finished.add(summary["run_id"])
                yield summary
        except BaseException:  # Ctrl-C, or the consumer stopped: stop the workers now, not after their runs
            _terminate(pool)
            raise
        pool.shutdown(wait=not broken, cancel_futures=True)
        if not broken:
            return [], []
        started = set()
        while not events.empty():
            started.add(events.get())
        events.close()
        left = [r for r in runs if r["run_id"] not in finished]
        return ([r for r in left if r["run_id"] in started], [r for r in left if r["run_id"] not in started])


def _written_before_the_break(runs: list, runs_dir: str) -> Iterator[dict]:
    """The summaries of ``runs`` whose run file exists. A broken pool terminates every worker, so a run
    may have been stopped between writing its file and removing its partial file: remove it here."""
    for run in runs:
        status = run_status(run_file(runs_dir, run["run_id"]))
        if status is not None:
            _remove_run_leftovers(runs_dir, run["run_id"], scratch=True)
            yield {"run_id": run["run_id"], "status": status, "error": "", "seconds": float("nan")}


def _terminate(pool: ProcessPoolExecutor):
    """Shut a pool down without waiting for the runs in progress (they leave at most a temporary file,
    removed by the next driver)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join(timeout=5)


class Executor(Protocol):
    """What :func:`run_sweep` needs of an executor: ``run`` gets the runs to execute (a list of
    :class:`~studies.config.Run`), arranges for :func:`execute_run` to be called once per run (with the
    Run or ``run.to_dict()``, anywhere that can write to ``runs_dir``) and yields each run's summary as
    it finishes. ``warm_driver_cache`` (optional, default
    False): the driver loads the task's compiled kernels once before ``run``, for workers that share its
    Numba cache."""

    def run(self, runs: list, task_name: str, runs_dir: str, progress: bool) -> Iterator[dict]:
        """Execute ``runs`` (each with :func:`execute_run`), yielding each run's summary as it finishes."""


class SerialExecutor:
    """Runs in this process, one after another (for debugging with breakpoints, and for tests): the
    same :func:`execute_run`, the same files."""

    warm_driver_cache = False

    def run(self, runs: Iterable[Run], task_name: str, runs_dir: str, progress: bool = False) -> Iterator[dict]:
        """Execute each run here, one after the other, yielding its summary."""
        for r in runs:
            yield execute_run(r, task_name, runs_dir)


# ------------------------------------------------------------------------------------ driver
class SweepLockedError(RuntimeError):
    """Another driver is running a sweep in the same output folder."""


@contextlib.contextmanager
def _driver_lock(out_dir: str):
    path = os.path.join(out_dir, ".sweep.lock")
    if fcntl is None:  # pragma: no cover - not POSIX: no lock
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip()
            raise SweepLockedError(f"another sweep (pid {other or '?'}) is running in {out_dir}; wait for it "
                                   "or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (as does the kernel if this process is killed)


def statuses(study: Study, out_dir: str) -> dict:
    """{run_id: "done" | "failed" | None} for every run of the study (None: no readable run file)."""
    rdir = runs_folder(out_dir)
    present = set(list_run_files(rdir))
    return {r.run_id: (run_status(run_file(rdir, r.run_id)) if r.run_id in present else None)
            for r in study.iter_runs()}


def warm_cache(task_name: str):
    """Load (compiling on a cold cache) the task's compiled kernels once, in this process: workers then
    find the Numba cache warm instead of each compiling the same kernels."""
    task = TASKS[task_name]
    if task.warmup is not None:
        task.warmup()


def check_run_count(study: Study, max_runs: int, argument: str = "max_runs"):
    """Refuse a study of more than ``max_runs`` runs (counted from its axes' lengths, nothing expanded):
    a grid of a billion runs would otherwise fill the memory before the first run starts."""
    if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
        raise SubstrateValueError(f"{argument}={max_runs!r} must be an integer >= 1")
    if study.n_runs > max_runs:
        axes = " x ".join(f"{len(v)} {k}" for k, v in study.axes.items())
        raise SubstrateValueError(f"study {study.name!r} has {study.n_runs:,} runs ({axes}), more than "
                                  f"{argument}={max_runs:,}; allowed: at most {argument} runs (shrink the "
                                  f"sweep, e.g. with a profile, or raise {argument})")


POLL_EVERY = 1.0  # seconds between two looks at the running runs' progress
LINE_EVERY = 10.0  # off a terminal: the least seconds between two progress lines


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class SweepProgress:
    """What the driver shows while the runs execute: the runs finished (and failed) of those to run, how
    far the running runs are (their ``save_partial.progress`` reports, e.g. epochs done of their total)
    and an estimate of the time left. On a terminal (or in a notebook) a bar redrawn in place; elsewhere
    (a log file, a pipe) a plain line when something changed, at most every :data:`LINE_EVERY` seconds,
    and the last one. A thread looks at the progress files every :data:`POLL_EVERY` seconds.

    The estimate counts a running run as the fraction of its work it reported, and assumes the work
    left goes as fast as the work done so far."""

    def __init__(self, name: str, todo: list, runs_dir: str, stream=None, live: bool | None = None):
        self.name, self.runs_dir, self.total = name, runs_dir, len(todo)
        self.stream = sys.stderr if stream is None else stream
        self.live = live_progress(self.stream) if live is None else live
        self.pending = {r.run_id for r in todo}
        self.finished = self.failed = 0
        self.reports = {}
        self.start = time.monotonic()
        self.last_line = None
        self.changed = True
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.bar = tqdm(total=self.total, desc=name, file=self.stream, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}|") if self.live else None
        self.thread = threading.Thread(target=self._watch, name="sweep-progress", daemon=True)
        self.thread.start()

    def run_finished(self, summary: dict):
        """Count a run's summary (``run_id``, ``status``) and show the new state."""
        with self.lock:
            self.finished += 1
            self.failed += summary["status"] != "done"
            self.pending.discard(summary["run_id"])
            self.reports.pop(summary["run_id"], None)
            self.changed = True
            self._show()

    def close(self):
        """Stop looking at the progress files; show the last state."""
        self.stopping.set()
        self.thread.join()
        with self.lock:
            self._show(last=True)
            if self.bar is not None:
                self.bar.close()

    def _watch(self):
        while not self.stopping.wait(POLL_EVERY):
            reports = read_progress(self.runs_dir)
            with self.lock:
                reports = {rid: r for rid, r in reports.items() if rid in self.pending}
                if reports != self.reports:
                    self.reports, self.changed = reports, True
                self._show()

    def text(self) -> str:
        """The status: runs finished, the running runs' progress, time elapsed and left."""
        parts = [f"{self.finished}/{self.total} runs finished" + (f" ({self.failed} failed)" if self.failed else "")]
        running = [f"{r['done']}/{r['total']} {r['unit']}s" for r in self.reports.values()]
        if running:
            parts.append(f"running: {', '.join(running[:4])}" + (f" and {len(running) - 4} more" if len(running) > 4
                                                                  else ""))
        elapsed = time.monotonic() - self.start
        work = self.work()
        left = f"~{_duration(elapsed * (self.total - work) / work)} left" if 0 < work < self.total else ""
        parts.append(f"{_duration(elapsed)} elapsed" + (f", {left}" if left else ""))
        return "; ".join(parts)

    def work(self) -> float:
        """Runs' worth of work done: the finished runs and the reported fractions of the running ones."""
        return self.finished + sum(r["done"] / r["total"] for r in self.reports.values())

    def _show(self, last: bool = False):
        if self.bar is not None:
            self.bar.n = self.work()
            self.bar.set_description_str(f"{self.name}: {self.text()}", refresh=True)
            return
        now = time.monotonic()
        if last or (self.changed and (self.last_line is None or now - self.last_line >= LINE_EVERY)):
            print(f"{self.name}: {self.text()}", file=self.stream, flush=True)
            self.last_line, self.changed = now, False


def run_sweep(study: Study, out_dir: str, workers: int = 2, retry_failed: bool = False, progress: bool = True,
              executor: Executor | None = None, consolidate_every: float | None = 600.0,
              stats: dict | None = None, max_runs: int = MAX_RUNS) -> str:
    """Run every unfinished run of ``study`` and consolidate the archive; returns its path.

    Runs whose file exists with status ``done`` are skipped, and ``failed`` ones unless
    ``retry_failed``. ``executor``: an object with ``run(runs, task_name, runs_dir, progress)`` (default
    :class:`LocalExecutor` with ``workers`` processes). ``progress``: show :class:`SweepProgress` on
    stderr. ``consolidate_every``: seconds between archive
    rewrites while the sweep runs (None: only at the end), so that a long sweep can be looked at
    before it ends. ``stats``: a dict filled with the counts (total, skipped, ran, done, failed).
    ``max_runs``: a larger study is refused (:func:`check_run_count`) before anything is written.
    """
    check_run_count(study, max_runs)
    out_dir = os.path.abspath(out_dir)
    rdir = runs_folder(out_dir)
    os.makedirs(rdir, exist_ok=True)
    stats = {} if stats is None else stats
    with _driver_lock(out_dir):
        archive.remove_temporary(rdir)  # left by a killed driver or worker; none is active now
        archive.remove_temporary(out_dir)
        for rid in read_progress(rdir):  # reports of runs a killed driver's workers left unfinished
            with contextlib.suppress(FileNotFoundError):
                os.remove(progress_file(rdir, rid))
        state = statuses(study, out_dir)
        todo = [r for r in study.iter_runs()
                if state[r.run_id] is None or (retry_failed and state[r.run_id] == "failed")]
        stats.update(total=len(state), skipped=len(state) - len(todo), ran=0, done=0, failed=0)
        if todo:
            executor = executor if executor is not None else LocalExecutor(workers)
            if getattr(executor, "warm_driver_cache", False):
                warm_cache(study.task)
            last = time.monotonic()
            shown = SweepProgress(study.name, todo, rdir) if progress else None
            try:
                for summary in executor.run(todo, study.task, rdir, progress):
                    stats["ran"] += 1
                    stats["done" if summary["status"] == "done" else "failed"] += 1
                    if shown is not None:
                        shown.run_finished(summary)
                    if consolidate_every is not None and time.monotonic() - last >= consolidate_every:
                        consolidate(study, out_dir)
                        last = time.monotonic()
            except KeyboardInterrupt:
                consolidate(study, out_dir)  # what finished is in the archive; resume later
                raise
            finally:
                if shown is not None:
                    shown.close()
        return consolidate(study, out_dir)


# ------------------------------------------------------------------------------------ archive
def _coordinate_array(values: list) -> np.ndarray:
    """Axis values as an HDF5-storable array: numbers, booleans, strings; lists as JSON strings."""
    if all(isinstance(v, bool) for v in values):
        return np.array(values, dtype=bool)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.float64)
    return np.array([v if isinstance(v, str) else json.dumps(v) for v in values], dtype=object)


def _create(group: h5py.Group, name: str, data: np.ndarray, dims: Iterable[str]) -> h5py.Dataset:
    ds = archive.create_dataset(group, name, data, compress_above=4096)
    ds.attrs["dims"] = json.dumps(list(dims))
    return ds


def _stack_dtype(dtype) -> np.dtype:
    return np.dtype(np.complex128) if np.dtype(dtype).kind == "c" else np.dtype(np.float64)


def consolidate(study: Study, out_dir: str) -> str:
    """Gather the study's run files into one archive, ``<out_dir>/<study name>.h5``, written atomically
    (see the module docstring for its layout). Runs without a readable file are ``missing``."""
    out_dir = os.path.abspath(out_dir)
    rdir = runs_folder(out_dir)
    axes = study.axes
    axis_names = list(axes)
    shape = study.shape
    present = set(list_run_files(rdir))
    ids = np.empty(shape, dtype=object)
    for r in study.iter_runs():  # one at a time: only the ids are kept
        ids[r.index] = r.run_id

    # pass 1: what each run holds (attributes and array shapes, not the data)
    info = {}
    for rid in ids.flat:
        if rid not in present:
            continue
        try:
            with archive.open_file(run_file(rdir, rid)) as f:  # a FIFO or a damaged file: unreadable
                attrs = dict(f.attrs)
                dims = json.loads(attrs.get("array_dims", "{}"))
                shapes = {k: f["arrays"][k].shape for k in dims if "arrays" in f and k in f["arrays"]}
                dtypes = {k: f["arrays"][k].dtype for k in shapes}
                scalars = list(f["scalars"]) if "scalars" in f else []
        except (OSError, KeyError, ValueError):
            continue  # unreadable: treated as missing (and rerun by the next sweep)
        info[rid] = {"attrs": attrs, "dims": dims, "shapes": shapes, "dtypes": dtypes, "scalars": scalars,
                     "coords": json.loads(attrs.get("array_coords", "{}"))}

    taken = set(axis_names) | set(study.axis_coords()) | set(RESERVED)
    dim_names, var_names = {}, {}  # result dim / variable -> its name in the archive (clashes renamed)

    def rename(name, table):
        if name not in table:
            new = name
            while new in taken:
                new = f"result_{new}"
            table[name] = new
            taken.add(new)
        return table[name]

    arrays, scalars, dim_len, dim_labels = {}, {}, {}, {}
    for rid, it in info.items():
        if it["attrs"].get("status") != "done":
            continue
        for name, dims in it["dims"].items():
            if name not in it["shapes"]:
                continue
            entry = arrays.setdefault(name, {"dims": tuple(dims), "dtype": np.dtype(np.float64)})
            if tuple(dims) != entry["dims"] or len(dims) != len(it["shapes"][name]):
                continue  # an inconsistent run: kept in /runs, left out of the stacked data
            entry["dtype"] = np.promote_types(entry["dtype"], _stack_dtype(it["dtypes"][name]))
            for d, n in zip(dims, it["shapes"][name]):
                dim_len[d] = max(dim_len.get(d, 0), n)
                labels = it["coords"].get(d)
                if labels is not None and len(labels) == n and n >= len(dim_labels.get(d, [])):
                    dim_labels[d] = labels
        for name in it["scalars"]:
            scalars[name] = True
    for d in dim_len:
        rename(d, dim_names)
    for name in list(arrays) + list(scalars):
        if name not in var_names:
            rename(name, var_names)

    status = np.full(shape, "missing", dtype=object)
    error = np.full(shape, "", dtype=object)
    for index in np.ndindex(shape):
        if ids[index] in info:
            status[index] = str(info[ids[index]]["attrs"].get("status", "failed"))
            error[index] = str(info[ids[index]]["attrs"].get("error", ""))

    counts = {s: int(np.sum(status == s)) for s in ("done", "failed", "missing")}
    path = archive_file(study, out_dir)
    kept = "the previous archive is kept" if os.path.exists(path) else "no archive was written"
    with archive.create_h5(path, "the archive", f"{kept}, and every finished run is in {rdir}: free some space and run "
                    "the sweep again") as (f, sink):
        prov = archive.provenance(study.base, None)
        for k, v in prov.items():
            f.attrs[k] = v
        f.attrs.update({
            "format": FORMAT, "study": study.text, "study_name": study.name, "task": study.task,
            "profile": study.profile or "", "study_path": study.path or "", "description": study.description,
            "overrides": json.dumps(list(study.overrides)), "axes": json.dumps(axes, default=str),
            "axis_keys": json.dumps({a.name: list(a.keys) for a in study.axis_list}),
            "base": json.dumps(study.base, sort_keys=True), "n_runs": study.n_runs, "n_done": counts["done"],
            "n_failed": counts["failed"], "n_missing": counts["missing"],
        })
        data = f.create_group("data")
        scales = {}
        coord_names = []
        for name in axis_names:
            ds = _create(data, name, _coordinate_array(axes[name]), [name])
            ds.make_scale(name)
            scales[name] = ds
            coord_names.append(name)
        for d, n in dim_len.items():
            dn = dim_names[d]
            labels = dim_labels.get(d)
            values = _coordinate_array(labels) if labels is not None and len(labels) == n else np.arange(n)
            ds = _create(data, dn, values, [dn])
            ds.make_scale(dn)
            scales[dn] = ds
            coord_names.append(dn)
        for cname, (axis, values) in study.axis_coords().items():
            if cname in scales:
                continue
            ds = _create(data, cname, _coordinate_array(values), [axis])
            _attach(ds, [axis], scales)
            coord_names.append(cname)
        data.attrs["coordinates"] = json.dumps(coord_names)

        def stacked(name, own_dims, dtype):
            full_dims = axis_names + [dim_names[d] for d in own_dims]
            full_shape = shape + tuple(dim_len[d] for d in own_dims)
            fill = np.array(np.nan, dtype=dtype)
            ds = data.create_dataset(var_names[name], shape=full_shape, dtype=dtype, fillvalue=fill,
                                     chunks=True if len(full_shape) else None,
                                     fletcher32=bool(len(full_shape)),  # see archive.create_dataset
                                     compression="gzip" if int(np.prod(full_shape)) > 4096 else None)
            ds.attrs["dims"] = json.dumps(full_dims)
            _attach(ds, full_dims, scales)
            return ds

        out_arrays = {n: stacked(n, e["dims"], e["dtype"]) for n, e in arrays.items()}
        out_scalars = {n: stacked(n, (), np.float64) for n in scalars}
        for name, values in (("run_id", ids), ("status", status), ("error", error)):
            ds = _create(data, name, values, axis_names)
            _attach(ds, axis_names, scales)

        # pass 2: copy each run and write its results into the stacked datasets
        group = f.create_group("runs")
        for index in np.ndindex(shape):
            rid = ids[index]
            if rid not in info:
                continue
            if sink.error is not None:
                break  # the archive cannot be completed: stop copying into it
            try:
                with archive.open_file(run_file(rdir, rid)) as src:
                    group.copy(src["/"], rid)
                    if info[rid]["attrs"].get("status") != "done":
                        continue
                    for name, ds in out_arrays.items():
                        if name in info[rid]["shapes"] and \
                                tuple(info[rid]["dims"][name]) == arrays[name]["dims"]:
                            a = src["arrays"][name][()]
                            ds[index + tuple(slice(0, n) for n in a.shape)] = a
                    for name, ds in out_scalars.items():
                        if "scalars" in src and name in src["scalars"]:
                            ds[index] = src["scalars"][name][()]
            except (OSError, KeyError, ValueError):  # pragma: no cover - vanished since pass 1
                continue
        archive.seal(f)
    return path


def _attach(ds: h5py.Dataset, dims: list, scales: dict):
    for i, d in enumerate(dims):
        ds.dims[i].label = d
        if d in scales:
            ds.dims[i].attach_scale(scales[d])
