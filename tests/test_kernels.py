"""The compiled activations against NumPy's reference, including the polynomial exp."""

import numpy as np
import pytest

from substrate import _kernels as K
from substrate import activations


def test_fast_exp_within_three_ulp_of_libm():
    """_exp_f64 is e^x = 2^k p(r), with p the degree-12 Taylor polynomial on |r| <= ln2/2: within 3 ulp
    of libm's exp over the whole normal range; the vectorised logistic loop built on it within 4 ulp
    of the formula (exp, one addition, one division); NaN and Inf give NaN."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-708, 709, 200_000), rng.normal(size=100_000), [0.0, -0.0, 1e-300]])
    got = np.array([K._exp_f64(v) for v in x[:3000]])  # scalar calls
    np.testing.assert_array_max_ulp(got, np.exp(x[:3000]), maxulp=3)
    z = x[None, :] / 4.0 + 0.5
    out = np.empty_like(z)
    K.activate(z, np.array([0, 1]), K.layer_activations([K.LOGISTIC], z.dtype), out)
    np.testing.assert_array_max_ulp(out, 1.0 / (1.0 + np.exp(2.0 - 4.0 * z)), maxulp=4)
    for bad in (np.nan, np.inf, -np.inf):
        assert np.isnan(K._exp_f64(bad)) and np.isnan(K._exp_f32(np.float32(bad)))


def test_fast_exp_float32():
    """The float32 polynomial (degree 7) stays within 3 float32 ulp of the float64 exp rounded to
    float32, over the float32 normal range."""
    x = np.random.default_rng(1).uniform(-87, 88, 3000).astype(np.float32)
    got = np.array([K._exp_f32(v) for v in x], dtype=np.float32)
    np.testing.assert_array_max_ulp(got, np.exp(x.astype(np.float64)).astype(np.float32), maxulp=3)


# complex states only for holomorphic activations (the others are rejected before any kernel runs)
CASES = [(n, d) for n in activations.NAMES for d in (np.float32, np.float64, np.complex128)
         if d != np.complex128 or n in activations.HOLOMORPHIC]


@pytest.mark.parametrize("name, dtype", CASES)
def test_activations_match_reference(name, dtype):
    rng = np.random.default_rng(1)
    u = rng.normal(scale=2.0, size=(3, 17)).astype(dtype)
    if dtype == np.complex128:
        u = u + 0.3j * rng.normal(size=u.shape)
    r, d = np.empty_like(u), np.empty_like(u)
    off, code = np.array([0, 3]), K.layer_activations([activations.CODES[name]], dtype)
    K.activate(u, off, code, r)
    K.activate_prime(u, off, code, d)
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(r, activations.rho(name, u), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(d, activations.rho_prime(name, u), rtol=rtol, atol=rtol)
