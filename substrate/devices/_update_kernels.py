"""Compiled kernel of the pulsed weight updates (:mod:`substrate.devices.update`).

One kernel, :func:`apply_pulses`, loops over the devices (flat, C order) and gives each device its
pulses. A device's pulse count is ``n = min(round(|delta| / dw_min), max_pulses)`` (round half up),
its direction the sign of ``delta``; devices with ``n = 0`` are left alone and draw nothing.

Random numbers: ``rng`` is a ``np.random.Generator`` (numba draws the same bits as NumPy from it and
advances its state). A pulsed device draws one standard normal per pulse, NeuroSim one per update,
and nothing at all when the cycle-to-cycle noise ``par[STD]`` is 0.

Models (``code``):

* ``CONSTANT`` (aihwkit ConstantStep): w <- clip(w + d dw_d (1 + std xi), w_min, w_max);
* ``LINEAR`` (aihwkit LinearStep, SoftBounds): the step is ``dw_d + s_d w`` with a per-device slope
  ``s_d`` (the caller folds gamma and the reference bound into it); multiplicative noise
  ``(dw_d + s_d w)(1 + std xi)`` if ``par[MULT]`` else additive ``dw_d + s_d w + dw_d std xi``;
  clipped after every pulse;
* ``EXP`` (aihwkit ExpStep): z = 2 a w / (w_max - w_min) + b, y = max(1 - A_d exp(d gamma_d z), 0),
  w <- clip(w + d y dw_d (1 + std xi));
* ``NEUROSIM`` (NeuroSim RealDevice): on the normalised conductance u = (w - w_min)/(w_max - w_min),
  the pulse position P of u on the curve of the direction, u <- u(P + d n) + std sqrt(n) xi, clipped
  to [0, 1]; u(P) = expm1(-P/A)/expm1(-P_max/A) (linear u = P/P_max where 1/A = 0).

``par`` holds the model's constants at the indices below. No closures, no fastmath (module
convention of :mod:`substrate._kernels`).
"""

from __future__ import annotations

import math
from functools import partial

from numba import njit as _njit

njit = partial(_njit, cache=True, error_model="numpy")

# Model codes.
CONSTANT, LINEAR, EXP, NEUROSIM = 0, 1, 2, 3

# Indices into ``par``: common, then model-specific (ExpStep: a, b, A_up, A_down, gamma_up, gamma_down;
# NeuroSim: 1/A_up, 1/A_down, P_max, in pulses).
DW_MIN, MAX_PULSES, STD, MULT = 0, 1, 2, 3
ES_A, ES_B, ES_A_UP, ES_A_DOWN, ES_GAMMA_UP, ES_GAMMA_DOWN = 4, 5, 6, 7, 8, 9
NS_INV_A_UP, NS_INV_A_DOWN, NS_P_MAX = 4, 5, 6
N_PAR = 10


@njit
def curve_position(u, inv_a, p_max):
    """The pulse position P of the normalised conductance u on the curve u(P) (inverse of curve_value)."""
    if inv_a == 0.0:
        return u * p_max
    return -math.log1p(u * math.expm1(-p_max * inv_a)) / inv_a


@njit
def curve_value(p, inv_a, p_max):
    """NeuroSim's u(P) = (1 - exp(-P/A)) / (1 - exp(-P_max/A)), in expm1 form (u(P) = P/P_max if 1/A = 0)."""
    if inv_a == 0.0:
        return p / p_max
    return math.expm1(-p * inv_a) / math.expm1(-p_max * inv_a)


@njit
def apply_pulses(w, delta, dw_up, dw_down, w_min, w_max, slope_up, slope_down, code, par, rng):
    """Apply ``delta`` (flat, like ``w``) as pulses to the devices ``w`` (flat float64, in place).

    ``dw_up, dw_down, w_min, w_max``: per-device step sizes and bounds; ``slope_up, slope_down``:
    per-device slopes (read only by ``LINEAR``, may be empty otherwise); ``code``: the model;
    ``par``: its constants (indices above); ``rng``: a ``np.random.Generator``.
    """
    dw_min = par[DW_MIN]
    max_pulses = par[MAX_PULSES]
    std = par[STD]
    mult = par[MULT] != 0.0
    for i in range(w.size):
        d = delta[i]
        n = math.floor(abs(d) / dw_min + 0.5)
        if n > max_pulses:
            n = max_pulses
        if not n >= 1.0:  # also skips NaN
            continue
        up = d > 0.0
        lo = w_min[i]
        hi = w_max[i]
        x = w[i]
        if code == NEUROSIM:
            span = hi - lo
            inv_a = par[NS_INV_A_UP] if up else par[NS_INV_A_DOWN]
            p_max = par[NS_P_MAX]
            p = curve_position((x - lo) / span, inv_a, p_max)
            u = curve_value(p + n if up else p - n, inv_a, p_max)
            if std > 0.0:
                u += std * math.sqrt(n) * rng.standard_normal()
            u = min(max(u, 0.0), 1.0)
            w[i] = lo + span * u
            continue
        dw = dw_up[i] if up else dw_down[i]
        s = 0.0
        if code == LINEAR:
            s = slope_up[i] if up else slope_down[i]
        for _ in range(int(n)):
            xi = rng.standard_normal() if std > 0.0 else 0.0
            if code == EXP:
                z = 2.0 * par[ES_A] * x / (hi - lo) + par[ES_B]
                if up:
                    y = 1.0 - par[ES_A_UP] * math.exp(par[ES_GAMMA_UP] * z)
                else:
                    y = 1.0 - par[ES_A_DOWN] * math.exp(-par[ES_GAMMA_DOWN] * z)
                step = max(y, 0.0) * dw * (1.0 + std * xi)
            elif mult:
                step = (dw + s * x) * (1.0 + std * xi)
            else:
                step = dw + s * x + dw * std * xi
            x = x + step if up else x - step
            x = min(max(x, lo), hi)
        w[i] = x
