"""The benchmarks' machine-readable results (benchmarks/results.py) and the README block generated from
them (benchmarks/readme_table.py), on sample results: no timing here (the GEMM bound, the one
measurement results.py makes itself, is replaced by a fixed sample value)."""

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    results = importlib.reload(importlib.import_module("results"))
    readme_table = importlib.reload(importlib.import_module("readme_table"))
    monkeypatch.setattr(results, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(results, "gemm_bound", lambda: {"float64": 29.5e-6, "float32": 14.3e-6})
    monkeypatch.setattr(sys, "argv", ["bench_devices.py", "--repeats", "3"])
    return results, readme_table, tmp_path


ROWS = [("no device", 10.0, 11.0, 90.0, 95.0, 88.86, 1.0), ("state noise", 12.0, 13.0, 110.0, 120.0, 108.123, 1.2168)]
DRAWS = [("normals.fill", 30.04, 1.1449, 0.338), ("numpy standard_normal", 250.0, 9.53, 2.81)]


def test_record_writes_the_tables_with_the_machine_and_the_gemm_bound(bench):
    results, _, tmp = bench
    columns = ["case", "a", "b", "c", "d", "marginal step us", "ratio"]
    path = results.record("first", columns, ROWS, key="devices", baseline="no device")
    assert path == tmp / "results" / "bench_devices.json"
    data = json.loads(path.read_text())
    assert data["bench"] == "bench_devices" and data["argv"] == ["--repeats", "3"]
    assert data["gemm_bound_s"] == {"float64": 29.5e-6, "float32": 14.3e-6}
    m = data["machine"]
    assert m["logical_cores"] >= 1 and len(m["load_average"]) == 3 and m["threads"]["numba"] >= 1
    assert data["tables"][0]["rows"] == [list(r) for r in ROWS] and data["tables"][0]["baseline"] == "no device"
    results.record("second", ["draws", "us per step", "ratio to np.exp", "ratio to the no-device step"], DRAWS,
                   key="draws")
    assert [t["title"] for t in json.loads(path.read_text())["tables"]] == ["first", "second"]
    with pytest.raises(ValueError, match="a row of 2 values for 7 columns"):
        results.record("bad", columns, [("x", 1.0)])


def test_readme_block_generated_from_sample_results(bench):
    results, readme_table, tmp = bench
    results.record("t", ["case", "a", "b", "c", "d", "marginal step us", "ratio"], ROWS, key="devices")
    results.record("t2", ["draws", "us per step", "ratio to np.exp", "ratio to the no-device step"], DRAWS,
                   key="draws")
    block = readme_table.block(readme_table.load(tmp / "results"))
    lines = block.splitlines()
    assert "| case | marginal step (us) | ratio |" in lines
    assert "| no device | 88.9 | 1.00 |" in lines and "| state noise | 108.1 | 1.22 |" in lines
    assert "| normals.fill | 30.0 | 1.14 | 0.34 |" in lines
    assert "| numpy standard_normal | 250.0 | 9.53 | 2.81 |" in lines
    assert block.count("GEMM bound of the step (float64) 29.5 us") == 2

    readme = tmp / "README.md"
    readme.write_text(f"intro\n{readme_table.BEGIN}\nold table\n{readme_table.END}\nafter\n")
    readme_table.main(["--results", str(tmp / "results"), "--readme", str(readme)])
    text = readme.read_text()
    assert text == f"intro\n{readme_table.BEGIN}\n{block}\n{readme_table.END}\nafter\n"
    readme_table.main(["--results", str(tmp / "results"), "--readme", str(readme), "--check"])  # up to date
    readme.write_text(text.replace("88.9", "77.7"))
    with pytest.raises(SystemExit, match="differs"):
        readme_table.main(["--results", str(tmp / "results"), "--readme", str(readme), "--check"])


def test_missing_tables_and_markers(bench):
    _, readme_table, tmp = bench
    assert "not measured yet" in readme_table.block({})
    with pytest.raises(ValueError, match="needs one"):
        readme_table.replace_block("no markers here", "x")
    with pytest.raises(ValueError, match="needs one"):
        readme_table.replace_block(f"{readme_table.END} {readme_table.BEGIN}", "x")


def test_the_readme_block_exists():
    """README.md carries the markers the generator fills."""
    text = (ROOT / "README.md").read_text()
    assert text.count("<!-- bench:begin -->") == 1 and text.count("<!-- bench:end -->") == 1


def test_bench_step_records_the_tables_it_prints(bench, capsys):
    """bench_step.py's Table.print also records its rows (times in us, ratios to the GEMM bound of its row;
    a skipped row as None) under the key of its title."""
    results, _, tmp = bench
    bench_step = importlib.import_module("bench_step")
    assert bench_step.results is results  # the module the fixture pointed at tmp_path
    table = bench_step.Table()
    table.add("GEMM bound", "float64", 1, 30e-6, 32e-6, (30e-6, 32e-6))
    table.add("substrate euler, marginal step", "float64", 1, 81e-6, 90e-6, (30e-6, 32e-6), "note")
    table.skip("activation: engine", "float64", 1, "TypeError")
    table.print("Per step: batch 64")
    assert "substrate euler, marginal step" in capsys.readouterr().out
    t = json.loads((tmp / "results" / "bench_devices.json").read_text())["tables"][-1]
    assert t["key"] == "per step" and t["title"] == "Per step: batch 64"
    rows = {r[0]: r for r in t["rows"]}
    assert rows["substrate euler, marginal step"][3:7] == pytest.approx([81.0, 90.0, 2.7, 90 / 32])
    assert rows["activation: engine"][3:7] == [None, None, None, None]
    assert rows["activation: engine"][7] == "skipped: TypeError"


# ------------------------------------------------------------------------------------------------ the real tables
def _tables():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("readme_table").TABLES
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


TABLES = _tables()
COMMITTED = ROOT / "benchmarks" / "results"


def _recorded(data, key):
    found = [t for t in data["tables"] if t.get("key") == key]
    assert found, f"{data['bench']} records no table {key!r}"
    return found[-1]


@pytest.mark.parametrize("bench_name,key,columns", [(b, k, [c for c, _, _ in cols]) for b, k, _, cols in TABLES],
                         ids=[f"{b}:{k}" for b, k, _, _ in TABLES])
def test_every_readme_table_names_columns_its_bench_recorded(bench_name, key, columns):
    """The committed results file of each bench (written by running it through results.py) holds the
    table under the key readme_table asks for, with every column it renders, and the bench's source
    records tables."""
    assert "results.record(" in (ROOT / "benchmarks" / f"{bench_name}.py").read_text()
    data = json.loads((COMMITTED / f"{bench_name}.json").read_text())
    assert data["schema"] == 1 and data["bench"] == bench_name and data["gemm_bound_s"]["float64"] > 0
    table = _recorded(data, key)
    assert set(columns) <= set(table["columns"]), set(columns) - set(table["columns"])
    assert table["rows"] and all(len(r) == len(table["columns"]) for r in table["rows"])


# tiny runs of the cheap benches, through results.run as `make bench` does (no timing asserted)
TINY = {"bench_activations": ["--rows", "4", "--batch", "8", "--repeats", "1"],
        "bench_er": ["--steps", "1", "--iterations", "2", "--window", "2", "--repeats", "1"],
        "bench_dpm_memory": ["--steps", "2", "--batch", "4"]}


@pytest.mark.parametrize("bench_name", [pytest.param(b, marks=pytest.mark.slow) if b == "bench_dpm_memory" else b
                                        for b in sorted(TINY)])  # dpm: four processes importing torch, ~8 s
def test_a_tiny_run_records_the_readme_columns(bench, bench_name, capsys):
    if bench_name == "bench_dpm_memory":
        pytest.importorskip("torch")  # the bench compares against torch autograd
    results, readme_table, tmp = bench
    results.run(ROOT / "benchmarks" / f"{bench_name}.py", TINY[bench_name])
    data = json.loads((tmp / "results" / f"{bench_name}.json").read_text())
    assert data["output"] == capsys.readouterr().out.rsplit("results: ", 1)[0]
    for b, key, _, columns in readme_table.TABLES:
        if b == bench_name:
            table = _recorded(data, key)
            assert {c for c, _, _ in columns} <= set(table["columns"])
            for row in table["rows"]:  # every rendered cell formats
                for c, _, fmt in columns:
                    readme_table._cell(row[table["columns"].index(c)], fmt)


def test_the_readme_block_renders_from_the_committed_results():
    """Every table of TABLES is in the committed results, and README.md's block is what they render
    (`readme_table.py --check`): after a bench is run again, `benchmarks/readme_table.py` must be too."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        readme_table = importlib.import_module("readme_table")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    block = readme_table.block(readme_table.load(COMMITTED))
    assert "not measured yet" not in block
    for _, _, caption, columns in TABLES:
        assert caption in block and "| " + " | ".join(h for _, h, _ in columns) + " |" in block
    readme_table.main(["--check"])
