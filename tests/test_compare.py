"""The comparison study (studies.catalogue.compare): every rule of its axis is built from the config,
each seed starts every rule from the same weights, the Pareto front of its figure, its tables of winners
and of every rule (markdown, `substrate table`) and its two figures."""

import dataclasses
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest
from click.testing import CliRunner
from test_figures import problems

from models.adjoint_rules import ADJOINT_RULES
from models.train import EPRule
from studies.archives import open_dataset
from studies.catalogue import TASKS
from studies.catalogue import compare as C
from studies.catalogue.ep import train_classifier
from studies.cli import main
from studies.config import load_study
from substrate import SubstrateValueError


@pytest.fixture(scope="module")
def study():
    return load_study("studies/configs/compare.toml", tasks=TASKS)


def test_the_axes_are_the_issue_s(study):
    assert list(study.axes["rule"]) == list(C.RULES)
    assert set(C.RULES) == {"one_sided", "centred", "holomorphic", "rotating_holomorphic"} | set(ADJOINT_RULES)
    assert list(study.axes["device"]) == ["ideal", "pcm_inference", "reram_sb", "read_noise_phase", "tau_mismatch",
                                          "finite_settling"]
    assert study.seeds == [0, 1, 2]


def test_every_rule_is_built_with_its_options(study):
    for r in study.runs()[:len(C.RULES) * 6:6]:
        rule = C.rule_of(r.config)
        assert rule.name == r.config["rule"]
        inner = rule.estimator if isinstance(rule, EPRule) else rule
        for k, v in r.config["options"].items():
            assert getattr(inner, k, v) == v  # every option the rule takes is the config's
    assert C.rule_of({"rule": "truncated_adjoint", "options": {"window": 7, "beta": 0.1}}).window == 7


def test_every_rule_of_a_seed_starts_from_the_same_weights(study):
    configs = [r.config for r in study.runs() if r.seed == 1 and r.config["setting"] == "ideal"][:3]
    starts = []
    for c in configs:
        model, _, _ = train_classifier(dict(c, epochs=0, n_train=10, n_test=10, probe=0), 1, rule=C.rule_of(c))
        starts.append({k: p.copy() for k, p in model.parameters().items()})
    assert len({c["rule"] for c in configs}) == 3
    for s in starts[1:]:
        assert all(np.array_equal(s[k], starts[0][k]) for k in s)


@pytest.mark.parametrize("energy, accuracy, front", [
    ([1.0, 2.0, 3.0], [50.0, 60.0, 55.0], [0, 1]),          # the third: dearer and worse than the second
    ([3.0, 2.0, 1.0], [90.0, 80.0, 70.0], [2, 1, 0]),       # every point a trade-off, listed by energy
    ([1.0, 1.0, np.nan], [60.0, 70.0, 99.0], [1]),  # the same energy: the more accurate; no counts: no front
])
def test_pareto_front(energy, accuracy, front):
    assert C._front(np.array(energy), np.array(accuracy)) == front


COMPARE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studies", "configs",
                       "compare.toml")


def _row(device, rule, accuracy, energy):
    return {"device": device, "rule": rule, "accuracy": accuracy, "cosine": 0.5, "energy_per_sample": energy,
            "latency_per_sample": 1e-6, "memory_bytes": 1e3}


def test_winners_by_hand():
    """a the most accurate; b within 1 point of it and cheaper: the cheapest within 1 pt; c cheaper still
    and less accurate: on the front; d dearer and worse than a: nothing; e failed (NaN): nothing; f no
    counts (NaN energy): the most accurate of its device, and nothing else (no rule of B is within 1 point
    with counts)."""
    rows = [_row("A", "a", 90.0, 10e-9), _row("A", "b", 89.5, 5e-9), _row("A", "c", 80.0, 1e-9),
            _row("A", "d", 85.0, 20e-9), _row("A", "e", np.nan, 1e-9), _row("B", "f", 50.0, np.nan),
            _row("B", "g", 40.0, 1e-9)]
    got = [(r["device"], r["rule"], r["wins"]) for r in C.winners(rows)]
    assert got == [("A", "c", "Pareto front"), ("A", "b", "cheapest within 1 pt, Pareto front"),
                   ("A", "a", "most accurate, Pareto front"), ("B", "g", "Pareto front"),
                   ("B", "f", "most accurate")]
    # a threshold of 0.4 points leaves b out: a is then the cheapest as accurate
    assert [r["wins"] for r in C.winners(rows, within=0.4) if r["rule"] == "a"] == [
        "most accurate, cheapest within 0.4 pt, Pareto front"]
    with pytest.raises(SubstrateValueError, match="within"):
        C.winners(rows, within=-1.0)


@pytest.fixture(scope="module")
def debug_archive(config_archives):
    """The debug sweep of compare.toml (conftest.py's, shared with test_studies.py and test_figures.py)."""
    return config_archives[COMPARE][1]


def test_tables_of_the_debug_archive(debug_archive, monkeypatch):
    """The rows are the medians over seeds of each run's final values (read here from the run files); the
    markdown tables list the winners and every rule and device, in the tables' units; `substrate table`
    prints both, and refuses an archive of a task without tables."""
    rows = C.table(debug_archive)
    ds = open_dataset(debug_archive)
    for r in rows:
        one = ds.sel(rule=r["rule"], device=r["device"])
        assert r["accuracy"] == pytest.approx(float(np.median(100 * one["test_accuracy"].isel(epoch=-1))), rel=1e-12)
        assert r["energy_per_sample"] == pytest.approx(float(np.median(one["energy_per_sample"])), rel=1e-12)
    assert {(r["device"], r["rule"]) for r in rows} == {(d, k) for d in ("ideal", "pcm_inference")
                                                         for k in ("centred", "discrete_adjoint")}
    short, full = C.markdown(debug_archive)
    best = C.winners(rows)
    assert len(full.splitlines()) == 2 + len(rows) and len(short.splitlines()) == 4 + len(best)
    first = next(r for r in rows if r["device"] == "ideal" and r["rule"] == "centred")
    assert (f"| ideal | centred | {first['accuracy']:.1f} | {first['cosine']:.3f} | "
            f"{first['energy_per_sample'] * 1e9:.3g} | {first['latency_per_sample'] * 1e6:.3g} | "
            f"{first['memory_bytes'] / 1e3:.3g} |") in full
    assert all("most accurate" in short.split(f"| {dev} |", 1)[1] for dev in ("ideal", "pcm_inference"))
    out = CliRunner().invoke(main, ["table", debug_archive])
    assert out.exit_code == 0 and short in out.output and full in out.output
    monkeypatch.setitem(TASKS, "compare", dataclasses.replace(TASKS["compare"], table=None))
    bad = CliRunner().invoke(main, ["table", debug_archive])
    assert bad.exit_code != 0 and "has no table for task 'compare'" in bad.output


def test_both_figures_are_readable(debug_archive):
    """The energy figure (`substrate plot`) and the latency and memory one: titled, every axis labelled with
    two or more tick labels in view, no legend over a title (test_figures.problems)."""
    for plot in (C.plot_compare, C.plot_compare_costs):
        fig = plot(debug_archive)
        try:
            assert fig._suptitle.get_text() and problems(fig) == []
            assert all("(" in ax.get_xlabel() and "(%)" in ax.get_ylabel() for ax in fig.axes)  # units
        finally:
            plt.close(fig)
