"""Run by hand: a local rule on the substrate (ideal device) against its plain torch twin
(local_rules_torch), same data, initial weights, hyper-parameters, minibatches and negatives; prints
both test accuracies.

    PYTHONPATH=. python tests/reference/compare_local_rules.py fashion_mnist counter_current --epochs 3

``--device NAME`` runs the substrate rule on a device (a preset of substrate.devices, or one of
``DEVICES`` below) instead; the torch twin stays ideal.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import local_rules_torch as ref

from models import data, ep
from models.local.ccl import CounterCurrent, CounterCurrentModel
from models.local.forward_forward import ForwardForward, ForwardForwardModel
from models.train import SGD, Adam, train
from substrate import devices

MISMATCH = (devices.TauMismatch(0.1), devices.ActivationMismatch())
DEVICES = {"programmed": devices.Device((devices.ConductanceMapping(), devices.ProgrammingNoise(),
                                         devices.ReadNoise(0.02, policy="equilibrium"))),
           "read_noise_step": devices.Device((devices.ReadNoise(0.02, policy="step"), devices.RelaxationTime(20.0))),
           "mismatch": devices.Device(MISMATCH),
           "reram_sb_mismatch": devices.preset("reram_sb").with_effects(*MISMATCH)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", choices=["digits", "fashion_mnist"])
    ap.add_argument("rule", choices=["counter_current", "forward_forward"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--hidden", type=int, nargs="+", default=None)
    ap.add_argument("--train", type=int, default=None, help="the first N training samples only")
    ap.add_argument("--test", type=int, default=None, help="the first N test samples only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-twin", action="store_true", help="skip the torch twin")
    a = ap.parse_args()
    torch.set_num_threads(1)
    d = data.load(a.dataset)
    if a.train or a.test:
        d = d.subset(a.train, a.test)
    hidden = a.hidden or ([256, 256] if a.dataset == "fashion_mnist" else [64, 64])
    sizes = [d.n_features, *hidden, 10]
    init = np.random.default_rng(a.seed)
    relaxation = ep.Relaxation(on_failure="record")
    t0 = time.perf_counter()
    if a.rule == "counter_current":
        # the paper's MLP setting (SGD, batch 256, clip 1) at lr 0.3, not its 1: see models/local/ccl.py
        batch, lr = a.batch or 256, a.lr or 0.3
        model = CounterCurrentModel.layered(sizes, init)
        twin = ref.counter_current_from(model)
        if a.device:
            model = model.on_device(DEVICES.get(a.device) or devices.preset(a.device), np.random.default_rng(a.seed + 2))
        hist = train(model, d, rule=CounterCurrent(), optimiser=SGD(lr), epochs=a.epochs, batch_size=batch,
                     relaxation=relaxation, rng=np.random.default_rng(a.seed + 1), probe=0, progress=True)
        t1 = time.perf_counter()
        acc = float("nan") if a.no_twin else ref.train_counter_current(twin, d, epochs=a.epochs, batch_size=batch,
                                                                        lr=lr, clip=1.0, seed=a.seed + 1)
    else:
        batch, lr = a.batch or 64, a.lr or 0.003
        model = ForwardForwardModel.layered(sizes, init)
        twin = ref.forward_forward_from(model)
        if a.device:
            model = model.on_device(DEVICES.get(a.device) or devices.preset(a.device), np.random.default_rng(a.seed + 2))
        hist = train(model, d, rule=ForwardForward(), optimiser=Adam(lr), epochs=a.epochs, batch_size=batch,
                     relaxation=relaxation, rng=np.random.default_rng(a.seed + 1), probe=0, progress=True)
        t1 = time.perf_counter()
        acc = float("nan") if a.no_twin else ref.train_forward_forward(twin, d, epochs=a.epochs, batch_size=batch,
                                                                        lr=lr, seed=a.seed + 1)
    t2 = time.perf_counter()
    print(f"{a.dataset} {a.rule} device={a.device or 'ideal'} sizes={sizes} epochs={a.epochs} batch={batch} lr={lr} train={len(d.x_train)} test={len(d.x_test)}: "
          f"substrate {hist.test_accuracy[-1]:.4f} (per epoch {np.round(hist.test_accuracy, 4).tolist()}, "
          f"nonconverged {max(hist.nonconverged):.3f}, {t1 - t0:.0f} s), torch {acc:.4f} ({t2 - t1:.0f} s)")


if __name__ == "__main__":
    main()
