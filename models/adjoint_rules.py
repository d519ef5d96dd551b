"""The exact-gradient methods of :mod:`substrate.adjoint` as training rules (:class:`models.train.Rule`),
so that :func:`models.train.train` runs them beside EP on the same circuit (docs/equations.md, section 3):

* ``implicit`` (:class:`ImplicitRule`): recurrent backprop at the free state, J^T lambda = -dL/du
  (``substrate.Implicit``'s solvers);
* ``discrete_adjoint`` (:class:`DiscreteAdjointRule`): the exact gradient of the settling itself, the
  relaxation's own steps from u0 = 0 to the free state backpropagated (``substrate.DiscreteAdjoint``),
  the loss on the final state;
* ``truncated_adjoint`` (:class:`TruncatedAdjointRule`): backprop through the last ``window`` steps
  of the settling only, the state they start from held fixed;
* ``continuous_adjoint`` (:class:`ContinuousAdjointRule`): the adjoint ODE backwards over the same
  settling time (``substrate.ContinuousAdjoint``).

Every rule takes the gradient of the batch-mean cost (1/B) sum_b l_b; a cross-entropy readout's own
weights take theirs directly at the state the loss is on, as in EP. On a device whose circuit as read
is not differentiable (per-step or per-sample noise, converters, activation mismatch) the backward
pass runs on the nominal network at the device's states (``twin=True`` of ``substrate.gradient``):
the gradient hardware-in-the-loop training can compute. Importing this module registers the rules in
``models.train.RULES``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from substrate import (
    ContinuousAdjoint,
    DiscreteAdjoint,
    Gradients,
    Implicit,
    VectorField,
    gradient,
    integrate,
)
from substrate import counts as C
from substrate.adjoint import adjoint_solve, check_solver, implicit_counts
from substrate.validate import choice, count

from . import ep
from .train import RULES, Rule, Step, exact_cosine


def batch_loss(network, cost, y):
    """loss(u) -> (batch-mean cost, its gradient dL/du), the cost on the activities of states u."""
    def loss(u):
        value, g = ep.cost_gradient_u(network, cost, u, y)
        return float(np.mean(value)), g / len(u)
    return loss


def readout_gradients(network, cost, u, y) -> dict:
    """The cross-entropy readout's gradients of the batch-mean cost at states u (empty otherwise)."""
    if cost.kind != "cross_entropy":
        return {}
    r = ep.activity(network, u)[:, network.slices[cost.layer]]
    e = cost.readout_error(r, y)
    return {"weight": e.T @ r / len(u), "bias": e.mean(axis=0)}


def named(g: Gradients, readout: dict) -> dict:
    """Gradients by parameter name (``Classifier.parameters``'s names)."""
    out = {f"W:{k}": w for k, w in g.weights.items()}
    out.update({f"b:{k}": b for k, b in g.biases.items()})
    out.update({f"readout.{k}": v for k, v in readout.items()})
    return out


def step_counts(parts, model, batch):
    """What the hardware did for one step (``substrate.Counts``, docs/equations.md, section 9): the phases
    and digital work of ``parts`` (the method's own counts, each with its settling), the targets
    converted once, and the readout in digital (logits, softmax error, its gradients), as an EP
    estimate counts them."""
    run = C.total(parts)
    classes, flops = model.classes, 0
    if model.cost.kind == "cross_entropy":
        width = model.cost.readout_weight.shape[1]
        flops = (4 * classes * width + 5 * classes) * batch
    return run.replace(samples=batch, dac=run.dac + classes * batch, flops=run.flops + flops)


def twin(network) -> bool:
    """Whether the backward pass must run on the nominal network: the circuit as read is not smooth."""
    return not getattr(network, "differentiable", True)


class AdjointRule(Rule):
    """The shared step: the free phase (the prediction), then the method's gradient
    (:meth:`gradients`: ``(substrate.Gradients, the states the loss is on)``)."""

    def gradients(self, model, x, y, relaxation, free):
        """(``substrate.Gradients`` with its counts, the states the loss is on, the counts of any
        other phase the method ran)."""
        raise NotImplementedError

    def step(self, model, x, y, relaxation, rng=None) -> Step:
        y = ep.check_target(model.network, model.cost, y, len(x))
        free = ep.free_phase(model.network, x, relaxation)
        g, u, extra = self.gradients(model, x, y, relaxation, free)
        losses = ep.cost_gradient_u(model.network, model.cost, free.u, y)[0]
        converged = free.ok and (g.solution is None or g.solution.ok)
        return Step(named(g, readout_gradients(model.network, model.cost, u, y)), float(np.mean(losses)),
                    model.output(free.u), converged, step_counts(extra + [g.counts], model, len(x)))

    def probe(self, model, x, y, relaxation) -> float:
        free = ep.free_phase(model.network, x, relaxation)
        g = self.gradients(model, x, ep.check_target(model.network, model.cost, y, len(x)), relaxation, free)[0]
        return exact_cosine(model, g, x, y, relaxation, free=free)


@dataclass(frozen=True)
class ImplicitRule(AdjointRule):
    """Recurrent backprop (Almeida 1987, Pineda 1987): at the free state u*, J^T lambda = -dL/du by
    ``solver`` (``substrate.Implicit``: ``krylov``, GMRES in digital; ``direct``; ``almeida_pineda``, the
    adjoint circuit relaxed, which diverges where the spectral radius of rho'(u*) W^T exceeds 1, as it
    does on pcm_inference's free states in the compare study, and then falls back to Krylov with a
    warning), dL/dtheta = (dF/dtheta)^T lambda. On an ideal circuit it is
    the ``exact`` estimator of :mod:`models.ep`; on a device read after a finite time the free state
    need not be an equilibrium, and the gradient is then the implicit one at the state reached."""

    solver: str = "krylov"
    name = "implicit"

    def __post_init__(self):
        check_solver(self.solver, "ImplicitRule")

    def gradients(self, model, x, y, relaxation, free):
        net = model.network
        if twin(net):
            vf = VectorField(net.nominal, x, dtype=free.u.dtype)
        else:
            f = free.field
            same = f is not None and f.network is net and f.dtype == free.u.dtype
            vf = f if same else VectorField(net, x, dtype=free.u.dtype)
        value, dl = batch_loss(net, model.cost, y)(free.u)
        dl = self._equilibrium_samples_only(net, free, relaxation, dl)
        # warn and solve by Krylov where the adjoint circuit does not contract (its spectral radius >= 1)
        adj = adjoint_solve(vf, free.u, -dl, Implicit(solver=self.solver), on_failure="return",
                            relax_tol=relaxation.tol)
        g = vf.param_vjp(free.u, adj.lam)
        tau = {layer.name: np.zeros_like(layer.tau) if np.ndim(layer.tau) else 0.0 for layer in net.layers}
        return Gradients(value, g["weights"], g["biases"], tau, g["inputs"], np.zeros_like(free.u), "implicit",
                         None, adjoint=adj, counts=implicit_counts(free, adj)), free.u, []

    @staticmethod
    def _equilibrium_samples_only(net, free, relaxation, dl):
        """dL/du with the rows of the samples whose free state missed the relaxation's tolerance set to 0
        (lambda = 0: they are left out of the gradient), with a warning. J^T lambda = -dL/du holds at a
        fixed point only: off one (a settling cut at max_steps, typically a state still passing a
        saddle or a marginal mode) J can have an eigenvalue at or right of 0 and the solve returns a
        lambda orders of magnitude larger than the others', pointing uphill (compare study, Fashion-MNIST:
        one such sample of 50 gave |lambda| 900x the median, |g| 110 against the discrete adjoint's 12,
        cosine -0.985, and one SGD step undid the training). A circuit read at a finite time (a
        device's relaxation_time) is never at equilibrium: there the gradient stays the implicit one at
        the state reached, as documented above."""
        if math.isfinite(getattr(net, "read_time", math.inf)):
            return dl
        res = np.asarray(free.residual, dtype=float)
        off = res > relaxation.tol  # NaN (no residual): kept
        if not off.any():
            return dl
        warnings.warn(f"implicit gradient: {int(off.sum())} of {len(off)} free states are not at a fixed point "
                      f"(residual up to {np.max(res[off]):.3g} > tol {relaxation.tol:g} after {free.steps} "
                      "steps): left out of the gradient, where implicit differentiation does not apply; raise "
                      "relaxation.max_steps or loosen tol", RuntimeWarning, stacklevel=4)
        dl = np.array(dl, copy=True)
        dl[off] = 0
        return dl


class ThroughTime(AdjointRule):
    """The rules that differentiate the settling's steps: the relaxation's own integrator and step,
    from u0 = 0, for as many steps as the free phase took (:meth:`span`)."""

    def strategy(self):
        """The ``substrate.adjoint`` method that differentiates the steps."""
        raise NotImplementedError

    def span(self, net, x, relaxation, free):
        """(u0, steps, the phase that reached u0 or None): where the differentiated steps start (None:
        zero) and how many there are. The free phase found the settling's length; on the hardware the
        differentiated forward pass is that settling, so only it is counted."""
        return None, max(free.steps, 1), None

    def gradients(self, model, x, y, relaxation, free):
        net, dt = model.network, relaxation.step(model.network)
        u0, steps, head = self.span(net, x, relaxation, free)
        g = gradient(net, x, batch_loss(net, model.cost, y), method=self.strategy(), t_span=(0.0, steps * dt),
                     integrator=relaxation.method, dt=dt, u0=u0, twin=twin(net),
                     max_steps=steps + 1)
        return g, g.solution.u[-1], [] if head is None else [head.counts]


@dataclass(frozen=True)
class DiscreteAdjointRule(ThroughTime):
    """The exact gradient of the settling (backprop through the relaxation's steps); ``checkpoints``
    as in ``substrate.DiscreteAdjoint`` (None: every state stored)."""

    checkpoints: int | None = None
    name = "discrete_adjoint"

    def __post_init__(self):
        if self.checkpoints is not None:
            count(self.checkpoints, "DiscreteAdjointRule(checkpoints)")

    def strategy(self):
        """``substrate.DiscreteAdjoint`` with this rule's checkpoints."""
        return DiscreteAdjoint(self.checkpoints)


@dataclass(frozen=True)
class TruncatedAdjointRule(ThroughTime):
    """Backprop through the last ``window`` steps of the settling only (truncated recurrent backprop):
    the state ``window`` steps before the free state's is reached by the same integration and held
    fixed; with as many steps as the settling took, it is the discrete adjoint."""

    window: int = 10
    name = "truncated_adjoint"

    def __post_init__(self):
        count(self.window, "TruncatedAdjointRule(window)")

    def strategy(self):
        """``substrate.DiscreteAdjoint``, every state of the window stored."""
        return DiscreteAdjoint()

    def span(self, net, x, relaxation, free):
        steps = max(free.steps, 1)
        if steps <= self.window:
            return None, steps, None
        dt = relaxation.step(net)
        head = steps - self.window
        sol = integrate(net, x, t_span=(0.0, head * dt), method=relaxation.method, dt=dt, max_steps=head + 1)
        return sol.u[-1], self.window, sol


@dataclass(frozen=True)
class ContinuousAdjointRule(ThroughTime):
    """The continuous adjoint (optimise-then-discretise) over the settling time; ``backward`` and
    ``substeps`` as in ``substrate.ContinuousAdjoint``."""

    backward: str = "etd2rk"
    substeps: int = 1
    name = "continuous_adjoint"

    def __post_init__(self):
        count(self.substeps, "ContinuousAdjointRule(substeps)")
        choice(self.backward, "ContinuousAdjointRule(backward)", ("exp_euler", "etd2rk"))

    def strategy(self):
        """``substrate.ContinuousAdjoint`` with this rule's backward integrator and substeps."""
        return ContinuousAdjoint(backward=self.backward, substeps=self.substeps)


ADJOINT_RULES = {r.name: r for r in (ImplicitRule, DiscreteAdjointRule, TruncatedAdjointRule, ContinuousAdjointRule)}
RULES.update(ADJOINT_RULES)
