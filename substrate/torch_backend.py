"""PyTorch backend: a torch mirror of the circuit and gradients through ``torchdiffeq``.

This module imports torch and torchdiffeq; ``import substrate`` never imports it (install the
``torch`` extra and import ``substrate.torch_backend`` explicitly, or let ``substrate.gradient``
import it for ``method="torchdiffeq"``).

* :class:`TorchField`: the vector field f(t, u) = F(u) / tau with
  F(u) = -u + sum_c W_eff_c rho(u_pre) + sum_k V_k x_k + b, written from the network *description*
  (layers, connections, masks, tied flags), never from the engine's packed arrays. Its leaves
  (``requires_grad``) are the raw weight of every untied connection, every layer's bias, every
  layer's tau as given (a scalar or one per neuron) and the inputs; a tied connection's weight is
  built from its source's tensor, so autograd adds its gradient (transposed, masked) to the source.
  States are (batch, n) tensors in state order.
* :class:`TorchDiffEq` and :func:`torchdiffeq_gradient`: dL/dtheta by backpropagation through
  ``torchdiffeq.odeint`` (``adjoint=False``: the exact gradient of the solver's own steps) or by
  ``torchdiffeq.odeint_adjoint`` (``adjoint=True``: the continuous adjoint ODE solved backwards, an
  approximation of the exact gradient of the continuous dynamics). The result has the layout of
  :class:`substrate.adjoint.Gradients` from the discrete adjoint.

Method names are torchdiffeq's, with one exception: ``"rk4"`` is the classical Runge-Kutta method
(the tableau of ``substrate.integrators.METHODS["rk4"]``), registered with torchdiffeq as
``"substrate_rk4"``; torchdiffeq's own ``"rk4"`` is the 3/8-rule variant, available here as
``"rk4_38"``. Fixed-step methods step with ``dt`` from t0 and land exactly on every ``t_eval``
point (a step within 1e-7 dt of it is stretched), as substrate's integrators do; so
``TorchDiffEq(adjoint=False, method="rk4")`` takes the very steps of ``integrator="rk4"`` and its
gradients agree with the discrete adjoint up to rounding. Passing ``options={"step_size": ...}`` or
``{"grid_constructor": ...}`` restores torchdiffeq's own grid (which interpolates at t_eval points
between steps).

For complex128 states (holomorphic activations) every parameter is a complex leaf and the
gradients are holomorphic (no conjugation), as in :class:`substrate.dynamics.VectorField`: torch's
conjugate convention is undone by conjugating the cotangents in and the gradients out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchdiffeq
from torch import nn
from torchdiffeq._impl.misc import Perturb
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

from .adjoint import AbstractAdjoint, Gradients, _evaluate_loss
from .dynamics import resolve_dtype
from .errors import DivergenceError, StepSizeError, SubstrateValueError
from .integrators import Solution, _nonnegative, _positive, _prepare
from .integrators import _check_times as check_times
from .network import Connection, Network

__all__ = ["TorchField", "TorchDiffEq", "torchdiffeq_gradient", "torch_rho", "METHODS"]

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                 np.dtype(np.complex128): torch.complex128}
_NUMPY_DTYPES = {v: k for k, v in _TORCH_DTYPES.items()}


# ------------------------------------------------------------------------------------ activations
def _hard_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """clip(z, 0, 1) with substrate's derivative: 1 on the open interval (0, 1), 0 elsewhere
    (torch's clamp passes the gradient at the kinks z = 0 and z = 1 as well, which matters at the
    default initial state u0 = 0)."""
    inside = (z > 0.0) & (z < 1.0)
    return torch.where(inside, z, torch.clamp(z.detach(), 0.0, 1.0))


def torch_rho(name: str, z: torch.Tensor) -> torch.Tensor:
    """rho(z) of ``substrate.activations`` in torch (real or complex z)."""
    if name == "logistic":
        return torch.sigmoid(4.0 * z - 2.0)
    if name == "hard_sigmoid":
        return _hard_sigmoid(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "dsilu":
        return 0.5 * z * torch.sigmoid(z) + (1.0 - 0.5 * z) * torch.sigmoid(z - 2.0)
    if name == "identity":
        return z
    raise SubstrateValueError(f"activation={name!r} has no torch mirror")


def _torch_dtype(network: Network, dtype) -> tuple[np.dtype, torch.dtype]:
    if isinstance(dtype, torch.dtype):
        if dtype not in _NUMPY_DTYPES:
            raise SubstrateValueError(f"dtype={dtype} is not supported; "
                                      "allowed: float32, float64, complex128")
        dtype = _NUMPY_DTYPES[dtype]
    np_dtype = resolve_dtype(network, dtype)
    return np_dtype, _TORCH_DTYPES[np_dtype]


# ------------------------------------------------------------------------------------ the mirror
class TorchField(nn.Module):
    """The circuit in torch: ``field(t, u)`` = F(u) / tau, ``field.F(u)`` = F(u), u of shape
    (batch, n).

    network: a :class:`~substrate.Network`; x: its inputs (as for :func:`substrate.integrate`);
    dtype: the state dtype (None: the network's; complex128 for a float64 network with holomorphic
    activations), a NumPy or torch dtype. The parameters are copied at construction (later edits of
    the network do not reach the field) into leaf tensors in the state dtype, all ``nn.Parameter``
    (so ``field.parameters()`` lists them): ``weights`` {untied connection name: (post, pre)},
    ``biases`` {layer: (size,)}, ``tau`` {layer: () or (size,), as the layer's tau}, ``inputs``
    {input: (batch, size)}. Masks are constants. With ``requires_grad=False`` the leaves do not
    require gradients.
    """

    def __init__(self, network: Network, x=None, dtype=None, *, requires_grad: bool = True):
        super().__init__()
        if not isinstance(network, Network):
            raise SubstrateValueError(f"network must be a substrate Network, got {type(network).__name__}")
        self.network = network
        self.numpy_dtype, self.dtype = _torch_dtype(network, dtype)
        xs = network.check_inputs(x)
        if self.numpy_dtype.kind != "c" and any(np.iscomplexobj(a) for a in xs.values()):
            raise SubstrateValueError(f"x is complex but the states are {self.numpy_dtype}; "
                                      "pass dtype='complex128'")
        self.batch = next(iter(xs.values())).shape[0] if xs else None
        real = torch.float32 if self.dtype == torch.float32 else torch.float64

        def leaf(a):
            return nn.Parameter(torch.tensor(np.asarray(a), dtype=self.dtype), requires_grad=requires_grad)

        self.weights = {c.name: leaf(c.weight) for c in network.connections if not c.tied}
        self.biases = {layer.name: leaf(layer.bias) for layer in network.layers}
        self.tau = {layer.name: leaf(layer.tau) for layer in network.layers}
        self.inputs = {name: leaf(a) for name, a in xs.items()}
        self.masks = {c.name: torch.tensor(np.asarray(c.mask), dtype=real)
                      for c in network.connections if c.mask is not None}
        self._leaves = nn.ParameterList(self.leaves())
        self._incoming = {layer.name: [c for c in network.connections if c.post == layer.name]
                          for layer in network.layers}

    def leaves(self) -> list:
        """Every parameter leaf: weights, biases, tau, inputs (in that order)."""
        return [*self.weights.values(), *self.biases.values(), *self.tau.values(), *self.inputs.values()]

    def effective_weight(self, c: Connection | str) -> torch.Tensor:
        """weight * mask, where a tied connection's weight is the transpose of its source's effective
        (masked) weight (as ``Network.effective_weight``), built from the source's leaf."""
        if isinstance(c, str):
            c = self.network.connection(c)
        if c.tied:
            w = self.effective_weight(self.network.connection(f"{c.post}->{c.pre}")).T
        else:
            w = self.weights[c.name]
        return w * self.masks[c.name] if c.mask is not None else w

    def tau_vector(self) -> torch.Tensor:
        """The time constants of all n neurons in state order, shape (n,)."""
        return torch.cat([self.tau[x.name].expand(x.size) for x in self.network.layers])

    def F(self, u: torch.Tensor) -> torch.Tensor:
        """F(u) = -u + sum_c W_eff_c rho(u_pre) + V x + b for u of shape (batch, n)."""
        net = self.network
        if u.ndim != 2 or u.shape[1] != net.n:
            raise SubstrateValueError(f"u has shape {tuple(u.shape)}, expected (batch, {net.n})")
        r = {x.name: torch_rho(x.activation, u[:, net.slices[x.name]]) for x in net.layers}
        blocks = []
        for layer in net.layers:
            f = self.biases[layer.name] - u[:, net.slices[layer.name]]
            for c in self._incoming[layer.name]:
                src = self.inputs[c.pre] if c.pre in net.inputs_by_name else r[c.pre]
                f = f + src @ self.effective_weight(c).T
            blocks.append(f)
        return torch.cat(blocks, dim=1)

    def forward(self, t, u: torch.Tensor) -> torch.Tensor:
        """du/dt = F(u) / tau (autonomous: t is ignored)."""
        return self.F(u) / self.tau_vector()

    def gradients(self) -> dict:
        """The ``.grad`` of every leaf as NumPy arrays in substrate's layout: {"weights", "biases",
        "tau", "inputs"}; tau as the layer's tau (a scalar for a scalar tau). Leaves without a
        gradient give zeros. Complex leaves give the holomorphic gradient, i.e. conj(.grad) (see
        :func:`torchdiffeq_gradient`)."""
        def grad(p):
            g = torch.zeros_like(p) if p.grad is None else p.grad
            g = g.detach().cpu().numpy().copy()
            return np.conj(g) if np.iscomplexobj(g) else g

        tau = {}
        for name, p in self.tau.items():
            g = grad(p)
            tau[name] = g[()] if g.ndim == 0 else g
        return {"weights": {k: grad(p) for k, p in self.weights.items()},
                "biases": {k: grad(p) for k, p in self.biases.items()},
                "tau": tau,
                "inputs": {k: grad(p) for k, p in self.inputs.items()}}


# ------------------------------------------------------------------------------------ solvers
class _ClassicalRK4(FixedGridODESolver):
    """The classical Runge-Kutta method (torchdiffeq's ``rk4`` is the 3/8 rule)."""

    order = 4

    def _step_func(self, func, t0, dt, t1, y0):
        k1 = func(t0, y0, perturb=Perturb.NEXT if self.perturb else Perturb.NONE)
        half = 0.5 * dt
        k2 = func(t0 + half, y0 + half * k1)
        k3 = func(t0 + half, y0 + half * k2)
        k4 = func(t1, y0 + dt * k3, perturb=Perturb.PREV if self.perturb else Perturb.NONE)
        return dt * (k1 + 2.0 * (k2 + k3) + k4) / 6.0, k1


SOLVERS.setdefault("substrate_rk4", _ClassicalRK4)  # a new name: torchdiffeq's own solvers untouched

# strategy method name -> torchdiffeq solver name
METHODS = {name: name for name in SOLVERS if name not in ("scipy_solver", "substrate_rk4", "rk4")}
METHODS.update(rk4="substrate_rk4", rk4_38="rk4")


def _is_fixed(solver: str) -> bool:
    return issubclass(SOLVERS[solver], FixedGridODESolver)


def _grid_constructor(dt: float):
    """torchdiffeq grid: steps of ``dt`` from t[0] landing exactly on every output time t[j] (a
    step that would end within 1e-7 dt of t[j] is stretched to it, a longer one is cut there), as
    ``_kernels.run`` steps; for decreasing t (the adjoint's backward pass) mirrored."""

    def grid(func, y0, t):
        ts = [float(v) for v in t.detach().cpu().double()]
        sign = 1.0 if ts[-1] >= ts[0] else -1.0
        cur = sign * ts[0]
        out = [ts[0]]
        for target_t in ts[1:]:
            target = sign * target_t
            while cur < target:
                cur = target if target - (cur + dt) <= 1e-7 * dt else cur + dt
                out.append(sign * cur if cur != target else target_t)
        return torch.tensor(out, dtype=t.dtype, device=t.device)

    return grid


# ------------------------------------------------------------------------------------ strategy
@dataclass(frozen=True)
class TorchDiffEq(AbstractAdjoint):
    """Gradients with torchdiffeq (see the module docstring). adjoint: True for
    ``odeint_adjoint`` (continuous adjoint, memory independent of the number of steps), False to
    backpropagate through ``odeint``'s steps. method: a name of ``torch_backend.METHODS``
    (``"rk4"`` is classical RK4, ``"rk4_38"`` torchdiffeq's 3/8 rule); fixed-step methods need
    ``dt``, adaptive ones take it as their first step. rtol/atol: the adaptive solvers' tolerances;
    adjoint_rtol/adjoint_atol: the backward pass's (None: the same). options: passed to torchdiffeq
    (and, with adjoint=True, to the backward pass)."""

    adjoint: bool = True
    method: str = "rk4"
    rtol: float = 1e-7
    atol: float = 1e-9
    options: dict | None = None
    adjoint_rtol: float | None = None
    adjoint_atol: float | None = None
    name = "torchdiffeq"


def _check_strategy(s) -> tuple[str, dict]:
    if not isinstance(s, TorchDiffEq):
        raise SubstrateValueError(f"strategy must be a TorchDiffEq, got {type(s).__name__}")
    if not isinstance(s.adjoint, (bool, np.bool_)):
        raise SubstrateValueError(f"TorchDiffEq(adjoint={s.adjoint!r}) must be True or False")
    if not isinstance(s.method, str) or s.method not in METHODS:
        raise SubstrateValueError(f"TorchDiffEq(method={s.method!r}) is not a torchdiffeq method; "
                                  f"allowed: {', '.join(METHODS)}")
    rtol, atol = _nonnegative(s.rtol, "TorchDiffEq rtol"), _nonnegative(s.atol, "TorchDiffEq atol")
    for value, what in [(s.adjoint_rtol, "adjoint_rtol"), (s.adjoint_atol, "adjoint_atol")]:
        if value is not None:
            _nonnegative(value, f"TorchDiffEq {what}")
    solver = METHODS[s.method]
    if not _is_fixed(solver) and rtol == 0 and atol == 0:
        raise SubstrateValueError(f"TorchDiffEq: rtol and atol cannot both be 0 for the adaptive "
                                  f"method {s.method!r}")
    if s.options is not None and not isinstance(s.options, dict):
        raise SubstrateValueError(f"TorchDiffEq(options={s.options!r}) must be a dict or None")
    return solver, dict(s.options or {})


def _check_times(t_span, t_eval):
    """(t0, t1, t_eval) validated as substrate's discrete adjoint does."""
    if t_span is None:
        raise SubstrateValueError("t_span is required for method='torchdiffeq'")
    return check_times(t_span, t_eval, default=lambda t0, t1: [t1], end_at_t1=True)


class _Dynamics(nn.Module):
    """The field as torchdiffeq sees it, counting evaluations and recording the steps taken."""

    def __init__(self, field: TorchField, fixed: bool):
        super().__init__()
        self.field = field
        self.nfev = 0
        self.steps: list[float] = []
        self.rejected = 0
        # only the callbacks the solver supports (others make torchdiffeq warn)
        if fixed:
            self.callback_step = self._record
        else:
            self.callback_accept_step = self._record
            self.callback_reject_step = self._reject

    def _record(self, t0, y0, dt):
        self.steps.append(abs(float(dt)))

    def _reject(self, t0, y0, dt):
        self.rejected += 1

    def forward(self, t, u):
        self.nfev += 1
        return self.field(t, u)


# ------------------------------------------------------------------------------------ gradient
def torchdiffeq_gradient(strategy: TorchDiffEq, network: Network, x, loss, t_span, t_eval=None,
                         trajectory=False, dt=None, u0=None, dtype=None, batch=None) -> Gradients:
    """dL/dtheta, dL/du0 and dL/dx of ``loss`` through the dynamics, computed with torchdiffeq
    as ``strategy`` says; the arguments are those of :func:`substrate.gradient` (the loss is on the
    state at ``t_span[1]``, or with ``trajectory=True`` on the states at every ``t_eval`` point).
    ``Gradients.solution`` holds the forward states at t_eval (nfev: forward evaluations only),
    ``step_sizes`` the forward steps (adaptive methods: the accepted ones)."""
    solver, options = _check_strategy(strategy)
    t0, t1, t_eval = _check_times(t_span, t_eval)
    if not isinstance(trajectory, (bool, np.bool_)):
        raise SubstrateValueError(f"trajectory={trajectory!r} must be True or False")
    dt = _positive(dt, "dt", allow_none=True)
    fixed = _is_fixed(solver)
    if fixed and "step_size" not in options and "grid_constructor" not in options:
        if dt is None:
            raise SubstrateValueError(f"dt is required for the fixed-step method {strategy.method!r}")
        options["grid_constructor"] = _grid_constructor(dt)
    elif not fixed and dt is not None:
        options.setdefault("first_step", dt)

    vf, u = _prepare(network, x, u0, dtype, batch)  # validates network, x, u0, dtype and batch
    field = TorchField(network, vf.inputs, vf.dtype)
    complex_state = vf.dtype.kind == "c"
    y0 = torch.tensor(u.T, dtype=field.dtype).requires_grad_()
    prepend = t_eval[0] > t0
    times = torch.tensor(np.concatenate([[t0], t_eval]) if prepend else t_eval, dtype=torch.float64)
    if len(times) == 1:  # t_eval = [t0] cannot happen (t1 > t0), kept for clarity
        raise SubstrateValueError("t_eval must contain a time after t_span[0]")

    dynamics = _Dynamics(field, fixed)
    rtol, atol = float(strategy.rtol), float(strategy.atol)
    try:
        if strategy.adjoint:
            out = torchdiffeq.odeint_adjoint(
                dynamics, y0, times, rtol=rtol, atol=atol, method=solver, options=options,
                adjoint_rtol=rtol if strategy.adjoint_rtol is None else float(strategy.adjoint_rtol),
                adjoint_atol=atol if strategy.adjoint_atol is None else float(strategy.adjoint_atol),
                adjoint_params=tuple(field.leaves()))
        else:
            out = torchdiffeq.odeint(dynamics, y0, times, rtol=rtol, atol=atol, method=solver,
                                     options=options)
    except AssertionError as e:  # torchdiffeq reports a collapsed step size by an assertion
        if "underflow" in str(e):
            raise StepSizeError(f"gradient: the forward integration with torchdiffeq {strategy.method!r} "
                                f"failed: {e}") from e
        raise
    nfev = dynamics.nfev
    states = out[1:] if prepend else out
    saved = states.detach().cpu().numpy().copy()
    sol = Solution(t=t_eval, u=saved, status="success", method=f"torchdiffeq:{strategy.method}",
                   steps=len(dynamics.steps), nfev=nfev, rejected=dynamics.rejected,
                   residual=np.full(vf.batch, np.nan), t_final=t1, slices=network.slices)
    if not np.all(np.isfinite(saved)):
        sol = Solution(t=t_eval, u=saved, status="diverged", method=sol.method, steps=sol.steps,
                       nfev=nfev, rejected=sol.rejected, residual=sol.residual, t_final=t1,
                       message="the state became NaN or Inf", slices=network.slices)
        raise DivergenceError(f"gradient: the forward integration failed: {sol.report()}", sol)

    target = states if trajectory else states[-1]
    value, g = _evaluate_loss(loss, saved.copy() if trajectory else saved[-1].copy(),
                              "states at t_eval" if trajectory else "final state")
    cot = torch.as_tensor(np.conj(g) if complex_state else g, dtype=field.dtype)
    torch.autograd.backward(target, grad_tensors=cot)

    grads = field.gradients()
    gu0 = y0.grad.detach().cpu().numpy()
    gu0 = np.conj(gu0) if complex_state else gu0.copy()
    return Gradients(value, grads["weights"], grads["biases"], grads["tau"], grads["inputs"], gu0,
                     "torchdiffeq", sol, np.array(dynamics.steps))
