"""The main job: the quickstart trains with centred EP, holomorphic EP and the exact gradient, and
writes a readable archive with provenance and a figure."""

import json

import h5py
import numpy as np
from click.testing import CliRunner

from studies.cli import main


def test_quickstart_writes_archive_and_figure(tmp_path):
    out = tmp_path / "qs"
    result = CliRunner().invoke(main, ["quickstart", "--out", str(out), "--epochs", "2", "--n-train", "200", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"archive: {out / 'quickstart.h5'}" in result.output
    png = (out / "quickstart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]  # atomic write left nothing
    with h5py.File(out / "quickstart.h5", "r") as f:
        config = json.loads(f.attrs["config"])
        assert config["epochs"] == 2 and config["n_train"] == 200 and f.attrs["seed"] == 0
        assert set(json.loads(f.attrs["versions"])) >= {"numpy", "numba", "h5py"}
        assert f.attrs["git_commit"] and f.attrs["host"]
        assert set(f["rules"]) == {"centred", "holomorphic", "exact"}
        for name, g in f["rules"].items():
            assert g["epoch"][()].tolist() == [0, 1, 2]
            acc = g["test_accuracy"][()]
            assert acc[-1] > acc[0] + 0.2, (name, acc)  # two epochs on 200 digits already learn
            assert np.all(g["grad_cosine"][()] > 0.9)  # a symmetric network: EP follows the gradient
        np.testing.assert_allclose(f["rules"]["exact"]["grad_cosine"][()], 1.0, rtol=1e-12)  # itself
        # same initial weights for every rule: identical untrained evaluations
        assert len({float(g["test_loss"][0]) for g in f["rules"].values()}) == 1
