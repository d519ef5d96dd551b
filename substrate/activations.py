"""Activation functions rho of the analog neurons (docs/equations.md, section 1).

Each activation has a stable integer code used by the compiled kernels (``_kernels.activate``) and a
NumPy reference implementation used by tests and by Python-level code that does not run per step.

=================  ==========================================================  ============
name               rho(z)                                                      holomorphic
=================  ==========================================================  ============
``logistic``       s(4z - 2), s(x) = 1/(1 + e^-x)  (Laborieux & Zenke MLP)      yes
``hard_sigmoid``   clip(z, 0, 1)  (Scellier & Bengio)                           no
``tanh``           tanh(z)                                                      yes
``dsilu``          0.5 z s(z) + (1 - 0.5 z) s(z - 2)  (smooth hard sigmoid)     yes
``identity``       z                                                            yes
=================  ==========================================================  ============

"Holomorphic" means analytic in a neighbourhood of the real axis, which is what holomorphic EP needs
for complex states; ``hard_sigmoid`` is not, so complex states reject it.
"""

from __future__ import annotations

import numpy as np

from .errors import SubstrateValueError

CODES = {"logistic": 0, "hard_sigmoid": 1, "tanh": 2, "dsilu": 3, "identity": 4}
HOLOMORPHIC = frozenset({"logistic", "tanh", "dsilu", "identity"})
NAMES = tuple(CODES)


def check_name(name, argument: str = "activation") -> str:
    """``name`` if it is a known activation, else a SubstrateValueError naming ``argument`` and the allowed names."""
    if not isinstance(name, str) or name not in CODES:
        raise SubstrateValueError(
            f"{argument}={name!r} is not a known activation; allowed: {', '.join(NAMES)}"
        )
    return name


def _s(x):
    # exp(-x) overflows to inf for x < -709 (f64) and 1/(1+inf) = 0 is the right limit: no warning for it
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def rho(name: str, z):
    """Reference rho(z) in NumPy (real or complex z)."""
    z = np.asarray(z)
    if name == "logistic":
        return _s(4.0 * z - 2.0)
    if name == "hard_sigmoid":
        return np.clip(z, 0.0, 1.0)
    if name == "tanh":
        return np.tanh(z)
    if name == "dsilu":
        return 0.5 * z * _s(z) + (1.0 - 0.5 * z) * _s(z - 2.0)
    if name == "identity":
        return z.copy()
    check_name(name)


def rho_prime(name: str, z):
    """Reference rho'(z) in NumPy; the hard sigmoid's derivative is 1 on (0, 1), else 0."""
    z = np.asarray(z)
    if name == "logistic":
        s = _s(4.0 * z - 2.0)
        return 4.0 * s * (1.0 - s)
    if name == "hard_sigmoid":
        return ((z > 0.0) & (z < 1.0)).astype(z.dtype)
    if name == "tanh":
        return 1.0 - np.tanh(z) ** 2
    if name == "dsilu":
        s0, s2 = _s(z), _s(z - 2.0)
        return 0.5 * s0 + 0.5 * z * s0 * (1.0 - s0) - 0.5 * s2 + (1.0 - 0.5 * z) * s2 * (1.0 - s2)
    if name == "identity":
        return np.ones_like(z)
    check_name(name)
