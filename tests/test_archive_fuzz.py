"""Hostile and damaged archives: truncations, bit flips, and missing or wrong parts of every piece of the
layout, each read by ``substrate info``, ``substrate plot`` and ``open_dataset``. Every read must end in a
one-line ArchiveError naming the file, or in exactly the result of the intact archive: never a traceback,
a wrong number or a hang. A flipped bit in a data chunk must be detected (Fletcher-32)."""

import os
import shutil
import subprocess
import sys

import h5py
import matplotlib.pyplot as plt
import numpy as np
import pytest
from click.testing import CliRunner

from studies import archives, figures
from studies import sweep as sw
from studies.catalogue import TASKS
from studies.cli import main
from studies.config import load_study
from substrate import archive
from substrate.errors import ArchiveError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the smallest real archive with a figure: four relaxation runs of a 64-4-10 network, two of which fail
# (no convergence in 2 steps), so that info reads the runs' records
STUDY = """
[study]
name = "fuzz"
task = "relaxation"
[base]
batch = 2
[base.network]
sizes = [64, 4, 10]
[sweep]
seeds = [0]
[sweep.zip]
name = "integrator"
method = ["euler", "exp_euler"]
dt = [0.5, 1.0]
max_steps = [2, 300]
[sweep.product]
"network.asymmetry_angle" = [0.0, 90.0]
"""


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """The archive, and what each reader gives for it: the dataset, the output of info, the figure name."""
    study = load_study("fuzz.toml", text=STUDY, tasks=TASKS)
    path = sw.run_sweep(study, str(tmp_path_factory.mktemp("fuzz")), progress=False,
                        executor=sw.SerialExecutor())
    info = CliRunner().invoke(main, ["info", path])
    assert info.exit_code == 0, info.output
    fig, name = figures.draw(path, TASKS)
    plt.close(fig)
    return {"path": path, "dataset": archives.open_dataset(path), "info": info.output, "name": name}


def _copy(intact, tmp_path, name="a.h5"):
    path = str(tmp_path / name)
    shutil.copyfile(intact["path"], path)
    return path


def _read_all(path, intact, edited=False) -> dict:
    """Each reader's outcome on ``path``: 'error' (an ArchiveError naming the file, or the CLI's one line
    and exit code 1), 'correct' (the intact archive's result), 'wrong' or 'traceback: ...'. For a
    deliberate edit (``edited``) there is no intact result to compare with: a read that succeeds is
    'read' (the edit is valid for that reader, e.g. an unknown task for open_dataset)."""
    out = {}
    same = "read" if edited else "correct"
    try:
        ds = archives.open_dataset(path)
        out["open_dataset"] = same if edited or ds.identical(intact["dataset"]) else "wrong"
    except ArchiveError as e:
        out["open_dataset"] = "error" if str(e).startswith(f"{path}: ") and "\n" not in str(e) else "wrong"
    except Exception as e:  # noqa: BLE001 - counted, and the test fails on it
        out["open_dataset"] = f"traceback: {type(e).__name__}: {e}"
    result = CliRunner().invoke(main, ["info", path])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        out["info"] = f"traceback: {type(result.exception).__name__}: {result.exception}"
    elif result.exit_code == 0:
        out["info"] = same if edited or result.output == intact["info"].replace(intact["path"], path) else "wrong"
    else:
        lines = result.output.splitlines()
        out["info"] = "error" if result.exit_code == 1 and len(lines) == 1 and \
            lines[0].startswith(f"substrate: error: {path}: ") else "wrong"
    try:
        fig, name = figures.draw(path, TASKS)
        plt.close(fig)
        out["plot"] = same if out["open_dataset"] == same and (edited or name == intact["name"]) else "wrong"
    except ArchiveError as e:
        out["plot"] = "error" if str(e).startswith(f"{path}: ") else "wrong"
    except Exception as e:  # noqa: BLE001
        out["plot"] = f"traceback: {type(e).__name__}: {e}"
    return out


def _edit(fn):
    """A mutation made with h5py on the copy (opened for writing), sealed again as a crafted file would
    be, so that the reader's own checks meet it (not the CRC of the text)."""
    def mutate(path):
        with h5py.File(path, "r+") as f:
            fn(f)
            archive.seal(f)
    return mutate


def _set_attr(where, key, value):
    return _edit(lambda f: f[where].attrs.__setitem__(key, value))


def _del(where, key=None):
    return _edit(lambda f: f[where].attrs.__delitem__(key) if key else f.__delitem__(where))


def _replace(where, **kwargs):
    def fn(f):
        dims = f[where].attrs.get("dims")
        del f[where]
        ds = f.create_dataset(where, **kwargs)
        if dims is not None:
            ds.attrs["dims"] = dims
    return _edit(fn)


def _virtual(f):
    layout = h5py.VirtualLayout(shape=f["data/nfev"].shape, dtype="f8")
    layout[...] = h5py.VirtualSource("elsewhere.h5", "x", shape=f["data/nfev"].shape)
    dims = f["data/nfev"].attrs["dims"]
    del f["data/nfev"]
    f["data"].create_virtual_dataset("nfev", layout, fillvalue=0.0).attrs["dims"] = dims


def _first_run(f):
    return f["runs"][sorted(f["runs"])[0]]


# every part of the layout: missing, of the wrong type, malformed, pointing out of the file, too big
STRUCTURE = {
    "no format": _del("/", "format"),
    "other format": _set_attr("/", "format", "substrate-sweep/0"),
    "no study_name": _del("/", "study_name"),
    "study_name absolute": _set_attr("/", "study_name", "/tmp/escape"),
    "study_name ../": _set_attr("/", "study_name", "../escape"),
    "study_name a number": _set_attr("/", "study_name", 5),
    "task unknown": _set_attr("/", "task", "nope"),
    "task a number": _set_attr("/", "task", 3),
    "axes invalid JSON": _set_attr("/", "axes", "{\"integrator\": [1,"),
    "axes a list": _set_attr("/", "axes", "[1, 2]"),
    "axes empty list": _set_attr("/", "axes", '{"integrator": [], "seed": [0]}'),
    "axes longer": _set_attr("/", "axes", '{"integrator": ["euler", "exp_euler", "rk4"], '
                                          '"asymmetry_angle": [0.0, 90.0], "seed": [0]}'),
    "no axes": _del("/", "axes"),
    "axis_keys invalid": _set_attr("/", "axis_keys", "{{"),
    "n_done a string": _set_attr("/", "n_done", "50"),
    "n_done wrong": _set_attr("/", "n_done", 100),
    "n_runs negative": _set_attr("/", "n_runs", -1),
    "no n_failed": _del("/", "n_failed"),
    "created a number": _set_attr("/", "created", 1.5),
    "no data": _del("data"),
    "data a dataset": _edit(lambda f: (f.__delitem__("data"), f.create_dataset("data", data=[1.0]))),
    "no coordinates": _del("data", "coordinates"),
    "coordinates invalid": _set_attr("data", "coordinates", "[\"integrator\""),
    "coordinates unknown": _set_attr("data", "coordinates", '["integrator", "ghost"]'),
    "no status": _del("data/status"),
    "status values": _replace("data/status", data=np.full((2, 2, 1), "dome", dtype="S4")),
    "status numbers": _replace("data/status", data=np.zeros((2, 2, 1))),
    "status a group": _edit(lambda f: (f.__delitem__("data/status"), f["data"].create_group("status"))),
    "no run_id": _del("data/run_id"),
    "nfev no dims": _del("data/nfev", "dims"),
    "nfev dims invalid": _set_attr("data/nfev", "dims", "[\"integrator\", "),
    "nfev dims a dict": _set_attr("data/nfev", "dims", "{}"),
    "nfev dims too few": _set_attr("data/nfev", "dims", '["integrator", "asymmetry_angle"]'),
    "nfev dims unknown": _set_attr("data/nfev", "dims", '["integrator", "asymmetry_angle", "ghost"]'),
    "nfev wrong shape": _replace("data/nfev", data=np.zeros((3, 2, 1))),
    "nfev strings": _replace("data/nfev", data=np.full((2, 2, 1), "x", dtype="S1")),
    "nfev compound": _replace("data/nfev", data=np.zeros((2, 2, 1), dtype=[("a", "f8"), ("b", "i4")])),
    "residual_trace 60000 x 60000": _replace("data/residual_trace", shape=(60000, 60000), dtype="f8",
                                             chunks=(1000, 1000)),
    "60000 x 60000 with coordinates": _edit(lambda f: _huge(f)),
    "step 60000 unstored": _replace("data/step", shape=(60000,), dtype="i8", chunks=(1000,)),
    "step longer": _edit(lambda f: _resize_coordinate(f, 5000)),
    "nfev missing": _del("data/nfev"),
    "residual_trace missing": _del("data/residual_trace"),
    "nfev external link": _edit(lambda f: (f.__delitem__("data/nfev"),
                                           f["data"].__setitem__("nfev", h5py.ExternalLink("/etc/passwd", "/x")))),
    "nfev soft link": _edit(lambda f: (f.__delitem__("data/nfev"),
                                       f["data"].__setitem__("nfev", h5py.SoftLink("/data/steps")))),
    "external link elsewhere": _edit(lambda f: f.__setitem__("extra", h5py.ExternalLink("other.h5", "/"))),
    "nfev virtual": _edit(_virtual),
    "nfev external storage": _replace("data/nfev", shape=(2, 2, 1), dtype="f8", external=[("/dev/zero", 0, 32)]),
    "no runs": _del("runs"),
    "run status bogus": _edit(lambda f: _first_run(f).attrs.__setitem__("status", "dnoe")),
    "run error a number": _edit(lambda f: _first_run(f).attrs.__setitem__("error", 3)),
    "run coords invalid": _edit(lambda f: _first_run(f).attrs.__setitem__("coords", "{]")),
    "run a dataset": _edit(lambda f: f["runs"].__setitem__("0000000000000000", np.zeros(3))),
    "run array unstored": _edit(lambda f: (_first_run(f)["arrays"].__delitem__("residual_trace"),
                                           _first_run(f)["arrays"].create_dataset("residual_trace", shape=(10 ** 8,),
                                                                                 dtype="f8", chunks=(10 ** 5,)))),
}


def _huge(f):
    """A result of 60000 x 60000 values per run (unallocated: a small file), with coordinates that
    imply that shape: the 27 GiB allocation of the issue, refused as more than any run stored."""
    for name in ("step", "k"):
        if name in f["data"]:
            del f["data"][name]
        f["data"].create_dataset(name, data=np.arange(60000), compression="gzip").attrs["dims"] = f'["{name}"]'
    dims = '["integrator", "asymmetry_angle", "seed", "step", "k"]'
    del f["data/residual_trace"]
    f["data"].create_dataset("residual_trace", shape=(2, 2, 1, 60000, 60000), dtype="f8",
                             chunks=(1, 1, 1, 1000, 1000)).attrs["dims"] = dims
    f["data"].attrs["coordinates"] = f["data"].attrs["coordinates"][:-1] + ', "k"]'


def _resize_coordinate(f, n):
    """The result dimension 'step' longer than any run's array: its coordinate and the results along it."""
    del f["data/step"]
    ds = f["data"].create_dataset("step", data=np.arange(n))
    ds.attrs["dims"] = '["step"]'
    for name in ("residual_trace", "trace_t"):
        dims = f["data"][name].attrs["dims"]
        del f["data"][name]
        f["data"].create_dataset(name, shape=(2, 2, 1, n), dtype="f8", chunks=True).attrs["dims"] = dims


def _tally(outcomes, counts):
    for reader, outcome in outcomes.items():
        key = outcome if outcome in ("error", "correct", "read", "wrong") else "traceback"
        counts[key] = counts.get(key, 0) + 1


@pytest.fixture(scope="module")
def tally():
    counts = {}
    yield counts
    print(f"\narchive fuzzing: {sum(counts.values())} reads: "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


@pytest.mark.parametrize("case", list(STRUCTURE))
def test_each_part_of_the_layout_missing_or_wrong(intact, tmp_path, case, tally):
    path = _copy(intact, tmp_path)
    STRUCTURE[case](path)
    outcomes = _read_all(path, intact, edited=True)
    _tally(outcomes, tally)
    # every case is a defect that some reader meets (the runs' attributes: info; an unknown task: plot)
    assert all(o in ("error", "read") for o in outcomes.values()) and "error" in outcomes.values(), outcomes


@pytest.mark.parametrize("group", range(2))
def test_truncations(intact, tmp_path, tally, group):
    """Cut at 0, 1 and 8 bytes, the superblock's end, the last byte, and 12 seeded offsets (two groups,
    to keep each test short): every read is an error, or (the last byte) the intact result."""
    data = open(intact["path"], "rb").read()
    rng = np.random.default_rng(15)
    cuts = sorted({0, 1, 8, 48, len(data) - 1, *rng.integers(48, len(data) - 1, 12).tolist()})[group::2]
    path = str(tmp_path / "cut.h5")
    for cut in cuts:
        with open(path, "wb") as fh:
            fh.write(data[:cut])
        outcomes = _read_all(path, intact)
        _tally(outcomes, tally)
        assert all(o in ("error", "correct") for o in outcomes.values()), (cut, outcomes)
        assert cut == len(data) - 1 or outcomes["open_dataset"] == "error", (cut, outcomes)


def _flips(intact, tmp_path, tally, seed, n):
    data = open(intact["path"], "rb").read()
    rng = np.random.default_rng(seed)
    path = str(tmp_path / "flip.h5")
    for pos, bit in zip(rng.integers(0, len(data), n), rng.integers(0, 8, n)):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << bit
        with open(path, "wb") as fh:
            fh.write(flipped)
        outcomes = _read_all(path, intact)
        _tally(outcomes, tally)
        assert all(o in ("error", "correct") for o in outcomes.values()), (int(pos), int(bit), outcomes)


@pytest.mark.parametrize("group", range(6))
def test_random_bit_flips(intact, tmp_path, tally, group):
    """48 seeded single-bit flips anywhere in the file (six groups of 8, to keep each test short): each
    read is an error or the intact result."""
    _flips(intact, tmp_path, tally, [1515, group], 8)


@pytest.mark.slow
def test_many_random_bit_flips(intact, tmp_path, tally):
    """The same with 600 flips (about 2 minutes)."""
    _flips(intact, tmp_path, tally, 15_000, 600)


def _chunks(path):
    """(dataset name, byte offset, size) of the first chunk of every chunked dataset with data."""
    out = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.chunks and obj.id.get_num_chunks():
                info = obj.id.get_chunk_info(0)
                out.append((name, info.byte_offset, info.size))
        f.visititems(visit)
    return out


def test_a_flipped_bit_in_any_data_chunk_is_detected(intact, tmp_path):
    """Fletcher-32 on every chunked dataset: a bit flipped in the middle of a chunk (here 0x20: 50
    becomes 18 or 114 in an integer) is an error of open_dataset for the stacked results and of
    load_run for a run's arrays, never a changed number."""
    chunks = _chunks(intact["path"])
    data_chunks = [c for c in chunks if c[0].startswith("data/")]
    run_chunks = [c for c in chunks if c[0].startswith("runs/")]
    assert len(data_chunks) >= 15 and run_chunks  # every variable and coordinate, and the runs' arrays
    data = open(intact["path"], "rb").read()
    path = str(tmp_path / "chunk.h5")
    for name, offset, size in chunks:
        flipped = bytearray(data)
        flipped[offset + size // 2] ^= 0x20
        with open(path, "wb") as fh:
            fh.write(flipped)
        if name.startswith("data/"):
            with pytest.raises(ArchiveError, match=f"^{path}: is corrupt: HDF5 cannot read it"):
                archives.open_dataset(path)
        else:
            with pytest.raises(ArchiveError, match=f"^{path}: is corrupt"):
                archives.load_run(path, name.split("/")[1])


def test_load_run_refuses_what_is_not_a_run(intact, tmp_path):
    path = intact["path"]
    rid = str(intact["dataset"]["run_id"].values.ravel()[0])
    assert archives.load_run(path, rid)["config"]["network"]["sizes"] == [64, 4, 10]
    with pytest.raises(ArchiveError, match=r"/runs/0123456789abcdef is missing"):
        archives.load_run(path, "0123456789abcdef")
    copy = _copy(intact, tmp_path)
    with h5py.File(copy, "r+") as f:
        f["runs"][rid].attrs["config"] = "{not json"
        f["runs"][rid]["scalars"]["nfev"].attrs["x"] = 1
        del f["runs"][rid]["scalars"]["nfev"]
        f["runs"][rid]["scalars"]["nfev"] = np.zeros(3)
        archive.seal(f)
    with pytest.raises(ArchiveError, match=rf"/runs/{rid}/scalars/nfev is float64 of shape \(3,\); expected a "
                                           "real number"):
        archives.load_run(copy, rid)


def test_plot_writes_only_into_out(intact, tmp_path):
    """A study_name that is a path is refused before anything is written."""
    for name in ("../escape", str(tmp_path / "abs"), ".hidden", "a/b"):
        path = _copy(intact, tmp_path)
        with h5py.File(path, "r+") as f:
            f.attrs["study_name"] = name
            archive.seal(f)
        out = tmp_path / "out"
        result = CliRunner().invoke(main, ["plot", path, "--out", str(out)])
        assert result.exit_code == 1 and result.output == \
            f"substrate: error: {path}: study_name = {name!r} is not a valid name; allowed: letters, digits and " \
            "_ . + -, not starting with '.' (a file name)\n"
        assert not out.exists() and sorted(os.listdir(tmp_path)) == ["a.h5"]


def _cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "studies.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("command", ["info", "plot"])
def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path, command):
    """Opening a FIFO for reading blocks until a writer comes; the CLI (in a subprocess, with a timeout:
    a hang fails the test) and open_dataset refuse it, and /dev/zero, up front."""
    fifo = str(tmp_path / "archive.h5")
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(ArchiveError, match="is not a regular file"):
            archives.open_dataset(path)
    done = _cli(command, fifo)
    assert done.returncode == 1 and done.stderr == \
        f"substrate: error: {fifo}: is not a regular file (a directory, FIFO or device is no archive)\n"
    assert "Traceback" not in done.stdout + done.stderr


def test_cli_reports_a_damaged_archive_in_one_line(intact, tmp_path):
    """The real command (a subprocess with a timeout): a truncated archive, exit code 1, one line."""
    path = str(tmp_path / "cut.h5")
    with open(path, "wb") as fh:
        fh.write(open(intact["path"], "rb").read()[:5000])
    done = _cli("plot", path, "--out", str(tmp_path / "out"))
    assert done.returncode == 1 and done.stderr.startswith(f"substrate: error: {path}: ")
    assert done.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_data_beyond_memory_is_refused_up_front(intact, monkeypatch):
    """A consistent archive whose data would not fit in memory is refused before anything is read
    (here: a machine of 20 kB; the intact archive needs more)."""
    need = sum(v.nbytes for v in intact["dataset"].variables.values())
    monkeypatch.setattr(archives, "_memory", lambda: 20_000)
    assert need > 20_000
    with pytest.raises(ArchiveError, match=r"its data take 0\.0 GiB, more than this machine's memory"):
        archives.open_dataset(intact["path"])
