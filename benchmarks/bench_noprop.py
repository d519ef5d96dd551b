"""NoProp's substrate path (models/local/noprop.py) against its plain torch twin (tests/reference/local_rules.py).

One training step of ``noprop_dt`` and ``noprop_ct`` (the rule's step: the prediction by inference, then
the blocks' denoising gradient and the readout's) on the first ``--batch`` Fashion-MNIST training
samples, ideal device, relaxation tol 1e-8 (the parity runs'), against the twin's same step (inference,
then autograd of the paper's loss) from the same weights and draws. The two are timed round robin, one
call of each per round, so that both see the same load; the ratio is substrate / twin of the minimum
CPU time over ``--repeats`` rounds. BLAS and torch pinned to one thread.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_noprop.py
        [--sizes 784 64 10] [--blocks 10] [--steps 20] [--batch 32] [--repeats 5]

The code measured is the ``models`` package on the path (PYTHONPATH): run it against another checkout
to compare versions in one session.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import models

sys.path.insert(0, str(Path(models.__file__).resolve().parent.parent / "tests"))
from reference.local_rules import (  # the twin of the checkout measured
    _tensor,
    noprop_from,
)

from models import data as D
from models import ep
from models.train import make_rule


def timed(f):
    """The CPU time of one call of f."""
    t0 = time.process_time()
    f()
    return time.process_time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[784, 64, 10])
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rules", nargs="+", default=["noprop_dt", "noprop_ct"])
    a = p.parse_args()
    torch.set_num_threads(1)
    d = D.load("fashion_mnist").subset(a.batch, 1)
    x, y = d.x_train, np.eye(10)[d.y_train]
    rel = ep.Relaxation(tol=1e-8, max_steps=5000, on_failure="record")
    print(f"models from {Path(models.__file__).resolve().parent.parent}; sizes {a.sizes}, batch {a.batch}, "
          f"min CPU time of {a.repeats} rounds")
    for name in a.rules:
        rule = make_rule(name)
        options = {"blocks": a.blocks} if name == "noprop_dt" else {"steps": a.steps}
        model = rule.model(a.sizes, np.random.default_rng(0), **options)
        twin = noprop_from(model, rule)
        xt, yt = _tensor(x), _tensor(y)

        def substrate(rule=rule, model=model):
            rule.step(model, x, y, rel, np.random.default_rng(1))

        def torch_twin(twin=twin, xt=xt, yt=yt):
            rng = np.random.default_rng(1)
            twin.infer(xt, rng)
            twin.loss(xt, yt, rng).backward()

        substrate(), torch_twin()  # warm-up (compilation, caches)
        times = np.array([[timed(substrate), timed(torch_twin)] for _ in range(a.repeats)])
        best = times.min(axis=0)
        print(f"{name} {options}: substrate {best[0]:.3f} s, twin {best[1]:.3f} s, "
              f"substrate / twin {best[0] / best[1]:.1f}")


if __name__ == "__main__":
    main()
