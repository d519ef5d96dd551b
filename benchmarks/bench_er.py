"""Latency of one PV-RNN error-regression step, against a straightforward torch implementation of the
same step measured in the same run (issue 7's benchmark).

The problem: two layers of 40 and 20 units with 4 and 2 latents (tau 2 and 8), 2 outputs, window 10,
50 iterations per step (each: the window's forward pass from the frozen window-start state with fresh
noise, the free energy, its gradient with respect to the window's A, an Adam step), batch 1, float64,
one BLAS / torch thread. ``substrate`` is ``models.pvrnn.error_regression`` (the compiled ER
step of ``models._pvrnn_kernels``: the exact discrete adjoint written out); ``numpy`` the same with
``compiled=False``; ``torch`` runs the same iterations with autograd and ``torch.optim.Adam``
(state reset each step). Time per ER step: (the minimum over ``--repeats`` of a run with ``--steps``
steps after the window is full, less the minimum of the fill alone) / steps; ratio to substrate.

Run:  .venv/bin/python benchmarks/bench_er.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

import results
from models import pvrnn


def torch_er(net, x, window, iterations, lr, seed):
    """The ER loop written plainly in torch (the baseline)."""
    import torch

    P = {k: torch.tensor(v) for k, v in net.params.items()}
    L = len(net.layers)
    gen = torch.Generator().manual_seed(seed)
    h = [torch.zeros(1, lay.units, dtype=torch.float64) for lay in net.layers]
    d = [torch.zeros(1, lay.units, dtype=torch.float64) for lay in net.layers]
    first, h_after, d_after = True, None, None  # the state after the first step of the last pass
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
        for _ in range(args.repeats):  # round robin; a run of the window's fill alone and one with the timed steps
            for name in times:
                for length in (args.window, args.window + args.steps):
                    t0 = time.perf_counter()
                    if name != "torch":
                        pvrnn.error_regression(net, x[:length], er, np.random.default_rng(1),
                                               compiled=name == "substrate")
                    else:
                        torch_er(net, x[:length], args.window, args.iterations, 0.1, 1)
                    times[name].append((length, time.perf_counter() - t0))
    print(f"PV-RNN error regression: layers 40/20 units, 4/2 latents, window {args.window}, "
          f"{args.iterations} iterations, 1 thread; per ER step = (min time with the {args.steps} steps - min time "
          f"of the fill alone) / {args.steps}, over {args.repeats} repeats")
    print(f"first call (compilation or cache load): {first_call:.2f} s")
    per_step = {}
    for name, ts in times.items():
        fill = min(t for n, t in ts if n == args.window)
        full = min(t for n, t in ts if n > args.window)
        per_step[name] = (full - fill) / args.steps
    rows = [(name, 1e3 * t, t / per_step["substrate"]) for name, t in per_step.items()]
    for name, ms, ratio in rows:
        print(f"{name:<10} {ms:8.2f} ms   x{ratio:.2f}")
    results.record(f"PV-RNN error regression, ms per ER step (window {args.window}, {args.iterations} iterations, "
                   f"{args.steps} steps, min of {args.repeats}); ratio to substrate",
                   ["implementation", "ms per ER step", "ratio to substrate"], rows, key="er",
                   baseline="substrate", first_call_s=first_call)


if __name__ == "__main__":
    main()
