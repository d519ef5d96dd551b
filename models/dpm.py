"""A small diffusion model and its probability-flow ODE in the variables of AdjointDPM (Pan et al.,
ICLR 2024; REFERENCES section 3).

VP noise schedule (Song et al. 2021), linear beta(t) = beta_0 + t (beta_1 - beta_0), t in [t_min, 1]:

    log alpha_t = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2,   sigma_t = sqrt(1 - alpha_t^2),
    lambda_t = log(alpha_t / sigma_t)   (half the log signal-to-noise ratio).

A noise predictor eps_theta(x, t, c) (``NoisePredictor``; c a class embedding, a vector that can be
optimised like any state) trained by denoising score matching (``train``) defines the
probability-flow ODE, from x_1 ~ N(0, I) at t = 1 down to t_min:

    original        dx/dt = f(t) x + g(t)^2 / (2 sigma_t) eps_theta(x, t, c),   f = -beta(t)/2,  g^2 = beta(t);
    reparameterised y = x / alpha_t,  rho = sigma_t / alpha_t = e^{-lambda}:   dy/drho = eps_theta(alpha y, t(rho), c)

(the linear term and the singular coefficient are gone). ``sample`` integrates either on a grid
uniform in t or in lambda (``grid``) with ``euler``/``rk4`` steps in the ODE's own variable, or
with the exponential integrators of DPM-Solver (Lu et al. 2022), exact in the linear part:

    dpm1   x_{i+1} = (alpha_{i+1}/alpha_i) x_i - sigma_{i+1} (e^h - 1) eps(x_i, t_i),   h = lambda_{i+1} - lambda_i
    dpm2   u = (alpha_s/alpha_i) x_i - sigma_s (e^{h/2} - 1) eps(x_i, t_i),  s = t(lambda_i + h/2),
           x_{i+1} = (alpha_{i+1}/alpha_i) x_i - sigma_{i+1} (e^h - 1) eps(u, s)

(dpm1 is Euler in rho: y_{i+1} = y_i + (rho_{i+1} - rho_i) eps_i). Everything is torch, float64 by
default, so that gradients through the samples come from autograd or from an adjoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from substrate.errors import SubstrateValueError

ODES = ("original", "reparameterised")
SOLVERS = ("euler", "rk4", "dpm1", "dpm2")
GRIDS = ("uniform_t", "logsnr")


@dataclass(frozen=True)
class VPSchedule:
    """The VP schedule with linear beta; every method takes floats or tensors of t (or lambda)."""

    beta_0: float = 0.1
    beta_1: float = 20.0
    t_min: float = 1e-3

    def __post_init__(self):
        if not (0 < self.beta_0 < self.beta_1 and math.isfinite(self.beta_1)):
            raise SubstrateValueError(f"VPSchedule: need 0 < beta_0 < beta_1 < inf, got {self.beta_0}, {self.beta_1}")
        if not 0 < self.t_min < 1:
            raise SubstrateValueError(f"VPSchedule.t_min={self.t_min!r} must be in (0, 1)")

    def beta(self, t):
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def log_alpha(self, t):
        return -0.25 * t * t * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def alpha(self, t):
        return torch.exp(self.log_alpha(torch.as_tensor(t, dtype=torch.float64)))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(torch.as_tensor(t, dtype=torch.float64))))

    def lam(self, t):
        """lambda_t = log alpha - log sigma = log alpha - log(1 - alpha^2) / 2."""
        la = self.log_alpha(torch.as_tensor(t, dtype=torch.float64))
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def t_of_lam(self, lam):
        """The inverse of ``lam``: log alpha = -log(1 + e^{-2 lambda}) / 2, then the root t >= 0 of
        (beta_1 - beta_0) t^2 / 4 + beta_0 t / 2 + log alpha = 0."""
        la = -0.5 * torch.nn.functional.softplus(-2.0 * torch.as_tensor(lam, dtype=torch.float64))
        d = self.beta_1 - self.beta_0
        return 2.0 * (-la) / (0.5 * self.beta_0 + torch.sqrt(0.25 * self.beta_0 ** 2 - d * la))

    def rho(self, t):
        """sigma_t / alpha_t = e^{-lambda_t}."""
        return torch.exp(-self.lam(t))

    def t_of_rho(self, rho):
        return self.t_of_lam(-torch.log(torch.as_tensor(rho, dtype=torch.float64)))


def grid(schedule: VPSchedule, steps: int, kind: str = "logsnr") -> torch.Tensor:
    """steps + 1 times from 1 down to t_min, uniform in t (``uniform_t``) or in lambda (``logsnr``)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise SubstrateValueError(f"steps={steps!r} must be a positive integer")
    if kind == "uniform_t":
        return torch.linspace(1.0, schedule.t_min, steps + 1, dtype=torch.float64)
    if kind == "logsnr":
        lam = torch.linspace(float(schedule.lam(1.0)), float(schedule.lam(schedule.t_min)), steps + 1,
                             dtype=torch.float64)
        t = schedule.t_of_lam(lam)
        t[0], t[-1] = 1.0, schedule.t_min  # the ends exactly
        return t
    raise SubstrateValueError(f"grid kind={kind!r}; allowed: {GRIDS}")


class NoisePredictor(nn.Module):
    """eps_theta(x, t, c): an MLP of ``depth`` hidden SiLU layers of ``hidden`` units on [x, time
    features, c]; time features t and sin/cos(pi k t), k = 1..``frequencies``; c a class embedding
    of ``embed`` numbers (``embedding(labels)``; label ``classes`` is the unconditional one, used by
    classifier-free training)."""

    def __init__(self, dim: int, classes: int = 1, hidden: int = 64, depth: int = 2, embed: int = 8,
                 frequencies: int = 4, generator: torch.Generator | None = None):
        super().__init__()
        for name, v in (("dim", dim), ("classes", classes), ("hidden", hidden), ("depth", depth), ("embed", embed)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise SubstrateValueError(f"NoisePredictor.{name}={v!r} must be a positive integer")
        self.dim, self.classes, self.frequencies = dim, classes, frequencies
        self.table = nn.Embedding(classes + 1, embed, dtype=torch.float64)
        sizes = [dim + 1 + 2 * frequencies + embed] + [hidden] * depth
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b, dtype=torch.float64), nn.SiLU()]
        layers.append(nn.Linear(sizes[-1], dim, dtype=torch.float64))
        self.net = nn.Sequential(*layers)
        if generator is not None:  # reproducible initialisation, apart from torch's global generator
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=generator)
                            * (1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1))

    def embedding(self, labels) -> torch.Tensor:
        return self.table(torch.as_tensor(labels, dtype=torch.long))

    def forward(self, x, t, c):
        """x (B, dim); t a number or (B, 1); c (embed,) or (B, embed)."""
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        k = math.pi * torch.arange(1, self.frequencies + 1, dtype=x.dtype)
        features = [x, t, torch.sin(k * t), torch.cos(k * t), c.expand(x.shape[0], -1)]
        return self.net(torch.cat(features, dim=-1))


def train(model: NoisePredictor, schedule: VPSchedule, x, labels=None, *, steps: int, batch: int = 256,
          lr: float = 2e-3, uncond: float = 0.1, generator: torch.Generator, progress: bool = True):
    """Denoising score matching: minimise E ||eps - eps_theta(alpha_t x_0 + sigma_t eps, t, c)||^2 over
    t ~ U[t_min, 1], data x_0 and eps ~ N(0, I), with c the embedding of the label, replaced by the
    unconditional one with probability ``uncond``; Adam, ``steps`` minibatches. Returns the losses."""
    from tqdm.auto import tqdm

    x = torch.as_tensor(x, dtype=torch.float64)
    labels = torch.zeros(len(x), dtype=torch.long) if labels is None else torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(x):
        raise SubstrateValueError(f"labels has {len(labels)} entries for {len(x)} samples")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = np.empty(steps)
    for k in tqdm(range(steps), desc="DSM", disable=not progress):
        idx = torch.randint(len(x), (batch,), generator=generator)
        t = schedule.t_min + (1 - schedule.t_min) * torch.rand(batch, 1, dtype=torch.float64, generator=generator)
        eps = torch.randn(batch, x.shape[1], dtype=torch.float64, generator=generator)
        drop = torch.rand(batch, generator=generator) < uncond
        lab = torch.where(drop, torch.full_like(labels[idx], model.classes), labels[idx])
        xt = schedule.alpha(t) * x[idx] + schedule.sigma(t) * eps
        loss = ((model(xt, t, model.embedding(lab)) - eps) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses[k] = float(loss.detach())
    return losses


# ------------------------------------------------------------------------------------ sampling
def velocity(model, schedule: VPSchedule, ode: str, c):
    """The right-hand side of the ODE ``ode`` in its own variable s (t, or rho for the
    reparameterised one) and the state it moves (x, or y = x / alpha): f(s, state)."""
    if ode == "original":
        def f(t, x):
            b = schedule.beta(t)
            return -0.5 * b * x + b / (2.0 * schedule.sigma(t)) * model(x, t, c)
    elif ode == "reparameterised":
        def f(rho, y):
            t = schedule.t_of_rho(rho)
            return model(schedule.alpha(t) * y, t, c)
    else:
        raise SubstrateValueError(f"ode={ode!r}; allowed: {ODES}")
    return f


def sample(model, schedule: VPSchedule, x_T, c, times, ode: str = "reparameterised", solver: str = "rk4"):
    """x at t_min from x_T at times[0] = 1 along ``times`` (decreasing, e.g. :func:`grid`): ``euler``
    or ``rk4`` steps of ``ode`` in its own variable (t; or rho, with y = x / alpha), or the
    exponential integrators ``dpm1``/``dpm2`` (the original ODE, exact in its linear part; ``ode``
    is then irrelevant). Differentiable by torch autograd (the discrete adjoint's reference)."""
    if solver not in SOLVERS:
        raise SubstrateValueError(f"solver={solver!r}; allowed: {SOLVERS}")
    times = torch.as_tensor(times, dtype=torch.float64)
    if times.ndim != 1 or len(times) < 2 or not bool(torch.all(times[1:] < times[:-1])):
        raise SubstrateValueError("times: a decreasing 1-D sequence of at least two times (from 1 to t_min)")
    if solver in ("dpm1", "dpm2"):
        return _dpm_solver(model, schedule, x_T, c, times, solver)
    f = velocity(model, schedule, ode, c)
    s = times if ode == "original" else schedule.rho(times)
    state = x_T if ode == "original" else x_T / schedule.alpha(times[0])
    for a, b in zip(s[:-1], s[1:]):
        h = b - a
        if solver == "euler":
            state = state + h * f(a, state)
        else:
            k1 = f(a, state)
            k2 = f(a + h / 2, state + h / 2 * k1)
            k3 = f(a + h / 2, state + h / 2 * k2)
            k4 = f(b, state + h * k3)
            state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return state if ode == "original" else schedule.alpha(times[-1]) * state


def _dpm_solver(model, schedule, x, c, times, solver):
    """DPM-Solver-1 and -2 (Lu et al. 2022, their equations 3.7 and Algorithm 1 with r = 1/2)."""
    lam = schedule.lam(times)
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        h = lam[i + 1] - lam[i]
        eps = model(x, t, c)
        if solver == "dpm2":
            s = schedule.t_of_lam(lam[i] + h / 2)
            u = schedule.alpha(s) / schedule.alpha(t) * x - schedule.sigma(s) * torch.expm1(h / 2) * eps
            eps = model(u, s, c)
        x = schedule.alpha(t_next) / schedule.alpha(t) * x - schedule.sigma(t_next) * torch.expm1(h) * eps
    return x


# ------------------------------------------------------------------------------------ adjoint
def adjoint(model, schedule: VPSchedule, x_T, c, times, loss_grad, solver: str = "rk4",
            ode: str = "reparameterised"):
    """The gradient of a loss L(x_0) of the sample with respect to the initial noise x_T, the
    conditioning c and the network's weights by the continuous adjoint of the probability-flow ODE
    (AdjointDPM), memory independent of the number of steps. With the ODE ds/dv = F(v, s) in its own
    variable (``reparameterised``: v = rho, s = y = x / alpha, F = eps_theta(alpha y, t(rho), c);
    ``original``: v = t, s = x), the sample is integrated forward, then the augmented state backward
    along the reversed grid,

        d/dv [s, a_s, a_c, a_theta] = [F, -a_s^T dF/ds, -a_s^T dF/dc, -a_s^T dF/dtheta],
        a_s = dL/ds at the data end (alpha(t_min) dL/dx_0 for y), a_c = a_theta = 0 there,

    with s itself re-integrated backward (nothing is stored per step) and one vector-Jacobian product
    of F per stage. ``solver``: "euler" or "rk4" in v, for both passes, or, for the reparameterised
    ODE, "dpm1"/"dpm2": the exponential integrators of DPM-Solver, i.e. Euler in rho and the two-stage
    step whose second stage sits at the midpoint in lambda (rho_mid = sqrt(rho_i rho_{i+1})), applied
    to the augmented system as well (the adjoint steps of AdjointDEIS, first and second order).
    ``loss_grad(x_0) -> (L, dL/dx_0)``. Returns (x_0, L, dL/dx_T, dL/dc, {name: dL/dparam})."""
    if ode not in ODES:
        raise SubstrateValueError(f"ode={ode!r}; allowed: {ODES}")
    allowed = ("euler", "rk4") + (("dpm1", "dpm2") if ode == "reparameterised" else ())
    if solver not in allowed:
        raise SubstrateValueError(f"adjoint solver={solver!r}; allowed for the {ode} ODE: {allowed}")
    times = torch.as_tensor(times, dtype=torch.float64)
    with torch.no_grad():
        x_0 = sample(model, schedule, x_T, c, times, ode, solver)
    L, g = loss_grad(x_0)
    g = torch.as_tensor(g, dtype=x_0.dtype)
    names, params = zip(*model.named_parameters())
    c = c.detach()

    def augmented(v, state):
        s, a = state[0], state[1]
        with torch.enable_grad():
            s_ = s.detach().requires_grad_(True)
            c_ = c.clone().requires_grad_(True)
            F = velocity(model, schedule, ode, c_)(v, s_)
            vjp = torch.autograd.grad(F, (s_, c_) + params, grad_outputs=a, allow_unused=True)
        return [F.detach()] + [-(u if u is not None else torch.zeros_like(p)) for u, p in zip(vjp, (s_, c_) + params)]

    if ode == "reparameterised":
        v = schedule.rho(times).flip(0)  # from rho(t_min) up to rho(1)
        a_end, scale = schedule.alpha(times[-1]), 1.0 / schedule.alpha(times[0])
    else:
        v, a_end, scale = times.flip(0), 1.0, 1.0
    state = [x_0 / a_end, a_end * g, torch.zeros_like(c)] + [torch.zeros_like(p) for p in params]
    for lo, hi in zip(v[:-1], v[1:]):
        h = hi - lo

        def axpy(k, w):
            return [u + w * d for u, d in zip(state, k)]

        if solver in ("euler", "dpm1"):
            state = axpy(augmented(lo, state), h)
        elif solver == "dpm2":
            mid = torch.sqrt(lo * hi)
            k1 = augmented(lo, state)
            state = axpy(augmented(mid, axpy(k1, mid - lo)), h)
        else:
            k1 = augmented(lo, state)
            k2 = augmented(lo + h / 2, axpy(k1, h / 2))
            k3 = augmented(lo + h / 2, axpy(k2, h / 2))
            k4 = augmented(hi, axpy(k3, h))
            state = [u + h / 6 * (p + 2 * q + 2 * r + w) for u, p, q, r, w in zip(state, k1, k2, k3, k4)]
    return x_0, L, state[1] * scale, state[2], dict(zip(names, state[3:]))


def customise(model, schedule: VPSchedule, x_T, c, times, loss_grad, *, what: str, steps: int, lr: float = 0.05,
              solver: str = "dpm2", generator: torch.Generator | None = None):
    """AdjointDPM's customisations: ``steps`` Adam steps on ``what`` so that the samples lower a
    loss, each gradient from :func:`adjoint` of the reparameterised ODE: "noise" (the initial noise
    x_T, e.g. against a fixed classifier: the security-auditing use), "conditioning" (the embedding
    c, a learned style) or "weights" (the network's weights, in place: fine-tuning). With a
    ``generator``, fresh initial noise of x_T's shape every step (for "conditioning"/"weights": the
    customisation then holds for new samples). Returns (x_T, c, the loss at every step, the samples
    of the last x_T and c)."""
    if what not in ("noise", "conditioning", "weights"):
        raise SubstrateValueError(f"what={what!r}; allowed: 'noise', 'conditioning', 'weights'")
    if what == "noise" and generator is not None:
        raise SubstrateValueError("what='noise' optimises one x_T: no fresh noise (generator=None)")
    x_T = torch.as_tensor(x_T, dtype=torch.float64).clone()
    c = c.detach().clone()
    names, params = zip(*model.named_parameters())
    target = {"noise": [x_T], "conditioning": [c], "weights": list(params)}[what]
    opt = torch.optim.Adam(target, lr=lr)
    losses = np.empty(steps)
    for k in range(steps):
        if generator is not None:
            x_T = torch.randn(x_T.shape, dtype=torch.float64, generator=generator)
        _, losses[k], dx_T, dc, dtheta = adjoint(model, schedule, x_T, c, times, loss_grad, solver)
        for p, g in zip(target, {"noise": [dx_T], "conditioning": [dc], "weights": [dtheta[n] for n in names]}[what]):
            p.grad = g
        opt.step()
    with torch.no_grad():
        return x_T, c, losses, sample(model, schedule, x_T, c, times, "reparameterised", solver)
