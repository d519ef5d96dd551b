"""The vectorisable tanh and complex exp of substrate/_kernels.py against libm and NumPy over their whole
range, the complex activation rows built on them, and a check that the activation loops vectorise."""

import math
import re

import numpy as np
import pytest
from numba import njit

from substrate import _kernels as K
from substrate import activations

EPS = 2.0 ** -52
TANH = np.array([K.TANH])
ONE_ROW = np.array([0, 1])


def _rows(x, code, dtype):
    """rho and rho' of the values x through the compiled (vectorised) row loops."""
    u = np.asarray(x, dtype=dtype)[None, :]
    r, d = np.empty_like(u), np.empty_like(u)
    K.activate(u, ONE_ROW, K.layer_activations([code], dtype), r)
    K.activate_prime(u, ONE_ROW, K.layer_activations([code], dtype), d)
    return r[0], d[0]


def _libm(f, x, dtype=np.float64):
    """f of every value by Python's math module, i.e. the C library's, in float64, then cast."""
    return np.frompyfunc(f, 1, 1)(np.asarray(x, dtype=np.float64)).astype(np.float64).astype(dtype)


def _tanh_grid(big):
    rng = np.random.default_rng(0)
    tiny = np.geomspace(5e-324, 1.0, 20_000)
    return np.concatenate([
        np.linspace(-20.0, 20.0, 400_001),  # the whole range where tanh is not +-1
        rng.uniform(-1.0, 1.0, 100_000),
        np.linspace(0.55, 0.7, 10_001), -np.linspace(0.55, 0.7, 10_001),  # around the switch at 0.625
        tiny, -tiny,  # near 0, subnormals included
        np.geomspace(20.0, big, 1000), -np.geomspace(20.0, big, 1000),
    ])


def test_tanh_float64_within_three_ulp_of_libm():
    """The branch-free tanh (Cephes's rational form below |x| = 0.625, 1 - 2/(e^2|x| + 1) above) is within
    3 ulp of the C library's tanh over the whole line (measured: 2), keeps the sign of -0, gives +-1 at
    +-inf and NaN at NaN, in the vectorised row and as a scalar; rho' = 1 - t^2 from the same t."""
    x = _tanh_grid(1e308)
    r, d = _rows(x, K.TANH, np.float64)
    ref = _libm(math.tanh, x)
    np.testing.assert_array_max_ulp(r, ref, maxulp=3)
    np.testing.assert_array_equal(d, 1.0 - r * r)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, -5e-324])
    r, _ = _rows(special, K.TANH, np.float64)
    np.testing.assert_array_equal(r, [0.0, -0.0, 1.0, -1.0, np.nan, 5e-324, -5e-324])
    assert np.signbit(r[1]) and not np.signbit(r[0])
    scalar = np.array([K._tanh_f64(v) for v in x[::97]])  # the scalar form is the same function
    np.testing.assert_array_equal(scalar, _rows(x[::97], K.TANH, np.float64)[0])


def _float32_line(stride):
    """Every stride-th float32 of [0, 9.3] (tanh rounds to 1 beyond 9.011) by bit pattern, negated too,
    and float32 bit patterns drawn uniformly, which cover every binade: subnormals up to 3.4e38."""
    grid = np.arange(0, int(np.float32(9.3).view(np.int32)), stride, dtype=np.int32).view(np.float32)
    bits = np.random.default_rng(1).integers(0, 2 ** 31 - 2 ** 23, 400_000, dtype=np.int32)  # finite
    rand = bits.view(np.float32)
    return np.concatenate([grid, -grid, rand, -rand])


def test_tanh_float32_within_two_float32_ulp():
    """The float32 tanh (E/(E + 2), E = e^{2|x|} - 1 by a minimax polynomial, all in float32) stays
    within 2 float32 ulp of libm's tanh rounded to float32 over the whole float32 line, subnormals and
    the largest floats included (measured: 2, on every one of the 1.09e9 float32 in [0, 9.3]; 7.6% of
    them 1 ulp, 0.06% 2 ulp; numpy's float32 tanh: 1), keeps the sign of -0, is exactly +-1 from 9.1 on
    and at +-inf, NaN at NaN; rho' = 1 - t^2 from the same t."""
    x = _float32_line(997)
    r, d = _rows(x, K.TANH, np.float32)
    assert r.dtype == np.float32
    np.testing.assert_array_max_ulp(r, _libm(math.tanh, x, np.float32), maxulp=2)
    assert np.all(np.abs(r) <= 1.0)
    np.testing.assert_array_equal(d, np.float32(1.0) - r * r)
    x = _tanh_grid(3e38).astype(np.float32)  # the float64 test's grid: dense on [-20, 20], near 0, huge
    np.testing.assert_array_max_ulp(_rows(x, K.TANH, np.float32)[0], _libm(math.tanh, x, np.float32), maxulp=2)
    tiny, big = np.float32(1e-45), np.finfo(np.float32).max
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, tiny, -tiny, big, -big, 9.1, -9.1], dtype=np.float32)
    r, _ = _rows(special, K.TANH, np.float32)
    np.testing.assert_array_equal(r, np.array([0.0, -0.0, 1.0, -1.0, np.nan, tiny, -tiny, 1.0, -1.0, 1.0, -1.0],
                                              dtype=np.float32))
    assert np.signbit(r[1]) and not np.signbit(r[0])
    scalar = np.array([K._tanh_f32(v) for v in x[::97]], dtype=np.float32)  # the scalar form is the same function
    np.testing.assert_array_equal(scalar, _rows(x[::97], K.TANH, np.float32)[0])


@njit
def _exp_loop(z, out):
    for i in range(z.shape[0]):
        out[i] = K.fast_exp(z[i])


def _cexp(z):
    out = np.empty_like(z)
    _exp_loop(z, out)
    return out


def test_complex_exp_within_three_ulp_of_its_modulus():
    """fast_exp of a complex z = e^x (cos y + i sin y) with Cody-Waite's reduction of y modulo pi/2 and
    fdlibm's sin/cos polynomials: |error| <= 3 eps |e^z| (eps = 2^-52; measured 2.6) against np.exp
    for x in [-700, 700] and |y| up to 1e6, including y within 1e-12 of multiples of pi/2 (where
    the reduction cancels); a NaN or infinite part gives NaN (np.exp: NaN or inf)."""
    rng = np.random.default_rng(3)
    n = 300_000
    x = rng.uniform(-700.0, 700.0, n)
    k = np.arange(-4000, 4000) * (np.pi / 2)
    for y in (rng.uniform(-4.0, 4.0, n), rng.uniform(-1e3, 1e3, n), rng.uniform(-1e6, 1e6, n),
              np.concatenate([k, k + 1e-12, k - 1e-9, k + 1e-5] * 10)[:n]):
        z = x[:y.size] + 1j * y
        ref = np.exp(z)
        assert np.max(np.abs(_cexp(z) - ref) / np.abs(ref)) <= 3 * EPS
    z = np.array([0j, 1j * np.pi, complex(np.nan, 1.0), complex(1.0, np.nan), complex(0.0, np.inf)])
    got = _cexp(z)
    assert got[0] == 1.0 and abs(got[1] + 1.0) <= EPS
    assert np.isnan(got[2:].real).all() and np.isnan(got[2:].imag).all()


@pytest.mark.parametrize("name", ["logistic", "tanh", "dsilu"])
def test_complex_rows_match_numpy(name):
    """The complex logistic, tanh and dsilu rows (fast_exp's complex exp, a branch-free division, the
    exponent taken on the half-plane where |e| <= 1) against NumPy's formulas for Re u in [-10, 10],
    |Im u| <= 0.7 (clear of the poles at Im 4u = pi and Im u = pi/2): |error| <= 16 eps max(1, |ref|)
    (measured 14; the references' own rounding is of that size: dsilu sums terms of size |u|, and
    rho' = 1 - t^2 or s(1 - s) cancels where it is small, so a relative bound would not hold)."""
    rng = np.random.default_rng(4)
    u = rng.uniform(-10.0, 10.0, 200_000) + 1j * rng.uniform(-0.7, 0.7, 200_000)
    r, d = _rows(u, activations.CODES[name], np.complex128)
    for got, ref in ((r, activations.rho(name, u)), (d, activations.rho_prime(name, u))):
        assert np.all(np.abs(got - ref) <= 16 * EPS * np.maximum(1.0, np.abs(ref)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.complex128])
def test_activation_loops_vectorise(dtype):
    """Every activation row loop compiles to vector instructions: the LLVM IR of the rows (rho and rho',
    every code) holds vectors of the element type and calls neither libm's tanh, exp, sin, cos nor a
    kernel helper left uninlined (either keeps a loop scalar: the dsilu rows were a call to _dsilu).
    (The vector width depends on the CPU: <8 x double> with AVX-512.)"""

    @njit(error_model="numpy")
    def probe(code, y, r, d):  # a fresh, uncached function: Numba shows the LLVM IR of those only
        K.rho_row(code, y, r, True)  # True: every activation's rows (layer_activations)
        K.rho_prime_row(code, y, d, True)

    y = np.ones(64, dtype=dtype)
    probe(K.TANH, y, np.empty_like(y), np.empty_like(y))
    ir = probe.inspect_llvm(probe.signatures[0])
    assert re.search(r"<\d+ x %s>" % ("float" if dtype == np.float32 else "double"), ir)
    calls = re.findall(r"call [^\n]*@((?:llvm\.)?(?:tanh|exp|sin|cos|sinh|cosh)(?:f|\.f32|\.f64)?)\(", ir)
    calls += re.findall(r"call [^\n]*@\"?(_ZN9substrate\w*)", ir)
    assert calls == []


@pytest.mark.parametrize("name", ["logistic", "dsilu"])
def test_reference_saturates_without_an_overflow_warning(name):
    """exp(-x) overflows to inf far below zero and 1/(1+inf) = 0 is the exact limit: the NumPy reference
    gives 0 (and 1 far above) without the "overflow encountered in exp" warning that flooded long runs."""
    import warnings

    z = np.array([-1e4, -200.0, 200.0, 1e4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = activations.rho(name, z)
    assert r[0] == 0.0 and r[-1] == 1.0
    assert np.all(np.isfinite(r))
