"""The documentation: the repository refers to nothing outside itself, every section of
docs/equations.md that the code cites exists, the API reference (docs/build_api.py) has a page for every
public module, and two claims of the equations page (section 1) hold: Euler with dt = tau is Laborieux &
Zenke's discrete-time dynamics, and a large nudge can set that map oscillating where the continuous-time
flow settles."""

import importlib.util
import os
import pathlib
import re

import numpy as np
import pytest

import substrate as S
from substrate.activations import rho
from substrate.nudge import Cost, Nudge

ROOT = pathlib.Path(__file__).resolve().parents[1]
EQUATIONS = ROOT / "docs" / "equations.md"
TEXT_SUFFIXES = {".py", ".md", ".toml", ".ipynb", ".txt", ".cfg", ".yaml", ".yml", ".json"}
TEXT_NAMES = {"Makefile", "run"}
# folders that are not the project's sources: caches, environments, build and run outputs
SKIP_DIRS = {"__pycache__", "build", "dist", "sweep-output", "quickstart-output", "node_modules"}

# a mention of a file outside the repository: the old equations page, or a path into a sibling folder
OUTSIDE = re.compile(r"\bREFERENCES\b|\.\./shared\b|/work/")
RELATIVE = re.compile(r"(?<![\w./])((?:\.\./)+[\w.-]+(?:/[\w.-]+)*)")
CITATION = re.compile(r"docs/equations\.md,?[\s#]+sections?[\s#]+(\d+(?:\.\d+)?(?:(?:,\s*|\s+and\s+)\d+(?:\.\d+)?)*)")


def _repository_files():
    """Every text file of the project (not its hidden folders, caches or outputs)."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                   and (not d.startswith(".") or d == ".ci")]
        for name in files:
            path = pathlib.Path(folder) / name
            if path.suffix in TEXT_SUFFIXES or name in TEXT_NAMES:
                yield path


FILES = sorted(_repository_files())


def test_the_scan_sees_the_sources():
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    assert {"README.md", "docs/equations.md", "substrate/_kernels.py", "studies/configs/pulsed.toml"} <= names


def test_no_file_refers_outside_the_repository():
    bad = []
    for path in FILES:
        if path == pathlib.Path(__file__).resolve():  # its patterns name what they look for
            continue
        text = path.read_text(errors="replace")
        for m in OUTSIDE.finditer(text):
            bad.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}")
        for m in RELATIVE.finditer(text):
            target = (path.parent / m.group(1)).resolve()
            if ROOT != target and ROOT not in target.parents:
                bad.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(1)!r}")
    assert not bad, "references outside the repository:\n" + "\n".join(bad)


def _sections():
    """The section numbers of docs/equations.md ("## 4. ..." gives 4, "### 6.3 ..." gives 6.3)."""
    return {m.group(1) for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", EQUATIONS.read_text(), re.M)}


def test_every_cited_section_of_the_equations_page_exists():
    sections = _sections()
    assert {"1", "2", "3", "4", "5", "6", "7"} <= sections
    cited, missing = set(), []
    for path in FILES:
        text = path.read_text(errors="replace")
        for m in CITATION.finditer(text):
            for number in re.findall(r"\d+(?:\.\d+)?", m.group(1)):
                cited.add(number)
                if number not in sections:
                    missing.append(f"{path.relative_to(ROOT)}: section {number}")
    assert cited, "no file cites docs/equations.md"
    assert not missing, "cited sections that docs/equations.md does not have:\n" + "\n".join(missing)


def build_api():
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api)
    return api


@pytest.mark.slow  # ~50 s on an idle 2-core machine, ~160 s under load: make test-all and CI (.ci/run: make docs)
def test_the_api_reference_has_a_page_for_every_public_module(tmp_path):
    """What `make docs` does, in a temporary folder: the build fails on any warning (BuildWarning)."""
    api = build_api()
    modules = api.public_modules()
    assert {"substrate", "substrate.integrators", "substrate.devices.effects", "models.ep"} <= set(modules)
    assert not [m for m in modules if any(part.startswith("_") for part in m.split("."))]
    api.build(tmp_path)
    pages = {p.relative_to(tmp_path).with_suffix("").as_posix().replace("/", ".") for p in tmp_path.rglob("*.html")}
    assert pages - {"index"} == set(modules)
    assert "Relax the circuit to its equilibrium" in (tmp_path / "substrate" / "integrators.html").read_text()


def test_every_public_name_has_a_docstring():
    assert build_api().undocumented() == []


def test_the_docstring_check_finds_a_missing_docstring(monkeypatch):
    """The check itself: a public function without a docstring in a public module is reported by name."""
    import studies.runs

    def no_docstring():
        pass

    no_docstring.__module__, no_docstring.__qualname__ = "studies.runs", "no_docstring"
    monkeypatch.setattr(studies.runs, "no_docstring", no_docstring, raising=False)
    assert build_api().undocumented(["studies.runs"]) == ["studies.runs.no_docstring"]


# ------------------------------------------------------------------------ section 1: Euler with dt = tau
def laborieux_zenke_step(net, x, u, beta, y):
    """One step of Laborieux & Zenke's discrete dynamics, written as their code does it: every layer's
    new state is the sum of its weighted inputs (activities of the layers, or the input) plus its bias,
    and the nudged output adds beta dl/dr (squared error); u <- that sum, with no leak term."""
    new = np.zeros_like(u)
    for layer in net.layers:
        new[:, net.slices[layer.name]] += layer.bias
    for c in net.connections:
        src = x if c.pre in net.inputs_by_name else rho(net.layer(c.pre).activation, u[:, net.slices[c.pre]])
        new[:, net.slices[c.post]] += src @ net.effective_weight(c).T
    out = net.slices["y"]
    new[:, out] += beta * (rho(net.layer("y").activation, u[:, out]) - y)
    return new


def _setting(tau=1.0):
    rng = np.random.default_rng(3)
    net = S.Network.layered([6, 10, 8, 4], rng, feedback="tied", tau=tau)
    return net, rng.normal(size=(5, 6)), np.eye(4)[rng.integers(0, 4, 5)]


def _map(net, x, u, beta, y, steps):
    path = [u]
    for _ in range(steps):
        path.append(laborieux_zenke_step(net, x, path[-1], beta, y))
    return np.array(path)


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("beta", [0.2, -0.2, 0.2 * np.exp(2j * np.pi / 3)])
def test_euler_with_dt_tau_is_laborieux_zenke_discrete_dynamics(tau, beta):
    """The free phase (T1 steps from zero) and a nudged phase from its end (T2 steps; a complex beta
    as holomorphic EP uses), by integrate(method="euler", dt=tau), against their map step for step:
    equal to rounding (the engine forms u + (N(u) - u), the map N(u) directly)."""
    net, x, y = _setting(tau)
    T1, T2 = 30, 20
    free = _map(net, x, np.zeros((len(x), net.n)), 0.0, y, T1)
    got = S.integrate(net, x, t_span=(0.0, T1 * tau), t_eval=tau * np.arange(T1 + 1), method="euler", dt=tau)
    np.testing.assert_allclose(got.u, free, rtol=0, atol=1e-13)
    dtype = np.complex128 if np.iscomplexobj(beta) else np.float64
    nudged = _map(net, x, free[-1].astype(dtype), beta, y, T2)
    got = S.integrate(net, x, t_span=(0.0, T2 * tau), t_eval=tau * np.arange(T2 + 1), method="euler", dt=tau,
                      u0=free[-1].astype(dtype), nudge=Nudge(Cost("y"), beta, y), dtype=dtype)
    np.testing.assert_allclose(got.u, nudged, rtol=0, atol=1e-13)
    assert np.max(np.abs(nudged[-1] - free[-1])) > 1e-2  # the nudge moved the state (the test can fail)


def test_a_large_nudge_sets_the_map_oscillating_where_the_flow_settles():
    """The map and the flow share their fixed points, not their stability. A small self-inhibiting
    nudge (beta < 0 with a squared error) leaves both at the same nudged equilibrium; a large one
    makes the map's Jacobian W diag(rho') + beta diag(rho') (on the output rows) reach below -1: the
    map settles into a 2-cycle, while the ODE relaxes to the nudged fixed point, which the map only
    passes through."""
    net, x, y = _setting()
    free = _map(net, x, np.zeros((len(x), net.n)), 0.0, y, 60)[-1]
    for beta, oscillates in ((-0.1, False), (-2.0, True)):
        nudge = Nudge(Cost("y"), beta, y)
        flow = S.relax(net, x, method="exp_euler", dt=0.05, tol=1e-11, u0=free, nudge=nudge, max_steps=100_000)
        assert flow.ok and np.all(flow.eigenvalue.real < 0)
        fixed = flow.u
        assert np.max(np.abs(laborieux_zenke_step(net, x, fixed, beta, y) - fixed)) < 1e-9  # also the map's
        path = _map(net, x, free, beta, y, 400)
        euler = S.integrate(net, x, t_span=(0.0, 400.0), t_eval=np.arange(397.0, 401.0), method="euler", dt=1.0,
                            u0=free, nudge=nudge)
        np.testing.assert_allclose(euler.u, path[-4:], rtol=0, atol=1e-9)
        if oscillates:
            assert np.max(np.abs(path[-1] - path[-3])) < 1e-9  # period 2 ...
            assert np.max(np.abs(path[-1] - path[-2])) > 0.1  # ... not a fixed point
            assert np.max(np.abs(path[-1] - fixed)) > 0.1 and np.max(np.abs(path[-2] - fixed)) > 0.1
        else:
            assert np.max(np.abs(path[-1] - fixed)) < 1e-8
