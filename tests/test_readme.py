"""The README's Python code blocks run as written, each on its own (a reader pastes one block, not
the page), so they never go stale."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    """(line where the block's code starts, code) for every ```python block of the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


BLOCKS = _python_blocks()

# what a block prints when it contains the statement on the left
PRINTS = {"print(eq.report())": "exp_euler: success",
          'print(sol.u.shape, sol.state("y").shape)': "(51, 16, 11) (51, 16, 3)"}


def test_readme_starts_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == ["make quickstart", "make test"]


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2 and any(statement in code for code in (c for _, c in BLOCKS) for statement in PRINTS)
    assert any("class SenseOffset" in code for _, code in BLOCKS)  # the kernel-side effect checked below


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs_on_its_own(line, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # a fresh namespace per block: a block that relies on an earlier one fails with a NameError
    namespace = {"__name__": "__readme__"}
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    for statement, printed in PRINTS.items():
        if statement in code:
            assert printed in out, (statement, out)
    if "class SenseOffset" in code:
        check_step_effect(namespace)


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
