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

No ``fastmath``: the divergence checks rely on NaN comparisons. ``error_model="numpy"``: a division
by zero gives inf/NaN (caught by those checks) instead of a Python exception, whose per-element
branch would stop LLVM from vectorising the loops (measured: 8x slower activation).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
from numba import njit as _njit
from numba import types
from numba.extending import intrinsic, overload

njit = partial(_njit, cache=True, error_model="numpy")

# Activation codes, kept in step with activations.CODES.
LOGISTIC, HARD_SIGMOID, TANH, DSILU, IDENTITY = 0, 1, 2, 3, 4

# Status codes returned by ``run``.
SUCCESS, NOT_CONVERGED, DIVERGED, STEP_TOO_SMALL, MAX_STEPS = 0, 1, 2, 3, 4

# Stepper families and exponential methods.
EXPLICIT_RK, EXPONENTIAL = 0, 1
ETD1, ETD2RK, ETDRK4 = 1, 2, 3


# --------------------------------------------------------------------------------------------
# A vectorisable exp for real arguments (llvmlite here has no SVML, so math.exp is a scalar libm call)
# --------------------------------------------------------------------------------------------
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split in two (Cody & Waite) so that k ln2 is exact
_LN2_LO = 1.90821492927058770002e-10


@intrinsic
def _bits_to_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(types.int64), codegen


@njit
def _exp_real(x):
    """e^x = 2^k e^r with k = round(x / ln2), |r| <= ln2/2, e^r by its Taylor polynomial to degree 12
    (truncation < 2e-17 relative); 2^k built from its exponent bits. Max error 1.5 ulp against libm
    on [-708, 708] (tests/test_kernels.py); the argument is clamped there, and NaN/Inf propagate."""
    y = min(max(x, -708.0), 708.0)
    k = math.floor(y * _LOG2E + 0.5)
    r = y - k * _LN2_HI - k * _LN2_LO
    p = 1.0 + r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (
        1 / 720 + r * (1 / 5040 + r * (1 / 40320 + r * (1 / 362880 + r * (1 / 3628800 + r * (
            1 / 39916800 + r * (1 / 479001600))))))))))))
    return p * _bits_to_float((np.int64(k) + 1023) << 52) + 0.0 * x


def fast_exp(x):
    """exp for the kernels: the polynomial above for real x, np.exp for complex x."""
    return np.exp(x)


@overload(fast_exp, jit_options={"error_model": "numpy"})
def _fast_exp(x):
    if isinstance(x, types.Complex):
        return lambda x: np.exp(x)
    return lambda x: _exp_real(x)


# --------------------------------------------------------------------------------------------
# Activations. Each has a scalar form (real or complex); the row functions branch on the activation
# code once per row and run one tight loop per activation, so that every loop vectorises.
# --------------------------------------------------------------------------------------------
@njit
def _logistic(x):
    return 1.0 / (1.0 + fast_exp(-x))


@njit
def _hard_sigmoid(z):
    # written through .real so that it types for complex too (complex states reject it earlier)
    return min(max(z.real, 0.0), 1.0) + 0.0 * z


@njit
def _hard_sigmoid_prime(z):
    return 1.0 + 0.0 * z if z.real > 0.0 and z.real < 1.0 else 0.0 * z


@njit
def _dsilu(z):
    return 0.5 * z * _logistic(z) + (1.0 - 0.5 * z) * _logistic(z - 2.0)


@njit
def _dsilu_prime(z):
    s0 = _logistic(z)
    s2 = _logistic(z - 2.0)
    return 0.5 * s0 + 0.5 * z * s0 * (1.0 - s0) - 0.5 * s2 + (1.0 - 0.5 * z) * s2 * (1.0 - s2)


@njit
def rho_row(code, y, r):
    """r = rho(y) for one row of neurons sharing an activation."""
    m = y.shape[0]
    if code == LOGISTIC:
        for b in range(m):
            r[b] = _logistic(4.0 * y[b] - 2.0)
    elif code == HARD_SIGMOID:
        for b in range(m):
            r[b] = _hard_sigmoid(y[b])
    elif code == TANH:
        for b in range(m):
            r[b] = np.tanh(y[b])
    elif code == DSILU:
        for b in range(m):
            r[b] = _dsilu(y[b])
    else:
        for b in range(m):
            r[b] = y[b]


@njit
def rho_prime_row(code, y, d):
    """d = rho'(y) for one row of neurons sharing an activation."""
    m = y.shape[0]
    if code == LOGISTIC:
        for b in range(m):
            s = _logistic(4.0 * y[b] - 2.0)
            d[b] = 4.0 * s * (1.0 - s)
    elif code == HARD_SIGMOID:
        for b in range(m):
            d[b] = _hard_sigmoid_prime(y[b])
    elif code == TANH:
        for b in range(m):
            t = np.tanh(y[b])
            d[b] = 1.0 - t * t
    elif code == DSILU:
        for b in range(m):
            d[b] = _dsilu_prime(y[b])
    else:
        for b in range(m):
            d[b] = 1.0 + 0.0 * y[b]


@njit
def activate(u, layer_off, layer_act, out):
    """out = rho(u), layer by layer."""
    for l in range(layer_act.shape[0]):
        for i in range(layer_off[l], layer_off[l + 1]):
            rho_row(layer_act[l], u[i], out[i])


@njit
def activate_prime(u, layer_off, layer_act, out):
    """out = rho'(u), layer by layer."""
    for l in range(layer_act.shape[0]):
        for i in range(layer_off[l], layer_off[l + 1]):
            rho_prime_row(layer_act[l], u[i], out[i])


# --------------------------------------------------------------------------------------------
# Weight products: the only O(n^2) work of a step
# --------------------------------------------------------------------------------------------
@njit
def _add_rows(t, out, start):
    """out[start:start + len(t)] += t, as plain loops (numba's slice += is slower here)."""
    for i in range(t.shape[0]):
        for b in range(t.shape[1]):
            out[start + i, b] += t[i, b]


@njit
def weights_times(r, wbuf, conn, tmp, out):
    """out += W r  (all connections between state layers)."""
    for c in range(conn.shape[0]):
        wo, pa, pn, qa, qn = conn[c, 0], conn[c, 1], conn[c, 2], conn[c, 3], conn[c, 4]
        t = tmp[:qn]
        np.dot(wbuf[wo:wo + qn * pn].reshape((qn, pn)), r[pa:pa + pn], t)
        _add_rows(t, out, qa)


@njit
def weights_transpose_times(w, wbuf, conn, tmp, out):
    """out += W^T w."""
    for c in range(conn.shape[0]):
        wo, pa, pn, qa, qn = conn[c, 0], conn[c, 1], conn[c, 2], conn[c, 3], conn[c, 4]
        t = tmp[:pn]
        np.dot(wbuf[wo:wo + qn * pn].reshape((qn, pn)).T, w[qa:qa + qn], t)
        _add_rows(t, out, pa)


@njit
def nonleak(r, drive, wbuf, conn, tmp, out):
    """out = N = W r + drive, the non-leak part of F for activities r = rho(u)."""
    out[:, :] = drive
    weights_times(r, wbuf, conn, tmp, out)


# --------------------------------------------------------------------------------------------
# The vector field and its derivatives (what every gradient method is built from)
# --------------------------------------------------------------------------------------------
@njit
def field(u, drive, wbuf, conn, layer_off, layer_act, tmp, r, out):
    """out = F(u) = -u + W rho(u) + drive  (r receives rho(u))."""
    activate(u, layer_off, layer_act, r)
    nonleak(r, drive, wbuf, conn, tmp, out)
    out -= u


@njit
def jvp(u, v, wbuf, conn, layer_off, layer_act, tmp, d, out):
    """out = J v = -v + W (rho'(u) * v),  J = dF/du (without the 1/tau of the ODE)."""
    activate_prime(u, layer_off, layer_act, d)
    d *= v
    out[:, :] = -v
    weights_times(d, wbuf, conn, tmp, out)


@njit
def vjp(u, w, wbuf, conn, layer_off, layer_act, tmp, d, out):
    """out = J^T w = -w + rho'(u) * (W^T w)."""
    out[:, :] = 0.0
    weights_transpose_times(w, wbuf, conn, tmp, out)
    activate_prime(u, layer_off, layer_act, d)
    out *= d
    out -= w


@njit
def weight_vjp(w, r, conn, out):
    """(dF/dW_c)^T w = w_post r_pre^T summed over the batch, written into the flat buffer ``out``."""
    for c in range(conn.shape[0]):
        wo, pa, pn, qa, qn = conn[c, 0], conn[c, 1], conn[c, 2], conn[c, 3], conn[c, 4]
        np.dot(w[qa:qa + qn], r[pa:pa + pn].T, out[wo:wo + qn * pn].reshape((qn, pn)))


# --------------------------------------------------------------------------------------------
# phi functions of exponential integrators (REFERENCES section 2)
# --------------------------------------------------------------------------------------------
@njit
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


@njit
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
@njit
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
            rho_row(code, y[p], r[p])


@njit
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
            rho_row(code, y[p], r[p])


@njit
def rates(nl, y, tauinv, k):
    """k = du/dt = (N - y) / tau."""
    for p in range(y.shape[0]):
        ti = tauinv[p]
        for b in range(y.shape[1]):
            k[p, b] = (nl[p, b] - y[p, b]) * ti


@njit
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


@njit
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


@njit
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
                if not (abs(unew[p, b]) <= blowup):
                    finite = False
            rho_row(code, unew[p], rnew[p])
    if with_err:
        return finite, math.sqrt(acc / (u.shape[0] * u.shape[1]))
    return finite, 0.0


@njit
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
                if not (abs(unew[p, b]) <= blowup):
                    finite = False
            rho_row(code, unew[p], rnew[p])
    return finite


# --------------------------------------------------------------------------------------------
# The one stepping kernel shared by every integrator
# --------------------------------------------------------------------------------------------
@njit
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
