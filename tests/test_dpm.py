"""The diffusion model of models/dpm.py (docs/equations.md, section 7): its schedule, and its probability-flow
ODE, original and reparameterised (y = x / alpha, rho = sigma / alpha), against scipy's solve_ivp.

* The schedule against closed forms: lambda and its inverse, alpha^2 + sigma^2 = 1, f = d log alpha/dt
  and g^2 = d sigma^2/dt - 2 f sigma^2 = beta by central differences (1e-7: the differences' error).
* Both ODEs reach the same sample as solve_ivp (DOP853 at rtol 1e-12) on the original one: RK4 with
  400 steps on the log-SNR grid within 3e-8 (original; measured 1.1e-8) and 1e-10 (reparameterised;
  measured 3.5e-11), relative to the sample's scale: RK4's own O(h^4) error.
* DPM-Solver-1 is Euler in rho (rounding); the observed orders of Euler/DPM-1 (1), DPM-2 (2) and
  RK4 (4) on the log-SNR grid.
"""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from models import dpm
from substrate.errors import SubstrateValueError

S = dpm.VPSchedule()


def small_model(seed=0, classes=3):
    """An untrained predictor with small weights: a smooth, well-behaved vector field (without the
    Gaussian skip, which would make it the flow of standard-normal data: a special case)."""
    g = torch.Generator().manual_seed(seed)
    m = dpm.NoisePredictor(2, classes=classes, hidden=16, generator=g, gaussian_skip=False)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.5)
    x = torch.randn(4, 2, dtype=torch.float64, generator=g)
    return m, x, m.embedding(1)


def test_schedule_closed_forms():
    t = torch.linspace(S.t_min, 1.0, 101, dtype=torch.float64)
    assert torch.max(torch.abs(S.t_of_lam(S.lam(t)) - t)) <= 1e-13
    assert torch.max(torch.abs(S.alpha(t) ** 2 + S.sigma(t) ** 2 - 1)) <= 1e-15
    assert torch.allclose(S.rho(t), S.sigma(t) / S.alpha(t), rtol=1e-13)
    assert torch.allclose(S.t_of_rho(S.rho(t)), t, rtol=1e-12)
    d = 1e-6
    f = (S.log_alpha(t + d) - S.log_alpha(t - d)) / (2 * d)
    assert torch.allclose(f, -0.5 * S.beta(t), rtol=1e-7)
    g2 = (S.sigma(t + d) ** 2 - S.sigma(t - d) ** 2) / (2 * d) - 2 * f * S.sigma(t) ** 2
    assert torch.allclose(g2, S.beta(t), rtol=1e-6)
    for kind in dpm.GRIDS:
        times = dpm.grid(S, 10, kind)
        assert times[0] == 1.0 and times[-1] == S.t_min and bool(torch.all(times[1:] < times[:-1]))
    lam = S.lam(dpm.grid(S, 10, "logsnr"))
    assert torch.allclose(lam[1:] - lam[:-1], (lam[-1] - lam[0]) / 10, rtol=1e-10)


def reference(model, x, c):
    """x at t_min from the original ODE by solve_ivp (DOP853, rtol = atol = 1e-12)."""
    def f(t, v):
        with torch.no_grad():
            x_ = torch.as_tensor(v).reshape(x.shape)
            b = S.beta(t)
            return (-0.5 * b * x_ + b / (2 * S.sigma(t)) * model(x_, t, c)).reshape(-1).numpy()

    sol = solve_ivp(f, (1.0, S.t_min), x.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success
    return torch.as_tensor(sol.y[:, -1]).reshape(x.shape)


def test_both_odes_reach_the_solve_ivp_sample():
    model, x, c = small_model()
    ref = reference(model, x, c)
    with torch.no_grad():
        for ode, tol in (("original", 3e-8), ("reparameterised", 1e-10), ("gaussian", 3e-8)):  # measured 1.1e-8, 3.5e-11, 1.1e-8
            out = dpm.sample(model, S, x, c, dpm.grid(S, 400), ode, "rk4")
            assert torch.max(torch.abs(out - ref)) <= tol * torch.max(torch.abs(ref)), ode
        for solver in ("euler", "dpm1", "dpm2"):  # the low-order ones converge too, more slowly
            out = dpm.sample(model, S, x, c, dpm.grid(S, 400), "reparameterised", solver)
            assert torch.max(torch.abs(out - ref)) <= 1e-2 * torch.max(torch.abs(ref)), solver


def test_dpm_solver_1_is_euler_in_rho_and_the_orders():
    model, x, c = small_model(1)
    with torch.no_grad():
        for kind in dpm.GRIDS:
            times = dpm.grid(S, 25, kind)
            a = dpm.sample(model, S, x, c, times, solver="dpm1")
            b = dpm.sample(model, S, x, c, times, "reparameterised", "euler")
            assert torch.max(torch.abs(a - b)) <= 1e-12 * torch.max(torch.abs(a))
        ref = reference(model, x, c)
        for ode, solver, order in (("reparameterised", "euler", 1), ("original", "dpm2", 2),
                                   ("reparameterised", "rk4", 4), ("original", "rk4", 4),
                                   ("reparameterised", "ms2", 2), ("reparameterised", "ms3", 3),
                                   ("gaussian", "midpoint", 2), ("gaussian", "ms3", 3)):
            errs = [float(torch.max(torch.abs(dpm.sample(model, S, x, c, dpm.grid(S, n), ode, solver) - ref)))
                    for n in (40, 80)]
            observed = np.log2(errs[0] / errs[1])
            assert abs(observed - order) < 0.35, (ode, solver, errs, observed)


class GaussianData(torch.nn.Module):
    """The exact noise predictor of Gaussian data N(mu, Sigma): eps = sigma (alpha^2 Sigma + sigma^2)^{-1}
    (x - alpha mu), with the data's statistics where models.dpm.train puts them."""

    def __init__(self, seed=0, dim=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(dim, dim, dtype=torch.float64, generator=g)
        variances, axes = torch.linalg.eigh(A @ A.T / dim + 0.01 * torch.eye(dim, dtype=torch.float64))
        self.register_buffer("data_mean", torch.randn(dim, dtype=torch.float64, generator=g))
        self.register_buffer("data_variances", variances)
        self.register_buffer("data_axes", axes)
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))  # d/dscale = 0 at the exact flow

    def forward(self, x, t, c):
        a, s = S.alpha(t), S.sigma(t)
        Q, v = self.data_axes, self.data_variances
        return self.scale * s * ((x - a * self.data_mean) @ Q / (a * a * v + s * s)) @ Q.T


def test_the_gaussian_form_is_exact_for_gaussian_data():
    """For Gaussian data the flow is known in closed form, x_0 = alpha_0 mu + Q Phi_0 Phi_1^{-1} Q^T (x_T -
    alpha_1 mu), Phi_k = sqrt(alpha^2 s_k + sigma^2): the Gaussian form reaches it in one Euler step
    (its right-hand side is zero; rounding: 1e-13), and the original and reparameterised forms by
    RK4 on 400 log-SNR steps (their truncation error; measured ~1e-9 and ~1e-11)."""
    net = GaussianData()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a1, s1, a0, s0 = S.alpha(1.0), S.sigma(1.0), S.alpha(S.t_min), S.sigma(S.t_min)
    phi = lambda a, s: torch.sqrt(a * a * net.data_variances + s * s)  # noqa: E731
    exact = a0 * net.data_mean + ((x - a1 * net.data_mean) @ net.data_axes * phi(a0, s0) / phi(a1, s1)) @ net.data_axes.T
    c = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for ode, solver, steps, tol in (("gaussian", "euler", 1, 1e-13), ("gaussian", "ms3", 3, 1e-13),
                                        ("original", "rk4", 400, 1e-8), ("reparameterised", "rk4", 400, 1e-8)):
            out = dpm.sample(net, S, x, c, dpm.grid(S, steps), ode, solver)
            assert torch.max(torch.abs(out - exact)) <= tol * torch.max(torch.abs(exact)), (ode, solver)


def test_the_gaussian_form_uses_the_network_part_of_a_skip_model():
    """With the Gaussian skip, the Gaussian form's right-hand side is the MLP alone (Q^T eps_G = sigma
    Phi^{-1} w cancels exactly): equal to the generic formula, which computes eps_G and subtracts it,
    within 1e-12 of scale (that subtraction's rounding; measured 2e-14)."""
    ref = GaussianData(3, dim=2)
    model = dpm.NoisePredictor(2, classes=3, hidden=16, generator=torch.Generator().manual_seed(0))
    for name in ("data_mean", "data_variances", "data_axes"):
        getattr(model, name).copy_(getattr(ref, name))
    frame, c = dpm.Gaussian(model, S), model.embedding(1).detach()
    w = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for lam in (-4.0, 0.0, 4.0):
            t = S.t_of_lam(torch.tensor(lam))
            sigma, phi = S.sigma(t), torch.sqrt(S.alpha(t) ** 2 * model.data_variances + S.sigma(t) ** 2)
            generic = -sigma / phi * (model(frame.x(w, t), t, c) @ model.data_axes - sigma / phi * w)
            fast = frame.velocity(torch.tensor(lam), w, c)
            assert torch.max(torch.abs(fast - generic)) <= 1e-12 * torch.max(torch.abs(fast)), lam


def test_bad_input():
    model, x, c = small_model()
    with pytest.raises(SubstrateValueError, match="solver"):
        dpm.sample(model, S, x, c, dpm.grid(S, 4), solver="heun")
    with pytest.raises(SubstrateValueError, match="ode"):
        dpm.sample(model, S, x, c, dpm.grid(S, 4), "sde", "rk4")
    with pytest.raises(SubstrateValueError, match="decreasing"):
        dpm.sample(model, S, x, c, torch.linspace(S.t_min, 1, 5, dtype=torch.float64))
    with pytest.raises(SubstrateValueError, match="grid kind"):
        dpm.grid(S, 4, "cosine")
    with pytest.raises(SubstrateValueError, match="t_min"):
        dpm.VPSchedule(t_min=0.0)
    with pytest.raises(SubstrateValueError, match="solver='adams'; allowed"):
        dpm.adjoint(model, S, x, c, dpm.grid(S, 4), loss_grad, "adams")
    with pytest.raises(SubstrateValueError, match="ode='gauss'; allowed"):
        dpm.adjoint(model, S, x, c, dpm.grid(S, 4), loss_grad, "rk4", "gauss")


@pytest.fixture(scope="module")
def toy():
    """A noise predictor trained on the 8-Gaussians toy with the mode as the class (1500 Adam
    steps, ~8 s), its losses and its generator."""
    from models.data import eight_gaussians

    x, mode = eight_gaussians(4096, np.random.default_rng(0))
    g = torch.Generator().manual_seed(0)
    model = dpm.NoisePredictor(2, classes=8, hidden=64, generator=g)
    losses = dpm.train(model, S, x, mode, steps=1500, batch=256, generator=g, progress=False)
    return model, losses, g


def centres():
    angle = 2 * np.pi * np.arange(8) / 8
    return 2.0 * np.stack([np.cos(angle), np.sin(angle)], -1)


def test_training_on_eight_gaussians_samples_the_asked_mode(toy):
    """Denoising score matching on the 8-Gaussians toy: the loss falls from ~0.63 (the Gaussian skip
    alone; ~1.1 without it) to ~0.15 (asserted < 0.3) and DPM-Solver-2 samples (50 log-SNR steps)
    conditioned on class 3 land within 0.4 of that mode's centre (measured 100 %, asserted 90 %)."""
    model, losses, g = toy
    assert losses[:50].mean() > 0.5 and losses[-100:].mean() < 0.3
    with torch.no_grad():
        out = dpm.sample(model, S, torch.randn(512, 2, dtype=torch.float64, generator=g), model.embedding(3),
                         dpm.grid(S, 50), solver="dpm2").numpy()
    assert np.mean(np.linalg.norm(out - centres()[3], axis=1) < 0.4) >= 0.9


@pytest.mark.parametrize("ode,solver", [("reparameterised", "dpm2"), ("gaussian", "midpoint")])
def test_guiding_the_initial_noise_towards_a_classifiers_target(toy, ode, solver):
    """The security-auditing use: with the unconditional embedding, Adam on x_T (dL/dx_T by the
    adjoint, 20 log-SNR steps of DPM-Solver-2, or of the midpoint method in the Gaussian form) against a
    fixed classifier's cross-entropy to mode
    5 (logits -||x - centre_k||^2 / 2): the share of samples the classifier labels 5 rises from ~1/8
    (measured 0.07) to all (asserted >= 0.9) in 40 steps, the loss falls from ~5 to ~0.1 (asserted
    10x). (Conditioned on class 3 the same needs x_T moved ~4x further: the conditioning holds.)"""
    model, _, g = toy
    C = torch.as_tensor(centres())

    def cross_entropy(x0):
        x0 = x0.detach().requires_grad_(True)
        logits = -0.5 * ((x0[:, None] - C[None]) ** 2).sum(-1)
        L = torch.nn.functional.cross_entropy(logits, torch.full((len(x0),), 5))
        return float(L.detach()), torch.autograd.grad(L, x0)[0]

    x_T = torch.randn(128, 2, dtype=torch.float64, generator=g)
    c = model.embedding(model.classes).detach()  # the unconditional embedding
    times = dpm.grid(S, 20)
    with torch.no_grad():
        before = dpm.sample(model, S, x_T, c, times, ode, solver)
    label = lambda x: torch.argmin(((x[:, None] - C[None]) ** 2).sum(-1), 1)  # noqa: E731
    _, _, losses, after = dpm.customise(model, S, x_T, c, times, cross_entropy, what="noise", steps=40, lr=0.2,
                                        solver=solver, ode=ode)
    share_before, share_after = float((label(before) == 5).double().mean()), float((label(after) == 5).double().mean())
    assert share_before < 0.25 and share_after >= 0.9, (share_before, share_after)
    assert losses[-1] < 0.1 * losses[0]


def loss_grad(x0, target=torch.tensor([0.3, -0.2], dtype=torch.float64)):
    x0 = x0.detach().requires_grad_(True)
    L = 1e-4 * ((x0 - target) ** 2).sum()
    return float(L.detach()), torch.autograd.grad(L, x0)[0]


def discrete_adjoint(model, x, c, times, solver, ode="reparameterised"):
    """Backpropagation through the same solver steps (torch autograd): the discrete adjoint."""
    xx, cc = x.clone().requires_grad_(True), c.detach().clone().requires_grad_(True)
    model.zero_grad()
    out = dpm.sample(model, S, xx, cc, times, ode, solver)
    (1e-4 * ((out - torch.tensor([0.3, -0.2], dtype=torch.float64)) ** 2).sum()).backward()
    return xx.grad, cc.grad, {k: p.grad for k, p in model.named_parameters()}


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("ode,solver,steps,tol", [("reparameterised", "rk4", 200, 1e-10),
                                                   ("reparameterised", "euler", 400, 0.05),
                                                   ("original", "rk4", 400, 1e-7),
                                                   ("reparameterised", "dpm2", 200, 1e-5),
                                                   ("gaussian", "rk4", 200, 1e-6),
                                                   ("reparameterised", "ms3", 200, 3e-4)])
def test_continuous_adjoint_against_backprop_through_the_solver(ode, solver, steps, tol):
    """dL/dx_T, dL/dc and dL/dtheta by the continuous adjoint (the state re-integrated backward, no
    stored path) against autograd through the same solver's steps: reparameterised, RK4 in rho on
    200 log-SNR steps within 1e-10 (measured 7e-14 - 6e-12; 7e-11 - 7e-9 at 50 steps: both converge
    to the ODE's gradient at high order); Euler in rho (DPM-Solver-1's step in both passes) at first
    order, within 5 % at 400 steps; the original ODE in t, RK4 on 400 log-SNR steps, within 1e-7
    (measured 4e-9 against 2e-13 for the reparameterised ODE on the same grid: its stiff end near
    t_min); DPM-Solver-2's step in both passes (its second stage at the lambda midpoint) at second
    order, within 1e-5 at 200 steps (measured 9e-7; 1.5e-5 at 50); the Gaussian form in lambda, RK4,
    within 1e-6 (measured 3e-11 - 8e-8); the three-step Adams method in both passes within 3e-4
    (measured 1e-6 - 6e-5: third order, and the backward pass's history differs from the forward's).
    The class-embedding table gets no gradient (c is given directly)."""
    model, x, c = small_model()
    times = dpm.grid(S, steps)
    x0, L, gx, gc, gp = dpm.adjoint(model, S, x, c, times, loss_grad, solver, ode)
    dx, dc, dp = discrete_adjoint(model, x, c, times, solver, ode)
    assert rel(gx, dx) <= tol and rel(gc, dc) <= tol
    for k, g in dp.items():
        if g is None:
            assert k == "table.weight" and torch.all(gp[k] == 0)
        else:
            assert rel(gp[k], g) <= tol, k


def test_continuous_adjoint_against_torchdiffeq_odeint_adjoint():
    """The same gradients by torchdiffeq's odeint_adjoint on the reparameterised ODE (its 'rk4',
    the 3/8 rule, on the same rho grid): within 1e-8 at 400 steps (the two RK4 variants differ at
    O(h^4); measured up to 1.1e-9)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    model, x, c = small_model(2)
    times = dpm.grid(S, 400)
    _, _, gx, gc, gp = dpm.adjoint(model, S, x, c, times, loss_grad, "rk4")

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.c = model, torch.nn.Parameter(c.detach().clone())

        def forward(self, rho, y):
            t = S.t_of_rho(rho)
            return self.model(S.alpha(t) * y, t, self.c)

    field = Field()
    y_T = (x / S.alpha(times[0])).clone().requires_grad_(True)
    ys = torchdiffeq.odeint_adjoint(field, y_T, S.rho(times), method="rk4",
                                    adjoint_params=tuple(field.parameters()))
    out = S.alpha(times[-1]) * ys[-1]
    model.zero_grad()
    (1e-4 * ((out - torch.tensor([0.3, -0.2], dtype=torch.float64)) ** 2).sum()).backward()
    assert rel(gx, y_T.grad / S.alpha(times[0])) <= 1e-8 and rel(gc, field.c.grad) <= 1e-8
    for k, p in model.named_parameters():
        if k != "table.weight":  # c is given directly: no gradient reaches the table
            assert rel(gp[k], p.grad) <= 1e-8, k


def test_learning_a_conditioning_and_fine_tuning_the_weights(toy):
    """The other two customisations, with fresh noise every step so that they hold for new samples:
    from the unconditional embedding, a learned c (20 Adam steps at 0.1) and, separately, fine-tuned
    weights (20 steps at 1e-3, on a copy) bring new samples towards the point (0, -2) (mode 6): their
    mean squared distance falls below half that of the untouched model's samples (measured 8.5 ->
    0.3 and 1.5)."""
    import copy

    model, _, g = toy
    target = torch.tensor([0.0, -2.0], dtype=torch.float64)

    def distance(x0):
        x0 = x0.detach().requires_grad_(True)
        L = ((x0 - target) ** 2).sum(-1).mean()
        return float(L.detach()), torch.autograd.grad(L, x0)[0]

    def new_samples(net, c):
        with torch.no_grad():
            x0 = dpm.sample(net, S, torch.randn(256, 2, dtype=torch.float64, generator=g), c, times, solver="dpm2")
        return float(((x0 - target) ** 2).sum(-1).mean())

    times = dpm.grid(S, 15)
    c0 = model.embedding(model.classes).detach()
    baseline = new_samples(model, c0)
    for what, lr, net in (("conditioning", 0.1, model), ("weights", 1e-3, copy.deepcopy(model))):
        x_T = torch.randn(64, 2, dtype=torch.float64, generator=g)
        _, c, losses, _ = dpm.customise(net, S, x_T, c0, times, distance, what=what, steps=20, lr=lr, generator=g)
        after = new_samples(net, c)
        assert after < 0.5 * baseline, (what, baseline, after)
    with pytest.raises(SubstrateValueError, match="what="):
        dpm.customise(model, S, x_T, c0, times, distance, what="schedule", steps=1)


def test_the_gradient_study_measures_convergence():
    """The dpm_gradients task on a small toy model: RK4's gradient errors (x_T, c, theta) fall by more
    than 100x from 8 to 128 evaluations (fourth order: ~1e4 expected; measured > 1e3) for both
    adjoints, and the reference's own error (400 RK4 steps against 200) is below 1e-7 (measured 3e-9)."""
    from studies.config import resolve
    from studies.catalogue.dpm_gradients import GRADIENTS_SCHEMA, run_dpm_gradients

    config = resolve(GRADIENTS_SCHEMA, {"model": {"train_steps": 200, "hidden": 16, "samples": 512},
                                        "methods": ["original/logsnr/rk4", "reparameterised/logsnr/midpoint"],
                                        "budgets": [8, 128], "batch": 16, "reference_steps": 400}, "base")
    r = run_dpm_gradients(config, 0)
    for q in ("x", "c", "theta"):
        err = r.arrays[f"grad_error_{q}"][1]
        assert np.all(err[0, :, 0] > 100 * err[0, :, 1]), (q, err)
        assert r.scalars[f"reference_error_{q}"] < 1e-7
    assert r.arrays["evaluations"][1].tolist() == [[8, 128], [8, 128]]
    with pytest.raises(SubstrateValueError, match=r"target=8: the eight_gaussians model has classes 0..7"):
        run_dpm_gradients({**config, "target": 8}, 0)


# ------------------------------------------------------------------------------------ the studies' model cache
def tiny_model_config():
    from studies.catalogue.dpm_gradients import MODEL

    config = {k: f.default for k, f in MODEL.items()}
    config.update(samples=64, hidden=4, depth=1, embed=2, train_steps=2, batch=8)
    return config


class _Planted:
    """A pickle that, when loaded by a full unpickler, creates the folder ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the planted file
def test_model_cache_never_runs_a_planted_pickle(tmp_path, monkeypatch):
    """A cache file replaced by a pickle that runs code is not executed, even with
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (torch's switch back to full unpickling when weights_only is
    not passed): the load is weights_only=True, the file is refused with a warning and replaced."""
    import os

    from studies.catalogue import dpm_gradients

    monkeypatch.setenv("SUBSTRATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    config = tiny_model_config()
    _, _, _, seconds = dpm_gradients.trained_model(config, seed=0)
    assert seconds > 0  # trained, then cached
    for f in (tmp_path / "cache", tmp_path / "cache" / "dpm"):
        assert f.stat().st_mode & 0o777 == 0o700
    [path] = (tmp_path / "cache" / "dpm").glob("*.pt")
    assert dpm_gradients.trained_model(config, seed=0)[3] == 0.0  # from the cache
    marker = tmp_path / "code-ran"
    torch.save(_Planted(str(marker)), path)  # a zip archive as torch writes it, with a malicious pickle
    with pytest.warns(UserWarning, match="model cache file .* is unreadable"):
        _, _, _, seconds = dpm_gradients.trained_model(config, seed=0)
    assert not marker.exists() and seconds > 0
    assert dpm_gradients.trained_model(config, seed=0)[3] == 0.0  # replaced by good weights
    import pickle

    path.write_bytes(pickle.dumps(_Planted(str(marker))))  # a bare pickle (torch's legacy format)
    with pytest.warns(UserWarning, match="unreadable"):
        dpm_gradients.trained_model(config, seed=0)
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_model_cache_in_a_folder_others_can_write_is_not_used(tmp_path, monkeypatch, mode):
    """A cache folder writable by others (group or world) is neither read nor written: a warning, and
    the model is trained (a file already there, which someone else could have planted, is ignored)."""
    from studies.catalogue import dpm_gradients

    root = tmp_path / "cache"
    monkeypatch.setenv("SUBSTRATE_CACHE", str(root))
    config = tiny_model_config()
    dpm_gradients.trained_model(config, seed=0)
    [path] = (root / "dpm").glob("*.pt")
    (root / "dpm").chmod(mode)
    with pytest.warns(UserWarning, match=rf"model cache folder {root / 'dpm'} is writable by others \(mode {mode:o}\)"):
        assert dpm_gradients.trained_model(config, seed=0)[3] > 0  # trained, the file ignored
    (root / "dpm").chmod(0o700)
    root.chmod(mode)
    path.unlink()
    with pytest.warns(UserWarning, match="is writable by others"):
        dpm_gradients.trained_model(config, seed=0)
    assert not path.exists()  # nothing written either


def test_model_cache_owned_by_another_user_is_not_used(tmp_path, monkeypatch):
    import os

    from studies.catalogue import dpm_gradients

    monkeypatch.setenv("SUBSTRATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.warns(UserWarning, match="is owned by another user"):
        assert dpm_gradients.trained_model(tiny_model_config(), seed=0)[3] > 0
    assert not list((tmp_path / "cache").rglob("*.pt"))


# ------------------------------------------------------------------------------------ bad input (issue 15)
def _loss_grad(x0):
    return float((x0 ** 2).sum()), 2 * x0


@pytest.mark.parametrize("call, match", [
    (lambda m, x, c, t: dpm.sample(m, S, torch.full_like(x, float("nan")), c, t), "x_T contains NaN or Inf"),
    (lambda m, x, c, t: dpm.sample(m, S, x, c * float("inf"), t), "c contains NaN or Inf"),
    (lambda m, x, c, t: dpm.sample(m, S, x[:, :1], c, t), r"x_T has shape \(4, 1\); expected \('n', 2\)"),
    (lambda m, x, c, t: dpm.sample(m, S, "noise", c, t), "x_T must be a real array, got str"),
    (lambda m, x, c, t: dpm.sample(m, S, x, c, torch.tensor([1.0, float("nan")])), "times contains NaN or Inf"),
    (lambda m, x, c, t: dpm.sample(m, S, x, c, torch.tensor([1.0, 0.0])), "times: a decreasing 1-D sequence"),
    (lambda m, x, c, t: dpm.sample(m, "vp", x, c, t), "schedule must be a VPSchedule"),
    (lambda m, x, c, t: dpm.adjoint(m, S, nan_at(x), c, t, _loss_grad), "x_T contains NaN or Inf"),
    (lambda m, x, c, t: dpm.adjoint(m, S, x, c, t, lambda x0: (1.0, torch.full_like(x0, float("nan")))),
     "loss_grad returned L=1.0 and dL/dx_0 of shape"),
    (lambda m, x, c, t: dpm.adjoint(m, S, x, c, t, None), "loss_grad must be a function"),
    (lambda m, x, c, t: dpm.customise(m, S, nan_at(x), c, t, _loss_grad, what="noise", steps=1),
     "x_T contains NaN or Inf"),
    (lambda m, x, c, t: dpm.customise(m, S, x, c, t, _loss_grad, what="noise", steps=0), r"steps=0 must be an integer"),
    (lambda m, x, c, t: dpm.customise(m, S, x, c, t, _loss_grad, what="noise", steps=1, lr=-1.0),
     "lr=-1.0 must be a positive finite number"),
    (lambda m, x, c, t: dpm.train(m, S, nan_at(x), steps=1, generator=torch.Generator()), "x contains NaN or Inf"),
    (lambda m, x, c, t: dpm.train(m, S, x, [0, 1, 2, 9], steps=1, generator=torch.Generator()),
     r"labels must be 4 integers in \[0, 3\]"),
    (lambda m, x, c, t: dpm.train(m, S, x, steps=10 ** 30, generator=torch.Generator()), r"steps=10{30} must be"),
    (lambda m, x, c, t: dpm.train(m, S, x, steps=1, uncond=2.0, generator=torch.Generator()), "uncond=2.0 must be"),
    (lambda m, x, c, t: dpm.train(m, S, x, steps=1, generator=0), "generator must be a torch.Generator"),
    (lambda m, x, c, t: dpm.grid(S, 10 ** 30), r"steps=10{30} must be an integer"),
    (lambda m, x, c, t: dpm.VPSchedule(beta_0="0.1"), "VPSchedule.beta_0='0.1' must be a number"),
    (lambda m, x, c, t: dpm.NoisePredictor(2, frequencies=-1), "NoisePredictor.frequencies=-1"),
])
def test_bad_input_is_refused_naming_the_argument(call, match):
    """Used to return NaN samples and gradients without a word (NaN x_T), or fail deep in torch."""
    m, x, c = small_model()
    with pytest.raises(SubstrateValueError, match=match):
        call(m, x, c, dpm.grid(S, 3))


def nan_at(x):
    x = x.clone()
    x[0, 0] = float("nan")
    return x


def test_training_that_diverges_names_the_step():
    """Adam at lr = 1e12 on score matching: the loss overflows to NaN within a few steps; train stops
    there with the step instead of returning NaN weights."""
    from substrate.errors import DivergenceError

    m, _, _ = small_model()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(DivergenceError, match=r"denoising score matching diverged at step \d+ of 50 .* lr=1e\+300"):
        dpm.train(m, S, x, steps=50, batch=16, lr=1e300, generator=torch.Generator().manual_seed(0), progress=False)
