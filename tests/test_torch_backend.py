"""The PyTorch backend (``substrate.torch_backend``): the torch mirror of the circuit and gradients
through torchdiffeq, checked against substrate's own engine.

* The mirror's F against ``VectorField`` (two independent implementations of the same formula:
  the mirror is written from the network description, the engine runs on packed arrays).
* ``TorchDiffEq(adjoint=False)`` with a fixed-step method takes the very steps of substrate's
  integrator (same step grid, same tableau), so its backpropagated gradient and substrate's
  hand-written discrete adjoint must agree up to rounding.
* ``TorchDiffEq(adjoint=True, method="dopri5")`` (the continuous adjoint at tight tolerances) and
  the discrete adjoint of rk4 at a small step both approximate the exact gradient of the continuous
  dynamics, so they agree up to the discretisation errors.

The test circuit has five state layers (one per activation, rotated), independent and tied feedback
(one tied connection masked and listed before its source), masked lateral connections, a loop from
the output to the first hidden layer, per-neuron tau on one layer and two inputs.

Tolerances (norm-wise, per array: ``max|got - want| <= rel * max|want|``):

* ``REL_F = 1e-13``: F in float64; both sides exact up to summation order and the engine's own exp
  (a few eps of |F| ~ 1-10; ~1e-16 observed).
* ``REL_DISCRETE = 1e-10``: the same discrete steps differentiated by two implementations; rounding
  accumulates over the ~100 steps and the backward recursion (~1e-15..1e-14 observed).
* ``REL_CONTINUOUS = 1e-6``: dopri5 at rtol 1e-10 / atol 1e-12 (forward and adjoint) against rk4 at
  dt = 0.01, whose global error is O(dt^4) ~ 1e-8 times the dynamics' constants. Only for smooth
  activations: with hard_sigmoid the field has kinks, the gradients of both schemes converge at low
  order, and rk4 at dt = 0.01 is still ~1e-2 away from the continuous gradient (measured against
  dt = 0.001), so the hard_sigmoid layer is covered by the discrete cross-check only.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import torch  # noqa: E402  (torch and torchdiffeq are test dependencies)

import substrate  # noqa: E402
from substrate import SubstrateValueError, VectorField  # noqa: E402
from substrate.activations import HOLOMORPHIC, NAMES  # noqa: E402
from test_derivatives import (ACTIVATIONS, HOLO_ACTIVATIONS, LAYER_SIZES,  # noqa: E402
                              make_inputs, make_network)
from substrate.torch_backend import (METHODS, TorchDiffEq, TorchField, torch_rho,  # noqa: E402
                                     torchdiffeq_gradient)

BATCH = 3
T_SPAN = (0.0, 1.5)
DT = 0.05  # 30 steps
REL_F = 1e-13
REL_DISCRETE = 1e-10
REL_CONTINUOUS = 1e-6

assert set(ACTIVATIONS) == set(NAMES) and set(HOLO_ACTIVATIONS) == set(HOLOMORPHIC)


# ================================================================================================
# The test circuit, inputs and losses
# ================================================================================================
def rotated(names, k):
    return [names[(k + i) % len(names)] for i in range(len(LAYER_SIZES))]


def random_like(shape, rng, complex_: bool = False):
    v = rng.normal(size=shape)
    return v + 1j * rng.normal(size=shape) if complex_ else v


def quadratic_loss(c: np.ndarray):
    """L(u) = sum(c u) + 0.5 sum(u^2) (holomorphic: plain products, no conjugate); dL/du = c + u.
    Works for the final state (batch, n) and for the trajectory (len(t_eval), batch, n)."""
    def loss(u):
        return np.sum(c * u) + 0.5 * np.sum(u * u), c + u
    return loss


def case(seed: int, activations=ACTIVATIONS, complex_: bool = False):
    rng = np.random.default_rng(seed)
    net = make_network(rng, activations)
    x = make_inputs(net, rng)
    return net, x, rng


def relative_errors(got: substrate.Gradients, want: substrate.Gradients) -> dict:
    """Per array: max|got - want| / max|want|; also checks that keys and shapes agree."""
    errors = {}
    for group in ("weights", "biases", "tau", "inputs"):
        g, w = getattr(got, group), getattr(want, group)
        assert set(g) == set(w), f"{group}: keys {sorted(g)} != {sorted(w)}"
        for name in w:
            a, b = np.asarray(g[name]), np.asarray(w[name])
            assert a.shape == b.shape, f"{group}[{name!r}]: shape {a.shape} != {b.shape}"
            errors[f"{group}[{name}]"] = float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-300)
    assert got.u0.shape == want.u0.shape
    errors["u0"] = float(np.max(np.abs(got.u0 - want.u0))) / float(np.max(np.abs(want.u0)))
    errors["loss"] = abs(got.loss - want.loss) / abs(want.loss)
    return errors


def assert_gradients_close(got, want, rel: float, what: str = ""):
    errors = relative_errors(got, want)
    worst = max(errors, key=errors.get)
    print(f"{what}: worst relative error {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= rel, f"{what}: {worst} relative error {errors[worst]:.3e} > {rel:.0e}"


def torch_gradient(strategy, net, x, loss, *, t_span=T_SPAN, t_eval=None, trajectory=False, dt=None,
                   u0=None, dtype=None, batch=None):
    return torchdiffeq_gradient(strategy, net, x, loss, t_span, t_eval, trajectory, dt, u0, dtype, batch)


# ================================================================================================
# 1. The mirror
# ================================================================================================
def test_torch_rho_matches_numpy_reference():
    z = np.linspace(-3.0, 3.0, 61)
    for name in NAMES:
        got = torch_rho(name, torch.tensor(z)).numpy()
        np.testing.assert_allclose(got, substrate.activations.rho(name, z), rtol=1e-15, atol=1e-16,
                                   err_msg=name)


def test_hard_sigmoid_derivative_convention():
    """rho' of hard_sigmoid is 1 on the open interval (0, 1) only, as in substrate (torch's clamp
    would give 1 at the kinks, which the default initial state u0 = 0 sits on)."""
    z = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.5], dtype=torch.float64, requires_grad=True)
    torch_rho("hard_sigmoid", z).sum().backward()
    want = substrate.activations.rho_prime("hard_sigmoid", z.detach().numpy())
    np.testing.assert_array_equal(z.grad.numpy(), want)


def test_mirror_leaves_and_effective_weights():
    net, x, _ = case(1)
    field = TorchField(net, x, None)
    assert set(field.weights) == {c.name for c in net.connections if not c.tied}
    assert set(field.biases) == set(field.tau) == set(net.slices)
    assert set(field.inputs) == set(x)
    assert all(p.is_leaf and p.requires_grad and p.dtype == torch.float64 for p in field.leaves())
    assert {id(p) for p in field.parameters()} == {id(p) for p in field.leaves()}
    for layer in net.layers:
        assert tuple(field.tau[layer.name].shape) == np.shape(layer.tau)
    for c in net.connections:
        np.testing.assert_array_equal(field.effective_weight(c).detach().numpy(), net.effective_weight(c),
                                      err_msg=c.name)
    np.testing.assert_array_equal(field.tau_vector().detach().numpy(), net.tau)


@pytest.mark.parametrize("k", range(len(ACTIVATIONS)), ids=lambda k: "h1=" + ACTIVATIONS[k])
def test_mirror_field_matches_vector_field(k):
    net, x, rng = case(10 + k, rotated(ACTIVATIONS, k))
    u = rng.normal(0.5, 1.0, (BATCH, net.n))
    want = VectorField(net, x)(u)
    field = TorchField(net, x, None)
    got = field.F(torch.tensor(u)).detach().numpy()
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    print(f"F: relative error {err:.1e}")
    assert err <= REL_F
    f = field(torch.tensor(0.0), torch.tensor(u)).detach().numpy()
    np.testing.assert_allclose(f, want / net.tau, rtol=1e-13, atol=0)


@pytest.mark.parametrize("k", range(len(HOLO_ACTIVATIONS)), ids=lambda k: "h1=" + HOLO_ACTIVATIONS[k])
def test_mirror_complex_field_matches_vector_field(k):
    net, x, rng = case(20 + k, rotated(HOLO_ACTIVATIONS, k))
    u = rng.normal(0.5, 1.0, (BATCH, net.n)) + 1j * rng.uniform(-0.25, 0.25, (BATCH, net.n))
    want = VectorField(net, x, dtype="complex128")(u)
    field = TorchField(net, x, "complex128")
    assert field.dtype == torch.complex128
    got = field.F(torch.tensor(u)).detach().numpy()
    assert np.max(np.abs(got - want)) <= REL_F * np.max(np.abs(want))


# ================================================================================================
# 2. Backprop through torchdiffeq's steps == substrate's discrete adjoint (rounding agreement)
# ================================================================================================
@pytest.mark.parametrize("k", range(len(ACTIVATIONS)), ids=lambda k: "h1=" + ACTIVATIONS[k])
@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_backprop_matches_discrete_adjoint(method, k):
    """Final-state loss from the default u0 = 0 (hard_sigmoid layers start on their kink)."""
    net, x, rng = case(30 + k, rotated(ACTIVATIONS, k))
    loss = quadratic_loss(rng.normal(size=(BATCH, net.n)))
    want = substrate.gradient(net, x, loss, method="discrete", integrator=method, dt=DT, t_span=T_SPAN)
    got = torch_gradient(TorchDiffEq(adjoint=False, method=method), net, x, loss, dt=DT)
    assert got.method == "torchdiffeq" and got.solution.steps == len(want.step_sizes)
    np.testing.assert_allclose(got.step_sizes, want.step_sizes, rtol=1e-12)
    assert_gradients_close(got, want, REL_DISCRETE, f"{method} backprop vs discrete adjoint")


@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_backprop_matches_discrete_adjoint_on_trajectory(method):
    """Trajectory loss at t_eval points off the dt grid (steps are cut to land on them) and one at
    t0; a random initial state."""
    net, x, rng = case(40)
    t_eval = np.array([0.0, 0.33, 0.5, 1.01, 1.5])
    u0 = rng.normal(0.5, 1.0, (BATCH, net.n))
    loss = quadratic_loss(rng.normal(size=(len(t_eval), BATCH, net.n)))
    kwargs = dict(t_span=T_SPAN, t_eval=t_eval, trajectory=True, dt=DT, u0=u0)
    want = substrate.gradient(net, x, loss, method="discrete", integrator=method, **kwargs)
    got = torch_gradient(TorchDiffEq(adjoint=False, method=method), net, x, loss, **kwargs)
    np.testing.assert_allclose(got.step_sizes, want.step_sizes, rtol=1e-12)
    np.testing.assert_allclose(got.solution.u, want.solution.u, rtol=1e-12, atol=1e-13)
    assert_gradients_close(got, want, REL_DISCRETE, f"{method} trajectory backprop vs discrete adjoint")


def test_backprop_complex_matches_discrete_adjoint():
    """complex128 states: holomorphic gradients (no conjugate) from both implementations."""
    net, x, rng = case(50, rotated(HOLO_ACTIVATIONS, 1))
    u0 = random_like((BATCH, net.n), rng, complex_=True) * 0.5
    loss = quadratic_loss(random_like((BATCH, net.n), rng, complex_=True))
    kwargs = dict(t_span=T_SPAN, dt=DT, u0=u0, dtype="complex128")
    want = substrate.gradient(net, x, loss, method="discrete", integrator="rk4", **kwargs)
    got = torch_gradient(TorchDiffEq(adjoint=False, method="rk4"), net, x, loss, **kwargs)
    assert np.iscomplexobj(got.weights["h1->h2"]) and np.iscomplexobj(got.u0)
    assert_gradients_close(got, want, REL_DISCRETE, "complex rk4 backprop vs discrete adjoint")


def test_gradients_layout():
    net, x, rng = case(60)
    loss = quadratic_loss(rng.normal(size=(BATCH, net.n)))
    g = torch_gradient(TorchDiffEq(adjoint=False, method="euler"), net, x, loss, dt=0.1)
    assert set(g.weights) == {c.name for c in net.connections if not c.tied}
    for c in net.connections:
        if not c.tied:
            assert g.weights[c.name].shape == c.weight.shape
            if c.mask is not None:
                assert np.all(g.weights[c.name][c.mask == 0] == 0), c.name
    for layer in net.layers:
        assert np.shape(g.tau[layer.name]) == np.shape(layer.tau)
        assert g.biases[layer.name].shape == (layer.size,)
    assert {k: v.shape for k, v in g.inputs.items()} == {k: v.shape for k, v in x.items()}
    assert g.u0.shape == (BATCH, net.n)
    assert g.solution.u.shape == (1, BATCH, net.n) and g.solution.ok
    assert g.flat().shape == substrate.gradient(net, x, loss, dt=0.1, t_span=T_SPAN).flat().shape


# ================================================================================================
# 3. The continuous adjoint (odeint_adjoint) ~ the exact gradient
# ================================================================================================
def test_continuous_adjoint_dopri5_matches_discrete_adjoint_at_small_step():
    net, x, rng = case(70, rotated(HOLO_ACTIVATIONS, 2))
    u0 = rng.normal(0.5, 1.0, (BATCH, net.n))
    loss = quadratic_loss(rng.normal(size=(BATCH, net.n)))
    want = substrate.gradient(net, x, loss, method="discrete", integrator="rk4", dt=0.01, t_span=T_SPAN,
                              u0=u0)
    strategy = TorchDiffEq(adjoint=True, method="dopri5", rtol=1e-10, atol=1e-12)
    got = torch_gradient(strategy, net, x, loss, u0=u0)
    assert got.solution.steps == len(got.step_sizes) > 0
    assert_gradients_close(got, want, REL_CONTINUOUS, "dopri5 adjoint vs rk4 discrete adjoint dt=0.01")


def test_continuous_adjoint_on_trajectory_with_fixed_step():
    """odeint_adjoint with rk4 steps (forward and backward at dt = 0.01) on a trajectory loss."""
    net, x, rng = case(80, rotated(HOLO_ACTIVATIONS, 0))
    t_eval = np.array([0.5, 1.0, 1.5])
    loss = quadratic_loss(rng.normal(size=(len(t_eval), BATCH, net.n)))
    kwargs = dict(t_span=T_SPAN, t_eval=t_eval, trajectory=True, dt=0.01)
    want = substrate.gradient(net, x, loss, method="discrete", integrator="rk4", **kwargs)
    got = torch_gradient(TorchDiffEq(adjoint=True, method="rk4"), net, x, loss, **kwargs)
    assert_gradients_close(got, want, REL_CONTINUOUS, "rk4 adjoint vs rk4 discrete adjoint dt=0.01")


def test_rk4_38_is_torchdiffeqs_own_rk4():
    """"rk4" is the classical method (substrate's); "rk4_38" torchdiffeq's 3/8 rule: a different
    order-4 method, so it differs at finite dt but agrees as dt -> 0."""
    assert METHODS["rk4"] == "substrate_rk4" and METHODS["rk4_38"] == "rk4"
    net, x, rng = case(90, rotated(HOLO_ACTIVATIONS, 1))
    loss = quadratic_loss(rng.normal(size=(BATCH, net.n)))
    errors = []
    for dt in (0.1, 0.05):
        ref = torch_gradient(TorchDiffEq(adjoint=False, method="rk4"), net, x, loss, dt=dt)
        alt = torch_gradient(TorchDiffEq(adjoint=False, method="rk4_38"), net, x, loss, dt=dt)
        errors.append(max(relative_errors(alt, ref).values()))
    print("rk4 vs rk4_38 at dt = 0.1, 0.05:", errors)
    assert 1e-10 < errors[1] < errors[0] / 8 < 1e-4  # different methods, both of order 4


# ================================================================================================
# 4. Bad input
# ================================================================================================
def _bad(match, strategy=None, **kwargs):
    net, x, rng = case(100)
    loss = quadratic_loss(np.ones((BATCH, net.n)))
    args = dict(net=net, x=x, loss=loss, t_span=T_SPAN, dt=DT)
    args.update(kwargs)
    with pytest.raises(SubstrateValueError, match=match):
        torch_gradient(strategy or TorchDiffEq(adjoint=False), args.pop("net"), args.pop("x"),
                       args.pop("loss"), **args)


@pytest.mark.parametrize("strategy,match", [
    (TorchDiffEq(method="rk5"), "not a torchdiffeq method"),
    (TorchDiffEq(method="scipy_solver"), "not a torchdiffeq method"),
    (TorchDiffEq(adjoint="yes"), "must be True or False"),
    (TorchDiffEq(rtol=-1.0), "rtol"),
    (TorchDiffEq(method="dopri5", rtol=0.0, atol=0.0), "cannot both be 0"),
    (TorchDiffEq(options=[("step_size", 0.1)]), "must be a dict"),
    (TorchDiffEq(adjoint_atol="small"), "adjoint_atol"),
], ids=["method", "scipy", "adjoint", "rtol", "tolerances", "options", "adjoint_atol"])
def test_bad_strategy(strategy, match):
    _bad(match, strategy)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dt=None), "dt is required for the fixed-step method 'rk4'"),
    (dict(dt=-0.1), "dt=-0.1 must be a positive"),
    (dict(t_span=None), "t_span is required"),
    (dict(t_span=(1.0, 0.0)), "t1 > t0"),
    (dict(t_span="later"), "must be a pair"),
    (dict(t_eval=[0.5, 1.0]), "end at t_span"),
    (dict(t_eval=[1.0, 0.5, 1.5]), "strictly increasing"),
    (dict(loss="mse"), "loss must be a callable"),
    (dict(loss=lambda u: (0.0, np.zeros(3))), "dL/du has shape"),
    (dict(loss=lambda u: (np.nan, np.zeros_like(u))), "not a finite scalar"),
    (dict(loss=lambda u: (0.0, 1j * np.ones_like(u))), "dtype complex128 but the states"),
    (dict(x=np.zeros((BATCH, 3))), "x must be a dict"),
    (dict(x={"a": np.zeros((BATCH, 4)), "b": np.zeros((BATCH, 2))}), "expected \\(batch, 3\\)"),
    (dict(u0=np.zeros((BATCH, 2))), "u0 has shape"),
    (dict(dtype="int32"), "dtype='int32' is not supported"),
    (dict(net="network"), "must be a substrate Network"),
    (dict(trajectory="yes"), "trajectory"),
])
def test_bad_arguments(kwargs, match):
    _bad(match, **kwargs)


# ================================================================================================
# 5. Packaging and the gradient entry point
# ================================================================================================
def test_import_substrate_does_not_import_torch():
    code = ("import sys, substrate; substrate.gradient; "
            "assert 'torch' not in sys.modules and 'torchdiffeq' not in sys.modules, 'torch imported'; "
            "assert 'substrate.torch_backend' not in sys.modules; "
            "import substrate.torch_backend as tb; assert 'torch' in sys.modules; "
            "assert issubclass(tb.TorchDiffEq, substrate.adjoint.AbstractAdjoint); "
            "assert tb.TorchDiffEq.name == 'torchdiffeq'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_gradient_entry_point_dispatches():
    net, x, rng = case(110, rotated(HOLO_ACTIVATIONS, 0))
    loss = quadratic_loss(rng.normal(size=(BATCH, net.n)))
    strategy = TorchDiffEq(adjoint=False, method="rk4")
    direct = torch_gradient(strategy, net, x, loss, dt=DT)
    via = substrate.gradient(net, x, loss, method=strategy, t_span=T_SPAN, dt=DT)
    assert via.method == "torchdiffeq"
    np.testing.assert_array_equal(via.flat(), direct.flat())
    assert isinstance(substrate.adjoint.get_adjoint("torchdiffeq"), TorchDiffEq)
    by_name = substrate.gradient(net, x, loss, method="torchdiffeq", t_span=T_SPAN, dt=0.01)
    assert by_name.method == "torchdiffeq"  # the default TorchDiffEq(): odeint_adjoint with rk4 steps
    assert max(relative_errors(by_name, direct).values()) < 1e-5  # dt = 0.01 vs 0.05, both O(dt^4)
