"""Resistive circuits (substrate.circuits): KCL, its derivatives, the operating point and the implicit
gradient, each against an independent reference (finite differences, a torch re-implementation of
the element laws, the co-content)."""

import numpy as np
import pytest

from substrate import circuits as C
from substrate.errors import ConvergenceError, SubstrateValueError


@pytest.fixture(scope="module")
def mixed():
    """A random circuit with diodes and FETs (non-reciprocal), its inputs and operating point."""
    rng = np.random.default_rng(1)
    c = C.random_circuit(rng, 10, 3, 2, edges=24, diodes=5, fets=3, spread=0.2)
    x = rng.uniform(-1, 1, (3, 3))
    return c, x, C.dc(c, x, tol=1e-13)


@pytest.fixture(scope="module")
def reciprocal():
    rng = np.random.default_rng(2)
    c = C.random_circuit(rng, 10, 3, 2, edges=24, diodes=6, spread=0.2)
    x = rng.uniform(-1, 1, (3, 3))
    return c, x, C.dc(c, x, tol=1e-13)


def torch_currents(c, V):
    """Net current into every node (batch, n + 1), written from the element laws of the module
    docstring, in torch (the independent reference for F and its derivatives)."""
    import torch

    n = c.n
    idx = lambda a: torch.as_tensor(np.where(a < 0, n, a))
    out = torch.zeros_like(V)
    a, b = idx(c.edges[:, 0]), idx(c.edges[:, 1])
    i = torch.as_tensor(c.conductance) * (V[:, a] - V[:, b])
    out = out.index_add(1, a, -i).index_add(1, b, i)
    a, b = idx(c.diodes[:, 0]), idx(c.diodes[:, 1])
    nvt = torch.as_tensor(c.diode_n * c.v_t)
    i = torch.as_tensor(c.diode_is) * (torch.exp((V[:, a] - V[:, b]) / nvt) - 1)
    out = out.index_add(1, a, -i).index_add(1, b, i)
    d, g, s = (idx(c.fets[:, k]) for k in range(3))
    phi = torch.as_tensor(2 * c.fet_n * c.v_t)
    vth = torch.as_tensor(c.fet_vth)
    sp = lambda v: phi * torch.nn.functional.softplus(v / phi)
    i = torch.as_tensor(c.fet_k) * (sp(V[:, g] - V[:, s] - vth) ** 2 - sp(V[:, g] - V[:, d] - vth) ** 2)
    out = out.index_add(1, d, -i).index_add(1, s, i)
    out = out.index_add(1, idx(c.sources), torch.as_tensor(c.source_current).expand(len(V), -1))
    return out


def test_field_matches_torch_and_jacobian_matches_autograd(mixed):
    torch = pytest.importorskip("torch")
    c, x, sol = mixed
    f = sol.field
    u = sol.u + 0.05 * np.random.default_rng(0).standard_normal(sol.u.shape)
    V = torch.tensor(f.full(u), dtype=torch.float64)
    ref = torch_currents(c, V)[:, f.free].numpy()
    np.testing.assert_allclose(f(u), ref, rtol=1e-12, atol=1e-13)
    J = f.jacobian(u)
    for b in range(f.batch):
        def F(ub):
            Vb = torch.tensor(f.full(u)[b:b + 1]).clone()
            Vb[0, f.free] = ub
            return torch_currents(c, Vb)[0, f.free]
        Jt = torch.autograd.functional.jacobian(F, torch.tensor(u[b])).numpy()
        np.testing.assert_allclose(J[b], Jt, rtol=1e-10, atol=1e-12)
    v = np.random.default_rng(1).standard_normal(u.shape)
    np.testing.assert_allclose(f.jvp(u, v), np.einsum("bij,bj->bi", J, v), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f.vjp(u, v), np.einsum("bji,bj->bi", J, v), rtol=1e-12, atol=1e-12)
    assert np.abs(J - J.transpose(0, 2, 1)).max() > 1e-3  # the FETs make it non-symmetric


def test_reciprocal_field_is_minus_the_gradient_of_the_co_content(reciprocal):
    c, x, sol = reciprocal
    f = sol.field
    u = sol.u + 0.1 * np.random.default_rng(3).standard_normal(sol.u.shape)
    h = 1e-6  # central differences: O(h^2) truncation ~1e-12, rounding eps |E| / h ~1e-10
    grad = np.empty_like(u)
    for j in range(f.size):
        e = np.zeros_like(u)
        e[:, j] = h
        grad[:, j] = (f.energy(u + e) - f.energy(u - e)) / (2 * h)
    np.testing.assert_allclose(f(u), -grad, rtol=1e-6, atol=1e-8)
    J = f.jacobian(u)
    np.testing.assert_array_equal(J, J.transpose(0, 2, 1))
    assert np.all(np.linalg.eigvalsh(J) < 0)  # negative definite: E is strictly convex
    # the operating point minimises E
    assert np.all(f.energy(sol.u) < f.energy(u))
    with pytest.raises(SubstrateValueError, match="reciprocal"):
        C.CircuitField(C.random_circuit(np.random.default_rng(0), fets=1), x).energy(np.zeros((3, 9)))


@pytest.mark.parametrize("linear", ["dense", "splu"])
def test_newton_solvers_and_the_relaxation_agree(mixed, linear):
    c, x, sol = mixed
    assert sol.ok and np.max(sol.residual) <= 1e-12  # the rounding floor of currents ~1 A summed at a node
    other = C.dc(c, x, tol=1e-13, linear=linear)
    np.testing.assert_allclose(other.v, sol.v, rtol=1e-10, atol=1e-12)
    # the physical relaxation C dV/dt = F reaches the same point (linearly implicit Euler)
    rel = C.relax(c, x, tol=1e-11)
    np.testing.assert_allclose(rel.v, sol.v, rtol=1e-8, atol=1e-10)


def test_explicit_euler_and_cg_on_a_reciprocal_circuit(reciprocal):
    c, x, sol = reciprocal
    cg = C.dc(c, x, tol=1e-13, linear="cg")
    assert cg.linear_iterations > 0
    np.testing.assert_allclose(cg.v, sol.v, rtol=1e-10, atol=1e-12)
    rel = C.relax(c, x, method="euler", u0=sol.u + 0.01, tol=1e-10)  # started near: diode conductances stay small
    np.testing.assert_allclose(rel.v, sol.v, atol=1e-8)
    with pytest.raises(ConvergenceError, match="diverged"):
        C.relax(c, x, method="euler", dt=1e3)


def _loss(c):
    rng = np.random.default_rng(5)
    y = rng.uniform(-0.5, 0.5, len(c.outputs))

    def loss(v):
        d = v[:, c.outputs] - y
        g = np.zeros_like(v)
        g[:, c.outputs] = d
        g[:, c.inputs] += 0.1 * v[:, c.inputs]  # a direct dependence on the inputs too
        return 0.5 * np.sum(d * d) + 0.05 * np.sum(v[:, c.inputs] ** 2), g
    return loss


@pytest.mark.parametrize("which", ["mixed", "reciprocal"])
def test_implicit_gradient_matches_finite_differences(which, request):
    c, x, _ = request.getfixturevalue(which)
    loss = _loss(c)
    grads = C.gradient(c, x, loss, tol=1e-14)
    value = lambda: loss(C.dc(c, x, tol=1e-14).v)[0]
    # central differences, h = 1e-6 S: truncation O(h^2) and rounding ~1e-16 |L| / h: ~1e-10 relative
    h = 1e-6

    def central(array):  # d value / d array[e], each entry moved by +-h in place and restored
        out = np.empty(len(array))
        for e in range(len(array)):
            a0 = array[e]
            array[e] = a0 + h
            up = value()
            array[e] = a0 - h
            out[e] = (up - value()) / (2 * h)
            array[e] = a0
        return out

    np.testing.assert_allclose(grads.weights["conductance"], central(c.conductance), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(grads.biases["source_current"], central(c.source_current), rtol=1e-5, atol=1e-8)
    fx = np.empty_like(x)
    for b in range(len(x)):
        for i in range(x.shape[1]):
            xp, xm = x.copy(), x.copy()
            xp[b, i] += h
            xm[b, i] -= h
            fx[b, i] = (loss(C.dc(c, xp, tol=1e-14).v)[0] - loss(C.dc(c, xm, tol=1e-14).v)[0]) / (2 * h)
    np.testing.assert_allclose(grads.inputs["x"], fx, rtol=1e-5, atol=1e-8)


def test_implicit_gradient_matches_torch_autograd(mixed):
    """The implicit function theorem written in torch: dL/dg = -dl/dV J^{-1} dF/dg, with J and dF/dg
    from autograd of the torch element laws at substrate's operating point."""
    torch = pytest.importorskip("torch")
    c, x, sol = mixed
    loss = _loss(c)
    grads = C.gradient(c, x, loss, tol=1e-14, linear="splu")
    f = sol.field
    ref = np.zeros(len(c.conductance))
    for b in range(len(x)):
        def F(ub, g):
            Vb = torch.tensor(f.full(sol.u)[b:b + 1]).clone()
            Vb[0, f.free] = ub
            old = c.conductance
            c.conductance = g  # torch_currents reads it through torch.as_tensor
            try:
                return torch_currents(c, Vb)[0, f.free]
            finally:
                c.conductance = old
        u = torch.tensor(sol.u[b])
        g = torch.tensor(c.conductance)
        J, dFdg = torch.autograd.functional.jacobian(F, (u, g))
        dl = torch.tensor(loss(sol.v)[1][b, f.free])
        ref += (-dl @ torch.linalg.solve(J, dFdg)).numpy()
    np.testing.assert_allclose(grads.weights["conductance"], ref, rtol=1e-9, atol=1e-12)


def test_refusals():
    rng = np.random.default_rng(0)
    c = C.random_circuit(rng)
    with pytest.raises(SubstrateValueError, match="conductance"):
        C.Circuit(3, [[0, 1]], [-1.0], [0], [1])
    with pytest.raises(SubstrateValueError, match="outside"):
        C.Circuit(3, [[0, 5]], [1.0], [0], [1])
    with pytest.raises(SubstrateValueError, match="both an input"):
        C.Circuit(3, [[0, 1]], [1.0], [0], [0])
    with pytest.raises(SubstrateValueError, match=r"expected \(batch, 3\)"):
        C.dc(c, np.zeros((2, 4)))
    with pytest.raises(SubstrateValueError, match=r"dc\(linear\)"):
        C.dc(c, np.zeros((2, 3)), linear="lu")
    with pytest.raises(ConvergenceError, match="max_iter"):
        C.dc(c, np.ones((2, 3)), max_iter=1)
