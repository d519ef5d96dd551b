"""Diffusion-model tasks (issue 8; ``models.dpm``, REFERENCES section 3).

* ``dpm_gradients``: does the reparameterisation help, and what does better? The sample and the
  gradients of a loss on it (with respect to x_T, the class embedding c and the weights) by every
  combination of ODE, grid and solver, through the discrete adjoint (autograd through the steps)
  and the continuous adjoint, at equal network evaluations, against a converged reference.

Every task trains its noise predictor with :func:`trained_model` (the ``model`` section), cached on
disk by its configuration and seed, so that the runs of a sweep that share a model train it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

import numpy as np

from studies.config import Field, Range

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


def training_data(model_config: dict, seed: int):
    """(x, labels, classes) of the ``model`` section's dataset (the toy drawn by ``seed``)."""
    from models.data import digits_arrays, eight_gaussians

    if model_config["dataset"] == "digits":
        pixels, labels = digits_arrays()
        return 2.0 * pixels - 1.0, labels, 10
    x, mode = eight_gaussians(model_config["samples"], np.random.default_rng([seed, 0]))
    return x, mode, 8


def trained_model(model_config: dict, seed: int, progress: bool = False):
    """The noise predictor of the ``model`` section trained with ``seed`` (weights, data and
    minibatches), from the cache when it is there; (model, x, labels, seconds spent training, or
    0.0 from the cache). The cache key is the section, the seed and ``models.dpm.MODEL_VERSION``;
    files are written atomically, so parallel workers training the same model are harmless."""
    import torch

    from models import dpm

    x, labels, classes = training_data(model_config, seed)
    key = hashlib.sha256(json.dumps([model_config, seed, dpm.MODEL_VERSION], sort_keys=True).encode()).hexdigest()
    path = os.path.join(cache_dir(), "dpm", key[:24] + ".pt")
    g = torch.Generator().manual_seed(seed)
    model = dpm.NoisePredictor(x.shape[1], classes=classes, hidden=model_config["hidden"],
                               depth=model_config["depth"], embed=model_config["embed"], generator=g)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model, x, labels, 0.0
    t0 = time.perf_counter()
    dpm.train(model, dpm.VPSchedule(), x, labels, steps=model_config["train_steps"], batch=model_config["batch"],
              lr=model_config["lr"], uncond=model_config["uncond"], generator=g, progress=progress)
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, x, labels, seconds


def digits_classifier(seed: int = 0):
    """A fixed classifier of the 8x8 digits (pixels in [-1, 1]): 64-64-10 SiLU MLP, float64, 600
    full-batch Adam steps on 1500 digits (~1 s); (model, accuracy on the other 297)."""
    import torch

    from models.data import digits_arrays

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
        loss = torch.nn.functional.cross_entropy(net(x[:1500]), y[:1500]) + 1e-4 * sum((p ** 2).sum() for p in net.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        accuracy = float((net(x[1500:]).argmax(1) == y[1500:]).double().mean())
    return net, accuracy
