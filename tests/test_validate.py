"""substrate.validate: the argument checks every module shares. Each refusal names the argument, repeats
the value and says what is allowed; bools are no numbers; NumPy scalars are accepted; NaN and
infinities are refused where the range excludes them."""

import math
import re

import numpy as np
import pytest

from substrate import validate as V
from substrate.errors import SubstrateValueError as Bad

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("call, message", [
    (lambda: V.count(0, "steps"), "steps=0 must be a positive integer"),
    (lambda: V.count(-1, "probe", minimum=0), "probe=-1 must be a non-negative integer"),
    (lambda: V.count(1, "levels", minimum=2), "levels=1 must be an integer >= 2"),
    (lambda: V.count(0, "batch", relation=True), "batch=0 must be an integer >= 1"),
    (lambda: V.count(53, "bits", minimum=0, maximum=52), r"bits=53 must be an integer in [0, 52]"),
    (lambda: V.count(9, "points", maximum=8, why="enough for float64"),
     "points=9 must be at most 8: enough for float64"),
    (lambda: V.count(2 ** 31, "steps", maximum=2 ** 31 - 1, allowed="an integer in [{minimum}, 2**31)"),
     "steps=2147483648 must be an integer in [1, 2**31)"),
    (lambda: V.positive(0.0, "dt"), "dt=0.0 must be a positive finite number"),
    (lambda: V.positive(0, "t", allow_inf=True), "t=0 must be a positive number"),
    (lambda: V.positive(-1, "g", relation=True), "g=-1 must be a finite number > 0"),
    (lambda: V.nonnegative(-0.5, "rtol"), "rtol=-0.5 must be a finite number >= 0"),
    (lambda: V.fraction(1.0, "momentum", upper_open=True), "momentum=1.0 must be in [0, 1)"),
    (lambda: V.fraction(1.5, "p"), "p=1.5 must be in [0, 1]"),
    (lambda: V.number("x", "offset"), "offset='x' must be a number"),
    (lambda: V.flag(1, "relative"), "relative=1 must be True or False"),
    (lambda: V.choice("c", "policy", ("a", "b")), "policy='c'; allowed: 'a', 'b'"),
])
def test_a_refusal_names_the_argument_the_value_and_the_range(call, message):
    with pytest.raises(Bad) as e:
        call()
    assert str(e.value) == message


@pytest.mark.parametrize("check", [V.count, V.positive, V.nonnegative, V.fraction, V.number])
@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_bools_are_refused_as_numbers(check, value):
    with pytest.raises(Bad, match=f"^x={re.escape(repr(value))} must be"):
        check(value, "x")


@pytest.mark.parametrize("value", [np.int8(3), np.int64(3), np.uint16(3), 3])
def test_numpy_integers_are_counts(value):
    n = V.count(value, "n")
    assert n == 3 and type(n) is int


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.int32(1), np.array(0.5), 0.5])
def test_numpy_scalars_are_numbers(value):
    for check in (V.positive, V.nonnegative, V.fraction, V.number):
        v = check(value, "x")
        assert v == float(value) and type(v) is float


@pytest.mark.parametrize("value", [2.0, np.float64(3.0), "3", None, [1], np.ones(1), 1j])
def test_only_integers_are_counts(value):
    with pytest.raises(Bad, match="must be a positive integer"):
        V.count(value, "n")


@pytest.mark.parametrize("value", ["0.5", b"0.5", None, [0.5], np.ones(1), np.ones((2, 2)), 0.5 + 0j,
                                   np.complex128(0.5), {}, object(), 10 ** 400])
def test_what_is_no_real_number_is_refused_not_converted(value):
    for check in (V.positive, V.nonnegative, V.fraction, V.number):
        with pytest.raises(Bad, match=r"(?s)^x=.* must be"):
            check(value, "x")


def test_nan_and_infinities():
    for check in (V.positive, V.nonnegative, V.fraction):
        with pytest.raises(Bad, match="x=nan must be"):
            check(NAN, "x")
    with pytest.raises(Bad, match="^x=inf must be a positive finite number$"):
        V.positive(INF, "x")
    assert V.positive(INF, "x", allow_inf=True) == INF
    assert V.nonnegative(INF, "x", allow_inf=True) == INF
    with pytest.raises(Bad, match="^x=inf must be a finite number >= 0$"):
        V.nonnegative(INF, "x")
    assert V.number(-INF, "x") == -INF
    with pytest.raises(Bad, match="^x=-inf must be a finite number$"):
        V.number(-INF, "x", finite=True)
    with pytest.raises(Bad, match="^x=nan must be a number, not NaN$"):
        V.number(NAN, "x")
    assert V.as_real(NAN) is not None and math.isnan(V.as_real(NAN))


def test_staged_checks_refuse_a_non_number_before_the_range():
    # the engine's "dt='big' must be a positive number", the devices' "must be a number, not NaN"
    with pytest.raises(Bad, match="^dt='big' must be a positive number$"):
        V.positive("big", "dt", staged=True)
    with pytest.raises(Bad, match="^dt=nan must be a positive number, not NaN$"):
        V.positive(NAN, "dt", staged=True)
    with pytest.raises(Bad, match="^nu=nan must be a number, not NaN$"):
        V.nonnegative(NAN, "nu", staged=True)
    with pytest.raises(Bad, match="^nu=-1 must be a finite number >= 0$"):
        V.nonnegative(-1, "nu", staged=True)
    # unstaged, one message whatever was wrong
    with pytest.raises(Bad, match="^dt='big' must be a positive finite number$"):
        V.positive("big", "dt")


def test_none_passes_only_where_allowed():
    assert V.positive(None, "dt", allow_none=True) is None
    with pytest.raises(Bad, match="dt=None must be a positive finite number"):
        V.positive(None, "dt")


def test_finite_array():
    a = V.finite_array([[1, 2]], "x", 2)
    assert a.dtype == np.float64 and a.shape == (1, 2)
    assert V.finite_array(np.zeros((2, 0)), "x", 2).shape == (2, 0)  # only the last dimension may be empty
    for value, message in [("s", "x must be a real array, got str"), (np.ones(2, complex), "x must be a real array"),
                           (np.ones(3), r"x has shape \(3,\); expected 2 dimensions, none empty"),
                           (np.ones((0, 2)), r"x has shape \(0, 2\); expected 2 dimensions"),
                           (np.ones((2, 3)), r"x has shape \(2, 3\); expected \(2, 2\)"),
                           (np.array([[1.0, NAN]]), "x contains NaN or Inf"),
                           (np.array([[1.0, -INF]]), "x contains NaN or Inf")]:
        with pytest.raises(Bad, match=message):
            V.finite_array(value, "x", 2, (2, 2) if message.endswith(r"\(2, 2\)") else None)
