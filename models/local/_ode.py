"""Explicit Runge-Kutta steps with the engine's own tableaux (``substrate.integrators.METHODS``) for the
ODEs of the local rules whose vector field is not a circuit's tau du/dt = -u + W rho(u) + V x + b:
NoProp-CT's inference flow (each stage reads the circuit's output) and predictive coding's relaxation
(value neurons gated by rho'). Fixed steps; the adaptive and exponential methods need the circuit's
form and are refused."""

from __future__ import annotations

import numpy as np

from substrate.errors import SubstrateValueError
from substrate.integrators import METHODS, ExplicitRK

# the fixed-step explicit methods of the engine
FIXED_METHODS = tuple(name for name, m in METHODS.items() if isinstance(m, ExplicitRK) and not m.adaptive)


def tableau(method: str, what: str) -> tuple:
    """(a, b, c) of the engine's explicit method ``method`` (c_i = sum_j a_ij)."""
    if method not in FIXED_METHODS:
        raise SubstrateValueError(f"{what}: method={method!r}; allowed: {', '.join(FIXED_METHODS)} (fixed-step "
                                  "explicit methods: this field is not a circuit's, so the exponential and "
                                  "adaptive steppers do not apply)")
    m = METHODS[method]
    a = np.array(m.a, float).reshape(len(m.b), len(m.b))
    return a, np.array(m.b, float), a.sum(axis=1)


def rk_step(field, t: float, z: np.ndarray, h: float, tab: tuple, k0=None) -> np.ndarray:
    """One step of size h of dz/dt = field(t, z) with the tableau ``tab`` = (a, b, c); ``k0``: field(t,
    z) if already evaluated (its first stage; an explicit method evaluates len(b) - 1 more)."""
    a, b, c = tab
    k = [] if k0 is None else [k0]
    for i in range(len(k), len(b)):
        zi = z + h * sum(a[i, j] * k[j] for j in range(i) if a[i, j] != 0) if i else z
        k.append(field(t + c[i] * h, zi))
    return z + h * sum(bi * ki for bi, ki in zip(b, k) if bi != 0)
