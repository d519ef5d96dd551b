"""Studies: TOML validation, grid expansion and run ids, sweeps into archives (every config in
studies/configs at debug size), failed runs, resuming, bit-identical results, the CLI."""

import glob
import hashlib
import json
import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import archive_digest
import substrate as S
from studies import archives
from studies import sweep as sw
from studies.cli import main
from studies.catalogue import TASKS
from studies.config import Run, StudyConfigError, load_study
from models.data import FASHION_MNIST_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _needs_data(path):
    """Study configs on Fashion-MNIST need its IDX files (Debian package dataset-fashion-mnist)."""
    with open(path) as fh:
        if 'data = "fashion_mnist"' not in fh.read():
            return path
    return pytest.param(path, marks=[pytest.mark.fashion_mnist, pytest.mark.skipif(
        not os.path.isdir(FASHION_MNIST_DIR), reason=f"no Fashion-MNIST in {FASHION_MNIST_DIR}")])


CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "studies", "configs", "*.toml")))
CONFIGS = [_needs_data(p) for p in CONFIG_FILES]

RELAX = """
[study]
name = "r"
task = "relaxation"
[base]
method = "exp_euler"
batch = 4
max_steps = 500
[base.network]
sizes = [64, 8, 10]
[sweep]
seeds = [0, 1]
[sweep.product]
"network.asymmetry_angle" = [0.0, 90.0]
"""


def study(text, profile=None, name="s.toml"):
    return load_study(name, profile, text=text, tasks=TASKS)


def selftest(values=(1.0, 2.0, 3.0), fail=None, seeds=(0,), sleep=0.0, name="st"):
    """A selftest study: one axis over value; ``fail`` maps a value to its failure mode."""
    fail = fail or {}
    modes = [fail.get(v, "none") for v in values]
    return study(f"""
[study]
name = "{name}"
task = "selftest"
[base]
sleep = {sleep}
[sweep]
seeds = {list(seeds)}
[sweep.zip]
value = {list(values)}
fail = {json.dumps(modes)}
""")


# ------------------------------------------------------------------------------------ validation
def edit(old, new):
    assert old in RELAX
    return RELAX.replace(old, new)


BASE, NET, AXIS = 'max_steps = 500', 'sizes = [64, 8, 10]', '"network.asymmetry_angle" = [0.0, 90.0]'
BAD = [  # (a study file with one mistake, what the message must contain)
    (edit(BASE, BASE + "\ncolour = 3"), ["base.colour = 3", "unknown key", "allowed keys in base:", "method"]),
    (edit(NET, NET + "\ntaux = 1.0"), ["base.network.taux = 1.0", "unknown key", "asymmetry_angle"]),
    (edit("batch = 4", 'batch = "4"'), ["base.batch = '4' (str)", "wrong type", "an integer"]),
    (edit("batch = 4", "batch = 4.0"), ["base.batch = 4.0 (float)", "wrong type", "an integer"]),
    (edit(NET, NET + "\ntau = -1.0"), ["base.network.tau = -1.0", "out of range", "(0, 1000]"]),
    (edit(NET, NET + "\nasymmetry_angle = 270"), ["base.network.asymmetry_angle = 270.0", "[0, 180]"]),
    (edit('method = "exp_euler"', 'method = "eulr"'), ["base.method = 'eulr'", "one of", "'euler'", "'dopri5'"]),
    (edit(NET, "sizes = [64, 8, 9]"), ["base.network.sizes = [64, 8, 9]", "ending with 10"]),
    (edit(NET, "sizes = [64, 0, 10]"), ["base.network.sizes[1] = 0", "[1, 4096]"]),
    (edit(NET, "sizes = 64"), ["base.network.sizes = 64 (int)", "a list of"]),
    (edit(NET, NET + "\nlateral = 1"), ["base.network.lateral = 1 (int)", "a boolean"]),
    (edit(AXIS, AXIS + '\n"network.taux" = [1.0]'),
     ["sweep.product.network.taux", "not a key of the base config", "network.tau"]),
    (edit(AXIS, '"network.asymmetry_angle" = [0.0, 190.0]'),
     ["sweep.product.network.asymmetry_angle[1] = 190.0", "[0, 180]"]),
    (edit(AXIS, '"network.asymmetry_angle" = []'), ["sweep.product.network.asymmetry_angle = []", "at least one"]),
    (edit(AXIS, '"network.asymmetry_angle" = [0.0, 0]'), ["sweep.product.network.asymmetry_angle", "duplicate value 0.0"]),
    (edit("seeds = [0, 1]", "seeds = [0, 0]"), ["sweep.seeds = [0, 0]", "duplicate", "distinct"]),
    (edit("seeds = [0, 1]", "seeds = [-1, 1]"), ["sweep.seeds[0] = -1", "out of range", "[0, "]),
    (edit("seeds = [0, 1]", "seeds = 2"), ["sweep.seeds = 2 (int)", "a list of values"]),
]


@pytest.mark.parametrize("text, needles", BAD, ids=[b[1][0].split(" ")[0] for b in BAD])
def test_invalid_values_are_rejected_with_path_value_and_what_is_allowed(text, needles):
    with pytest.raises(StudyConfigError) as e:
        study(text)
    msg = str(e.value)
    assert msg.startswith("s.toml: ")
    for needle in needles:
        assert needle in msg, (needle, msg)


ZIP = """
[study]
name = "z"
task = "relaxation"
[sweep.zip]
method = ["euler", "rk4", "dopri5"]
dt = [0.5, 1.0]
"""


@pytest.mark.parametrize("text, needles", [
    (ZIP, ["sweep.zip", "unequal lengths", "method: 3 values", "dt: 2 values", "equal lengths"]),
    (ZIP.replace("[sweep.zip]", "[sweep.zip]\nname = \"seed\"").replace("dt = [0.5, 1.0]", "dt = [0.5, 1.0, 0.5]"),
     ["share the name", "seed"]),
    (ZIP.replace("[sweep.zip]", "[sweep.product]\nmethod = [\"euler\"]\n[sweep.zip]"),
     ["sweep.zip.method", "already swept by sweep.product.method"]),
    ("[study]\nname = \"x\"\ntask = \"nope\"", ["study.task", "'nope'", "'relaxation'"]),
    ("[study]\ntask = \"relaxation\"", ["study.name is missing"]),
    ("[study]\nname = \"a/b\"\ntask = \"relaxation\"", ["study.name", "'a/b'", "a file name"]),
    ("[study]\nname = \"x\"\ntask = \"relaxation\"\n[extra]\na = 1", ["extra", "unknown key", "study, base, sweep"]),
    ("[study]\nname = \"x\"\ntask = \"relaxation\"\n[sweep]\nseed = [1]", ["sweep.seed", "unknown key", "seeds"]),
    ("[study]\nname = \"x\"\ntask = \"relaxation\"\n[profiles.debug]\n\"network.taux\" = 2",
     ["profiles.debug.network.taux", "unknown key"]),
    ("[study]\nname = \"x\"\ntask = \"relaxation\"\n[profiles.debug]\nbatch = 0",
     ["profiles.debug.batch", "0", "[1, 1797]"]),
    ("[study]\nname = \"x\"\ntask = \"relaxation\"\n[profiles.debug]\n\"sweep.product.method\" = [\"euler\"]",
     ["profiles.debug.sweep.product.method", "not an axis"]),
    ("[study]\nname = \"x\"\ntask = \"relaxation\"\nbatch = [", ["not valid TOML"]),
    ("[study]\nname = \"x\"\ntask = \"relaxation\"\n[base]\ntol = inf", ["base.tol = inf", "(0, 1]"]),
])
def test_invalid_studies_are_rejected(text, needles):
    with pytest.raises(StudyConfigError) as e:
        study(text)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_profiles_are_validated_and_zipped_lists_may_repeat_values():
    text = ZIP.replace("dt = [0.5, 1.0]", "dt = [0.5, 1.0, 1.0]") + \
        '[profiles.debug]\n"sweep.zip.method" = ["euler", "rk4"]\n[profiles.small]\n"sweep.zip.dt" = [0.5, 0.5, 1.0]\n'
    assert [r.config["dt"] for r in study(text, "small").runs()] == [0.5, 0.5, 1.0]
    with pytest.raises(StudyConfigError, match=r"unequal lengths .* \(with profile 'debug' applied\)"):
        study(text, "debug")


def test_unknown_profile_and_error_class():
    with pytest.raises(StudyConfigError, match=r"profile 'debug' is not defined; allowed: none"):
        study(RELAX, "debug")
    assert issubclass(StudyConfigError, S.SubstrateValueError)
    with pytest.raises(S.SubstrateValueError, match="missing.toml: cannot read"):
        load_study("missing.toml", tasks=TASKS)


# ------------------------------------------------------------------------------------ expansion
def test_expansion_counts_axes_and_run_ids():
    text = RELAX.replace('"network.asymmetry_angle" = [0.0, 90.0]',
                         '"network.asymmetry_angle" = [0.0, 45, 90.0]\n[sweep.zip]\nname = "integrator"\n'
                         'method = ["euler", "rk4"]\ndt = [0.5, 1]')
    s = study(text)
    assert list(s.axes) == ["asymmetry_angle", "integrator", "seed"]  # file order, seed last
    assert s.axes["asymmetry_angle"] == [0.0, 45.0, 90.0] and s.axes["integrator"] == ["euler", "rk4"]
    assert s.shape == (3, 2, 2)
    runs = s.runs()
    assert len(runs) == 12 and len({r.run_id for r in runs}) == 12
    r = runs[5]  # C order, seed fastest
    assert r.coords == {"asymmetry_angle": 45.0, "integrator": "euler", "seed": 1} and r.index == (1, 0, 1)
    assert r.config["network"]["asymmetry_angle"] == 45.0 and r.config["method"] == "euler"
    assert r.config["dt"] == 0.5 and r.config["network"]["tau"] == 1.0  # defaults filled in
    assert set(r.config) == set(TASKS["relaxation"].schema)
    blob = json.dumps({"task": "relaxation", "config": r.config, "seed": 1}, sort_keys=True, separators=(",", ":"))
    assert r.run_id == hashlib.sha256(blob.encode()).hexdigest()[:16]
    coords = s.axis_coords()
    assert coords["method"] == ("integrator", ["euler", "rk4"]) and coords["dt"] == ("integrator", [0.5, 1.0])

    # the same runs whatever the axes' order and however a number is written
    reordered = text.replace("[0.0, 45, 90.0]", "[90, 0, 45.0]").replace("dt = [0.5, 1]", "dt = [0.5, 1.0]")
    assert {r.run_id for r in study(reordered).runs()} == {r.run_id for r in runs}
    # and in a fresh interpreter with another hash seed
    code = ("from studies.catalogue import TASKS; from studies.config import load_study; import sys; "
            "print(' '.join(sorted(r.run_id for r in load_study('s.toml', tasks=TASKS, "
            "text=sys.stdin.read()).runs())))")
    out = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True, check=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONHASHSEED="123"), timeout=120).stdout.split()
    assert out == sorted(r.run_id for r in runs)


def test_profile_shrinks_base_and_sweep():
    text = RELAX + '[profiles.debug]\nbatch = 2\n"network.sizes" = [64, 4, 10]\n"sweep.seeds" = [3]\n' \
                   '"sweep.product.network.asymmetry_angle" = [45.0]\n'
    full, debug = study(text), study(text, "debug")
    assert len(full.runs()) == 4 and len(debug.runs()) == 1
    r = debug.runs()[0]
    assert r.seed == 3 and r.config["batch"] == 2 and r.config["network"]["sizes"] == [64, 4, 10]
    assert r.config["network"]["asymmetry_angle"] == 45.0 and debug.profile == "debug"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_study_configs_load_with_a_debug_profile(path):
    full, debug = load_study(path, tasks=TASKS), load_study(path, "debug", tasks=TASKS)
    assert os.path.basename(path) == f"{full.name}.toml"
    assert 1 <= len(debug.runs()) <= min(16, len(full.runs()))


def test_meta_prior_runs_share_their_data_and_check_the_layers():
    """pvrnn_meta_prior: the sequences depend on the data seed alone (the same for every w and network;
    the held-out set the same whatever the training set's size); lists of layers of unequal lengths
    and more ER training sequences than there are are rejected before anything runs."""
    from studies.config import resolve
    from studies.catalogue.pvrnn import pvrnn_data

    task = TASKS["pvrnn_meta_prior"]

    def config(**sections):
        return resolve(task.schema, sections, "base")

    base = {"train_sequences": 3, "train_steps": 40, "test_sequences": 2, "test_steps": 30}
    x, test = pvrnn_data(config(w=1e-4, data=base), 5)
    x2, test2 = pvrnn_data(config(w=1.0, data=base, network={"units": [9]}), 5)
    assert x.shape == (3, 40, 2) and test.shape == (2, 30, 2)
    assert np.array_equal(x, x2) and np.array_equal(test, test2)
    assert np.array_equal(test, pvrnn_data(config(data=dict(base, train_sequences=5)), 5)[1])
    assert not np.array_equal(x, pvrnn_data(config(data=base), 6)[0])
    fixed = dict(base, seed=5)
    assert np.array_equal(x, pvrnn_data(config(data=fixed), 6)[0])
    with pytest.raises(S.SubstrateValueError, match=r"network.units=\[30, 15\], network.latents=\[3\].*equal"):
        task.run(config(network={"latents": [3]}), 0)
    with pytest.raises(S.SubstrateValueError, match="error_regression.train_sequences=4: at most"):
        task.run(config(data=base, error_regression={"train_sequences": 4}), 0)
    with pytest.raises(StudyConfigError, match=r"base.error_regression.meta_prior = -0.5: .*-1 \(the training w\)"):
        config(error_regression={"meta_prior": -0.5})


def test_the_latent_drive_is_the_spread_that_sampling_the_prior_adds_to_the_units_input():
    """pvrnn_meta_prior's latent drive per layer against a Monte-Carlo estimate: 4000 draws of the
    prior's z = mu^p + sigma^p eps at every step t > 0 of a pass, the variance of W_zd z across the
    draws, its mean over sequences, steps and units, square-rooted. Tolerance 3%: the estimate's
    relative error is ~sqrt(2 / 4000) = 2.2% per element, less on the mean; a wrong layer, weight,
    transpose or step range is off by far more. A latent whose weights are zero adds nothing."""
    from models.pvrnn import PVRNN, PVLayer
    from studies.catalogue.pvrnn import _latent_drive

    rng = np.random.default_rng(3)
    model = PVRNN([PVLayer(5, 3, 2.0), PVLayer(4, 2, 4.0)], 2, rng)
    B, T = 2, 6
    A = {k: rng.normal(0.0, 0.5, v.shape) for k, v in model.adaptive_vectors(B, T).items()}
    run = model.run(A, [np.zeros((B, T, lay.latents)) for lay in model.layers])
    got = _latent_drive(model, run)
    for i, lay in enumerate(model.layers):
        z = run.mu_p[i][:, 1:] + np.exp(run.logs_p[i][:, 1:]) * rng.standard_normal((4000, B, T - 1, lay.latents))
        drive = z @ model.params[f"l{i}.W_zd"].T
        assert got[i] == pytest.approx(np.sqrt(drive.var(axis=0).mean()), rel=0.03), i
    model.params["l1.W_zd"][:] = 0.0
    assert _latent_drive(model, run)[1] == 0.0 and _latent_drive(model, run)[0] == got[0]


class _Killed(BaseException):
    """A run's process killed: no exception handler of the sweep sees it (it is no Exception)."""


def test_a_killed_meta_prior_run_resumes_from_its_scratch_checkpoint(tmp_path, monkeypatch):
    """pvrnn_meta_prior's debug run (20 epochs) with a checkpoint every 8 epochs in its scratch folder:
    killed at epoch 10 (its progress report raises after a checkpoint), then executed again in
    the same runs folder: training goes on from the checkpoint's epoch, and every array and scalar of its run file
    but the timings equals an uninterrupted run's to the bit; the scratch folder is gone once the
    run file is written."""
    from studies.catalogue import pvrnn as cat
    from studies.runs import PartialSave, scratch_folder
    from substrate import persist

    monkeypatch.setattr(cat, "CHECKPOINT_EPOCHS", 8)
    run = load_study(os.path.join(ROOT, "studies", "configs", "meta_prior.toml"), "debug", tasks=TASKS).runs()[0]
    seen = []

    class Watched(PartialSave):
        def progress(self, done, total, unit="epoch"):
            seen.append(done)
            if done == kill_at:
                raise _Killed

    monkeypatch.setattr(sw, "PartialSave", Watched)
    rdir, ref_dir = tmp_path / "runs", tmp_path / "ref"
    kill_at = 10
    with pytest.raises(_Killed):
        sw.execute_run(run, "pvrnn_meta_prior", str(rdir))
    assert os.listdir(scratch_folder(str(rdir), run.run_id)) == ["training.h5"]
    assert not os.path.exists(rdir / f"{run.run_id}.h5")
    with h5py.File(os.path.join(scratch_folder(str(rdir), run.run_id), "training.h5"), "r") as f:
        saved = persist.read_state(f["checkpoint"])["epoch"]  # 16: the compiled path checkpoints a chunk (9..16)
        # before it reports the chunk's epochs
    seen.clear()
    kill_at = None
    assert sw.execute_run(run, "pvrnn_meta_prior", str(rdir))["status"] == "done"
    assert saved in (8, 16) and seen[0] == saved + 1 and seen[-1] == 20
    assert not os.path.exists(scratch_folder(str(rdir), run.run_id))
    sw.execute_run(run, "pvrnn_meta_prior", str(ref_dir))
    got, ref = (sw.read_run(str(d / f"{run.run_id}.h5")) for d in (rdir, ref_dir))
    assert got["arrays"].keys() == ref["arrays"].keys() and len(got["arrays"]["free_energy"][1]) == 20
    for k, (dims, a) in ref["arrays"].items():
        assert got["arrays"][k][0] == dims and np.asarray(got["arrays"][k][1]).tobytes() == np.asarray(a).tobytes(), k
    timings = ("train_seconds", "er_seconds")
    assert {k: v for k, v in got["scalars"].items() if k not in timings} == \
        {k: v for k, v in ref["scalars"].items() if k not in timings}


def test_pvrnn_er_config_names_its_credits():
    """pvrnn_er: a credit is 'exact', 'continuous' or 'truncated:K' with K >= 1; anything else is
    rejected by the config loader with the allowed forms."""
    from studies.config import resolve

    task = TASKS["pvrnn_er"]
    ok = resolve(task.schema, {"credit": ["exact", "truncated:3", "continuous"]}, "base")
    assert ok["credit"] == ["exact", "truncated:3", "continuous"]
    for bad in (["truncated"], ["truncated:0"], ["bptt"], ["exact:2"]):
        with pytest.raises(StudyConfigError, match="'truncated:K'"):
            resolve(task.schema, {"credit": bad}, "base")


def test_ep_rules_and_bias_estimators_come_from_the_estimator_registry():
    """ep_train's rule names are models.ep.ESTIMATORS' (but limit), each built from the rule section's
    values of its own fields; ep_bias compares every point estimator, one per N where it takes N."""
    from models import ep
    from studies.catalogue import ep as ep_studies
    from studies.config import resolve

    rule = {"beta": 0.3, "points": 6, "duration": 5.0, "periods": 2}
    assert ep_studies.RULES == tuple(n for n in ep.ESTIMATORS if n != "limit")
    for name in ep_studies.RULES:
        config = resolve(TASKS["ep_train"].schema, {"rule": dict(rule, name=name)}, "base")
        built = ep_studies._rule(config)
        assert type(built) is ep.ESTIMATORS[name]
        assert all(getattr(built, k) == v for k, v in rule.items() if hasattr(built, k))
    names, makers = ep_studies.bias_estimators([3, 5])
    assert names == ["one_sided", "negative", "centred", "holomorphic_3", "holomorphic_5"]
    assert [m(beta=0.1) for m in makers] == [ep.OneSided(0.1), ep.Negative(0.1), ep.Centred(0.1),
                                             ep.Holomorphic(3, 0.1), ep.Holomorphic(5, 0.1)]


@pytest.mark.parametrize("effect, level, expected", [
    ("read_noise", 0.05, ("ReadNoise",)), ("programming_noise", 3.0, ("ConductanceMapping", "ProgrammingNoise")),
    ("quantisation", 15.6, ("ConductanceMapping", "Quantisation")),
    ("feedback_copy", 3.0, ("ConductanceMapping", "ProgrammingNoise", "IndependentFeedback")),
    ("tau_mismatch", 0.3, ("TauMismatch",))])
def test_a_swept_device_effect_is_its_registry_class_at_the_level(effect, level, expected):
    from studies.catalogue.devices import make_device
    from substrate import devices as D

    config = {"preset": "none", "weight_scale": 1.0, "effect": effect, "level": level, "read_policy": "step",
              "relaxation_time": 8.0}
    device = make_device(config)
    assert tuple(type(e).__name__ for e in device.effects) == expected + ("RelaxationTime",)
    swept = device.effects[len(expected) - (effect == "feedback_copy") - 1]
    assert swept == {"read_noise": D.ReadNoise(level, policy="step"), "quantisation": D.Quantisation(16),
                     "programming_noise": D.ProgrammingNoise(scale=level),
                     "feedback_copy": D.ProgrammingNoise(scale=level), "tau_mismatch": D.TauMismatch(level)}[effect]
    assert make_device(dict(config, effect="none", relaxation_time=0.0)) is None


# ------------------------------------------------------------------------------------ sweeps
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_study_config_sweeps_at_debug_size(config_archives, path):
    s, archive_path, stats = config_archives[path]
    n = len(s.runs())
    assert stats == {"total": n, "skipped": 0, "ran": n, "done": n, "failed": 0}
    assert archive_path == os.path.join(os.path.dirname(archive_path), f"{s.name}.h5")
    with h5py.File(archive_path, "r") as f:  # plain h5py
        assert f.attrs["format"] == sw.FORMAT and f.attrs["task"] == s.task and f.attrs["n_done"] == n
        assert f.attrs["study"] == s.text and json.loads(f.attrs["axes"]) == json.loads(json.dumps(s.axes))
        assert f.attrs["git_commit"] and f.attrs["host"] and "numpy" in json.loads(f.attrs["versions"])
        assert sorted(f["runs"]) == sorted(r.run_id for r in s.runs())
        for r in s.runs():
            g = f["runs"][r.run_id]
            assert json.loads(g.attrs["config"]) == r.config and g.attrs["seed"] == r.seed
            assert g.attrs["status"] == "done" and g.attrs["error"] == "" and g.attrs["git_commit"]
            assert json.loads(g.attrs["timings"])["run_seconds"] > 0 and g.attrs["host"]
        status = f["data"]["status"]
        assert status.shape == s.shape and [d.label for d in status.dims] == list(s.axes)
        assert [d[0].name.split("/")[-1] for d in status.dims] == list(s.axes)  # attached dimension scales
    ds = archives.open_dataset(archive_path)
    for name, values in s.axes.items():
        assert ds.sizes[name] == len(values) and list(ds[name].values) == values
    assert (ds["status"] == "done").all()
    results = [v for v in ds.data_vars if v not in ("status", "error", "run_id")]
    assert results and all(ds[v].dims[:len(s.axes)] == tuple(s.axes) for v in results)
    # metrics a config switches off are NaN by design: the homeostasis penalty without homeostasis,
    # the angle between W and B^T without independent feedback, the gradient alignment without a probe
    # (ep_train, and drift, which trains as ep_train does)
    configs = [r.config for r in s.runs()]
    off = set()
    trains = s.task in ("ep_train", "drift", "compare")
    if trains and not any(c["homeostasis"] > 0 for c in configs):
        off.add("asymmetry_penalty")
    if trains and all(c["network"]["feedback"] == "tied" for c in configs):
        off.add("weight_angle")
    if trains and all(c["probe"] == 0 for c in configs):
        off.add("grad_cosine")
    assert all(np.isfinite(ds[v]).any() for v in results if v not in off)
    assert all(not np.isfinite(ds[v]).any() for v in off)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_archives_match_the_reference(config_archives, path):
    """Every deterministic result of every study at debug size as made by the commit the reference digests were
    made on: ids, configs, integers and strings bit for bit, floating-point results within archive_digest.RTOL
    (a millionth; what another CPU's or BLAS kernel's rounding makes of them is ~1e-8 at most): a refactor of the
    studies, the kernels or the devices must not change a result, nor a run id. tests/archive_digest.py says what
    is compared and how to refresh the reference."""
    reference = json.load(open(archive_digest.REFERENCE))[os.path.basename(path)]
    now = archive_digest.digest(config_archives[path][1])
    assert sorted(now) == sorted(reference)
    assert archive_digest.differences(now, reference) == {}


def test_archive_digest_tells_rounding_from_a_changed_result():
    """The gate's comparison: the rounding of another machine passes, a change of one value by a hundred-thousandth
    of its array's size, a NaN where a number was, a changed shape or dtype, an integer off by one do not; a run's
    result that is rounding noise itself is judged at its study's scale."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 40))
    ref = archive_digest._digest(x)
    assert archive_digest.deviation(archive_digest._digest(x * (1 + 1e-12)), ref) < archive_digest.RTOL
    changed = x.copy()
    changed[1, 7] += 1e-5 * np.abs(x).sum()
    assert archive_digest.deviation(archive_digest._digest(changed), ref) > archive_digest.RTOL
    nan = x.copy()
    nan[0, 0] = np.nan
    for other in (nan, x.astype(np.float32), x.reshape(40, 3), x.astype(complex)):
        assert archive_digest.deviation(archive_digest._digest(other), ref) == np.inf
    assert archive_digest.deviation(archive_digest._digest(np.arange(5)), archive_digest._digest(np.arange(5) + 1)) \
        == np.inf
    tiny, study = archive_digest._digest(np.array(1.6e-16)), archive_digest._digest(np.array([1.6e-16, 0.7]))
    assert archive_digest.deviation(archive_digest._digest(np.array(1.7e-16)), tiny) > 1e-2
    reference = {"data/limit_error": study, "runs/a/scalars/limit_error": tiny}
    now = {"data/limit_error": study, "runs/a/scalars/limit_error": archive_digest._digest(np.array(1.7e-16))}
    assert archive_digest.differences(now, reference) == {}
    assert archive_digest.differences({}, reference) == {k: np.inf for k in reference}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_cli_info_and_plot(config_archives, path, tmp_path):
    s, archive_path, _ = config_archives[path]
    result = CliRunner().invoke(main, ["info", archive_path])
    assert result.exit_code == 0, result.output
    for name, values in s.axes.items():
        assert f"  {name} ({len(values)})" in result.output
    assert f"runs: {len(s.runs())} total, {len(s.runs())} done, 0 failed, 0 missing" in result.output
    result = CliRunner().invoke(main, ["plot", archive_path, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    png, pdf = (tmp_path / f"{s.name}.png").read_bytes(), (tmp_path / f"{s.name}.pdf").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000 and pdf[:5] == b"%PDF-"


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path):
    """A relaxation that does not converge (max_steps = 1) fails with its message, its neighbours finish;
    a task that raises is recorded with the exception and its traceback."""
    text = RELAX.replace('"network.asymmetry_angle" = [0.0, 90.0]', "max_steps = [1, 500]")
    s = study(text)
    stats = {}
    path = sw.run_sweep(s, str(tmp_path), workers=2, progress=False, stats=stats)
    assert stats["done"] == 2 and stats["failed"] == 2
    ds = archives.open_dataset(path)
    failed = ds.sel(max_steps=1)
    assert (failed["status"] == "failed").all() and (ds.sel(max_steps=500)["status"] == "done").all()
    for err in failed["error"].values.ravel():
        assert err.startswith("relaxation failed: exp_euler: not_converged at t=0.5 after 1 steps")
    assert np.isnan(failed["steps"]).all() and np.isnan(failed["residual_trace"]).all()
    assert np.isfinite(ds.sel(max_steps=500)["steps"]).all()
    rid = str(failed["run_id"].values.ravel()[0])
    run = archives.load_run(path, rid)
    assert run["attrs"]["status"] == "failed" and "RunFailed" in run["attrs"]["traceback"]
    assert run["scalars"]["converged"] == 0.0 and run["scalars"]["steps"] == 1  # what was computed is kept

    st = selftest(fail={2.0: "raise", 3.0: "diverge"})
    summaries = list(sw.SerialExecutor().run(st.runs(), "selftest", str(tmp_path / "runs")))
    assert [x["status"] for x in summaries] == ["done", "failed", "failed"]
    assert summaries[1]["error"] == "ValueError: selftest raised for value 2"
    assert summaries[2]["error"] == "selftest diverged for value 3"
    assert "raise ValueError" in sw.read_run(str(tmp_path / "runs" / f"{st.runs()[1].run_id}.h5"))["attrs"]["traceback"]


def test_a_run_that_kills_its_worker_is_recorded_as_failed(tmp_path):
    """A worker process that dies (here: SIGKILL from inside the run) breaks the pool; the runs it may
    have been running are retried alone, the culprit is recorded as failed, the others finish."""
    s = selftest(values=(1.0, 2.0, 3.0, 4.0), fail={2.0: "crash"}, sleep=0.05)
    stats = {}
    path = sw.run_sweep(s, str(tmp_path), workers=2, progress=False, stats=stats)
    assert stats == {"total": 4, "skipped": 0, "ran": 4, "done": 3, "failed": 1}
    ds = archives.open_dataset(path)
    assert list(ds["status"].values.ravel()) == ["done", "failed", "done", "done"]
    assert ds["error"].values.ravel()[1].startswith(sw.WORKER_DIED)
    # the selftest saved its trace (save_partial) before killing itself: the failed run keeps it
    assert "the results it saved before (save_partial) are kept" in ds["error"].values.ravel()[1]
    crashed = archives.load_run(path, str(ds["run_id"].values.ravel()[1]))
    expected = 2.0 * np.arange(4) + np.random.default_rng(0).normal(size=4)
    np.testing.assert_array_equal(crashed["arrays"]["trace"][1], expected)
    assert not [f for f in os.listdir(tmp_path / "runs") if f.endswith(".partial.h5")]  # none left behind


def test_a_run_stopped_after_writing_its_file_leaves_no_partial_file(tmp_path):
    """A broken pool terminates every worker: one may stop between writing its run file and removing its
    partial file (CI once found ``<run_id>.partial.h5`` left by the test above). The driver's check of
    which runs finished before the break removes the leftovers of those that did, and only theirs."""
    runs_dir = tmp_path / "runs"
    finished, unstarted = selftest(values=(1.0, 2.0)).runs()
    list(sw.SerialExecutor().run([finished], "selftest", str(runs_dir)))
    leftovers = [sw.partial_file(str(runs_dir), rid) for rid in (finished.run_id, unstarted.run_id)]
    for path in leftovers:
        with open(path, "wb") as f:
            f.write(b"partial")
    summaries = list(sw._written_before_the_break([finished.to_dict(), unstarted.to_dict()], str(runs_dir)))
    assert [(x["run_id"], x["status"]) for x in summaries] == [(finished.run_id, "done")]
    assert [os.path.exists(p) for p in leftovers] == [False, True]


def test_rerun_skips_finished_runs_and_retry_failed_reruns_failed_ones(tmp_path):
    s = selftest(values=(1.0, 2.0, 3.0), fail={2.0: "diverge"}, seeds=(0, 1))
    out = str(tmp_path)

    def executions():
        with h5py.File(os.path.join(out, "st.h5"), "r") as f:
            return {rid: (g.attrs["execution"], g.attrs["status"]) for rid, g in f["runs"].items()}

    runner = CliRunner()
    toml = tmp_path / "st.toml"
    toml.write_text(s.text)
    result = runner.invoke(main, ["sweep", str(toml), "--out", out, "--quiet", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "ran 6 runs (4 done, 2 failed); skipped 0" in result.output
    assert "runs: 6 total, 4 done, 2 failed, 0 missing" in result.output
    assert "selftest diverged for value 2" in result.output
    first = executions()
    result = runner.invoke(main, ["sweep", str(toml), "--out", out, "--quiet"])
    assert result.exit_code == 0 and "ran 0 runs (0 done, 0 failed); skipped 6" in result.output
    assert executions() == first  # nothing ran again
    result = runner.invoke(main, ["sweep", str(toml), "--out", out, "--quiet", "--retry-failed"])
    assert result.exit_code == 0 and "ran 2 runs (0 done, 2 failed); skipped 4" in result.output
    again = executions()
    for rid, (execution, status) in first.items():
        assert (again[rid][0] == execution) == (status == "done")  # only the failed ones ran again
    result = runner.invoke(main, ["sweep", str(toml), "--profile", "debug", "--quiet"])
    assert result.exit_code == 1 and "profile 'debug' is not defined" in result.output


def test_same_config_and_seed_give_bit_identical_results(tmp_path):
    s = study(RELAX.replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))
    a = sw.run_sweep(s, str(tmp_path / "a"), workers=2, progress=False)
    b = sw.run_sweep(s, str(tmp_path / "b"), workers=1, progress=False)
    here = tmp_path / "here"
    for r in s.runs()[:2]:  # and in this process
        sw.execute_run(r, s.task, str(here))
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for rid in fa["runs"]:
            for name in ("residual_trace", "trace_t"):
                x, y = fa["runs"][rid]["arrays"][name][()], fb["runs"][rid]["arrays"][name][()]
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
            for name in ("steps", "nfev", "residual", "t_final"):
                assert fa["runs"][rid]["scalars"][name][()].tobytes() == fb["runs"][rid]["scalars"][name][()].tobytes()
        for name in ("residual_trace", "trace_t", "steps", "nfev", "residual", "t_final"):
            assert fa["data"][name][()].tobytes() == fb["data"][name][()].tobytes()
        for r in s.runs()[:2]:
            with h5py.File(here / f"{r.run_id}.h5", "r") as fh:
                assert fh["arrays"]["residual_trace"][()].tobytes() == \
                    fa["runs"][r.run_id]["arrays"]["residual_trace"][()].tobytes()
        assert np.isfinite(fa["data"]["residual"][()]).all()


def test_execute_run_is_the_worker_interface(tmp_path):
    """What a Dask worker calls: a picklable module-level function taking a Run or its dict."""
    s = selftest(values=(1.0,))
    run = s.runs()[0]
    fn = pickle.loads(pickle.dumps(sw.execute_run))
    summary = fn(run.to_dict(), "selftest", str(tmp_path))
    assert set(summary) == {"run_id", "status", "error", "seconds"} and summary["status"] == "done"
    got = sw.read_run(str(tmp_path / f"{run.run_id}.h5"))
    assert got["attrs"]["run_id"] == run.run_id and json.loads(got["attrs"]["coords"]) == run.coords
    assert got["arrays"]["trace"][0] == ("step",) and got["scalars"]["value"] == 1.0
    bad = Run(run_id="0" * 16, config=run.config, seed=run.seed, coords=run.coords)
    with pytest.raises(ValueError, match="does not match"):
        sw.execute_run(bad, "selftest", str(tmp_path))


def test_temporary_and_unreadable_files_are_not_runs(tmp_path):
    s = selftest(values=(1.0, 2.0))
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    (runs_dir / ".tmp-abc123.h5").write_bytes(b"half a file")  # a killed writer's
    (tmp_path / ".tmp-def456.h5").write_bytes(b"half an archive")
    (runs_dir / f"{s.runs()[0].run_id}.h5").write_bytes(b"not HDF5")  # e.g. a damaged disk
    assert sw.list_run_files(str(runs_dir)) == [s.runs()[0].run_id]
    stats = {}
    path = sw.run_sweep(s, str(tmp_path), progress=False, executor=sw.SerialExecutor(), stats=stats)
    assert stats["ran"] == 2 and stats["done"] == 2  # the unreadable one ran again
    assert sorted(os.listdir(runs_dir)) == sorted(f"{r.run_id}.h5" for r in s.runs())
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert (archives.open_dataset(path)["status"] == "done").all()


def test_missing_runs_are_nan_and_a_second_driver_is_locked_out(tmp_path):
    s = selftest(values=(1.0, 2.0, 3.0))
    sw.execute_run(s.runs()[1], "selftest", str(tmp_path / "runs"))
    ds = archives.open_dataset(sw.consolidate(s, str(tmp_path)))
    assert list(ds["status"].values.ravel()) == ["missing", "done", "missing"]
    assert np.isnan(ds["trace"].values[0]).all() and np.isfinite(ds["trace"].values[1]).all()
    assert ds.attrs["n_missing"] == 2
    with sw._driver_lock(str(tmp_path)):
        with pytest.raises(sw.SweepLockedError, match=f"pid {os.getpid()}"):
            sw.run_sweep(s, str(tmp_path), progress=False, executor=sw.SerialExecutor())


def test_single_thread_limits_every_blas():
    from threadpoolctl import threadpool_info

    with sw.single_thread():
        info = threadpool_info()
        assert info and all(i["num_threads"] == 1 for i in info if i["user_api"] == "blas")


# ------------------------------------------------------------------------------------ saved weights
TRAIN = """
[study]
name = "t"
task = "ep_train"
{save}
[base]
data = "digits"
n_train = 60
n_test = 40
epochs = 1
batch_size = 20
probe = 0
[base.network]
sizes = [64, 8, 8, 10]
[sweep]
seeds = [0, 1]
"""


def test_training_runs_keep_their_trained_network(tmp_path):
    """save_weights (on by default): each run file holds the trained classifier (substrate.save's layout, under
    weights/model), the archive a copy; substrate.load reads either back, bit for bit the network the same
    training makes in this process, and it scores the run's final test accuracy. The digests of the gate leave the
    weights out (archive_digest reads only arrays, scalars and the run's attributes), so a study that starts to
    save them keeps its reference."""
    from studies.catalogue import ep as E

    s = study(TRAIN.format(save=""))
    assert s.save_weights and all(r.save_weights for r in s.runs())
    path = sw.run_sweep(s, str(tmp_path / "on"), executor=sw.SerialExecutor(), progress=False)
    saved = archives.saved_objects(path)
    assert [(x["run_id"], x["group"]) for x in saved] == sorted(
        (r.run_id, f"runs/{r.run_id}/weights/model") for r in s.runs())
    for r in s.runs():
        run_path = os.path.join(sw.runs_folder(str(tmp_path / "on")), f"{r.run_id}.h5")
        from_run = S.load(run_path, group="weights/model")
        from_archive = S.load(path, group=f"runs/{r.run_id}/weights/model")
        fresh, data, _ = E.train_classifier(r.config, r.seed)
        for model in (from_run, from_archive):
            got, want = model.parameters(), fresh.parameters()
            assert list(got) == list(want)
            assert all(got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes() for k in want)
        accuracy = from_archive.evaluate(data.x_test, data.y_test, E.task_relaxation(r.config))[1]
        assert accuracy == archives.load_run(path, r.run_id)["scalars"]["final_test_accuracy"]
        assert [x["group"] for x in archives.saved_objects(run_path)] == ["weights/model"]
    assert not [k for k in archive_digest.digest(path) if "weights" in k]
    with pytest.raises(S.ArchiveError, match="has no group 'runs/nope'"):
        S.load(path, group="runs/nope")
    with pytest.raises(S.ArchiveError, match="is not a saved substrate object"):
        S.load(path, group="runs")

    off = study(TRAIN.format(save="save_weights = false"))
    assert [r.run_id for r in off.runs()] == [r.run_id for r in s.runs()]  # not part of a run's identity
    path = sw.run_sweep(off, str(tmp_path / "off"), executor=sw.SerialExecutor(), progress=False)
    assert archives.saved_objects(path) == []
    with h5py.File(path, "r") as f:
        assert all("weights" not in g for g in f["runs"].values())


def test_save_weights_is_checked_like_every_key():
    with pytest.raises(StudyConfigError, match=r"study.save_weights = 'yes' \(str\): wrong type; allowed: a boolean"):
        study(TRAIN.format(save='save_weights = "yes"'))


TRAINING_TASKS = {"ep_train": (), "drift": (), "pvrnn_meta_prior": ("A",), "pvrnn_er": ("A",)}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_training_studies_keep_what_they_trained(config_archives, path):
    """Every run of a training study (save_weights is on by default) keeps its trained model, which substrate.load
    reads back from the archive, with the values saved beside it (a PV-RNN's adaptive vectors A); the other
    studies keep nothing."""
    s, archive, _ = config_archives[path]
    saved = archives.saved_objects(archive)
    if s.task not in TRAINING_TASKS:
        assert saved == []
        return
    assert sorted(x["run_id"] for x in saved) == sorted(r.run_id for r in s.runs())
    for item in saved:
        model, extra = S.load(archive, group=item["group"], extra=True)
        assert type(model).__name__ == ("PVRNN" if s.task.startswith("pvrnn") else "Classifier")
        assert sorted(extra) == sorted(TRAINING_TASKS[s.task])
