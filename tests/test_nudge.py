"""The teaching current F + beta dl/dr_L of equilibrium propagation (substrate.nudge,
docs/equations.md, section 4.1): the NumPy cost and its gradient against torch autograd and a complex finite difference,
the compiled current (``_kernels.teach`` inside ``_kernels.run``) against the NumPy reference
``Nudge.current`` for every integrator and dtype, beta = 0 against no nudge, and bad input."""

import numpy as np
import pytest
import torch

import substrate as S
from substrate import SubstrateValueError as Bad
from substrate import _kernels as K
from substrate.activations import rho
from substrate.nudge import Cost, Nudge

BATCH, N_IN, CLASSES = 3, 4, 6
SIZES = [N_IN, 5, 3]  # x -> h1 (5) -> y (3)


# ------------------------------------------------------------------------------------ helpers
def network(rng, activation="logistic", dtype="float64"):
    """A small asymmetric network (independent feedback at 45 degrees, lateral connections)."""
    return S.Network.layered(SIZES, rng, activation=activation, feedback="independent", asymmetry_angle=45.0,
                             lateral=True, dtype=dtype)


def widen(net):
    """The same network with every parameter cast exactly to float64 (reference for float32)."""
    layers = [S.Layer(x.name, x.size, tau=x.tau, activation=x.activation, bias=x.bias.astype(np.float64))
              for x in net.layers]
    conns = [S.Connection(c.pre, c.post, None if c.tied else c.weight.astype(np.float64), mask=c.mask, tied=c.tied)
             for c in net.connections]
    return S.Network(layers, conns, inputs=[S.Input(i.name, i.size) for i in net.inputs])


def cost_and_target(kind, rng, size=3, layer="y"):
    """A cost on layer y with a target: a random target activity for squared error, a random
    distribution over CLASSES (not one-hot, so every term of the gradient is exercised) for
    cross-entropy through a random readout."""
    if kind == "squared_error":
        return Cost(layer), rng.uniform(0.0, 1.0, (BATCH, size))
    w, b = rng.normal(size=(CLASSES, size)), rng.normal(size=CLASSES)
    p = rng.uniform(0.1, 1.0, (BATCH, CLASSES))
    return Cost(layer, "cross_entropy", w, b), p / p.sum(axis=1, keepdims=True)


def torch_cost(cost, r, y):
    """Per-sample l in torch (float64 or complex128 tensors)."""
    y = torch.as_tensor(y)
    if cost.kind == "squared_error":
        return 0.5 * ((r - y) ** 2).sum(dim=1)
    z = r @ torch.as_tensor(cost.readout_weight).to(r.dtype).T + torch.as_tensor(cost.readout_bias).to(r.dtype)
    if not r.is_complex():
        return -(y * torch.log_softmax(z, dim=1)).sum(dim=1)
    # torch has no complex log_softmax: z - log sum exp(z - m) - m with the real shift m (any shift
    # gives the same principal-branch value while |Im| stays small)
    m = z.real.max(dim=1, keepdim=True).values
    return -(y * (z - m - torch.log(torch.exp(z - m).sum(dim=1, keepdim=True)))).sum(dim=1)


def field_numpy(net, x, u):
    """F(u) = -u + W rho(u) + V x + b, in plain NumPy from the network's own arrays (independent of
    the compiled kernels); u (batch, n), real or complex."""
    out = -u.copy()
    for layer in net.layers:
        out[:, net.slices[layer.name]] += layer.bias
    for c in net.connections:
        post = net.slices[c.post]
        if c.pre in net.inputs_by_name:
            out[:, post] += x @ net.effective_weight(c).T
        else:
            pre = net.slices[c.pre]
            out[:, post] += rho(net.layer(c.pre).activation, u[:, pre]) @ net.effective_weight(c).T
    return out


# ------------------------------------------------------------------------------------ the cost
@pytest.mark.parametrize("kind", ["squared_error", "cross_entropy"])
@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_value_and_grad_matches_torch(kind, scale):
    """l and dl/dr against torch autograd for real activities; scale 300 makes the logits of the
    readout ~1e3, where a softmax without a shift overflows. Tolerance: both sides are float64
    formulas of a few operations on O(1..1e3) numbers, so 1e-12 relative leaves a wide margin."""
    rng = np.random.default_rng(0)
    cost, y = cost_and_target(kind, rng, size=5)
    r = scale * rng.normal(size=(BATCH, 5))
    value, grad = cost.value_and_grad(r, y)
    rt = torch.tensor(r, requires_grad=True)
    lt = torch_cost(cost, rt, y)
    (gt,) = torch.autograd.grad(lt.sum(), rt)  # sample b's l depends on row b only
    assert value.shape == (BATCH,) and grad.shape == r.shape
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, lt.detach().numpy(), rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(grad, gt.numpy(), rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("kind", ["squared_error", "cross_entropy"])
def test_value_and_grad_holomorphic(kind):
    """For complex activities the gradient is the holomorphic derivative (plain transpose, no
    conjugate): the central difference (l(r + s v) - l(r - s v)) / (2 s) along a complex direction v
    equals sum(dl/dr * v) both for a real step s = h and an imaginary one s = i h (the
    Cauchy-Riemann equations: a conjugate (Wirtinger) gradient fails the second). Also the value
    against torch's complex log_softmax. h = 1e-5: truncation O(h^2) ~ 1e-10, rounding
    ~ 1e-16/h ~ 1e-11; tolerance 1e-8 relative to the O(1) directional derivative."""
    rng = np.random.default_rng(1)
    cost, y = cost_and_target(kind, rng, size=5)
    r = rng.normal(size=(BATCH, 5)) + 0.3j * rng.normal(size=(BATCH, 5))
    v = rng.normal(size=r.shape) + 1j * rng.normal(size=r.shape)
    value, grad = cost.value_and_grad(r, y)
    assert value.dtype == np.complex128 and grad.dtype == np.complex128
    directional = np.sum(grad * v, axis=1)
    assert np.all(np.abs(directional) > 1e-2)  # the check below is not vacuous
    h = 1e-5
    for s in (h, 1j * h):
        fd = (cost.value_and_grad(r + s * v, y)[0] - cost.value_and_grad(r - s * v, y)[0]) / (2 * s)
        np.testing.assert_allclose(fd, directional, rtol=1e-8, atol=1e-10)
    # the conjugate gradient would not pass: make sure the test can tell them apart
    assert np.max(np.abs(np.sum(np.conj(grad) * v, axis=1) - directional)) > 1e-3
    np.testing.assert_allclose(value, torch_cost(cost, torch.tensor(r), y).numpy(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ the kernel
CASES = {  # name: (network dtype, state dtype, beta, activation)
    "float64": ("float64", np.float64, 0.7, "logistic"),
    "float32": ("float32", np.float32, 0.7, "logistic"),
    "complex128": ("float64", np.complex128, 0.7 * np.exp(1j * np.pi / 3), "dsilu"),
}


@pytest.mark.parametrize("layer", ["y", "h1"])  # the last layer (rows 5:8) and the first (rows 0:5)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["squared_error", "cross_entropy"])
def test_teach_kernel_matches_reference(case, kind, layer):
    """``_kernels.teach`` (out += beta dl/dr on the nudged rows, fed the kernel arguments that
    ``Nudge.kernel_args`` builds) against ``Nudge.current`` at random states, and nothing written
    outside the layer. Tolerance: float64/complex128 few-ulp (1e-13 on O(1) values); float32: the
    kernel computes in float32 (eps 6e-8) against a float64 reference, 2e-6 covers a softmax over 6
    classes and a 6-term sum."""
    net_dtype, dtype, beta, activation = CASES[case]
    rng = np.random.default_rng(2)
    net = network(rng, activation, net_dtype)
    cost, y = cost_and_target(kind, rng, size=net.layer(layer).size, layer=layer)
    nudge = Nudge(cost, beta, y)
    u = rng.normal(scale=1.5, size=(BATCH, net.n)).astype(dtype)
    if dtype == np.complex128:
        u = u + 0.3j * rng.normal(size=u.shape)
    rt = np.empty((net.n, BATCH), dtype)  # the engine's layout, C order (complex rows are viewed as real)
    K.activate(np.ascontiguousarray(u.T), net.pack(dtype).layer_off, net.pack(dtype).layer_act, rt)
    out = np.zeros_like(rt)
    K.teach(nudge.kernel_args(net, dtype, BATCH), rt, out)
    ref = nudge.current(net, u.astype(np.float64) if dtype == np.float32 else u)
    tol = 2e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out.T, ref, rtol=tol, atol=tol)
    outside = np.ones(net.n, bool)
    outside[net.slices[layer]] = False
    assert np.all(out.T[:, outside] == 0)
    assert np.all(np.abs(ref[:, net.slices[layer]]) > 1e-4)  # the current is really there


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("kind", ["squared_error", "cross_entropy"])
def test_linearised_current_matches_differences(kind, dtype):
    """``Nudge.linearised`` (dC/du v, exact, for the stability check) against central differences of
    ``Nudge.current`` along v (complex states: a complex direction, the derivative holomorphic):
    h = 1e-5 leaves a truncation O(h^2) ~ 1e-10 and rounding ~ 1e-16/h ~ 1e-11 on O(1) values, so
    1e-8 relative to the largest; the current outside the nudged layer does not move."""
    rng = np.random.default_rng(4)
    net = network(rng, "dsilu" if dtype == np.complex128 else "logistic")
    cost, y = cost_and_target(kind, rng)
    nudge = Nudge(cost, 0.7 * np.exp(1j * np.pi / 3) if dtype == np.complex128 else 0.7, y)
    u = rng.normal(scale=1.5, size=(BATCH, net.n)).astype(dtype)
    v = rng.normal(size=u.shape).astype(dtype)
    if dtype == np.complex128:
        u, v = u + 0.3j * rng.normal(size=u.shape), v + 1j * rng.normal(size=u.shape)
    h = 1e-5
    ref = (nudge.current(net, u + h * v) - nudge.current(net, u - h * v)) / (2 * h)
    sl = net.slices["y"]
    got = nudge.linearised(net, np.ascontiguousarray(u.T))(np.ascontiguousarray(v.T[sl]))
    scale = np.max(np.abs(ref))
    assert scale > 1e-2 and got.shape == (3, BATCH)  # (layer size, batch)
    np.testing.assert_allclose(got.T, ref[:, sl], rtol=0, atol=1e-8 * scale)
    outside = np.ones(net.n, bool)
    outside[sl] = False
    assert np.all(ref[:, outside] == 0)


def extreme_logits(dtype):
    """(10 classes, 60 samples) of logits spanning what the softmax's exp meets: O(1), spreads of
    1e2..1e3 (so that z - max z goes far below -708, where libm's exp underflows to 0 and the engine's
    clamps at e^-708 ~ 3e-308), all equal, and (complex) imaginary parts up to 1e5."""
    rng = np.random.default_rng(7)
    scale = np.repeat([1.0, 30.0, 100.0, 400.0, 1000.0, 0.0], 10)
    z = rng.normal(size=(10, 60)) * scale + rng.normal(size=60) * 50.0
    if np.dtype(dtype).kind == "c":
        z = z + 1j * rng.normal(size=(10, 60)) * np.repeat([0.3, 3.0, 30.0, 1e3, 1e4, 1e5], 10)[::-1]
    return z.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.complex128, np.float32])
def test_teach_softmax_exp_against_libm(dtype):
    """The cross-entropy current's softmax (``_kernels.teach``: the engine's exp, ``fast_exp``, not
    libm's) against NumPy's exp at the extremes: W_o = I, b_o = 0 and y = 0 make the current
    beta softmax(z) with the logits z given as the activities. Tolerance per sample, from the exp's
    bounds (3 ulp for float64, 3 eps |e^z| for complex, tests/test_kernels.py and
    tests/test_activations_fast.py) and NumPy's own (1 ulp): an error d e_c <= 4 eps |e_c| moves
    p_c = e_c / S by <= eps K (4 + (4 + 10) |p_c|), K = sum |e_c| / |S| (1 for real logits; for complex
    ones the sum may cancel), so 20 eps K max(1, K). float32 states take the exp in float64 and round
    it: 16 float32 eps."""
    z = extreme_logits(dtype)
    nc, nb = z.shape
    beta = 0.7 * np.exp(0.4j) if np.dtype(dtype).kind == "c" else 0.7
    rdt = np.float32 if dtype == np.float32 else np.float64
    nudge = K.Nudge(K.CROSS_ENTROPY, 0, nc, np.array([beta], dtype), np.zeros((nc, nb), dtype),
                    np.eye(nc, dtype=rdt), np.zeros(nc, rdt), np.empty((nc + 1, nb), dtype))
    out = np.zeros_like(z)
    K.teach(nudge, z, out)
    zw = z.astype(np.complex128 if np.dtype(dtype).kind == "c" else np.float64)
    e = np.exp(zw - zw.real.max(axis=0))
    ref = beta * e / e.sum(axis=0)
    k = np.abs(e).sum(axis=0) / np.abs(e.sum(axis=0))
    if dtype == np.float32:
        tol = np.full(nb, 16 * np.finfo(np.float32).eps * abs(beta))
    else:
        tol = 20 * np.finfo(np.float64).eps * k * np.maximum(1.0, k) * abs(beta)
    assert np.all(np.abs(out - ref) <= tol), np.max(np.abs(out - ref) / tol)
    assert np.all(np.isfinite(out)) and np.min(np.abs(ref).max(axis=0)) >= 0.069  # the largest class: >= |beta| / 10
    assert np.any(np.abs(ref) == 0) or dtype == np.complex128  # libm underflowed somewhere (real cases)
    if np.dtype(dtype).kind == "c":
        assert k.max() > 1.5  # some sums do cancel: the per-sample bound is exercised


@pytest.mark.parametrize("method", list(S.METHODS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["squared_error", "cross_entropy"])
def test_relax_reaches_the_nudged_equilibrium(method, case, kind):
    """Every integrator relaxes F + beta dl/dr to zero as NumPy computes it: F from the network's
    arrays (``field_numpy``) plus ``Nudge.current``. A kernel current that differed from the
    reference (sign, beta, missing conjugation rule, readout transposed) would leave a residual of the
    order of the current itself (checked to be > 1e-2 here), while the relaxation stops at tol.

    float64/complex128: tol 1e-12, and the NumPy residual within 2e-12 (the stopping test is the
    kernel's own evaluation of the same residual; the two evaluations differ by rounding, ~1e-15).
    float32: the kernel's float32 residual cannot go much below 1e-6 (eps 6e-8 times O(10) terms),
    so tol 1e-5, and the exact float64 residual at the returned float32 state is within tol + 1e-5
    (the rounding of one float32 evaluation of F, with a wide margin)."""
    net_dtype, dtype, beta, activation = CASES[case]
    rng = np.random.default_rng(3)
    net = network(rng, activation, net_dtype)
    x = rng.uniform(0.0, 1.0, (BATCH, N_IN))
    cost, y = cost_and_target(kind, rng)
    nudge = Nudge(cost, beta, y)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    sol = S.relax(net, x, method=method, tol=tol, nudge=nudge, dtype=dtype, max_steps=200_000)
    assert sol.ok and sol.u.dtype == dtype and np.all(sol.residual <= tol)
    if dtype == np.float32:
        ref_net, u = widen(net), sol.u.astype(np.float64)
    else:
        ref_net, u = net, sol.u
    current = nudge.current(ref_net, u)
    residual = np.max(np.abs(field_numpy(ref_net, x, u) + current))
    assert residual <= tol + (1e-5 if dtype == np.float32 else 1e-12)
    assert np.max(np.abs(current)) > 1e-2
    if dtype == np.complex128:
        assert np.max(np.abs(sol.u.imag)) > 1e-3  # complex beta really drove complex states
    # the compiled field agrees too (VectorField is the engine's F without the current)
    vf = S.VectorField(ref_net, x, dtype=np.complex128 if dtype == np.complex128 else None)
    assert np.max(np.abs(vf(u) + current)) <= tol + (1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("kind, dtype", [("squared_error", np.float64), ("cross_entropy", np.float64),
                                         ("cross_entropy", np.complex128), ("squared_error", np.complex128)])
def test_integrate_euler_matches_numpy_loop(kind, dtype):
    """integrate(method='euler', nudge=...) at every step against u += dt (F(u) + current(u)) / tau
    written in NumPy, on a network with per-neuron time constants, from a random state. 12 steps of
    O(1) updates: rounding differences (tauinv vs division, summation order) stay ~1e-15, so 1e-12.
    The nudge changes the trajectory by far more than that (checked)."""
    rng = np.random.default_rng(4)
    activation = "dsilu" if dtype == np.complex128 else "tanh"
    h, o = 5, 3
    layers = [S.Layer("h1", h, tau=rng.uniform(0.5, 2.0, h), activation=activation, bias=rng.normal(size=h)),
              S.Layer("y", o, tau=1.3, activation=activation, bias=rng.normal(size=o))]
    conns = [S.Connection("x", "h1", rng.normal(size=(h, N_IN))),
             S.Connection("h1", "y", rng.normal(size=(o, h))),
             S.Connection("y", "h1", rng.normal(size=(h, o))),
             S.Connection("h1", "h1", rng.normal(size=(h, h)), mask=1 - np.eye(h))]
    net = S.Network(layers, conns, inputs=[S.Input("x", N_IN)])
    x = rng.normal(size=(BATCH, N_IN))
    cost, y = cost_and_target(kind, rng, size=o)
    beta = 0.5 * np.exp(0.7j) if dtype == np.complex128 else 0.5
    nudge = Nudge(cost, beta, y)
    u0 = rng.normal(size=(BATCH, net.n)).astype(dtype)
    if dtype == np.complex128:
        u0 = u0 + 0.2j * rng.normal(size=u0.shape)
    dt, steps = 0.05, 12
    t_eval = dt * np.arange(steps + 1)
    sol = S.integrate(net, x, t_span=(0.0, t_eval[-1]), t_eval=t_eval, method="euler", dt=dt, u0=u0,
                      nudge=nudge, dtype=dtype)
    u, free = u0.copy(), u0.copy()
    expected, unnudged = [u.copy()], [u.copy()]
    for _ in range(steps):
        u = u + dt * (field_numpy(net, x, u) + nudge.current(net, u)) / net.tau
        free = free + dt * field_numpy(net, x, free) / net.tau
        expected.append(u.copy())
        unnudged.append(free.copy())
    assert sol.ok and sol.steps == steps
    np.testing.assert_allclose(sol.u, np.array(expected), rtol=1e-12, atol=1e-12)
    assert np.max(np.abs(np.array(expected) - np.array(unnudged))) > 1e-2


@pytest.mark.parametrize("method", ["exp_euler", "rk4", "dopri5"])
@pytest.mark.parametrize("kind", ["squared_error", "cross_entropy"])
def test_beta_zero_is_no_nudge(method, kind):
    """beta = 0 adds exact zeros to N: the relaxation is bit-identical to one without a nudge (same
    state, steps, evaluations, residuals), for fixed and adaptive steps."""
    rng = np.random.default_rng(5)
    net = network(rng)
    x = rng.uniform(0.0, 1.0, (BATCH, N_IN))
    cost, y = cost_and_target(kind, rng)
    a = S.relax(net, x, method=method, tol=1e-10)
    b = S.relax(net, x, method=method, tol=1e-10, nudge=Nudge(cost, 0.0, y))
    assert np.array_equal(a.u, b.u)
    assert (a.steps, a.nfev, a.rejected) == (b.steps, b.nfev, b.rejected)
    assert np.array_equal(a.residual, b.residual) and np.array_equal(a.residual_trace, b.residual_trace)
    # and a nonzero beta does move the equilibrium (so the comparison above can fail)
    c = S.relax(net, x, method=method, tol=1e-10, nudge=Nudge(cost, 0.1, y))
    assert np.max(np.abs(c.u - a.u)) > 1e-4


# ------------------------------------------------------------------------------------ bad input
def _relax_with(make_nudge, dtype=None):
    rng = np.random.default_rng(6)
    net = network(rng)
    x = rng.uniform(0.0, 1.0, (BATCH, N_IN))
    S.relax(net, x, nudge=make_nudge(rng), dtype=dtype)


def _ce(rng, columns=3, bias=CLASSES):
    return Cost("y", "cross_entropy", rng.normal(size=(CLASSES, columns)), rng.normal(size=bias))


ONE_HOT = np.eye(CLASSES)[[0, 2, 5]]


@pytest.mark.parametrize("make_nudge, match", [
    (lambda rng: Nudge(Cost("y"), 0.1, np.zeros((BATCH, 4))),
     r"nudge target has shape \(3, 4\), expected \(batch, 3\)"),
    (lambda rng: Nudge(Cost("y"), 0.1, np.zeros((BATCH + 1, 3))), r"nudge target has shape \(4, 3\)"),
    (lambda rng: Nudge(Cost("y"), 0.1, np.zeros(3)), r"nudge target has shape \(3,\)"),
    (lambda rng: Nudge(_ce(rng), 0.1, np.zeros((BATCH, 3))), r"nudge target has shape .* \(batch, 6\)"),
    (lambda rng: Nudge(Cost("y"), 0.1j, np.zeros((BATCH, 3))), r"complex beta=0\.1j needs complex states"),
    (lambda rng: Nudge(Cost("y"), np.inf, np.zeros((BATCH, 3))), r"beta=inf must be finite"),
    (lambda rng: Nudge(Cost("y"), 0.1, np.full((BATCH, 3), np.nan)), "nudge target contains NaN or Inf"),
    (lambda rng: Nudge(_ce(rng), 0.1, np.where(ONE_HOT == 1, np.inf, 0)), "nudge target contains NaN or Inf"),
    (lambda rng: Nudge(_ce(rng, columns=4), 0.1, ONE_HOT),
     r"readout_weight has 4 columns but layer 'y' has 3 neurons"),
    (lambda rng: "not a nudge", r"nudge must be a substrate.nudge.Nudge, got str"),
    (lambda rng: Cost("y"), r"nudge must be a substrate.nudge.Nudge, got Cost"),
])
def test_bad_nudge_at_relax(make_nudge, match):
    with pytest.raises(Bad, match=match):
        _relax_with(make_nudge)


def test_bad_nudge_at_integrate():
    rng = np.random.default_rng(7)
    net = network(rng)
    x = rng.uniform(0.0, 1.0, (BATCH, N_IN))
    with pytest.raises(Bad, match="nudge must be a substrate.nudge.Nudge"):
        S.integrate(net, x, t_span=(0, 1), dt=0.1, nudge=0.1)
    with pytest.raises(Bad, match="complex beta.*needs complex states"):
        S.integrate(net, x, t_span=(0, 1), dt=0.1, nudge=Nudge(Cost("y"), 1j, np.zeros((BATCH, 3))))
    # the same complex beta is accepted with complex states
    sol = S.integrate(net, x, t_span=(0, 1), dt=0.1, dtype="complex128",
                      nudge=Nudge(Cost("y"), 1j, np.zeros((BATCH, 3))))
    assert sol.ok and np.max(np.abs(sol.u[-1].imag)) > 0


@pytest.mark.parametrize("make_cost, match", [
    (lambda rng: Cost("y", "hinge"), r"cost kind='hinge'; allowed: squared_error, cross_entropy"),
    (lambda rng: Cost("y", "cross_entropy"),
     r"cross_entropy cost needs readout_weight \(C, layer size\) and readout_bias"),
    (lambda rng: Cost("y", "cross_entropy", readout_weight=np.ones((CLASSES, 3))),
     "cross_entropy cost needs readout_weight"),
    (lambda rng: Cost("y", "cross_entropy", readout_bias=np.ones(CLASSES)), "cross_entropy cost needs readout_weight"),
    (lambda rng: _ce(rng, bias=CLASSES + 1), r"readout_weight \(6, 3\) and readout_bias \(7,\) must be"),
    (lambda rng: Cost("y", "cross_entropy", np.ones(3), np.ones(1)), r"readout_weight \(3,\) and readout_bias"),
    (lambda rng: Cost("y", readout_weight=np.ones((CLASSES, 3)), readout_bias=np.ones(CLASSES)),
     "readout_weight/readout_bias apply to kind='cross_entropy' only"),
])
def test_bad_cost(make_cost, match):
    with pytest.raises(Bad, match=match):
        make_cost(np.random.default_rng(8))


def test_unknown_layer():
    with pytest.raises(Bad, match="'zzz'"):
        _relax_with(lambda rng: Nudge(Cost("zzz"), 0.1, np.zeros((BATCH, 3))))
