"""The comparison study (studies.catalogue.compare): every rule of its axis is built from the config,
each seed starts every rule from the same weights, the Pareto front of its figure, and its costs are the
cost model's of the training's counts."""

import numpy as np
import pytest

from models.adjoint_rules import ADJOINT_RULES
from models.train import EPRule
from studies.catalogue import TASKS
from studies.catalogue import compare as C
from studies.catalogue.ep import train_classifier
from studies.config import load_study


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
