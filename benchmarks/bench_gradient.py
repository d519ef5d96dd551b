"""Cost of a gradient through the dynamics: substrate's adjoints against the GEMM bound, torch autograd and
torchdiffeq.

The problem is the engine benchmark's (``bench_step.py``): a 784-500-10 layered network, logistic
activations, independent feedback (asymmetry angle 90 degrees), float64, batch 64, tau = 1, dt = 0.1,
100 Euler steps over t in [0, 10]; the loss is L = 0.5 sum((u_y(T) - target)^2) on the output layer's
final state (one-hot targets). Every method computes L and its gradient with respect to all the
parameters (weights W1 = h1->y, B = y->h1, V = x->h1, biases, tau, inputs x, initial state u0) unless
its row says otherwise.

What is measured, in one run, with BLAS and torch pinned to ``--threads`` threads (default 1):

* ``bound``: the least work of one Euler step of forward plus gradient: the six matrix products, numpy
  ``np.dot`` with preallocated ``out=`` arrays (the forward's W1 r_h and B r_y, the backward's W1^T w_y
  and B^T w_h and the weight-gradient outer products w_y r_h^T and w_h r_y^T), plus one activation pass
  over the state (the engine's ``_kernels.activate``: the forward's; the backward can take rho' from
  those activities). ``ratio`` is a row's time per call over 100 x this bound (min/min,
  median/median). The input products, V x (forward) and dL/dV, dL/dx (backward), are done once per
  call, not per step; they are timed too and ``+in`` is the ratio to 100 x bound + these.
* The tanh problem: 784 dynamic tanh units (driven by the image through a fixed identity input
  weight), 500 and 10 tanh units: connections 784->500, 500->10 and the feedback 10->500 (asymmetry
  90 degrees), the same Euler steps and loss; its bound is the 9 products of its three connections plus
  one activation pass; substrate's discrete adjoint against torch autograd through the same loop, and
  the share of tanh (one activation pass per step) in substrate's time.
* Rows, time per call of forward + gradient of 100 steps: substrate's discrete adjoint (Euler, every
  state stored and 10 checkpoints), its continuous adjoint (exp_euler forward; exp_euler and etd2rk
  backward: the first-order backward is ~5e-2 off the discrete gradient at dt = 0.1), substrate's
  forward alone (for reference), torch autograd backprop through a plain Euler loop (the same math,
  float64), torchdiffeq ``odeint`` (backprop) and ``odeint_adjoint`` (Euler, RK4) on a lean torch field
  (the drive V x + b computed once per call, as the engine does), ``odeint_adjoint`` through substrate's
  own torch mirror (``TorchDiffEq``, which recomputes V x at every evaluation), and substrate's discrete
  RK4. torchdiffeq's ``rk4`` is the 3/8 rule, substrate's (and ``TorchDiffEq``'s) the classical one:
  both take 4 evaluations per step. The gradients are checked against each other.
* Peak memory, each variant in its own subprocess, for T = 100, 1000, 10000 steps of dt = 0.1
  (``--memory-steps``): the process's peak RSS and the measured call's own peak (above the memory in
  use after imports and a 10-step warm-up), each with its ratio to the variant's value at the smallest T. The peak is VmHWM of
  /proc/self/status: ``ru_maxrss`` of a process started by ``subprocess`` (vfork + exec) starts at the
  parent's peak. substrate's workers never import torch.
* The implicit gradient at the equilibrium (``method="implicit"``, Krylov and, when affordable, direct)
  against one forward relaxation ``substrate.relax(net, x, method="exp_euler", tol=1e-8)``.

Before starting, the script waits (up to ``--max-wait`` seconds) for the 1-minute load average to drop
below ``--max-load``; the machine may be shared. Every time is the minimum and the median of
``--repeats`` timings; on a shared machine trust the minimum.

Run:  .venv/bin/python benchmarks/bench_gradient.py   (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# A substrate memory worker must not load torch (bench_step imports it when it can): blocking the
# import keeps torch's few hundred MB out of the peaks it reports.
if "--memory-worker" in sys.argv and not any(a.startswith("torch") for a in sys.argv):
    sys.modules["torch"] = sys.modules["torchdiffeq"] = None

from bench_step import (DT, SIZES, Problem, describe_machine, describe_threads,  # noqa: E402
                        threadpool_limits, timeit, torch, torchdiffeq)

import results  # noqa: E402  (benchmarks/results.py, beside this script)

import substrate  # noqa: E402  (bench_step put the repository first on sys.path)

STEPS = 100                     # 100 Euler steps of dt = 0.1: t in [0, 10]
MEMORY_STEPS = (100, 1000, 10000)
MEMORY_LIMIT = 6e9              # a torch variant whose estimated peak exceeds this is not run
WORKER_TIMEOUT = 300            # seconds per memory subprocess
N_H = SIZES[1]


# ============================================================================================ problem
def final_state_loss(p, u):
    """L = 0.5 sum((u_y - target)^2) on the output rows of the final states u (batch, n), and dL/du."""
    d = u[:, p.out] - p.target
    g = np.zeros_like(u)
    g[:, p.out] = d
    return 0.5 * float(np.sum(d * d)), g


def make_problem(batch):
    """bench_step's float64 problem, with one-hot targets and the loss on the output layer."""
    p = Problem("float64", batch)
    net = p.net
    p.out = net.slices["y"]
    p.V = np.ascontiguousarray(net.effective_weight(net.connection("x->h1")))   # (500, 784)
    p.b_h, p.b_y = (np.asarray(layer.bias, float) for layer in net.layers)
    labels = np.random.default_rng(2).integers(0, SIZES[2], batch)
    p.target = np.eye(SIZES[2])[labels]                                           # (batch, 10)

    p.loss = functools.partial(final_state_loss, p)
    return p


def make_tanh_problem(batch):
    """The tanh problem: layers v (784, the image's dynamic copy), h1 (500), y (10), all tanh, tau 1."""
    rng = np.random.default_rng(0)
    n_in, n_h, n_y = SIZES

    def uniform(post, pre):
        return rng.uniform(-1, 1, (post, pre)) / np.sqrt(pre)
    a = np.deg2rad(90.0)
    w1 = uniform(n_y, n_h)
    layers = [substrate.Layer("v", n_in, activation="tanh", bias=np.zeros(n_in)),
              substrate.Layer("h1", n_h, activation="tanh", bias=uniform(n_h, 1)[:, 0]),
              substrate.Layer("y", n_y, activation="tanh", bias=uniform(n_y, 1)[:, 0])]
    conns = [substrate.Connection("x", "v", np.eye(n_in)), substrate.Connection("v", "h1", uniform(n_h, n_in)),
             substrate.Connection("h1", "y", w1),
             substrate.Connection("y", "h1", np.sin(a) * uniform(n_h, n_y) + np.cos(a) * w1.T)]
    p = argparse.Namespace()
    p.net = net = substrate.Network(layers, conns, inputs=[substrate.Input("x", n_in)])
    p.x = np.random.default_rng(1).random((batch, n_in))
    p.out = net.slices["y"]
    p.mats = {k: np.ascontiguousarray(net.effective_weight(net.connection(k)))
              for k in ("x->v", "v->h1", "h1->y", "y->h1")}
    p.biases = {x.name: np.asarray(x.bias, float) for x in net.layers}
    labels = np.random.default_rng(2).integers(0, n_y, batch)
    p.target = np.eye(n_y)[labels]

    p.loss = functools.partial(final_state_loss, p)
    return p


def substrate_gradient(p, method, steps=STEPS, integrator="euler"):
    g = substrate.gradient(p.net, p.x, p.loss, method=method, t_span=(0.0, steps * DT),
                           integrator=integrator, dt=DT)
    g.inputs["x"]  # dL/dx is computed when first read: read here, as torch computes it and the bound counts it
    return g


def flat_weights(weights):
    return {k: np.asarray(weights[k]) for k in ("h1->y", "y->h1", "x->h1")}


def rel_diff(a, b):
    """max over the arrays of max|a - b| / max|b|."""
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in b)


# ============================================================================================ GEMM bound
def state_products(net, batch):
    """The 3 products per connection between state layers of one step of forward + gradient (W r_pre,
    W^T w_post, w_post r_pre^T), numpy with preallocated outputs."""
    rng = np.random.default_rng(3)
    r = rng.random((net.n, batch))
    w = rng.standard_normal(r.shape)
    f, v = np.empty_like(r), np.empty_like(r)
    calls = []
    for c in net.connections:
        if c.pre not in net.slices:  # an input: its products are once per call
            continue
        W = np.ascontiguousarray(net.effective_weight(c))
        pre, post = net.slices[c.pre], net.slices[c.post]
        calls.append((W, r[pre], f[post]))
        calls.append((W.T, w[post], v[pre]))
        calls.append((w[post], r[pre].T, np.empty_like(W)))

    def step():
        for a, b, out in calls:
            np.dot(a, b, out=out)
    return step, len(calls)


def activation_pass(net, batch):
    """One activation pass over the state, as the engine's kernels compute it."""
    from substrate import _kernels as K
    packed = substrate.VectorField(net, np.zeros((batch, net.inputs[0].size))).packed
    u = np.random.default_rng(4).standard_normal((net.n, batch))
    r = np.empty_like(u)

    def call():
        K.activate(u, packed.layer_off, packed.layer_act, r)
    call()
    return call


def gemm_bound_step(p):
    """The six products of one step of forward + gradient, nothing else."""
    rng = np.random.default_rng(3)
    r = rng.random((p.net.n, p.x.shape[0]))
    w = rng.standard_normal(r.shape)
    f, v = np.empty_like(r), np.empty_like(r)
    r_h, r_y, w_h, w_y = r[:N_H], r[N_H:], w[:N_H], w[N_H:]
    gW1, gB = np.empty_like(p.W1), np.empty_like(p.B)
    W1, B, W1T, BT = p.W1, p.B, p.W1.T, p.B.T

    def step():
        np.dot(W1, r_h, out=f[N_H:])        # forward  W1 r_h       (10x500 @ 500x64)
        np.dot(B, r_y, out=f[:N_H])         # forward  B r_y        (500x10 @ 10x64)
        np.dot(W1T, w_y, out=v[:N_H])       # backward W1^T w_y     (500x10 @ 10x64)
        np.dot(BT, w_h, out=v[N_H:])        # backward B^T w_h      (10x500 @ 500x64)
        np.dot(w_y, r_h.T, out=gW1)         # dL/dW1 += w_y r_h^T   (10x64 @ 64x500)
        np.dot(w_h, r_y.T, out=gB)          # dL/dB  += w_h r_y^T   (500x64 @ 64x10)
    return step


def gemm_forward_step(p):
    r = np.random.default_rng(3).random((p.net.n, p.x.shape[0]))
    f = np.empty_like(r)
    W1, B = p.W1, p.B

    def step():
        np.dot(W1, r[:N_H], out=f[N_H:])
        np.dot(B, r[N_H:], out=f[:N_H])
    return step


def gemm_inputs(p):
    """The products with the inputs, once per call: V x (forward), dL/dV and dL/dx (backward)."""
    xT = np.ascontiguousarray(p.x.T)
    g = np.random.default_rng(4).standard_normal((N_H, p.x.shape[0]))
    d, gV, gx = np.empty_like(g), np.empty_like(p.V), np.empty((SIZES[0], p.x.shape[0]))
    V, VT, x = p.V, p.V.T, p.x

    def call():
        np.dot(V, xT, out=d)     # 500x784 @ 784x64
        np.dot(g, x, out=gV)     # 500x64 @ 64x784
        np.dot(VT, g, out=gx)    # 784x500 @ 500x64
    return call


# ============================================================================================ torch
def torch_leaves(p):
    """Leaf tensors for every parameter substrate differentiates: W1, B, V, biases, tau, x, u0."""
    def leaf(a):
        return torch.tensor(np.asarray(a, dtype=np.float64)).requires_grad_()
    net = p.net
    taus = [float(layer.tau) for layer in net.layers]
    return dict(W1=leaf(p.W1), B=leaf(p.B), V=leaf(p.V), b_h=leaf(p.b_h), b_y=leaf(p.b_y),
                tau_h=leaf(taus[0]), tau_y=leaf(taus[1]), x=leaf(p.x),
                u0=leaf(np.zeros((p.x.shape[0], net.n))))


def leaf_gradients(leaves, grads):
    g = {k: v.detach().numpy() for k, v in zip(leaves, grads)}
    return {"weights": {"h1->y": g["W1"], "y->h1": g["B"], "x->h1": g["V"]},
            "biases": {"h1": g["b_h"], "y": g["b_y"]}, "tau": {"h1": g["tau_h"], "y": g["tau_y"]},
            "inputs": {"x": g["x"]}, "u0": g["u0"]}


def torch_backprop(p, L, steps=STEPS):
    """Forward + backprop (torch autograd) through a plain Euler loop, state (batch, n) kept as its two
    layers; the drive V x + b once per call. Returns (loss, gradients of every leaf)."""
    target = torch.from_numpy(p.target)
    a = DT
    drive_h = torch.addmm(L["b_h"], L["x"], L["V"].T)
    u_h, u_y = L["u0"][:, :N_H], L["u0"][:, N_H:]
    for _ in range(steps):
        r_h = torch.sigmoid(4.0 * u_h - 2.0)
        r_y = torch.sigmoid(4.0 * u_y - 2.0)
        n_h = torch.addmm(drive_h, r_y, L["B"].T)
        n_y = torch.addmm(L["b_y"], r_h, L["W1"].T)
        u_h = u_h + a * (n_h - u_h) / L["tau_h"]
        u_y = u_y + a * (n_y - u_y) / L["tau_y"]
    loss = 0.5 * ((u_y - target) ** 2).sum()
    grads = torch.autograd.grad(loss, list(L.values()))
    return float(loss.detach()), leaf_gradients(L, grads)


def torch_tanh_leaves(p):
    def leaf(a):
        return torch.tensor(np.asarray(a, dtype=np.float64)).requires_grad_()
    L = {k: leaf(m) for k, m in p.mats.items()}
    L.update({f"b_{k}": leaf(b) for k, b in p.biases.items()})
    L.update({f"tau_{k}": leaf(1.0) for k in p.biases})
    L["x"] = leaf(p.x)
    L["u0"] = leaf(np.zeros((p.x.shape[0], p.net.n)))
    return L


def torch_tanh_backprop(p, L, steps=STEPS):
    """The tanh problem's forward + backprop through the same Euler loop; dL/dW of the four weights."""
    target = torch.from_numpy(p.target)
    sl = p.net.slices
    u_v, u_h, u_y = (L["u0"][:, sl[k]] for k in ("v", "h1", "y"))
    drive_v = torch.addmm(L["b_v"], L["x"], L["x->v"].T)
    for _ in range(steps):
        r_v, r_h, r_y = torch.tanh(u_v), torch.tanh(u_h), torch.tanh(u_y)
        n_h = torch.addmm(L["b_h1"], r_v, L["v->h1"].T) + r_y @ L["y->h1"].T
        n_y = torch.addmm(L["b_y"], r_h, L["h1->y"].T)
        u_v = u_v + DT * (drive_v - u_v) / L["tau_v"]
        u_h = u_h + DT * (n_h - u_h) / L["tau_h1"]
        u_y = u_y + DT * (n_y - u_y) / L["tau_y"]
    loss = 0.5 * ((u_y - target) ** 2).sum()
    grads = torch.autograd.grad(loss, list(L.values()))
    g = dict(zip(L, grads))
    return float(loss.detach()), {k: g[k].numpy() for k in p.mats}


def torch_backprop_lean(p, L, steps=STEPS):
    """The least torch can do: dL/dW1 and dL/dB only, the drive a constant, tau a number, u = lerp."""
    target = torch.from_numpy(p.target)
    W1, B = L["W1"], L["B"]
    with torch.no_grad():
        drive_h = torch.addmm(L["b_h"], L["x"], L["V"].T)
        b_y = L["b_y"].detach()
    u_h = torch.zeros_like(drive_h)
    u_y = torch.zeros(drive_h.shape[0], SIZES[2], dtype=drive_h.dtype)
    for _ in range(steps):
        r_h = torch.sigmoid(4.0 * u_h - 2.0)
        r_y = torch.sigmoid(4.0 * u_y - 2.0)
        u_h = torch.lerp(u_h, torch.addmm(drive_h, r_y, B.T), DT)
        u_y = torch.lerp(u_y, torch.addmm(b_y, r_h, W1.T), DT)
    loss = 0.5 * ((u_y - target) ** 2).sum()
    gW1, gB = torch.autograd.grad(loss, [W1, B])
    return float(loss.detach()), {"h1->y": gW1.numpy(), "y->h1": gB.numpy()}


class LeanField(torch.nn.Module if torch is not None else object):
    """f(t, u) = F(u) / tau for torchdiffeq, u (batch, n); the drive V x + b_h is computed outside, once
    per call, and differentiated as a parameter (its gradient flows on to V, b_h and x)."""

    def __init__(self, W1, B, drive_h, b_y, tau_h, tau_y):
        super().__init__()
        self.W1, self.B, self.drive_h, self.b_y, self.tau_h, self.tau_y = W1, B, drive_h, b_y, tau_h, tau_y
        self.nfev = 0

    def forward(self, t, u):
        self.nfev += 1
        r = torch.sigmoid(4.0 * u - 2.0)
        f_h = torch.addmm(self.drive_h, r[:, N_H:], self.B.T) - u[:, :N_H]
        f_y = torch.addmm(self.b_y, r[:, :N_H], self.W1.T) - u[:, N_H:]
        return torch.cat([f_h / self.tau_h, f_y / self.tau_y], dim=1)


def torchdiffeq_gradient(p, L, method, adjoint, steps=STEPS):
    """Forward + gradient with torchdiffeq on the lean field, fixed grid of ``steps`` steps over
    [0, steps dt] (for the adjoint's backward pass too). Returns (loss, gradients, nfev forward+backward)."""
    target = torch.from_numpy(p.target)
    drive_h = torch.addmm(L["b_h"], L["x"], L["V"].T)
    field = LeanField(L["W1"], L["B"], drive_h, L["b_y"], L["tau_h"], L["tau_y"])
    t = torch.tensor([0.0, steps * DT], dtype=torch.float64)

    def grid(func, y0, t):  # both directions: the adjoint integrates from t[0] = T back to 0
        return torch.linspace(float(t[0]), float(t[-1]), steps + 1, dtype=t.dtype)
    options = dict(grid_constructor=grid)
    if adjoint:
        params = (L["W1"], L["B"], drive_h, L["b_y"], L["tau_h"], L["tau_y"])
        u = torchdiffeq.odeint_adjoint(field, L["u0"], t, method=method, options=options,
                                       adjoint_params=params)
    else:
        u = torchdiffeq.odeint(field, L["u0"], t, method=method, options=options)
    loss = 0.5 * ((u[-1][:, N_H:] - target) ** 2).sum()
    grads = torch.autograd.grad(loss, list(L.values()))
    return float(loss.detach()), leaf_gradients(L, grads), field.nfev


# ============================================================================================ timing table
class Rows:
    def __init__(self, bound, inputs, steps):
        self.bound, self.inputs, self.steps = bound, inputs, steps  # (min, median) s per step / per call
        self.rows = []

    def add(self, name, t, note=""):
        self.rows.append((name, t, note))

    def print(self, title, reference):
        """Print the rows and record them, with each row's ratio to the row named ``reference``."""
        s, b, i = self.steps, self.bound, self.inputs
        ref = next(t for name, t, _ in self.rows if name == reference)
        table = []
        head = (f"{'method (forward + gradient, ' + str(s) + ' steps)':<52} {'min ms':>8} {'median':>8} "
                f"{'ratio':>6} {'(med)':>6} {'+in':>5}  note")
        print(head)
        print("-" * len(head))
        for name, t, note in self.rows:
            if t is None:
                print(f"{name:<52} {'-':>8} {'-':>8} {'':>6} {'':>6} {'':>5}  {note}")
                table.append((name.strip(), None, None, None, None, None, None, note))
                continue
            ratio = t[0] / (s * b[0])
            ratio_med = t[1] / (s * b[1])
            ratio_in = t[0] / (s * b[0] + i[0])
            print(f"{name:<52} {t[0] * 1e3:8.2f} {t[1] * 1e3:8.2f} {ratio:6.2f} {ratio_med:6.2f} "
                  f"{ratio_in:5.2f}  {note}")
            table.append((name.strip(), t[0] * 1e3, t[1] * 1e3, ratio, ratio_med, ratio_in, t[0] / ref[0], note))
        results.record(title, ["method", "min ms", "median ms", "ratio to bound", "ratio to bound (median)",
                               "ratio to bound + inputs", f"ratio to {reference}", "note"], table, key="gradient",
                       baseline=f"{s} x the bound of a forward + gradient step (6 products + 1 activation pass)",
                       bound_step_us=b[0] * 1e6, input_products_ms=i[0] * 1e3)


def timing_section(args):
    p = make_problem(args.batch)
    reps = args.repeats
    s = STEPS
    products = timeit(gemm_bound_step(p), reps, number=1000)
    act = timeit(activation_pass(p.net, args.batch), reps, number=1000)
    bound = (products[0] + act[0], products[1] + act[1])
    fwd_bound = timeit(gemm_forward_step(p), reps, number=1000)
    inputs = timeit(gemm_inputs(p), reps, number=50)
    print(f"\nBound of one step of forward + gradient (6 products + 1 activation pass): {bound[0] * 1e6:.1f} us "
          f"(median {bound[1] * 1e6:.1f}; the products {products[0] * 1e6:.1f}, the activation "
          f"{act[0] * 1e6:.1f}); x {s} steps = {s * bound[0] * 1e3:.2f} ms")
    print(f"  forward only (2 products): {fwd_bound[0] * 1e6:.1f} us; "
          f"input products once per call (V x, dL/dV, dL/dx): {inputs[0] * 1e3:.2f} ms "
          f"(median {inputs[1] * 1e3:.2f})")
    rows = Rows(bound, inputs, s)
    grads = {}

    def sub_row(name, method, integrator="euler", key=None, note=""):
        g = substrate_gradient(p, method, integrator=integrator)
        t = timeit(lambda: substrate_gradient(p, method, integrator=integrator), reps)
        if key:
            grads[key] = g
        rows.add(name, t, note)
        return g, t

    ref, t_ref = sub_row("substrate discrete adjoint euler, checkpoints=None",
                         substrate.DiscreteAdjoint(), key="discrete")
    g10, _ = sub_row("substrate discrete adjoint euler, checkpoints=10",
                     substrate.DiscreteAdjoint(checkpoints=10))
    same = all(np.array_equal(a, b) for a, b in zip(ref.flat(), g10.flat()))
    rows.rows[-1] = rows.rows[-1][:2] + (f"gradient bit-identical to checkpoints=None: {same}",)
    # the marginal cost of a step: slope between calls of 100 and 1000 steps (no per-call work)
    t_long = timeit(lambda: substrate_gradient(p, substrate.DiscreteAdjoint(), steps=10 * s), max(3, reps // 2))
    marginal = tuple((lt - st) / 9 for st, lt in zip(t_ref, t_long))  # per 100 steps
    rows.add("  the same, marginal: slope 100 -> 1000 steps, x 100", marginal,
             f"per-call work ~ {(t_ref[0] - marginal[0]) * 1e3:.1f} ms")
    gc, _ = sub_row("substrate continuous adjoint exp_euler/exp_euler",
                    substrate.ContinuousAdjoint(backward="exp_euler"), integrator="exp_euler")
    ge = substrate_gradient(p, substrate.DiscreteAdjoint(), integrator="exp_euler")
    rows.rows[-1] = rows.rows[-1][:2] + (
        f"dL/dW rel. diff vs discrete exp_euler {rel_diff(flat_weights(gc.weights), flat_weights(ge.weights)):.1e}"
        f", vs discrete euler {rel_diff(flat_weights(gc.weights), flat_weights(ref.weights)):.1e}",)
    gc2, _ = sub_row("substrate continuous adjoint exp_euler/etd2rk",
                     substrate.ContinuousAdjoint(backward="etd2rk"), integrator="exp_euler")
    rows.rows[-1] = rows.rows[-1][:2] + (
        "the default backward (2nd order); dL/dW rel. diff vs discrete exp_euler "
        f"{rel_diff(flat_weights(gc2.weights), flat_weights(ge.weights)):.1e}",)
    t_fwd = timeit(lambda: p.substrate(s), reps)
    rows.add("substrate forward only (integrate euler)", t_fwd,
             f"{t_fwd[0] / (s * fwd_bound[0]):.2f}x the forward GEMM bound; "
             f"gradient / forward = {t_ref[0] / t_fwd[0]:.2f}")

    torch_times = {}
    if torch is None:
        rows.add("torch autograd backprop, Euler loop", None, "skipped: torch not installed")
    else:
        L = torch_leaves(p)
        loss_t, g_t = torch_backprop(p, L)
        t = timeit(lambda: torch_backprop(p, L), reps)
        torch_times["backprop"] = t
        t_long = timeit(lambda: torch_backprop(p, L, 10 * s), max(3, reps // 2))
        torch_marginal = tuple((lt - st) / 9 for st, lt in zip(t, t_long))
        w_diff = rel_diff(flat_weights(ref.weights), g_t["weights"])
        all_diff = max(rel_diff(ref.biases, g_t["biases"]), rel_diff(ref.inputs, g_t["inputs"]),
                       rel_diff({"u0": ref.u0}, {"u0": g_t["u0"]}),
                       rel_diff({k: np.atleast_1d(v) for k, v in ref.tau.items()},
                                {k: np.atleast_1d(v) for k, v in g_t["tau"].items()}))
        grads["dW_torch"] = w_diff
        rows.add("torch autograd backprop, Euler loop", t,
                 f"vs substrate: dL/dW rel. diff {w_diff:.1e}, b/tau/x/u0 {all_diff:.1e}, "
                 f"loss {abs(loss_t - ref.loss) / ref.loss:.1e}")
        rows.add("  the same, marginal: slope 100 -> 1000 steps, x 100", torch_marginal,
                 f"per-call work ~ {(t[0] - torch_marginal[0]) * 1e3:.1f} ms; "
                 f"{torch_marginal[0] / marginal[0]:.2f}x substrate's marginal")
        _, g_lean = torch_backprop_lean(p, L)
        t = timeit(lambda: torch_backprop_lean(p, L), reps)
        torch_times["lean"] = t
        rows.add("torch backprop, lean (dL/dW1, dL/dB only, lerp)", t,
                 f"dL/dW1,B rel. diff {rel_diff({k: ref.weights[k] for k in g_lean}, g_lean):.1e}")
        if torchdiffeq is None:
            rows.add("torchdiffeq", None, "skipped: torchdiffeq not installed")
        else:
            for label, method, adjoint in [("torchdiffeq odeint euler (backprop)", "euler", False),
                                           ("torchdiffeq odeint_adjoint euler", "euler", True),
                                           ("torchdiffeq odeint_adjoint rk4 (3/8 rule)", "rk4", True)]:
                _, g, nfev = torchdiffeq_gradient(p, L, method, adjoint)
                t = timeit(lambda: torchdiffeq_gradient(p, L, method, adjoint), reps)
                torch_times[label] = t
                d = rel_diff(flat_weights(ref.weights), g["weights"])
                rows.add(label, t, f"{nfev} evaluations; dL/dW rel. diff vs substrate discrete euler {d:.1e}")
            # substrate's own torch mirror: the full circuit, V x recomputed at every evaluation
            from substrate.torch_backend import TorchDiffEq
            strat = TorchDiffEq(adjoint=True, method="euler")
            t0 = time.perf_counter()
            g = substrate_gradient(p, strat)
            once = time.perf_counter() - t0
            r = max(1, min(reps, int(20 / max(once, 1e-3))))
            t = timeit(lambda: substrate_gradient(p, strat), r)
            d = rel_diff(flat_weights(ref.weights), flat_weights(g.weights))
            rows.add("substrate TorchDiffEq(adjoint=True, 'euler')", t,
                     f"V x per evaluation; {r} repeats; dL/dW rel. diff {d:.1e}")

    g4, t4 = sub_row("substrate discrete adjoint rk4 (classical), cp=None",
                     substrate.DiscreteAdjoint(), integrator="rk4")
    note = "4 evaluations per step"
    if "torchdiffeq odeint_adjoint rk4 (3/8 rule)" in torch_times:
        note += f"; {torch_times['torchdiffeq odeint_adjoint rk4 (3/8 rule)'][0] / t4[0]:.1f}x faster " \
                "than odeint_adjoint rk4"
    rows.rows[-1] = rows.rows[-1][:2] + (note,)

    print(f"\nTime per call (forward + gradient of L, {s} steps, batch {args.batch}); ratio = time / "
          f"({s} x GEMM bound), min/min and median/median; +in = min / ({s} x bound + input products)")
    rows.print(f"Gradient through the dynamics, time per call (forward + gradient of L, {s} Euler steps, batch "
               f"{args.batch}, 784-500-10); ratios to {s} x the bound of a step (6 products + 1 activation pass), "
               "to that plus the input products, and to substrate's discrete adjoint",
               "substrate discrete adjoint euler, checkpoints=None")

    # the targets
    b100 = s * bound[0]
    print("\nTargets (minimum times):")
    print(f"  substrate discrete euler / ({s} x bound)  = {t_ref[0] / b100:5.2f}   (target <= 1.3)")
    print(f"  substrate discrete euler / ({s} x bound + input products) = "
          f"{t_ref[0] / (b100 + inputs[0]):5.2f}")
    if "backprop" in torch_times:
        print(f"  torch backprop / substrate discrete euler     = {torch_times['backprop'][0] / t_ref[0]:5.2f}   "
              f"(target >= 2.5; lean torch backprop: {torch_times['lean'][0] / t_ref[0]:.2f})")
    for label in ("torchdiffeq odeint_adjoint euler", "torchdiffeq odeint_adjoint rk4 (3/8 rule)"):
        if label in torch_times:
            print(f"  {label[12:]} / substrate discrete euler = "
                  f"{torch_times[label][0] / t_ref[0]:5.2f}   (target >= 4)")
    if "torchdiffeq odeint_adjoint rk4 (3/8 rule)" in torch_times:
        print(f"  odeint_adjoint rk4 / substrate discrete rk4  = "
              f"{torch_times['torchdiffeq odeint_adjoint rk4 (3/8 rule)'][0] / t4[0]:5.2f}   (same order)")
    return grads


def tanh_section(args):
    """The tanh problem: substrate's discrete adjoint (Euler, every state stored) against its bound
    and torch autograd, and the share of tanh in it."""
    p = make_tanh_problem(args.batch)
    reps, s = args.repeats, STEPS
    step, nprod = state_products(p.net, args.batch)
    products = timeit(step, reps, number=20)
    act = timeit(activation_pass(p.net, args.batch), reps, number=50)
    bound = products[0] + act[0]
    print(f"\nThe tanh problem (n = {p.net.n}: 784 + 500 + 10 tanh units, batch {args.batch}, {s} Euler steps): "
          f"bound of a step {bound * 1e6:.0f} us = {nprod} products {products[0] * 1e6:.0f} us + one "
          f"activation pass {act[0] * 1e6:.0f} us")
    ref = substrate_gradient(p, substrate.DiscreteAdjoint())
    t_sub = timeit(lambda: substrate_gradient(p, substrate.DiscreteAdjoint()), reps)
    g10 = substrate_gradient(p, substrate.DiscreteAdjoint(checkpoints=10))
    same = all(np.array_equal(a, b) for a, b in zip(ref.flat(), g10.flat()))
    print(f"  {'substrate discrete adjoint euler, checkpoints=None':<52} {t_sub[0] * 1e3:9.1f} ms  "
          f"{t_sub[0] / (s * bound):5.2f} x bound; checkpoints=10 bit-identical: {same}")
    print(f"  tanh's share: {2 * s} activation passes (the forward's, and the backward's, which takes "
          f"rho' = 1 - r^2 from them) ~ {2 * s * act[0] * 1e3:.0f} ms = {2 * s * act[0] / t_sub[0]:.0%} of "
          "substrate's time")
    out = {"bound": bound, "substrate": t_sub[0]}
    if torch is not None:
        L = torch_tanh_leaves(p)
        loss_t, g_t = torch_tanh_backprop(p, L)
        t_t = timeit(lambda: torch_tanh_backprop(p, L), reps)
        d = rel_diff({k: np.asarray(ref.weights[k]) for k in g_t if k in ref.weights}, g_t)
        print(f"  {'torch autograd backprop, Euler loop':<52} {t_t[0] * 1e3:9.1f} ms  "
              f"{t_t[0] / (s * bound):5.2f} x bound; dL/dW rel. diff vs substrate {d:.1e}, "
              f"loss {abs(loss_t - ref.loss) / ref.loss:.1e}")
        print(f"  torch backprop / substrate discrete euler = {t_t[0] / t_sub[0]:.2f}   (target >= 2.5)")
        out["torch"] = t_t[0]
    rows = [("substrate discrete adjoint euler, checkpoints=None", t_sub[0] * 1e3, t_sub[0] / (s * bound), 1.0,
             2 * s * act[0] / t_sub[0])]
    if "torch" in out:
        rows.append(("torch autograd backprop, Euler loop", out["torch"] * 1e3, out["torch"] / (s * bound),
                     out["torch"] / t_sub[0], None))
    results.record(f"The tanh problem (784 + 500 + 10 tanh units, batch {args.batch}, {s} Euler steps): forward + "
                   f"gradient per call; ratios to {s} x the bound of a step ({nprod} products + 1 activation pass) "
                   "and to substrate", ["method", "min ms", "ratio to bound", "ratio to substrate", "tanh share"],
                   rows, key="gradient_tanh", baseline=f"{s} x the bound of a step; substrate's discrete adjoint",
                   bound_step_us=bound * 1e6)
    return out


# ============================================================================================ memory
def _status_kb(field):
    """A VmXXX line of /proc/self/status in kB (None where there is no /proc)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_worker(variant, steps, threads, batch):
    """Runs in its own process: a 10-step warm-up, then the measured call; prints JSON (kB).

    The peak is VmHWM (/proc/self/status), the high-water mark of this process's own address space:
    ``ru_maxrss`` of a process started by ``subprocess`` (vfork + exec) starts at its parent's peak.
    Before the measured call the high-water mark is reset (``/proc/self/clear_refs``), so ``call_kb``
    is the call's own peak above the memory in use before it."""
    if threadpool_limits is not None:
        threadpool_limits(limits=threads)
    p = make_problem(batch)
    if variant == "torch_backprop":
        torch.set_num_threads(threads)
        L = torch_leaves(p)

        def run(n):
            return torch_backprop(p, L, n)
    else:
        cp = {"substrate_cp10": 10, "substrate_cpNone": None}[variant]

        def run(n):
            return substrate_gradient(p, substrate.DiscreteAdjoint(checkpoints=cp), steps=n)
    run(10)
    hwm_before, rss_before = _status_kb("VmHWM"), _status_kb("VmRSS")
    if hwm_before is None:  # no /proc: fall back on ru_maxrss (inflated by the parent's peak)
        hwm_before = rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    run(steps)
    wall = time.perf_counter() - t0
    hwm = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(peak_kb=max(hwm, hwm_before), call_kb=hwm - rss_before, reset=reset,
                          before_kb=rss_before, seconds=wall,
                          torch_loaded=sys.modules.get("torch") is not None)))


def run_worker(variant, steps, threads, batch):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run([sys.executable, __file__, "--memory-worker", variant, str(steps),
                               "--threads", str(threads), "--batch", str(batch)],
                              env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {WORKER_TIMEOUT} s"
    if proc.returncode != 0:
        return None, f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:100]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def available_memory():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_section(args):
    steps = sorted(int(t) for t in args.memory_steps.split(","))
    variants = [("substrate_cp10", "substrate discrete euler, checkpoints=10"),
                ("substrate_cpNone", "substrate discrete euler, checkpoints=None"),
                ("torch_backprop", "torch autograd backprop, Euler loop")]
    if torch is None:
        variants = variants[:2]
    avail = available_memory()
    limit = MEMORY_LIMIT if avail is None else min(MEMORY_LIMIT, 0.8 * avail)
    nb = args.batch
    print(f"\nPeak memory, each run in its own process (batch {nb}, T steps of dt = {DT}; one state "
          f"{SIZES[1] + SIZES[2]} x {nb} float64 = {(SIZES[1] + SIZES[2]) * nb * 8 / 1e3:.0f} kB).\n"
          "peak: the process's peak RSS (VmHWM: imports, warm-up and the call; ru_maxrss of a subprocess\n"
          "would start at the parent's peak); call: the call's own peak above the memory in use before it.\n"
          f"A variant is not run at T = {steps[-1]} if its estimated peak (call memory linear in T) "
          f"exceeds {limit / 1e9:.1f} GB.")
    head = (f"{'variant':<44} {'T':>6} {'peak MB':>9} {'/ T0':>8} {'call MB':>9} {'/ T0':>8} "
            f"{'kB/step':>8} {'s':>6}  note")
    print(head)
    print("-" * len(head))
    summary, table = {}, []
    for key, label in variants:
        done = {}
        for T in steps:
            note = ""
            if T == steps[-1] and done:
                t2 = max(done)
                r2 = done[t2]
                est = (r2["before_kb"] + max(r2["call_kb"], 0) * T / t2) * 1024
                if est > limit:
                    print(f"{label:<44} {T:>6} {'-':>9} {'-':>8} {'-':>9} {'-':>8} {'-':>8} {'-':>6}  skipped: "
                          f"estimated peak {est / 1e9:.1f} GB (call memory at T={t2} x {T // t2}) "
                          f"> {limit / 1e9:.1f} GB")
                    summary[(key, T)] = ("skipped", est)
                    why = f"skipped: estimated peak {est / 1e9:.1f} GB > {limit / 1e9:.1f} GB"
                    table.append((label, T, None, None, None, None, None, None, why))
                    continue
                note = f"estimated {est / 1e6:.0f} MB"
            r, why = run_worker(key, T, args.threads, args.batch)
            if r is None:
                print(f"{label:<44} {T:>6} {'-':>9}  {why}")
                table.append((label, T, None, None, None, None, None, None, why))
                continue
            done[T] = r
            r0 = done.get(steps[0])
            ratio = r["peak_kb"] / r0["peak_kb"] if r0 else float("nan")
            ratio_call = r["call_kb"] / r0["call_kb"] if r0 and r0["call_kb"] > 0 else float("nan")
            notes = ["torch loaded" if r["torch_loaded"] else "no torch"]
            if not r["reset"]:
                notes.append("peak not reset: call MB is a lower bound")
            if note:
                notes.append(note)
            print(f"{label:<44} {T:>6} {r['peak_kb'] / 1024:9.1f} {ratio:8.2f} {r['call_kb'] / 1024:9.1f} "
                  f"{ratio_call:8.2f} {r['call_kb'] / T:8.1f} {r['seconds']:6.1f}  {'; '.join(notes)}")
            summary[(key, T)] = ("ok", ratio, ratio_call)
            table.append((label, T, r["peak_kb"] / 1024, ratio, r["call_kb"] / 1024, ratio_call, r["call_kb"] / T,
                          r["seconds"], "; ".join(notes)))
    results.record(f"Peak memory of a gradient, each run in its own process (batch {nb}, T steps of dt = {DT}); "
                   f"ratios to the same variant at T = {steps[0]}",
                   ["variant", "T", "peak MB", "peak / T0", "call MB", "call / T0", "kB per step", "s", "note"],
                   table, key="gradient_memory", baseline=f"the same variant at T = {steps[0]}")
    return summary


# ============================================================================================ implicit
def implicit_section(args):
    reps = args.repeats
    angle = 90.0
    p = make_problem(args.batch)
    net, x = p.net, p.x
    print(f"\nImplicit gradient at the equilibrium (n = {net.n} per sample, batch {args.batch}), "
          "against one relaxation relax(method='exp_euler', tol=1e-8, dt default = tau_min = 1)")
    try:
        sol = substrate.relax(net, x, method="exp_euler", tol=1e-8)
    except substrate.ConvergenceError as exc:
        angle = 45.0
        print(f"  asymmetry 90 degrees: the relaxation does not converge ({str(exc).splitlines()[0][:100]}); "
              "using asymmetry_angle=45")
        net = substrate.Network.layered(list(SIZES), np.random.default_rng(0), activation="logistic",
                                        feedback="independent", asymmetry_angle=angle, dtype="float64")
        sol = substrate.relax(net, x, method="exp_euler", tol=1e-8)
    print(f"  asymmetry angle {angle:g}: relax converged in {sol.steps} steps ({sol.nfev} evaluations), "
          f"max residual {np.max(sol.residual):.1e}")
    t_relax = timeit(lambda: substrate.relax(net, x, method="exp_euler", tol=1e-8), reps)

    def implicit(solver):
        return substrate.gradient(net, x, p.loss, method=substrate.Implicit(solver=solver),
                                  integrator="exp_euler", tol=1e-8)
    gk = implicit("krylov")
    t_k = timeit(lambda: implicit("krylov"), reps)
    head = f"  {'':<46} {'min ms':>9} {'median':>9} {'/ relax':>8}"
    print(head)
    print(f"  {'relax (exp_euler, tol 1e-8)':<46} {t_relax[0] * 1e3:9.2f} {t_relax[1] * 1e3:9.2f} {1:8.2f}")
    print(f"  {'gradient implicit krylov (relax included)':<46} {t_k[0] * 1e3:9.2f} {t_k[1] * 1e3:9.2f} "
          f"{t_k[0] / t_relax[0]:8.2f}   adjoint solve alone: {(t_k[0] - t_relax[0]) / t_relax[0]:.2f} x relax")

    # direct: n jvps to build J per sample, then per sample cond + solve; estimate before running
    vf = substrate.VectorField(net, x)
    v = np.ones_like(sol.u)
    t_jvp = timeit(lambda: vf.jvp(sol.u, v), 3, number=5)[0]
    J = np.eye(net.n) + 0.01 * np.random.default_rng(5).standard_normal((net.n, net.n))
    t_lu = timeit(lambda: (np.linalg.cond(J), np.linalg.solve(J.T, v[0])), 1)[0]
    est = net.n * t_jvp + args.batch * t_lu
    if est < 60:
        t0 = time.perf_counter()
        gd = implicit("direct")
        t_d = time.perf_counter() - t0
        d = rel_diff(flat_weights(gd.weights), flat_weights(gk.weights))
        print(f"  {'gradient implicit direct (1 run)':<46} {t_d * 1e3:9.2f} {'':>9} {t_d / t_relax[0]:8.2f}   "
              f"estimate {est:.1f} s ({net.n} jvps + {args.batch} x cond/LU); "
              f"dL/dW rel. diff vs krylov {d:.1e}")
    else:
        print(f"  gradient implicit direct: skipped, estimated {est:.0f} s > 60 s")
    rows = [("relax (exp_euler, tol 1e-8)", t_relax[0] * 1e3, t_relax[1] * 1e3, 1.0),
            ("gradient implicit krylov (relax included)", t_k[0] * 1e3, t_k[1] * 1e3, t_k[0] / t_relax[0])]
    if est < 60:
        rows.append(("gradient implicit direct (1 run)", t_d * 1e3, None, t_d / t_relax[0]))
    results.record(f"Implicit gradient at the equilibrium (784-500-10, batch {args.batch}, asymmetry {angle:g} "
                   "degrees) against one relaxation of the same problem",
                   ["case", "min ms", "median ms", "ratio to relax"], rows, key="gradient_implicit",
                   baseline="relax (exp_euler, tol 1e-8)")
    # the same gradient as the limit of the discrete adjoint through the relaxation (ETD1 steps keep
    # the equilibrium, so the gradient through many of them converges to the implicit one)
    gl = substrate.gradient(net, x, p.loss, method=substrate.DiscreteAdjoint(), t_span=(0.0, 100.0),
                            integrator="exp_euler", dt=1.0)
    d = rel_diff(flat_weights(gl.weights), flat_weights(gk.weights))
    print(f"  check: discrete adjoint through 100 exp_euler steps of dt = 1: dL/dW rel. diff vs implicit {d:.1e}")
    return t_k[0] / t_relax[0]


# ============================================================================================ main
def wait_for_quiet(max_load, max_wait):
    t0 = time.perf_counter()
    while True:
        load = os.getloadavg()
        waited = time.perf_counter() - t0
        if load[0] <= max_load:
            print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (waited {waited:.0f} s)")
            return
        if waited >= max_wait:
            print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}: still above {max_load} after "
                  f"{waited:.0f} s, running anyway (expect noisy times)")
            return
        print(f"load average {load[0]:.2f} > {max_load}: waiting ({waited:.0f} s so far)", flush=True)
        time.sleep(30)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="BLAS/torch threads (default 1)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--repeats", type=int, default=7, help="timings per measurement (default 7)")
    ap.add_argument("--no-timing", dest="timing", action="store_false", help="skip the timing table")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    ap.add_argument("--memory-steps", default=",".join(map(str, MEMORY_STEPS)),
                    help=f"the horizons T of the peak-memory runs (default {','.join(map(str, MEMORY_STEPS))})")
    ap.add_argument("--no-implicit", dest="implicit", action="store_false", help="skip the implicit part")
    ap.add_argument("--max-load", type=float, default=0.8, help="wait for a load average below this (0.8)")
    ap.add_argument("--max-wait", type=float, default=600, help="wait at most this many seconds (600)")
    ap.add_argument("--memory-worker", nargs=2, metavar=("VARIANT", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker[0], int(args.memory_worker[1]), args.threads, args.batch)
        return

    print(__doc__[:__doc__.index("What is measured")].strip())
    wait_for_quiet(args.max_load, args.max_wait)
    describe_machine()
    make_problem(args.batch).substrate(STEPS)  # loads scipy's BLAS (the engine's) so threadpoolctl sees it
    t_start = time.perf_counter()
    limits = threadpool_limits(limits=args.threads) if threadpool_limits else None
    if torch is not None:
        torch.set_num_threads(args.threads)
    try:
        print(f"\n==== {args.threads} thread(s) ====")
        describe_threads()
        if args.timing:
            timing_section(args)
            tanh_section(args)
        if args.implicit:
            implicit_section(args)
    finally:
        if limits is not None:
            limits.restore_original_limits()
    if args.memory:
        memory_section(args)
    print(f"\n(benchmark took {time.perf_counter() - t_start:.0f} s; load average now "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())})")


if __name__ == "__main__":
    main()
