"""Quickstart study: a small network trained on scikit-learn's 8x8 digits with centred EP, holomorphic
EP and the exact gradient (implicit differentiation), from the same initial weights and minibatches.

Per epoch: training loss, test accuracy, and the cosine between the rule's gradient and the exact one
on a fixed probe batch. Results go to one HDF5 archive (written atomically, with provenance) and a
figure drawn from that archive (learning curves and gradient alignment).
"""

from __future__ import annotations

import copy
import os
import time

import matplotlib.pyplot as plt
import numpy as np

from models import data as D
from models import ep
from models.train import SGD, Classifier, train
from studies import figures as F
from studies.sweep import single_thread
from substrate import archive

DEFAULT_CONFIG = {
    "network": {"sizes": [64, 128, 10], "cost": "cross_entropy", "activation": "logistic", "feedback": "tied"},
    "rules": {"centred": {"name": "centred", "beta": 0.2},
              "holomorphic": {"name": "holomorphic", "points": 4, "beta": 0.3},
              "exact": {"name": "exact"}},
    "epochs": 15,
    "batch_size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "relaxation": {"method": "exp_euler", "tol": 1e-4},
    "probe": 64,
    "n_train": 0,  # 0: the whole split (1438 training, 359 test digits)
}


def run(out_dir: str, seed: int = 0, config: dict | None = None, progress: bool = True) -> dict:
    """Run the quickstart; returns the paths of the archive and the figure."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    cfg.update(config or {})
    data = D.digits(seed=seed)
    if cfg["n_train"]:
        data = data.subset(cfg["n_train"], max(cfg["n_train"] // 4, 1))
    relaxation = ep.Relaxation(**cfg["relaxation"], on_failure="record")
    net_cfg = dict(cfg["network"])
    sizes, cost = net_cfg.pop("sizes"), net_cfg.pop("cost")
    results, timings = {}, {}
    with single_thread():  # small matrices: a second BLAS thread only adds contention
        for label, rule_cfg in cfg["rules"].items():
            results[label], timings[label] = _train_one(rule_cfg, sizes, cost, net_cfg, data, relaxation, cfg,
                                                        seed, progress)
    os.makedirs(out_dir, exist_ok=True)
    h5 = archive.write_run(os.path.join(out_dir, "quickstart.h5"), {"rules": results},
                           archive.provenance(cfg, seed, timings))
    fig = ep_training(h5)
    png = os.path.join(out_dir, "quickstart.png")
    fig.savefig(png, dpi=120)
    return {"archive": h5, "figure": png}


def _train_one(rule_cfg, sizes, cost, net_cfg, data, relaxation, cfg, seed, progress):
    """(history arrays, seconds) of one rule, from the seed's initial weights and minibatches."""
    params = dict(rule_cfg)
    rule = ep.make_estimator(params.pop("name"), **params)
    rng = np.random.default_rng(seed)
    model = Classifier.layered(sizes, rng, cost=cost, **net_cfg)
    if progress:
        print(f"training with {rule!r}")
    start = time.perf_counter()
    history = train(model, data, rule=rule, optimiser=SGD(cfg["lr"], cfg["momentum"]), epochs=cfg["epochs"],
                    batch_size=cfg["batch_size"], relaxation=relaxation, rng=rng, probe=cfg["probe"],
                    progress=progress)
    seconds = time.perf_counter() - start
    return {**history.arrays(), "rule": repr(rule), "seconds_total": seconds}, seconds


def ep_training(path: str):
    """Quickstart figure: test accuracy, training loss, and the misalignment 1 - cos of each rule's
    gradient with the exact one (probe batch), against the epoch, one line per learning rule."""
    a = archive.read(path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True, sharex=True)
    for i, (name, r) in enumerate(archive.members(a["rules"]).items()):
        label = f"{r['attrs'].get('rule', name)} ({float(r['seconds_total']):.0f} s)"
        epoch = r["epoch"]
        axes[0].plot(epoch, 100 * r["test_accuracy"], "o-", ms=3, color=f"C{i}", label=label)
        axes[1].semilogy(epoch[1:], r["train_loss"][1:], "o-", ms=3, color=f"C{i}")
        miss = np.maximum(1 - r["grad_cosine"], 1e-16)
        axes[2].semilogy(epoch, miss, "o-", ms=3, color=f"C{i}")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(bottom=max(0, axes[0].get_ylim()[0]))
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title("learning curves (digits, held-out set)")
    axes[1].set_ylabel("training loss (running, per epoch)")
    axes[1].set_title("training loss")
    axes[2].set_ylabel(r"$1 - \cos(g, g_{\mathrm{exact}})$ on the probe batch")
    axes[2].set_title("gradient alignment with implicit differentiation")
    for ax in axes:
        ax.set_xlabel("epoch")
        F.integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    return F.readable_ticks(fig)
