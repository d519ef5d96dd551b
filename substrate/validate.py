"""Argument checks shared by substrate and models.

Each check returns the value in its plain Python type (float, int, bool, str, float array) or raises
:class:`~substrate.errors.SubstrateValueError` with the message ``{name}={value!r} must be {allowed}``:
the argument, the value given and what is allowed. Bools, strings, complex numbers and arrays are
refused where a real number is expected, not converted (``True`` is no step size, ``"1e-3"`` a typo);
NumPy integer and float scalars are accepted.

Two wordings are kept, because callers document theirs (and tests match them):

* ``staged=True`` (the engine and the devices): what is not a number is refused first
  ("must be a number", "must be a number, not NaN"), then a number out of range;
  otherwise one message covers all three.
* ``relation=True`` (the devices): the range as a relation ("a finite number > 0", "an integer >= 1");
  otherwise in words ("a positive finite number", "a positive integer").
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import SubstrateValueError


def _refuse(name, value, allowed):
    raise SubstrateValueError(f"{name}={value!r} must be {allowed}")


def as_real(value) -> float | None:
    """``value`` as a float if it is one real number (a Python or NumPy int or float, a 0-d real
    array; NaN and infinities included), else None."""
    if type(value) is float:  # the common case first: relax() checks several numbers at every call
        return value
    if isinstance(value, (int, np.floating, np.integer)):
        if isinstance(value, bool):
            return None
    elif isinstance(value, np.ndarray):
        if value.ndim != 0 or value.dtype.kind not in "iuf":
            return None
    elif not isinstance(value, numbers.Real):  # a NumPy bool is no Real
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return None


def _no_number(name, value, v, kind):
    """Refuses ``value`` (``v``: as_real's reading of it) as not being ``kind`` if it is no number or NaN."""
    if v is None or math.isnan(v):
        _refuse(name, value, kind if v is None else f"{kind}, not NaN")


def number(value, name, *, finite=False) -> float:
    """A real number, not NaN, and not infinite if ``finite``."""
    v = as_real(value)
    if v is None or math.isnan(v) or (finite and math.isinf(v)):
        _no_number(name, value, v, "a number")
        _refuse(name, value, "a finite number")
    return v


def positive(value, name, *, allow_none=False, allow_inf=False, staged=False, relation=False) -> float | None:
    """A number > 0, finite unless ``allow_inf``; None passes through if ``allow_none``."""
    if value is None and allow_none:
        return None
    v = as_real(value)
    if v is None or not v > 0 or (not allow_inf and math.isinf(v)):  # NaN fails v > 0
        if staged:
            _no_number(name, value, v, "a positive number")
        inf = "" if allow_inf else "finite "
        _refuse(name, value, f"a {inf}number > 0" if relation else f"a positive {inf}number")
    return v


def nonnegative(value, name, *, allow_inf=False, staged=False) -> float:
    """A number >= 0, finite unless ``allow_inf``."""
    v = as_real(value)
    if v is None or not v >= 0 or (not allow_inf and math.isinf(v)):
        if staged:
            _no_number(name, value, v, "a number")
        _refuse(name, value, f"a {'' if allow_inf else 'finite '}number >= 0")
    return v


def fraction(value, name, *, upper_open=False, staged=False) -> float:
    """A number in [0, 1], or in [0, 1) if ``upper_open``."""
    v = as_real(value)
    if v is None or not (0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0):
        if staged:
            _no_number(name, value, v, "a number")
        _refuse(name, value, f"in [0, 1{')' if upper_open else ']'}")
    return v


def count(value, name, *, minimum=1, maximum=None, why=None, relation=False, allowed=None) -> int:
    """An integer (a Python or NumPy int, not a bool) >= ``minimum`` and <= ``maximum`` if given.

    Above ``maximum`` with a reason ``why``, the message is "must be at most {maximum}: {why}".
    ``allowed`` replaces the description of the range in the other refusals (it may name
    ``{minimum}`` and ``{maximum}``), for callers whose documented bound is written as an expression.
    """
    integral = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if integral and value >= minimum and (maximum is None or value <= maximum):
        return int(value)
    if integral and value >= minimum and why is not None:
        _refuse(name, value, f"at most {maximum}: {why}")
    if allowed is not None:
        allowed = allowed.format(minimum=minimum, maximum=maximum)
    elif maximum is not None and why is None:
        allowed = f"an integer in [{minimum}, {maximum}]"
    elif relation or minimum not in (0, 1):
        allowed = f"an integer >= {minimum}"
    else:
        allowed = "a positive integer" if minimum == 1 else "a non-negative integer"
    _refuse(name, value, allowed)


def flag(value, name) -> bool:
    """True or False (a NumPy bool too); anything merely truthy is refused."""
    if not isinstance(value, (bool, np.bool_)):
        _refuse(name, value, "True or False")
    return bool(value)


def choice(value, name, allowed) -> str:
    """One of the strings ``allowed``."""
    if not isinstance(value, str) or value not in allowed:  # an array or a list would not compare
        raise SubstrateValueError(f"{name}={value!r}; allowed: {', '.join(map(repr, allowed))}")
    return value


def real_array(value, name, allowed="a real array") -> np.ndarray:
    """``value`` as a float64 array; a complex one is refused (asarray would drop its imaginary part
    with a mere warning), as is what does not convert: "{name} must be {allowed}, got {type}"."""
    try:
        if np.iscomplexobj(value):
            raise TypeError
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise SubstrateValueError(f"{name} must be {allowed}, got {type(value).__name__}") from None


def finite_array(value, name, ndim, shape=None) -> np.ndarray:
    """``value`` as a float64 array of ``ndim`` dimensions (and exactly ``shape`` if given; otherwise
    no dimension but the last may be empty), every element finite."""
    a = real_array(value, name)
    if a.ndim != ndim or 0 in a.shape[:-1] or (shape is not None and a.shape != tuple(shape)):
        want = shape if shape is not None else f"{ndim} dimensions, none empty"
        raise SubstrateValueError(f"{name} has shape {a.shape}; expected {want}")
    if not np.all(np.isfinite(a)):
        raise SubstrateValueError(f"{name} contains NaN or Inf")
    return a
