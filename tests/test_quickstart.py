"""The main job: the quickstart writes a readable archive with provenance and a figure."""

import json

import h5py
import numpy as np
from click.testing import CliRunner

import substrate as S
from studies.cli import main


def test_quickstart_writes_archive_and_figure(tmp_path):
    out = tmp_path / "qs"
    result = CliRunner().invoke(main, ["quickstart", "--out", str(out), "--batch", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"archive: {out / 'quickstart.h5'}" in result.output
    png = (out / "quickstart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]  # atomic write left nothing
    with h5py.File(out / "quickstart.h5", "r") as f:
        config = json.loads(f.attrs["config"])
        assert config["batch"] == 16 and f.attrs["seed"] == 0
        assert set(json.loads(f.attrs["versions"])) >= {"numpy", "numba", "h5py"}
        assert f.attrs["git_commit"] and f.attrs["host"]
        equilibria = {m: f["relax"][m]["u"][()] for m in S.METHODS}
        for m in S.METHODS:
            g = f["relax"][m]
            assert g.attrs["status"] == "success"
            assert g["residual"][()].max() <= config["tol"]
            assert g["residual_trace"][-1] <= config["tol"] < g["residual_trace"][0]
        # every integrator relaxed to the same equilibrium (within a few times the tolerance)
        spread = max(np.abs(equilibria[m] - equilibria["rk4"]).max() for m in S.METHODS)
        assert spread < 20 * config["tol"]
        assert f["transient"]["y"].shape == (151, 16, 10)
