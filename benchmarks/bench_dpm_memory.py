"""Peak memory of a diffusion model's sample gradient against the number of ODE steps (issue 8's
check): backpropagation through the solver's steps (the discrete adjoint by torch autograd, which
keeps every step's activations) against the continuous adjoint of ``models.dpm.adjoint`` (the state
re-integrated backward: nothing kept per step). Each measurement runs in a fresh process and reports
the growth of its peak resident set (``ru_maxrss``) during the gradient, in MB; also the seconds.

The problem: the 2-D noise predictor (2 x 64 SiLU, class embedding), a batch of ``--batch`` samples,
RK4 on the log-SNR grid in the form of the flow ``--ode`` (AdjointDPM's reparameterised one by
default), loss = mean squared distance of the samples to a point.

Run:  .venv/bin/python benchmarks/bench_dpm_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import results


def measure(method: str, steps: int, batch: int, ode: str) -> dict:
    import resource
    import time

    import torch

    from models import dpm

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    S = dpm.VPSchedule()
    model = dpm.NoisePredictor(2, classes=8, hidden=64, generator=g)
    x = torch.randn(batch, 2, dtype=torch.float64, generator=g)
    c = model.embedding(3).detach()
    times = dpm.grid(S, steps)
    target = torch.tensor([1.0, -1.0], dtype=torch.float64)

    def loss_grad(x0):
        x0 = x0.detach().requires_grad_(True)
        L = ((x0 - target) ** 2).sum(-1).mean()
        return float(L.detach()), torch.autograd.grad(L, x0)[0]

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method == "backprop":
        xx = x.clone().requires_grad_(True)
        out = dpm.sample(model, S, xx, c, times, ode, "rk4")
        ((out - target) ** 2).sum(-1).mean().backward()
    else:
        dpm.adjoint(model, S, x, c, times, loss_grad, "rk4", ode)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"MB": (after - before) / 1024, "seconds": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="25,50,100,200")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--ode", default="reparameterised", help="form of the flow: original, reparameterised, gaussian")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])))
        return
    print(f"peak-RSS growth during one gradient (MB) and seconds; {args.ode} form, batch {args.batch}, RK4, "
          "log-SNR grid, 1 thread")
    print(f"{'steps':>6} {'backprop MB':>12} {'adjoint MB':>11} {'backprop s':>11} {'adjoint s':>10}")
    rows = []
    for steps in map(int, args.steps.split(",")):
        row = {}
        for method in ("backprop", "adjoint"):
            out = subprocess.run([sys.executable, __file__, "--child", method, str(steps), str(args.batch), args.ode],
                                 capture_output=True, text=True, check=True)
            row[method] = json.loads(out.stdout.strip().splitlines()[-1])
        b, a = row["backprop"], row["adjoint"]
        print(f"{steps:>6} {b['MB']:>12.1f} {a['MB']:>11.1f} {b['seconds']:>11.2f} {a['seconds']:>10.2f}")
        rows.append((steps, b["MB"], a["MB"], b["seconds"], a["seconds"], a["seconds"] / b["seconds"]))
    results.record(f"DPM sample gradient: peak-RSS growth (MB) and seconds, {args.ode} form, batch {args.batch}, "
                   "RK4, 1 thread; ratio of the adjoint's seconds to backprop's",
                   ["steps", "backprop MB", "adjoint MB", "backprop s", "adjoint s", "adjoint s / backprop s"],
                   rows, key="dpm_memory", baseline="backprop through the solver")


if __name__ == "__main__":
    main()
