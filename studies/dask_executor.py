"""Run a sweep on a Dask distributed cluster.

:class:`DaskExecutor` is an executor for :func:`studies.sweep.run_sweep`: it submits
:func:`studies.sweep.execute_run` once per run to a running Dask scheduler and yields each run's
summary as it finishes. Start a cluster by hand::

    dask scheduler --scheduler-file sched.json
    dask worker --scheduler-file sched.json --nthreads 1 --nworkers 4     # on each machine

or with ``dask-jobqueue`` (``SLURMCluster(...).scale(jobs=...)``; its ``scheduler_address``), and pass
the scheduler's address (``tcp://host:8786``) or the scheduler file to ``substrate sweep --scheduler``.

Requirements. The run folder must be on a file system that the driver and every worker share (each
worker writes its runs' files there); the workers need this package installed (the same version:
the run ids and the results depend on it). Give each worker process one thread (``--nthreads 1``,
as many ``--nworkers`` as cores): a run is single-threaded (one BLAS and one Numba thread, set here
and by :func:`studies.sweep.execute_run`), and threads of one process share its GIL and its thread
limits.

Reliability. A run file is written atomically under the run's id, so a run executed twice (a worker
killed or lost while running it, the scheduler then handing it to another) leaves one complete file;
nothing partial is taken for a run. A finished run is not executed again: when the worker holding
its (tiny) result dies before the driver fetched it, the scheduler runs the task again, and that
attempt finds the run's file written since the sweep submitted it and returns its summary. Each run
is reported to the driver once. A run whose worker dies ``distributed.scheduler.allowed-failures`` + 1
times (default 3 + 1: a run that crashes its process, or exhausts its memory) is recorded as failed
and the sweep goes on (Dask counts a death against every task assigned to that worker, the running
one and, with the default ``worker-saturation`` 1.1, one queued behind it; 1.0 counts only the
running one). Losing the scheduler stops the sweep with an error; the finished runs are kept, and
running the sweep again resumes it. Temporary files of killed workers are removed when every run is
done.

``distributed`` is imported only when a :class:`DaskExecutor` is made: the rest of the package does
not need it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from concurrent.futures import CancelledError
from typing import Iterable, Iterator

# What the driver and the workers import of this module is kept light: a worker unpickling
# _execute_on_worker imports this module, sets its thread variables, and only then loads numpy/numba.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS", "NUMBA_NUM_THREADS")

MISSING = ("the Dask executor needs the 'distributed' package: pip install 'dask[distributed]' "
           "(it is a dependency of substrate; reinstall the package) [{error}]")


class DaskUnavailableError(ImportError):
    """``distributed`` is not installed."""


def _import_distributed():
    try:
        import distributed
    except ImportError as e:
        raise DaskUnavailableError(MISSING.format(error=e)) from e
    return distributed


def _written(path: str) -> dict | None:
    """{execution, status, error, seconds} of a complete run file, or None when there is none (readable)."""
    from substrate import archive

    try:
        with archive.open_file(path) as f:  # ArchiveError is a ValueError: a FIFO or a damaged file is none
            a = f.attrs
            timings = json.loads(a.get("timings", "{}"))
            return {"execution": str(a["execution"]), "status": str(a["status"]),
                    "error": str(a.get("error", "")), "seconds": float(timings.get("run_seconds", float("nan")))}
    except (OSError, KeyError, ValueError):
        return None


def _execute_on_worker(run: dict, task_name: str, runs_dir: str, previous: str | None = None) -> dict:
    """What a Dask worker runs: :func:`studies.sweep.execute_run` with one thread for BLAS, OpenMP and
    Numba (the variables take effect for the libraries not loaded yet; ``execute_run`` limits the loaded
    ones).

    ``previous``: the ``execution`` of the run's file when the driver submitted it (None: no file).
    When the file has changed since, an earlier attempt of this task wrote it (the scheduler runs a task
    again when the worker holding its result died before the driver fetched it): the run is not
    executed twice, its file's summary is returned (``reused``: True). The summary also gives the
    file's ``execution``, and the worker's ``host`` and address."""
    for v in THREAD_VARIABLES:
        # Numba refuses a NUMBA_NUM_THREADS changed after its threads started: only before it is loaded
        if v != "NUMBA_NUM_THREADS" or "numba" not in sys.modules:
            os.environ[v] = "1"
    from studies.sweep import execute_run, run_file

    path = run_file(runs_dir, run["run_id"])
    written = _written(path)
    if written is not None and written["execution"] != previous:
        summary = {"run_id": run["run_id"], "status": written["status"], "error": written["error"],
                   "seconds": written["seconds"], "reused": True}
    else:
        summary = execute_run(run, task_name, runs_dir)
        summary["reused"] = False
        written = _written(path)
    summary["execution"] = written["execution"] if written else None
    summary["host"] = socket.gethostname()
    try:
        from distributed import get_worker

        summary["worker"] = get_worker().address
    except (ImportError, ValueError):  # called outside a Dask worker
        summary["worker"] = None
    return summary


class DaskSweepError(RuntimeError):
    """The sweep could not go on on the Dask cluster (scheduler lost, run folder not shared)."""


class DaskExecutor:
    """Executor of :func:`studies.sweep.run_sweep` on a Dask distributed cluster.

    ``address``: the scheduler's address (``tcp://host:port``), a scheduler file (the JSON written by
    ``dask scheduler --scheduler-file``), or a cluster object (e.g. a ``dask_jobqueue.SLURMCluster`` or
    ``distributed.LocalCluster``). ``security``: a ``distributed.Security`` (see :func:`tls_security`);
    None takes a cluster object's own, or else Dask's configuration (``distributed.comm.tls.*``). A
    ``tls://`` address without a CA and a client certificate is refused at once (Dask would retry until
    ``connect_timeout``).
    ``connect_timeout``: seconds to reach the scheduler. ``retries``:
    times a run is resubmitted after an error of the worker function itself (an error of the task is
    recorded in the run's file, not raised; this covers e.g. a transient I/O error writing the file).
    A run whose *worker dies* is recomputed by the scheduler on another worker regardless, up to
    ``distributed.scheduler.allowed-failures`` times (a scheduler setting).
    """

    # the driver shares the workers' file system (the run folder), and so, usually, the Numba cache
    # beside the package: compiling the kernels once here saves each worker compiling them
    warm_driver_cache = True

    def __init__(self, address, *, security=None, connect_timeout: float = 30.0, retries: int = 2):
        distributed = _import_distributed()
        if isinstance(address, str):
            address = address.strip()
            if not address:
                raise ValueError("the Dask scheduler address is empty")
        elif address is None:
            raise ValueError("a Dask scheduler address is required")
        if security is None:  # a cluster object's own, else Dask's configuration
            security = getattr(address, "security", None) or distributed.Security()
        _check_tls(_scheme_address(address), security)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries={retries!r} must be an integer >= 0")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout={connect_timeout!r} must be positive")
        self.address = address
        self.security = security
        self.connect_timeout = float(connect_timeout)
        self.retries = retries

    def __repr__(self):
        return f"DaskExecutor({self.address!r})"

    def _client(self):
        distributed = _import_distributed()
        kwargs = dict(timeout=self.connect_timeout, set_as_default=False, security=self.security)
        target = self.address
        try:
            if _is_scheduler_file(target):
                return distributed.Client(scheduler_file=target, **kwargs)
            return distributed.Client(target, **kwargs)
        except (OSError, TimeoutError) as e:
            raise DaskSweepError(f"cannot reach the Dask scheduler at {target} within "
                                 f"{self.connect_timeout:g} s ({type(e).__name__}: {e})") from e

    def run(self, runs: Iterable, task_name: str, runs_dir: str, progress: bool = False) -> Iterator[dict]:
        """Execute ``runs`` on the cluster; yields each run's summary as it finishes (in completion order).
        ``progress`` is accepted for the executor interface (the driver draws the bar)."""
        from studies.config import Run
        from studies.sweep import record_failure, run_file

        distributed = _import_distributed()
        from distributed.comm.core import CommClosedError
        from distributed.scheduler import KilledWorker

        pending = [r.to_dict() if isinstance(r, Run) else dict(r) for r in runs]
        if not pending:
            return
        runs_dir = os.path.abspath(runs_dir)
        client = self._client()
        futures = {}
        try:
            nonce = uuid.uuid4().hex[:12]  # new keys each sweep: a resumed sweep is not served old results
            for r in pending:
                key = f"substrate-run-{r['run_id']}-{nonce}"
                previous = _written(run_file(runs_dir, r["run_id"]))  # a failed run's file, when retried
                fut = client.submit(_execute_on_worker, r, task_name, runs_dir,
                                    previous["execution"] if previous else None, key=key, pure=False,
                                    retries=self.retries)
                futures[fut] = r
            reported = 0
            for fut in distributed.as_completed(list(futures), loop=client.loop):
                run = futures[fut]
                try:
                    summary = fut.result()
                except KilledWorker as e:
                    summary = record_failure(run, task_name, runs_dir, WORKER_DIED.format(error=e))
                except (CancelledError, CommClosedError) as e:  # the scheduler was lost, or restarted
                    why = " ".join(str(e).split())
                    raise DaskSweepError(f"lost the Dask scheduler {self.address} while waiting for run "
                                         f"{run['run_id']} ({type(e).__name__}: {why}); {reported} of the "
                                         f"{len(futures)} runs submitted had finished; run the sweep again to "
                                         "resume") from e
                else:
                    _check_visible(run_file(runs_dir, run["run_id"]), summary)
                reported += 1
                yield summary
            # every run has its file: what killed workers left half-written can go
            from substrate import archive

            archive.remove_temporary(runs_dir)
        finally:  # the consumer stopped (Ctrl-C), an error, or the end: release what is left
            left = [f for f in futures if not f.done()]
            try:
                if left:
                    client.cancel(left)
            except Exception:  # noqa: BLE001 - the scheduler is gone: nothing to release there
                pass
            finally:
                client.close(timeout=10)


WORKER_DIED = ("the Dask worker running this run died every time it was tried (killed by a signal, out of "
               "memory, or a crash in compiled code; distributed.scheduler.allowed-failures): {error}")


def _check_visible(path: str, summary: dict, wait: float = 60.0):
    """The driver must see the file the worker wrote; a network file system may take a while (its
    attribute cache: up to a minute)."""
    deadline = time.monotonic() + wait
    folder, name = os.path.split(path)
    while not (os.path.exists(path) or name in _listdir(folder)):
        if time.monotonic() > deadline:
            raise DaskSweepError(f"a Dask worker on {summary.get('host', '?')} wrote {path}, which this driver "
                                 f"on {socket.gethostname()} cannot see: the driver and the workers must share "
                                 "the run folder's file system")
        time.sleep(0.5)


def _listdir(folder: str) -> list:
    try:
        return os.listdir(folder)
    except OSError:
        return []


PROTOCOLS = ("tcp://", "tls://", "inproc://", "ws://", "wss://", "ucx://")
TLS_OPTIONS = ("--tls-ca-file and --tls-cert (and --tls-key when the certificate file does not hold the key), "
               "or --security-config")


def _is_scheduler_file(target) -> bool:
    return isinstance(target, str) and not target.startswith(PROTOCOLS) and os.path.isfile(target)


def _scheme_address(target) -> str | None:
    """The address a target names: itself, the ``address`` of a scheduler file, or a cluster's
    ``scheduler_address`` (None when there is none to read: the connection then tells)."""
    if _is_scheduler_file(target):
        try:
            with open(target, "rb") as fh:
                return str(json.load(fh)["address"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not (yet) a scheduler file: distributed reports it, or waits for it
    if isinstance(target, str):
        return target
    return getattr(target, "scheduler_address", None)


def _check_tls(address: str | None, security):
    """A ``tls://`` scheduler needs a CA file and a client certificate (Dask makes no TLS context
    without both, and then retries until its timeout); TLS files given for a non-TLS address would
    silently leave the connection unencrypted."""
    tls = address is not None and address.startswith(("tls://", "wss://"))
    has = bool(getattr(security, "tls_ca_file", None) and getattr(security, "tls_client_cert", None))
    if tls and not has:
        raise ValueError(f"the Dask scheduler {address} uses TLS, but no CA file and client certificate are "
                         f"given; allowed: {TLS_OPTIONS} (or distributed.comm.tls.* in Dask's configuration)")
    if has and getattr(security, "require_encryption", False) and address is not None \
            and not tls and not address.startswith("inproc://"):
        raise ValueError(f"TLS certificates are given but the Dask scheduler address {address} is not "
                         "tls://: the connection would not be encrypted; allowed: a tls://host:port address")


def tls_security(ca_file: str | None = None, cert: str | None = None, key: str | None = None,
                 config_file: str | None = None):
    """The ``distributed.Security`` of ``substrate sweep``'s TLS options: a CA file and this client's
    certificate (and key, when the certificate file does not hold it), or a Dask config file (YAML)
    whose ``distributed.comm.tls`` gives them. None when no option is given (Dask's own configuration
    then applies). Encryption is then required: a plain ``tcp://`` address is refused."""
    distributed = _import_distributed()
    if config_file is not None:
        if ca_file or cert or key:
            raise ValueError(f"--security-config {config_file} and --tls-* options given together; allowed: "
                             "one or the other")
        import dask
        import yaml

        try:
            with open(config_file, "rb") as fh:
                config = yaml.safe_load(fh)
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--security-config {config_file}: not a readable YAML file ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"--security-config {config_file}: not a mapping of Dask settings; allowed: "
                             "distributed: {comm: {tls: {ca-file: ..., client: {cert: ..., key: ...}}}}")
        with dask.config.set(_dotted(config)):  # dotted keys: set() would replace a nested table whole
            security = distributed.Security(require_encryption=True)
        if not (security.tls_ca_file and security.tls_client_cert):
            raise ValueError(f"--security-config {config_file}: distributed.comm.tls.ca-file and "
                             "distributed.comm.tls.client.cert are needed; allowed: a Dask config file that "
                             "sets both (and client.key when the certificate file does not hold the key)")
        for what in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
            path = getattr(security, what)
            if path and "\n" not in path and not os.path.isfile(path):  # a PEM text holds a newline
                raise ValueError(f"--security-config {config_file}: {what} = {path}: no such file")
        return security
    if not (ca_file or cert or key):
        return None
    if not (ca_file and cert):
        raise ValueError(f"TLS needs {TLS_OPTIONS}; given: " +
                         ", ".join(f"{k} {v}" for k, v in (("--tls-ca-file", ca_file), ("--tls-cert", cert),
                                                           ("--tls-key", key)) if v))
    return distributed.Security(tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key,
                                require_encryption=True)


def _dotted(tree: dict, prefix: str = "") -> dict:
    """A nested config as {"a.b.c": value}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def make_executor(scheduler: str | None, workers: int, *, tls_ca_file: str | None = None,
                  tls_cert: str | None = None, tls_key: str | None = None, security_config: str | None = None):
    """The executor of ``substrate sweep``: a :class:`DaskExecutor` on ``scheduler`` (address or scheduler
    file) when given, with the TLS options of :func:`tls_security`, else a local pool of ``workers``
    processes (``workers`` is not used with a scheduler: the cluster's workers run the runs)."""
    tls = (tls_ca_file, tls_cert, tls_key, security_config)
    if scheduler:
        return DaskExecutor(scheduler, security=tls_security(*tls))
    if any(tls):
        raise ValueError("TLS options are given without --scheduler; allowed: TLS with a tls:// scheduler only")
    from studies.sweep import LocalExecutor

    return LocalExecutor(workers)
