"""Complex states (holomorphic EP) against real weights: the engine keeps a real network's weights real
and multiplies the complex state's real view (``_kernels.as_real``); the results must be those of the
promoted complex weights (the previous zgemm path) up to rounding.

Tolerance: 1e-14 of the largest entry of the reference. The real GEMM on the interleaved view sums the
same products W_ij Re z_j and W_ij Im z_j as zgemm with Im W = 0, only in another order (and without
zgemm's 0 * Im z terms), so the two agree to a few ulps of the sums; measured: 0 against the promoted
products (OpenBLAS), 1.8e-16 against numpy's dense product.
"""

import dataclasses

import numpy as np
import pytest

import substrate as S
from substrate import _kernels as K

RTOL = 1e-14
BATCH = 5


def network(dtype="float64"):
    """Every kind of connection the products handle: forward, independent feedback, masked lateral,
    a loop from the output to the first hidden layer, so that several connections feed one layer (the
    ``tmp`` path) and a layer is fed by none in W^T (x -> h1 only; h1 is fed in W)."""
    return S.Network.layered([6, 9, 7, 4], np.random.default_rng(0), feedback="independent",
                             asymmetry_angle=60.0, lateral=True, loop=True, dtype=dtype)


def complex_state(rng, shape):
    return np.ascontiguousarray(rng.standard_normal(shape) + 1j * rng.standard_normal(shape))


def relative_error(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_real_network_packs_real_weights_for_complex_states():
    """No complex copy of the weights: the packed buffer a complex128 state runs with is the real
    float64 one, bit for bit the buffer of real states; a complex network keeps complex weights."""
    net = network()
    real, cplx = net.pack(np.float64), net.pack(np.complex128)
    assert cplx.wbuf.dtype == np.float64
    np.testing.assert_array_equal(cplx.wbuf, real.wbuf)
    assert cplx.bias.dtype == np.complex128  # the drive is in the states' dtype
    vf = S.VectorField(net, np.ones((BATCH, 6)), dtype="complex128")
    assert vf.circuit.wbuf.dtype == np.float64 and vf.drive.dtype == np.complex128
    assert network("float32").pack(np.float32).wbuf.dtype == np.float32
    zw = S.Network([S.Layer("a", 3)], [S.Connection("a", "a", np.full((3, 3), 0.1 + 0.2j))])
    assert zw.pack(np.complex128).wbuf.dtype == np.complex128


@pytest.mark.parametrize("transpose", [False, True], ids=["W", "W^T"])
def test_complex_products_equal_promoted_products(transpose):
    """W z and W^T z of complex z with the real weights equal those with the weights promoted to
    complex128 (to RTOL) and the dense product."""
    net = network()
    p = net.pack(np.complex128)
    rng = np.random.default_rng(1)
    z = complex_state(rng, (p.n, BATCH))
    rows = max(int(v) for v in p.conn[:, [2, 4]].ravel())
    kernel = K.weights_transpose_times if transpose else K.weights_times
    got, want = np.full_like(z, np.nan), np.full_like(z, np.nan)  # NaN: every entry must be written
    kernel(z, p.wbuf, p.conn, p.layer_off, np.empty((rows, BATCH), complex), got)
    kernel(z, p.wbuf.astype(np.complex128), p.conn, p.layer_off, np.empty((rows, BATCH), complex), want)
    assert np.all(np.isfinite(want)) and np.max(np.abs(want.imag)) > 0.1
    assert relative_error(got, want) <= RTOL
    W = p.dense()
    assert relative_error(got, (W.T if transpose else W) @ z) <= RTOL


def test_complex_field_and_derivatives_equal_promoted():
    """F, J v and J^T w of the kernels with real weights equal the promoted-weight kernels (to RTOL)."""
    net = network()
    p = net.pack(np.complex128)
    rng = np.random.default_rng(2)
    u, v = complex_state(rng, (p.n, BATCH)), complex_state(rng, (p.n, BATCH))
    drive = complex_state(rng, (p.n, BATCH))
    tmp = np.empty((p.n, BATCH), complex)
    outs = []
    for wbuf in (p.wbuf, p.wbuf.astype(np.complex128)):
        f, jv, jtw, scratch = (np.empty_like(u) for _ in range(4))
        K.field(u, drive, wbuf, p.conn, p.layer_off, p.layer_act, tmp, scratch, f)
        K.jvp(u, v, wbuf, p.conn, p.layer_off, p.layer_act, tmp, scratch, jv)
        K.vjp(u, v, wbuf, p.conn, p.layer_off, p.layer_act, tmp, scratch, jtw)
        outs.append((f, jv, jtw))
    for got, want in zip(*outs):
        assert relative_error(got, want) <= RTOL


class Promoted(S.Network):
    """The same circuit with its weights promoted to the states' dtype when packed (the old path)."""

    def pack(self, dtype):
        p = super().pack(dtype)
        return dataclasses.replace(p, wbuf=p.wbuf.astype(dtype))


def test_complex_nudged_phase_equals_promoted_weights():
    """A whole nudged complex phase (holomorphic EP's: ``integrate`` with an imaginary teaching
    current, through the stepping kernel) with the real weights ends where the same phase ends with
    the weights promoted, to RTOL."""
    net = network()
    promoted = Promoted(net.layers, net.connections, net.inputs)
    assert promoted.pack(np.complex128).wbuf.dtype == np.complex128
    x = np.random.default_rng(3).random((BATCH, 6))
    nudge = S.Nudge(S.Cost("y"), 0.3j, np.eye(4)[np.arange(BATCH) % 4])
    free = S.relax(net, x, method="exp_euler", tol=1e-10)
    ends = [S.integrate(m, x, t_span=(0.0, 8.0), method="rk4", dt=0.25, u0=free.u, nudge=nudge,
                        dtype="complex128").u[-1] for m in (net, promoted)]
    assert np.max(np.abs(ends[0].imag)) > 1e-3  # the imaginary nudge moved the state off the real axis
    assert relative_error(*ends) <= RTOL


@pytest.mark.parametrize("modulus, diverged", [(0.85, False), (1.06, True)])
def test_complex_blowup_bound_is_on_the_modulus(modulus, diverged):
    """The blow-up check of a complex state compares |z| itself with ``blowup``: z = m e^{i pi/4} has
    |Re z| + |Im z| = 1.41 m > 1 in both cases (the cheap bound cannot decide) and |Re z|, |Im z| < 1,
    so only the exact modulus tells 0.85 (kept) from 1.06 (diverged)."""
    net = S.Network([S.Layer("a", 2, activation="identity")], [S.Connection("a", "a", np.zeros((2, 2)))])
    u0 = np.full((1, 2), modulus * np.exp(0.25j * np.pi))
    sol = S.integrate(net, u0=u0, t_span=(0.0, 1e-9), method="euler", dt=1e-9, blowup=1.0,
                      dtype="complex128", on_failure="return")
    assert sol.status == ("diverged" if diverged else "success")


def test_complex_relaxation_residual_is_the_exact_modulus():
    """The residual ``relax`` reports for complex states is max_i |F_i| with the exact modulus (the
    kernel skips the modulus only where |Re| + |Im| already bounds it by the running max), equal to
    numpy's |F| at the final state."""
    net = network()
    x = np.random.default_rng(4).random((BATCH, 6))
    nudge = S.Nudge(S.Cost("y"), 0.2 + 0.3j, np.eye(4)[np.arange(BATCH) % 4])
    sol = S.relax(net, x, method="exp_euler", tol=1e-9, nudge=nudge, dtype="complex128")
    f = sol.field(sol.u) + nudge.current(net, sol.u)
    assert np.max(np.abs(sol.u.imag)) > 1e-3 and np.all(sol.residual <= 1e-9)
    # rtol: F is O(1) terms cancelling to 1e-9, so numpy's rounding differs by ~1e-16/1e-9 relative; a
    # modulus taken as |Re| + |Im| would be off by up to 41%
    np.testing.assert_allclose(sol.residual, np.max(np.abs(f), axis=1), rtol=1e-4, atol=0)
