"""Compiled kernels of the engine: every ``@njit(cache=True)`` function lives here, module-level.

Layout. A batch of states is stored neurons-major, ``u[i, b]`` with shape (n, B) in C order, so that
a layer is a contiguous block of rows: ``u[a:a+m]``. Connections between state layers live in one
flat weight buffer ``wbuf``; row ``c`` of the int64 table ``conn`` is
``(offset in wbuf, pre start, pre size, post start, post size)`` and the block is the C-ordered
(post size, pre size) matrix ``wbuf[offset : offset + post*pre]``. Layers are row ranges
``layer_off[l] : layer_off[l+1]``; ``layer_act`` is the pair (codes, costly) of ``layer_activations``:
the activation code ``codes[l]`` of each layer, and whether the kernels compile the complex tanh and dsilu.

The circuit (docs/equations.md, section 1) is ``tau du/dt = F(u) = -u + N(u)`` with the non-leak part
``N(u) = W rho(u) + drive``; ``drive = V x + b`` is computed once per sample by the caller, never per
step. Steppers are written in terms of N so that exponential integrators treat the leak exactly.

No ``fastmath``: the divergence checks rely on NaN comparisons. ``error_model="numpy"``: a division
by zero gives inf/NaN (caught by those checks) instead of a Python exception, whose per-element
branch would stop LLVM from vectorising the loops (measured: 8x slower activation).
"""

from __future__ import annotations

import math
from collections import namedtuple
from functools import partial

import numpy as np
from numba import njit as _njit
from numba import types
from numba.extending import intrinsic, overload

njit = partial(_njit, cache=True, error_model="numpy")

# Activation codes, kept in step with activations.CODES.
LOGISTIC, HARD_SIGMOID, TANH, DSILU, IDENTITY = 0, 1, 2, 3, 4


def layer_activations(codes, dtype):
    """``layer_act`` as the kernels take it for states of ``dtype``: (codes, costly), ``codes`` the int64
    activation code of each layer, ``costly`` None when the states are complex and no layer is tanh or
    dsilu, else True.

    The complex tanh and dsilu rows (inlined complex exps, two an element for dsilu, in every kernel
    that takes rho or rho') are most of a complex kernel's compile time. ``costly`` is an argument of
    each kernel with such rows (``rho_row``): when it is None, Numba prunes their branch before typing,
    so a complex network of logistic or identity layers never compiles them. Two specialisations at
    most per complex dtype, never one per set of activations (each would compile its own ``run``);
    real states always True (their rows compile fast: one specialisation per real dtype serves every
    network). A plain tuple: the dispatcher types it in C."""
    codes = np.array(codes, np.int64)
    cheap = np.dtype(dtype).kind == "c" and not np.isin(codes, (TANH, DSILU)).any()
    return codes, None if cheap else True


# Teaching-current (nudge) codes, kept in step with nudge.COSTS.
NO_NUDGE, SQUARED_ERROR, CROSS_ENTROPY = 0, 1, 2

# Status codes returned by ``run``.
SUCCESS, NOT_CONVERGED, DIVERGED, STEP_TOO_SMALL, MAX_STEPS = 0, 1, 2, 3, 4

# Stepper families and exponential methods.
EXPLICIT_RK, EXPONENTIAL = 0, 1
ETD1, ETD2RK, ETDRK4 = 1, 2, 3
# NOT_LITERAL: constant arguments of kernel calls, typed int64 and bool. A Python int or bool written
# in a call (f(1), f(True)) or a variable starting as one (top = 0) is typed Literal[int](1) or
# Literal[bool](True), and Numba compiles the callee again for it, beside the specialisation for the
# same argument computed at run time: a whole stage_pass, coefficients, _state_at more per dtype.
ZERO, ONE, TWO, THREE = np.int64(0), np.int64(1), np.int64(2), np.int64(3)
YES, NO = np.bool_(True), np.bool_(False)

# Hairer's PI step-size controller (DOPRI5's constants): h_new = h / fac with
# fac = err^PI_EXPONENT / err_old^PI_BETA / PI_SAFETY, kept in [1/MAX_GROWTH, MAX_SHRINK]; a
# rejected step shrinks by min(MAX_SHRINK, err^PI_EXPONENT / PI_SAFETY).
PI_EXPONENT = 0.17  # 1/5 - 0.75 PI_BETA, for the order-4 error estimate
PI_BETA = 0.04
PI_SAFETY = 0.9
MAX_SHRINK = 5.0
MAX_GROWTH_INV = 0.1  # 1/MAX_GROWTH: a step grows at most tenfold
ERR_FLOOR = 1e-4  # the previous error's floor (and its value before the first step)
NAN_ERROR = 1e10  # the error taken for a NaN estimate: reject and shrink
LANDING = 1e-7  # a step within LANDING h of a save time is stretched onto it


# --------------------------------------------------------------------------------------------
# The kernels' arguments as named structures (namedtuples: Numba types them field by field, so a
# specialisation depends on the fields' types only, and they cache like plain tuples)
# --------------------------------------------------------------------------------------------
# The circuit in the layout above: drive (n, B), wbuf, conn, layer_off, layer_act, 1/tau and tau (n,).
Circuit = namedtuple("Circuit", "drive wbuf conn layer_off layer_act tauinv tau")
# A stepper (see ``run``): family, exponential method, tableau a (s, s), weights bw (s,), error
# weights ew = b - b_hat (empty: fixed steps), first-same-as-last, adaptive.
Stepper = namedtuple("Stepper", "family method a bw ew fsal adaptive")
# Where and how far to step: times, first step, error tolerances, the smallest adaptive step, the step
# budget and the blow-up bound.
Span = namedtuple("Span", "t0 t_end dt rtol atol h_min max_steps blowup")
# Relaxation (``on``): stop when every sample's residual max_i |F_i| <= atol + rtol max_i |u_i|;
# ``residual`` (B,) receives the last residuals, res_trace/t_trace the largest one per step and its time.
Relaxation = namedtuple("Relaxation", "on rtol atol residual res_trace t_trace")
# What is kept: states at the save times t_save (into saved), the final state (u_out), and for gradients
# the step sizes (h_record), the step count at each save (save_step), the states every ckpt_every
# steps (ckpt; ckpt_every 0: none).
Record = namedtuple("Record", "t_save saved u_out h_record save_step ckpt_every ckpt")
# The stepping kernel's buffers, held by the caller across calls (``integrators._solve`` keeps them):
# states (10 + s, n, B): the state and activity with their next values, two stage points with
# activities, W rho(Y), the product scratch tmp, then the s stage slopes (one array: each array
# argument costs the dispatcher and Numba's unboxing ~0.1 us a call); the step coefficients alpha
# (s + 1, n) and coef (s + 1, s, n) in the real dtype, and umax (B,). Every one is written before read.
Work = namedtuple("Work", "states alpha coef umax")
# A teaching current (see ``teach``): cost code, the nudged rows lo:hi, beta (1,), target (m, B),
# readout W_o (C, m) and b_o (C,) in the real dtype of the state's (real times complex: half the work),
# scratch (C + 1, B); the other arrays in the state's dtype.
Nudge = namedtuple("Nudge", "code lo hi beta target wo bo scratch")
# A recorded forward pass for the adjoints: its step sizes hs, number of steps, checkpoints every
# ckpt_every steps, and dL/du of the saved states (dl_du[k] after save_step[k] steps).
Tape = namedtuple("Tape", "hs nsteps ckpt ckpt_every save_step dl_du")
# The adjoints' results: packed weights (like wbuf), drive (n, B), tau (n,), and dL/du0 (n, B).
Grads = namedtuple("Grads", "gflat gdrive gtau lam0")


# --------------------------------------------------------------------------------------------
# A vectorisable exp for real states (llvmlite here has no SVML, so math.exp is a scalar libm call)
# --------------------------------------------------------------------------------------------
def _bitcast(src, dst):
    """An intrinsic reinterpreting the bits of a ``src`` scalar as ``dst`` (made once at import)."""

    @intrinsic
    def cast(typingctx, x):
        if x != src:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(dst))

        return dst(src), codegen

    return cast


_f64_bits, _bits_f64 = _bitcast(types.float64, types.int64), _bitcast(types.int64, types.float64)
_f32_bits, _bits_f32 = _bitcast(types.float32, types.int32), _bitcast(types.int32, types.float32)

# e^x = 2^k e^r, k = round(x / ln2) read off the low mantissa bits of x/ln2 + 1.5 2^52 ("shifter"),
# r = x - k ln2 with ln2 split in two (Cody & Waite) so that k ln2_hi is exact, |r| <= ln2/2,
# e^r by its Taylor polynomial (degree 12 in float64: truncation < 2e-17; degree 7 in float32).
_LOG2E = 1.4426950408889634
_SHIFT64 = 1.5 * 2.0 ** 52
_SHIFT64_BITS = int(np.float64(_SHIFT64).view(np.int64))
_LN2_HI64, _LN2_LO64 = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_LOG2E32, _SHIFT32 = np.float32(_LOG2E), np.float32(1.5 * 2.0 ** 23)
_SHIFT32_BITS = np.int32(np.float32(_SHIFT32).view(np.int32))
_LN2_HI32, _LN2_LO32 = np.float32(0.693359375), np.float32(-2.12194440e-4)
_HI32, _LO32, _ZERO32 = np.float32(88.0), np.float32(-87.0), np.float32(0.0)
_C32 = tuple(np.float32(1.0 / math.factorial(k)) for k in range(8))


@njit(fastmath={"contract"})  # fused multiply-adds only: NaN/Inf semantics are kept
def _exp_f64(x):
    """Within 3 ulp of libm over [-708, 709] (tests/test_kernels.py); NaN and +-Inf give NaN, which
    the divergence checks catch (an infinite state is a diverged one)."""
    y = 709.0 if x > 709.0 else (-708.0 if x < -708.0 else x)
    t = y * _LOG2E + _SHIFT64
    k = t - _SHIFT64
    r = (y - k * _LN2_HI64) - k * _LN2_LO64
    p = 1.0 + r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (
        1 / 720 + r * (1 / 5040 + r * (1 / 40320 + r * (1 / 362880 + r * (1 / 3628800 + r * (
            1 / 39916800 + r * (1 / 479001600))))))))))))
    return p * _bits_f64((_f64_bits(t) - _SHIFT64_BITS + 1023) << 52) + 0.0 * x


@njit(fastmath={"contract"})
def _reduce_f32(y):
    """(r, 2^k) with y = k ln2 + r, |r| <= ln2/2, for float32 y in [-87, 88] (2^k stays normal)."""
    t = y * _LOG2E32 + _SHIFT32
    k = t - _SHIFT32
    r = (y - k * _LN2_HI32) - k * _LN2_LO32
    return r, _bits_f32(np.int32((_f32_bits(t) - _SHIFT32_BITS + 127) << 23))


@njit(fastmath={"contract"})
def _exp_f32(x):
    """The float32 version: 2 ulp of float32, as numpy's and torch's float32 exp."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _C32
    r, scale = _reduce_f32(_HI32 if x > _HI32 else (_LO32 if x < _LO32 else x))
    p = c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))))
    return p * scale + _ZERO32 * x


# tanh by Cody & Waite's rational form (Cephes tanh): |x| + |x| s P(s)/Q(s), s = x^2, for |x| < 0.625,
# where 1 - 2/(e^{2|x|} + 1) would cancel; that form beyond. Both are computed and one is selected, so
# the loops stay branch-free and vectorise. |x| is clamped at 20, where tanh rounds to 1, so that
# +-inf give +-1 and not the exp's NaN.
_TANH_P64 = (-9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3)
_TANH_Q64 = (1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3)
# float32: one form over the whole line, tanh a = E/(E + 2) with E = e^{2a} - 1, a = |x|: no cancellation
# anywhere (E ~ 2a near 0), one division, and E's relative error is damped by 2/(E + 2) <= 1.
# E = 2^k (e^r - 1) + (2^k - 1) after the reduction of 2a (2^k - 1 is exact for k <= 24, beyond the
# result rounds to 1 anyway); e^r - 1 = r + r^2 q(r), q of degree 5 fitted to minimax relative error
# on |r| <= ln2/2 (max 2.3e-9 with these float32 coefficients). a is clamped at 9.1, where E > 2^26 so
# that E + 2 rounds to E and the result is exactly 1: +-inf give +-1.
_EXPM1_Q32 = tuple(np.float32(c) for c in (
    0.5000000044269208, 0.1666666636978234, 0.04166636042496641, 0.0083333894476149,
    0.0013940668721251527, 0.00019845889101079866))
_BIG_TANH32 = np.float32(9.1)
_ONE32, _TWO32 = np.float32(1.0), np.float32(2.0)


@njit(fastmath={"contract"})
def _tanh_f64(x):
    """Within 3 ulp of libm's tanh over the whole line (tests/test_activations_fast.py); NaN gives NaN."""
    p0, p1, p2 = _TANH_P64
    q0, q1, q2 = _TANH_Q64
    a = abs(x)
    a = 20.0 if a > 20.0 else a  # not min(): a NaN stays NaN
    s = a * a
    small = a + a * s * ((p0 * s + p1) * s + p2) / (((s + q0) * s + q1) * s + q2)
    large = 1.0 - 2.0 / (_exp_f64(a + a) + 1.0)
    return math.copysign(small if a < 0.625 else large, x)  # copysign: tanh(-0) = -0


@njit(fastmath={"contract"})
def _tanh_f32(x):
    """The float32 version in float32 arithmetic: within 2 float32 ulp of libm's tanh rounded to
    float32 over every float32 (tests/test_activations_fast.py); tanh(-0) = -0, NaN gives NaN."""
    q0, q1, q2, q3, q4, q5 = _EXPM1_Q32
    a = abs(x)
    a = _BIG_TANH32 if a > _BIG_TANH32 else a  # not min(): a NaN stays NaN
    r, scale = _reduce_f32(a + a)
    e = scale * (r + r * r * (q0 + r * (q1 + r * (q2 + r * (q3 + r * (q4 + r * q5)))))) + (scale - _ONE32)
    return math.copysign(e / (e + _TWO32), x)


# sin and cos for the complex exp: k = round(y 2/pi) by the shifter as in exp, r = y - k pi/2 with
# pi/2 in three parts of 33 bits (fdlibm's pio2_1..3: k pio2_1 and k pio2_2 are exact for |k| < 2^20),
# |r| <= pi/4, and fdlibm's minimax polynomials of sin and cos on it; the quadrant k mod 4 swaps and
# negates them.
_2_PI = 0.63661977236758134308
_PIO2 = (1.57079632673412561417e+00, 6.07710050630396597660e-11, 2.02226624871116645580e-21)
_SIN = (-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
        2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10)
_COS = (4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
        -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11)


@njit(inline="always")  # inlined by Numba: LLVM leaves a body this size a call, a scalar loop
def _cexp(z):
    """e^z = e^x (cos y + i sin y) for z = x + iy, branch-free: within 3 eps |e^z| (eps = 2^-52) of
    np.exp for x in [-708, 709] and |y| <= 1e6 (tests/test_activations_fast.py); beyond 2^20 pi/2 the
    reduction's error grows like |y| 1e-16. A NaN or infinite part gives NaN parts."""
    x, y = z.real, z.imag
    p1, p2, p3 = _PIO2
    s1, s2, s3, s4, s5, s6 = _SIN
    c1, c2, c3, c4, c5, c6 = _COS
    t = y * _2_PI + _SHIFT64
    k = t - _SHIFT64
    r = ((y - k * p1) - k * p2) - k * p3
    q = _f64_bits(t) - _SHIFT64_BITS
    w = r * r
    sin_r = r + r * w * (s1 + w * (s2 + w * (s3 + w * (s4 + w * (s5 + w * s6)))))
    cos_r = 1.0 - 0.5 * w + w * w * (c1 + w * (c2 + w * (c3 + w * (c4 + w * (c5 + w * c6)))))
    # quadrant by exact arithmetic (products with 0 and +-1, sums with 0), not by selects, whose
    # phi nodes Numba's inliner mishandles (NumbaIRAssumptionWarning)
    odd = np.float64(q & 1)
    sin_y = np.float64(1 - (q & 2)) * ((1.0 - odd) * sin_r + odd * cos_r)
    cos_y = np.float64(1 - ((q + 1) & 2)) * ((1.0 - odd) * cos_r + odd * sin_r)
    m = _exp_f64(x)
    return complex(m * cos_y, m * sin_y)


def fast_exp(x):
    """exp in the state's own precision: the vectorisable forms above (real polynomials, ``_cexp``)."""
    return np.exp(x)


@overload(fast_exp, jit_options={"error_model": "numpy"})
def _fast_exp(x):
    if isinstance(x, types.Complex):
        return lambda x: _cexp(x)
    if x == types.float32:
        return lambda x: _exp_f32(x)
    return lambda x: _exp_f64(np.float64(x))


@njit(inline="always")
def _cdiv(a, b):
    """a / b for complex a and b with |b| neither huge nor tiny (the callers' |b| <= 2), without the
    branches of Smith's division, so that the loop vectorises; b = 0 gives inf/NaN."""
    d = b.real * b.real + b.imag * b.imag
    return complex((a.real * b.real + a.imag * b.imag) / d, (a.imag * b.real - a.real * b.imag) / d)


@njit(inline="always")
def _clogistic(z):
    """1/(1 + e^-z) from e = e^{-|x| - i sgn(x) y}, |e| <= 1: 1/(1 + e) for x >= 0, e/(1 + e) for
    x < 0 (the same value), so that neither the exp nor the division overflows."""
    sign = math.copysign(1.0, z.real)
    e = _cexp(-sign * z)
    pos = 0.5 + 0.5 * sign  # 1 or 0: the numerator 1 or e, selected by exact arithmetic as in _cexp
    return _cdiv(pos + (1.0 - pos) * e, 1.0 + e)


@njit(inline="always")
def _ctanh(z):
    """tanh z = (1 - e)/(1 + e), e = e^{-2z}, taken on the half-plane x >= 0 (|e| <= 1, by tanh's
    oddness): absolute error of a few ulp; near 0 the relative error grows like 1e-16/|z|."""
    sign = math.copysign(1.0, z.real)
    e = _cexp(-2.0 * sign * z)
    return sign * _cdiv(1.0 - e, 1.0 + e)


def fast_tanh(x):
    """tanh in the state's own precision by the vectorisable forms above."""
    return np.tanh(x)


@overload(fast_tanh, jit_options={"error_model": "numpy"}, inline="always")
def _fast_tanh(x):
    if isinstance(x, types.Complex):
        return lambda x: _ctanh(x)
    if x == types.float32:
        return lambda x: _tanh_f32(x)
    return lambda x: _tanh_f64(np.float64(x))


def lit(array, value):
    """``value`` as a scalar of the array's precision, so that float32 arithmetic stays float32."""
    return value


@overload(lit, jit_options={"error_model": "numpy"})
def _lit(array, value):
    if array.dtype == types.float32:
        return lambda array, value: np.float32(value)
    return lambda array, value: value


# --------------------------------------------------------------------------------------------
# Activations. Each has a scalar form (real or complex); the row functions branch on the activation
# code once per row and run one tight loop per activation, so that every loop vectorises.
# --------------------------------------------------------------------------------------------
def _logistic(x, one):
    return one / (one + np.exp(-x))


@overload(_logistic, jit_options={"error_model": "numpy"}, inline="always")
def _logistic_overload(x, one):
    if isinstance(x, types.Complex):
        return lambda x, one: _clogistic(x)
    return lambda x, one: one / (one + fast_exp(-x))


@njit
def _hard_sigmoid(z):
    # written through .real so that it types for complex too (complex states reject it earlier)
    return min(max(z.real, 0.0), 1.0) + 0.0 * z


@njit
def _hard_sigmoid_prime(z):
    return 1.0 + 0.0 * z if z.real > 0.0 and z.real < 1.0 else 0.0 * z


@njit(inline="always")  # as a call (LLVM does not inline two exps) its loop would not vectorise
def _dsilu(z, half, one, two):
    return half * z * _logistic(z, one) + (one - half * z) * _logistic(z - two, one)


@njit(inline="always")
def _dsilu_prime(z, half, one, two):
    s0 = _logistic(z, one)
    s2 = _logistic(z - two, one)
    return half * s0 + half * z * s0 * (one - s0) - half * s2 + (one - half * z) * s2 * (one - s2)


@njit(inline="always")  # a call per row costs more than the row's work
def rho_row(code, y, r, costly):
    """r = rho(y) for one row of neurons sharing an activation. ``costly`` (``layer_activations``): an
    argument of the compiled caller; None prunes the tanh and dsilu branch before typing."""
    m = y.shape[0]
    one, two, four = lit(y, 1.0), lit(y, 2.0), lit(y, 4.0)
    if code == LOGISTIC:
        for b in range(m):
            r[b] = _logistic(four * y[b] - two, one)
    elif code == HARD_SIGMOID:
        for b in range(m):
            r[b] = _hard_sigmoid(y[b])
    elif code == IDENTITY:
        for b in range(m):
            r[b] = y[b]
    elif costly is not None:
        _tanh_dsilu_row(code, y, r)


@njit(inline="always")  # a call per row costs more than the row's work
def rho_prime_row(code, y, d, costly):
    """d = rho'(y) for one row of neurons sharing an activation (``costly`` as in ``rho_row``)."""
    m = y.shape[0]
    one, two, four = lit(y, 1.0), lit(y, 2.0), lit(y, 4.0)
    if code == LOGISTIC:
        for b in range(m):
            s = _logistic(four * y[b] - two, one)
            d[b] = four * s * (one - s)
    elif code == HARD_SIGMOID:
        for b in range(m):
            d[b] = _hard_sigmoid_prime(y[b])
    elif code == IDENTITY:
        for b in range(m):
            d[b] = one + 0.0 * y[b]
    elif costly is not None:
        _tanh_dsilu_prime_row(code, y, d)


@njit(inline="always")
def _tanh_dsilu_row(code, y, r):
    """r = rho(y) for one tanh or dsilu row."""
    m = y.shape[0]
    half, one, two = lit(y, 0.5), lit(y, 1.0), lit(y, 2.0)
    if code == TANH:
        for b in range(m):
            r[b] = fast_tanh(y[b])
    else:
        for b in range(m):
            r[b] = _dsilu(y[b], half, one, two)


@njit(inline="always")
def _tanh_dsilu_prime_row(code, y, d):
    """d = rho'(y) for one tanh or dsilu row."""
    m = y.shape[0]
    half, one, two = lit(y, 0.5), lit(y, 1.0), lit(y, 2.0)
    if code == TANH:
        for b in range(m):
            t = fast_tanh(y[b])
            d[b] = one - t * t
    else:
        for b in range(m):
            d[b] = _dsilu_prime(y[b], half, one, two)


@njit
def _activate(u, layer_off, codes, costly, out):
    for l in range(codes.shape[0]):
        for i in range(layer_off[l], layer_off[l + 1]):
            rho_row(codes[l], u[i], out[i], costly)


@njit
def _activate_prime(u, layer_off, codes, costly, out):
    for l in range(codes.shape[0]):
        for i in range(layer_off[l], layer_off[l + 1]):
            rho_prime_row(codes[l], u[i], out[i], costly)


@njit(inline="always")  # costly must be an argument of the kernel with the rows (see rho_row)
def activate(u, layer_off, layer_act, out):
    """out = rho(u), layer by layer."""
    codes, costly = layer_act
    _activate(u, layer_off, codes, costly, out)


@njit(inline="always")
def activate_prime(u, layer_off, layer_act, out):
    """out = rho'(u), layer by layer."""
    codes, costly = layer_act
    _activate_prime(u, layer_off, codes, costly, out)


# --------------------------------------------------------------------------------------------
# Weight products: the only O(n^2) work of a step
# --------------------------------------------------------------------------------------------
@njit
def copy_rows(src, dst):
    """dst = src for 2-D arrays of one shape, as plain loops: numba's array-to-slice assignment also
    compiles its shape-mismatch message (string formatting, 2-3 s of a cold start)."""
    for i in range(src.shape[0]):
        for b in range(src.shape[1]):
            dst[i, b] = src[i, b]


@njit
def _add_rows(t, out, start):
    """out[start:start + len(t)] += t, as plain loops (numba's slice += is slower here)."""
    for i in range(t.shape[0]):
        for b in range(t.shape[1]):
            out[start + i, b] += t[i, b]


def as_real(x, wbuf):
    """A complex x (rows, B) seen as a real (rows, 2 B) array when the weights are real, else x; x in
    the engine's layout (C order: numba refuses the view of a non-contiguous row)."""
    return x


@overload(as_real, jit_options={"error_model": "numpy"})
def _as_real(x, wbuf):
    if isinstance(x.dtype, types.Complex) and not isinstance(wbuf.dtype, types.Complex):
        # row i of x is (re, im, re, im, ...) in memory: a real W times those rows is W Re x and
        # W Im x interleaved, i.e. W x, by one real GEMM (2 real products' work, no copy); promoting
        # W to complex instead costs a zgemm, 4 real products' work and a complex copy of W
        return lambda x, wbuf: x.view(wbuf.dtype)
    return lambda x, wbuf: x


def quadratures(x):
    """A complex x (rows, B) seen as the real (rows, 2 B) array of its quadratures, row i being
    (Re x[i, 0], Im x[i, 0], Re x[i, 1], ...); a real x as it is. Through it a device's read chain
    (converters, output noise) takes a complex state's I and Q as two real signals; C order."""
    return x


@overload(quadratures, jit_options={"error_model": "numpy"})
def _quadratures(x):
    if isinstance(x.dtype, types.Complex):
        return lambda x: x.view(np.float64)  # complex128 (the engine's only complex dtype)
    return lambda x: x


@njit
def _products(r, wbuf, conn, layer_off, tmp, out, transpose):
    """out = W r, or W^T r with ``transpose`` (YES or NO, not a literal: one compiled function
    serves both directions, see NOT_LITERAL). The first connection into a layer (into its pre layer
    for W^T) writes its product straight into ``out``; later ones go through ``tmp``; layers that
    nothing projects to get 0."""
    dst = 1 if transpose else 3  # the column of conn holding the start of the output block
    for l in range(layer_off.shape[0] - 1):
        fed = False
        for c in range(conn.shape[0]):
            fed = fed or conn[c, dst] == layer_off[l]
        if not fed:
            out[layer_off[l]:layer_off[l + 1]] = 0.0
    for c in range(conn.shape[0]):
        wo, pa, pn, qa, qn = conn[c, 0], conn[c, 1], conn[c, 2], conn[c, 3], conn[c, 4]
        first = True
        for e in range(c):
            first = first and conn[e, dst] != conn[c, dst]
        w = wbuf[wo:wo + qn * pn].reshape((qn, pn))
        if transpose:
            src, oa, on = r[qa:qa + qn], pa, pn
            if first:
                np.dot(w.T, src, out[oa:oa + on])
            else:
                np.dot(w.T, src, tmp[:on])
                _add_rows(tmp[:on], out, oa)
        else:
            src, oa, on = r[pa:pa + pn], qa, qn
            if first:
                np.dot(w, src, out[oa:oa + on])
            else:
                np.dot(w, src, tmp[:on])
                _add_rows(tmp[:on], out, oa)


@njit(inline="always")  # a wrapper: compiled apart, every caller would optimise _products' code once more
def weights_times(r, wbuf, conn, layer_off, tmp, out):
    """out = W r (all connections between state layers); complex states with real weights are
    multiplied on their real views (``as_real``)."""
    _products(as_real(r, wbuf), wbuf, conn, layer_off, as_real(tmp, wbuf), as_real(out, wbuf), NO)


@njit(inline="always")
def weights_transpose_times(w, wbuf, conn, layer_off, tmp, out):
    """out = W^T w (complex w with real weights as in ``weights_times``)."""
    _products(as_real(w, wbuf), wbuf, conn, layer_off, as_real(tmp, wbuf), as_real(out, wbuf), YES)


@njit
def field(u, drive, wbuf, conn, layer_off, layer_act, tmp, r, out):
    """out = F(u) = -u + W rho(u) + drive  (r receives rho(u))."""
    activate(u, layer_off, layer_act, r)
    weights_times(r, wbuf, conn, layer_off, tmp, out)
    out += drive
    out -= u


@njit
def jvp(u, v, wbuf, conn, layer_off, layer_act, tmp, d, out):
    """out = J v = -v + W (rho'(u) * v),  J = dF/du (without the 1/tau of the ODE)."""
    activate_prime(u, layer_off, layer_act, d)
    jvp_given(d, v, wbuf, conn, layer_off, tmp, d, out)


@njit
def jvp_given(d, v, wbuf, conn, layer_off, tmp, dv, out):
    """out = -v + W (d * v) for d = rho'(u) given: :func:`jvp` without the derivative, for many
    products at one state. dv: scratch for d * v (may be d itself)."""
    for i in range(v.shape[0]):
        for b in range(v.shape[1]):
            dv[i, b] = d[i, b] * v[i, b]
    weights_times(dv, wbuf, conn, layer_off, tmp, out)
    out -= v


@njit
def vjp(u, w, wbuf, conn, layer_off, layer_act, tmp, d, out):
    """out = J^T w = -w + rho'(u) * (W^T w)."""
    weights_transpose_times(w, wbuf, conn, layer_off, tmp, out)
    activate_prime(u, layer_off, layer_act, d)
    out *= d
    out -= w


@njit
def weight_vjp(w, r, conn, out):
    """(dF/dW_c)^T w = w_post r_pre^T summed over the batch, written into the flat buffer ``out``."""
    for c in range(conn.shape[0]):
        wo, pa, pn, qa, qn = conn[c, 0], conn[c, 1], conn[c, 2], conn[c, 3], conn[c, 4]
        np.dot(w[qa:qa + qn], r[pa:pa + pn].T, out[wo:wo + qn * pn].reshape((qn, pn)))


AP_DIVERGED = 1e10  # an Almeida-Pineda residual grown this much past its start is taken as diverging


@njit
def almeida_pineda(d, rhs, wbuf, conn, layer_off, tmp, step, tol, max_iter, lam, r, res, trace):
    """Relax the adjoint dynamics dlam/ds = J^T lam - rhs by its Euler steps lam += step r, where
    r = J^T lam - rhs = -lam + d * (W^T lam) - rhs and d = rho'(u*) is fixed: one W^T product a step
    and no activation. Starts from the given ``lam``; stops when every sample's max_i |r| <= tol[b],
    diverges (the worst res/tol not finite or AP_DIVERGED times its start) or after ``max_iter``
    steps. ``r`` receives the last residual, ``res`` its per-sample maximum, ``trace[k]`` the worst
    res[b] / tol[b] before step k. Returns (status, steps taken)."""
    n, nb = lam.shape
    for k in range(max_iter + 1):
        weights_transpose_times(lam, wbuf, conn, layer_off, tmp, r)
        res[:] = 0.0
        for i in range(n):
            for b in range(nb):
                v = d[i, b] * r[i, b] - lam[i, b] - rhs[i, b]
                r[i, b] = v
                a = abs(v)
                if not a <= res[b]:  # a NaN is kept
                    res[b] = a
        worst = 0.0
        for b in range(nb):
            q = res[b] / tol[b]
            if not q <= worst:
                worst = q
        trace[k] = worst
        if worst <= 1.0:
            return SUCCESS, k
        if not worst <= AP_DIVERGED * trace[0]:
            return DIVERGED, k
        if k < max_iter:
            for i in range(n):
                for b in range(nb):
                    lam[i, b] += step * r[i, b]
    return NOT_CONVERGED, max_iter


@njit
def teach(nudge, r, out):
    """out[lo:hi] += beta dl/dr, the teaching current into the nudged layer (rows lo:hi) for the
    per-sample cost l of its activities r[lo:hi] (docs/equations.md, section 4.1):

    * SQUARED_ERROR: l = 0.5 ||r - y||^2, dl/dr = r - y;
    * CROSS_ENTROPY through a linear readout z = W_o r + b_o: l = -sum_c y_c log softmax(z)_c,
      dl/dr = W_o^T (softmax(z) - y).

    ``nudge``: a :data:`Nudge`; every operation is holomorphic, so complex beta works unchanged.
    The readout's sums run over the batch in the innermost loop (contiguous, vectorised; complex
    states on their real views, ``as_real``, as the readout is real), each sum still accumulated in
    the order of the readout's index."""
    code, lo, hi, y, wo, bo, z = nudge.code, nudge.lo, nudge.hi, nudge.target, nudge.wo, nudge.bo, nudge.scratch
    beta = nudge.beta[0]
    nb = r.shape[1]
    if code == SQUARED_ERROR:
        for i in range(hi - lo):
            for b in range(nb):
                out[lo + i, b] += beta * (r[lo + i, b] - y[i, b])
    elif code == CROSS_ENTROPY:
        nc = wo.shape[0]
        rv, zv, ov = as_real(r, wo), as_real(z, wo), as_real(out, wo)
        acc = zv[nc]
        for c in range(nc):  # z = W_o r + b_o
            for b in range(nb):
                z[c, b] = bo[c]
            for i in range(hi - lo):
                w = wo[c, i]
                for b in range(zv.shape[1]):
                    zv[c, b] += w * rv[lo + i, b]
        # softmax over the classes, each loop over the batch innermost (vectorised, the engine's exp):
        # row nc holds the shift max_c Re z_c (any shift cancels; the real part keeps exp finite), then
        # the sum of the exponentials, accumulated in the order of the class index
        for b in range(nb):
            z[nc, b] = z[0, b].real
        for c in range(1, nc):
            for b in range(nb):
                z[nc, b] = max(z[nc, b].real, z[c, b].real)
        for c in range(nc):  # the difference in float64 (exact for float32 states, as is the shift)
            for b in range(nb):
                z[c, b] = fast_exp(z[c, b] - np.float64(z[nc, b].real))
        for b in range(nb):
            z[nc, b] = z[0, b]
        for c in range(1, nc):
            for b in range(nb):
                z[nc, b] += z[c, b]
        for c in range(nc):
            for b in range(nb):
                z[c, b] = beta * (z[c, b] / z[nc, b] - y[c, b])
        for i in range(hi - lo):  # out += W_o^T z
            for b in range(zv.shape[1]):
                acc[b] = 0.0 * zv[0, b]
            for c in range(nc):
                w = wo[c, i]
                for b in range(zv.shape[1]):
                    acc[b] += w * zv[c, b]
            for b in range(zv.shape[1]):
                ov[lo + i, b] += acc[b]


# --------------------------------------------------------------------------------------------
# Device effects inside the stepping kernel. ``effects`` is a tuple of effect states, each an
# instance of a namedtuple class registered with its hooks by ``register_effect`` (the built-in ones
# are in substrate.devices.stepping); the stepping kernel calls the hooks of every effect, in the
# tuple's order, at four points:
#
# * ``before(e, src) -> src``: the activities that enter a weight product (e.g. a DAC);
# * ``after(e, src, circuit, tmp, out, fresh, h)``: on a product's output out = W src (read noise,
#   output noise, an ADC); ``fresh``: the step's first product (its stages share a draw), ``h`` the
#   step, ``tmp`` a scratch (max rows of a connection, B);
# * ``activate(e, y, circuit, r)``: after r = rho(y) was computed, rewrite it (activation mismatch);
# * ``step(e, u, h) -> bool``: after an accepted step; True if it moved the state (state noise).
#
# A hook an effect does not register is no code at all. The dispatch is resolved at compile time from
# the tuple's type: an ideal circuit passes ``()``, and ``run``'s specialisation for it contains none
# of the device code (no generators, converters or noise), so the ideal path costs nothing at run time
# and nothing at compile time; each device's tuple type gets its own specialisation. Numba caches that
# specialisation by the argument types only: after editing a hook, clear the cache (__pycache__ or
# NUMBA_CACHE_DIR) or it keeps running the old code.
# --------------------------------------------------------------------------------------------
EFFECT_HOOKS = ("before", "after", "activate", "step")
_effect_hooks = {}  # namedtuple class -> {hook name: jitted function}


def register_effect(state_class, **hooks):
    """Register the kernel hooks (``EFFECT_HOOKS``, jitted functions) of the effect states of
    ``state_class`` (a namedtuple class); returns the class."""
    unknown = set(hooks) - set(EFFECT_HOOKS)
    if unknown:
        raise TypeError(f"register_effect: unknown hooks {sorted(unknown)}; allowed: {EFFECT_HOOKS}")
    if not (isinstance(state_class, type) and issubclass(state_class, tuple) and hasattr(state_class, "_fields")):
        raise TypeError(f"register_effect: {state_class!r} is not a namedtuple class")
    _effect_hooks[state_class] = dict(hooks)
    return state_class


def is_registered(state) -> bool:
    """Whether ``state``'s class has registered its hooks (``register_effect``)."""
    return type(state) in _effect_hooks


def _hook(effects, name):
    """The hook ``name`` of the first effect of a tuple type, or None."""
    first = effects.types[0]
    cls = getattr(first, "instance_class", None)
    if cls not in _effect_hooks:
        raise TypeError(f"a device effect of type {first} is not registered (_kernels.register_effect)")
    return _effect_hooks[cls].get(name)


def effects_before(effects, src):
    """The activities that enter a weight product: ``src`` through every effect's ``before``."""


@overload(effects_before, jit_options={"error_model": "numpy"})
def _effects_before(effects, src):
    if len(effects) == 0:
        return lambda effects, src: src
    hook = _hook(effects, "before")
    if hook is None:
        return lambda effects, src: effects_before(effects[1:], src)
    return lambda effects, src: effects_before(effects[1:], hook(effects[0], src))


def effects_after(effects, src, circuit, tmp, out, fresh, h):
    """Every effect's ``after`` on the product out = W src."""


@overload(effects_after, jit_options={"error_model": "numpy"})
def _effects_after(effects, src, circuit, tmp, out, fresh, h):
    if len(effects) == 0:
        return lambda effects, src, circuit, tmp, out, fresh, h: None
    hook = _hook(effects, "after")
    if hook is None:
        return lambda effects, src, circuit, tmp, out, fresh, h: \
            effects_after(effects[1:], src, circuit, tmp, out, fresh, h)

    def impl(effects, src, circuit, tmp, out, fresh, h):
        hook(effects[0], src, circuit, tmp, out, fresh, h)
        effects_after(effects[1:], src, circuit, tmp, out, fresh, h)
    return impl


def effects_activate(effects, y, circuit, r):
    """Every effect's ``activate`` on r = rho(y)."""


@overload(effects_activate, jit_options={"error_model": "numpy"})
def _effects_activate(effects, y, circuit, r):
    if len(effects) == 0:
        return lambda effects, y, circuit, r: None
    hook = _hook(effects, "activate")
    if hook is None:
        return lambda effects, y, circuit, r: effects_activate(effects[1:], y, circuit, r)

    def impl(effects, y, circuit, r):
        hook(effects[0], y, circuit, r)
        effects_activate(effects[1:], y, circuit, r)
    return impl


def effects_step(effects, u, h):
    """Every effect's ``step`` after an accepted step; True if any moved the state."""


@overload(effects_step, jit_options={"error_model": "numpy"})
def _effects_step(effects, u, h):
    if len(effects) == 0:
        return lambda effects, u, h: False
    hook = _hook(effects, "step")
    if hook is None:
        return lambda effects, u, h: effects_step(effects[1:], u, h)

    def impl(effects, u, h):
        moved = hook(effects[0], u, h)
        rest = effects_step(effects[1:], u, h)  # every effect steps, whatever the first returned
        return moved or rest
    return impl


def effects_move(effects):
    """Whether any effect has a ``step`` hook, which may move the state after a step (fixed by the
    effects' types: a constant where compiled)."""


@overload(effects_move, jit_options={"error_model": "numpy"})
def _effects_move(effects):
    if len(effects) == 0:
        return lambda effects: False
    if _hook(effects, "step") is None:
        return lambda effects: effects_move(effects[1:])
    return lambda effects: True


@njit(inline="always")  # wrappers (see weights_times)
def products(effects, r, circuit, tmp, out, fresh, h):
    """out = W r as the circuit computes it: through the effects' ``before`` and ``after`` hooks (an
    ideal circuit: W r alone)."""
    src = effects_before(effects, r)
    weights_times(src, circuit.wbuf, circuit.conn, circuit.layer_off, tmp, out)
    effects_after(effects, src, circuit, tmp, out, fresh, h)


@njit(inline="always")
def activate_effects(effects, u, circuit, r):
    """r = rho(u) as the circuit's neurons compute it (through the effects' ``activate`` hooks)."""
    activate(u, circuit.layer_off, circuit.layer_act, r)
    effects_activate(effects, u, circuit, r)


@njit
def quantise(x, bits, bound):
    """Row i of the real x clipped to [-bound[i], bound[i]] and rounded to the nearest multiple of
    step = 2 bound / (2^bits - 2), in place: a mid-tread converter of 2^bits - 1 levels, 0 among them
    (aihwkit's resolution 1/(2^bits - 2) of the range); ties round to even. ``bound`` of length 1:
    one bound for every row; a row with bound 0 is left alone (no converter on it)."""
    for i in range(x.shape[0]):
        bd = bound[i] if bound.shape[0] > 1 else bound[0]
        if bd <= 0.0:
            continue
        step = 2.0 * bd / (2.0 ** bits - 2.0)
        for b in range(x.shape[1]):
            v = min(max(x[i, b], -bd), bd)
            x[i, b] = np.round(v / step) * step


@njit
def activate_device(u, layer_off, codes, costly, gain, offset, row, out):
    """out = rho(u), or rho(g_i (u_i - o_i)) per neuron when ``gain`` is not empty (activation
    mismatch); ``row`` is a scratch row of the batch's length; ``codes`` and ``costly`` as in
    ``layer_activations``."""
    if gain.shape[0] == 0:
        _activate(u, layer_off, codes, costly, out)
        return
    for l in range(codes.shape[0]):
        for i in range(layer_off[l], layer_off[l + 1]):
            g, o = gain[i], offset[i]
            for b in range(u.shape[1]):
                row[b] = g * (u[i, b] - o)
            rho_row(codes[l], row, out[i], costly)


# --------------------------------------------------------------------------------------------
# phi functions of exponential integrators (docs/equations.md, section 2)
# --------------------------------------------------------------------------------------------
def _expm1(z):
    return np.expm1(z)


@overload(_expm1, jit_options={"error_model": "numpy"})
def _expm1_overload(z):
    if isinstance(z, types.Complex):  # only called for |z| >= 1, where e^z - 1 does not cancel
        return lambda z: np.exp(z) - 1.0
    return lambda z: math.expm1(z)


@njit(inline="always")  # a few calls, each with a constant k (ONE, TWO, THREE) that the inlined body folds
def phi(k, z):
    """phi_k(z) = sum_m z^m/(m+k)!  (phi_0 = e^z); Taylor series for |z| < 1, else the recurrence
    phi_{k+1} = (phi_k - 1/k!)/z started from phi_1 = expm1(z)/z, which has no cancellation there.
    Also for complex z: the gradient takes d/dtau of the coefficients by a complex step."""
    if k == 0:
        return np.exp(z)
    if abs(z) < 1.0:
        term = 1.0
        for m in range(1, k + 1):
            term /= m
        total = term
        for m in range(1, 30):
            term *= z / (m + k)
            total += term
        return total
    p = _expm1(z) / z
    fact = 1.0
    for j in range(1, k):
        fact *= j
        p = (p - 1.0 / fact) / z
    return p


@njit
def coefficients(family, method, h, a, bw, tauinv, alpha, coef):
    """Coefficients of one step of size h, per neuron (z = -h/tau), in the form shared by all steppers:

        Y_i = alpha[i] u + sum_{j<i} coef[i, j] S_j   (stage points, i < s),
        u_next = alpha[s] u + sum_{j<s} coef[s, j] S_j,

    where S_j is the stage slope k_j = F(Y_j)/tau for an explicit RK method (alpha = 1, coef = h a,
    last row h b) and N(Y_j) for an exponential one, whose coefficients include the factor h/tau:
    ETD1 and ETD2RK as in docs/equations.md, section 2, ETDRK4 of Cox & Matthews (2002) eq. (26)-(29) written
    with phi_1..phi_3."""
    s = coef.shape[1]
    for i in range(tauinv.shape[0]):
        if family == EXPLICIT_RK:
            for q in range(s + 1):
                alpha[q, i] = 1.0
                for j in range(s):
                    coef[q, j, i] = h * (a[q, j] if q < s else bw[j])
            continue
        g = h * tauinv[i]
        z = -g
        p1 = phi(ONE, z)
        alpha[0, i] = 1.0
        if method == ETD1:
            alpha[1, i] = np.exp(z)
            coef[1, 0, i] = g * p1
        elif method == ETD2RK:
            p2 = phi(TWO, z)
            alpha[1, i] = np.exp(z)
            alpha[2, i] = alpha[1, i]
            coef[1, 0, i] = g * p1
            coef[2, 0, i] = g * (p1 - p2)
            coef[2, 1, i] = g * p2
        else:
            p2 = phi(TWO, z)
            p3 = phi(THREE, z)
            eh = np.exp(0.5 * z)
            q = 0.5 * g * phi(ONE, 0.5 * z)  # (h/2)/tau * phi_1(z/2)
            alpha[1, i] = eh
            alpha[2, i] = eh
            alpha[3, i] = np.exp(z)
            alpha[4, i] = alpha[3, i]
            coef[1, 0, i] = q
            coef[2, 1, i] = q
            coef[3, 0, i] = q * (eh - 1.0)
            coef[3, 2, i] = 2.0 * q
            coef[4, 0, i] = g * (p1 - 3.0 * p2 + 4.0 * p3)
            coef[4, 1, i] = g * (2.0 * p2 - 4.0 * p3)
            coef[4, 2, i] = coef[4, 1, i]
            coef[4, 3, i] = g * (4.0 * p3 - p2)


def modulus_at_most(z, bound):
    """abs(z) <= bound (False for NaN)."""
    return abs(z) <= bound


@overload(modulus_at_most, jit_options={"error_model": "numpy"})
def _modulus_at_most(z, bound):
    if isinstance(z, types.Complex):
        # abs of a complex number is a scalar hypot call (~50 ns; the loops around it cannot
        # vectorise); |z| <= |Re z| + |Im z| settles almost every case without it, exactly (a NaN
        # part makes the sum NaN and takes the exact test)
        return lambda z, bound: abs(z.real) + abs(z.imag) <= bound or abs(z) <= bound
    return lambda z, bound: abs(z) <= bound


def surely_at_most(z, bound):
    """A sufficient test of abs(z) <= bound without abs of a complex number: |Re z| + |Im z| <= bound
    (False for NaN); for real z, abs(z) <= bound itself. Branch-free, so a row of them vectorises."""
    return abs(z) <= bound


@overload(surely_at_most, jit_options={"error_model": "numpy"})
def _surely_at_most(z, bound):
    if isinstance(z, types.Complex):
        return lambda z, bound: abs(z.real) + abs(z.imag) <= bound
    return lambda z, bound: abs(z) <= bound


@njit(inline="always")
def row_within(z, m):
    """Is every |z[b]| surely <= m[b] (``surely_at_most``)? One vectorised pass over a row; the rows
    for which it is not are the few that raise a running maximum (or hold a NaN)."""
    out = 0
    for b in range(z.shape[0]):
        out += 0 if surely_at_most(z[b], m[b]) else 1
    return out == 0


@njit(inline="always")
def count_beyond(z, bound):
    """The number of entries of the row z with abs(z) > bound or NaN (``modulus_at_most`` each),
    counted exactly only for a row not surely within (``surely_at_most``, one vectorised pass)."""
    out = 0
    for b in range(z.shape[0]):
        out += 0 if surely_at_most(z[b], bound) else 1
    if out > 0:
        out = 0
        for b in range(z.shape[0]):
            out += 0 if modulus_at_most(z[b], bound) else 1
    return out


@njit(inline="always")
def raise_max(m, z):
    """The running max m of |z| with z included; a NaN |z| makes it NaN (and keeps it)."""
    if modulus_at_most(z, m):  # also False when m is NaN: then m stays NaN below
        return m
    f = abs(z)
    return f if f > m or f != f else m


@njit
def stage_pass(i, compute, family, wr, drive, y, tauinv, tau, alpha, coef, u, stages,
               layer_off, codes, costly, relax, res, umax, ew, h, rtol, atol, blowup, ynext, rnext, activity):
    """Everything between two weight products, fused row by row while the row is in cache:

    1. (if ``compute``) the slope of stage i from its weight product wr = W rho(Y_i):
       S_i = (wr + drive - Y_i)/tau (explicit RK) or S_i = wr + drive (exponential);
    2. at stage 0 of a relaxation, the per-sample residual max_i |F_i(u)| and max_i |u_i|;
    3. the next stage point Y_{i+1} and its activity, or, after the last stage, the new state with
       its activity, its blow-up check and (embedded pairs) the error estimate. ``activity`` False:
       no activity (rnext is left alone; the caller takes it after moving the point).

    ``codes`` and ``costly``: the layers' activations (``layer_activations``).

    Returns (number of entries that are NaN/Inf or beyond ``blowup``, sum of squared scaled errors)."""
    s = coef.shape[1]
    last = i + 1 == s
    bad = 0
    err2 = 0.0
    with_err = last and ew.shape[0] > 0
    if relax and i == 0:
        res[:] = 0.0
        umax[:] = 0.0
    q = i + 1  # the row of coefficients that forms the next point
    nb = u.shape[1]
    for l in range(codes.shape[0]):
        for p in range(layer_off[l], layer_off[l + 1]):
            if compute:
                if family == EXPLICIT_RK:
                    ti = tauinv[p]
                    for b in range(nb):
                        stages[i, p, b] = (wr[p, b] + drive[p, b] - y[p, b]) * ti
                else:
                    for b in range(nb):
                        stages[i, p, b] = wr[p, b] + drive[p, b]
            if relax and i == 0:
                # the residual row F_p, in ynext[p] until the next point overwrites it below; the
                # maxima are raised entry by entry only in a row not surely within them (``row_within``:
                # after the first rows, most rows are, and a complex row is then spared its abs calls)
                if family == EXPLICIT_RK:
                    for b in range(nb):
                        ynext[p, b] = stages[0, p, b] * tau[p]
                else:
                    for b in range(nb):
                        ynext[p, b] = stages[0, p, b] - u[p, b]
                if not row_within(ynext[p], res):
                    for b in range(nb):
                        res[b] = raise_max(res[b], ynext[p, b])  # a NaN stays
                if not row_within(u[p], umax):
                    for b in range(nb):
                        if not modulus_at_most(u[p, b], umax[b]):
                            umax[b] = max(umax[b], abs(u[p, b]))
            e, c = alpha[q, p], coef[q, 0, p]
            for b in range(nb):
                ynext[p, b] = e * u[p, b] + c * stages[0, p, b]
            for j in range(1, q):
                c = coef[q, j, p]
                if c != 0.0:
                    for b in range(nb):
                        ynext[p, b] += c * stages[j, p, b]
            if last:
                bad += count_beyond(ynext[p], blowup)
                if with_err:
                    for b in range(nb):
                        d = 0.0 * ynext[p, b]
                        for j in range(s):
                            d += ew[j] * stages[j, p, b]
                        sc = abs(h * d) / (atol + rtol * max(abs(u[p, b]), abs(ynext[p, b])))
                        err2 += sc * sc
            if activity:
                rho_row(codes[l], ynext[p], rnext[p], costly)
    return bad, err2


# --------------------------------------------------------------------------------------------
# The one stepping kernel shared by every integrator
# --------------------------------------------------------------------------------------------
@njit
def run(stepper, circuit, u, span, relaxation, record, nudge, effects, work):
    """Integrate tau du/dt = -u + N(u) from (span.t0, u) on ``circuit`` (a :data:`Circuit`) with
    ``stepper`` (a :data:`Stepper`):

    * explicit RK (family 0): tableau ``a`` (s x s), weights ``bw``, error weights ``ew`` = b - b_hat
      (empty for fixed-step methods); ``fsal``: the last stage is the next step's first; adaptive
      steps use Hairer's PI controller (the ``PI_*`` constants above);
    * exponential RK (family 1): ``method`` selects the coefficients (see ``coefficients``).

    A step is s weight products, each followed by one fused ``stage_pass``. Steps land exactly on the
    save times ``record.t_save`` (states written to ``record.saved``). With ``relaxation.on`` the loop
    stops as soon as every sample satisfies max_i |F_i(u)| <= atol + rtol max_i |u_i| at the current
    state (checked from the first stage of each step, so it costs no extra field evaluation), or fails
    when t_end or max_steps is reached; ``res_trace[step]`` records the largest residual over the batch
    and ``t_trace[step]`` the time.

    For gradients (``adjoint``): ``record.h_record[step]`` receives each accepted step size,
    ``save_step[k]`` the number of steps taken when t_save[k] was saved, and with ``ckpt_every`` > 0
    the state after every ckpt_every-th step is stored in ``ckpt`` (ckpt[0] = the initial state).

    ``nudge``: a teaching current added to N (a :data:`Nudge`; code NO_NUDGE for none), injected into
    the neurons after the crossbar. ``effects``: a device's effect states, whose hooks (see
    ``register_effect``) act on every weight product, on the activities and after every accepted step
    (e.g. state noise u += s sqrt(h) xi: Euler-Maruyama for ``euler``; for the other methods the same
    noise split off the deterministic step, strong order 1/2); ``()`` for an ideal circuit.

    ``work``: the buffers (a :data:`Work` of this shape and dtype), reused across calls; ``u`` is copied
    into ``work.states[0]``, so the caller's array is never written.

    Every structured argument but ``effects`` may be given as a plain tuple of the namedtuple's fields:
    Numba's dispatcher types plain tuples of arrays in C but namedtuples in Python (measured: ~2 us a
    namedtuple a call, most of a tiny network's step).

    Returns (status, t, steps, nfev, rejected); the final state is copied into ``record.u_out``.
    """
    family, method, a, bw, ew, fsal, adaptive = stepper
    drive, wbuf, conn, layer_off, layer_act, tauinv, tau = circuit
    circuit = Circuit(drive, wbuf, conn, layer_off, layer_act, tauinv, tau)  # the hooks read it by name
    codes, costly = layer_act
    nudge = Nudge(*nudge)
    t0, t_end, dt, rtol, atol, h_min, max_steps, blowup = span
    relax, res_rtol, res_atol, residual, res_trace, t_trace = relaxation
    t_save, saved, u_out, h_record, save_step, ckpt_every, ckpt = record
    n, nb = u.shape
    ns = t_save.shape[0]
    # the buffers are swapped below: the caller's array must not become one of them
    u_in = u
    states, alpha, coef, umax = work
    u, r, unew, rnew, ya, ra, yb, rb, wr, tmp = (states[0], states[1], states[2], states[3], states[4],
                                                 states[5], states[6], states[7], states[8], states[9])
    stages = states[10:]
    copy_rows(u_in, u)
    s = bw.shape[0]
    alpha[:] = 0.0  # coefficients() writes only the nonzero ones of a method
    coef[:] = 0.0
    h_coef = -1.0
    noisy = False
    # a step hook (state noise) moves the new state: its activity is taken once, after the hook
    # (an activation pass a step, measured ~0.4 of a 784-500-10 Euler step)
    moves = effects_move(effects)

    t = t0
    step = 0
    nfev = 0
    rejected = 0
    k = 0
    while k < ns and t_save[k] <= t0:
        copy_rows(u, saved[k])
        save_step[k] = 0
        k += 1
    if ckpt_every > 0:
        copy_rows(u, ckpt[0])
    activate_effects(effects, u, circuit, r)
    first_ready = False  # is S_0 (the slope at u) known?
    facold = ERR_FLOOR
    h = dt
    status = SUCCESS
    while True:
        if not relax:
            if k >= ns or t >= t_end:
                break
            if step >= max_steps:
                status = MAX_STEPS
                break
        # Step size: land exactly on the next save time (a step within 1e-7 h of it is stretched).
        target = t_end
        if k < ns and t_save[k] < target:
            target = t_save[k]
        hh = h
        if target - (t + hh) <= LANDING * hh:
            hh = target - t
        if adaptive and hh < h_min and not relax:
            status = STEP_TOO_SMALL
            break
        if hh != h_coef:  # exact: replays must use the very same coefficients
            coefficients(family, method, hh, a, bw, tauinv, alpha, coef)
            h_coef = hh

        stop = False
        bad = 0
        err2 = 0.0
        ycur, rcur = u, r
        for i in range(s):
            compute = i > 0 or not first_ready
            if compute:
                products(effects, rcur, circuit, tmp, wr, i == 0, hh)
                if nudge.code != NO_NUDGE:
                    teach(nudge, rcur, wr)
                nfev += 1
            last = i + 1 == s
            if last:
                yout, rout = unew, rnew
            elif i % 2 == 0:
                yout, rout = ya, ra
            else:
                yout, rout = yb, rb
            # a relaxation stops at this step's first stage whatever its residual once it has taken
            # max_steps or reached t_end: the next point's activity would never be used
            activity = not (last and moves) and not (relax and i == 0 and (step >= max_steps or t >= t_end))
            bad, err2 = stage_pass(i, compute, family, wr, drive, ycur, tauinv, tau, alpha, coef, u,
                                   stages, layer_off, codes, costly, relax, residual, umax, ew, hh,
                                   rtol, atol, blowup, yout, rout, activity)
            if activity:
                effects_activate(effects, yout, circuit, rout)
            ycur, rcur = yout, rout
            first_ready = True
            if relax and i == 0:
                worst = 0.0
                done = True
                for b in range(nb):
                    if residual[b] > worst or residual[b] != residual[b]:
                        worst = residual[b]
                    if not (residual[b] <= res_atol + res_rtol * umax[b]):
                        done = False
                if step < res_trace.shape[0]:
                    res_trace[step] = worst
                    t_trace[step] = t
                stop = True
                if not (worst <= blowup):
                    status = DIVERGED
                elif done:
                    pass
                elif t >= t_end or step >= max_steps:
                    status = NOT_CONVERGED
                elif adaptive and hh < h_min:
                    status = STEP_TOO_SMALL
                else:
                    stop = False
                if stop:
                    break
        if stop:
            break

        if adaptive:
            err = math.sqrt(err2 / (n * nb))
            if not (err == err):
                err = NAN_ERROR
            fac11 = err ** PI_EXPONENT
            if err > 1.0:
                rejected += 1
                h = hh / min(MAX_SHRINK, fac11 / PI_SAFETY)
                continue
            fac = max(MAX_GROWTH_INV, min(MAX_SHRINK, fac11 / facold ** PI_BETA / PI_SAFETY))
            facold = max(err, ERR_FLOOR)
            h_next = hh / fac
        if bad > 0:
            status = DIVERGED
            break

        clipped = hh < h
        t = target if hh != h else t + hh
        u, unew = unew, u
        r, rnew = rnew, r
        noisy = effects_step(effects, u, hh)
        if moves:  # the activities of the state as the step hooks left it
            activate_effects(effects, u, circuit, r)
        if step < h_record.shape[0]:
            h_record[step] = hh
        step += 1
        if ckpt_every > 0 and step % ckpt_every == 0 and step // ckpt_every < ckpt.shape[0]:
            copy_rows(u, ckpt[step // ckpt_every])
        if fsal and not noisy:  # noise moved the state off the last stage
            copy_rows(stages[s - 1], stages[0])
        else:
            first_ready = False
        if adaptive:
            # a step shortened to hit a save time does not shrink the controller's proposal
            h = max(h, h_next) if clipped else h_next
        if k < ns and t >= t_save[k]:
            copy_rows(u, saved[k])
            save_step[k] = step
            k += 1
    copy_rows(u, u_out)
    return status, t, step, nfev, rejected


# --------------------------------------------------------------------------------------------
# Discrete adjoint: the exact gradient of the steps ``run`` took (docs/equations.md, section 3.2)
# --------------------------------------------------------------------------------------------
@njit
def replay(stepper, circuit, u0, nsteps, hs, ys, rs, ss, u_end):
    """Redo ``nsteps`` steps of sizes ``hs`` from ``u0`` exactly as ``run`` does (same kernels, same
    bits) and keep every stage: ys[m, i] = Y_i of step m (Y_0 = u_m), rs[m, i] = rho(Y_i),
    ss[m, i] = S_i. The state after the last step goes to ``u_end``."""
    family, method, a, bw = stepper.family, stepper.method, stepper.a, stepper.bw
    drive, wbuf, conn, layer_off, layer_act, tauinv, tau = circuit
    codes, costly = layer_act
    n, nb = u0.shape
    s = bw.shape[0]
    alpha = np.zeros((s + 1, n), tauinv.dtype)
    coef = np.zeros((s + 1, s, n), tauinv.dtype)
    h_coef = -1.0
    tmp = np.empty((max(1, n), nb), u0.dtype)
    wr = np.empty_like(u0)
    rnew = np.empty_like(u0)
    dummy = np.zeros(nb)
    ew = np.zeros(0)
    copy_rows(u0, ys[0, 0])
    activate(u0, layer_off, layer_act, rs[0, 0])
    for m in range(nsteps):
        h = hs[m]
        if h != h_coef:
            coefficients(family, method, h, a, bw, tauinv, alpha, coef)
            h_coef = h
        for i in range(s):
            weights_times(rs[m, i], wbuf, conn, layer_off, tmp, wr)
            if i + 1 < s:
                yout, rout = ys[m, i + 1], rs[m, i + 1]
            elif m + 1 < nsteps:
                yout, rout = ys[m + 1, 0], rs[m + 1, 0]
            else:
                yout, rout = u_end, rnew
            stage_pass(i, YES, family, wr, drive, ys[m, i], tauinv, tau, alpha, coef, ys[m, 0],
                       ss[m], layer_off, codes, costly, NO, dummy, dummy, ew, h, 0.0, 1.0, np.inf,
                       yout, rout, YES)  # run's argument types: its compiled stage_pass (NOT_LITERAL)


@njit
def _scale_rows(c, x, out):
    """out = c[p] * x[p] row by row (c per neuron)."""
    for p in range(x.shape[0]):
        cp = c[p]
        for b in range(x.shape[1]):
            out[p, b] = cp * x[p, b]


@njit
def _axpy_rows(c, x, out):
    """out += c[p] * x[p] row by row."""
    for p in range(x.shape[0]):
        cp = c[p]
        if cp != 0.0:
            for b in range(x.shape[1]):
                out[p, b] += cp * x[p, b]


@njit
def _tau_from_coefficients(q, first, dalpha, dcoef, u, stages, cot, p):
    """sum_b cot[p, b] (dalpha[q, p] u[p, b] + sum_{first<=j<q} dcoef[q, j, p] S_j[p, b]): the tau
    derivative of a point alpha[q] u + sum_j coef[q, j] S_j, paired with its cotangent (``first`` 1:
    the slope S_0 was not replayed, its term is added by ``_add_weight_gradient``)."""
    acc = 0.0 * cot[p, 0]
    for b in range(u.shape[1]):
        v = dalpha[q, p] * u[p, b]
        for j in range(first, q):
            v += dcoef[q, j, p] * stages[j, p, b]
        acc += cot[p, b] * v
    return acc


@njit(inline="always")  # a call per row costs more than the row's work
def rho_prime_from_activity(code, y, r, d, costly):
    """d = rho'(y) for one row, from its activity r = rho(y) where the activation allows it (logistic
    4 r (1 - r), tanh 1 - r^2: the bits of ``rho_prime_row`` without its transcendental pass);
    hard sigmoid and identity are cheap from y, dsilu is not a function of r (``costly`` as in ``rho_row``)."""
    m = y.shape[0]
    one, four = lit(y, 1.0), lit(y, 4.0)
    if code == LOGISTIC:
        for b in range(m):
            d[b] = four * r[b] * (one - r[b])
    elif code == TANH:
        for b in range(m):
            d[b] = one - r[b] * r[b]
    else:
        rho_prime_row(code, y, d, costly)


@njit(inline="always")  # a call per row costs more than the row's work
def _sum_lanes(x):
    """sum_b x[b] as eight interleaved partial sums, added pairwise at the end: eight independent
    chains of adds, which LLVM vectorises; a left-to-right sum (without fastmath LLVM keeps its order)
    is one chain at the adder's latency, ~4 cycles an element. x has at least one element."""
    m = x.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0 * x[0]
    m8 = m - m % 8
    for b in range(0, m8, 8):
        a0 += x[b]
        a1 += x[b + 1]
        a2 += x[b + 2]
        a3 += x[b + 3]
        a4 += x[b + 4]
        a5 += x[b + 5]
        a6 += x[b + 6]
        a7 += x[b + 7]
    for b in range(m8, m):
        a0 += x[b]
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit
def _add_weight_gradient(gscratch, wbuf, conn, kappa, pair, gflat, gtau):
    """gflat += gscratch (a stage's w r^T, per connection); with ``pair``, also gtau[p] += kappa[p]
    sum_q W[p, q] G[p, q] over the connections into p, i.e. kappa[p] sum_b w[p, b] (W r)[p, b]: the
    stage's weight product paired with its cotangent, from the weight gradient at hand instead of a
    replayed product (O(weights), not O(weights x batch)); gscratch is overwritten by W * G for that
    sum. The weight gradient is formed stage by stage: buffering many stages for one product with a
    long inner dimension was measured slower (784-500-10, batch 64: 6x per stage with 16 stages, the
    buffers out of cache)."""
    for k in range(gflat.shape[0]):
        gflat[k] += gscratch[k]
    if not pair:
        return
    for c in range(conn.shape[0]):
        wo, pn, qa, qn = conn[c, 0], conn[c, 2], conn[c, 3], conn[c, 4]
        for j in range(wo, wo + qn * pn):
            gscratch[j] *= wbuf[j]
        for i in range(qn):
            gtau[qa + i] += kappa[qa + i] * _sum_lanes(gscratch[wo + i * pn:wo + (i + 1) * pn])


@njit
def adjoint_step(family, s, alpha, coef, dalpha, dcoef, tauinv, lam, u, ys, rs, ss, slope0, drive, wbuf,
                 conn, layer_off, codes, costly, sbar, w, ybar, rows, tmp, gflat, gscratch, gdrive, gtau,
                 kappa, lam_out):
    """Backpropagate one step u -> u_next = alpha[s] u + sum_j coef[s, j] S_j (see ``coefficients``):
    given lam = dL/du_next, write dL/du into lam_out and add the step's contributions to the
    gradients of the packed weights (gflat), of the drive V x + b (gdrive, per sample) and of tau
    (gtau, per neuron; dalpha/dcoef are d/dtau of the coefficients, used by exponential methods).

    Reverse over the stages: the cotangent of S_j collects coef[s, j] lam and coef[i, j] Ybar_i
    (i > j); the cotangent of N at stage i is w = Sbar_i / tau (explicit RK, S = (N - Y)/tau) or
    w = Sbar_i (exponential, S = N); then Ybar_i = rho'(Y_i) (W^T w) (- w for explicit RK), which
    reaches u through alpha[i]. rho' comes from the stage activities rs. Elementwise work is fused
    row by row: two passes over the state a stage, one before its products (w, lam's own terms at
    the last stage, the drive and tau gradients) and one after (Ybar and what it feeds); the sums over
    the batch for tau are taken in eight lanes (``_sum_lanes``). ``rows`` (2, batch) is scratch.

    Stage points ys[i] for i > 0 (Y_0 is u), activities rs[i] = rho(Y_i), slopes ss[i]. ``slope0``
    False (one-stage methods only, whose stage point is the stored state: nothing was replayed): S_0,
    which enters only d/dtau, is not read; its pairing sum_b w (N - u)/tau (explicit) or
    sum_b lam dcoef N (exponential, w = coef lam) is taken as kappa[p] sum_b w (N(u) - u or N(u)) with
    the product W r from the weight gradient (``_add_weight_gradient``), never recomputed. ``codes`` and
    ``costly``: the layers' activations (``layer_activations``)."""
    n, nb = lam.shape
    exp_family = family == EXPONENTIAL
    first = 0 if slope0 else 1  # the first stage whose slope ss holds
    cot, prod = rows[0], rows[1]
    for i in range(s - 1, -1, -1):
        known = i >= first
        y = ys[i] if i > 0 else u
        for p in range(n):
            if i == s - 1:  # lam's own terms, in this pass: the last stage's cotangent is coef lam alone
                for j in range(s - 1):
                    c = coef[s, j, p]
                    for b in range(nb):
                        sbar[j, p, b] = c * lam[p, b]
                c, e = coef[s, i, p], alpha[s, p]
                for b in range(nb):
                    cot[b] = c * lam[p, b]
                    lam_out[p, b] = e * lam[p, b]
                if exp_family:
                    gtau[p] += _tau_from_coefficients(s, first, dalpha, dcoef, u, ss, lam, p)
                src = cot
            else:
                src = sbar[i, p]
            ti = 1.0 if exp_family else tauinv[p]
            for b in range(nb):
                v = src[b] * ti
                w[p, b] = v
                gdrive[p, b] += v
                if known:
                    prod[b] = v * ss[i, p, b]
                elif exp_family:
                    prod[b] = v * drive[p, b]
                else:
                    prod[b] = v * (drive[p, b] - y[p, b])
            acc = _sum_lanes(prod)
            if known:
                acc = -acc
            else:  # the rest of the pairing, kappa sum_b w W r, after the weight gradient
                kappa[p] = dcoef[1, 0, p] / coef[1, 0, p] if exp_family else -ti
                acc *= kappa[p]
            if not (known and exp_family):  # S = F/tau: dS/dtau = -S/tau
                gtau[p] += acc
        weight_vjp(w, rs[i], conn, gscratch)
        _add_weight_gradient(gscratch, wbuf, conn, kappa, not known, gflat, gtau)
        weights_transpose_times(w, wbuf, conn, layer_off, tmp, ybar)
        for l in range(codes.shape[0]):
            for p in range(layer_off[l], layer_off[l + 1]):
                rho_prime_from_activity(codes[l], y[p], rs[i, p], cot, costly)
                e = alpha[i, p]
                for b in range(nb):
                    v = ybar[p, b] * cot[b]
                    if not exp_family:
                        v -= w[p, b]
                    ybar[p, b] = v
                    lam_out[p, b] += e * v
                for j in range(i):
                    c = coef[i, j, p]
                    if c != 0.0:
                        for b in range(nb):
                            sbar[j, p, b] += c * ybar[p, b]
                if exp_family and i > 0:
                    gtau[p] += _tau_from_coefficients(i, first, dalpha, dcoef, u, ss, ybar, p)


@njit
def _state_at(m, top, slot_step, slots, stepper, circuit, hs, ys1, rs1, ss1):
    """Bring the state after m steps to the top of the slot stack and return the new top.

    The stack holds states at increasing step numbers (slot 0: the segment's checkpoint). Slots past
    m are dropped; then the state is advanced from the top by bisection, pushing the midpoint each
    time, so that the later requests m-1, m-2, ... find a stored state close below them: memory
    O(log k) states for a segment of k steps, at the cost of O(k log k) replayed steps."""
    while slot_step[top] > m:
        top -= 1
    while slot_step[top] < m:
        start = slot_step[top]
        target = m if m - start <= 1 else start + (m - start + 1) // 2
        copy_rows(slots[top], slots[top + 1])
        for j in range(start, target):
            replay(stepper, circuit, slots[top + 1], ONE, hs[j:j + 1], ys1, rs1, ss1, slots[top + 1])
        top += 1
        slot_step[top] = target
    return top


@njit
def _inject_loss(lam, dl_du, save_step, step):
    """lam += dL/du of every saved state that was taken after ``step`` steps."""
    for k in range(save_step.shape[0]):
        if save_step[k] == step:
            lam += dl_du[k]


@njit
def _slot_count(every):
    """Slots the bisection of a segment of ``every`` steps can need: the checkpoint, then one per
    halving, plus one."""
    k = 2
    span = max(1, every)
    while span > 1:
        span = (span + 1) // 2
        k += 1
    return k


@njit
def adjoint_run(stepper, tape, circuit, tauinv_step, grads):
    """The discrete adjoint of ``run``, step by step in reverse: take the state before step m (stored
    in the checkpoints of ``tape``, a :data:`Tape`, or brought back from the one below it by
    ``_state_at``), replay that one step keeping its stages (one-stage methods, euler and exp_euler,
    replay nothing: their stage point is the state, their activity one pass) and backpropagate
    through it with ``adjoint_step``. dL/du of the saved states, ``dl_du[k]``, enters after the step
    that produced state save_step[k]. Replays reproduce the forward bit for bit and the backward of a
    step reads only its state, so the gradient is bit-identical for every number of checkpoints.
    Memory: the checkpoints plus O(log ckpt_every) states. Results into ``grads`` (a :data:`Grads`):
    gflat (packed weights), gdrive (n, batch), gtau (n,), lam0 = dL/du0. ``tauinv_step`` is
    1/(tau + i eps), the complex step that gives d/dtau of the exponential coefficients."""
    family, method, a, bw = stepper.family, stepper.method, stepper.a, stepper.bw
    hs, nsteps, ckpt, ckpt_every, save_step, dl_du = tape
    drive, wbuf, conn, layer_off, layer_act, tauinv, tau = circuit
    gflat, gdrive, gtau, lam0 = grads
    n, nb = drive.shape
    s = bw.shape[0]
    one_stage = s == 1
    dtype = drive.dtype
    seg = max(1, ckpt_every)
    ys = np.empty((1, s, n, nb), dtype)
    rs = np.empty((1, s, n, nb), dtype)
    ss = np.empty((1, s, n, nb), dtype)
    u_end = np.empty((n, nb), dtype)
    slots = np.empty((_slot_count(seg) if seg > 1 else 0, n, nb), dtype)
    slot_step = np.zeros(slots.shape[0], np.int64)
    alpha = np.zeros((s + 1, n), tauinv.dtype)
    coef = np.zeros((s + 1, s, n), tauinv.dtype)
    calpha = np.zeros((s + 1, n), tauinv_step.dtype)
    ccoef = np.zeros((s + 1, s, n), tauinv_step.dtype)
    dalpha = np.zeros((s + 1, n))
    dcoef = np.zeros((s + 1, s, n))
    eps = 1e-30
    sbar = np.empty((s, n, nb), dtype)
    w = np.empty((n, nb), dtype)
    ybar = np.empty((n, nb), dtype)
    rows = np.empty((2, nb), dtype)
    tmp = np.empty((max(1, n), nb), dtype)
    gscratch = np.empty_like(gflat)
    kappa = np.empty(n)
    lam = np.zeros((n, nb), dtype)
    lam_prev = np.empty((n, nb), dtype)
    _inject_loss(lam, dl_du, save_step, nsteps)
    h_coef = -1.0
    top = ZERO  # NOT_LITERAL
    nseg = (nsteps + seg - 1) // seg
    for c in range(nseg - 1, -1, -1):
        if seg > 1:
            copy_rows(ckpt[c], slots[0])
            slot_step[0] = c * seg
            top = ZERO  # NOT_LITERAL
        for m in range(min(c * seg + seg, nsteps) - 1, c * seg - 1, -1):
            if seg > 1:
                top = _state_at(m, top, slot_step, slots, stepper, circuit, hs, ys, rs, ss)
            u = slots[top] if seg > 1 else ckpt[c]  # every state stored: read in place
            if one_stage:
                activate(u, layer_off, layer_act, rs[0, 0])
            else:
                replay(stepper, circuit, u, ONE, hs[m:m + 1], ys, rs, ss, u_end)
            h = hs[m]
            if h != h_coef:
                coefficients(family, method, h, a, bw, tauinv, alpha, coef)
                if family == EXPONENTIAL:
                    coefficients(family, method, h, a, bw, tauinv_step, calpha, ccoef)
                    # tauinv_step carries +i eps on tau, so Im(coefficient)/eps = d coefficient/d tau
                    for q in range(s + 1):
                        for p in range(n):
                            dalpha[q, p] = calpha[q, p].imag / eps
                            for j in range(s):
                                dcoef[q, j, p] = ccoef[q, j, p].imag / eps
                h_coef = h
            adjoint_step(family, s, alpha, coef, dalpha, dcoef, tauinv, lam, u, ys[0], rs[0], ss[0],
                         not one_stage, drive, wbuf, conn, layer_off, *layer_act, sbar, w, ybar, rows, tmp,
                         gflat, gscratch, gdrive, gtau, kappa, lam_prev)
            lam, lam_prev = lam_prev, lam
            _inject_loss(lam, dl_du, save_step, m)
    copy_rows(lam, lam0)


# --------------------------------------------------------------------------------------------
# Continuous adjoint with exponential integration (docs/equations.md, section 3.3, the AdjointDPM idea)
# --------------------------------------------------------------------------------------------
@njit
def _adjoint_drive(lam, u, tauinv, tau, wbuf, conn, layer_off, layer_act, tmp, w, dprime, out):
    """out = M(lam; u) = tau rho'(u) W^T (lam / tau): the adjoint circuit written like the forward one,
    tau dlam/ds = -lam + M in reverse time s = T - t, so that its leak is integrated exactly too."""
    _scale_rows(tauinv, lam, w)
    weights_transpose_times(w, wbuf, conn, layer_off, tmp, out)
    activate_prime(u, layer_off, layer_act, dprime)
    out *= dprime
    for p in range(out.shape[0]):
        tp = tau[p]
        for b in range(out.shape[1]):
            out[p, b] *= tp


@njit
def _quadrature(w, u, layer_off, layer_act, conn, r, gscratch, gflat, gdrive):
    """Add (df/dtheta)^T w for the weights and the drive at one time point, f = F/tau, w a
    quadrature weight times lam/tau (W: (lam/tau)_post rho(u)_pre^T; drive: lam/tau)."""
    activate(u, layer_off, layer_act, r)
    weight_vjp(w, r, conn, gscratch)
    gflat += gscratch
    gdrive += w


@njit
def _tau_quadrature(w_right, w_left, u_right, u_left, h, gtau):
    """Add the cell's int (df/dtau)^T lam dt = -int (du/dt) lam/tau dt, du/dt taken as the cell's
    mean slope (second order, like the rule it replaces). Not F(u)/tau at the cell's ends: at a
    stiff neuron the discrete state sits O(h) off the slow manifold, so F/tau there is O(h/tau)
    instead of O(1) (measured: dL/dtau wrong by 4e3 relative at h/tau = 1e5)."""
    for p in range(gtau.shape[0]):
        acc = 0.0 * w_right[p, 0]
        for b in range(w_right.shape[1]):
            acc -= (w_right[p, b] + w_left[p, b]) * (u_right[p, b] - u_left[p, b])
        gtau[p] += acc / h


@njit
def _exp_weights(h, tauinv, g, q1, q2):
    """Per neuron g = h/tau, q1 = g phi_1(-g) = 1 - e^-g and q2 = g phi_2(-g)."""
    for p in range(tauinv.shape[0]):
        g[p] = h * tauinv[p]
        q1[p] = g[p] * phi(ONE, -g[p])
        q2[p] = g[p] * phi(TWO, -g[p])


@njit
def _cell_weights(lam, m0, m1, g, q1, q2, w_right, w_left):
    """Weights of the exponential quadrature of int lam/tau a ds over one backward cell of reverse
    time s in [0, h] for any a linear in s: int = sum (w_right a(0) + w_left a(h)), exact when lam
    follows the backward method's own interpolant, tau lam' = -lam + M(s) with M linear from m0 at
    s = 0 to m1 at s = h (m1 = m0 for ETD1). Then lam = P(s) + C e^{-s/tau}, P linear with
    P(0) = m0 - tau M', P(h) = m1 - tau M', C = lam(0) - P(0), and
        int P a / tau = g/6 (2 P(0) a(0) + P(0) a(h) + P(h) a(0) + 2 P(h) a(h)),
        int C e^{-s/tau} a / tau = C (g phi_2 a(0) + g (phi_1 - phi_2) a(h)),  phi_k at -g.
    The trapezoidal rule would weight lam(0)/tau by h/2: a transient of lam of width tau << h (a
    loss injected at a stiff neuron) would count g/2 times instead of once."""
    for p in range(lam.shape[0]):
        gp, c1, c2 = g[p], q1[p], q2[p]
        for b in range(lam.shape[1]):
            slope = (m1[p, b] - m0[p, b]) / gp  # tau M' (bounded: m1 - m0 is O(h) where g is small)
            pr = m0[p, b] - slope
            pl = m1[p, b] - slope
            c = lam[p, b] - pr
            w_right[p, b] = gp * (2.0 * pr + pl) / 6.0 + c * c2
            w_left[p, b] = gp * (pr + 2.0 * pl) / 6.0 + c * (c1 - c2)


# The backward cells at a transient, in units of the smallest tau: GRADE_UNIFORM cells of
# GRADE_CELL (over 20 tau the transient decays to e^-20), then doubling. The transient of a stiff
# neuron enters the other neurons' adjoint through M, which ETD2RK takes as linear over a cell: the
# error of a cell of width d is ~(d/tau)^2/12 of what the transient carries.
GRADE_CELL = 0.1
GRADE_UNIFORM = 200


@njit
def _graded_cells(piece, finest, toward_left, out, k):
    """Cut a piece of the step into GRADE_UNIFORM cells of size ``finest`` at one end
    (``toward_left``: the piece's start), then cells doubling in size; written to out[k:] in
    forward time order; returns the new count."""
    j = 0
    total = 0.0
    size = finest
    while total + 3.0 * size <= piece:  # the rest is at least twice the last cell
        out[k + j] = size
        total += size
        if j >= GRADE_UNIFORM:
            size *= 2.0
        j += 1
    out[k + j] = piece - total
    j += 1
    if not toward_left:
        for i in range(j // 2):
            out[k + i], out[k + j - 1 - i] = out[k + j - 1 - i], out[k + i]
    return k + j


@njit
def _substep_sizes(h, substeps, finest, left, right, out):
    """The backward cells of one forward step of size h, in forward time order: ``substeps`` equal
    pieces; where a piece is longer than tau_min (= finest/GRADE_CELL), the first is graded
    down to ``finest`` at the step's start if ``left`` (the forward transient from u0 at t0) and
    the last at its end if ``right`` (the transient of lam after a loss injected there), so that
    transients of width tau_min are resolved. Returns the number of cells."""
    pieces = substeps
    if left and right and substeps == 1 and h * GRADE_CELL > finest:
        pieces = 2  # one piece for each transient
    hp = h / pieces
    stiff = hp * GRADE_CELL > finest
    k = ZERO  # NOT_LITERAL
    for i in range(pieces):
        if stiff and left and i == 0:
            k = _graded_cells(hp, finest, YES, out, k)
        elif stiff and right and i == pieces - 1:
            k = _graded_cells(hp, finest, NO, out, k)
        else:
            out[k] = hp
            k += 1
    return k


@njit
def _injected(save_step, step):
    """Whether a loss enters lam at the state after ``step`` steps."""
    for k in range(save_step.shape[0]):
        if save_step[k] == step:
            return True
    return False


@njit
def _step_grids(hs, nsteps, substeps, finest, save_step):
    """Room for one step's cell sizes (a graded piece has at most GRADE_UNIFORM + log2(piece/finest)
    + 2 cells) and the largest number of cells any step has (to size the replayed path)."""
    hmax = np.max(hs[:nsteps]) if nsteps > 0 else 0.0
    sizes = np.empty(max(substeps, 2) + 2 * (GRADE_UNIFORM + int(math.log2(max(1.0, hmax / finest))) + 3))
    cells = 1
    for m in range(nsteps):
        cells = max(cells, _substep_sizes(hs[m], substeps, finest, m == 0, _injected(save_step, m + 1),
                                          sizes))
    return sizes, cells


@njit
def continuous_adjoint_run(stepper, tape, back_method, substeps, circuit, grads):
    """Integrate the adjoint ODE dlam/dt = -(df/du)^T lam backwards from lam(T) = dL/du(T), with
    dL/dtheta = int_0^T (df/dtheta)^T lam dt, f = F/tau. The adjoint is stepped in reverse time by the
    exponential method ``back_method`` (ETD1 or ETD2RK of ``coefficients``: the leak -lam/tau exactly,
    M = tau rho'(u) W^T(lam/tau) by quadrature), on the forward grid refined ``substeps`` times and,
    where h > tau_min, graded at the transients (``_substep_sizes``); the parameter integral by the
    exponential quadrature of ``_cell_weights`` on that grid. The forward state is never
    integrated backwards: it is re-anchored at the stored forward states (checkpoints every
    ckpt_every steps, states in between brought back by ``_state_at``) and, inside a forward step,
    re-integrated forward from its start with the forward method on the same cells. Arguments and
    results as for ``adjoint_run``."""
    a, bw = stepper.a, stepper.bw
    hs, nsteps, ckpt, ckpt_every, save_step, dl_du = tape
    drive, wbuf, conn, layer_off, layer_act, tauinv, tau = circuit
    gflat, gdrive, gtau, lam0 = grads
    n, nb = drive.shape
    s = bw.shape[0]
    dtype = drive.dtype
    seg = max(1, ckpt_every)
    finest = GRADE_CELL / np.max(np.abs(tauinv)) if n > 0 else np.inf
    ys1 = np.empty((1, s, n, nb), dtype)
    rs1 = np.empty_like(ys1)
    ss1 = np.empty_like(ys1)
    slots = np.empty((_slot_count(seg), n, nb), dtype)
    slot_step = np.zeros(slots.shape[0], np.int64)
    sub_h, cells = _step_grids(hs, nsteps, substeps, finest, save_step)
    path = np.empty((cells + 1, n, nb), dtype)  # the states at the cell ends (stages not kept)
    sb = 2 if back_method == ETD2RK else 1
    alpha = np.zeros((sb + 1, n), tauinv.dtype)
    coef = np.zeros((sb + 1, sb, n), tauinv.dtype)
    g = np.empty(n, tauinv.dtype)
    q1 = np.empty_like(g)
    q2 = np.empty_like(g)
    lam = np.zeros((n, nb), dtype)
    mid = np.empty_like(lam)
    m0 = np.empty_like(lam)
    m1 = np.empty_like(lam)
    w = np.empty_like(lam)
    w_right = np.empty_like(lam)
    w_left = np.empty_like(lam)
    r = np.empty_like(lam)
    dprime = np.empty_like(lam)
    tmp = np.empty((max(1, n), nb), dtype)
    gscratch = np.empty_like(gflat)
    _inject_loss(lam, dl_du, save_step, nsteps)
    h_coef = -1.0
    nseg = (nsteps + seg - 1) // seg
    for c in range(nseg - 1, -1, -1):
        copy_rows(ckpt[c], slots[0])
        slot_step[0] = c * seg
        top = ZERO  # NOT_LITERAL
        for m in range(min(c * seg + seg, nsteps) - 1, c * seg - 1, -1):
            top = _state_at(m, top, slot_step, slots, stepper, circuit, hs, ys1, rs1, ss1)
            count = _substep_sizes(hs[m], substeps, finest, m == 0, _injected(save_step, m + 1), sub_h)
            copy_rows(slots[top], path[0])
            for q in range(count):
                replay(stepper, circuit, path[q], ONE, sub_h[q:q + 1], ys1, rs1, ss1, path[q + 1])
            for q in range(count - 1, -1, -1):
                hsub = sub_h[q]
                if hsub != h_coef:
                    coefficients(np.int64(EXPONENTIAL), back_method, hsub, a, bw, tauinv, alpha, coef)  # NOT_LITERAL
                    _exp_weights(hsub, tauinv, g, q1, q2)
                    h_coef = hsub
                u_right = path[q + 1]
                u_left = path[q]
                _adjoint_drive(lam, u_right, tauinv, tau, wbuf, conn, layer_off, layer_act, tmp, w,
                               dprime, m0)
                # stage 1 (the ETD1 step, or ETD2RK's predictor): alpha[1] lam + coef[1, 0] M0
                for p in range(n):
                    e1, c1 = alpha[1, p], coef[1, 0, p]
                    for b in range(nb):
                        mid[p, b] = e1 * lam[p, b] + c1 * m0[p, b]
                if back_method == ETD2RK:
                    _adjoint_drive(mid, u_left, tauinv, tau, wbuf, conn, layer_off, layer_act, tmp,
                                   w, dprime, m1)
                else:
                    copy_rows(m0, m1)
                _cell_weights(lam, m0, m1, g, q1, q2, w_right, w_left)
                _quadrature(w_right, u_right, layer_off, layer_act, conn, r, gscratch, gflat, gdrive)
                _quadrature(w_left, u_left, layer_off, layer_act, conn, r, gscratch, gflat, gdrive)
                _tau_quadrature(w_right, w_left, u_right, u_left, hsub, gtau)
                if back_method == ETD2RK:
                    for p in range(n):
                        e2, c0, c1 = alpha[2, p], coef[2, 0, p], coef[2, 1, p]
                        for b in range(nb):
                            lam[p, b] = e2 * lam[p, b] + c0 * m0[p, b] + c1 * m1[p, b]
                else:
                    copy_rows(mid, lam)
            _inject_loss(lam, dl_du, save_step, m)
    copy_rows(lam, lam0)
