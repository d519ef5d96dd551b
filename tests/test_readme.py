"""The README's Python code blocks run as written, so they never go stale."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == ["make quickstart", "make test"]


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace = {}
    checked = False
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
        if "class SenseOffset" in block:
            check_step_effect(namespace)
            checked = True
    assert checked
    out = capsys.readouterr().out
    assert "exp_euler: success" in out and "(51, 16, 11) (51, 16, 3)" in out


def check_step_effect(ns):
    """The README's kernel-side effect acts inside the stepping kernel as written: at the device's
    equilibrium the nominal field is minus its offset current (F(u) + offset = 0), so the state differs
    from the ideal equilibrium; the same seed gives the same bits, another seed other offsets."""
    S, D, net, x = ns["S"], ns["D"], ns["net"], ns["x"]
    effect = ns["SenseOffset"](0.05)

    def relaxed(seed):
        hw = D.attach(net, D.Device((effect,)), np.random.default_rng(seed))
        return hw, S.relax(hw, x, method="euler", dt=0.2, tol=1e-11).u

    hw, u = relaxed(7)
    offset = effect.state(hw, x.shape[0], np.float64).current
    assert np.all(offset != 0.0)
    np.testing.assert_allclose(S.VectorField(net, x)(u), -np.broadcast_to(offset, u.shape), rtol=0, atol=1e-10)
    ideal = S.relax(net, x, method="euler", dt=0.2, tol=1e-11).u
    assert np.max(np.abs(u - ideal)) > 0.1 * np.max(np.abs(offset))
    assert np.array_equal(relaxed(7)[1], u)
    assert not np.array_equal(relaxed(8)[1], u)
