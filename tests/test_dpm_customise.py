"""The dpm_customise study (AdjointDPM's customisations on the digits): its debug sweep and figure,
its config errors, and the noise attack on a small trained model."""

import os
import re

import numpy as np
import pytest

from models import dpm
from studies import archives
from studies import sweep as sw
from studies.catalogue import TASKS
from studies.catalogue import dpm_customise as dc
from studies.config import StudyConfigError, resolve
from substrate.errors import SubstrateValueError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "studies", "configs", "dpm_customise.toml")


def config(**sections):
    return resolve(TASKS["dpm_customise"].schema, sections, "base")


def test_debug_sweep_and_its_figure(config_archives, tmp_path):
    """The debug profile sweeps every customisation into one archive (each run's own arrays, NaN for
    the others'), a run repeated gives the same bits, and the figure draws a row for each. The sweep is
    conftest.py's ``config_archives`` (test_studies.py checks its digests)."""
    study, path, _ = config_archives[CONFIG]
    ds = archives.open_dataset(path)
    assert list(ds["what"].values) == ["noise", "conditioning", "weights"] and (ds["status"] == "done").all()
    noise = ds.sel(what="noise")
    assert noise["noise_images"].shape[-5:] == (2, 2, 4, 8, 8) and list(ds["pair"].values) == ["1>7", "3>8"]
    assert np.isfinite(noise["noise_target_share"]).all() and not np.isfinite(noise["weights_ink"]).any()
    assert np.isfinite(ds.sel(what="weights")["weights_accuracy"]).all()
    assert np.isfinite(ds.sel(what="conditioning")["conditioning_ink"]).all()
    run = next(r for r in study.runs() if r.config["what"] == "conditioning")  # same config and seed, same bits
    again = dc.run_dpm_customise(run.config, run.seed)
    stored = archives.load_run(path, run.run_id)["arrays"]
    assert all(np.array_equal(stored[k][1], v) for k, (_, v) in again.arrays.items())
    fig = dc.plot_dpm_customise(path)
    assert len(fig.axes) == 15
    fig.savefig(tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 20_000


def test_bad_config_values_name_the_key():
    for sections, needle in ((dict(noise={"pairs": ["1>1"]}), "base.noise.pairs[0] = '1>1'"),
                             (dict(noise={"pairs": ["1-7"]}), "'S>T'"),
                             (dict(noise={"pairs": ["1>7", "1>7"]}), "distinct pairs"),
                             (dict(what="schedule"), "base.what = 'schedule'"),
                             (dict(model={"dataset": "eight_gaussians"}), "base.model.dataset"),
                             (dict(sampler={"solver": "heun"}), "base.sampler.solver"),
                             (dict(weights={"batch": 5}), "base.weights.batch = 5"),
                             (dict(style={"ink_factor": 0.0}), "base.style.ink_factor")):
        with pytest.raises(StudyConfigError, match=re.escape(needle)):
            config(**sections)
    with pytest.raises(SubstrateValueError, match=r"evaluation.show=8: at most noise.samples = 4"):
        dc.run_dpm_customise(config(noise={"samples": 4}), 0)
    assert dc.SOLVERS == dpm.SOLVERS and dc.GRIDS == dpm.GRIDS and dc.ODES == dpm.ODES  # the schema's copies


def test_noise_attack_turns_samples_into_the_target_digit():
    """On a small digits model (128 x 2, 2000 training steps, 10 sampler steps), 30 Adam steps (0.1)
    on x_T of 16 samples per pair raise the attacked classifier's target share from <= 0.2 to >= 0.9
    (measured 0 -> 1 on 1>7 and 0>6) and cut the cross-entropy 100-fold (measured 13 -> 3e-4 and
    10 -> 3e-3); the independent classifier agrees (target >= 0.8, source <= 0.1; measured 1 and 0):
    the samples changed digit. The share recorded before the first step is that of the samples before."""
    cfg = config(what="noise", model={"hidden": 128, "depth": 2, "embed": 8, "train_steps": 2000, "batch": 128,
                                      "lr": 2e-3},
                 sampler={"steps": 10}, noise={"pairs": ["1>7", "0>6"], "samples": 16, "steps": 30, "lr": 0.1})
    with sw.single_thread():  # as in a sweep: torch's two threads on a busy machine: 130 s against 7 s
        r = dc.run_dpm_customise(cfg, 0)
    share, loss = r.arrays["noise_target_share"][1], r.arrays["noise_loss"][1]
    assert r.scalars["target_share_before"] <= 0.2 and r.scalars["target_share_after"] >= 0.9, r.scalars
    assert np.all(loss[:, -1] < 0.01 * loss[:, 0]), loss[:, [0, -1]]
    assert np.array_equal(r.arrays["noise_target_share_steps"][1][:, 0], share[:, 0])
    assert r.scalars["judge_target_share_after"] >= 0.8 and r.scalars["judge_source_share_after"] <= 0.1
