"""The sweep driver killed with SIGKILL at random moments, ten times and more, then resumed: every file
stays readable, temporary files are never taken for runs, workers die with the driver, no finished
run is executed twice, and the last resume completes exactly the missing runs."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import h5py
import pytest

from studies import archives
from studies import sweep as sw
from studies.catalogue import TASKS
from studies.config import load_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 16 relaxations of all 1797 digits, 0.15-0.35 s each
STUDY = """
[study]
name = "killtest"
task = "relaxation"
[base]
method = "euler"
dt = 0.1
tol = 1e-10
batch = 1797
[base.network]
sizes = [64, 96, 10]
[sweep]
seeds = [0, 1, 2, 3]
[sweep.product]
"network.asymmetry_angle" = [0.0, 60.0, 120.0, 180.0]
"""
KILLS = 10


def live_processes(pgid: int) -> list:
    """The processes of a process group that have not exited (zombies excluded)."""
    alive = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(pid))
    return alive


def check_files(out: str, expected: set, first_execution: dict):
    """Every run file and the archive open with h5py; temporary files are not runs; a run once done
    is never rewritten (its execution id never changes)."""
    runs_dir = os.path.join(out, "runs")
    names = os.listdir(runs_dir) if os.path.isdir(runs_dir) else []
    ids = sw.list_run_files(runs_dir)
    assert set(ids) <= expected
    assert all(re.fullmatch(r"[0-9a-f]{16}\.h5", n) or n.startswith(".tmp-") for n in names), names
    assert not [n for n in ids if n.startswith(".")]
    for rid in ids:
        with h5py.File(os.path.join(runs_dir, f"{rid}.h5"), "r") as f:
            assert f.attrs["run_id"] == rid and f.attrs["status"] == "done", f.attrs["error"]
            assert f["arrays"]["residual_trace"].shape == (10_001,)
            execution = f.attrs["execution"]
        assert first_execution.setdefault(rid, execution) == execution, f"run {rid} executed twice"
    archive = os.path.join(out, "killtest.h5")
    if os.path.exists(archive):
        with h5py.File(archive, "r") as f:
            assert set(f["runs"]) <= expected and f.attrs["n_runs"] == len(expected)
            status = f["data"]["status"].asstr()[()]
            assert (status == "done").sum() == f.attrs["n_done"] == len(f["runs"])
            for rid in f["runs"]:
                assert f["runs"][rid].attrs["execution"] == first_execution.get(rid, f["runs"][rid].attrs["execution"])
    return ids, len(names) - len(ids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses SIGKILL, process groups and /proc")
def test_sigkill_the_driver_at_random_moments_then_resume(tmp_path):
    toml = tmp_path / "killtest.toml"
    toml.write_text(STUDY)
    out = str(tmp_path / "out")
    expected = {r.run_id for r in load_study(str(toml), tasks=TASKS).runs()}
    cmd = [sys.executable, "-m", "studies.cli", "sweep", str(toml), "--out", out, "--workers", "2", "--quiet",
           "--consolidate-every", "0"]  # rewrite the archive after every run: more moments to be killed in
    rng = random.Random(1797)
    first_execution = {}
    kills, temporaries, lives = 0, 0, 0
    while kills < KILLS:
        lives += 1
        assert lives <= 3 * KILLS, "the driver kept finishing before it could be killed"
        log = tmp_path / f"life{lives}.txt"
        done = set(sw.list_run_files(os.path.join(out, "runs")))
        with open(log, "wb") as fh:  # a file, not a pipe: no waiting for every holder of a pipe to exit
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if done != expected and rng.random() < 0.6:
                # while runs execute: once this driver has finished a run, a little later (whatever the
                # machine's speed): workers are then running, writing files, or the driver consolidating
                deadline = time.monotonic() + 60
                while (set(sw.list_run_files(os.path.join(out, "runs"))) == done and proc.poll() is None
                       and time.monotonic() < deadline):
                    time.sleep(0.01)
                delay = rng.uniform(0.0, 0.2)
            else:  # any moment: start-up, warm-up, scanning the run files, the final consolidation
                delay = rng.uniform(0.05, 2.0)
            try:
                proc.wait(timeout=delay)
                assert proc.returncode == 0, log.read_text()
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)  # the driver only: its workers must follow by themselves
                proc.wait()
                kills += 1
            deadline = time.monotonic() + 10
            while live_processes(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not live_processes(proc.pid), "worker processes outlived the driver"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # only if the assertion above failed
            except ProcessLookupError:
                pass
        _, stray = check_files(out, expected, first_execution)
        temporaries += stray

    done_before = set(sw.list_run_files(os.path.join(out, "runs")))
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    missing = len(expected - done_before)
    assert f"ran {missing} runs ({missing} done, 0 failed); skipped {len(done_before)}" in result.stdout, \
        result.stdout
    ids, stray = check_files(out, expected, first_execution)
    assert set(ids) == expected and stray == 0  # the last driver removed the temporary files
    assert sorted(os.listdir(os.path.join(out, "runs"))) == sorted(f"{r}.h5" for r in expected)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    with h5py.File(os.path.join(out, "killtest.h5"), "r") as f:
        assert sorted(f["runs"]) == sorted(expected)
        assert f.attrs["n_done"] == len(expected) and f.attrs["n_failed"] == f.attrs["n_missing"] == 0
        run_ids = f["data"]["run_id"].asstr()[()].ravel()
        assert len(set(run_ids)) == len(run_ids) == len(expected)
    ds = archives.open_dataset(os.path.join(out, "killtest.h5"))
    assert (ds["status"] == "done").all() and ds["residual"].notnull().all()
    print(f"{kills} kills in {lives} driver lives; {len(done_before)} of {len(expected)} runs done before the "
          f"last resume; {temporaries} temporary files seen at kills")
