"""Fashion-MNIST (or ``--data digits``): a substrate rule (predictive coding, NoProp-DT or NoProp-CT)
against its plain torch implementation (tests/reference/local_rules.py), same data, initial weights,
hyper-parameters and draws. Run by hand (minutes to hours), from the repository root:

    python tests/reference/fashion_noprop_pc.py RULE [--sizes 784 256 256 10] [--n-train N] [--n-test N]
        [--epochs E] [--lr LR] [--blocks T] [--steps S] [--data digits]

(tests/test_local_pc_noprop.py's digits test is ``--data digits --sizes 64 32 10 --n-train 600
--n-test 300 --epochs 4 --lr 0.005``, with ``--blocks 5`` or ``--steps 8``.)

prints one line per epoch: the substrate and the torch test accuracy."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import data as D
from models import ep
from models.local import noprop, pc  # noqa: F401  (registers the rules)
from models.train import Adam, make_rule, train
from reference.local_rules import noprop_from, pc_from, train_reference


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rule", choices=["predictive_coding", "noprop_dt", "noprop_ct"])
    p.add_argument("--sizes", type=int, nargs="+", default=[784, 256, 256, 10])
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=["fashion_mnist", "digits"], default="fashion_mnist")
    a = p.parse_args()
    torch.set_num_threads(1)
    data = D.load(a.data).subset(a.n_train, a.n_test)
    rng = np.random.default_rng(a.seed)
    rule = make_rule(a.rule)
    options = {"blocks": a.blocks} if a.rule == "noprop_dt" else {"steps": a.steps} if a.rule == "noprop_ct" else {}
    model = rule.model(a.sizes, rng, **options)
    ref = pc_from(model) if a.rule == "predictive_coding" else noprop_from(model, rule)
    twin = np.random.default_rng()
    twin.bit_generator.state = rng.bit_generator.state
    rel = ep.Relaxation(tol=1e-8, max_steps=5000, on_failure="record")
    t0 = time.process_time()
    hist = train(model, data, rule=rule, optimiser=Adam(a.lr), epochs=a.epochs, batch_size=a.batch_size, rng=rng,
                 progress=False, probe=0, relaxation=rel)
    t1 = time.process_time()
    acc = train_reference(ref, data, lr=a.lr, epochs=a.epochs, batch_size=a.batch_size, rng=twin)
    t2 = time.process_time()
    print(f"{a.rule} sizes={a.sizes} n_train={len(data.x_train)} n_test={len(data.x_test)} lr={a.lr} "
          f"options={options}; CPU s: substrate {t1 - t0:.0f}, torch {t2 - t1:.0f}")
    for e, (s, r) in enumerate(zip(hist.arrays()["test_accuracy"], acc)):
        print(f"epoch {e}: substrate {100 * s:.2f}%  torch {100 * r:.2f}%  difference {100 * (s - r):+.2f} points")


if __name__ == "__main__":
    main()
