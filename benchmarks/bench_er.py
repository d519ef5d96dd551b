"""Latency of one PV-RNN error-regression step, against a straightforward torch implementation of the
same step measured in the same run (issue 7's benchmark).

The problem: two layers of 40 and 20 units with 4 and 2 latents (tau 2 and 8), 2 outputs, window 10,
50 iterations per step (each: the window's forward pass from the frozen window-start state with fresh
noise, the free energy, its gradient with respect to the window's A, an Adam step), batch 1, float64,
one BLAS / torch thread. ``substrate`` is ``models.pvrnn.error_regression`` (the compiled ER
step of ``models._pvrnn_kernels``: the exact discrete adjoint written out); ``numpy`` the same with
``compiled=False``; ``torch`` runs the same iterations with autograd and ``torch.optim.Adam``
(state reset each step). Time per ER step: minimum and median over ``--repeats`` runs of ``--steps``
steps (after the window is full), ratio = torch / substrate.

Run:  .venv/bin/python benchmarks/bench_er.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from models import pvrnn


def torch_er(net, x, window, iterations, lr, seed):
    """The ER loop written plainly in torch (the baseline)."""
    import torch

    P = {k: torch.tensor(v) for k, v in net.params.items()}
    L = len(net.layers)
    gen = torch.Generator().manual_seed(seed)
    h = [torch.zeros(1, lay.units, dtype=torch.float64) for lay in net.layers]
    d = [torch.zeros(1, lay.units, dtype=torch.float64) for lay in net.layers]
    first = True
    A = {f"l{i}.{k}": torch.zeros(1, 0, lay.latents, dtype=torch.float64) for i, lay in enumerate(net.layers)
         for k in ("mu", "sig")}
    for t in range(len(x)):
        if A["l0.mu"].shape[1] == window:
            h, d, first = h_after, d_after, False
            A = {k: v[:, 1:] for k, v in A.items()}
        A = {k: torch.cat([v, v[:, -1:] if v.shape[1] else torch.zeros(1, 1, v.shape[2], dtype=torch.float64)], 1)
             .detach().requires_grad_(True) for k, v in A.items()}
        n = A["l0.mu"].shape[1]
        xw = torch.tensor(x[t - n + 1:t + 1])[None]
        opt = torch.optim.Adam(list(A.values()), lr=lr)
        for _ in range(iterations):
            opt.zero_grad()
            hh, dd = [a.clone() for a in h], [a.clone() for a in d]
            F = torch.zeros((), dtype=torch.float64)
            for s in range(n):
                new = [None] * L
                for i in range(L - 1, -1, -1):
                    lay = net.layers[i]
                    if s == 0 and first:
                        mu_p = torch.zeros(1, lay.latents, dtype=torch.float64)
                        logs_p = torch.zeros_like(mu_p)
                    else:
                        mu_p = torch.tanh(dd[i] @ P[f"l{i}.W_mu"].T + P[f"l{i}.b_mu"])
                        logs_p = dd[i] @ P[f"l{i}.W_sig"].T + P[f"l{i}.b_sig"]
                    mu_q, logs_q = torch.tanh(A[f"l{i}.mu"][:, s]), A[f"l{i}.sig"][:, s]
                    eps = torch.randn(1, lay.latents, dtype=torch.float64, generator=gen)
                    z = mu_q + torch.exp(logs_q) * eps
                    kl = logs_p - logs_q + ((mu_p - mu_q) ** 2 + torch.exp(2 * logs_q)) / (2 * torch.exp(2 * logs_p)) - 0.5
                    F = F + (lay.w_first if s == 0 and first else lay.w) * kl.sum() / lay.latents
                    pre = dd[i] @ P[f"l{i}.W_dd"].T + z @ P[f"l{i}.W_zd"].T + P[f"l{i}.b"]
                    if i + 1 < L:
                        pre = pre + new[i + 1] @ P[f"l{i}.W_td"].T
                    hh[i] = (1 - 1 / lay.tau) * hh[i] + pre / lay.tau
                    new[i] = torch.tanh(hh[i])
                dd = new
                if s == 0:
                    h_after, d_after = [a.detach() for a in hh], [a.detach() for a in dd]
                y = torch.tanh(dd[0] @ P["out.W"].T + P["out.b"])
                F = F + 0.5 * ((xw[:, s] - y) ** 2).sum() / x.shape[1]
            F.backward()
            opt.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="ER steps timed after the window is full")
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    net = pvrnn.PVRNN([pvrnn.PVLayer(40, 4, tau=2.0, w=1e-3), pvrnn.PVLayer(20, 2, tau=8.0, w=1e-3)], outputs=2, rng=rng)
    t = np.arange(args.window + args.steps)
    x = 0.8 * np.stack([np.sin(2 * np.pi * t / 12), np.cos(2 * np.pi * t / 20)], -1)
    er = pvrnn.ErrorRegression(window=args.window, iterations=args.iterations, lr=0.1, sample=False)
    times = {"substrate": [], "numpy": [], "torch": []}
    with threadpool_limits(1):
        t0 = time.perf_counter()
        pvrnn.error_regression(net, x[:2], er, np.random.default_rng(1))  # compiles, or loads the cache
        first_call = time.perf_counter() - t0
        for _ in range(args.repeats):  # round robin; each run = window fill + timed steps
            for name in times:
                fill = x[:args.window]
                t0 = time.perf_counter()
                if name != "torch":
                    pvrnn.error_regression(net, fill, er, np.random.default_rng(1), compiled=name == "substrate")
                else:
                    torch_er(net, fill, args.window, args.iterations, 0.1, 1)
                t_fill = time.perf_counter() - t0
                t0 = time.perf_counter()
                if name != "torch":
                    pvrnn.error_regression(net, x, er, np.random.default_rng(1), compiled=name == "substrate")
                else:
                    torch_er(net, x, args.window, args.iterations, 0.1, 1)
                times[name].append((time.perf_counter() - t0 - t_fill) / args.steps)
    print(f"PV-RNN error regression: layers 40/20 units, 4/2 latents, window {args.window}, "
          f"{args.iterations} iterations, 1 thread; per ER step, min (median) of {args.repeats}")
    print(f"first call (compilation or cache load): {first_call:.2f} s")
    base = min(times["substrate"])
    for name, ts in times.items():
        print(f"{name:<10} {1e3 * min(ts):8.2f} ms ({1e3 * float(np.median(ts)):8.2f})   x{min(ts) / base:.2f}")


if __name__ == "__main__":
    main()
