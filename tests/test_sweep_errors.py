"""Issue 15 for sweeps: a study too large to run is refused at once with its count (nothing expanded);
a full disk while the archive is written is a clear error, never a segfault, and the previous archive
survives; a study file that is not UTF-8, an --out under a file and a read-only output folder are
each a one-line ``substrate: error: ...`` with exit code 1."""

import contextlib
import os
import shutil
import subprocess
import sys
import tracemalloc

import h5py
import pytest
from click.testing import CliRunner

from studies import config as study_config
from studies import sweep as sw
from studies.catalogue import TASKS
from studies.cli import main
from studies.config import load_study
from substrate import SubstrateValueError, archive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 1000 x 1000 x 1000 = 1e9 runs: expanding it took minutes and tens of GB
HUGE = f"""
[study]
name = "huge"
task = "selftest"
[sweep]
seeds = {list(range(1000))}
[sweep.product]
value = {[float(v) for v in range(1000)]}
size = {list(range(1, 1001))}
"""


def one_line_error(result, *needles):
    """A CLI result that failed with exit code 1 and one line ``substrate: error: ...`` holding needles."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("substrate: error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# ------------------------------------------------------------------------------------ run count
def test_a_billion_runs_are_counted_and_refused_without_being_expanded(tmp_path, monkeypatch):
    s = load_study("huge.toml", text=HUGE, tasks=TASKS)
    assert s.n_runs == 10 ** 9 and s.shape == (1000, 1000, 1000)
    assert "1,000,000,000 runs over value (1000), size (1000), seed (1000)" in s.summary()
    first = next(s.iter_runs())  # lazy: the first run without the others
    assert first.index == (0, 0, 0) and first.coords == {"value": 0.0, "size": 1, "seed": 0}

    def no_expansion(*args):
        raise AssertionError("a run was made: the grid is being expanded")

    monkeypatch.setattr(study_config, "run_id", no_expansion)
    out = tmp_path / "out"
    tracemalloc.start()
    try:
        with pytest.raises(SubstrateValueError, match=r"study 'huge' has 1,000,000,000 runs \(1000 value x 1000 "
                                                      r"size x 1000 seed\), more than max_runs=100,000"):
            sw.run_sweep(s, str(out), executor=sw.SerialExecutor(), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10e6, peak  # bytes: a count, not a grid (expanding 1e6 runs took 1.4 GB)
    assert not out.exists()  # refused before anything was written

    study_file = tmp_path / "huge.toml"
    study_file.write_text(HUGE)
    result = CliRunner().invoke(main, ["sweep", str(study_file), "--out", str(out), "--quiet"])
    assert result.stdout.startswith("study 'huge' (task selftest): 1,000,000,000 runs")  # the count, first
    one_line_error(result, "1,000,000,000 runs", "more than --max-runs=100,000")


def test_max_runs_is_a_bound_with_its_range_checked():
    s = load_study("s.toml", text=HUGE.replace(f"seeds = {list(range(1000))}", "seeds = [0, 1]")
                   .replace(f"size = {list(range(1, 1001))}", "size = [1, 2, 3]"), tasks=TASKS)
    assert s.n_runs == 1000 * 3 * 2 == len(s.runs())
    sw.check_run_count(s, 6000)  # at the cap: allowed
    with pytest.raises(SubstrateValueError, match="6,000 runs .* more than max_runs=5,999"):
        sw.check_run_count(s, 5999)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(SubstrateValueError, match=f"max_runs={bad!r} must be an integer >= 1"):
            sw.check_run_count(s, bad)
    option = next(p for p in main.commands["sweep"].params if p.name == "max_runs")
    assert option.default == sw.MAX_RUNS  # the CLI's default is the library's


def test_lazy_runs_are_the_grid_in_c_order():
    s = load_study("s.toml", text=HUGE.replace(f"seeds = {list(range(1000))}", "seeds = [3, 4]")
                   .replace(f"size = {list(range(1, 1001))}", "size = [7, 8, 9]")
                   .replace(str([float(v) for v in range(1000)]), "[0.5, 1.5]"), tasks=TASKS)
    runs = list(s.iter_runs())
    assert [r.index for r in runs] == [(i, j, k) for i in range(2) for j in range(3) for k in range(2)]
    for r in runs:
        assert r.config["value"] == [0.5, 1.5][r.index[0]] and r.config["size"] == [7, 8, 9][r.index[1]]
        assert r.seed == [3, 4][r.index[2]] and r.run_id == study_config.run_id("selftest", r.config, r.seed)
    runs[0].config["value"] = -1.0  # each run has its own config
    assert next(s.iter_runs()).config["value"] == 0.5 and s.base["value"] == 1.0


# ------------------------------------------------------------------------------------ disk full
ENOSPC_STUDY = """
[study]
name = "full"
task = "selftest"
[base]
size = 40000
[sweep]
seeds = [0, 1]
[profiles.one]
"sweep.seeds" = [0]
"""


@contextlib.contextmanager
def tmpfs(where, options, why):
    """A tmpfs of our own mounted at ``where`` (root and mount needed, else the test is skipped: ``why``)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"needs root and mount(8) to mount {why}")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs: a disk that fills up for real."""
    with tmpfs(tmp_path / "small", "size=2m", "a 2 MiB tmpfs (a real full disk)") as where:
        yield where


def test_a_full_disk_while_consolidating_is_a_clear_error_and_keeps_the_old_archive(tmp_path, small_fs):
    study_file = tmp_path / "full.toml"
    study_file.write_text(ENOSPC_STUDY.replace("size = 40000", "size = 60000"))
    out = small_fs / "out"
    rdir = sw.runs_folder(str(out))
    one = load_study(str(study_file), "one", tasks=TASKS)
    sw.execute_run(one.runs()[0], "selftest", rdir)  # 0.36 MB
    old = sw.consolidate(one, str(out))  # 0.76 MB: fits
    both = load_study(str(study_file), tasks=TASKS)
    sw.execute_run(both.runs()[1], "selftest", rdir)  # 0.36 MB more: an archive of both (1.5 MB) cannot fit
    # in a child process: the segfault this replaces would have killed pytest
    done = subprocess.run([sys.executable, "-m", "studies.cli", "sweep", str(study_file), "--out", str(out),
                           "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])  # was -11 (SIGSEGV), 3 times of 3
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"substrate: error: cannot write the archive {old}: "
                                                     "No space left on device; the previous archive is kept"), \
        done.stderr
    assert f"every finished run is in {rdir}" in errors[0]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]  # the incomplete archive is gone
    with h5py.File(old, "r") as f:  # the previous archive, whole
        assert f.attrs["n_runs"] == 1 and f.attrs["n_done"] == 1 and f["data"]["trace"].shape == (1, 60000)
    assert sorted(sw.list_run_files(rdir)) == sorted(r.run_id for r in both.runs())  # no run lost


def test_a_full_disk_while_writing_a_run_file_is_a_clear_error(tmp_path, small_fs):
    """Run files go through the same guarded writer: the third run's file (0.63 MB, compressed) does not fit
    beside the first two and the third's partial results (save_partial)."""
    study_file = tmp_path / "full.toml"
    study_file.write_text(ENOSPC_STUDY.replace("size = 40000", "size = 100000").replace("[0, 1]", "[0, 1, 2]"))
    rdir = str(small_fs / "runs")
    code = ("import sys; from studies import sweep as sw; from studies.catalogue import TASKS; "
            "from studies.config import load_study\n"
            "for r in load_study(sys.argv[1], tasks=TASKS).runs(): sw.execute_run(r, 'selftest', sys.argv[2])")
    done = subprocess.run([sys.executable, "-c", code, str(study_file), rdir], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("substrate.archive.WriteError: cannot write the run file ") and \
        "No space left on device; free some space and run the sweep again" in last, last
    *written, third = load_study(str(study_file), tasks=TASKS).runs()
    assert f"cannot write the run file {sw.run_file(rdir, third.run_id)}: " in last
    assert sw.list_run_files(rdir) == sorted(r.run_id for r in written)
    assert not [n for n in os.listdir(rdir) if n.startswith(".tmp-")]  # the incomplete file is gone
    for r in written:  # whole
        assert sw.read_run(sw.run_file(rdir, r.run_id))["arrays"]["trace"][1].shape == (100000,)


def test_a_failed_write_is_kept_and_later_writes_are_dropped(tmp_path):
    """What HDF5 sees of a full disk through the archive's file: every write succeeds (a failed write
    makes HDF5 crash on close); the first failure is kept for the caller to raise."""
    (tmp_path / "a").write_bytes(b"")
    sink = archive.WriteSink(str(tmp_path / "a"))
    sink.write(b"abc")
    sink._f.close()
    sink._f = open("/dev/full", "r+b", buffering=0)  # every write: ENOSPC
    assert sink.write(b"defg") == 4 and sink.error.errno == 28
    first = sink.error
    assert sink.write(memoryview(b"hi")) == 2 and sink.error is first
    sink.close()
    assert (tmp_path / "a").read_bytes() == b"abc"


# ------------------------------------------------------------------------------------ CLI input
def test_a_study_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[study]\nname = "café"\ntask = "selftest"\n'.encode("latin-1"))
    result = CliRunner().invoke(main, ["sweep", str(path), "--out", str(tmp_path / "out")])
    one_line_error(result, "latin1.toml: not UTF-8 text (byte b'\\xe9' at offset 19)", "encoded in UTF-8")
    assert not (tmp_path / "out").exists()


def test_out_under_an_existing_file_is_a_one_line_error(tmp_path):
    study_file = tmp_path / "full.toml"
    study_file.write_text(ENOSPC_STUDY)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "sub" / "dir"
    for args in (["sweep", str(study_file)], ["quickstart"]):  # every command that writes into --out
        result = CliRunner().invoke(main, [*args, "--out", str(out), "--quiet"])
        one_line_error(result, f"--out {out}: {tmp_path / 'a_file'} is a file, not a folder")


def test_a_read_only_output_folder_is_a_one_line_error(tmp_path):
    """Root may write in a folder without write permission, so a mode of 0o555 proves nothing here: a
    read-only tmpfs is read-only for root too (EROFS). The CLI writes a probe file, which catches both."""
    with tmpfs(tmp_path / "ro", "ro,size=1m", "a read-only tmpfs (a mode of 0o555 does not stop root)") as ro:
        study_file = tmp_path / "full.toml"
        study_file.write_text(ENOSPC_STUDY)
        runner = CliRunner()
        result = runner.invoke(main, ["sweep", str(study_file), "--out", str(ro), "--quiet"])
        one_line_error(result, f"--out {ro}: cannot write in this folder (Read-only file system)")
        result = runner.invoke(main, ["sweep", str(study_file), "--out", str(ro / "new"), "--quiet"])
        one_line_error(result, f"--out {ro / 'new'}: cannot make the folder {ro / 'new'} (Read-only file system)")
