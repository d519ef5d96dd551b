"""The compiled activations against NumPy's reference, including the polynomial exp."""

import ast
import pathlib

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


# ------------------------------------------------------------------------------- literal arguments
KERNEL_MODULES = ["substrate/_kernels.py", "substrate/_blas.py", "substrate/circuits/_kernels.py",
                  "substrate/devices/_update_kernels.py", "substrate/devices/normals.py", "models/_pvrnn_kernels.py"]


def _literal_arguments(source):
    """(caller, callee, argument) of every call from a kernel to a kernel of the same module with an int or bool
    literal argument, written (f(1), f(True)) or a module constant (f(EXPONENTIAL)): Numba types it
    Literal[int](1) and compiles the callee again for it (substrate._kernels.NOT_LITERAL)."""
    tree = ast.parse(source)

    def is_kernel(node):
        return isinstance(node, ast.FunctionDef) and any(
            isinstance(d.func if isinstance(d, ast.Call) else d, ast.Name)
            and (d.func if isinstance(d, ast.Call) else d).id == "njit" for d in node.decorator_list)

    kernels = {f.name: f for f in tree.body if is_kernel(f)}
    constants = set()
    for st in tree.body:
        if isinstance(st, ast.Assign) and len(st.targets) == 1:
            names = st.targets[0].elts if isinstance(st.targets[0], ast.Tuple) else [st.targets[0]]
            values = st.value.elts if isinstance(st.value, ast.Tuple) else [st.value]
            constants |= {n.id for n, v in zip(names, values) if isinstance(n, ast.Name)
                          and isinstance(v, ast.Constant) and isinstance(v.value, (bool, int))}
    found = []
    for name, f in kernels.items():
        for call in (n for n in ast.walk(f) if isinstance(n, ast.Call)):
            if isinstance(call.func, ast.Name) and call.func.id in kernels:
                for a in [*call.args, *(k.value for k in call.keywords)]:
                    if (isinstance(a, ast.Constant) and isinstance(a.value, (bool, int))) or (
                            isinstance(a, ast.Name) and a.id in constants):
                        found.append((name, call.func.id, ast.unparse(a)))
    return found


def test_the_checker_finds_literal_arguments():
    source = """
K = 1
@njit
def callee(a, b):
    return a
@njit(inline="always")
def caller(x):
    return callee(x, 1) + callee(True, x) + callee(K, x) + callee(x, 0.5) + callee(ONE, x) + other(x, 1)
"""
    assert sorted(_literal_arguments(source)) == [("caller", "callee", "1"), ("caller", "callee", "K"),
                                                  ("caller", "callee", "True")]


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernels_pass_no_literal_arguments_to_kernels(module):
    """A second compilation of a callee for a literal costs cold-start time for nothing (measured: the gradient
    warm-up path compiled 52 kernels, 11 of them such duplicates); pass ZERO..THREE, YES, NO instead."""
    source = (pathlib.Path(__file__).resolve().parents[1] / module).read_text()
    assert _literal_arguments(source) == []
