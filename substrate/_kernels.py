"""Compiled kernels of the engine: every ``@njit(cache=True)`` function lives here, module-level.

Layout. A batch of states is stored neurons-major, ``u[i, b]`` with shape (n, B) in C order, so that
a layer is a contiguous block of rows: ``u[a:a+m]``. Connections between state layers live in one
flat weight buffer ``wbuf``; row ``c`` of the int64 table ``conn`` is
``(offset in wbuf, pre start, pre size, post start, post size)`` and the block is the C-ordered
(post size, pre size) matrix ``wbuf[offset : offset + post*pre]``. Layers are row ranges
``layer_off[l] : layer_off[l+1]`` with activation code ``layer_act[l]``.

The circuit (REFERENCES section 1) is ``tau du/dt = F(u) = -u + N(u)`` with the non-leak part
``N(u) = W rho(u) + drive``; ``drive = V x + b`` is computed once per sample by the caller, never per
step. Steppers are written in terms of N so that exponential integrators treat the leak exactly.

No ``fastmath``: the divergence checks rely on NaN comparisons.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Activation codes, kept in step with activations.CODES.
LOGISTIC, HARD_SIGMOID, TANH, DSILU, IDENTITY = 0, 1, 2, 3, 4

# Status codes returned by ``run``.
SUCCESS, NOT_CONVERGED, DIVERGED, STEP_TOO_SMALL, MAX_STEPS = 0, 1, 2, 3, 4

# Stepper families and exponential methods.
EXPLICIT_RK, EXPONENTIAL = 0, 1
ETD1, ETD2RK, ETDRK4 = 1, 2, 3


# --------------------------------------------------------------------------------------------
# Activations (scalar, real or complex; the branch on ``code`` is loop-invariant in callers)
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def _logistic(x):
    return 1.0 / (1.0 + np.exp(-x))


@njit(cache=True)
def rho(code, z):
    if code == LOGISTIC:
        return 1.0 / (1.0 + np.exp(2.0 - 4.0 * z))
    elif code == HARD_SIGMOID:
        # written through .real so that it types for complex too (complex states reject it earlier)
        if z.real <= 0.0:
            return 0.0 * z
        elif z.real >= 1.0:
            return 0.0 * z + 1.0
        return z
    elif code == TANH:
        return np.tanh(z)
    elif code == DSILU:
        return 0.5 * z * _logistic(z) + (1.0 - 0.5 * z) * _logistic(z - 2.0)
    return z


@njit(cache=True)
def rho_prime(code, z):
    if code == LOGISTIC:
        s = 1.0 / (1.0 + np.exp(2.0 - 4.0 * z))
        return 4.0 * s * (1.0 - s)
    elif code == HARD_SIGMOID:
        if z.real > 0.0 and z.real < 1.0:
            return 0.0 * z + 1.0
        return 0.0 * z
    elif code == TANH:
        t = np.tanh(z)
        return 1.0 - t * t
    elif code == DSILU:
        s0 = _logistic(z)
        s2 = _logistic(z - 2.0)
        return 0.5 * s0 + 0.5 * z * s0 * (1.0 - s0) - 0.5 * s2 + (1.0 - 0.5 * z) * s2 * (1.0 - s2)
    return 0.0 * z + 1.0


@njit(cache=True)
def activate(u, layer_off, layer_act, out):
    """out = rho(u), layer by layer."""
    for l in range(layer_act.shape[0]):
        code = layer_act[l]
        for i in range(layer_off[l], layer_off[l + 1]):
            for b in range(u.shape[1]):
                out[i, b] = rho(code, u[i, b])


@njit(cache=True)
def activate_prime(u, layer_off, layer_act, out):
    """out = rho'(u), layer by layer."""
    for l in range(layer_act.shape[0]):
        code = layer_act[l]
        for i in range(layer_off[l], layer_off[l + 1]):
            for b in range(u.shape[1]):
                out[i, b] = rho_prime(code, u[i, b])


# --------------------------------------------------------------------------------------------
# Weight products: the only O(n^2) work of a step
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def weights_times(r, wbuf, conn, tmp, out):
    """out += W r  (all connections between state layers)."""
    for c in range(conn.shape[0]):
        wo, pa, pn, qa, qn = conn[c, 0], conn[c, 1], conn[c, 2], conn[c, 3], conn[c, 4]
        t = tmp[:qn]
        np.dot(wbuf[wo:wo + qn * pn].reshape((qn, pn)), r[pa:pa + pn], t)
        out[qa:qa + qn] += t


@njit(cache=True)
def weights_transpose_times(w, wbuf, conn, tmp, out):
    """out += W^T w."""
    for c in range(conn.shape[0]):
        wo, pa, pn, qa, qn = conn[c, 0], conn[c, 1], conn[c, 2], conn[c, 3], conn[c, 4]
        t = tmp[:pn]
        np.dot(wbuf[wo:wo + qn * pn].reshape((qn, pn)).T, w[qa:qa + qn], t)
        out[pa:pa + pn] += t


@njit(cache=True)
def nonleak(r, drive, wbuf, conn, tmp, out):
    """out = N = W r + drive, the non-leak part of F for activities r = rho(u)."""
    out[:, :] = drive
    weights_times(r, wbuf, conn, tmp, out)


# --------------------------------------------------------------------------------------------
# The vector field and its derivatives (what every gradient method is built from)
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def field(u, drive, wbuf, conn, layer_off, layer_act, tmp, r, out):
    """out = F(u) = -u + W rho(u) + drive  (r receives rho(u))."""
    activate(u, layer_off, layer_act, r)
    nonleak(r, drive, wbuf, conn, tmp, out)
    out -= u


@njit(cache=True)
def jvp(u, v, wbuf, conn, layer_off, layer_act, tmp, d, out):
    """out = J v = -v + W (rho'(u) * v),  J = dF/du (without the 1/tau of the ODE)."""
    activate_prime(u, layer_off, layer_act, d)
    d *= v
    out[:, :] = -v
    weights_times(d, wbuf, conn, tmp, out)


@njit(cache=True)
def vjp(u, w, wbuf, conn, layer_off, layer_act, tmp, d, out):
    """out = J^T w = -w + rho'(u) * (W^T w)."""
    out[:, :] = 0.0
    weights_transpose_times(w, wbuf, conn, tmp, out)
    activate_prime(u, layer_off, layer_act, d)
    out *= d
    out -= w


@njit(cache=True)
def weight_vjp(w, r, conn, out):
    """(dF/dW_c)^T w = w_post r_pre^T summed over the batch, written into the flat buffer ``out``."""
    for c in range(conn.shape[0]):
        wo, pa, pn, qa, qn = conn[c, 0], conn[c, 1], conn[c, 2], conn[c, 3], conn[c, 4]
        np.dot(w[qa:qa + qn], r[pa:pa + pn].T, out[wo:wo + qn * pn].reshape((qn, pn)))


# --------------------------------------------------------------------------------------------
# phi functions of exponential integrators (REFERENCES section 2)
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def phi(k, z):
    """phi_k(z) = sum_m z^m/(m+k)!  (phi_0 = e^z); Taylor series for |z| < 1, else the recurrence
    phi_{k+1} = (phi_k - 1/k!)/z started from phi_1 = expm1(z)/z, which has no cancellation there."""
    if k == 0:
        return math.exp(z)
    if abs(z) < 1.0:
        term = 1.0
        for m in range(1, k + 1):
            term /= m
        total = term
        for m in range(1, 30):
            term *= z / (m + k)
            total += term
        return total
    p = math.expm1(z) / z
    fact = 1.0
    for j in range(1, k):
        fact *= j
        p = (p - 1.0 / fact) / z
    return p


@njit(cache=True)
def exponential_coefficients(method, h, tauinv, ecz, ha, hb):
    """Coefficients of an exponential Runge-Kutta step of size h for every neuron (z = -h/tau):

        Y_i = ecz[i] * u + sum_j ha[i, j] * N_j,     u_next = ecz[s] * u + sum_j hb[j] * N_j

    (ha and hb include the factor h/tau.)  ETD1 and ETD2RK as in REFERENCES section 2; ETDRK4 is
    Cox & Matthews (2002) eq. (26)-(29) written with phi_1..phi_3."""
    n = tauinv.shape[0]
    for i in range(n):
        g = h * tauinv[i]
        z = -g
        p1 = phi(1, z)
        if method == ETD1:
            ecz[0, i] = 1.0
            ecz[1, i] = math.exp(z)
            hb[0, i] = g * p1
        elif method == ETD2RK:
            p2 = phi(2, z)
            ecz[0, i] = 1.0
            ecz[1, i] = math.exp(z)
            ecz[2, i] = ecz[1, i]
            ha[1, 0, i] = g * p1
            hb[0, i] = g * (p1 - p2)
            hb[1, i] = g * p2
        else:
            p2 = phi(2, z)
            p3 = phi(3, z)
            eh = math.exp(0.5 * z)
            q = 0.5 * g * phi(1, 0.5 * z)  # (h/2)/tau * phi_1(z/2)
            ecz[0, i] = 1.0
            ecz[1, i] = eh
            ecz[2, i] = eh
            ecz[3, i] = math.exp(z)
            ecz[4, i] = ecz[3, i]
            ha[1, 0, i] = q
            ha[2, 1, i] = q
            ha[3, 0, i] = q * (eh - 1.0)
            ha[3, 2, i] = 2.0 * q
            hb[0, i] = g * (p1 - 3.0 * p2 + 4.0 * p3)
            hb[1, i] = g * (2.0 * p2 - 4.0 * p3)
            hb[2, i] = hb[1, i]
            hb[3, i] = g * (4.0 * p3 - p2)


# --------------------------------------------------------------------------------------------
# Stage combinations, fused with the activation of the new point
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def stage_rk(i, h, a, u, k, layer_off, layer_act, y, r):
    """Explicit RK stage: y = u + h sum_j a[i, j] k_j,  r = rho(y)."""
    for l in range(layer_act.shape[0]):
        code = layer_act[l]
        for p in range(layer_off[l], layer_off[l + 1]):
            for b in range(u.shape[1]):
                y[p, b] = u[p, b]
            for j in range(i):
                c = h * a[i, j]
                if c != 0.0:
                    for b in range(u.shape[1]):
                        y[p, b] += c * k[j, p, b]
            for b in range(u.shape[1]):
                r[p, b] = rho(code, y[p, b])


@njit(cache=True)
def stage_exponential(i, ecz, ha, u, nl, layer_off, layer_act, y, r):
    """Exponential RK stage: y = ecz[i] u + sum_j ha[i, j] N_j,  r = rho(y)."""
    for l in range(layer_act.shape[0]):
        code = layer_act[l]
        for p in range(layer_off[l], layer_off[l + 1]):
            e = ecz[i, p]
            for b in range(u.shape[1]):
                y[p, b] = e * u[p, b]
            for j in range(i):
                c = ha[i, j, p]
                if c != 0.0:
                    for b in range(u.shape[1]):
                        y[p, b] += c * nl[j, p, b]
            for b in range(u.shape[1]):
                r[p, b] = rho(code, y[p, b])


@njit(cache=True)
def rates(nl, y, tauinv, k):
    """k = du/dt = (N - y) / tau."""
    for p in range(y.shape[0]):
        ti = tauinv[p]
        for b in range(y.shape[1]):
            k[p, b] = (nl[p, b] - y[p, b]) * ti


@njit(cache=True)
def residual_norms(f, scale, u, rtol, atol, res):
    """Per sample: res[b] = max_i |f[i, b] * scale[i]|; returns True when every sample satisfies
    res[b] <= atol + rtol * max_i |u[i, b]| (the steady-state stop of REFERENCES section 2)."""
    done = True
    for b in range(u.shape[1]):
        m = 0.0
        um = 0.0
        for p in range(u.shape[0]):
            v = abs(f[p, b] * scale[p])
            if not (v <= m):  # also catches NaN
                m = v
            w = abs(u[p, b])
            if w > um:
                um = w
        res[b] = m
        if not (m <= atol + rtol * um):
            done = False
    return done


@njit(cache=True)
def residual_exponential(nl0, u, rtol, atol, res):
    """Per-sample residual max_i |N_i - u_i| = |F| and the same stopping test as residual_norms."""
    done = True
    for b in range(u.shape[1]):
        m = 0.0
        um = 0.0
        for p in range(u.shape[0]):
            v = abs(nl0[p, b] - u[p, b])
            if not (v <= m):
                m = v
            w = abs(u[p, b])
            if w > um:
                um = w
        res[b] = m
        if not (m <= atol + rtol * um):
            done = False
    return done


@njit(cache=True)
def finish_rk(h, bw, ew, u, k, s, rtol, atol, blowup, layer_off, layer_act, unew, rnew):
    """unew = u + h sum_j bw[j] k_j, rnew = rho(unew).  Returns (finite, err) where err is the RMS of
    h sum_j ew[j] k_j / (atol + rtol max(|u|, |unew|)) (0 without an embedded pair)."""
    finite = True
    acc = 0.0
    with_err = ew.shape[0] > 0
    for l in range(layer_act.shape[0]):
        code = layer_act[l]
        for p in range(layer_off[l], layer_off[l + 1]):
            for b in range(u.shape[1]):
                unew[p, b] = u[p, b]
            for j in range(s):
                c = h * bw[j]
                if c != 0.0:
                    for b in range(u.shape[1]):
                        unew[p, b] += c * k[j, p, b]
            if with_err:
                for b in range(u.shape[1]):
                    e = 0.0 * u[p, b]
                    for j in range(s):
                        e += ew[j] * k[j, p, b]
                    sc = atol + rtol * max(abs(u[p, b]), abs(unew[p, b]))
                    q = abs(h * e) / sc
                    acc += q * q
            for b in range(u.shape[1]):
                v = unew[p, b]
                if not (abs(v) <= blowup):
                    finite = False
                rnew[p, b] = rho(code, v)
    if with_err:
        return finite, math.sqrt(acc / (u.shape[0] * u.shape[1]))
    return finite, 0.0


@njit(cache=True)
def finish_exponential(s, ecz, hb, u, nl, blowup, layer_off, layer_act, unew, rnew):
    """unew = ecz[s] u + sum_j hb[j] N_j, rnew = rho(unew); returns whether unew is finite and bounded."""
    finite = True
    for l in range(layer_act.shape[0]):
        code = layer_act[l]
        for p in range(layer_off[l], layer_off[l + 1]):
            e = ecz[s, p]
            for b in range(u.shape[1]):
                unew[p, b] = e * u[p, b]
            for j in range(s):
                c = hb[j, p]
                for b in range(u.shape[1]):
                    unew[p, b] += c * nl[j, p, b]
            for b in range(u.shape[1]):
                v = unew[p, b]
                if not (abs(v) <= blowup):
                    finite = False
                rnew[p, b] = rho(code, v)
    return finite


# --------------------------------------------------------------------------------------------
# The one stepping kernel shared by every integrator
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def run(family, method, a, bw, ew, fsal, adaptive,
        u, drive, wbuf, conn, layer_off, layer_act, tauinv, tau,
        t0, t_end, dt, rtol, atol, h_min, max_steps, blowup,
        t_save, saved, relax, res_rtol, res_atol, residual, res_trace, t_trace, u_out):
    """Integrate tau du/dt = -u + N(u) from (t0, u) with the stepper described by
    (family, method, a, bw, ew, fsal, adaptive).

    * explicit RK (family 0): tableau ``a`` (s x s), weights ``bw``, error weights ``ew`` = b - b_hat
      (empty for fixed-step methods); ``fsal``: the last stage is the next step's first; adaptive
      steps use Hairer's PI controller (DOPRI5: beta = 0.04, safety 0.9, factor in [0.2, 10]).
    * exponential RK (family 1): ``method`` selects the coefficients of exponential_coefficients.

    Steps land exactly on the save times ``t_save`` (states written to ``saved``). With ``relax``
    the loop stops as soon as every sample satisfies the residual test at the current state (checked
    from the first stage of each step, so it costs no extra field evaluation) or when t_end or
    max_steps is reached; ``res_trace[step]`` records the largest residual over the batch and
    ``t_trace[step]`` the time.

    Returns (status, t, steps, nfev, rejected); the final state is copied into ``u_out``.
    """
    n, nb = u.shape
    s = bw.shape[0]
    ns = t_save.shape[0]
    dtype = u.dtype
    y = np.empty_like(u)
    r = np.empty_like(u)
    unew = np.empty_like(u)
    rnew = np.empty_like(u)
    stages = np.empty((s + 1, n, nb), dtype)  # k_j (explicit RK) or N_j (exponential)
    maxrows = 1
    for c in range(conn.shape[0]):
        maxrows = max(maxrows, conn[c, 2], conn[c, 4])
    tmp = np.empty((maxrows, nb), dtype)
    rdt = tauinv.dtype
    ecz = np.zeros((s + 1, n), rdt)
    ha = np.zeros((s, s, n), rdt)
    hb = np.zeros((s, n), rdt)
    h_coef = -1.0

    t = t0
    step = 0
    nfev = 0
    rejected = 0
    k = 0
    while k < ns and t_save[k] <= t0:
        saved[k] = u
        k += 1
    activate(u, layer_off, layer_act, r)
    first_ready = False
    facold = 1e-4
    h = dt
    status = SUCCESS
    while True:
        if not relax:
            if k >= ns or t >= t_end:
                break
            if step >= max_steps:
                status = MAX_STEPS
                break
        # First stage at the current state; it also gives the residual F(u).
        if not first_ready:
            if family == EXPLICIT_RK:
                nonleak(r, drive, wbuf, conn, tmp, y)
                rates(y, u, tauinv, stages[0])
            else:
                nonleak(r, drive, wbuf, conn, tmp, stages[0])
            nfev += 1
            first_ready = True
        if relax:
            if family == EXPLICIT_RK:
                done = residual_norms(stages[0], tau, u, res_rtol, res_atol, residual)
            else:
                done = residual_exponential(stages[0], u, res_rtol, res_atol, residual)
            worst = 0.0
            for b in range(nb):
                if not (residual[b] <= worst):
                    worst = residual[b]
            if step < res_trace.shape[0]:
                res_trace[step] = worst
                t_trace[step] = t
            if not (worst == worst and worst <= blowup):
                status = DIVERGED
                break
            if done:
                break
            if t >= t_end or step >= max_steps:
                status = NOT_CONVERGED
                break

        # Step size: land exactly on the next save time (a step within 1e-7 h of it is stretched).
        target = t_end
        if k < ns and t_save[k] < target:
            target = t_save[k]
        hh = h
        if target - (t + hh) <= 1e-7 * hh:
            hh = target - t
        if adaptive and hh < h_min:
            status = STEP_TOO_SMALL
            break

        if family == EXPLICIT_RK:
            for i in range(1, s):
                stage_rk(i, hh, a, u, stages, layer_off, layer_act, y, r)
                nonleak(r, drive, wbuf, conn, tmp, unew)
                rates(unew, y, tauinv, stages[i])
                nfev += 1
            finite, err = finish_rk(hh, bw, ew, u, stages, s, rtol, atol, blowup,
                                    layer_off, layer_act, unew, rnew)
        else:
            if abs(hh - h_coef) > 4e-16 * hh:
                exponential_coefficients(method, hh, tauinv, ecz, ha, hb)
                h_coef = hh
            for i in range(1, s):
                stage_exponential(i, ecz, ha, u, stages, layer_off, layer_act, y, r)
                nonleak(r, drive, wbuf, conn, tmp, stages[i])
                nfev += 1
            finite = finish_exponential(s, ecz, hb, u, stages, blowup, layer_off, layer_act,
                                        unew, rnew)
            err = 0.0

        if adaptive:
            if not (err == err):
                err = 1e10  # a NaN in the error: reject and shrink
            fac11 = err ** 0.17
            if err > 1.0:
                rejected += 1
                h = hh / min(5.0, fac11 / 0.9)
                # r was overwritten by the stages: restore rho(u) for the retried step
                activate(u, layer_off, layer_act, r)
                continue
            fac = max(0.1, min(5.0, fac11 / facold ** 0.04 / 0.9))
            facold = max(err, 1e-4)
            h_next = hh / fac
        if not finite:
            status = DIVERGED
            break

        clipped = hh < h
        t = target if hh != h else t + hh
        u, unew = unew, u
        r, rnew = rnew, r
        step += 1
        if fsal:
            stages[0, :, :] = stages[s - 1]
        else:
            first_ready = False
        if adaptive:
            # a step shortened to hit a save time does not shrink the controller's proposal
            h = max(h, h_next) if clipped else h_next
        if k < ns and t >= t_save[k]:
            saved[k] = u
            k += 1
    u_out[:, :] = u
    return status, t, step, nfev, rejected
