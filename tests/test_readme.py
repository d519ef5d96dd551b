"""The README's Python code blocks run as written, each on its own (a reader pastes one block, not
the page), so they never go stale."""

import pathlib
import re

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


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs_on_its_own(line, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # a fresh namespace per block: a block that relies on an earlier one fails with a NameError
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    for statement, printed in PRINTS.items():
        if statement in code:
            assert printed in out, (statement, out)
