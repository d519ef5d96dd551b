"""Sweeps on a real Dask cluster: a scheduler and two workers started as separate processes on
127.0.0.1. Every study config sweeps at debug size on it, with results identical bit for bit to a
local sweep; a worker killed with SIGKILL in the middle of a sweep loses and duplicates no run; a run
that kills every worker it runs on is recorded as failed; an unreachable scheduler is a clear error."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import distributed  # noqa: F401,E402  (a dependency: dask[distributed])

from distributed import Client  # noqa: E402

from studies import archives  # noqa: E402
from studies import sweep as sw  # noqa: E402
from studies.catalogue import TASKS  # noqa: E402
from studies.catalogue.selftest import run_selftest  # noqa: E402
from studies.config import load_study  # noqa: E402
from studies.dask_executor import (DaskExecutor, DaskSweepError, DaskUnavailableError,  # noqa: E402
                                   _check_visible, _execute_on_worker, make_executor)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses SIGKILL and process groups")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from test_studies import CONFIGS  # noqa: E402  (the study configs, Fashion-MNIST ones marked)
HOST = "127.0.0.1"
START_TIMEOUT = 60


def _stop(proc: subprocess.Popen):
    """SIGTERM the process group (the worker's nanny and its worker process), then SIGKILL; bounded."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; make sure the rest of its group is too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


class Cluster:
    def __init__(self, tmp):
        self.tmp = tmp
        self.scheduler_file = str(tmp / "scheduler.json")
        self.procs = []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env = env

    def _start(self, args, log):
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=open(self.tmp / log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, workers=2):
        self._start(["distributed.cli.dask_scheduler", "--host", HOST, "--port", "0", "--no-dashboard",
                     "--scheduler-file", self.scheduler_file], "scheduler.log")
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.scheduler_file):
            assert time.monotonic() < deadline, self.log("scheduler.log")
            assert self.procs[0].poll() is None, self.log("scheduler.log")
            time.sleep(0.05)
        time.sleep(0.1)  # the file is written in one go, but give it a moment
        with open(self.scheduler_file) as fh:
            self.address = json.load(fh)["address"]
        assert self.address.startswith(f"tcp://{HOST}:"), self.address
        for i in range(workers):
            # a nanny per worker: a worker process killed is restarted, as on a real cluster
            self._start(["distributed.cli.dask_worker", self.address, "--host", HOST, "--nthreads", "1",
                         "--nworkers", "1", "--no-dashboard", "--nanny", "--death-timeout", "30",
                         "--local-directory", str(self.tmp / f"worker-{i}"), "--name", f"w{i}"], f"worker-{i}.log")
        self.client = Client(self.address, timeout=START_TIMEOUT, set_as_default=False)
        self.wait_for_workers(workers)
        return self

    def wait_for_workers(self, n=2):
        self.client.wait_for_workers(n, timeout=START_TIMEOUT)

    def workers(self) -> dict:
        """{worker address: pid of the worker process} (not the nanny's)."""
        return self.client.run(os.getpid)

    def log(self, name):
        try:
            return (self.tmp / name).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self):
        try:
            self.client.close(timeout=10)
        except Exception:  # noqa: BLE001 - tearing down
            pass
        for proc in reversed(self.procs):  # workers first, then the scheduler
            _stop(proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("dask"))
    try:
        c.start()
        yield c
    finally:
        c.stop()
    assert all(p.poll() is not None for p in c.procs)


def _timing(name: str) -> bool:
    return name.endswith("seconds")  # wall-clock times: the only results that may differ between runs


def _assert_same_bits(a: np.ndarray, b: np.ndarray, what: str):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if a.dtype.kind in "biufc":
        assert a.tobytes() == b.tobytes(), what  # bit for bit, NaN payloads included
    else:
        assert np.array_equal(a, b), what


# the two longest studies on the cluster (133 and 89 s of a CI run on 2 cores, a fifth of the default set's time):
# run with -m slow; their local sweeps and archive digests stay in the default set (test_studies.py)
SLOW_ON_DASK = ("meta_prior.toml", "dpm_customise.toml")
DASK_CONFIGS = [pytest.param(p, marks=pytest.mark.slow) if isinstance(p, str) and os.path.basename(p) in SLOW_ON_DASK
                else p for p in CONFIGS]


@pytest.mark.parametrize("path", DASK_CONFIGS, ids=os.path.basename)
def test_debug_sweep_on_dask_matches_a_local_sweep_bit_for_bit(cluster, config_archives, tmp_path, path):
    """The local sweep is conftest.py's ``config_archives`` (on the local process pool), shared with
    test_studies.py, which checks its digests."""
    study = load_study(path, "debug", tasks=TASKS)
    cluster.wait_for_workers(2)
    executor = make_executor(cluster.address, 2)
    assert isinstance(executor, DaskExecutor)
    stats = {}
    dask_archive = sw.run_sweep(study, str(tmp_path / "dask"), executor=executor, progress=False, stats=stats)
    n = len(study.runs())
    assert stats["ran"] == n and stats["done"] + stats["failed"] == n
    local_archive = config_archives[path][1]
    local_runs = sw.runs_folder(os.path.dirname(local_archive))

    dask, local = archives.open_dataset(dask_archive), archives.open_dataset(local_archive)
    assert int(dask.attrs["n_runs"]) == n and int(dask.attrs["n_missing"]) == 0
    assert int(dask.attrs["n_done"]) == int(local.attrs["n_done"]) > 0
    assert set(dask.data_vars) == set(local.data_vars) and set(dask.coords) == set(local.coords)
    compared = [v for v in dask.data_vars if not _timing(v)]
    assert {"run_id", "status"} <= set(compared) and len(compared) > 3
    for name in compared:
        _assert_same_bits(dask[name].values, local[name].values, name)
    for name in dask.coords:
        _assert_same_bits(dask[name].values, local[name].values, name)

    # and each run's own file
    for run in study.runs():
        a = sw.read_run(sw.run_file(str(tmp_path / "dask" / "runs"), run.run_id))
        b = sw.read_run(sw.run_file(local_runs, run.run_id))
        assert a["attrs"]["status"] == b["attrs"]["status"] and a["attrs"]["error"] == b["attrs"]["error"]
        assert a["attrs"]["pid"] != os.getpid()  # really ran elsewhere
        assert set(a["arrays"]) == set(b["arrays"]) and set(a["scalars"]) == set(b["scalars"])
        for name in a["arrays"]:
            if not _timing(name):
                assert a["arrays"][name][0] == b["arrays"][name][0]
                _assert_same_bits(a["arrays"][name][1], b["arrays"][name][1], f"{run.run_id}/{name}")
        for name in a["scalars"]:
            if not _timing(name):
                _assert_same_bits(np.float64(a["scalars"][name]), np.float64(b["scalars"][name]), name)


def selftest_study(tmp_path, values, seeds, sleep, fail=None, name="dasktest"):
    fail = fail or {}
    text = f"""
[study]
name = "{name}"
task = "selftest"
[base]
sleep = {sleep}
size = 16
[sweep]
seeds = {list(seeds)}
[sweep.zip]
value = {[float(v) for v in values]}
fail = {json.dumps([fail.get(v, "none") for v in values])}
"""
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_study(str(path), tasks=TASKS)


class KillWhileRunning:
    """Wraps a DaskExecutor: after the ``after``-th summary, SIGKILLs the worker process that sent it,
    once it has started its next run (the run it loses in flight). Records every summary."""

    def __init__(self, executor, cluster, after=3):
        self.executor, self.cluster, self.after = executor, cluster, after
        self.warm_driver_cache = executor.warm_driver_cache
        self.summaries, self.killed = [], None

    def run(self, runs, task_name, runs_dir, progress=False):
        for summary in self.executor.run(runs, task_name, runs_dir, progress):
            self.summaries.append(summary)
            if len(self.summaries) == self.after:
                self._kill(summary["worker"], runs_dir)
            yield summary

    def _kill(self, worker, runs_dir):
        deadline = time.monotonic() + 10
        while True:  # the worker's next run, started (each run sleeps 0.5 s: it is far from done)
            keys = self.cluster.client.processing(workers=[worker]).get(worker, [])
            if keys:
                break
            assert time.monotonic() < deadline, "the worker got no next run"
            time.sleep(0.01)
        time.sleep(0.1)
        rid = str(keys[0]).split("-")[2]
        pid = self.cluster.workers()[worker]
        os.kill(pid, signal.SIGKILL)
        in_flight = not os.path.exists(sw.run_file(runs_dir, rid))
        self.killed = {"worker": worker, "pid": pid, "run_id": rid, "in_flight": in_flight}


def _check_complete(out, study, expected_status="done"):
    runs_dir = os.path.join(out, "runs")
    expected = {r.run_id for r in study.runs()}
    # exactly one complete file per run and nothing else: no duplicates, no temporary files left
    assert sorted(os.listdir(runs_dir)) == sorted(f"{rid}.h5" for rid in expected)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    with h5py.File(os.path.join(out, f"{study.name}.h5"), "r") as f:
        assert sorted(f["runs"]) == sorted(expected)
        assert int(f.attrs["n_runs"]) == len(expected) and int(f.attrs["n_missing"]) == 0
        run_ids = f["data"]["run_id"].asstr()[()].ravel()
        assert sorted(run_ids) == sorted(expected)
    return expected


def test_a_worker_killed_mid_sweep_loses_and_duplicates_no_run(cluster, tmp_path):
    study = selftest_study(tmp_path, values=range(1, 9), seeds=[0, 1], sleep=0.5)  # 16 runs, 0.5 s each
    cluster.wait_for_workers(2)
    before = cluster.workers()
    wrapper = KillWhileRunning(DaskExecutor(cluster.address), cluster)
    out = str(tmp_path / "out")
    stats = {}
    start = time.monotonic()
    archive = sw.run_sweep(study, out, executor=wrapper, progress=False, stats=stats)
    elapsed = time.monotonic() - start

    killed = wrapper.killed
    assert killed is not None and killed["in_flight"], killed
    assert killed["pid"] in before.values()
    # every run reported once, and done
    ids = [s["run_id"] for s in wrapper.summaries]
    assert len(ids) == len(set(ids)) == len(study.runs())
    assert stats == {"total": 16, "skipped": 0, "ran": 16, "done": 16, "failed": 0}
    expected = _check_complete(out, study)
    assert set(ids) == expected
    # each run's file is the one its summary reported: nothing ran again after it was reported
    for summary in wrapper.summaries:
        f = sw.read_run(sw.run_file(os.path.join(out, "runs"), summary["run_id"]))
        assert f["attrs"]["execution"] == summary["execution"], summary
    # the run lost in flight was run again, on another worker process
    lost = sw.read_run(sw.run_file(os.path.join(out, "runs"), killed["run_id"]))
    assert lost["attrs"]["status"] == "done" and lost["attrs"]["pid"] != killed["pid"]
    # and its results, like every run's, are those of the task
    ds = archives.open_dataset(archive)
    assert (ds["status"] == "done").all()
    for run in study.runs():
        want = run_selftest(dict(run.config, sleep=0.0), run.seed).arrays["trace"][1]
        _assert_same_bits(ds["trace"].values[run.index], want, run.run_id)
    assert elapsed < 30
    # the nanny restarted the killed worker: the cluster is whole again for the next tests
    cluster.wait_for_workers(2)
    assert killed["pid"] not in cluster.workers().values()


def test_a_run_that_kills_every_worker_it_runs_on_is_recorded_as_failed(cluster, tmp_path):
    # the crashing run is last, so that the others are done when its retries take workers down
    study = selftest_study(tmp_path, values=[1.0, 2.0, 3.0, 4.0], seeds=[0], sleep=0.0, fail={4.0: "crash"},
                           name="crashtest")
    cluster.wait_for_workers(2)
    out = str(tmp_path / "out")
    stats = {}
    archive = sw.run_sweep(study, out, executor=DaskExecutor(cluster.address), progress=False, stats=stats)
    assert stats["ran"] == 4 and stats["done"] == 3 and stats["failed"] == 1
    _check_complete(out, study)
    ds = archives.open_dataset(archive)
    status = dict(zip(ds["value"].values.tolist(), ds["status"].values[:, 0].tolist()))
    assert status == {1.0: "done", 2.0: "done", 3.0: "done", 4.0: "failed"}
    error = str(ds["error"].values[3, 0])
    assert "Dask worker running this run died" in error and "allowed-failures" in error
    cluster.wait_for_workers(2)


class KillSchedulerAfter:
    """Wraps a DaskExecutor: SIGKILLs the scheduler after the ``after``-th summary."""

    warm_driver_cache = True

    def __init__(self, executor, cluster, after=3):
        self.executor, self.cluster, self.after, self.reported = executor, cluster, after, 0

    def run(self, runs, task_name, runs_dir, progress=False):
        for summary in self.executor.run(runs, task_name, runs_dir, progress):
            self.reported += 1
            if self.reported == self.after:
                os.killpg(self.cluster.procs[0].pid, signal.SIGKILL)
            yield summary


def test_losing_the_scheduler_stops_the_sweep_and_the_next_sweep_resumes_it(tmp_path):
    study = selftest_study(tmp_path, values=range(1, 9), seeds=[0, 1], sleep=0.5, name="losttest")
    out = str(tmp_path / "out")
    (tmp_path / "first").mkdir()
    first = Cluster(tmp_path / "first")
    try:
        first.start()
        wrapper = KillSchedulerAfter(DaskExecutor(first.address), first)
        start = time.monotonic()
        with pytest.raises(DaskSweepError, match="lost the Dask scheduler .* run the sweep again to resume"):
            sw.run_sweep(study, out, executor=wrapper, progress=False)
        assert time.monotonic() - start < 30
    finally:
        first.stop()
    done_before = sw.list_run_files(os.path.join(out, "runs"))
    assert wrapper.reported <= len(done_before) < 16  # reported runs have their file; some runs are left

    (tmp_path / "second").mkdir()
    second = Cluster(tmp_path / "second")
    try:
        second.start()
        stats = {}
        sw.run_sweep(study, out, executor=DaskExecutor(second.address), progress=False, stats=stats)
    finally:
        second.stop()
    assert stats == {"total": 16, "skipped": len(done_before), "ran": 16 - len(done_before),
                     "done": 16 - len(done_before), "failed": 0}
    _check_complete(out, study)


def test_a_run_file_the_driver_cannot_see_is_a_clear_error(tmp_path):
    with pytest.raises(DaskSweepError, match="must share the run folder's file system"):
        _check_visible(str(tmp_path / "runs" / "0123456789abcdef.h5"), {"host": "elsewhere"}, wait=0.2)


def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port with nobody listening
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    study = selftest_study(tmp_path, values=[1.0], seeds=[0], sleep=0.0)
    start = time.monotonic()
    with pytest.raises(DaskSweepError, match=f"cannot reach the Dask scheduler at tcp://{HOST}:{port}"):
        sw.run_sweep(study, str(tmp_path / "out"), executor=DaskExecutor(f"tcp://{HOST}:{port}", connect_timeout=2),
                     progress=False)
    assert time.monotonic() - start < 20
    assert sw.list_run_files(str(tmp_path / "out" / "runs")) == []


def test_make_executor_and_arguments(monkeypatch):
    local = make_executor(None, 3)
    assert isinstance(local, sw.LocalExecutor) and local.workers == 3
    assert isinstance(make_executor("", 1), sw.LocalExecutor)
    assert make_executor("tcp://127.0.0.1:8786", 1).address == "tcp://127.0.0.1:8786"
    for bad in ({"retries": -1}, {"connect_timeout": 0}):
        with pytest.raises(ValueError):
            DaskExecutor("tcp://127.0.0.1:8786", **bad)
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if it were not installed
    with pytest.raises(DaskUnavailableError, match=r"pip install 'dask\[distributed\]'"):
        make_executor("tcp://127.0.0.1:8786", 1)
    assert isinstance(make_executor(None, 1), sw.LocalExecutor)  # the local pool does not need it


def test_a_task_run_again_after_its_run_finished_does_not_execute_it_twice(tmp_path):
    """The scheduler runs a task again when the worker holding its result died before the driver
    fetched it: that attempt finds the file written since submission and reports it."""
    study = selftest_study(tmp_path, values=[1.0], seeds=[0], sleep=0.0)
    run = study.runs()[0].to_dict()
    runs_dir = str(tmp_path / "runs")
    first = _execute_on_worker(run, study.task, runs_dir, None)
    assert first["status"] == "done" and not first["reused"] and first["worker"] is None
    again = _execute_on_worker(run, study.task, runs_dir, None)  # same submission, second attempt
    assert again["reused"] and again["execution"] == first["execution"] and again["status"] == "done"
    assert again["seconds"] == first["seconds"]
    assert sw.read_run(sw.run_file(runs_dir, run["run_id"]))["attrs"]["execution"] == first["execution"]
    # a later submission that saw this file (--retry-failed) runs it
    retried = _execute_on_worker(run, study.task, runs_dir, first["execution"])
    assert not retried["reused"] and retried["execution"] != first["execution"]
    assert sw.list_run_files(runs_dir) == [run["run_id"]] and len(os.listdir(runs_dir)) == 1


# ------------------------------------------------------------------------------------ a private cluster
def _listening(pids) -> list:
    """(ip, port) of every socket the processes ``pids`` listen on."""
    import psutil

    out = []
    for pid in pids:
        out += [c.laddr[:2] for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A self-signed CA and one certificate it signed (scheduler, workers and client share it), made
    with openssl(1) for this test."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl(1) to make a test CA and certificate")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca"],
                ["req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1"],
                ["x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", "node.pem", "-days", "2"]):
        subprocess.run(["openssl", *cmd], cwd=d, check=True, capture_output=True, timeout=60)
    return {k: str(d / f) for k, f in (("ca", "ca.pem"), ("cert", "node.pem"), ("key", "node.key"))}


def _tls_options(certs):
    return ["--tls-ca-file", certs["ca"], "--tls-cert", certs["cert"], "--tls-key", certs["key"]]


def test_a_tls_cluster_on_127_0_0_1_runs_a_sweep_with_the_tls_options(certs, tmp_path, monkeypatch):
    """A cluster bound to 127.0.0.1 with TLS, scheduler and dashboard included; the sweep reaches it with
    --tls-* or a Dask security config file. (In-process workers: their runs set this process's thread
    variables, restored by monkeypatch.)"""
    from click.testing import CliRunner
    from distributed import LocalCluster, Security

    from studies.cli import main

    for v in sw.THREAD_VARIABLES:
        monkeypatch.setenv(v, os.environ.get(v, ""))
    node = dict(tls_ca_file=certs["ca"], require_encryption=True)
    for role in ("scheduler", "worker", "client"):
        node.update({f"tls_{role}_cert": certs["cert"], f"tls_{role}_key": certs["key"]})
    study = selftest_study(tmp_path, values=[1.0, 2.0], seeds=[0, 1], sleep=0.0)
    config = tmp_path / "dask-security.yaml"
    config.write_text(f"distributed:\n  comm:\n    tls:\n      ca-file: {certs['ca']}\n      client:\n"
                      f"        cert: {certs['cert']}\n        key: {certs['key']}\n")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls", host=HOST,
                      dashboard_address=f"{HOST}:0", security=Security(**node)) as cluster:
        address = cluster.scheduler_address
        assert address.startswith(f"tls://{HOST}:") and cluster.dashboard_link.startswith(f"http://{HOST}:")
        listening = _listening([os.getpid()])
        assert listening and all(ip == HOST for ip, port in listening), listening  # nothing on 0.0.0.0
        runner = CliRunner()
        for out, options in (("tls", _tls_options(certs)), ("config", ["--security-config", str(config)])):
            result = runner.invoke(main, ["sweep", study.path, "--out", str(tmp_path / out), "--quiet",
                                          "--scheduler", address, *options])
            assert result.exit_code == 0, result.output
            assert "ran 4 runs (4 done, 0 failed)" in result.output
            assert sorted(sw.list_run_files(str(tmp_path / out / "runs"))) == sorted(r.run_id for r in study.runs())
        executor = DaskExecutor(cluster)  # a cluster object: its own security
        assert executor.security is cluster.security
        stats = {}
        sw.run_sweep(study, str(tmp_path / "object"), executor=executor, progress=False, stats=stats)
        assert stats["ran"] == stats["done"] == 4
        # without the options: refused at once, before any connection (was a traceback after 60 s)
        result = runner.invoke(main, ["sweep", study.path, "--out", str(tmp_path / "none"), "--scheduler", address])
        assert result.exit_code == 1 and result.stderr.startswith(f"substrate: error: the Dask scheduler {address} "
                                                                  "uses TLS, but no CA file and client certificate")
        assert "--tls-ca-file and --tls-cert" in result.stderr and not (tmp_path / "none").exists()


def test_tls_options_are_checked_before_connecting(certs, tmp_path):
    with pytest.raises(ValueError, match="tls://127.0.0.1:1 uses TLS, but no CA file and client certificate"):
        DaskExecutor("tls://127.0.0.1:1")
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": "tls://127.0.0.1:1"}))
    with pytest.raises(ValueError, match="tls://127.0.0.1:1 uses TLS"):  # an address read from a scheduler file
        make_executor(str(scheduler_file), 1)
    with pytest.raises(ValueError, match="tcp://127.0.0.1:1 is not tls://: the connection would not be encrypted"):
        make_executor("tcp://127.0.0.1:1", 1, tls_ca_file=certs["ca"], tls_cert=certs["cert"])
    with pytest.raises(ValueError, match="TLS needs --tls-ca-file and --tls-cert .*; given: --tls-cert"):
        make_executor("tls://127.0.0.1:1", 1, tls_cert=certs["cert"])
    with pytest.raises(ValueError, match="TLS options are given without --scheduler"):
        make_executor(None, 1, tls_ca_file=certs["ca"])
    with pytest.raises(ValueError, match="--security-config .* and --tls-\\* options given together"):
        make_executor("tls://127.0.0.1:1", 1, tls_ca_file=certs["ca"], security_config=str(scheduler_file))
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed:\n  comm:\n    tls:\n      ca-file: /nonexistent/ca.pem\n")
    with pytest.raises(ValueError, match="distributed.comm.tls.ca-file and distributed.comm.tls.client.cert are "
                                         "needed"):
        make_executor("tls://127.0.0.1:1", 1, security_config=str(bad))
    executor = make_executor("tls://127.0.0.1:1", 1, tls_ca_file=certs["ca"], tls_cert=certs["cert"],
                             tls_key=certs["key"])
    assert executor.security.tls_ca_file == certs["ca"] and executor.security.require_encryption


@pytest.mark.slow
def test_the_readme_commands_keep_a_cluster_private(certs, tmp_path):
    """The README's commands: a TLS scheduler and a worker (with its nanny) bound to 127.0.0.1, their
    dashboards included, as separate processes; a sweep through the CLI reaches them."""
    import psutil

    tls = ["--tls-ca-file", certs["ca"], "--tls-cert", certs["cert"], "--tls-key", certs["key"]]
    c = Cluster(tmp_path)
    try:
        c._start(["distributed.cli.dask_scheduler", "--protocol", "tls", "--host", HOST, "--port", "0",
                  "--dashboard-address", f"{HOST}:0", *tls, "--scheduler-file", c.scheduler_file], "scheduler.log")
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(c.scheduler_file):
            assert time.monotonic() < deadline and c.procs[0].poll() is None, c.log("scheduler.log")
            time.sleep(0.05)
        time.sleep(0.1)
        with open(c.scheduler_file) as fh:
            address = json.load(fh)["address"]
        assert address.startswith(f"tls://{HOST}:")
        c._start(["distributed.cli.dask_worker", "--scheduler-file", c.scheduler_file, "--protocol", "tls",
                  "--host", HOST, "--dashboard-address", f"{HOST}:0", "--nthreads", "1", "--nanny", *tls,
                  "--local-directory", str(tmp_path / "w")], "worker.log")
        study = selftest_study(tmp_path, values=[1.0, 2.0], seeds=[0], sleep=0.0)
        done = subprocess.run([sys.executable, "-m", "studies.cli", "sweep", study.path, "--out",
                               str(tmp_path / "out"), "--quiet", "--scheduler", c.scheduler_file, *tls],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:] + c.log("worker.log")
        assert "ran 2 runs (2 done, 0 failed)" in done.stdout
        pids = [p.pid for proc in c.procs
                for p in (psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True))]
        listening = _listening(pids)
        assert len(listening) >= 5, listening  # scheduler + its dashboard, nanny, worker + its dashboard
        assert all(ip == HOST for ip, port in listening), listening
    finally:
        for proc in reversed(c.procs):
            _stop(proc)
