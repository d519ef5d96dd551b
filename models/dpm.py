"""A small diffusion model and its probability-flow ODE in the variables of AdjointDPM (Pan et al.,
ICLR 2024; docs/equations.md, section 7).

VP noise schedule (Song et al. 2021), linear beta(t) = beta_0 + t (beta_1 - beta_0), t in [t_min, 1]:

    log alpha_t = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2,   sigma_t = sqrt(1 - alpha_t^2),
    lambda_t = log(alpha_t / sigma_t)   (half the log signal-to-noise ratio).

A noise predictor eps_theta(x, t, c) (``NoisePredictor``; c a class embedding, a vector that can be
optimised like any state) trained by denoising score matching (``train``) defines the
probability-flow ODE, from x_1 ~ N(0, I) at t = 1 down to t_min, in one of three forms (``FRAMES``):

    original        dx/dt = f(t) x + g(t)^2 / (2 sigma_t) eps_theta(x, t, c),   f = -beta(t)/2,  g^2 = beta(t);
    reparameterised y = x / alpha_t,  rho = sigma_t / alpha_t = e^{-lambda}:   dy/drho = eps_theta(alpha y, t(rho), c)
                    (AdjointDPM's: the linear term and the singular coefficient are gone);
    gaussian        w = Phi^{-1} Q^T (x - alpha mu) in lambda: the flow relative to that of the data's Gaussian
                    fit (substrate's; see :class:`Gaussian`).

``sample`` integrates on a grid uniform in t, in lambda or Karras' (``grid``) with ``euler``,
``midpoint`` (second stage at the lambda midpoint), ``rk4`` or the Adams methods ``ms2``/``ms3``
(one network evaluation a step; the last k evaluations interpolated by a polynomial in lambda,
integrated exactly against dv/dlambda: for the reparameterised form the exponential Adams method
of DEIS), in the form's own variable, or with the exponential integrators of DPM-Solver (Lu et al.
2022), exact in the linear part of the original ODE:

    dpm1   x_{i+1} = (alpha_{i+1}/alpha_i) x_i - sigma_{i+1} (e^h - 1) eps(x_i, t_i),   h = lambda_{i+1} - lambda_i
    dpm2   u = (alpha_s/alpha_i) x_i - sigma_s (e^{h/2} - 1) eps(x_i, t_i),  s = t(lambda_i + h/2),
           x_{i+1} = (alpha_{i+1}/alpha_i) x_i - sigma_{i+1} (e^h - 1) eps(u, s)

(= ``euler`` and ``midpoint`` of the reparameterised form: y_{i+1} = y_i + (rho_{i+1} - rho_i) eps_i).
``adjoint`` is the continuous adjoint of any form with any of these steps.
Everything is torch, float64 by default, so that gradients through the samples come from autograd
or from an adjoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from substrate import Counts, persist
from substrate.errors import DivergenceError, SubstrateValueError
from substrate.validate import count, fraction, number, positive

ODES = ("original", "reparameterised", "gaussian")
SOLVERS = ("euler", "midpoint", "rk4", "ms2", "ms3", "dpm1", "dpm2")
GRIDS = ("uniform_t", "logsnr", "karras")
MODEL_VERSION = 3  # bumped when a change to NoisePredictor or train invalidates trained models (studies cache them)

# ------------------------------------------------------------------------------------ argument checks
_MAX_STEPS = 10 ** 8  # ~ a day of network evaluations, a grid of 0.8 GB: beyond it, an error up front


def _finite(name, v, shape):
    """``v`` as a float64 tensor (a float64 tensor as it is, its autograd graph kept) whose shape
    matches ``shape`` (None: any size there; ``shape`` None: any shape), finite; else a
    SubstrateValueError."""
    if not (isinstance(v, torch.Tensor) and v.dtype == torch.float64):
        try:
            if np.iscomplexobj(v) or (isinstance(v, torch.Tensor) and v.is_complex()):
                raise TypeError  # a conversion would drop the imaginary part
            v = torch.as_tensor(np.asarray(v, dtype=float) if not isinstance(v, torch.Tensor) else v,
                                dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise SubstrateValueError(f"{name} must be a real array, got {type(v).__name__}") from None
    if shape is not None and (v.ndim != len(shape) or 0 in v.shape
                              or any(n is not None and m != n for m, n in zip(v.shape, shape))):
        want = tuple("n" if n is None else n for n in shape)
        raise SubstrateValueError(f"{name} has shape {tuple(v.shape)}; expected {want}")
    if not bool(torch.all(torch.isfinite(v.detach()))):
        raise SubstrateValueError(f"{name} contains NaN or Inf")
    return v


@dataclass(frozen=True)
class VPSchedule:
    """The VP schedule with linear beta; every method takes floats or tensors of t (or lambda)."""

    beta_0: float = 0.1
    beta_1: float = 20.0
    t_min: float = 1e-3

    def __post_init__(self):
        for name in ("beta_0", "beta_1", "t_min"):
            number(getattr(self, name), f"VPSchedule.{name}")
        if not (0 < self.beta_0 < self.beta_1 and math.isfinite(self.beta_1)):
            raise SubstrateValueError(f"VPSchedule: need 0 < beta_0 < beta_1 < inf, got {self.beta_0}, {self.beta_1}")
        if not 0 < self.t_min < 1:
            raise SubstrateValueError(f"VPSchedule.t_min={self.t_min!r} must be in (0, 1)")

    def beta(self, t):
        """The noise rate beta(t) = beta_0 + t (beta_1 - beta_0)."""
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def log_alpha(self, t):
        """log alpha(t), the log of the signal's scale at time t."""
        return -0.25 * t * t * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def alpha(self, t):
        """alpha(t), the signal's scale at time t."""
        return torch.exp(self.log_alpha(torch.as_tensor(t, dtype=torch.float64)))

    def sigma(self, t):
        """sigma(t) = sqrt(1 - alpha(t)^2), the noise's scale at time t."""
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
        """The time t at which rho = sigma / alpha equals ``rho``."""
        return self.t_of_lam(-torch.log(torch.as_tensor(rho, dtype=torch.float64)))


def evaluations(solver: str, steps: int) -> int:
    """Network evaluations of ``steps`` steps of ``solver`` (the multistep ones spend one more on
    their first step)."""
    return {"euler": 1, "midpoint": 2, "rk4": 4, "ms2": 1, "ms3": 1, "dpm1": 1, "dpm2": 2}[solver] * steps \
        + solver.startswith("ms")


def grid(schedule: VPSchedule, steps: int, kind: str = "logsnr") -> torch.Tensor:
    """steps + 1 times from 1 down to t_min, uniform in t (``uniform_t``), in lambda (``logsnr``), or
    in rho^(1/7) (``karras``: the grid of Karras et al. 2022, EDM, whose sigma is our rho)."""
    count(steps, "steps", maximum=_MAX_STEPS)
    if not isinstance(schedule, VPSchedule):
        raise SubstrateValueError(f"schedule must be a VPSchedule, got {type(schedule).__name__}")
    if not isinstance(kind, str) or kind not in GRIDS:
        raise SubstrateValueError(f"grid kind={kind!r}; allowed: {GRIDS}")
    if kind == "uniform_t":
        return torch.linspace(1.0, schedule.t_min, steps + 1, dtype=torch.float64)
    if kind == "logsnr":
        lam = torch.linspace(float(schedule.lam(1.0)), float(schedule.lam(schedule.t_min)), steps + 1,
                             dtype=torch.float64)
    else:  # karras
        a, b = (float(schedule.rho(v)) ** (1 / 7) for v in (1.0, schedule.t_min))
        lam = -7.0 * torch.log(torch.linspace(a, b, steps + 1, dtype=torch.float64))
    t = schedule.t_of_lam(lam)
    t[0], t[-1] = 1.0, schedule.t_min  # the ends exactly
    return t


class NoisePredictor(nn.Module):
    """eps_theta(x, t, c): an MLP of ``depth`` hidden SiLU layers of ``hidden`` units on [x, time
    features, c]; time features u and sin/cos(pi k u), k = 1..``frequencies``, of the log-SNR
    rescaled to [0, 1], u = (lambda_t - lambda_1) / (lambda_{t_min} - lambda_1) (features of t itself
    cannot resolve t < 0.05, where sigma goes from 0.1 to 0.01 and the samples take their final
    shape); c a class embedding of ``embed`` numbers (``embedding(labels)``; label ``classes`` is
    the unconditional one, used by classifier-free training). With ``gaussian_skip`` (the default)
    the network adds to the exact noise predictor of the data's Gaussian fit (mean mu, covariance
    Q diag(s) Q^T, recorded by :func:`train`),

        eps_theta(x, t, c) = sigma_t Q (alpha_t^2 s + sigma_t^2)^{-1} Q^T (x - alpha_t mu) + MLP(x, t, c),

    its last layer initialised 100x smaller, so that it learns only the data's departure from a
    Gaussian. Why: the sample is x_T / alpha_1 (~150 x_T) plus the integral of eps d rho, so eps
    must match that Gaussian part to ~1e-3 at high noise; a bare MLP does not (on digits, 3 x 256,
    20000 steps: 84 % of class-conditional samples classified as their class, 17 % of pixels beyond
    +-1.2, up to 12; with the skip, 2500 steps: 98 %, 5 %, up to 2.1)."""

    def __init__(self, dim: int, classes: int = 1, hidden: int = 64, depth: int = 2, embed: int = 8,
                 frequencies: int = 4, generator: torch.Generator | None = None,
                 schedule: VPSchedule = VPSchedule(), gaussian_skip: bool = True):
        super().__init__()
        for name, v in (("dim", dim), ("classes", classes), ("hidden", hidden), ("depth", depth), ("embed", embed)):
            count(v, f"NoisePredictor.{name}")
        count(frequencies, "NoisePredictor.frequencies", minimum=0, relation=True)
        if not isinstance(schedule, VPSchedule):
            raise SubstrateValueError(f"NoisePredictor.schedule must be a VPSchedule, got {type(schedule).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise SubstrateValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if not isinstance(gaussian_skip, (bool, np.bool_)):
            raise SubstrateValueError(f"NoisePredictor.gaussian_skip={gaussian_skip!r} must be True or False")
        inputs = dim + 1 + 2 * frequencies + embed
        size = inputs * hidden + (depth - 1) * hidden * hidden + hidden * dim + (classes + 1) * embed
        if size > 2 ** 31:  # 16 GiB of float64: refused up front rather than attempted
            raise SubstrateValueError(f"NoisePredictor: dim, classes, hidden, depth, embed, frequencies give "
                                      f"{size:.3g} weights, more than 2**31")
        self.dim, self.classes, self.frequencies, self.schedule = dim, classes, frequencies, schedule
        self.gaussian_skip = gaussian_skip
        self._lam_range = float(schedule.lam(1.0)), float(schedule.lam(schedule.t_min))
        self.table = nn.Embedding(classes + 1, embed, dtype=torch.float64)
        sizes = [dim + 1 + 2 * frequencies + embed] + [hidden] * depth
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b, dtype=torch.float64), nn.SiLU()]
        layers.append(nn.Linear(sizes[-1], dim, dtype=torch.float64))
        self.net = nn.Sequential(*layers)
        # the data's Gaussian fit (mean, covariance = axes diag(variances) axes^T), set by train:
        # the Gaussian form of the flow is written relative to it
        self.register_buffer("data_mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("data_variances", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("data_axes", torch.eye(dim, dtype=torch.float64))
        if generator is not None:  # reproducible initialisation, apart from torch's global generator
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=generator)
                            * (1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1))
        if gaussian_skip:
            with torch.no_grad():
                self.net[-1].weight.mul_(0.01)
                self.net[-1].bias.mul_(0.01)

    def embedding(self, labels) -> torch.Tensor:
        """The learned embedding of each class label."""
        return self.table(torch.as_tensor(labels, dtype=torch.long))

    def forward(self, x, t, c):
        """x (B, dim); t a number or (B, 1); c (embed,) or (B, embed)."""
        out = self.mlp(x, t, c)
        return out + self.gaussian_eps(x, t) if self.gaussian_skip else out

    def mlp(self, x, t, c):
        """The network's own part of eps_theta (all of it without ``gaussian_skip``)."""
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        lo, hi = self._lam_range
        u = (self.schedule.lam(t) - lo) / (hi - lo)
        k = math.pi * torch.arange(1, self.frequencies + 1, dtype=x.dtype)
        features = [x, u, torch.sin(k * u), torch.cos(k * u), c.expand(x.shape[0], -1)]
        return self.net(torch.cat(features, dim=-1))

    def gaussian_eps(self, x, t):
        """The exact noise predictor of the data's Gaussian fit: sigma (alpha^2 Sigma + sigma^2)^{-1} (x - alpha mu)."""
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        Q = self.data_axes
        return s * ((x - a * self.data_mean) @ Q / (a * a * self.data_variances + s * s)) @ Q.T


def _write_noise_predictor(group, model: NoisePredictor):
    persist.write_config(group, {"dim": int(model.dim), "classes": int(model.classes),
                                 "hidden": model.net[0].out_features, "depth": (len(model.net) - 1) // 2,
                                 "embed": model.table.embedding_dim, "frequencies": int(model.frequencies),
                                 "gaussian_skip": bool(model.gaussian_skip),
                                 "schedule": dataclasses.asdict(model.schedule)})
    # the weights and the data's Gaussian fit (buffers), as numpy arrays
    persist.write_arrays(group, "state_dict", {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})


def _read_noise_predictor(group) -> NoisePredictor:
    cfg = persist.read_config(group)
    cfg["schedule"] = VPSchedule(**cfg["schedule"])
    with torch.random.fork_rng(devices=[]):  # torch's layers draw an initialisation from the global generator
        model = NoisePredictor(**cfg)
    try:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in persist.read_arrays(group, "state_dict").items()})
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        raise ValueError(f"state_dict does not fit NoisePredictor({cfg}): {e}") from None
    return model


persist.register(NoisePredictor, _write_noise_predictor, _read_noise_predictor)


def train(model: NoisePredictor, schedule: VPSchedule, x, labels=None, *, steps: int, batch: int = 256,
          lr: float = 2e-3, uncond: float = 0.1, generator: torch.Generator, progress: bool = True):
    """Denoising score matching: minimise E ||eps - eps_theta(alpha_t x_0 + sigma_t eps, t, c)||^2 over
    t ~ U[t_min, 1], data x_0 and eps ~ N(0, I), with c the embedding of the label, replaced by the
    unconditional one with probability ``uncond``; Adam, ``steps`` minibatches. Also records the
    data's mean and covariance in the model (for the ``gaussian`` form). Returns the losses."""
    x = _finite("x", x, (None, model.dim))
    count(steps, "steps", maximum=_MAX_STEPS), count(batch, "batch", maximum=_MAX_STEPS), positive(lr, "lr")
    fraction(uncond, "uncond")
    if not isinstance(generator, torch.Generator):
        raise SubstrateValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if labels is None:
        labels = torch.zeros(len(x), dtype=torch.long)
    else:
        labels = np.asarray(labels)
        if labels.shape != (len(x),) or labels.dtype.kind not in "iu" or not np.all(
                (labels >= 0) & (labels <= model.classes)):
            raise SubstrateValueError(f"labels must be {len(x)} integers in [0, {model.classes}] (one per sample; "
                                      f"{model.classes}: unconditional), got {labels.dtype} {labels.shape}")
        labels = torch.as_tensor(labels, dtype=torch.long)
    with torch.no_grad():
        variances, axes = torch.linalg.eigh(torch.cov(x.T).reshape(x.shape[1], x.shape[1]))
        model.data_mean.copy_(x.mean(0))
        model.data_variances.copy_(variances.clamp(min=0.0))
        model.data_axes.copy_(axes)
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
        if not math.isfinite(losses[k]):
            raise DivergenceError(f"denoising score matching diverged at step {k + 1} of {steps} (loss "
                                  f"{losses[k]}): lower lr={lr!r}")
    return losses


# ------------------------------------------------------------------------------------ sampling
class Frame:
    """One form of the probability-flow ODE, ds/dv = F(v, s, c): the independent variable v (a
    monotone function of t, and of lambda) and the state s (an affine function of x). Sampling and
    the adjoint are written once on this interface; each form is a small subclass."""

    def __init__(self, model, schedule: VPSchedule):
        self.model, self.schedule = model, schedule

    def v_of_t(self, t):
        """The independent variable v at time t."""
        raise NotImplementedError

    def v_of_lam(self, lam):
        """The independent variable v at log-SNR lambda."""
        raise NotImplementedError

    def dv_dlam(self, lam):
        """dv / dlambda at log-SNR lambda."""
        raise NotImplementedError

    def state(self, x, t):
        """The state s of the data x at time t."""
        raise NotImplementedError

    def x(self, s, t):
        """The data x of the state s at time t."""
        raise NotImplementedError

    def velocity(self, v, s, c):
        """ds/dv at (v, s) with condition c: the flow in this form."""
        raise NotImplementedError


class Original(Frame):
    """dx/dt = f(t) x + g(t)^2 / (2 sigma_t) eps_theta(x, t, c), f = -beta/2, g^2 = beta: v = t, s = x."""

    def v_of_t(self, t):
        return t

    def v_of_lam(self, lam):
        return self.schedule.t_of_lam(lam)

    def dv_dlam(self, lam):  # d lambda / dt = -beta / (2 sigma^2)
        t = self.schedule.t_of_lam(lam)
        return -2.0 * self.schedule.sigma(t) ** 2 / self.schedule.beta(t)

    def state(self, x, t):
        return x

    def x(self, s, t):
        return s

    def velocity(self, t, x, c):
        b = self.schedule.beta(t)
        return -0.5 * b * x + b / (2.0 * self.schedule.sigma(t)) * self.model(x, t, c)


class Reparameterised(Frame):
    """AdjointDPM's form: y = x / alpha, rho = sigma / alpha = e^{-lambda}, dy/drho = eps_theta(alpha y, t(rho), c)."""

    def v_of_t(self, t):
        return self.schedule.rho(t)

    def v_of_lam(self, lam):
        return torch.exp(-torch.as_tensor(lam, dtype=torch.float64))

    def dv_dlam(self, lam):
        return -self.v_of_lam(lam)

    def state(self, x, t):
        return x / self.schedule.alpha(t)

    def x(self, s, t):
        return self.schedule.alpha(t) * s

    def velocity(self, rho, y, c):
        t = self.schedule.t_of_rho(rho)
        return self.model(self.schedule.alpha(t) * y, t, c)


class Gaussian(Frame):
    """The flow relative to the one the data's Gaussian fit would follow (substrate's own form; not
    in the papers). For data N(mu, Q diag(s) Q^T) the noise predictor is eps_G = sigma (alpha^2 Sigma +
    sigma^2)^{-1} (x - alpha mu), and the flow dx/dlambda = sigma^2 x - sigma eps is solved exactly by
    z = Q^T (x - alpha mu) = Phi(lambda) w with Phi_k = sqrt(alpha^2 s_k + sigma^2), w constant. So with
    v = lambda and s = w = Phi^{-1} Q^T (x - alpha mu),

        dw/dlambda = -sigma Phi^{-1} (Q^T eps_theta(x, t, c) - sigma Phi^{-1} w),   x = alpha mu + Q Phi w,

    whose right-hand side is the network's departure from the Gaussian fit: zero for Gaussian
    data, whatever the step. (For standard-normal data, w = x and this is the original ODE in lambda;
    DPM-Solver's split, the reparameterised form, is exact for data concentrated at 0 instead.)
    mu, s, Q: the model's ``data_mean``, ``data_variances``, ``data_axes`` (set by :func:`train`)."""

    def _phi(self, t):
        m = self.model
        return torch.sqrt(self.schedule.alpha(t) ** 2 * m.data_variances + self.schedule.sigma(t) ** 2)

    def v_of_t(self, t):
        return self.schedule.lam(t)

    def v_of_lam(self, lam):
        return torch.as_tensor(lam, dtype=torch.float64)

    def dv_dlam(self, lam):
        return torch.ones_like(torch.as_tensor(lam, dtype=torch.float64))

    def state(self, x, t):
        m = self.model
        return (x - self.schedule.alpha(t) * m.data_mean) @ m.data_axes / self._phi(t)

    def x(self, s, t):
        m = self.model
        return self.schedule.alpha(t) * m.data_mean + (self._phi(t) * s) @ m.data_axes.T

    def velocity(self, lam, w, c):
        t = self.schedule.t_of_lam(lam)
        sigma, phi = self.schedule.sigma(t), self._phi(t)
        x, Q = self.x(w, t), self.model.data_axes
        if getattr(self.model, "gaussian_skip", False):
            # eps = eps_G + MLP and Q^T eps_G = sigma Phi^{-1} w exactly: the residual is the MLP alone
            # (computing eps_G only to subtract it would cost work and rounding)
            return -sigma / phi * (self.model.mlp(x, t, c) @ Q)
        return -sigma / phi * (self.model(x, t, c) @ Q - sigma / phi * w)


FRAMES = {"original": Original, "reparameterised": Reparameterised, "gaussian": Gaussian}


def _frame(model, schedule, ode, solver):
    if not isinstance(ode, str) or ode not in FRAMES:
        raise SubstrateValueError(f"ode={ode!r}; allowed: {ODES}")
    return FRAMES["reparameterised" if solver in ("dpm1", "dpm2") else ode](model, schedule)


def _check(solver, times, schedule, x_T, c, model):
    """``times`` as a tensor, and x_T as one, after the checks of the arguments the sampling entry
    points share: SubstrateValueError naming the argument."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise SubstrateValueError(f"solver={solver!r}; allowed: {SOLVERS}")
    times = _finite("times", times, (None,))
    if len(times) < 2 or not bool(torch.all(times[1:] < times[:-1])) or not times[-1] > 0:
        raise SubstrateValueError("times: a decreasing 1-D sequence of at least two times > 0 (from 1 to t_min)")
    if not isinstance(schedule, VPSchedule):
        raise SubstrateValueError(f"schedule must be a VPSchedule, got {type(schedule).__name__}")
    x_T = _finite("x_T", x_T, (None, getattr(model, "dim", None)))
    if not isinstance(c, torch.Tensor):
        raise SubstrateValueError(f"c must be a tensor (e.g. model.embedding(label)), got {type(c).__name__}")
    _finite("c", c, None)
    return times, x_T


def sample(model, schedule: VPSchedule, x_T, c, times, ode: str = "reparameterised", solver: str = "rk4"):
    """x at t_min from x_T at times[0] = 1 along ``times`` (decreasing, e.g. :func:`grid`), by
    ``solver`` steps of the form ``ode`` of the flow (:data:`FRAMES`) in its own variable:
    ``euler``, ``midpoint`` (second stage at the lambda midpoint), ``rk4``, or the multistep
    ``ms2``/``ms3``. ``dpm1``/``dpm2`` are DPM-Solver-1/2 (the exponential integrators of the
    original ODE, = ``euler``/``midpoint`` of the reparameterised one; ``ode`` is then irrelevant),
    computed here in their published form. Differentiable by torch autograd (the discrete adjoint)."""
    times, x_T = _check(solver, times, schedule, x_T, c, model)
    frame = _frame(model, schedule, ode, solver)
    if solver in ("dpm1", "dpm2"):
        return _dpm_solver(model, schedule, x_T, c, times, solver)
    s, = _integrate(frame, times, lambda v, state: [frame.velocity(v, state[0], c)],
                    [frame.state(x_T, times[0])], solver)
    return frame.x(s, times[-1])


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


def _integrate(frame: Frame, times, field, state, solver):
    """``state`` (a list of tensors) carried along ``times`` (either way) by ds/dv = field(v, s)."""
    lam = frame.schedule.lam(times)
    v = frame.v_of_t(times)
    if solver in ("ms2", "ms3"):
        return _adams(frame, lam, v, field, state, int(solver[-1]))
    mids = frame.v_of_lam((lam[:-1] + lam[1:]) / 2)
    for lo, hi, mid in zip(v[:-1], v[1:], mids):
        h = hi - lo

        def axpy(k, w):
            return [u + w * d for u, d in zip(state, k)]

        if solver in ("euler", "dpm1"):
            state = axpy(field(lo, state), h)
        elif solver in ("midpoint", "dpm2"):
            state = axpy(field(mid, axpy(field(lo, state), mid - lo)), h)
        else:
            k1 = field(lo, state)
            k2 = field(lo + h / 2, axpy(k1, h / 2))
            k3 = field(lo + h / 2, axpy(k2, h / 2))
            k4 = field(hi, axpy(k3, h))
            state = [u + h / 6 * (p + 2 * q + 2 * r + w) for u, p, q, r, w in zip(state, k1, k2, k3, k4)]
    return state


_GAUSS = np.polynomial.legendre.leggauss(20)


def _adams_weights(frame: Frame, nodes: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """w_j = int_lo^hi l_j(lambda) (dv/dlambda) d lambda, l_j the Lagrange basis on ``nodes``; hi < lo
    as well (the adjoint runs lambda backward). 20-point Gauss-Legendre: exact for the polynomial
    part, and for the smooth dv/dlambda (e^{-lambda} for rho: Taylor remainder below 1e-20 for
    |hi - lo| <= 5; the whole lambda range of the VP schedule is ~10)."""
    x, weights = _GAUSS
    s = lo + (hi - lo) * (x + 1) / 2
    basis = np.ones((len(nodes), len(s)))
    for j in range(len(nodes)):
        for m in range(len(nodes)):
            if m != j:
                basis[j] *= (s - nodes[m]) / (nodes[j] - nodes[m])
    return (basis * frame.dv_dlam(torch.as_tensor(s)).numpy() * weights).sum(1) * (hi - lo) / 2


def _adams(frame: Frame, lam, v, field, state, order):
    """The ``order``-step Adams-Bashforth method interpolating in lambda (``ms2``/``ms3``): the last
    ``order`` evaluations of ``field`` are the nodes of a polynomial in lambda, integrated exactly
    against dv/dlambda (for the reparameterised form: the exponential Adams method of DEIS). One
    evaluation a step; the first step spends a second one at its lambda midpoint (after an Euler
    predictor), so that no step has a local error above O(h^{order+1}): a first-order start would
    cap the global order at 2."""
    lam_np = lam.detach().numpy()
    nodes, values = [], []

    def advance(lo, hi, state):
        w = _adams_weights(frame, np.array(nodes), lo, hi)
        return [u + sum(float(wj) * k[n] for wj, k in zip(w, values)) for n, u in enumerate(state)]

    for i in range(len(lam) - 1):
        nodes, values = [lam_np[i]] + nodes[:order - 1], [field(v[i], state)] + values[:order - 1]
        if i == 0:
            mid = (lam_np[0] + lam_np[1]) / 2
            predictor = advance(lam_np[0], mid, state)
            nodes, values = [mid] + nodes, [field(frame.v_of_lam(mid), predictor)] + values
        state = advance(lam_np[i], lam_np[i + 1], state)
    return state


# ------------------------------------------------------------------------------------ adjoint
def _vjp(f, at, cotangent):
    with torch.enable_grad():
        at = at.detach().requires_grad_(True)
        return torch.autograd.grad(f(at), at, cotangent)[0]


def adjoint(model, schedule: VPSchedule, x_T, c, times, loss_grad, solver: str = "rk4",
            ode: str = "reparameterised", weights: bool = True):
    """The gradient of a loss L(x_0) of the sample with respect to the initial noise x_T, the
    conditioning c and the network's weights by the continuous adjoint of the probability-flow ODE
    (AdjointDPM), memory independent of the number of steps. With the ODE ds/dv = F(v, s, c) of the
    form ``ode`` (:data:`FRAMES`; AdjointDPM's is ``reparameterised``: v = rho, s = y = x / alpha,
    F = eps_theta(alpha y, t(rho), c)), the sample is integrated forward, then the augmented state
    backward along the reversed grid,

        d/dv [s, a_s, a_c, a_theta] = [F, -a_s^T dF/ds, -a_s^T dF/dc, -a_s^T dF/dtheta],
        a_s = (dx/ds)^T dL/dx_0 at the data end (alpha(t_min) dL/dx_0 for y), a_c = a_theta = 0 there,

    with s itself re-integrated backward (nothing is stored per step) and one vector-Jacobian product
    of F per stage, by the same ``solver`` as the forward pass: ``dpm1``/``dpm2`` (DPM-Solver's
    exponential steps: Euler in rho, and the two-stage step whose second stage sits at the lambda
    midpoint, applied to the augmented system: the adjoint steps of AdjointDEIS, first and second
    order), ``euler``, ``midpoint``, ``rk4`` or the multistep ``ms2``/``ms3`` in the form's variable.
    ``loss_grad(x_0) -> (L, dL/dx_0)``. Returns (x_0, L, dL/dx_T, dL/dc, {name: dL/dparam}), the
    last empty with ``weights=False`` (the weights' products skipped: ~2x faster for x_T and c)."""
    times, x_T = _check(solver, times, schedule, x_T, c, model)
    if not callable(loss_grad):
        raise SubstrateValueError(f"loss_grad must be a function x_0 -> (L, dL/dx_0), got {type(loss_grad).__name__}")
    frame = _frame(model, schedule, ode, solver)
    with torch.no_grad():
        x_0 = sample(model, schedule, x_T, c, times, ode, solver)
    L, g = loss_grad(x_0)
    g = torch.as_tensor(g, dtype=x_0.dtype)
    if g.shape != x_0.shape or not bool(torch.all(torch.isfinite(g))) or not math.isfinite(float(L)):
        raise SubstrateValueError(f"loss_grad returned L={float(L)} and dL/dx_0 of shape {tuple(g.shape)}: need "
                                  f"finite values, dL/dx_0 of the samples' shape {tuple(x_0.shape)}")
    names, params = zip(*model.named_parameters()) if weights else ((), ())
    c = c.detach()

    def augmented(v, state):
        s, a = state[0], state[1]
        with torch.enable_grad():
            s_ = s.detach().requires_grad_(True)
            c_ = c.clone().requires_grad_(True)
            F = frame.velocity(v, s_, c_)
            vjp = torch.autograd.grad(F, (s_, c_) + params, grad_outputs=a, allow_unused=True)
        return [F.detach()] + [-(u if u is not None else torch.zeros_like(p)) for u, p in zip(vjp, (s_, c_) + params)]

    s_0 = frame.state(x_0, times[-1])
    a_0 = _vjp(lambda s: frame.x(s, times[-1]), s_0, g)
    state = [s_0, a_0, torch.zeros_like(c)] + [torch.zeros_like(p) for p in params]
    state = _integrate(frame, times.flip(0), augmented, state, solver)
    dx_T = _vjp(lambda x: frame.state(x, times[0]), x_T, state[1])
    return x_0, L, dx_T, state[2], dict(zip(names, state[3:]))


# the stages of the augmented state a solver holds at once (rk4: the state and its four slopes)
_STAGES_HELD = {"euler": 2, "midpoint": 3, "rk4": 5, "ms2": 3, "ms3": 4, "dpm1": 2, "dpm2": 3}


def gradient_counts(model: NoisePredictor, batch: int, solver: str, steps: int) -> dict:
    """What a gradient of a loss of ``batch`` samples through ``steps`` steps of ``solver`` costs (a
    :class:`substrate.Counts` each, docs/equations.md, section 9), by :func:`adjoint` and by
    backpropagation through the solver's steps, counted from the network's layers and the solver's
    evaluations (:func:`evaluations`). Both run the forward sample (one network evaluation: a
    multiply-add per weight of its linear layers and sample, in ``macs``; the Gaussian skip's two
    dim x dim products). Backpropagation then takes one vector-Jacobian product per evaluation (two
    multiply-adds per weight: the input's and the weights' cotangents, in ``flops``) and holds every
    evaluation's activations (each linear layer's output before and after its SiLU) and every step's
    state; the adjoint re-evaluates the network backwards (its ``macs`` twice) with a
    vector-Jacobian product each, and holds the augmented state [s, a_s, a_c, a_theta] in the
    solver's stages and one evaluation's activations, whatever the number of steps."""
    if not isinstance(model, NoisePredictor):
        raise SubstrateValueError(f"model must be a NoisePredictor, got {type(model).__name__}")
    count(batch, "batch"), count(steps, "steps", maximum=_MAX_STEPS)
    if not isinstance(solver, str) or solver not in _STAGES_HELD:
        raise SubstrateValueError(f"solver={solver!r}; allowed: {', '.join(_STAGES_HELD)}")
    linear = [m for m in model.net if isinstance(m, nn.Linear)]
    weights = sum(m.weight.numel() for m in linear) + (2 * model.dim ** 2 if model.gaussian_skip else 0)
    acts = sum(2 * m.out_features for m in linear[:-1]) + linear[-1].out_features + linear[0].in_features
    params = sum(p.numel() for p in model.parameters())
    evals = evaluations(solver, steps)
    forward = Counts(samples=batch, phases=1, steps=steps, nfev=evals, macs=evals * weights * batch,
                     memory=2 * model.dim * batch, traffic=2 * model.dim * batch)
    held = evals * acts * batch + (steps + 1) * model.dim * batch + params
    backprop = forward.replace(flops=evals * 4 * weights * batch, memory=held, traffic=forward.traffic + 2 * held)
    augmented = 2 * model.dim * batch + model.table.embedding_dim * batch + params
    held = _STAGES_HELD[solver] * augmented + acts * batch
    adjoint_ = forward.replace(phases=2, nfev=2 * evals, macs=2 * evals * weights * batch,
                               flops=evals * 4 * weights * batch, memory=held,
                               traffic=forward.traffic + 2 * evals * held)
    return {"adjoint": adjoint_, "backprop": backprop}


def customise(model, schedule: VPSchedule, x_T, c, times, loss_grad, *, what: str, steps: int, lr: float = 0.05,
              solver: str = "dpm2", generator: torch.Generator | None = None, ode: str = "reparameterised"):
    """AdjointDPM's customisations: ``steps`` Adam steps on ``what`` so that the samples lower a
    loss, each gradient from :func:`adjoint` of the form ``ode`` (AdjointDPM's reparameterised one by
    default; the ``dpm_gradients`` study finds the ``gaussian`` form with ``rk4`` more accurate):
    "noise" (the initial noise x_T, e.g. against a fixed classifier: the security-auditing use),
    "conditioning" (the embedding c, a learned style) or "weights" (the network's weights, in place:
    fine-tuning). With a ``generator``, fresh initial noise of x_T's shape every step (for
    "conditioning"/"weights": the customisation then holds for new samples). Returns (x_T, c, the
    loss at every step, the samples of the last x_T and c)."""
    if not isinstance(what, str) or what not in ("noise", "conditioning", "weights"):
        raise SubstrateValueError(f"what={what!r}; allowed: 'noise', 'conditioning', 'weights'")
    if what == "noise" and generator is not None:
        raise SubstrateValueError("what='noise' optimises one x_T: no fresh noise (generator=None)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise SubstrateValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    count(steps, "steps", maximum=_MAX_STEPS), positive(lr, "lr")
    times, x_T = _check(solver, times, schedule, x_T, c, model)
    x_T = x_T.detach().clone()
    c = c.detach().clone()
    names, params = zip(*model.named_parameters())
    target = {"noise": [x_T], "conditioning": [c], "weights": list(params)}[what]
    opt = torch.optim.Adam(target, lr=lr)
    losses = np.empty(steps)
    for k in range(steps):
        if generator is not None:
            x_T = torch.randn(x_T.shape, dtype=torch.float64, generator=generator)
        _, losses[k], dx_T, dc, dtheta = adjoint(model, schedule, x_T, c, times, loss_grad, solver, ode,
                                                 weights=what == "weights")
        grads = [dx_T] if what == "noise" else [dc] if what == "conditioning" else [dtheta[n] for n in names]
        for p, g in zip(target, grads):
            p.grad = g
        opt.step()
    with torch.no_grad():
        return x_T, c, losses, sample(model, schedule, x_T, c, times, ode, solver)

