"""Derivatives of the vector field F(u) = -u + W rho(u) + V x + b (``substrate.VectorField``).

Every product of ``VectorField`` is checked against two independent references:

* finite differences of the library's own F (central differences; for complex states the
  holomorphic difference quotient along a real and along an imaginary step), and
* PyTorch autograd of a mirror of F written here from the network *description* only (layers,
  connections, masks, tied flags), never from the engine's packed arrays.

The test networks are small, have asymmetric weights (so that a J / J^T mix-up cannot go unnoticed)
and cover several layers, independent and tied feedback (one tied connection listed before its
source and carrying its own mask), masked lateral connections, a loop from the output back to the
first hidden layer, per-neuron tau, every activation (rotated across the layers) and two inputs,
one of which projects onto two layers through a masked and an unmasked weight.

Tolerances. All comparisons are norm-wise: ``|got - want| <= rel * max|want|``.

* float64 against torch autograd or against another exact product: ``1e-12`` (both sides are exact
  up to summation order; ~2e-16 is observed).
* central differences with step ``H = 1e-6``: truncation O(H^2 |F'''|) ~ 1e-12 and rounding
  O(eps |F| / H) ~ 1e-10 (eps = 2.2e-16, |F| of order 1-10), so ~1e-10..1e-9 relative is expected
  (~2e-10 is observed); we allow ``1e-8``. hard_sigmoid has kinks at 0 and 1 where it is not
  differentiable, so states of hard_sigmoid layers are drawn at least ``KINK_MARGIN`` = 0.1 >> H
  away from them.
* float32 against float64: eps32 = 1.2e-7 times a few dozen accumulated terms; we allow ``1e-5``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from substrate import Connection, Input, Layer, Network, SubstrateValueError, VectorField
from substrate.activations import HOLOMORPHIC, NAMES

BATCH = 3
H = 1e-6  # finite-difference step
KINK_MARGIN = 0.1
REL_EXACT = 1e-12  # float64 products against each other / against torch
REL_FD = 1e-8  # float64 products against central differences
REL_F32 = 1e-5  # float32 against float64

# The fixture network: five state layers (one per activation) and two inputs; sizes all differ so
# that a transposed block cannot be shape-compatible by accident.
LAYER_SIZES = {"h1": 5, "h2": 4, "h3": 6, "h4": 3, "y": 2}
INPUT_SIZES = {"a": 3, "b": 2}
ACTIVATIONS = ("logistic", "hard_sigmoid", "tanh", "dsilu", "identity")
HOLO_ACTIVATIONS = ("logistic", "tanh", "dsilu", "identity")
ROTATIONS = range(len(ACTIVATIONS))  # rotation k puts ACTIVATIONS[k] on h1, the next on h2, ...

assert set(ACTIVATIONS) == set(NAMES) and set(HOLO_ACTIVATIONS) == set(HOLOMORPHIC)


# ================================================================================================
# Network factory and random data
# ================================================================================================
def rotated(names, k, count=len(LAYER_SIZES)):
    """``count`` activations cycling through ``names`` starting at index k."""
    return [names[(k + i) % len(names)] for i in range(count)]


def make_network(rng: np.random.Generator, activations, scale: float = 1.5) -> Network:
    """The float64 test circuit with activation ``activations[i]`` on the i-th layer.

    forward h1 -> h2 -> h3 -> h4 -> y; independent feedback h2 -> h1 and y -> h4; tied feedback
    h3 -> h2 (masked, listed before its source h2 -> h3) and h4 -> h3; lateral h2 -> h2 (diagonal
    masked out) and h3 -> h3 (random mask); loop y -> h1; inputs a -> h1 (masked), b -> h1, b -> h3.
    """
    sizes = {**LAYER_SIZES, **INPUT_SIZES}

    def weight(pre, post):
        return rng.normal(0.0, scale / np.sqrt(sizes[pre]), (sizes[post], sizes[pre]))

    def mask(pre, post):
        m = (rng.random((sizes[post], sizes[pre])) < 0.6).astype(float)
        m.flat[0], m.flat[-1] = 0.0, 1.0  # at least one masked and one live entry
        return m

    taus = {"h1": rng.uniform(0.5, 2.0, LAYER_SIZES["h1"]), "h2": 0.7, "h3": 1.0, "h4": 1.3, "y": 2.0}
    layers = [Layer(name, size, tau=taus[name], activation=act, bias=rng.normal(0.0, 0.5, size))
              for (name, size), act in zip(LAYER_SIZES.items(), activations)]
    h2, h3 = LAYER_SIZES["h2"], LAYER_SIZES["h3"]
    connections = [
        Connection("h3", "h2", tied=True, mask=mask("h3", "h2")),  # before its source h2 -> h3
        Connection("a", "h1", weight("a", "h1"), mask=mask("a", "h1")),
        Connection("b", "h1", weight("b", "h1")),
        Connection("b", "h3", weight("b", "h3")),
        Connection("h1", "h2", weight("h1", "h2")),
        Connection("h2", "h3", weight("h2", "h3")),
        Connection("h3", "h4", weight("h3", "h4")),
        Connection("h4", "y", weight("h4", "y")),
        Connection("h2", "h1", weight("h2", "h1")),  # independent feedback
        Connection("h4", "h3", tied=True),  # tied feedback: h3->h4 transposed
        Connection("y", "h4", weight("y", "h4")),  # independent feedback
        Connection("h2", "h2", weight("h2", "h2"), mask=1.0 - np.eye(h2)),  # lateral
        Connection("h3", "h3", weight("h3", "h3"), mask=mask("h3", "h3")),  # lateral, random mask
        Connection("y", "h1", weight("y", "h1")),  # loop
    ]
    assert h3 != h2
    return Network(layers, connections, inputs=[Input(n, s) for n, s in INPUT_SIZES.items()])


def cast_network(net: Network, dtype) -> Network:
    """A copy of ``net`` with weights and biases converted to ``dtype`` (masks and tau kept)."""
    layers = [Layer(x.name, x.size, tau=x.tau, activation=x.activation, bias=x.bias.astype(dtype))
              for x in net.layers]
    conns = [Connection(c.pre, c.post, None if c.tied else c.weight.astype(dtype), mask=c.mask,
                        tied=c.tied) for c in net.connections]
    return Network(layers, conns, inputs=[Input(i.name, i.size) for i in net.inputs])


def make_inputs(net: Network, rng: np.random.Generator, batch: int = BATCH) -> dict:
    return {i.name: rng.normal(0.0, 1.0, (batch, i.size)) for i in net.inputs}


def sample_state(net: Network, rng: np.random.Generator, batch: int = BATCH,
                 imag: float = 0.0) -> np.ndarray:
    """A (batch, n) state of order 1. hard_sigmoid layers get values from the three smooth regimes
    (-1, -m), (m, 1 - m), (1 + m, 2) with m = KINK_MARGIN, never near the kinks 0 and 1. With
    ``imag`` > 0 the state is complex with imaginary parts uniform in +-imag."""
    u = rng.normal(0.5, 1.0, (batch, net.n))
    m = KINK_MARGIN
    regimes = np.array([(-1.0, -m), (m, 1.0 - m), (1.0 + m, 2.0)])
    for layer in net.layers:
        if layer.activation == "hard_sigmoid":
            s = net.slices[layer.name]
            lo, hi = regimes[rng.integers(0, 3, (batch, layer.size))].transpose(2, 0, 1)
            u[:, s] = rng.uniform(lo, hi)
    if imag:
        u = u + 1j * rng.uniform(-imag, imag, u.shape)
    return u


def random_like(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random direction / cotangent of u's shape and kind."""
    v = rng.normal(size=u.shape)
    return v + 1j * rng.normal(size=u.shape) if np.iscomplexobj(u) else v


def basis_products(product, u: np.ndarray) -> np.ndarray:
    """M[b] with M[b, :, j] = product(u, e_j)[b]: the dense per-sample matrix of a linear map
    (J for jvp, J^T for vjp); samples are independent, so e_j is set in every sample at once."""
    cols = []
    for j in range(u.shape[1]):
        e = np.zeros_like(u)
        e[:, j] = 1.0
        cols.append(product(u, e))
    return np.stack(cols, axis=-1)


# ================================================================================================
# Torch mirror of F
# ================================================================================================
def torch_rho(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "logistic":
        return torch.sigmoid(4.0 * z - 2.0)
    if name == "hard_sigmoid":
        return torch.clamp(z, 0.0, 1.0)
    if name == "tanh":
        return torch.tanh(z)
    if name == "dsilu":
        return 0.5 * z * torch.sigmoid(z) + (1.0 - 0.5 * z) * torch.sigmoid(z - 2.0)
    if name == "identity":
        return z
    raise ValueError(name)


def as_tensor(a, dtype=None, grad: bool = False) -> torch.Tensor:
    t = torch.tensor(np.asarray(a), dtype=dtype)
    return t.requires_grad_() if grad else t


def torch_params(net: Network, x: dict, dtype=torch.float64, grad: bool = False) -> dict:
    """Tensors for every parameter of the mirror (leaves requiring grad with ``grad``): the raw
    weights of untied connections (masks are applied in the mirror), the biases and the inputs."""
    return {
        "weights": {c.name: as_tensor(c.weight, dtype, grad) for c in net.connections if not c.tied},
        "biases": {x_.name: as_tensor(x_.bias, dtype, grad) for x_ in net.layers},
        "inputs": {k: as_tensor(v, dtype, grad) for k, v in x.items()},
    }


def torch_effective_weight(net: Network, params: dict, c: Connection) -> torch.Tensor:
    """weight * mask, where a tied connection's weight is the transpose of its source's effective
    (masked) weight."""
    if c.tied:
        w = torch_effective_weight(net, params, net.connection(f"{c.post}->{c.pre}")).T
    else:
        w = params["weights"][c.name]
    return w * as_tensor(c.mask) if c.mask is not None else w


def torch_field(net: Network, params: dict, u: torch.Tensor) -> torch.Tensor:
    """The mirror: F(u) = -u + W rho(u) + V x + b for a (batch, n) tensor u, layer by layer."""
    r = {x.name: torch_rho(x.activation, u[:, net.slices[x.name]]) for x in net.layers}
    blocks = []
    for layer in net.layers:
        f = params["biases"][layer.name] - u[:, net.slices[layer.name]]
        for c in net.connections:
            if c.post == layer.name:
                src = params["inputs"][c.pre] if c.pre in net.inputs_by_name else r[c.pre]
                f = f + src @ torch_effective_weight(net, params, c).T
        blocks.append(f)
    return torch.cat(blocks, dim=1)


def torch_state_products(net: Network, x: dict, u: np.ndarray, v: np.ndarray, w: np.ndarray):
    """(F(u), J v, J^T w) from the mirror via torch.func; for complex tensors torch's vjp is the
    conjugate one, so the plain transpose is conj(vjp(conj(w)))."""
    dtype = torch.complex128 if np.iscomplexobj(u) else torch.float64
    params = torch_params(net, x, dtype)
    field = lambda t: torch_field(net, params, t)  # noqa: E731
    ut = as_tensor(u, dtype)
    f, jv = torch.func.jvp(field, (ut,), (as_tensor(v, dtype),))
    _, pullback = torch.func.vjp(field, ut)
    (jtw,) = pullback(as_tensor(np.conj(w), dtype))
    return f.detach().numpy(), jv.detach().numpy(), np.conj(jtw.detach().numpy())


def torch_param_vjp(net: Network, x: dict, u: np.ndarray, w: np.ndarray) -> dict:
    """(dF/dtheta)^T w for every mirror parameter, in VectorField.param_vjp's layout (plain
    transpose also for complex states, as in torch_state_products)."""
    dtype = torch.complex128 if np.iscomplexobj(u) else torch.float64
    params = torch_params(net, x, dtype, grad=True)
    f = torch_field(net, params, as_tensor(u, dtype))
    keys = [(group, name) for group in params for name in params[group]]
    grads = torch.autograd.grad(f, [params[g][n] for g, n in keys],
                                grad_outputs=as_tensor(np.conj(w), dtype))
    out = {group: {} for group in params}
    for (group, name), g in zip(keys, grads):
        out[group][name] = np.conj(g.numpy())
    return out


# ================================================================================================
# Assertions
# ================================================================================================
def assert_close(got, want, rel: float, what: str = ""):
    """Norm-wise: max|got - want| <= rel * max|want| (shapes must match exactly)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-300)
    err = float(np.max(np.abs(got - want), initial=0.0))
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:.0e} * {scale:.3e}"


def assert_grads_close(got: dict, want: dict, rel: float):
    """Same groups, same keys in each group, and every array close."""
    assert set(got) == set(want) == {"weights", "biases", "inputs"}
    for group in want:
        assert set(got[group]) == set(want[group]), \
            f"{group}: keys {sorted(got[group])} != {sorted(want[group])}"
        for name in want[group]:
            assert_close(got[group][name], want[group][name], rel, f"{group}[{name!r}]")


# ================================================================================================
# Fixtures
# ================================================================================================
def case(seed: int, activations, imag: float = 0.0):
    """(network, inputs, VectorField, state) for one seed."""
    rng = np.random.default_rng(seed)
    net = make_network(rng, activations)
    x = make_inputs(net, rng)
    vf = VectorField(net, x, dtype="complex128" if imag else None)
    return net, x, vf, sample_state(net, rng, imag=imag), rng


@pytest.fixture(params=ROTATIONS, ids=lambda k: "h1=" + ACTIVATIONS[k])
def real_case(request):
    return case(100 + request.param, rotated(ACTIVATIONS, request.param))


@pytest.fixture(params=range(len(HOLO_ACTIVATIONS)), ids=lambda k: "h1=" + HOLO_ACTIVATIONS[k])
def complex_case(request):
    return case(200 + request.param, rotated(HOLO_ACTIVATIONS, request.param), imag=0.25)


# ================================================================================================
# The mirror itself (everything below relies on it)
# ================================================================================================
def test_mirror_effective_weights_match_network(real_case):
    net, x, *_ = real_case
    params = torch_params(net, x)
    for c in net.connections:
        np.testing.assert_array_equal(
            torch_effective_weight(net, params, c).detach().numpy(), net.effective_weight(c), err_msg=c.name)


def test_network_covers_the_required_topology(real_case):
    net = real_case[0]
    names = {c.name: c for c in net.connections}
    assert {x.activation for x in net.layers} == set(NAMES)
    assert names["h4->h3"].tied and names["h3->h2"].tied and names["h3->h2"].mask is not None
    assert not names["h2->h1"].tied and not names["y->h4"].tied  # independent feedback
    assert names["h2->h2"].mask is not None and names["h3->h3"].mask is not None  # lateral
    assert "y->h1" in names  # loop
    assert np.ndim(net.layer("h1").tau) == 1 and len(np.unique(net.tau)) > 1
    assert len(net.inputs) == 2


def check_field_against_mirror(net, x, vf, u):
    f = vf(u)
    assert f.dtype == vf.dtype and f.shape == u.shape
    assert_close(f, torch_state_products(net, x, u, u, u)[0], REL_EXACT, "F")


def test_field_matches_mirror(real_case):
    check_field_against_mirror(*real_case[:4])


def test_complex_field_matches_mirror(complex_case):
    check_field_against_mirror(*complex_case[:4])


# ================================================================================================
# 1. jvp against central finite differences of F
# ================================================================================================
def test_jvp_matches_central_differences(real_case):
    net, x, vf, u, rng = real_case
    for _ in range(3):
        v = random_like(u, rng)
        fd = (vf(u + H * v) - vf(u - H * v)) / (2 * H)
        assert_close(vf.jvp(u, v), fd, REL_FD, "J v vs central difference")


@pytest.mark.parametrize("which", ["real", "complex"])
def test_jvp_at_one_state_is_jvp_bit_for_bit(which, real_case, complex_case):
    """``VectorField.jvp_at(u)`` (rho'(u) made once, for the stability check's Arnoldi products) gives
    jvp_engine's bits for every direction."""
    net, x, vf, u, rng = real_case if which == "real" else complex_case
    ut = np.ascontiguousarray(u.T)
    product = vf.jvp_at(ut)
    for _ in range(3):
        vt = np.ascontiguousarray(random_like(u, rng).T)
        np.testing.assert_array_equal(product(vt), vf.jvp_engine(ut, vt))


def test_jvp_matches_torch(real_case):
    net, x, vf, u, rng = real_case
    v = random_like(u, rng)
    assert_close(vf.jvp(u, v), torch_state_products(net, x, u, v, v)[1], REL_EXACT, "J v vs torch")


def test_jacobian_has_no_tau(real_case):
    """J = dF/du does not depend on tau (the ODE's 1/tau is not part of F)."""
    net, x, vf, u, rng = real_case
    v = random_like(u, rng)
    for layer in net.layers:
        layer.tau = 3.0 * np.asarray(layer.tau) + 0.5
    vf2 = VectorField(net, x)
    assert not np.allclose(vf2.packed.tau, vf.packed.tau)
    np.testing.assert_array_equal(vf2.jvp(u, v), vf.jvp(u, v))
    np.testing.assert_array_equal(vf2(u), vf(u))


# ================================================================================================
# 2. vjp: the transpose of jvp, and torch autograd
# ================================================================================================
def test_vjp_is_transpose_of_jvp(real_case):
    net, x, vf, u, rng = real_case
    for _ in range(3):
        v, w = random_like(u, rng), random_like(u, rng)
        jv, jtw = vf.jvp(u, v), vf.vjp(u, w)
        lhs, rhs = np.sum(w * jv), np.sum(jtw * v)
        scale = np.sum(np.abs(w * jv)) + np.sum(np.abs(jtw * v))
        assert abs(lhs - rhs) <= REL_EXACT * scale, (lhs, rhs)


def test_vjp_dense_matrix_is_transpose_of_jvp(real_case):
    """Per sample, the matrix of vjp is exactly the transpose of the matrix of jvp; J is far from
    symmetric, so this would catch a vjp that applied J instead of J^T."""
    net, x, vf, u, _ = real_case
    J = basis_products(vf.jvp, u)
    JT = basis_products(vf.vjp, u)
    assert_close(JT, J.transpose(0, 2, 1), REL_EXACT, "vjp matrix vs jvp matrix transposed")
    assert np.max(np.abs(J - J.transpose(0, 2, 1))) > 0.1 * np.max(np.abs(J))


def test_vjp_matches_torch(real_case):
    net, x, vf, u, rng = real_case
    w = random_like(u, rng)
    assert_close(vf.vjp(u, w), torch_state_products(net, x, u, w, w)[2], REL_EXACT, "J^T w vs torch")


# ================================================================================================
# 3. param_vjp against torch autograd
# ================================================================================================
def test_param_vjp_matches_torch(real_case):
    net, x, vf, u, rng = real_case
    w = random_like(u, rng)
    got = vf.param_vjp(u, w)
    assert_grads_close(got, torch_param_vjp(net, x, u, w), REL_EXACT)


def test_param_vjp_layout(real_case):
    """One entry per untied connection (tied ones land on their source), per layer and per input,
    each of its parameter's shape; masked-out weights get exactly zero gradient."""
    net, x, vf, u, rng = real_case
    g = vf.param_vjp(u, random_like(u, rng))
    assert set(g["weights"]) == {c.name for c in net.connections if not c.tied}
    assert set(g["biases"]) == {x_.name for x_ in net.layers}
    assert set(g["inputs"]) == set(x)
    for c in net.connections:
        if not c.tied:
            assert g["weights"][c.name].shape == c.weight.shape, c.name
            if c.mask is not None:
                assert np.all(g["weights"][c.name][c.mask == 0] == 0), c.name
    for layer in net.layers:
        assert g["biases"][layer.name].shape == (layer.size,)
    for name, a in x.items():
        assert g["inputs"][name].shape == a.shape


def test_param_vjp_tied_gradient_lands_on_source(real_case):
    """The source of a tied connection gets its own gradient plus the tied one's, transposed and
    masked by the source's mask: the difference from an untied copy of the network."""
    net, x, vf, u, rng = real_case
    w = random_like(u, rng)
    tied = vf.param_vjp(u, w)
    untied_conns = [Connection(c.pre, c.post, net.effective_weight(c) if c.tied else c.weight,
                               mask=c.mask) for c in net.connections]
    untied = Network(net.layers, untied_conns, inputs=net.inputs)
    free = VectorField(untied, x).param_vjp(u, w)
    for c in net.connections:
        if c.tied:
            src = f"{c.post}->{c.pre}"
            src_mask = net.connection(src).mask
            feedback = free["weights"][c.name].T * (1.0 if src_mask is None else src_mask)
            assert_close(tied["weights"][src], free["weights"][src] + feedback, REL_EXACT, src)


# ================================================================================================
# 4. param_vjp against central finite differences of <w, F>
# ================================================================================================
FD_ENTRIES = [  # (group, parameter, index, why)
    ("weights", "h1->h2", (2, 1), "forward"),
    ("weights", "h2->h3", (1, 3), "source of the masked tied h3->h2"),
    ("weights", "h3->h4", (2, 5), "source of the tied h4->h3"),
    ("weights", "h2->h2", (1, 2), "lateral, live entry"),
    ("weights", "h2->h2", (1, 1), "lateral, masked diagonal: zero"),
    ("weights", "y->h1", (4, 0), "loop"),
    ("weights", "b->h3", (5, 1), "input projection"),
    ("biases", "h4", (2,), "bias"),
]


@pytest.mark.parametrize("group,name,idx,why", FD_ENTRIES, ids=[f"{e[1]}{list(e[2])}" for e in FD_ENTRIES])
def test_param_vjp_matches_central_differences(group, name, idx, why):
    rng = np.random.default_rng(300)
    net = make_network(rng, rotated(ACTIVATIONS, 1))
    x = make_inputs(net, rng)
    u = sample_state(net, rng)
    w = random_like(u, rng)
    g = VectorField(net, x).param_vjp(u, w)[group][name][idx]
    array = net.connection(name).weight if group == "weights" else net.layer(name).bias
    original = array[idx]

    def objective(value):
        array[idx] = value
        return np.sum(w * VectorField(net, x)(u))  # re-created: the field packs weights once

    try:
        fd = (objective(original + H) - objective(original - H)) / (2 * H)
    finally:
        array[idx] = original
    assert abs(g - fd) <= REL_FD * max(1.0, abs(g)), (why, g, fd)
    if "zero" in why:
        assert g == 0.0 and fd == 0.0


def test_param_vjp_inputs_match_central_differences():
    rng = np.random.default_rng(301)
    net = make_network(rng, rotated(ACTIVATIONS, 2))
    x = make_inputs(net, rng)
    u = sample_state(net, rng)
    w = random_like(u, rng)
    g = VectorField(net, x).param_vjp(u, w)["inputs"]
    for name, idx in [("a", (0, 2)), ("b", (2, 1))]:  # b feeds two layers
        def objective(value):
            xp = {k: a.copy() for k, a in x.items()}
            xp[name][idx] = value
            return np.sum(w * VectorField(net, xp)(u))

        fd = (objective(x[name][idx] + H) - objective(x[name][idx] - H)) / (2 * H)
        assert abs(g[name][idx] - fd) <= REL_FD * max(1.0, abs(fd)), (name, g[name][idx], fd)


# ================================================================================================
# 5. complex128 states (holomorphic activations): plain transposes, never conjugates
# ================================================================================================
@pytest.mark.parametrize("step", [H, 1j * H], ids=["real-step", "imaginary-step"])
def test_complex_jvp_is_holomorphic_derivative(complex_case, step):
    """For holomorphic F, (F(u + h v) - F(u - h v)) / (2h) -> J v for real and imaginary h alike;
    a non-holomorphic implementation (a conjugate or |.| somewhere) would differ between the two."""
    net, x, vf, u, rng = complex_case
    assert vf.dtype == np.complex128
    for _ in range(2):
        v = random_like(u, rng)
        fd = (vf(u + step * v) - vf(u - step * v)) / (2 * step)
        jv = vf.jvp(u, v)
        assert jv.dtype == np.complex128
        assert_close(jv, fd, REL_FD, "complex J v vs holomorphic difference")


def test_complex_vjp_is_bilinear_transpose(complex_case):
    net, x, vf, u, rng = complex_case
    for _ in range(3):
        v, w = random_like(u, rng), random_like(u, rng)
        jv, jtw = vf.jvp(u, v), vf.vjp(u, w)
        lhs, rhs = np.sum(w * jv), np.sum(jtw * v)  # bilinear, no conjugate
        scale = np.sum(np.abs(w * jv)) + np.sum(np.abs(jtw * v))
        assert abs(lhs - rhs) <= REL_EXACT * scale, (lhs, rhs)
    J, JT = basis_products(vf.jvp, u), basis_products(vf.vjp, u)
    assert_close(JT, J.transpose(0, 2, 1), REL_EXACT, "complex vjp matrix vs J^T")
    # J is genuinely complex, so J^T and J^H differ and the check above discriminates them
    assert np.max(np.abs(J.imag)) > 0.01 * np.max(np.abs(J))


def test_complex_products_match_torch(complex_case):
    net, x, vf, u, rng = complex_case
    v, w = random_like(u, rng), random_like(u, rng)
    f, jv, jtw = torch_state_products(net, x, u, v, w)
    assert_close(vf.jvp(u, v), jv, REL_EXACT, "complex J v vs torch")
    assert_close(vf.vjp(u, w), jtw, REL_EXACT, "complex J^T w vs torch")


def test_complex_param_vjp_matches_torch(complex_case):
    net, x, vf, u, rng = complex_case
    w = random_like(u, rng)
    assert_grads_close(vf.param_vjp(u, w), torch_param_vjp(net, x, u, w), REL_EXACT)


def test_complex_param_vjp_matches_holomorphic_difference(complex_case):
    """d<w, F>/dW_ij along an imaginary step of one weight (evaluated on a complex128 copy of the
    network): the holomorphic derivative that param_vjp must return."""
    net, x, vf, u, rng = complex_case
    w = random_like(u, rng)
    name, idx = "h2->h3", (1, 2)  # also the source of the tied h3->h2
    g = vf.param_vjp(u, w)["weights"][name][idx]
    step = 1j * H

    def objective(delta):
        copy = cast_network(net, np.complex128)
        copy.connection(name).weight[idx] += delta
        return np.sum(w * VectorField(copy, x)(u))

    fd = (objective(step) - objective(-step)) / (2 * step)
    assert abs(g - fd) <= REL_FD * max(1.0, abs(g)), (g, fd)


def test_complex_rejects_hard_sigmoid():
    net = case(0, rotated(ACTIVATIONS, 0))[0]
    with pytest.raises(SubstrateValueError, match="holomorphic"):
        VectorField(net, make_inputs(net, np.random.default_rng(0)), dtype="complex128")


# ================================================================================================
# 6. float32 networks: the float64 result within float32 rounding
# ================================================================================================
@pytest.mark.parametrize("feedback", ["tied", "independent"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_matches_float64(activation, feedback):
    rng = np.random.default_rng(400)
    net32 = Network.layered([4, 6, 5, 3], rng, activation=activation, feedback=feedback,
                            asymmetry_angle=60.0, lateral=True, loop=True, dtype="float32")
    net64 = cast_network(net32, np.float64)  # the same (float32-representable) parameters
    assert net32.dtype == np.float32 and net64.dtype == np.float64
    x32 = {k: a.astype(np.float32) for k, a in make_inputs(net32, rng).items()}
    u = sample_state(net64, rng).astype(np.float32)
    v, w = random_like(u, rng).astype(np.float32), random_like(u, rng).astype(np.float32)
    vf32 = VectorField(net32, x32)
    vf64 = VectorField(net64, {k: a.astype(np.float64) for k, a in x32.items()})
    u64, v64, w64 = u.astype(np.float64), v.astype(np.float64), w.astype(np.float64)
    for what, got, want in [("F", vf32(u), vf64(u64)),
                            ("J v", vf32.jvp(u, v), vf64.jvp(u64, v64)),
                            ("J^T w", vf32.vjp(u, w), vf64.vjp(u64, w64))]:
        assert got.dtype == np.float32, what
        assert_close(got, want, REL_F32, f"float32 {what}")
    g32, g64 = vf32.param_vjp(u, w), vf64.param_vjp(u64, w64)
    assert_grads_close(g32, g64, REL_F32)
