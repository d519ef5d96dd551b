"""The command line a person uses: --version, studies found by name, --set overrides checked like the file,
--dry-run, progress that a log file can hold, notebooks that find their archive, and a wheel that carries the
study files and notebooks."""

import glob
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

import substrate as S
from models import data as D
from models.train import SGD, Classifier, live_progress, train
from studies import archives
from studies import sweep as sw
from studies.catalogue import TASKS
from studies.cli import main
from studies.config import StudyConfigError, load_study, packaged_studies
from studies.runs import PartialSave, read_progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "studies", "configs", "*.toml")))
EP_BIAS = os.path.join(ROOT, "studies", "configs", "ep_bias.toml")
SELFTEST = """
[study]
name = "naps"
task = "selftest"
[base]
sleep = {sleep}
[sweep]
seeds = {seeds}
[sweep.product]
value = [1.0, 2.0]
"""


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def selftest_file(tmp_path, sleep=0.0, seeds=(0,)):
    path = tmp_path / "naps.toml"
    path.write_text(SELFTEST.format(sleep=sleep, seeds=list(seeds)))
    return str(path)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output == f"substrate {importlib.metadata.version('substrate')}\n"


def test_a_packaged_study_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no studies/configs here
    for name in ("ep_bias", "ep_bias.toml", EP_BIAS):
        result = invoke("sweep", name, "--profile", "debug", "--dry-run")
        assert result.exit_code == 0, result.output
        assert "study 'ep_bias' (task ep_bias, profile debug): 2 runs" in result.output
    assert packaged_studies()["ep_bias"] == EP_BIAS
    result = invoke("sweep", "ep_bais", "--dry-run")
    assert result.exit_code == 1
    assert result.stderr.startswith("substrate: error: ep_bais: no such study file, nor a packaged study")
    assert "ep_bias" in result.stderr and "substrate studies" in result.stderr


def test_studies_lists_every_packaged_config():
    result = invoke("studies")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(CONFIGS) == len(packaged_studies()) and len(lines) == 1 + len(CONFIGS) + 2
    for line, path in zip(lines[1:], CONFIGS):
        s = load_study(path, tasks=TASKS)
        debug = load_study(path, "debug", tasks=TASKS)
        assert line.split()[:4] == [os.path.basename(path)[:-5], s.task, f"{s.n_runs:,}", f"({debug.n_runs:,}"]
        assert line.endswith(s.description)
    assert lines[-2] == f"study files: {os.path.dirname(EP_BIAS)}"


SMALL = '[study]\nname = "small"\ntask = "ep_bias"\n[base]\n{line}\n'


@pytest.mark.parametrize("assignment, in_file", [
    ("base.batch=0", "batch = 0"),  # out of range
    ("base.network.sizes=[64, 10]", "network.sizes = [64, 10]"),  # too short
    ("base.network.activation=relu2", "network.activation = 'relu2'"),  # a bare word: a string
    ("base.bach=3", "bach = 3"),  # unknown key
    ("sweep.seeds=[-1]", "[sweep]\nseeds = [-1]"),  # out of range
])
def test_set_is_checked_as_the_file_is(tmp_path, assignment, in_file):
    """An override's error is the file's error for the same value: the same key path, value and allowed range."""
    path = tmp_path / "small.toml"
    path.write_text(SMALL.format(line=""))
    result = invoke("sweep", str(path), "--set", assignment, "--dry-run")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    with pytest.raises(StudyConfigError) as from_file:
        load_study(str(path), tasks=TASKS, text=SMALL.format(line=in_file))
    assert result.stderr == f"substrate: error: {from_file.value}\n"
    assert f"{assignment.split('=')[0]}" in result.stderr and "allowed" in result.stderr


def test_set_changes_the_runs_and_wins_over_the_profile():
    # the debug profile sets one seed and a batch of 16: the overrides win
    s = load_study(EP_BIAS, "debug", tasks=TASKS, overrides=["sweep.seeds=[0, 1, 2]", "base.batch = 4",
                                                            'sweep.product."network.asymmetry_angle" = [45.0]',
                                                            "base.network.activation=tanh"])
    assert s.seeds == [0, 1, 2] and s.base["batch"] == 4 and s.axes["asymmetry_angle"] == [45.0]
    assert s.base["network"]["activation"] == "tanh" and s.base["network"]["sizes"] == [64, 8, 10]  # profile's
    # the same key spelt without quotes names the same axis
    same = load_study(EP_BIAS, "debug", tasks=TASKS, overrides=["sweep.product.network.asymmetry_angle=[45.0]"])
    assert same.axes["asymmetry_angle"] == [45.0]
    result = invoke("sweep", "ep_bias", "--profile", "debug", "--set", "sweep.seeds=[0, 1, 2]", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "set sweep.seeds=[0, 1, 2]): 6 runs" in result.output and "  seed (3): 0, 1, 2" in result.output
    for bad in ("base.batch", "base.batch = [1,", "= 3"):
        result = invoke("sweep", "ep_bias", "--set", bad, "--dry-run")
        assert result.exit_code == 1 and result.stderr.startswith(f"substrate: error: override {bad!r}: "), bad


def test_dry_run_prints_the_grid_and_runs_nothing(tmp_path):
    study = selftest_file(tmp_path, seeds=(0, 1, 2))
    out = tmp_path / "out"
    result = invoke("sweep", study, "--out", str(out), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "  value (2): 1.0, 2.0\n  seed (3): 0, 1, 2\nruns: 6\n" in result.output
    assert f"in {out}: none run yet" in result.output and not out.exists()  # nothing written
    s = load_study(study, tasks=TASKS)
    path = sw.run_sweep(load_study(study, tasks=TASKS, overrides=["sweep.seeds=[0]"]), str(out),
                        executor=sw.SerialExecutor(), progress=False)  # two of the six runs
    assert 'set: ["sweep.seeds=[0]"]' in invoke("info", path).output  # the archive records its overrides
    result = invoke("sweep", study, "--out", str(out), "--dry-run")
    assert f"in {out}: 2 done, 0 failed, 4 to run" in result.output
    assert sorted(sw.list_run_files(str(out / "runs"))) == sorted(r.run_id for r in s.runs() if r.seed == 0)
    result = invoke("sweep", study, "--dry-run", "--max-runs", "5")
    assert "more than --max-runs=5" in result.output


def test_progress_reports_are_written_and_read(tmp_path):
    s = load_study(selftest_file(tmp_path), tasks=TASKS)
    run = s.runs()[0]
    save = PartialSave(run, "selftest", str(tmp_path))
    save.progress(3, 10)
    save.progress(4, 10)  # within PROGRESS_EVERY of the first: not written
    assert read_progress(str(tmp_path)) == {run.run_id: {"done": 3, "total": 10, "unit": "epoch"}}
    for done, total in ((11, 10), (0, 0), (-1, 3), (1.5, 3)):
        with pytest.raises(ValueError, match="expected integers"):
            save.progress(done, total)
    sw.execute_run(run, "selftest", str(tmp_path))
    assert read_progress(str(tmp_path)) == {}  # the finished run's report is removed


def test_sweep_progress_off_a_terminal_is_a_few_lines(tmp_path, monkeypatch):
    """Not a terminal (CliRunner's stderr, like a log file): plain lines, no carriage return, a line at most
    every LINE_EVERY seconds, with the running runs' steps and an estimate of the time left."""
    monkeypatch.setattr(sw, "LINE_EVERY", 0.5)
    monkeypatch.setattr(sw, "POLL_EVERY", 0.1)
    result = invoke("sweep", selftest_file(tmp_path, sleep=3.0), "--out", str(tmp_path / "out"), "--workers", "2")
    assert result.exit_code == 0, result.output
    err = result.stderr
    lines = err.splitlines()
    assert "\r" not in err and len(err) < 3000, err
    assert all(line.startswith("naps: ") for line in lines), err
    assert lines[-1].startswith("naps: 2/2 runs finished; ")
    assert any("runs finished; running: " in line and "/10 steps" in line and " left" in line for line in lines), err


def test_sweep_progress_on_a_terminal_is_a_bar(tmp_path):
    s = load_study(selftest_file(tmp_path), tasks=TASKS)
    runs = s.runs()
    stream = io.StringIO()
    shown = sw.SweepProgress("naps", runs, str(tmp_path), stream=stream, live=True)
    shown.reports = {runs[1].run_id: {"done": 5, "total": 10, "unit": "epoch"}}
    shown.run_finished({"run_id": runs[0].run_id, "status": "failed"})
    assert shown.work() == 1.5
    assert "naps: 1/2 runs finished (1 failed); running: 5/10 epochs; 0:00 elapsed, ~0:00 left  75%|" in \
        stream.getvalue()
    shown.close()


def test_training_off_a_terminal_writes_a_line_per_epoch(capsys):
    """models.train's bar per batch only on a terminal: in a log, one line per epoch (the quickstart wrote
    180 kB of redrawn bars to a log)."""
    assert not live_progress(io.StringIO())
    data = D.digits(seed=0).subset(96, 24)
    model = Classifier.layered([64, 16, 10], np.random.default_rng(0), cost="cross_entropy")
    train(model, data, epochs=2, batch_size=8, rng=np.random.default_rng(0), optimiser=SGD(0.05), progress=True)
    out, err = capsys.readouterr()
    assert "\r" not in err + out and err == ""
    assert [line.split(":")[0] for line in out.splitlines()] == ["epoch 1", "epoch 2"]


def test_find_archive_looks_in_the_usual_places_and_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.delenv(archives.ARCHIVE_VARIABLE, raising=False)
    nested = tmp_path / "project" / "notebooks"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    with pytest.raises(archives.ArchiveNotFound) as e:
        archives.find_archive("ep_bias")
    message = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "no archive of the study 'ep_bias'" in message and f"in {nested} and its parents" in message
    assert "Make it with `substrate sweep ep_bias`" in message and "SUBSTRATE_ARCHIVE" in message
    debug = tmp_path / "project" / "sweep-output" / "ep_bias-debug" / "ep_bias.h5"
    debug.parent.mkdir(parents=True)
    debug.write_bytes(b"")
    assert archives.find_archive("ep_bias") == str(debug)  # a profile's, found from a folder below
    full = tmp_path / "sweep-output" / "ep_bias" / "ep_bias.h5"
    full.parent.mkdir(parents=True)
    full.write_bytes(b"")
    assert archives.find_archive("ep_bias") == str(debug)  # the nearest folder's first
    monkeypatch.setenv(archives.ARCHIVE_VARIABLE, str(tmp_path / "sweep-output"))
    assert archives.find_archive("ep_bias") == str(full)
    monkeypatch.setenv(archives.ARCHIVE_VARIABLE, str(debug))
    assert archives.find_archive("ep_bias") == str(debug)
    monkeypatch.setenv(archives.ARCHIVE_VARIABLE, str(tmp_path / "nowhere.h5"))
    with pytest.raises(archives.ArchiveNotFound, match=r"nowhere.h5 \(\$SUBSTRATE_ARCHIVE\)"):
        archives.find_archive("ep_bias")
    assert archives.find_archive("ep_bias", str(full)) == str(full)  # a path given wins
    with pytest.raises(archives.ArchiveNotFound, match="the path given.*`substrate sweep relaxation`"):
        archives.find_archive("relaxation", "missing.h5")


def test_a_wheel_carries_the_study_files_and_notebooks(tmp_path):
    """Built from the tracked files, unpacked as an installation would be, run from an empty folder:
    `substrate studies` lists the studies and `substrate sweep ep_bias --profile debug` finds its file."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    src = tmp_path / "src"
    for name in tracked.split():
        if name.startswith(("substrate/", "models/", "studies/")) or name in ("pyproject.toml", "README.md"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel")], cwd=src, check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in CONFIGS + glob.glob(os.path.join(ROOT, "studies", "notebooks", "*.ipynb")):
        assert os.path.relpath(path, ROOT) in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    for args, expected in ((["studies"], "ep_bias            ep_bias"),
                           (["sweep", "ep_bias", "--profile", "debug", "--dry-run"], "runs: 2\n")):
        done = subprocess.run([sys.executable, "-m", "studies.cli", *args], cwd=empty, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0 and expected in done.stdout, done.stderr
        assert str(tmp_path / "site" / "studies" / "configs") in done.stdout or args[0] == "sweep"


def test_devices_lists_rounded_numbers_units_aliases_and_whole_citations():
    """`substrate devices`: floats rounded (reram_sb's w_min_dtod 0.3/0.75 is 0.4, not 0.39999999999999997),
    a field with a unit shows it, rram is named an alias of reram_sb, every citation is printed whole, and
    the lines fit the terminal (80 to 120 columns)."""
    from substrate.devices import PRESETS
    from substrate.devices.base import rounded
    from substrate.devices.presets import alias_of

    for columns in ("80", "120"):
        out = CliRunner(env={"COLUMNS": columns}).invoke(main, ["devices"])
        assert out.exit_code == 0, out.output
        assert max(len(line) for line in out.output.splitlines()) <= int(columns)
        numbers = re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", out.output)
        assert numbers and max(len(re.sub(r"e.*|\.", "", n).lstrip("0")) for n in numbers) <= 6
        flat = " ".join(out.output.split())
        for name, dev in PRESETS.items():
            assert dev.citation in flat, name
        assert "w_min_dtod=0.4 x |w_min|" in flat and "t0=20.0 s" in flat and "g_max=25.0 uS" in flat
        assert "ProgrammingNoise: aihwkit PCMLikeNoiseModel (Nandakumar et al. 2019)" in flat
        assert "rram (alias of reram_sb: the same device)" in flat
        assert "reram_sb (alias" not in flat and flat.count("(alias of") == 1
    assert alias_of("rram") == "reram_sb" and alias_of("reram_sb") is None and alias_of("ideal") is None
    assert rounded(0.3 / 0.75) == "0.4" and rounded((1, 2.0000000001)) == "(1, 2.0)" and rounded(None) == "None"


def test_warmup_lists_its_paths_and_refuses_an_unknown_one():
    from studies.warmup import PATHS

    listed = invoke("warmup", "--list")
    assert listed.exit_code == 0 and [line.split()[0] for line in listed.output.splitlines()] == list(PATHS)
    bad = invoke("warmup", "float64", "no-such-path")
    assert bad.exit_code == 1 and "'no-such-path'" in bad.output and "float64" in bad.output


_CACHE_MISSES = """
import sys
from numba.core.registry import CPUDispatcher
from studies import warmup
warmup.run(sys.argv[1])
kernels = [d for name, m in list(sys.modules.items()) if name.startswith(("substrate", "models"))
           for d in vars(m).values() if isinstance(d, CPUDispatcher)]
hits = sum(sum(d.stats.cache_hits.values()) for d in kernels)
misses = sum(sum(d.stats.cache_misses.values()) for d in kernels)
print(hits, misses)
"""


@pytest.mark.parametrize("jobs, paths", [(1, ["pvrnn"]),
                                         pytest.param(2, ["pvrnn", "float32", "pvrnn-train"], marks=pytest.mark.slow)],
                         ids=["serial", "two_processes"])
def test_after_warmup_a_run_compiles_nothing(tmp_path, jobs, paths):
    """`substrate warmup PATH...` on an empty cache; then, in a fresh process, each path's run finds
    every kernel it calls in the cache (Numba counts a miss for each one it has to compile). With two
    processes compiling at once, the cache's index writes are locked (studies.warmup.locked_cache_writes).
    The serial case compiles ~20 s; the parallel one adds the float32 dynamics and PV-RNN training (~60 s, make
    test-all)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    warm = subprocess.run([sys.executable, "-m", "studies.cli", "warmup", "--jobs", str(jobs), *paths], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert warm.returncode == 0, warm.stderr
    assert f"compiled {len(paths)} paths" in warm.stdout and str(tmp_path / "numba") in warm.stdout
    for path in paths:
        after = subprocess.run([sys.executable, "-c", _CACHE_MISSES, path], env=env, capture_output=True,
                               text=True, timeout=600)
        assert after.returncode == 0, after.stderr
        hits, misses = map(int, after.stdout.split())
        assert hits > 0 and misses == 0, path  # hits > 0: the kernels were found and their lookups counted


# ------------------------------------------------------------------------------------ evaluate
DRIFT = os.path.join(ROOT, "studies", "configs", "drift.toml")


@pytest.mark.fashion_mnist
@pytest.mark.skipif(not os.path.isdir(D.FASHION_MNIST_DIR), reason=f"no Fashion-MNIST in {D.FASHION_MNIST_DIR}")
def test_evaluate_reproduces_the_drift_study_from_its_saved_networks(config_archives, tmp_path):
    """`substrate evaluate` on the drift study's archive programs each saved network again and finds, bit for
    bit, the accuracies the study computed with the network in memory; without compensation the chip loses
    accuracy over a year that compensation keeps (a chip of the same draws)."""
    import h5py

    _, archive, _ = config_archives[DRIFT]
    out = tmp_path / "eval.h5"
    result = invoke("evaluate", archive, "--device", "pcm_inference", "--times", "1s,1h,1d,1mo,1y", "--out", str(out))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[:7] == ["network", "compensation", "1", "s", "1", "h", "1"]
    assert len([x for x in lines if "/model" in x]) == 4  # two runs, compensation on and off
    ds = archives.open_dataset(archive)
    with h5py.File(out, "r") as f:
        acc = f["accuracy"][()]
        assert [x.decode() for x in f["time"][()]] == ["1 s", "1 h", "1 d", "1 mo", "1 y"]
        assert f["time_seconds"][()].tolist() == ds["drift_time"].values.tolist()
        for i, rid in enumerate(x.decode() for x in f["run_id"][()]):
            one = ds["drift_accuracy"].where(ds["run_id"] == rid, drop=True).squeeze().values
            assert acc[i].tobytes() == one.tobytes(), (acc[i], one)
    assert np.any(acc[:, 0, -1] != acc[:, 1, -1])
    assert np.all(acc[:, :, 0] > 0.15)  # trained: above chance (10 classes) right after programming


def test_evaluate_says_what_is_wrong(tmp_path):
    """No saved weights, an unknown device or one without drift, bad times, a file that is not a run: each a
    one-line error naming what is allowed."""
    runs = sw.runs_folder(str(tmp_path / "out"))
    assert invoke("sweep", selftest_file(tmp_path), "--out", str(tmp_path / "out"), "--quiet").exit_code == 0
    run_file = os.path.join(runs, sorted(os.listdir(runs))[0])
    archive = str(tmp_path / "out" / "naps.h5")
    saved = S.save(S.Network.layered([3, 2], np.random.default_rng(0)), tmp_path / "net.h5")
    cases = [
        ([archive], "holds no saved weights: sweep a training study with save_weights = true"),
        ([run_file], "holds no saved weights"),
        ([archive, "--device", "nope"], "--device nope: unknown preset; allowed: pcm_inference"),
        ([archive, "--device", "ideal"], "--device ideal: a preset without drift; allowed: pcm_inference"),
        ([archive, "--times", "1s,1fortnight"], "drift time '1fortnight': allowed: a number >= 0 and a unit, one of"),
        ([archive, "--times", "-1s"], "drift time '-1s'"),
        ([archive, "--times", "200y"], "at most 100 years"),
        ([archive, "--times", "1y,1h"], "--times 1y,1h: the times must be ascending"),
        ([saved], "is neither a sweep archive nor a run file (format 'substrate-object'"),
    ]
    for args, needle in cases:
        result = invoke("evaluate", *args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert needle in " ".join(result.output.split()), (args, result.output)
