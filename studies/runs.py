"""What a study's run is and what it leaves: the :class:`Task` a study registers, the :class:`Result`
a run returns (or :class:`RunFailed` carries), and the run file it is written to.

A run file (``runs/<run_id>.h5``, format ``substrate-run/1``) holds the run's result (``arrays/``,
``scalars/``), what it trained when the study's ``save_weights`` is on (``weights/<name>``, each in
``substrate.save``'s layout: ``substrate.load(path, group="weights/<name>")`` reads it, and
``group="runs/<run_id>/weights/<name>"`` the archive's copy; :func:`studies.archives.saved_objects`
lists them) and attributes: the config (JSON), seed, status (``done``, ``failed`` or ``partial``),
error, traceback, timings, provenance, the run's coordinates on the sweep axes, and the dims and
labels of its arrays. A long run may save what it has computed so far: it is given a ``save_partial``
callable (:class:`PartialSave` in a sweep, :data:`discard` outside one), which writes
``runs/<run_id>.partial.h5``; the sweep keeps it if the run's process dies (see
:func:`studies.sweep.record_failure`). Its ``progress(done, total, unit)`` tells the sweep's driver how
far the run is (``runs/<run_id>.progress``, a line of JSON), from which the driver shows the running runs'
epochs and estimates the time left. Its ``scratch()`` gives the run a folder of its own that outlives the
run's process (``runs/<run_id>.scratch/``, None outside a sweep): a long run keeps a checkpoint there,
resumes from it when the sweep is run again, and the sweep removes the folder once the run's file
is written by the run itself (a run whose process died keeps it, for ``--retry-failed``).
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from studies.config import Run
from substrate import archive, persist

RUN_FORMAT = "substrate-run/1"
RUN_FILE = re.compile(r"^[0-9a-f]{16}\.h5$")
PROGRESS_FILE = re.compile(r"^([0-9a-f]{16})\.progress$")
PROGRESS_EVERY = 1.0  # seconds between two writes of a run's progress file (the first is written at once)
RESERVED = ("run_id", "status", "error")  # names of the archive's own per-run datasets
WEIGHTS = "weights"  # the run file's group of saved objects (Result.objects)


@dataclass
class Result:
    """What a run returns. arrays: name -> (dims, array), one dim name per array axis; scalars: name ->
    float; coords: optional labels of the arrays' own dims (dim -> list of values); objects: name ->
    what the run trained (anything ``substrate.save`` takes, e.g. the ``models.train.Classifier``), or
    ``(object, extra)`` with values saved beside it (a PV-RNN's adaptive vectors: ``(model, {"A": A})``),
    kept in the run file under ``weights/<name>`` when the study's ``save_weights`` is on."""

    arrays: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)
    coords: dict = field(default_factory=dict)
    objects: dict = field(default_factory=dict)


class RunFailed(RuntimeError):
    """A run failed in a way the study records (no convergence, divergence); ``result`` holds what was
    computed up to the failure, or None."""

    def __init__(self, message: str, result: Result | None = None):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Task:
    """What a study module registers (:mod:`studies.catalogue`).

    schema: nested dict key -> :class:`~studies.config.Field` (type, allowed, default, doc);
    run(config, seed, save_partial) -> :class:`Result`, where ``save_partial(result)`` keeps what a
    long run has computed so far and ``save_partial.progress(done, total, unit="epoch")`` reports how
    far it is; warmup(): loads (or compiles) the compiled kernels the task uses, on
    a tiny problem, so that workers find the Numba cache warm; plot(archive path) -> a matplotlib
    Figure of the study's archive; description: one line; table(archive path) -> the study's
    tables as markdown text (``substrate table``), for the studies that have them; overlay(archive
    paths) -> a Figure comparing sweeps of the study made under different settings (profiles,
    ``--set`` overrides: :func:`studies.figures.setting`), for the studies that have one."""

    schema: dict
    run: Callable
    warmup: Callable | None = None
    plot: Callable | None = None
    description: str = ""
    table: Callable | None = None
    overlay: Callable | None = None


class _Discard:
    """The ``save_partial`` of a run called outside a sweep: nothing is kept, no progress reported."""

    def __call__(self, result: Result) -> None:
        pass

    def progress(self, done: int, total: int, unit: str = "epoch") -> None:
        pass

    def scratch(self) -> None:
        return None


discard = _Discard()


# ------------------------------------------------------------------------------------ paths
def run_file(runs_dir: str, rid: str) -> str:
    """The path of the run file of run ``rid``."""
    return os.path.join(runs_dir, f"{rid}.h5")


def partial_file(runs_dir: str, rid: str) -> str:
    """The path of the partial results of run ``rid``."""
    return os.path.join(runs_dir, f"{rid}.partial.h5")


def scratch_folder(runs_dir: str, rid: str) -> str:
    """The path of run ``rid``'s scratch folder (``PartialSave.scratch``)."""
    return os.path.join(runs_dir, f"{rid}.scratch")


def progress_file(runs_dir: str, rid: str) -> str:
    """The path of the progress report of run ``rid``."""
    return os.path.join(runs_dir, f"{rid}.progress")


def read_progress(runs_dir: str) -> dict:
    """{run_id: {"done", "total", "unit"}} of the runs that reported progress and have not ended (a file
    that vanishes or cannot be read while this looks is skipped: progress is only shown)."""
    try:
        names = os.listdir(runs_dir)
    except FileNotFoundError:
        return {}
    out = {}
    for n in names:
        m = PROGRESS_FILE.match(n)
        if m:
            try:
                with open(os.path.join(runs_dir, n)) as fh:
                    report = json.load(fh)
                out[m.group(1)] = {"done": int(report["done"]), "total": int(report["total"]),
                                   "unit": str(report["unit"])}
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return out


def list_run_files(runs_dir: str) -> list:
    """The run ids with a complete run file in ``runs_dir`` (temporary files are not runs)."""
    try:
        names = os.listdir(runs_dir)
    except FileNotFoundError:
        return []
    return sorted(n[:-3] for n in names if RUN_FILE.match(n))


# ------------------------------------------------------------------------------------ writing
def check_result(result) -> Result:
    """``result``, checked: a Result whose names and dims are allowed and whose values are numbers (TypeError,
    ValueError)."""
    if not isinstance(result, Result):
        raise TypeError(f"the task returned {type(result).__name__}, expected studies.runs.Result")
    for name, value in result.arrays.items():
        if not isinstance(name, str) or not name or "/" in name or name in RESERVED:
            raise ValueError(f"result array name {name!r} is not allowed (no '/', not {RESERVED})")
        try:
            dims, arr = value
        except (TypeError, ValueError):
            raise ValueError(f"result array {name!r} must be (dims, array)") from None
        arr = np.asarray(arr)
        dims = tuple(dims)
        if arr.ndim != len(dims) or not all(isinstance(d, str) and d and "/" not in d for d in dims):
            raise ValueError(f"result array {name!r}: dims {dims} do not name its {arr.ndim} axes")
        if arr.dtype.kind not in "biufc":
            raise ValueError(f"result array {name!r} has dtype {arr.dtype}; expected numbers")
    for name, value in result.scalars.items():
        if not isinstance(name, str) or not name or "/" in name or name in RESERVED:
            raise ValueError(f"result scalar name {name!r} is not allowed")
        if name in result.arrays:
            raise ValueError(f"result name {name!r} is both an array and a scalar; the archive needs one each")
        float(value)
    for name in result.objects:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"result object name {name!r} is not allowed (a non-empty name without '/')")
    return result


def _result_payload(result: Result | None):
    if result is None:
        return {}, {}, {}
    arrays = {k: np.asarray(a) for k, (d, a) in result.arrays.items()}
    data = {"arrays": arrays, "scalars": {k: np.float64(v) for k, v in result.scalars.items()}}
    dims = {k: list(d) for k, (d, a) in result.arrays.items()}
    coords = {k: [v.item() if isinstance(v, np.generic) else v for v in vals] for k, vals in result.coords.items()}
    return data, dims, coords


def write_run_file(run: Run, task_name: str, runs_dir: str, status: str, error: str, tb: str,
                   result: Result | None, timings: Mapping, path: str | None = None) -> str:
    """Write a run file (atomically); ``path`` defaults to ``runs_dir/<run_id>.h5``."""
    data, dims, coords = _result_payload(result)
    attrs = archive.provenance(run.config, run.seed, timings)
    attrs.update({
        "format": RUN_FORMAT, "run_id": run.run_id, "task": task_name, "status": status, "error": error,
        "traceback": tb, "coords": json.dumps(run.coords, default=str), "index": json.dumps(list(run.index)),
        "array_dims": json.dumps(dims), "array_coords": json.dumps(coords, default=str),
        "execution": uuid.uuid4().hex, "pid": os.getpid(),
    })
    path = os.path.abspath(path or run_file(runs_dir, run.run_id))
    objects = result.objects if result is not None and run.save_weights else {}

    def save_objects(f):
        for name, value in objects.items():
            obj, extra = value if isinstance(value, tuple) else (value, None)
            persist.save_into(f.require_group(WEIGHTS).create_group(name), obj, extra=extra)

    return archive.write_run(path, data, attrs, what="the run file",
                             hint="free some space and run the sweep again (the finished runs are kept)",
                             more=save_objects)


class PartialSave:
    """The ``save_partial`` of a run executing in a sweep: writes what the run has computed so far to
    ``runs/<run_id>.partial.h5`` (atomically), so that a run killed midway loses only the work since
    its last call; the sweep removes the file when the run ends."""

    def __init__(self, run: Run, task_name: str, runs_dir: str):
        self.run, self.task_name, self.runs_dir = run, task_name, runs_dir
        self._reported = None  # time.monotonic() of the last progress file written

    def __call__(self, result: Result) -> None:
        write_run_file(self.run, self.task_name, self.runs_dir, "partial", "", "", check_result(result), {},
                       path=partial_file(self.runs_dir, self.run.run_id))

    def scratch(self) -> str:
        """The run's scratch folder, created if need be (the files a killed writer left there removed:
        one worker at a time runs a run): what the run keeps there is found by the next execution of
        the same run (same task, config and seed) if this one dies, and removed once it ends."""
        folder = scratch_folder(self.runs_dir, self.run.run_id)
        os.makedirs(folder, exist_ok=True)
        archive.remove_temporary(folder)
        return folder

    def progress(self, done: int, total: int, unit: str = "epoch") -> None:
        """Report ``done`` of ``total`` units (epochs, methods, ...) of the run's work: written to
        ``runs/<run_id>.progress`` at once the first time, then at most every :data:`PROGRESS_EVERY`
        seconds; the sweep removes it when the run ends."""
        if not (isinstance(done, numbers.Integral) and isinstance(total, numbers.Integral) and 0 <= done <= total
                and total >= 1):
            raise ValueError(f"progress(done={done!r}, total={total!r}): expected integers 0 <= done <= total, "
                             "total >= 1")
        now = time.monotonic()
        if self._reported is not None and now - self._reported < PROGRESS_EVERY:
            return
        self._reported = now
        fd, tmp = tempfile.mkstemp(prefix=archive.TEMP_PREFIX, suffix=".h5", dir=self.runs_dir)  # removed if left
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"done": int(done), "total": int(total), "unit": unit}, fh)
            os.replace(tmp, progress_file(self.runs_dir, self.run.run_id))
        except OSError:  # progress is only shown: a full disk fails the run's own files, reported there
            with contextlib.suppress(OSError):
                os.remove(tmp)
