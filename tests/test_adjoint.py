"""Gradients through the dynamics: ``substrate.gradient`` (docs/equations.md, section 3).

The model is tau du/dt = F(u) = -u + W rho(u) + V x + b and the loss a callable
``loss(u) -> (value, dL/du)``. Every gradient that ``Gradients`` returns (weights, biases, tau,
inputs x, initial state u0) is checked against independent references:

1. the discrete adjoint of every integrator against central finite differences of the loss computed
   with ``substrate.integrate`` (same steps): every entry of several parameters;
2. the discrete adjoint against torch autograd through the *same* discrete steps, written here from
   the published step formulas (explicit RK tableaux; ETD1/ETD2RK from docs/equations.md, section 2, ETDRK4
   in the closed form of Cox & Matthews 2002 eq. (26)-(29)), not from ``_kernels.coefficients``;
   for adaptive dopri5 through the accepted steps (``Gradients.step_sizes``);
3. a loss on the whole trajectory (with t_eval[0] = t0, so u0 gets a direct term);
4. checkpointing: bit-identical results for every number of checkpoints;
5. the implicit gradient at the equilibrium (direct and Krylov) against finite differences of
   ``loss(relax(...).u)``, and the discrete adjoint converging to it as the horizon grows;
6. complex states (holomorphic activations): holomorphic derivatives, no conjugation; float32
   networks against float64;
7. bad input.

The test circuit is ``test_derivatives.make_network`` (five layers h1..y, independent feedback
h2->h1 and y->h4, tied feedback h3->h2 (masked) and h4->h3, masked laterals h2->h2 and h3->h3, the
loop y->h1, two inputs a and b, b projecting onto two layers, per-neuron tau on h1 and scalar tau on
the other layers) with tanh / logistic / dsilu activations and two samples in the batch.

Tolerances. All comparisons are norm-wise per parameter: ``max|got - want| <= rel * max|want|``.

* Against central differences with step ``H_FD = 1e-6``: the truncation error is
  O(H^2 |L'''|) ~ 1e-12 and the rounding error O(eps |L| / H) ~ 1e-10 (eps = 2.2e-16, |L| of
  order 1-10), i.e. ~1e-9..1e-8 relative to gradients of order 1 (observed: 5e-9..1.2e-8). A parameter
  whose gradient is much smaller than |L| has a larger relative error (observed ~1e-7 for the tau
  of the output layer in the trajectory test, gradient 0.02 against |L| ~ 6); we allow
  ``REL_FD = 1e-6``.
* Against torch autograd through the same steps: both are exact derivatives of the same arithmetic
  up to summation order, so only rounding separates them (observed ~1e-15, up to 2e-13 for
  ETDRK4); we allow ``REL_TORCH = 1e-10``. The closed forms of the exponential coefficients cancel
  like z^-3 for small z = -h/tau, so those tests keep |z| >= 0.25 (relative rounding <= ~2e-13).
* Implicit gradient against differences of the relaxed equilibrium: relaxation to a residual of
  1e-13 leaves an error ~1e-13 in u* that can change discontinuously with the number of relaxation
  steps; with ``H_IMPLICIT = 1e-5`` that gives <= 1e-8, truncation ~1e-10; we allow 1e-6.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import substrate
from substrate import (METHODS, ConvergenceError, DiscreteAdjoint, Implicit, Network,
                       SubstrateValueError, gradient, integrate, relax)
from substrate import _kernels as K
from substrate.adjoint import ADJOINTS
from substrate.dynamics import VectorField
from substrate.integrators import ExplicitRK, ExponentialRK
from test_derivatives import (as_tensor, assert_close, cast_network, make_inputs, make_network,
                              torch_field, torch_params)

BATCH = 2
ACTIVATIONS = ("tanh", "logistic", "dsilu", "tanh", "logistic")  # h1, h2, h3, h4, y
H_FD = 1e-6
H_IMPLICIT = 1e-5
REL_FD = 1e-6
REL_TORCH = 1e-10
MIN_Z = 0.25  # smallest |h/tau| the torch closed forms of the exponential coefficients accept

DOPRI5_FIXED = ExplicitRK("dopri5_fixed", 5, a=METHODS["dopri5"].a, b=METHODS["dopri5"].b)
FIXED_STEP = {m: METHODS[m] for m in ("euler", "rk4", "exp_euler", "etd2rk", "etdrk4")}
FIXED_STEP["dopri5_fixed"] = DOPRI5_FIXED
# step sizes (tau in [0.5, 2]). Against torch: h/tau in [0.25, 1] for the exponential methods (the
# closed forms need |z| >= MIN_Z), smaller for the explicit ones. Against finite differences the
# exponential methods take small steps, h/tau in [0.05, 0.2], where _kernels.phi uses its series.
DT = {"euler": 0.1, "rk4": 0.2, "dopri5_fixed": 0.2, "exp_euler": 0.5, "etd2rk": 0.5, "etdrk4": 0.5}
FD_DT = {**DT, "exp_euler": 0.1, "etd2rk": 0.1, "etdrk4": 0.1}
T_END = 2.0


def show(what: str, err: float):
    """Measured errors, visible with ``pytest -s``."""
    print(f"  {what}: {err:.2e}")


def rel_error(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-300)
    return float(np.max(np.abs(got - want), initial=0.0)) / scale


def check(got, want, rel: float, what: str) -> float:
    assert_close(got, want, rel, what)
    return rel_error(got, want)


# ================================================================================================
# Test cases: network factory, loss
# ================================================================================================
@dataclass
class QuadraticLoss:
    """L(u) = sum(c u + d u^2 / 2) over all entries (holomorphic for complex c, d, u), so
    dL/du = c + d u; c and d have the shape of the states the loss sees."""

    c: np.ndarray
    d: np.ndarray

    @classmethod
    def random(cls, rng, shape, complex_=False):
        c, d = rng.normal(size=shape), rng.normal(0.0, 0.5, shape)
        if complex_:
            c, d = c + 1j * rng.normal(size=shape), d + 0.5j * rng.normal(size=shape)
        return cls(c, d)

    def __call__(self, u):
        assert u.shape == self.c.shape, (u.shape, self.c.shape)
        value = np.sum(self.c * u + 0.5 * self.d * u * u)
        return (complex(value) if np.iscomplexobj(value) else float(value)), self.c + self.d * u

    def torch(self, u: torch.Tensor) -> torch.Tensor:
        c, d = as_tensor(self.c, u.dtype), as_tensor(self.d, u.dtype)
        return torch.sum(c * u + 0.5 * d * u * u)


@dataclass
class Case:
    net: Network
    x: dict
    u0: np.ndarray
    rng: np.random.Generator

    def loss(self, leading=(), complex_=False) -> QuadraticLoss:
        return QuadraticLoss.random(self.rng, (*leading, BATCH, self.net.n), complex_)


def make_case(seed: int, *, gain: float = 1.0, activations=ACTIVATIONS, imag: float = 0.0) -> Case:
    """The test circuit (see the module docstring) with its weights scaled by ``gain`` (small gains
    give a contracting network with a unique equilibrium), inputs for two samples and a random u0
    (complex with imaginary parts in +-imag when imag > 0)."""
    rng = np.random.default_rng(seed)
    net = make_network(rng, activations)
    for c in net.connections:
        if not c.tied:
            c.weight = c.weight * gain
    x = make_inputs(net, rng, batch=BATCH)
    u0 = rng.normal(0.0, 0.5, (BATCH, net.n))
    if imag:
        u0 = u0 + 1j * rng.uniform(-imag, imag, u0.shape)
    return Case(net, x, u0, rng)


def layered_case(seed: int) -> Case:
    """The builder's topology: two hidden layers, tied feedback, masked laterals, loop y->h1."""
    rng = np.random.default_rng(seed)
    net = Network.layered([3, 5, 4, 2], rng, activation="dsilu", tau=0.8, feedback="tied",
                          lateral=True, loop=True)
    assert {"h2->h1", "y->h1", "h1->h1"} <= {c.name for c in net.connections}
    x = {"x": rng.normal(size=(BATCH, 3))}
    return Case(net, x, rng.normal(0.0, 0.5, (BATCH, net.n)), rng)


def test_case_covers_the_required_topology():
    case = make_case(0)
    conns = {c.name: c for c in case.net.connections}
    assert conns["h3->h2"].tied and conns["h4->h3"].tied  # tied feedback
    assert not conns["h2->h1"].tied and not conns["y->h4"].tied  # independent feedback
    assert conns["h2->h2"].mask is not None  # masked lateral
    assert "y->h1" in conns  # loop output -> first hidden layer
    assert np.ndim(case.net.layer("h1").tau) == 1 and np.ndim(case.net.layer("h2").tau) == 0
    assert {x.activation for x in case.net.layers} == {"tanh", "logistic", "dsilu"}
    assert case.u0.shape == (BATCH, case.net.n)


# ================================================================================================
# Finite differences
# ================================================================================================
def parameter_shape(case: Case, group: str, name) -> tuple:
    net = case.net
    return {"weights": lambda: net.connection(name).weight.shape,
            "biases": lambda: net.layer(name).bias.shape,
            "tau": lambda: np.shape(net.layer(name).tau),
            "inputs": lambda: case.x[name].shape,
            "u0": lambda: case.u0.shape}[group]()


@contextlib.contextmanager
def shifted(case: Case, group: str, name, idx: tuple, delta: float):
    """(x, u0) with one entry of one parameter shifted by ``delta``. Network parameters are replaced
    by shifted copies and the original arrays put back afterwards (bit-exact restoration);
    x and u0 are copied."""
    if group in ("inputs", "u0"):
        x = {k: v.copy() for k, v in case.x.items()}
        u0 = case.u0.copy()
        (x[name] if group == "inputs" else u0)[idx] += delta
        yield x, u0
        return
    holder, attr = {"weights": (case.net.connection, "weight"), "biases": (case.net.layer, "bias"),
                    "tau": (case.net.layer, "tau")}[group]
    holder = holder(name)
    original = getattr(holder, attr)
    if np.ndim(original) == 0:
        new = original + delta
    else:
        new = original.copy()
        new[idx] += delta
    setattr(holder, attr, new)
    try:
        yield case.x, case.u0
    finally:
        setattr(holder, attr, original)


def snapshot(case: Case) -> list:
    net = case.net
    return ([c.weight.copy() for c in net.connections if not c.tied] + [x.bias.copy() for x in net.layers]
            + [np.array(x.tau) for x in net.layers] + [a.copy() for a in case.x.values()] + [case.u0.copy()])


def fd_gradient(objective, case: Case, group: str, name=None, h: float = H_FD) -> np.ndarray:
    """Central differences of ``objective(net, x, u0)`` for every entry of one parameter."""
    shape = parameter_shape(case, group, name)
    out = []
    for idx in np.ndindex(*shape):
        values = []
        for delta in (h, -h):
            with shifted(case, group, name, idx, delta) as (x, u0):
                values.append(objective(case.net, x, u0))
        out.append((values[0] - values[1]) / (2 * h))
    return np.array(out).reshape(shape)


def gradient_of(g: substrate.Gradients, group: str, name=None):
    return g.u0 if group == "u0" else getattr(g, group)[name]


def check_against_fd(g, objective, case: Case, entries, rel: float, label: str, h: float = H_FD) -> float:
    """Compare every entry of the listed parameters with central differences; return the worst
    relative error. Also checks that the network was restored bit for bit."""
    before = snapshot(case)
    worst = 0.0
    for group, name in entries:
        fd = fd_gradient(objective, case, group, name, h)
        got = gradient_of(g, group, name)
        worst = max(worst, check(got, fd, rel, f"{label}: {group}[{name}] vs central differences"))
    after = snapshot(case)
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "parameters not restored"
    return worst


def discrete_objective(loss, integrator, t_span, dt, t_eval=None, trajectory=False):
    """The loss of the states ``integrate`` computes with the same stepper and steps."""
    t_eval = [t_span[1]] if t_eval is None else t_eval

    def objective(net, x, u0):
        sol = integrate(net, x, t_span=t_span, t_eval=t_eval, method=integrator, dt=dt, u0=u0)
        return loss(sol.u if trajectory else sol.u[-1])[0]

    return objective


LAYERS = ("h1", "h2", "h3", "h4", "y")
FD_ENTRIES = (
    [("weights", "h2->h3"),  # source of the masked tied feedback h3->h2
     ("weights", "h3->h4"),  # source of the tied feedback h4->h3
     ("weights", "b->h3"),  # input projection
     ("weights", "y->h1"),  # loop
     ("weights", "h2->h2")]  # masked lateral
    + [("biases", x) for x in LAYERS] + [("tau", x) for x in LAYERS]  # h1: per neuron, others scalar
    + [("inputs", "a"), ("inputs", "b"), ("u0", None)])


# ================================================================================================
# Torch: the same discrete steps, written from the published formulas
# ================================================================================================
def torch_leaves(case: Case, dtype) -> dict:
    """Leaves requiring grad: raw untied weights (masks applied by the mirror), biases, inputs, tau
    per layer (a scalar for a scalar-tau layer) and u0."""
    p = torch_params(case.net, case.x, dtype, grad=True)
    p["tau"] = {x.name: torch.tensor(x.tau, dtype=dtype, requires_grad=True) for x in case.net.layers}
    p["u0"] = as_tensor(case.u0, dtype, grad=True)
    return p


def torch_tau(net: Network, p: dict) -> torch.Tensor:
    return torch.cat([p["tau"][x.name].expand(x.size) for x in net.layers])


def _etd1(N, u, z):
    """u+ = e^z u + (1 - e^z) N(u)."""
    return torch.exp(z) * u - torch.expm1(z) * N(u)


def _etd2rk(N, u, z):
    """a = e^z u + (1 - e^z) N(u);  u+ = a + (h/tau) phi_2(z) [N(a) - N(u)], h/tau = -z."""
    nu = N(u)
    a = torch.exp(z) * u - torch.expm1(z) * nu
    phi2 = (torch.expm1(z) - z) / z ** 2
    return a - z * phi2 * (N(a) - nu)


def _etdrk4(N, u, z):
    """Cox & Matthews (2002) eq. (26)-(29) for u' = c u + F with c = -1/tau, F = N/tau (so
    (e^{ch/2} - 1) F / c = -(e^{z/2} - 1) N and F / (h^2 c^3) = -N / z^2, z = c h)."""
    e, e2, q = torch.exp(z), torch.exp(z / 2), torch.expm1(z / 2)
    nu = N(u)
    a = e2 * u - q * nu
    na = N(a)
    b = e2 * u - q * na
    nb = N(b)
    c = e2 * a - q * (2 * nb - nu)
    nc = N(c)
    return e * u - (nu * (-4 - z + e * (4 - 3 * z + z ** 2))
                    + 2 * (na + nb) * (2 + z + e * (-2 + z))
                    + nc * (-4 - 3 * z - z ** 2 + e * (4 - z))) / z ** 2


TORCH_EXPONENTIAL = {"exp_euler": _etd1, "etd2rk": _etd2rk, "etdrk4": _etdrk4}


def torch_step(stepper, net: Network, p: dict, u: torch.Tensor, h: float) -> torch.Tensor:
    tau = torch_tau(net, p)
    if isinstance(stepper, ExplicitRK):  # k_i = F(u + h sum_j a_ij k_j) / tau;  u+ = u + h sum b_i k_i
        b = np.array(stepper.b, float)
        a = np.array(stepper.a, float).reshape(len(b), len(b))
        ks = []
        for i in range(len(b)):
            y = u
            for j in range(i):
                if a[i, j] != 0:
                    y = y + (h * a[i, j]) * ks[j]
            ks.append(torch_field(net, p, y) / tau)
        for j in range(len(b)):
            if b[j] != 0:
                u = u + (h * b[j]) * ks[j]
        return u
    assert isinstance(stepper, ExponentialRK)
    z = -h / tau
    assert float(torch.min(torch.abs(z.detach()))) >= MIN_Z, "choose h/tau >= MIN_Z: the closed forms cancel"
    return TORCH_EXPONENTIAL[stepper.name](lambda y: torch_field(net, p, y) + y, u, z)


def torch_gradients(case: Case, stepper, loss: QuadraticLoss, step_sizes, dtype=torch.float64,
                    save_after=None) -> dict:
    """dL/dtheta by torch autograd through the given steps, in ``Gradients``' layout: the loss of the
    final state, or with ``save_after`` (step indices, -1 for u0) of the stacked states after those
    steps. For complex tensors torch returns the conjugate of the holomorphic derivative
    (grad_output 1), so it is conjugated back (checked on a toy in test_torch_complex_convention)."""
    p = torch_leaves(case, dtype)
    u = p["u0"]
    states = [u] if save_after is not None and -1 in save_after else []  # -1: the initial state
    for m, h in enumerate(step_sizes):
        u = torch_step(stepper, case.net, p, u, float(h))
        if save_after is not None and m in save_after:
            states.append(u)
    value = loss.torch(u if save_after is None else torch.stack(states))
    keys = [(group, name) for group in ("weights", "biases", "tau", "inputs") for name in p[group]]
    leaves = [p[g][n] for g, n in keys] + [p["u0"]]
    grads = torch.autograd.grad(value, leaves, grad_outputs=torch.ones_like(value))
    grads = [np.conj(gr.numpy()) if gr.is_complex() else gr.numpy() for gr in grads]
    out = {"weights": {}, "biases": {}, "tau": {}, "inputs": {}, "u0": grads[-1], "loss": value.item()}
    for (group, name), gr in zip(keys, grads):
        out[group][name] = gr
    return out


def compare_with_torch(g: substrate.Gradients, want: dict, rel: float, label: str) -> float:
    worst = rel_error(g.loss, want["loss"])
    assert worst <= rel, f"{label}: loss {g.loss} vs torch {want['loss']}"
    for group in ("weights", "biases", "tau", "inputs"):
        got = getattr(g, group)
        assert set(got) == set(want[group]), f"{label}: {group} keys {sorted(got)} != {sorted(want[group])}"
        for name in want[group]:
            worst = max(worst, check(got[name], want[group][name], rel, f"{label}: {group}[{name}] vs torch"))
    return max(worst, check(g.u0, want["u0"], rel, f"{label}: u0 vs torch"))


def test_torch_complex_convention():
    """torch's gradient of a holomorphic L with grad_output 1 is conj(dL/dtheta)."""
    theta = torch.tensor([0.7 + 0.2j, -0.3 + 0.5j], dtype=torch.complex128, requires_grad=True)
    c = torch.tensor([2.0 + 1.0j, -1.0 + 0.5j], dtype=torch.complex128)
    value = torch.sum(c * torch.tanh(theta) ** 2)
    (g,) = torch.autograd.grad(value, theta, grad_outputs=torch.ones_like(value))
    th = theta.detach().numpy()
    want = c.numpy() * 2 * np.tanh(th) * (1 - np.tanh(th) ** 2)
    np.testing.assert_allclose(np.conj(g.numpy()), want, rtol=1e-14)
    assert np.max(np.abs(g.numpy() - want)) > 0.1  # the unconjugated one differs


# ================================================================================================
# 1. Discrete adjoint against central differences, every fixed-step integrator
# ================================================================================================
@pytest.mark.parametrize("name", list(FIXED_STEP))
def test_discrete_adjoint_matches_central_differences(name):
    stepper = FIXED_STEP[name]
    case = make_case(10)
    loss = case.loss()
    dt = FD_DT[name]
    g = gradient(case.net, case.x, loss, t_span=(0.0, T_END), integrator=stepper, dt=dt, u0=case.u0)
    assert g.method == "discrete" and g.solution.steps == len(g.step_sizes) == round(T_END / dt)
    np.testing.assert_allclose(g.step_sizes, dt, rtol=1e-12)
    # the loss and the states are those of integrate with the same steps
    sol = integrate(case.net, case.x, t_span=(0.0, T_END), t_eval=[T_END], method=stepper, dt=dt, u0=case.u0)
    np.testing.assert_array_equal(g.solution.u[-1], sol.u[-1])
    assert g.loss == loss(sol.u[-1])[0]
    assert set(g.weights) == {c.name for c in case.net.connections if not c.tied}
    mask = case.net.connection("h2->h2").mask
    assert np.all(g.weights["h2->h2"][mask == 0] == 0)
    worst = check_against_fd(g, discrete_objective(loss, stepper, (0.0, T_END), dt), case, FD_ENTRIES,
                             REL_FD, name)
    show(f"{name} vs central differences", worst)


# ================================================================================================
# 2. Discrete adjoint against torch autograd through the same steps
# ================================================================================================
@pytest.mark.parametrize("name", list(FIXED_STEP))
@pytest.mark.parametrize("which", ["test-circuit", "layered"])
def test_discrete_adjoint_matches_torch(name, which):
    stepper = FIXED_STEP[name]
    case = make_case(20) if which == "test-circuit" else layered_case(21)
    loss = case.loss()
    g = gradient(case.net, case.x, loss, t_span=(0.0, T_END), integrator=stepper, dt=DT[name], u0=case.u0)
    want = torch_gradients(case, stepper, loss, g.step_sizes)
    show(f"{name} ({which}) vs torch", compare_with_torch(g, want, REL_TORCH, name))


@pytest.mark.parametrize("name", list(TORCH_EXPONENTIAL))
def test_exponential_large_steps_match_torch(name):
    """h/tau in [0.75, 3]: _kernels.phi takes its recurrence branch (|z| >= 1) for most neurons and
    its series for the others; tau's gradient goes through both (complex-step derivative)."""
    stepper = FIXED_STEP[name]
    case = make_case(22)
    loss = case.loss()
    z = 1.5 / case.net.tau
    assert z.min() < 1.0 <= z.max()
    g = gradient(case.net, case.x, loss, t_span=(0.0, 6.0), integrator=stepper, dt=1.5, u0=case.u0)
    want = torch_gradients(case, stepper, loss, g.step_sizes)
    show(f"{name} (h = 1.5) vs torch", compare_with_torch(g, want, REL_TORCH, name))


@pytest.mark.parametrize("trajectory", [False, True], ids=["final", "trajectory"])
def test_adaptive_dopri5_matches_torch_through_accepted_steps(trajectory):
    """dopri5's gradient is that of its accepted steps with their sizes held fixed."""
    case = make_case(30)
    t_eval = [0.0, 0.3, 1.1, T_END] if trajectory else None
    loss = case.loss((4,) if trajectory else ())
    g = gradient(case.net, case.x, loss, t_span=(0.0, T_END), t_eval=t_eval, trajectory=trajectory,
                 integrator="dopri5", rtol=1e-5, atol=1e-8, u0=case.u0)
    hs = g.step_sizes
    assert len(hs) == g.solution.steps >= 5 and np.ptp(hs) > 0.1 * hs.max()  # genuinely adaptive
    assert abs(hs.sum() - T_END) <= 1e-12
    save_after = None
    if trajectory:  # the steps land on the t_eval points: find after which steps
        ends = np.concatenate([[0.0], np.cumsum(hs)])  # the time after step m is ends[m + 1]
        save_after = [int(np.argmin(np.abs(ends - t))) - 1 for t in t_eval]
        np.testing.assert_allclose(ends[np.array(save_after) + 1], t_eval, rtol=0, atol=1e-12)
        assert save_after[0] == -1
    want = torch_gradients(case, METHODS["dopri5"], loss, hs, save_after=save_after)
    show(f"adaptive dopri5 ({'trajectory' if trajectory else 'final'}) vs torch",
         compare_with_torch(g, want, REL_TORCH, "dopri5"))


# ================================================================================================
# 3. Loss on the trajectory
# ================================================================================================
TRAJECTORY_ENTRIES = ([("weights", "h2->h3"), ("weights", "y->h1"), ("weights", "a->h1")]
                      + [("biases", x) for x in LAYERS] + [("tau", x) for x in LAYERS]
                      + [("inputs", "a"), ("inputs", "b"), ("u0", None)])


@pytest.mark.parametrize("name", ["rk4", "etdrk4", "euler"])
def test_trajectory_loss_matches_central_differences(name):
    stepper = FIXED_STEP[name]
    case = make_case(40)
    t_eval = [0.0, 0.5, 1.3, T_END]  # t_eval[0] = t0: u0 itself is in the loss
    loss = case.loss((len(t_eval),))
    dt = DT[name]
    g = gradient(case.net, case.x, loss, t_span=(0.0, T_END), t_eval=t_eval, trajectory=True,
                 integrator=stepper, dt=dt, u0=case.u0)
    assert g.solution.u.shape == (len(t_eval), BATCH, case.net.n)
    np.testing.assert_array_equal(g.solution.u[0], case.u0)
    objective = discrete_objective(loss, stepper, (0.0, T_END), dt, t_eval, trajectory=True)
    show(f"{name} trajectory vs central differences",
         check_against_fd(g, objective, case, TRAJECTORY_ENTRIES, REL_FD, f"{name} trajectory"))
    # the direct term: dropping the t0 part of the loss changes dL/du0 by exactly dL/du(t0)
    partial_loss = QuadraticLoss(loss.c.copy(), loss.d.copy())
    partial_loss.c[0] = partial_loss.d[0] = 0.0
    g2 = gradient(case.net, case.x, partial_loss, t_span=(0.0, T_END), t_eval=t_eval, trajectory=True,
                  integrator=stepper, dt=dt, u0=case.u0)
    direct = loss.c[0] + loss.d[0] * case.u0
    check(g.u0 - g2.u0, direct, 1e-12, "direct term of u0")
    np.testing.assert_array_equal(g.biases["h2"], g2.biases["h2"])  # the t0 term has no parameter part


def test_trajectory_with_only_t1_is_the_final_state_loss():
    """trajectory=True with t_eval = [t1] gives bit for bit the gradient of the final-state loss."""
    case = make_case(41)
    loss = case.loss()
    kw = dict(t_span=(0.0, T_END), integrator="rk4", dt=0.2, u0=case.u0)
    g1 = gradient(case.net, case.x, loss, **kw)
    g2 = gradient(case.net, case.x, lambda u: (loss(u[0])[0], loss(u[0])[1][None]), t_eval=[T_END],
                  trajectory=True, **kw)
    np.testing.assert_array_equal(g1.flat(), g2.flat())


# ================================================================================================
# 4. Checkpointing: bit-identical for every number of checkpoints
# ================================================================================================
CHECKPOINTS = (1, 2, 3, 7, None)


@pytest.mark.parametrize("trajectory", [False, True], ids=["final", "trajectory"])
@pytest.mark.parametrize("name,t_end,dt", [
    ("rk4", 3.7, 0.1),  # 37 steps
    ("euler", 3.7, 0.1),  # one-stage: no replay where the state is stored
    ("exp_euler", 3.7, 0.1),
    ("dopri5", 3.7, None),  # adaptive
    ("rk4", 0.7, 0.1),  # 7 steps, the last one 2 ulp shorter than dt (0.7 - 0.6000000000000001)
], ids=["rk4", "euler", "exp_euler", "dopri5", "rk4-rounded-last-step"])
def test_checkpointing_is_bit_identical(name, t_end, dt, trajectory):
    case = make_case(50)
    t_eval = [0.0, 0.35 * t_end, 0.5 * t_end, t_end] if trajectory else None
    loss = case.loss((4,) if trajectory else ())
    results = {k: gradient(case.net, case.x, loss, method=DiscreteAdjoint(checkpoints=k),
                           t_span=(0.0, t_end), t_eval=t_eval, trajectory=trajectory, integrator=name,
                           dt=dt, u0=case.u0) for k in CHECKPOINTS}
    ref = results[None]
    assert len(ref.step_sizes) >= 7
    for k, g in results.items():
        np.testing.assert_array_equal(g.step_sizes, ref.step_sizes, err_msg=f"checkpoints={k}")
        assert g.loss == ref.loss
        diff = np.max(np.abs(g.flat() - ref.flat()))
        assert np.array_equal(g.flat(), ref.flat()), \
            f"checkpoints={k} differs from checkpoints=None by up to {diff:.3e}"


def test_replay_reproduces_forward_bits_for_any_segment_start():
    """``_kernels.replay`` promises the same bits as ``run``, wherever a replay segment starts. The
    fixed-step forward pass shortens the last step to land on t1 (here by 2 ulp:
    0.7 - 0.6000000000000001).
    Regression: up to commit 8088fa7 the step coefficients were cached with a tolerance
    (|h - h_cached| <= 4e-16 h), so the forward pass reused dt's coefficients for that step while a
    replay segment starting there computed them for the recorded step, and the gradient then
    depended on the number of checkpoints
    (``test_checkpointing_is_bit_identical[rk4-rounded-last-step-final]``)."""
    case = make_case(50)
    loss = case.loss()
    g = gradient(case.net, case.x, loss, t_span=(0.0, 0.7), integrator="rk4", dt=0.1, u0=case.u0)
    hs = g.step_sizes
    assert hs[-1] != 0.1 and abs(hs[-1] - 0.1) <= 4e-16 * hs[-1]  # the rounded last step
    vf = VectorField(case.net, case.x)
    stepper = METHODS["rk4"].kernel_args()
    s, n = len(stepper.bw), case.net.n

    def replay(u, steps):
        ys = np.empty((len(steps), s, n, BATCH))
        rs, ss, u_end = np.empty_like(ys), np.empty_like(ys), np.empty((n, BATCH))
        K.replay(stepper, vf.circuit, np.ascontiguousarray(u), len(steps), np.ascontiguousarray(steps),
                 ys, rs, ss, u_end)
        return u_end.T, ys

    u_all, ys = replay(case.u0.T, hs)
    np.testing.assert_array_equal(u_all, g.solution.u[-1])  # one segment: the forward's bits
    u_last, _ = replay(ys[-1, 0], hs[-1:])  # a segment that starts at the last step
    diff = np.max(np.abs(u_last - g.solution.u[-1]))
    assert np.array_equal(u_last, g.solution.u[-1]), \
        f"replaying the last step alone differs from the forward pass by {diff:.3e}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.complex128])
def test_rho_prime_from_the_activity_has_the_bits_of_rho_prime(dtype):
    """The backward pass takes rho' from the activities r = rho(y) (logistic 4 r (1 - r), tanh
    1 - r^2, the others from y): the same bits as ``activate_prime``, which the gradient's agreement
    with the other gradient methods relies on; over the range and at
    the extremes (saturation, 0, +-inf)."""
    from substrate.activations import CODES
    y = np.concatenate([np.linspace(-30, 30, 1201), [0.0, -0.0, 1e-300, 709.0, -745.0, np.inf, -np.inf]])
    if dtype == np.complex128:  # holomorphic ones only; |Im| < pi/4 keeps tanh away from its poles
        y = y[np.isfinite(y)][:, None] + 1j * np.linspace(-0.7, 0.7, 5)[None, :]
        codes = [CODES[a] for a in ("logistic", "tanh", "identity")]
    else:
        codes = list(CODES.values())
    y = np.ascontiguousarray(y.ravel().astype(dtype))[None, :]
    off = np.array([0, 1], np.int64)
    checked = 0
    for code in codes:
        act = K.layer_activations([code], dtype)
        r, want, got = np.empty_like(y), np.empty_like(y), np.empty_like(y)
        K.activate(y, off, act, r)
        K.activate_prime(y, off, act, want)
        K.rho_prime_from_activity(code, y[0], r[0], got[0], act[1])
        assert np.array_equal(got, want, equal_nan=True), f"activation code {code}, {dtype.__name__}"
        checked += np.count_nonzero(np.isfinite(want))
    assert checked > 0.9 * y.size * len(codes)


# ================================================================================================
# 5. Implicit differentiation at the equilibrium
# ================================================================================================
RELAX_TOL = 1e-13
IMPLICIT_ENTRIES = ([("weights", "h2->h3"), ("weights", "b->h3"), ("weights", "y->h1")]
                    + [("biases", x) for x in LAYERS] + [("inputs", "a"), ("inputs", "b")])


def contracting_case(seed: int) -> Case:
    case = make_case(seed, gain=0.25)
    vf = VectorField(case.net, case.x)
    u = relax(case.net, case.x, tol=RELAX_TOL).u
    J = np.stack([vf.jvp(u, np.broadcast_to(e, u.shape)) for e in np.eye(case.net.n)], axis=2)
    A = J / case.net.tau[None, :, None]  # the ODE's Jacobian diag(1/tau) J
    assert np.max(np.linalg.eigvals(A).real) < -0.4  # contracting at rate >= 0.4 (tau up to 2)
    return case


def test_implicit_matches_central_differences_of_the_equilibrium():
    case = contracting_case(60)
    loss = case.loss()
    g = gradient(case.net, case.x, loss, method="implicit", tol=RELAX_TOL)
    assert g.method == "implicit" and g.step_sizes is None
    u_star = relax(case.net, case.x, tol=RELAX_TOL).u
    assert np.max(np.abs(g.solution.u - u_star)) < 1e-11
    assert g.loss == pytest.approx(loss(u_star)[0], rel=1e-12)
    objective = lambda net, x, u0: loss(relax(net, x, tol=RELAX_TOL).u)[0]  # noqa: E731
    show("implicit (direct) vs central differences",
         check_against_fd(g, objective, case, IMPLICIT_ENTRIES, REL_FD, "implicit", H_IMPLICIT))
    # the equilibrium depends neither on tau nor on u0
    assert all(np.all(v == 0) for v in g.tau.values()) and np.all(g.u0 == 0)
    fd_tau = fd_gradient(objective, case, "tau", "h2", H_IMPLICIT)
    assert abs(fd_tau) < 1e-6, fd_tau


def test_implicit_krylov_matches_direct():
    case = contracting_case(61)
    loss = case.loss()
    direct = gradient(case.net, case.x, loss, method="implicit", tol=RELAX_TOL)
    krylov = gradient(case.net, case.x, loss, method=Implicit(solver="krylov"), tol=RELAX_TOL)
    show("implicit krylov vs direct", check(krylov.flat(), direct.flat(), 1e-8, "krylov vs direct"))


@pytest.mark.parametrize("method", ["implicit", "discrete"])
def test_the_input_gradient_is_computed_when_read_from_its_own_call(method):
    """dL/dx is computed when first read (substrate.dynamics.InputGradients: a training step never reads
    it, and its product costs as much as the input weights' gradient). Read after the input weights
    were changed in place and a gradient taken on the new ones, it is still its own call's, bit for bit."""
    case = contracting_case(61)
    loss = case.loss()
    kw = {"tol": RELAX_TOL} if method == "implicit" else {"t_span": (0.0, 5.0), "dt": 0.1, "integrator": "euler"}
    eager = gradient(case.net, case.x, loss, method=method, **kw)
    expected = {k: eager.inputs[k].copy() for k in eager.inputs}
    lazy = gradient(case.net, case.x, loss, method=method, **kw)
    assert lazy.inputs._dx is None  # not computed by the call
    for c in case.net.connections:
        if c.pre in expected:
            c.weight += 0.1
    moved = gradient(case.net, case.x, loss, method=method, **kw).inputs
    assert sorted(lazy.inputs) == sorted(expected) == ["a", "b"] and len(lazy.inputs) == 2
    for k in expected:
        assert np.array_equal(lazy.inputs[k], expected[k]) and not np.array_equal(moved[k], expected[k])
    assert lazy.inputs._projections is None  # the operands released once computed


def test_discrete_adjoint_converges_to_implicit_as_horizon_grows():
    case = contracting_case(62)
    loss = case.loss()
    implicit = gradient(case.net, case.x, loss, method="implicit", tol=RELAX_TOL).flat()
    errors = []
    for t_end in (5.0, 10.0, 20.0, 40.0):
        g = gradient(case.net, case.x, loss, t_span=(0.0, t_end), integrator="rk4", dt=0.1, u0=case.u0)
        errors.append(rel_error(g.flat(), implicit))
    show("discrete(T=5,10,20,40) vs implicit", errors[-1])
    print("  errors by T:", ", ".join(f"{e:.1e}" for e in errors))
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6, errors


# ================================================================================================
# 6. Complex states: holomorphic derivatives
# ================================================================================================
COMPLEX_ENTRIES = ([("weights", "h2->h3"), ("weights", "b->h3"), ("weights", "y->h1")]
                   + [("biases", x) for x in LAYERS] + [("tau", "h1"), ("tau", "y")]
                   + [("inputs", "a"), ("u0", None)])


@pytest.mark.parametrize("name", ["rk4", "etdrk4", "exp_euler"])
def test_complex_states_holomorphic_gradient(name):
    """A real float64 network run with complex states (complex u0) and a holomorphic loss
    L = sum(c u + d u^2 / 2) with complex c, d: the gradient is the holomorphic derivative, equal to
    the derivative along a real perturbation of each real parameter (central differences of the
    complex L), and to torch autograd with complex tensors (conjugated back)."""
    stepper = FIXED_STEP[name]
    case = make_case(70, imag=0.3)
    assert case.net.dtype == np.float64 and np.iscomplexobj(case.u0)
    loss = case.loss(complex_=True)
    dt = DT[name]
    g = gradient(case.net, case.x, loss, t_span=(0.0, T_END), integrator=stepper, dt=dt, u0=case.u0,
                 dtype="complex128")
    assert g.solution.u.dtype == np.complex128 and g.u0.dtype == np.complex128
    assert np.max(np.abs(g.weights["h2->h3"].imag)) > 1e-3  # genuinely complex gradients
    objective = discrete_objective(loss, stepper, (0.0, T_END), dt)
    show(f"complex {name} vs central differences",
         check_against_fd(g, objective, case, COMPLEX_ENTRIES, REL_FD, f"complex {name}"))
    want = torch_gradients(case, stepper, loss, g.step_sizes, dtype=torch.complex128)
    show(f"complex {name} vs torch", compare_with_torch(g, want, REL_TORCH, f"complex {name}"))


# ================================================================================================
# float32 networks: the float64 gradient within float32 rounding
# ================================================================================================
@pytest.mark.parametrize("name,dt,rel", [("rk4", 0.2, 1e-5), ("etdrk4", 0.5, 1e-5),
                                         ("dopri5", 0.05, 1e-4), ("dopri5", None, 1e-4)],
                         ids=["rk4", "etdrk4", "dopri5-first-step-given", "dopri5"])
def test_float32_gradient_matches_float64(name, dt, rel):
    """The same (float32-representable) parameters in a float32 and a float64 network. dopri5 may
    choose slightly different steps in float32, hence its looser tolerance (its rtol is 1e-6).
    With dt=None dopri5 picks its first step by itself: ``integrators._initial_step`` must keep the
    trial state in float32 (it multiplied F by a float64 1/tau and passed the float64 state u + h0 f0
    back to the float32 VectorField, which rejects it with "mismatched dtypes")."""
    case = make_case(90)
    net32 = cast_network(case.net, np.float32)
    net64 = cast_network(net32, np.float64)
    x32 = {k: v.astype(np.float32) for k, v in case.x.items()}
    u0 = case.u0.astype(np.float32)
    loss = case.loss()
    kw = dict(t_span=(0.0, T_END), integrator=name, dt=dt)
    x64 = {k: v.astype(np.float64) for k, v in x32.items()}
    g64 = gradient(net64, x64, loss, u0=u0.astype(np.float64), **kw)
    g32 = gradient(net32, x32, lambda u: (loss(u)[0], loss(u)[1].astype(np.float32)), u0=u0, **kw)
    assert g32.u0.dtype == np.float32 and g32.weights["h2->h3"].dtype == np.float32
    show(f"float32 {name} vs float64", check(g32.flat(), g64.flat(), rel, f"float32 {name}"))


# ================================================================================================
# 7. Bad input
# ================================================================================================
def _small():
    case = make_case(80, gain=0.4)
    return case, dict(t_span=(0.0, 1.0), integrator="rk4", dt=0.1, u0=case.u0)


BAD_LOSSES = {  # what the loss returns -> what the error message must say
    "nan-value": (lambda u: (float("nan"), np.ones_like(u)), "loss: the value nan is not a finite scalar"),
    "array-value": (lambda u: (np.array([1.0, 2.0]), np.ones_like(u)),
                    "loss: the value .* not a finite scalar"),
    "nan-gradient": (lambda u: (1.0, np.where(np.arange(u.size).reshape(u.shape) == 0, np.nan, 1.0)),
                     "loss: dL/du contains NaN"),
    "wrong-shape": (lambda u: (1.0, np.ones(u.shape[-1])), r"loss: dL/du has shape \(\d+,\), expected"),
    "not-a-pair": (lambda u: 1.0, r"loss must return \(value, dL/du\)"),
    # real states, complex dL/du: reported (naming the loss) before any compiled code runs
    "complex-gradient": (lambda u: (1.0, (1.0 + 1.0j) * np.ones_like(u)), "loss"),
}


@pytest.mark.parametrize("method", ["discrete", "implicit"])
@pytest.mark.parametrize("bad", list(BAD_LOSSES))
def test_bad_loss_is_named(bad, method):
    case, kw = _small()
    if method == "implicit":
        kw = dict(method="implicit")
    loss, message = BAD_LOSSES[bad]
    with pytest.raises(SubstrateValueError, match=message):
        gradient(case.net, case.x, loss, **kw)


def test_loss_must_be_callable():
    case, kw = _small()
    with pytest.raises(SubstrateValueError, match="loss must be a callable"):
        gradient(case.net, case.x, None, **kw)


def test_implicit_without_convergence_raises():
    case, _ = _small()
    loss = case.loss()
    with pytest.raises(ConvergenceError):
        gradient(case.net, case.x, loss, method="implicit", max_steps=3)


def test_unknown_method_lists_allowed():
    case, kw = _small()
    with pytest.raises(SubstrateValueError, match="allowed: ") as info:
        gradient(case.net, case.x, case.loss(), method="adjoint", **kw)
    assert "'adjoint'" in str(info.value)
    for name in ADJOINTS:  # implicit, discrete, ...
        assert name in str(info.value).split("allowed: ")[1], (name, str(info.value))


def test_discrete_requires_t_span():
    case, kw = _small()
    kw.pop("t_span")
    with pytest.raises(SubstrateValueError, match="t_span is required"):
        gradient(case.net, case.x, case.loss(), **kw)


@pytest.mark.parametrize("bad", [
    dict(t_span=(1.0, 0.0)),
    dict(t_eval=[0.5]),  # does not end at t1
    dict(t_eval=[-0.5, 1.0]),  # before t0
    dict(method=DiscreteAdjoint(checkpoints=0)),
    dict(dt=-0.1),
    dict(integrator="heun"),
], ids=["t_span-reversed", "t_eval-not-ending-at-t1", "t_eval-before-t0", "checkpoints-0", "dt-negative",
        "integrator-unknown"])
def test_discrete_bad_arguments(bad):
    case, kw = _small()
    kw.update(bad)
    with pytest.raises(SubstrateValueError):
        gradient(case.net, case.x, case.loss(), **kw)


def test_implicit_rejects_t_span_and_bad_solver():
    case, _ = _small()
    with pytest.raises(SubstrateValueError, match="t_span"):
        gradient(case.net, case.x, case.loss(), method="implicit", t_span=(0.0, 1.0))
    with pytest.raises(SubstrateValueError, match="solver"):
        gradient(case.net, case.x, case.loss(), method=Implicit(solver="lu"))


def test_implicit_singular_jacobian():
    """A linear neuron with a self-connection of weight 1 has J = -1 + 1 = 0 at every state; with
    no drive it stays at 0, so the residual test passes, but the fixed point is not an isolated
    stable equilibrium (eigenvalue 0) and J^T lambda = -dL/du has no solution: relax reports it
    unstable with the eigenvalue and the implicit gradient refuses it."""
    layer = substrate.Layer("h", 2, activation="identity", bias=np.array([0.0, 1.0]))
    net = Network([layer], [substrate.Connection("h", "h", np.array([[1.0, 0.0], [0.0, 0.0]]))])
    loss = QuadraticLoss(np.ones((1, 2)), np.zeros((1, 2)))
    sol = relax(net, batch=1, tol=1e-12, on_failure="return")
    np.testing.assert_allclose(sol.u, [[0.0, 1.0]], atol=1e-11)
    assert sol.status == "unstable" and abs(sol.eigenvalue[0]) < 1e-12
    with pytest.raises(substrate.ConvergenceError, match="unstable or singular.*eigenvalue"):
        gradient(net, None, loss, method="implicit", batch=1, tol=1e-12)
    # and any Jacobian counts as singular with cond_max = 1
    case, _ = _small()
    with pytest.raises(SubstrateValueError, match="singular"):
        gradient(case.net, case.x, case.loss(), method=Implicit(cond_max=1.0))
