"""The ``dpm_gradients`` study (``models.dpm``, docs/equations.md, section 7): does the reparameterisation
help, and what does better? The sample and the gradients of a loss on it (with respect to x_T, the
class embedding c and the weights) by every combination of ODE, grid and solver, through the discrete
adjoint (autograd through the steps) and the continuous adjoint, at equal network evaluations, against
a converged reference.

Every diffusion study trains its noise predictor with :func:`trained_model` (the ``model`` section),
cached on disk by its configuration and seed, so that the runs of a sweep that share a model train it
once. ``models.dpm`` imports torch (an optional extra): it is imported where a run or a check needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np

from models.data import digits_arrays, eight_gaussians
from studies import figures as F
from studies.config import Check, Field, ListOf, Range
from studies.runs import Result, Task, discard
from substrate.errors import SubstrateValueError

MODEL = {
    "dataset": Field(str, ("eight_gaussians", "digits"), "eight_gaussians",
                     "training data: the 2-D toy of eight Gaussians (class = mode) or scikit-learn's 8x8 "
                     "digits (pixels mapped to [-1, 1], class = digit)"),
    "samples": Field(int, Range(1, 1_000_000), 4096, "toy samples drawn (the digits set has 1797)"),
    "hidden": Field(int, Range(1, 4096), 64, "units of every hidden SiLU layer"),
    "depth": Field(int, Range(1, 16), 2, "hidden layers"),
    "embed": Field(int, Range(1, 1024), 8, "size of the class embedding c"),
    "train_steps": Field(int, Range(1, 10_000_000), 3000, "Adam steps of denoising score matching"),
    "batch": Field(int, Range(1, 65_536), 256, "minibatch of denoising score matching"),
    "lr": Field(float, Range(0.0, 1.0, lo_open=True), 2e-3, "Adam step size"),
    "uncond": Field(float, Range(0.0, 1.0), 0.1, "probability of the unconditional label in training"),
}


def cache_dir() -> str:
    """``$SUBSTRATE_CACHE`` or ``~/.cache/substrate``."""
    return os.environ.get("SUBSTRATE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "substrate")


def private_folder(folder: str) -> bool:
    """Create ``folder`` (and the cache folder it is in) with mode 0o700 if missing; True when both
    are owned by the user and writable by no one else, else a warning and False (the cache is then
    neither read nor written: a file planted there by someone else would be loaded)."""
    for f in (cache_dir(), folder):
        try:
            os.makedirs(f, mode=0o700, exist_ok=True)
            st = os.stat(f)
        except OSError as e:
            warnings.warn(f"model cache folder {f} cannot be created ({e}); the cache is not used", stacklevel=3)
            return False
        uid = getattr(os, "getuid", lambda: st.st_uid)()  # no owners to compare on Windows
        if st.st_uid != uid or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            who = "owned by another user" if st.st_uid != uid else f"writable by others (mode {st.st_mode & 0o777:o})"
            warnings.warn(f"model cache folder {f} is {who}; the cache is not used (set SUBSTRATE_CACHE to a "
                          "private folder, or chmod 700 it)", stacklevel=3)
            return False
    return True


def training_data(model_config: dict, seed: int):
    """(x, labels, classes) of the ``model`` section's dataset (the toy drawn by ``seed``)."""
    if model_config["dataset"] == "digits":
        pixels, labels = digits_arrays()
        return 2.0 * pixels - 1.0, labels, 10
    x, mode = eight_gaussians(model_config["samples"], np.random.default_rng([seed, 0]))
    return x, mode, 8


def trained_model(model_config: dict, seed: int, progress: bool = False):
    """The noise predictor of the ``model`` section trained with ``seed`` (weights, data and
    minibatches), from the cache when it is there; (model, x, labels, seconds spent training, or
    0.0 from the cache). The cache key is the section, the seed and ``models.dpm.MODEL_VERSION``;
    files are written atomically, so parallel workers training the same model are harmless. The
    cache is read with ``weights_only=True`` (tensors only, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    says) and only from a folder of the user's that no one else can write (:func:`private_folder`);
    an unreadable file is replaced."""
    import torch

    from models import dpm

    x, labels, classes = training_data(model_config, seed)
    key = hashlib.sha256(json.dumps([model_config, seed, dpm.MODEL_VERSION], sort_keys=True).encode()).hexdigest()
    path = os.path.join(cache_dir(), "dpm", key[:24] + ".pt")
    g = torch.Generator().manual_seed(seed)
    model = dpm.NoisePredictor(x.shape[1], classes=classes, hidden=model_config["hidden"],
                               depth=model_config["depth"], embed=model_config["embed"], generator=g)
    private = private_folder(os.path.dirname(path))
    if private and os.path.exists(path):
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model, x, labels, 0.0
        except Exception as e:  # torch raises several types for a truncated, foreign or non-tensor file
            warnings.warn(f"model cache file {path} is unreadable ({type(e).__name__}: {e}); training again",
                          stacklevel=2)
    t0 = time.perf_counter()
    dpm.train(model, dpm.VPSchedule(), x, labels, steps=model_config["train_steps"], batch=model_config["batch"],
              lr=model_config["lr"], uncond=model_config["uncond"], generator=g, progress=progress)
    seconds = time.perf_counter() - t0
    if not private:
        return model, x, labels, seconds
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, x, labels, seconds


def digits_classifier(seed: int = 0):
    """A fixed classifier of the 8x8 digits (pixels in [-1, 1]): 64-64-10 SiLU MLP, float64, 600
    full-batch Adam steps on 1500 digits (~1 s); (model, accuracy on the other 297)."""
    import torch

    pixels, labels = digits_arrays()
    x, y = torch.as_tensor(2.0 * pixels - 1.0), torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64, dtype=torch.float64), torch.nn.SiLU(),
                              torch.nn.Linear(64, 10, dtype=torch.float64))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=g) / np.sqrt(p.shape[-1] if p.dim() > 1 else 64))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(600):
        decay = 1e-4 * sum((p ** 2).sum() for p in net.parameters())
        loss = torch.nn.functional.cross_entropy(net(x[:1500]), y[:1500]) + decay
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        accuracy = float((net(x[1500:]).argmax(1) == y[1500:]).double().mean())
    return net, accuracy


# ------------------------------------------------------------------------------------ dpm_gradients
STEPPERS = ("euler", "midpoint", "rk4", "ms2", "ms3")
ALL_METHODS = [f"{ode}/{grid}/{solver}" for ode in ("original", "reparameterised", "gaussian")
               for grid in ("uniform_t", "logsnr", "karras") for solver in STEPPERS]


def _method_ok(m):
    from models import dpm

    parts = m.split("/")
    return len(parts) == 3 and parts[0] in dpm.ODES and parts[1] in dpm.GRIDS and parts[2] in dpm.SOLVERS


GRADIENTS_SCHEMA = {
    "model": MODEL,
    "methods": Field(ListOf(str, 1, 200, Check(_method_ok, "'ode/grid/solver' with ode in original, "
                                                            "reparameterised, gaussian; grid in uniform_t, "
                                                            "logsnr, karras; solver in euler, midpoint, rk4, "
                                                            "ms2, ms3, dpm1, dpm2")),
                     None, ALL_METHODS, "the methods compared (reparameterised/*/euler and /midpoint are "
                                        "DPM-Solver-1 and -2)"),
    "budgets": Field(ListOf(int, 1, 20, Range(1, 100_000)), None, [8, 16, 32, 64, 128],
                     "network evaluations of the forward pass; each method takes the most steps that fit"),
    "adjoints": Field(ListOf(str, 1, 2, ("discrete", "continuous")), None, ["discrete", "continuous"],
                      "discrete: autograd through the solver's steps; continuous: models.dpm.adjoint"),
    "batch": Field(int, Range(1, 100_000), 256, "samples in the loss"),
    "condition": Field(int, Range(0, 1000), 3, "class whose embedding is c (the number of classes: the "
                                               "unconditional embedding)"),
    "target": Field(int, Range(0, 1000), 0, "loss: mean squared distance of the samples to this class's "
                                            "mean (per dimension)"),
    "reference_steps": Field(int, Range(2, 1_000_000), 2000, "reference: RK4 of the original ODE on this "
                                                             "many log-SNR steps, continuous adjoint"),
}


def _gradient(model, schedule, x_T, c, times, ode, solver, adjoint_kind, target):
    """(x_0, dL/dx_T, dL/dc, dL/dtheta as one vector) by either adjoint."""
    import torch

    from models import dpm

    def loss(x0):
        return ((x0 - target) ** 2).mean()

    if adjoint_kind == "continuous":
        def loss_grad(x0):
            x0 = x0.detach().requires_grad_(True)
            L = loss(x0)
            return float(L.detach()), torch.autograd.grad(L, x0)[0]

        x0, _, gx, gc, gp = dpm.adjoint(model, schedule, x_T, c, times, loss_grad, solver, ode)
        theta = torch.cat([gp[k].reshape(-1) for k, _ in model.named_parameters() if k != "table.weight"])
        return x0.detach(), gx, gc, theta
    xx, cc = x_T.clone().requires_grad_(True), c.detach().clone().requires_grad_(True)
    model.zero_grad()
    x0 = dpm.sample(model, schedule, xx, cc, times, ode, solver)
    loss(x0).backward()
    theta = torch.cat([p.grad.reshape(-1) for k, p in model.named_parameters() if k != "table.weight"])
    model.zero_grad()
    return x0.detach(), xx.grad, cc.grad, theta


def run_dpm_gradients(config: dict, seed: int, save_partial=discard) -> Result:
    """The sample (``batch`` samples conditioned on class ``condition``) and the gradient of L = mean
    squared distance to the ``target`` class's mean with respect to x_T, the embedding c and the
    weights theta, by every method (``ode/grid/solver``) and adjoint at every budget of network
    evaluations of the forward pass (the most steps that fit; NaN where not one does), relative
    errors (Frobenius norms) against the reference; also the reference's own error (against half its
    steps), the evaluations each method used, and the seconds of each gradient (indicative)."""
    import torch

    from models import dpm

    torch.set_num_threads(1)
    model, x, labels, train_seconds = trained_model(config["model"], seed)
    schedule = dpm.VPSchedule()
    g = torch.Generator().manual_seed(seed + 1)
    x_T = torch.randn(config["batch"], x.shape[1], dtype=torch.float64, generator=g)
    for key, top in (("condition", model.classes), ("target", model.classes - 1)):
        if config[key] > top:
            extra = f" (and {top}: unconditional)" if key == "condition" else ""
            raise SubstrateValueError(f"{key}={config[key]}: the {config['model']['dataset']} model has classes "
                                      f"0..{model.classes - 1}{extra}")
    c = model.embedding(config["condition"]).detach()
    target = torch.as_tensor(x[labels == config["target"]].mean(0))

    def reference(steps):
        return _gradient(model, schedule, x_T, c, dpm.grid(schedule, steps), "original", "rk4", "continuous", target)

    ref = reference(config["reference_steps"])
    half = reference(config["reference_steps"] // 2)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    methods, budgets, adjoints = config["methods"], config["budgets"], config["adjoints"]
    shape = (len(methods), len(adjoints), len(budgets))
    errors = {k: np.full(shape, np.nan) for k in ("grad_error_x", "grad_error_c", "grad_error_theta",
                                                   "gradient_seconds")}
    sample_error = np.full((len(methods), len(budgets)), np.nan)
    evaluations = np.zeros((len(methods), len(budgets)), dtype=np.int64)
    scalars = {"train_seconds": train_seconds}
    scalars.update({f"reference_error_{k}": rel(a, b) for k, a, b in zip(("sample", "x", "c", "theta"), half, ref)})

    def result():
        # the dimension is "scheme", not "method": xarray's sel(method=...) is its own keyword
        arrays = {k: (("scheme", "adjoint", "budget"), v) for k, v in errors.items()}
        arrays["sample_error"] = (("scheme", "budget"), sample_error)
        arrays["evaluations"] = (("scheme", "budget"), evaluations)
        return Result(arrays, dict(scalars), {"scheme": list(methods), "adjoint": list(adjoints),
                                              "budget": list(budgets)})

    for i, method in enumerate(methods):
        ode, grid, solver = method.split("/")
        for k, budget in enumerate(budgets):
            steps = (budget - solver.startswith("ms")) // dpm.evaluations(solver, 1)
            if steps < 1:
                continue
            evaluations[i, k] = dpm.evaluations(solver, steps)
            times = dpm.grid(schedule, steps, grid)
            for j, kind in enumerate(adjoints):
                t0 = time.perf_counter()
                out = _gradient(model, schedule, x_T, c, times, ode, solver, kind, target)
                errors["gradient_seconds"][i, j, k] = time.perf_counter() - t0
                for name, a, b in zip(("x", "c", "theta"), out[1:], ref[1:]):
                    errors[f"grad_error_{name}"][i, j, k] = rel(a, b)
                sample_error[i, k] = rel(out[0], ref[0])
        save_partial(result())
        save_partial.progress(i + 1, len(methods), "method")
    return result()


def plot_dpm_gradients(archive_path: str):
    """One row per dataset (median over seeds): the sample error and the gradient errors (x_T, c,
    theta; continuous adjoint) against the forward pass's network evaluations on the log-SNR grid,
    one colour per solver and one line style per form of the ODE; and a map of log10 of the theta
    gradient's error at 32 evaluations (or the nearest budget) for every method x grid x adjoint."""
    ds, axes = F.open_sweep(archive_path)
    rows = list(ds["dataset"].values) if "dataset" in ds.dims else [None]
    fig, grid = plt.subplots(len(rows), 5, figsize=(26, 4.8 * len(rows)), layout="constrained", squeeze=False)
    methods = [str(m) for m in ds["scheme"].values]
    forms = list(dict.fromkeys(m.split("/")[0] for m in methods))
    solvers = list(dict.fromkeys(m.split("/")[2] for m in methods))
    grids = list(dict.fromkeys(m.split("/")[1] for m in methods))
    styles = dict(zip(forms, ("-", "--", ":", "-.")))
    budgets = ds["budget"].values
    at = budgets[np.argmin(np.abs(np.log(budgets / 32.0)))]
    for r, name in enumerate(rows):
        one = ds.sel(dataset=name) if name is not None else ds
        line_grid = "logsnr" if "logsnr" in grids else grids[0]
        for c, (var, key, title) in enumerate((("sample_error", "sample", "sample"),
                                               ("grad_error_x", "x", r"$dL/dx_T$"), ("grad_error_c", "c", r"$dL/dc$"),
                                               ("grad_error_theta", "theta", r"$dL/d\theta$"))):
            ax = grid[r, c]
            da = one[var]
            if "adjoint" in da.dims:
                da = da.sel(adjoint="continuous") if "continuous" in da["adjoint"].values else da.isel(adjoint=0)
            med = F.median(da, ["scheme", "budget"])
            for m in methods:
                form, g, solver = m.split("/")
                if g != line_grid:
                    continue
                ax.loglog(budgets, med.sel(scheme=m).values, styles[form], marker="o", ms=3,
                          color=f"C{solvers.index(solver)}", label=f"{form} {solver}")
            ax.set_title(f"{name or ''}: {title} error" + ("" if var == "sample_error" else " (continuous adjoint)")
                         + f", {line_grid} grid", fontsize=9)
            ax.set_xlabel("network evaluations (forward pass)")
            ax.set_ylabel("relative error vs reference")
            ax.axhline(float(F.median(one[f"reference_error_{key}"], []).values), color="grey",
                       lw=0.8, label="reference vs half its steps")
            ax.set_ylim(top=10.0)  # above: the continuous adjoint's blow-ups at few steps (in the map)
            ax.grid(True, which="both", alpha=0.3)
        ax = grid[r, 4]
        theta = F.median(one["grad_error_theta"].sel(budget=at), ["scheme", "adjoint"])
        labels = [f"{f}/{s}" for f in forms for s in solvers]
        adjoints = [str(v) for v in one["adjoint"].values]
        cols = [(g, a) for g in grids for a in adjoints]
        table = np.full((len(labels), len(cols)), np.nan)
        for i, lab in enumerate(labels):
            f, s = lab.split("/")
            for j, (g, a) in enumerate(cols):
                m = f"{f}/{g}/{s}"
                if m in methods:
                    table[i, j] = np.log10(float(theta.sel(scheme=m, adjoint=a)))
        # errors of 10 and more (the continuous adjoint's blow-ups at few steps) share one colour
        im = ax.imshow(table, cmap="viridis_r", aspect="auto", vmax=1.0)
        for i in range(table.shape[0]):
            for j in range(table.shape[1]):
                if np.isfinite(table[i, j]):
                    ax.text(j, i, f"{table[i, j]:.1f}", ha="center", va="center", fontsize=6,
                            color="w" if min(table[i, j], 1.0) > np.nanmedian(np.minimum(table, 1.0)) else "k")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xticks(range(len(cols)), [f"{g}\n{a}" for g, a in cols], fontsize=7)
        ax.set_ylabel("ODE form / solver")
        ax.set_xlabel("time grid / adjoint")
        ax.set_title(rf"log10 error of $dL/d\theta$ at {at} evaluations ({name or ''})", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label=r"log10 relative error of $dL/d\theta$ (capped at 1)")
    F.figure_legend(fig, columns=6)
    fig.suptitle(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} (median over seeds)", fontsize=10)
    return F.readable_ticks(fig)


TASK = Task(GRADIENTS_SCHEMA, run_dpm_gradients, plot=plot_dpm_gradients,
            description="a diffusion model's sample gradients by every ODE form, grid, solver and adjoint")
