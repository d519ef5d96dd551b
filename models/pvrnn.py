"""PV-RNN (Ahmadi & Tani, Neural Computation 2019; docs/equations.md, section 5): MTRNN layers of leaky
tanh units with stochastic latents, a learned prior, and a posterior from adaptive vectors A.

Layers l = 0 (bottom) .. L-1 (top); at every data step t = 0..T-1 the layers update top-down:

    prior      t = 0: N(0, I);  t > 0: mu^p = tanh(W_mu d_{t-1} + b_mu), sigma^p = exp(W_sig d_{t-1} + b_sig)
    posterior  mu^q = tanh(A^mu_t), sigma^q = exp(A^sig_t);  z_t = mu^q + sigma^q eps_t
    units      h_t = (1 - 1/tau) h_{t-1} + (1/tau)(W_dd d_{t-1} + W_zd z_t + W_td d^{l+1}_t + b),  d_t = tanh(h_t)
    output     x_hat_t = tanh(W_out d^0_t + b_out)

(the Euler step with dt = 1 of tau dh/dt = -h + ..., the published model; h_{-1} = 0, d_{-1} = 0; the
top layer has no top-down term). The free energy of a sequence (the negative lower bound) is

    F = sum_t 0.5 ||x_t - x_hat_t||^2 / D_x + sum_l sum_t w_l(t) KL^l_t / Z_l,   (``normalisation="gaussian"``)
    KL = sum_j log(sigma^p_j/sigma^q_j) + ((mu^p_j - mu^q_j)^2 + (sigma^q_j)^2) / (2 (sigma^p_j)^2) - 1/2,

with w_l(0) = ``w_first`` and w_l(t > 0) = ``w`` (the first-step weight applies to the first step
only), summed over the sequences of a batch. ``normalisation`` (:data:`NORMALISATIONS`) sets the
factor of the squared error and the divisions by D_x and Z_l: under Adam only the ratio of the two
terms matters, so a factor 2 on the reconstruction acts as w / 2. Its gradient with respect to the weights and every
sequence's A is the exact discrete adjoint of these steps (backpropagation through time written out
in :meth:`PVRNN.free_energy`; the top-down gradient carries its 1/tau), checked against torch autograd
in tests/test_pvrnn.py.

The continuous-time circuit: ``substeps`` n > 1 integrates tau dh/dt = -h + pre over each data step
in n steps of 1/n, h <- alpha h + (1 - alpha) pre with alpha = 1 - 1/(n tau) (``method="euler"``; n = 1
is the published model) or the exact leak alpha = e^{-1/(n tau)} (``"exp_euler"``), the latents held
over the data step and the layers updated top-down within each substep; the adjoint runs over the
substeps. Other credit assignments (``free_energy(credit=...)``): truncated BPTT, and the continuous
adjoint of that circuit. Options: W d inside the posterior (``posterior_weights``); the circuit on a
device (:class:`DeviceCircuit`: time-constant mismatch, read noise).

:func:`error_regression` infers the latents of a test sequence online (sliding window); its exact
step runs compiled (``models/_pvrnn_kernels.py``, ~1 ms for the issue's benchmark problem), and so
does :func:`train` with ``compiled=True`` (whole epochs of forward, exact adjoint and Adam per call).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import numpy as np
from tqdm.auto import tqdm

from substrate import Counts, archive, persist
from substrate.devices import Device, ReadNoise, TauMismatch, stream
from substrate.errors import DivergenceError, SubstrateValueError
from substrate.validate import as_real, choice, count, finite_array, flag, nonnegative, positive

from . import _pvrnn_kernels as K
from .train import Adam


# How F weighs the reconstruction against the KL: name -> (factor c of the summed squared error,
# divide it by D_x, divide each layer's KL by Z_l). Dividing both terms by the steps or sequences
# would leave their ratio, hence Adam's path, unchanged (up to its epsilon), so no option does.
NORMALISATIONS = {
    "gaussian": (0.5, True, True),  # -log N(x; x_hat, I) per output and KL per latent (this model's default)
    "squared": (1.0, True, True),  # squared error per output, KL per latent: the Tani lab's public PV-RNN code
    "sum": (0.5, False, False),  # the plain negative ELBO of a unit-variance Gaussian: no divisions
}


@dataclass(frozen=True)
class PVLayer:
    """One MTRNN layer: ``units`` deterministic units with time constant ``tau`` (>= 1), ``latents``
    stochastic units, meta-prior ``w`` and first-step weight ``w_first``."""

    units: int
    latents: int
    tau: float
    w: float = 1e-3
    w_first: float = 1.0

    def __post_init__(self):
        for name in ("units", "latents"):
            count(getattr(self, name), f"PVLayer.{name}")
        tau = as_real(self.tau)
        if tau is None or not 1.0 <= tau < math.inf:
            raise SubstrateValueError(f"PVLayer.tau={self.tau!r} must be >= 1 (the Euler step dt = 1 is stable)")
        for name in ("w", "w_first"):
            nonnegative(getattr(self, name), f"PVLayer.{name}")


@dataclass
class State:
    """The units of every layer at one step: h and d = tanh(h), lists of (B, units); ``first``: the
    next step is a sequence's first (prior N(0, I), weight w_first), else it continues one."""

    h: list
    d: list
    first: bool = True


@dataclass
class Pass:
    """What a forward pass keeps for its backward pass (per layer lists of (B, T, .) arrays), and the
    state it started from and the state after its first step."""

    d: list
    z: list
    mu_p: list
    logs_p: list
    mu_q: list
    logs_q: list
    eps: list
    x_hat: np.ndarray
    ds: list  # d after every substep, (B, T * substeps, units) per layer
    start: State
    after_first: State
    end: State


class PVRNN:
    """A PV-RNN of ``layers`` (bottom first) with ``outputs`` output units; weights drawn from ``rng``
    (uniform +-1/sqrt(fan_in), PyTorch's default). ``params`` maps names to arrays:
    ``l{i}.W_dd``, ``l{i}.W_zd``, ``l{i}.W_td`` (from layer i+1, not for the top), ``l{i}.b``,
    ``l{i}.W_mu``, ``l{i}.b_mu``, ``l{i}.W_sig``, ``l{i}.b_sig``, ``out.W``, ``out.b``.

    ``posterior_weights``: the posterior adds W d_{t-1} inside, as some public codes do:
    mu^q = tanh(A^mu_t + W^q_mu d_{t-1}), log sigma^q = A^sig_t + W^q_sig d_{t-1} (weights
    ``l{i}.Wq_mu``, ``l{i}.Wq_sig``, drawn after all the others; d_{-1} = 0 at a sequence's start).
    ``normalisation``: how F weighs the reconstruction against the KL (:data:`NORMALISATIONS`)."""

    def __init__(self, layers, outputs: int, rng: np.random.Generator, substeps: int = 1,
                 method: str = "euler", posterior_weights: bool = False, normalisation: str = "gaussian"):
        try:
            self.layers = [PVLayer(**x) if isinstance(x, dict) else x for x in layers]
        except TypeError:  # not iterable, or a dict with other keys
            self.layers = None
        if not self.layers or not all(isinstance(x, PVLayer) for x in self.layers):
            raise SubstrateValueError("layers: a non-empty list of PVLayer (or dicts of their fields)")
        count(outputs, "outputs")
        if not isinstance(rng, np.random.Generator):
            raise SubstrateValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.outputs = int(outputs)
        count(substeps, "substeps")
        choice(method, "method", ("euler", "exp_euler"))
        choice(normalisation, "normalisation", tuple(NORMALISATIONS))
        self.normalisation = normalisation
        flag(posterior_weights, "posterior_weights")
        N, Z = sum(x.units for x in self.layers), sum(x.latents for x in self.layers)
        _fits("the weights (of units, latents and outputs)", N * N + 4 * N * Z + outputs * N)
        self.substeps, self.method = int(substeps), method
        self._leak = [_leak(x.tau, 1.0 / self.substeps, method) for x in self.layers]

        def uniform(post, pre):
            k = 1.0 / math.sqrt(pre)
            return rng.uniform(-k, k, (post, pre))

        p = {}
        for i, x in enumerate(self.layers):
            p[f"l{i}.W_dd"] = uniform(x.units, x.units)
            p[f"l{i}.W_zd"] = uniform(x.units, x.latents)
            if i + 1 < len(self.layers):
                p[f"l{i}.W_td"] = uniform(x.units, self.layers[i + 1].units)
            p[f"l{i}.b"] = np.zeros(x.units)
            p[f"l{i}.W_mu"] = uniform(x.latents, x.units)
            p[f"l{i}.b_mu"] = np.zeros(x.latents)
            p[f"l{i}.W_sig"] = uniform(x.latents, x.units)
            p[f"l{i}.b_sig"] = np.zeros(x.latents)
        p["out.W"] = uniform(self.outputs, self.layers[0].units)
        p["out.b"] = np.zeros(self.outputs)
        self.posterior_weights = bool(posterior_weights)
        if self.posterior_weights:
            for i, x in enumerate(self.layers):
                p[f"l{i}.Wq_mu"] = uniform(x.latents, x.units)
                p[f"l{i}.Wq_sig"] = uniform(x.latents, x.units)
        self.params = p

    # ---------------------------------------------------------------- adaptive vectors and noise
    def adaptive_vectors(self, sequences: int, steps: int) -> dict:
        """A for ``sequences`` sequences of ``steps`` steps, zero (mu^q = 0, sigma^q = 1):
        {"l{i}.mu": (B, T, Z), "l{i}.sig": (B, T, Z)}."""
        _count(sequences, "sequences", minimum=1), _count(steps, "steps", minimum=0)
        _fits("adaptive vectors", sequences * steps * sum(x.latents for x in self.layers) * 2)
        return {f"l{i}.{k}": np.zeros((sequences, steps, x.latents))
                for i, x in enumerate(self.layers) for k in ("mu", "sig")}

    def noise(self, sequences: int, steps: int, rng: np.random.Generator) -> list:
        """eps per layer, (B, T, Z) standard normals (one draw per pass)."""
        _count(sequences, "sequences", minimum=1), _count(steps, "steps", minimum=0), _generator(rng)
        _fits("noise", sequences * steps * sum(x.latents for x in self.layers))
        return [rng.standard_normal((sequences, steps, x.latents)) for x in self.layers]

    # ---------------------------------------------------------------- forward
    def initial_state(self, sequences: int) -> State:
        """h = d = 0 before a sequence's first step."""
        return State([np.zeros((sequences, x.units)) for x in self.layers],
                     [np.zeros((sequences, x.units)) for x in self.layers], True)

    def nominal(self):
        """What the forward pass computes with: (weights, leak per layer as (alpha, beta)), the
        ``read`` of a pass; :meth:`DeviceCircuit.read` gives the same as a device reads it."""
        return self.params, self._leak

    def run(self, A: dict, eps: list, start: State | None = None, read=None) -> Pass:
        """The posterior pass: z from A and eps at every step, the units and the output, from
        ``start`` (default: a sequence's beginning), computed with ``read`` = (weights, leaks)
        (default: :meth:`nominal`)."""
        B, T = A["l0.mu"].shape[:2]
        (p, leak), L, n = read or self.nominal(), len(self.layers), self.substeps
        start = self.initial_state(B) if start is None else start
        keep = {k: [np.zeros((B, T, x.units if k == "d" else x.latents)) for x in self.layers]
                for k in ("d", "z", "mu_p", "logs_p", "mu_q", "logs_q")}
        ds = [np.zeros((B, T * n, x.units)) for x in self.layers]  # d after every substep
        h = [a.copy() for a in start.h]
        d_prev = [a.copy() for a in start.d]
        x_hat = np.empty((B, T, self.outputs))
        after_first = None
        for t in range(T):
            z = [None] * L
            for i in range(L - 1, -1, -1):  # latents of step t, from the state at the end of step t-1
                x = self.layers[i]
                if t == 0 and start.first:
                    mu_p, logs_p = np.zeros((B, x.latents)), np.zeros((B, x.latents))
                else:
                    mu_p = np.tanh(d_prev[i] @ p[f"l{i}.W_mu"].T + p[f"l{i}.b_mu"])
                    logs_p = d_prev[i] @ p[f"l{i}.W_sig"].T + p[f"l{i}.b_sig"]
                mu_q, logs_q = A[f"l{i}.mu"][:, t], A[f"l{i}.sig"][:, t]
                if self.posterior_weights:
                    mu_q = mu_q + d_prev[i] @ p[f"l{i}.Wq_mu"].T
                    logs_q = logs_q + d_prev[i] @ p[f"l{i}.Wq_sig"].T
                mu_q = np.tanh(mu_q)
                z[i] = mu_q + np.exp(logs_q) * eps[i][:, t]
                for k, v in (("z", z[i]), ("mu_p", mu_p), ("logs_p", logs_p), ("mu_q", mu_q), ("logs_q", logs_q)):
                    keep[k][i][:, t] = v
            self._advance(h, d_prev, z, p, leak, ds, t)
            for i in range(L):
                keep["d"][i][:, t] = d_prev[i]
            if t == 0:
                after_first = State([a.copy() for a in h], [a.copy() for a in d_prev], False)
            x_hat[:, t] = np.tanh(d_prev[0] @ p["out.W"].T + p["out.b"])
        end = State([a.copy() for a in h], [a.copy() for a in d_prev], False)
        return Pass(eps=eps, x_hat=x_hat, start=start, after_first=after_first, end=end, ds=ds, **keep)

    def _advance(self, h, d, z, p, leak, ds=None, t=0):
        """One data step of the units, in place: ``substeps`` steps of h <- alpha h + (1 - alpha) pre
        with the latents z held, layers top-down (a layer sees the new d of the one above), weights
        ``p`` and ``leak``; ``ds`` records d after every substep."""
        L, n = len(self.layers), self.substeps
        for k in range(n):
            for i in range(L - 1, -1, -1):
                pre = d[i] @ p[f"l{i}.W_dd"].T + z[i] @ p[f"l{i}.W_zd"].T + p[f"l{i}.b"]
                if i + 1 < L:
                    pre += d[i + 1] @ p[f"l{i}.W_td"].T  # already this substep's
                alpha, beta = leak[i]
                h[i] = alpha * h[i] + beta * pre
                d[i] = np.tanh(h[i])
                if ds is not None:
                    ds[i][:, t * n + k] = d[i]

    def loss_scales(self):
        """(c, divisor of the squared error, KL divisor per layer) of :data:`NORMALISATIONS`: the
        reconstruction term is c sum ||x - x_hat||^2 / divisor and layer l's KL term w KL / divisor_l."""
        c, per_output, per_latent = NORMALISATIONS[self.normalisation]
        return c, (self.outputs if per_output else 1), [x.latents if per_latent else 1 for x in self.layers]

    def _weights(self, i, T, first, meta_prior=None):
        """w_l(t) / Z_l over T steps (the KL divisor of :meth:`loss_scales`): w_first at a sequence's
        first step only (``meta_prior`` overrides w, e.g. for error regression)."""
        x = self.layers[i]
        w = np.full(T, x.w if meta_prior is None else meta_prior[i])
        if first:
            w[0] = x.w_first
        return w / self.loss_scales()[2][i]

    def free_energy(self, x, A: dict, eps: list, gradient: bool = True, start: State | None = None,
                    meta_prior=None, weights: bool = True, credit: str = "exact", truncation: int | None = None,
                    read=None):
        """(F, parts, dF/dparams, dF/dA) for sequences x (B, T, D_x), adaptive vectors A and noise eps.
        parts: {"reconstruction": c sum_t Rec_t / D_x, "kl": [per layer sum_t w(t) KL_t / Z]} summed over
        the batch; F = reconstruction + sum(kl). With ``gradient=False`` the two gradients are None.
        ``start``: the state the sequences continue from (a window of error regression; frozen);
        ``meta_prior``: w per layer instead of the layers' own; ``weights=False``: dF/dparams is None
        (error regression optimises A alone).

        ``credit``, how the gradient is assigned: "exact", the discrete adjoint of the steps taken;
        "truncated", the same with the state detached every ``truncation`` data steps counted back
        from the last (truncated BPTT: a step's A is credited only by losses up to its chunk's end);
        "continuous", the adjoint ODE of the continuous-time circuit, -dlambda/dt = (df/dh)^T lambda
        with f = (-h + pre)/tau, integrated backward over the same substeps with the Jacobian at each
        substep's later end (optimise-then-discretise: the leak by the integrator's own alpha, the
        coupling held), which converges to the exact gradient at first order in 1/substeps.
        ``read``: (weights, leaks) the forward pass runs on (:meth:`DeviceCircuit.read`); the adjoint
        always uses the nominal weights and leaks, along that trajectory. ``parts["pass"]`` holds the
        forward pass."""
        x = finite_array(x, "x", 3)
        B, T, D = x.shape
        A = self.check_adaptive(A, B, T)
        if D != self.outputs:
            raise SubstrateValueError(f"x has shape {x.shape}; expected (sequences, steps, {self.outputs})")
        if not isinstance(eps, (list, tuple)) or len(eps) != len(self.layers):
            raise SubstrateValueError(f"eps must be a list of {len(self.layers)} arrays (one per layer)")
        eps = [finite_array(e, f"eps[{i}]", 3, (B, T, x_.latents)) for i, (e, x_) in enumerate(zip(eps, self.layers))]
        start = self.check_state(start, B)
        _check_credit(credit, truncation)
        run = self.run(A, eps, start, read)
        err = run.x_hat - x
        c, divisor, _ = self.loss_scales()
        rec = c * float(np.sum(err * err)) / divisor
        kls, terms = [], []
        for i in range(len(self.layers)):
            sp2 = np.exp(2 * run.logs_p[i])
            diff = run.mu_p[i] - run.mu_q[i]
            sq2 = np.exp(2 * run.logs_q[i])
            kl = run.logs_p[i] - run.logs_q[i] + (diff * diff + sq2) / (2 * sp2) - 0.5
            w = self._weights(i, T, run.start.first, meta_prior)[None, :, None]
            kls.append(float(np.sum(w * kl)))
            terms.append((w, sp2, diff, sq2))
        F = rec + sum(kls)
        parts = {"reconstruction": rec, "kl": kls, "pass": run}
        if not gradient:
            return F, parts, None, None
        gp, gA = self._backward(x, run, (2 * c) * err / divisor, terms, weights, credit, truncation)
        return F, parts, gp, gA

    # ---------------------------------------------------------------- backward (BPTT)
    def _backward(self, x, run: Pass, g_err, terms, weights=True, credit="exact", truncation=None):
        p, L, n = self.params, len(self.layers), self.substeps
        B, T, _ = x.shape
        gp = {k: np.zeros_like(v) for k, v in p.items()} if weights else None
        gA = {f"l{i}.{k}": np.zeros((B, T, x_.latents)) for i, x_ in enumerate(self.layers) for k in ("mu", "sig")}
        gd = [np.zeros((B, x_.units)) for x_ in self.layers]        # dF/d d^l at the current substep
        gh = [np.zeros((B, x_.units)) for x_ in self.layers]        # dF/d h^l through the next substep
        for t in range(T - 1, -1, -1):
            y = run.x_hat[:, t]
            g_out = g_err[:, t] * (1.0 - y * y)
            if weights:
                gp["out.W"] += g_out.T @ run.d[0][:, t]
                gp["out.b"] += g_out.sum(axis=0)
            gd[0] += g_out @ p["out.W"]
            gz = [np.zeros((B, x_.latents)) for x_ in self.layers]
            for k in range(n - 1, -1, -1):
                s = t * n + k
                if credit == "continuous":
                    gd = self._substep_continuous(run, s, t, gd, gh, gz, gp)
                else:
                    gd = self._substep_discrete(run, s, t, gd, gh, gz, gp)
            # gd is now dF/d d at the end of step t-1, where step t's prior reads it
            for i in range(L):
                w, sp2, diff, sq2 = terms[i]
                c = float(w[0, t, 0])  # w_l(t) / Z_l
                sp2, diff, sq2 = sp2[:, t], diff[:, t], sq2[:, t]
                mu_q, s_q = run.mu_q[i][:, t], np.exp(run.logs_q[i][:, t])
                gA[f"l{i}.mu"][:, t] = (gz[i] - c * diff / sp2) * (1.0 - mu_q * mu_q)
                gA[f"l{i}.sig"][:, t] = gz[i] * s_q * run.eps[i][:, t] + c * (sq2 / sp2 - 1.0)
                if t > 0 or not run.start.first:
                    d_before = run.d[i][:, t - 1] if t > 0 else run.start.d[i]
                    mu_p = run.mu_p[i][:, t]
                    g_pre_mu = c * diff / sp2 * (1.0 - mu_p * mu_p)
                    g_logs_p = c * (1.0 - (diff * diff + sq2) / sp2)
                    if weights:
                        gp[f"l{i}.W_mu"] += g_pre_mu.T @ d_before
                        gp[f"l{i}.b_mu"] += g_pre_mu.sum(axis=0)
                        gp[f"l{i}.W_sig"] += g_logs_p.T @ d_before
                        gp[f"l{i}.b_sig"] += g_logs_p.sum(axis=0)
                    gd[i] += g_pre_mu @ p[f"l{i}.W_mu"] + g_logs_p @ p[f"l{i}.W_sig"]
                if self.posterior_weights:  # the posterior read d_{t-1} too (d_{-1} = 0 at a start)
                    d_before = run.d[i][:, t - 1] if t > 0 else run.start.d[i]
                    g_mu, g_sig = gA[f"l{i}.mu"][:, t], gA[f"l{i}.sig"][:, t]
                    if weights:
                        gp[f"l{i}.Wq_mu"] += g_mu.T @ d_before
                        gp[f"l{i}.Wq_sig"] += g_sig.T @ d_before
                    gd[i] += g_mu @ p[f"l{i}.Wq_mu"] + g_sig @ p[f"l{i}.Wq_sig"]
            if credit == "truncated" and (T - t) % truncation == 0:  # the state entering step t is detached
                for g in gd + gh:
                    g[:] = 0.0
        return gp, gA

    def _substep_discrete(self, run, s, t, gd, gh, gz, gp):
        """The adjoint of substep s (in place on gh, gz, gp; returns dF/dd before it): the reverse of
        the top-down order, layer i having fed on layer i+1's new d (which carries layer i's
        beta = 1/tau under Euler)."""
        p, L = self.params, len(self.layers)
        gd_before = [np.zeros_like(g) for g in gd]
        for i in range(L):
            alpha, beta = self._leak[i]
            d = run.ds[i][:, s]
            d_before = run.ds[i][:, s - 1] if s > 0 else run.start.d[i]
            g_h = gh[i] + gd[i] * (1.0 - d * d)
            g_pre = beta * g_h
            gh[i] = alpha * g_h
            if gp is not None:
                gp[f"l{i}.W_dd"] += g_pre.T @ d_before
                gp[f"l{i}.W_zd"] += g_pre.T @ run.z[i][:, t]
                gp[f"l{i}.b"] += g_pre.sum(axis=0)
                if i + 1 < L:
                    gp[f"l{i}.W_td"] += g_pre.T @ run.ds[i + 1][:, s]
            gd_before[i] += g_pre @ p[f"l{i}.W_dd"]
            if i + 1 < L:
                gd[i + 1] += g_pre @ p[f"l{i}.W_td"]
            gz[i] += g_pre @ p[f"l{i}.W_zd"]
        return gd_before

    def _substep_continuous(self, run, s, t, gd, gh, gz, gp):
        """One step back of the adjoint ODE over substep s: lambda <- alpha lambda +
        (1 - d^2) W^T (beta lambda), every factor at the substep's later end (all layers at one
        time: the top-down order is a property of the discrete steps only). ``gd`` holds only the
        jumps from the losses; returns zeros for the next ones."""
        p, L = self.params, len(self.layers)
        d = [run.ds[i][:, s] for i in range(L)]
        g_h = [gh[i] + gd[i] * (1.0 - d[i] * d[i]) for i in range(L)]  # lambda at the later end
        g_pre = [self._leak[i][1] * g_h[i] for i in range(L)]
        for i in range(L):
            coupling = g_pre[i] @ p[f"l{i}.W_dd"]
            if i > 0:
                coupling += g_pre[i - 1] @ p[f"l{i - 1}.W_td"]
            gh[i] = self._leak[i][0] * g_h[i] + (1.0 - d[i] * d[i]) * coupling
            gz[i] += g_pre[i] @ p[f"l{i}.W_zd"]
            if gp is not None:
                gp[f"l{i}.W_dd"] += g_pre[i].T @ d[i]
                gp[f"l{i}.W_zd"] += g_pre[i].T @ run.z[i][:, t]
                gp[f"l{i}.b"] += g_pre[i].sum(axis=0)
                if i + 1 < L:
                    gp[f"l{i}.W_td"] += g_pre[i].T @ d[i + 1]
        return [np.zeros_like(g) for g in gd]

    # ---------------------------------------------------------------- prior, reconstruction, training
    def generate(self, sequences: int, steps: int, rng: np.random.Generator | None,
                 start: State | None = None, read=None) -> np.ndarray:
        """x_hat (B, T, D_x) from the prior (z_t = mu^p + sigma^p eps; a sequence's first step N(0, I)),
        from ``start`` (default: a sequence's beginning); ``rng=None``: the prior means (eps = 0)."""
        _count(sequences, "sequences", minimum=1), _count(steps, "steps", minimum=1)
        if rng is not None:
            _generator(rng)
        _fits("the generated sequences", sequences * steps * self.outputs)
        (p, leak), L = read or self.nominal(), len(self.layers)
        start = self.check_state(start, sequences)
        h, d = [a.copy() for a in start.h], [a.copy() for a in start.d]
        out = np.empty((sequences, steps, self.outputs))
        for t in range(steps):
            z = [None] * L
            for i in range(L - 1, -1, -1):
                x = self.layers[i]
                eps = np.zeros((sequences, x.latents)) if rng is None else rng.standard_normal((sequences, x.latents))
                if t == 0 and start.first:
                    z[i] = eps
                else:
                    z[i] = (np.tanh(d[i] @ p[f"l{i}.W_mu"].T + p[f"l{i}.b_mu"])
                            + np.exp(d[i] @ p[f"l{i}.W_sig"].T + p[f"l{i}.b_sig"]) * eps)
            self._advance(h, d, z, p, leak)
            out[:, t] = np.tanh(d[0] @ p["out.W"].T + p["out.b"])
        return out

    def prior(self, state: State, read=None) -> dict:
        """The prior of the step after ``state``: {"l{i}.mu": mu^p, "l{i}.sig": log sigma^p}; N(0, I)
        (zeros) when that step begins a sequence (``state.first``)."""
        p = (read or self.nominal())[0]
        out = {}
        for i in range(len(self.layers)):
            if state.first:
                out[f"l{i}.mu"] = out[f"l{i}.sig"] = np.zeros((len(state.d[i]), self.layers[i].latents))
                continue
            out[f"l{i}.mu"] = np.tanh(state.d[i] @ p[f"l{i}.W_mu"].T + p[f"l{i}.b_mu"])
            out[f"l{i}.sig"] = state.d[i] @ p[f"l{i}.W_sig"].T + p[f"l{i}.b_sig"]
        return out

    def packed(self, meta_prior=None, extra: int = 0):
        """The network in the layout of ``models._pvrnn_kernels`` (one vector of units and one of
        latents, bottom layer first), the loss's scalars and the vector its trainable arrays are views
        of: (net, loss, theta). ``theta`` has ``extra`` more numbers at its end (zeros; training keeps
        A there, so that one Adam step covers all). ``loss`` = (rec_scale, weight, weight_first): 2 c / D_x
        and the KL weights w_l / Z_l per latent (:meth:`loss_scales`; 1 / D_x and w_l / Z_l by default)."""
        theta = np.zeros(self._trainable_size() + extra)
        w_rec, w_zd, b, w_mu, w_sig, b_mu, b_sig, w_out, b_out, wq_mu, wq_sig = self.trainable_views(theta)
        uoff = np.cumsum([0] + [x.units for x in self.layers])
        zoff = np.cumsum([0] + [x.latents for x in self.layers])
        units, latents = [x.units for x in self.layers], [x.latents for x in self.layers]

        def per(values, sizes):
            return np.concatenate([np.full(k, float(v)) for v, k in zip(values, sizes)])

        # unsigned offsets: numba then knows an index is not negative and the loops vectorise (8x here)
        net = (uoff.astype(np.uint64), zoff.astype(np.uint64), w_rec, w_zd, b, per([a for a, _ in self._leak], units),
               per([beta for _, beta in self._leak], units), w_mu, w_sig, b_mu, b_sig, w_out, b_out, self.substeps, wq_mu,
               wq_sig)
        for name, array, index in self._blocks(net):
            array[index] = self.params[name]
        w = [x.w for x in self.layers] if meta_prior is None else meta_prior
        c, divisor, kl_divisor = self.loss_scales()
        weight = per([v / z for v, z in zip(w, kl_divisor)], latents)
        weight_first = per([x.w_first / z for x, z in zip(self.layers, kl_divisor)], latents)
        return net, ((2 * c) / divisor, weight, weight_first), theta

    def _trainable_shapes(self):
        N, Z = sum(x.units for x in self.layers), sum(x.latents for x in self.layers)
        q, D = (Z if self.posterior_weights else 0), self.outputs
        return [(N, N), (N, Z), (N,), (Z, N), (Z, N), (Z,), (Z,), (D, self.layers[0].units), (D,), (q, N), (q, N)]

    def _trainable_size(self):
        return sum(math.prod(s) for s in self._trainable_shapes())

    def trainable_views(self, vector):
        """The packed trainable arrays (W_rec, W_zd, b, W_mu, W_sig, b_mu, b_sig, W_out, b_out, Wq_mu,
        Wq_sig; ``models._pvrnn_kernels``) as views of the start of ``vector``."""
        out, a = [], 0
        for shape in self._trainable_shapes():
            k = math.prod(shape)
            out.append(vector[a:a + k].reshape(shape))
            a += k
        return out

    def _blocks(self, net):
        """(name, packed array, index) of every parameter inside the packed ``net``: W_rec holds
        W_dd on its diagonal blocks and W_td beside them; W_zd, W_mu, W_sig (and W_q) are block diagonal."""
        uoff, zoff, w_rec, w_zd, b, _, _, w_mu, w_sig, b_mu, b_sig, w_out, b_out, _, wq_mu, wq_sig = net
        out = [("out.W", w_out, ...), ("out.b", b_out, ...)]
        for i in range(len(self.layers)):
            u, v = slice(uoff[i], uoff[i + 1]), slice(zoff[i], zoff[i + 1])
            out += [(f"l{i}.W_dd", w_rec, (u, u)), (f"l{i}.W_zd", w_zd, (u, v)), (f"l{i}.b", b, u),
                    (f"l{i}.W_mu", w_mu, (v, u)), (f"l{i}.W_sig", w_sig, (v, u)), (f"l{i}.b_mu", b_mu, v),
                    (f"l{i}.b_sig", b_sig, v)]
            if i + 1 < len(self.layers):
                out.append((f"l{i}.W_td", w_rec, (u, slice(uoff[i + 1], uoff[i + 2]))))
            if self.posterior_weights:
                out += [(f"l{i}.Wq_mu", wq_mu, (v, u)), (f"l{i}.Wq_sig", wq_sig, (v, u))]
        return out

    def prior_adaptive(self, state: State, read=None) -> dict:
        """The A of the step after ``state`` whose posterior is that step's prior: A^mu = arctanh(mu^p)
        (clipped to |mu^p| <= 1 - 1e-12), A^sig = log sigma^p, less W^q d with posterior weights."""
        p = (read or self.nominal())[0]
        out = self.prior(state, read)
        for i in range(len(self.layers)):
            out[f"l{i}.mu"] = np.arctanh(np.clip(out[f"l{i}.mu"], -1 + 1e-12, 1 - 1e-12))
            if self.posterior_weights:
                out[f"l{i}.mu"] = out[f"l{i}.mu"] - state.d[i] @ p[f"l{i}.Wq_mu"].T
                out[f"l{i}.sig"] = out[f"l{i}.sig"] - state.d[i] @ p[f"l{i}.Wq_sig"].T
        return out

    def check_state(self, start, sequences: int) -> State:
        """``start``, or a sequence's beginning when None, after checking that it is a State of this
        model for ``sequences`` sequences with finite units; else a SubstrateValueError."""
        if start is None:
            return self.initial_state(sequences)
        L = len(self.layers)
        if not isinstance(start, State) or len(start.h) != L or len(start.d) != L:
            raise SubstrateValueError(f"start must be a State with h and d for each of the {L} layers")
        for k in ("h", "d"):
            for i, x in enumerate(self.layers):
                finite_array(getattr(start, k)[i], f"start.{k}[{i}]", 2, (sequences, x.units))
        return start

    def check_adaptive(self, A, sequences: int | None = None, steps: int | None = None) -> dict:
        """A as float arrays, after checking that it has this model's keys, finite values and shapes
        (B, T, Z) with one B and T (``sequences``, ``steps`` when given); else a SubstrateValueError."""
        keys = [f"l{i}.{k}" for i in range(len(self.layers)) for k in ("mu", "sig")]
        if not isinstance(A, dict) or sorted(A) != sorted(keys):
            raise SubstrateValueError(f"A must be a dict with the keys {keys} (adaptive_vectors)")
        first = finite_array(A["l0.mu"], "A['l0.mu']", 3).shape
        B, T = (first[0] if sequences is None else sequences), (first[1] if steps is None else steps)
        return {f"l{i}.{k}": finite_array(A[f"l{i}.{k}"], f"A['l{i}.{k}']", 3, (B, T, x.latents))
                for i, x in enumerate(self.layers) for k in ("mu", "sig")}

    def reconstruct(self, A: dict) -> np.ndarray:
        """x_hat of the posterior means (eps = 0) of the sequences whose adaptive vectors are A."""
        A = self.check_adaptive(A)
        B, T = A["l0.mu"].shape[:2]
        return self.run(A, [np.zeros((B, T, x.latents)) for x in self.layers]).x_hat


def _leak(tau: float, step: float, method: str) -> tuple:
    """(alpha, beta) of h <- alpha h + beta pre over ``step``: Euler's 1 - step/tau or the exact
    leak e^{-step/tau}; beta = 1 - alpha."""
    a = 1.0 - step / tau if method == "euler" else math.exp(-step / tau)
    return a, 1.0 - a


def _write_pvrnn(group, model: PVRNN):
    persist.write_config(group, {"layers": [dataclasses.asdict(x) for x in model.layers], "outputs": model.outputs,
                                 "substeps": model.substeps, "method": model.method,
                                 "posterior_weights": model.posterior_weights, "normalisation": model.normalisation})
    persist.write_arrays(group, "params", model.params)


def _read_pvrnn(group) -> PVRNN:
    cfg = persist.read_config(group)
    cfg["layers"] = [PVLayer(**x) for x in cfg["layers"]]
    model = PVRNN(rng=np.random.default_rng(0), **cfg)  # its draws are replaced by the saved weights
    params = persist.read_arrays(group, "params")
    if set(params) != set(model.params):
        raise ValueError(f"params {sorted(params)}; this PV-RNN has {sorted(model.params)}")
    for k, w in model.params.items():
        if params[k].shape != w.shape:
            raise ValueError(f"params/{k} has shape {params[k].shape}, expected {w.shape}")
    model.params = {k: params[k] for k in model.params}  # in the constructor's order
    return model


persist.register(PVRNN, _write_pvrnn, _read_pvrnn)


class DeviceCircuit:
    """A PV-RNN's circuit on a device (``substrate.devices``): ``TauMismatch`` gives every unit its
    own time constant (drawn once; the leak alpha_r from tau_r by the model's integrator; under Euler
    tau_r is clipped at the step, where alpha_r = 0, so that the simulation stays stable), and
    ``ReadNoise`` a fresh read of every weight matrix at every pass (its ``phase`` policy: W + sigma
    |W| xi, or sigma max|W| xi when additive; biases are digital, as in ``substrate.devices``).
    :meth:`read` returns (weights, leaks) for ``run``/``free_energy``/``generate``; the learning rule's
    adjoint keeps the nominal weights and leaks (the host knows only the nominal circuit). Each
    effect draws from its own stream (``devices.stream(seed, name)``)."""

    def __init__(self, model: PVRNN, device, seed: int):
        if not isinstance(model, PVRNN):
            raise SubstrateValueError(f"model must be a PVRNN, got {type(model).__name__}")
        if not isinstance(device, Device):
            raise SubstrateValueError(f"device must be a substrate.devices.Device, got {type(device).__name__}")
        count(seed, "seed", minimum=0, relation=True)
        for e in device.effects:
            if not (isinstance(e, TauMismatch) or (isinstance(e, ReadNoise) and e.policy == "phase")):
                raise SubstrateValueError(f"{e!r}: a PV-RNN circuit supports TauMismatch and ReadNoise(policy='phase')")
        self.model = model
        self.noise = next(iter(device.of(ReadNoise)), None)
        self.rng = stream(seed, "ReadNoise")
        leak = list(model._leak)
        mismatch = next(iter(device.of(TauMismatch)), None)
        if mismatch is not None:
            circuit = SimpleNamespace(tau=np.concatenate([np.full(x.units, x.tau) for x in model.layers]))
            mismatch.neurons(circuit, stream(seed, "TauMismatch"))
            step, leak, off = 1.0 / model.substeps, [], 0
            if model.method == "euler":  # alpha = 1 - step/tau >= 0: below, the simulation (not the circuit) oscillates
                circuit.tau = np.maximum(circuit.tau, step)
            for x in model.layers:
                pairs = [_leak(tau, step, model.method) for tau in circuit.tau[off:off + x.units]]
                leak.append(tuple(np.array(v) for v in zip(*pairs)))
                off += x.units
        self.leak = leak

    def read(self):
        """(weights, leaks) of one pass of the circuit."""
        p = self.model.params
        if self.noise is None:
            return p, self.leak
        out = dict(p)
        for k, w in p.items():
            if ".W" in k:
                scale = self.noise.sigma * (np.abs(w) if self.noise.relative else np.max(np.abs(w)))
                out[k] = w + scale * self.rng.standard_normal(w.shape)
        return out, self.leak


def _check_credit(credit, truncation):
    if not isinstance(credit, str) or credit not in CREDIT:
        raise SubstrateValueError(f"credit={credit!r}; allowed: {CREDIT}")
    if credit == "truncated" and (isinstance(truncation, bool) or not isinstance(truncation, (int, np.integer))
                                  or truncation < 1):
        raise SubstrateValueError(f"truncation={truncation!r}: credit='truncated' needs a positive number of data steps")
    if credit != "truncated" and truncation is not None:
        raise SubstrateValueError(f"truncation={truncation!r} is for credit='truncated' only (credit={credit!r})")


CREDIT = ("exact", "truncated", "continuous")


def train(model: PVRNN, x, *, epochs: int, rng: np.random.Generator, lr: float = 1e-3, A: dict | None = None,
          progress: bool = True, on_epoch=None, compiled: bool = False, checkpoint: str | os.PathLike | None = None,
          checkpoint_every: int = 1000, checkpoint_seconds: float = 300.0):
    """Weights and every sequence's A by Adam on the free energy of sequences x (B, T, D_x), fresh
    noise each epoch (one pass of the whole set per epoch). Returns (A, history) with per-epoch
    arrays "free_energy", "reconstruction" and "kl" (epochs, layers); ``on_epoch(history so far)``
    after every epoch (e.g. to save partial results; views of the history, valid until train returns).

    ``compiled``: the epochs run in ``models._pvrnn_kernels`` (forward, exact adjoint and Adam, a
    chunk of epochs per call), every option of the model included (substeps, exp_euler,
    posterior_weights, w_first); the same equations, Adam and noise draws (the same normals from the
    generator, drawn ahead for each chunk in one call) as the NumPy path (``compiled=False``, the reference), so the weights
    agree to rounding. There ``on_epoch`` runs after each chunk, once for each of its epochs; and
    after a divergence ``rng`` has drawn the rest of its chunk's noise.

    ``checkpoint``: a file (HDF5, ``substrate.persist``'s state tree) that the weights, A, Adam's
    moments and step, the epoch, the state of ``rng`` and the history so far are written to
    atomically every ``checkpoint_every`` epochs or after ``checkpoint_seconds`` seconds, whichever
    comes first (the compiled path looks at the clock between its chunks of epochs), and after the
    last epoch. If it exists when training starts, training resumes from it (the model's weights, A
    and ``rng`` are replaced by the saved ones) and ends bit-identical to a run that was never
    stopped; a larger ``epochs`` continues a finished one. A checkpoint of another training (path,
    lr, data, sizes, or starting weights, A and generator) is refused. The caller removes the file
    when done with it."""
    x = finite_array(x, "x", 3)
    B, T, _ = x.shape
    _count(epochs, "epochs", minimum=0), _generator(rng)
    flag(compiled, "compiled")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise SubstrateValueError(f"checkpoint must be None or a file path, got {type(checkpoint).__name__}")
    _count(checkpoint_every, "checkpoint_every", minimum=1), positive(checkpoint_seconds, "checkpoint_seconds")
    A = model.adaptive_vectors(B, T) if A is None else model.check_adaptive(A, B, T)
    opt = Adam(lr)
    L = len(model.layers)
    hist = {"free_energy": np.empty(epochs), "reconstruction": np.empty(epochs), "kl": np.empty((epochs, L))}
    saver = _Checkpointer(checkpoint, checkpoint_every, checkpoint_seconds, model, A, x, lr, compiled, rng, hist)
    if compiled:
        return _train_compiled(model, x, epochs, rng, opt, A, progress, on_epoch, hist, saver)
    state = {**{f"p:{k}": v for k, v in model.params.items()}, **{f"A:{k}": v for k, v in A.items()}}
    done = saver.resume(state, opt)
    for epoch in tqdm(range(done, epochs), initial=done, total=epochs, desc="PV-RNN", disable=not progress):
        with np.errstate(over="ignore", invalid="ignore"):  # a divergence is reported below, once
            F, parts, gp, gA = model.free_energy(x, A, model.noise(B, T, rng))
            opt.step(model.params, gp)
            opt.step(A, gA)
        if not (math.isfinite(F) and all(np.all(np.isfinite(v)) for d in (model.params, A) for v in d.values())):
            raise _diverged(epoch, epochs, F, opt.lr)
        hist["free_energy"][epoch], hist["reconstruction"][epoch], hist["kl"][epoch] = F, parts["reconstruction"], \
            parts["kl"]
        saver.maybe_save(epoch + 1, epochs, state, opt)
        if on_epoch is not None:
            on_epoch({k: v[:epoch + 1] for k, v in hist.items()})
    return A, hist


class _Checkpointer:
    """:func:`train`'s side of its checkpoint file (nothing without one). The state of the NumPy
    path: the arrays of ``state`` (weights "p:<name>", A "A:<name>") and Adam's (m, v, t) per name;
    of the compiled path: its packed vectors theta, m, v (Adam's step is the epoch)."""

    def __init__(self, path, every, seconds, model, A, x, lr, compiled, rng, hist):
        self.path, self.every, self.seconds, self.rng, self.hist = path, every, seconds, rng, hist
        self.saved_at, self.clock = 0, time.monotonic()
        if path is None:
            return
        # what a checkpoint must have been made by: the same path, lr, data, shapes and start (weights, A,
        # generator)
        start = hashlib.sha256(json.dumps(rng.bit_generator.state, sort_keys=True).encode())
        for d in (model.params, A):
            for k in sorted(d):
                start.update(k.encode() + np.ascontiguousarray(d[k]).tobytes())
        self.key = json.dumps({"compiled": compiled, "lr": float(lr), "x": hashlib.sha256(x.tobytes()).hexdigest(),
                               "x_shape": list(x.shape), "params": {k: list(v.shape) for k, v in model.params.items()},
                               "start": start.hexdigest()}, sort_keys=True)

    def resume(self, state: dict, opt=None) -> int:
        """The epochs done by the checkpoint's training (0 without one); its arrays into ``state``
        (and Adam's moments into ``opt``), its history into ``hist``, its generator state into rng."""
        if self.path is None or not os.path.exists(self.path):
            return 0
        with archive.open_file(os.fspath(self.path)) as f:
            ck = persist.read_state(f["checkpoint"])
        where = f"checkpoint={os.fspath(self.path)!r}"
        if ck["key"] != self.key:
            raise SubstrateValueError(f"{where} was written by another training (path, lr, data, sizes or start "
                                      "differ): delete it to start afresh, or pass another checkpoint path")
        done = ck["epoch"]
        if done > len(self.hist["free_energy"]):
            raise SubstrateValueError(f"{where} holds {done} epochs, more than epochs={len(self.hist['free_energy'])}")
        for k, v in state.items():
            v[...] = ck["state"][k]
        if opt is not None:
            opt.state = ck["adam"]
        for k, v in self.hist.items():
            v[:done] = ck["history"][k]
        self.rng.bit_generator.state = ck["rng"].bit_generator.state
        self.saved_at = done
        return done

    def due(self, done: int) -> int:
        """The epochs the next chunk may run so that it ends where a checkpoint falls due."""
        return self.every - (done - self.saved_at) if self.path is not None else 2 ** 62

    def maybe_save(self, done: int, epochs: int, state: dict, opt=None):
        """Save at ``done`` epochs if ``every`` epochs or ``seconds`` have passed, or at the last."""
        if self.path is None or (done < epochs and done - self.saved_at < self.every
                                 and time.monotonic() - self.clock < self.seconds):
            return
        tree = {"key": self.key, "epoch": done, "rng": self.rng, "state": dict(state),
                "adam": {} if opt is None else dict(opt.state), "history": {k: v[:done] for k, v in self.hist.items()}}
        with archive.create_h5(os.fspath(self.path), "the PV-RNN training checkpoint",
                               "free some space and run again (training resumes from the last checkpoint)") as (f, _):
            persist.write_state(f, "checkpoint", tree)
            archive.seal(f)
        self.saved_at, self.clock = done, time.monotonic()


def _diverged(epoch, epochs, F, lr):
    return DivergenceError(f"PV-RNN training diverged at epoch {epoch + 1} of {epochs} (free energy {F}, "
                           f"weights or A not finite): lower lr={lr!r}")


# the noise of the epochs of one kernel call: at most this many numbers (1 MB), drawn into one buffer that
# every call reuses (a fresh 8 MB array a call cost its page faults)
_CHUNK_NUMBERS = 2 ** 17


def _train_compiled(model, x, epochs, rng, opt, A, progress, on_epoch, hist, saver):
    """:func:`train`'s epochs by ``models._pvrnn_kernels.train``: the weights and A packed into one
    vector (views for the kernels), Adam's moments beside it, unpacked into ``model.params`` and A at
    the end (in place, as the NumPy path updates them)."""
    B, T, D = x.shape
    L, Z = len(model.layers), sum(lay.latents for lay in model.layers)
    net, loss, theta = model.packed(extra=2 * B * T * Z)
    P = theta.size - 2 * B * T * Z
    a_mu, a_sig = theta[P:P + B * T * Z].reshape(B, T, Z), theta[P + B * T * Z:].reshape(B, T, Z)
    zoff = np.cumsum([0] + [lay.latents for lay in model.layers])
    for i in range(L):
        a_mu[..., zoff[i]:zoff[i + 1]], a_sig[..., zoff[i]:zoff[i + 1]] = A[f"l{i}.mu"], A[f"l{i}.sig"]
    grad, m, v = np.zeros_like(theta), np.zeros_like(theta), np.zeros_like(theta)
    g_mu, g_sig = grad[P:P + B * T * Z].reshape(B, T, Z), grad[P + B * T * Z:].reshape(B, T, Z)
    work = K.batch_work(B, T, D, net)  # written before read (tests/test_pvrnn.py fills them with NaN)
    args = (opt.lr, opt.beta1, opt.beta2, opt.eps)
    chunk = max(1, min(epochs, _CHUNK_NUMBERS // max(1, B * T * Z)))
    noise = np.empty((chunk, B * T * Z))
    state = {"theta": theta, "m": m, "v": v}
    done = saver.resume(state)
    F, R, KL = hist["free_energy"], hist["reconstruction"], hist["kl"]
    with tqdm(initial=done, total=epochs, desc="PV-RNN", disable=not progress) as bar:
        while done < epochs:
            k = min(chunk, epochs - done, saver.due(done))
            # the k epochs' model.noise draws in one call, in its order (epoch by epoch, layer by layer, C
            # order; the kernels read them so): the generator's stream is the same in one call or in several
            eps = rng.standard_normal(out=noise[:k])
            ok = K.train(x, theta, grad, m, v, done, *args, a_mu, a_sig, g_mu, g_sig, eps, loss, net,
                         tuple(model.trainable_views(grad)), work, (F[done:done + k], R[done:done + k],
                                                                    KL[done:done + k]))
            if ok == k:  # a diverged chunk is not saved: it raises below
                saver.maybe_save(done + k, epochs, state)
            for e in range(done, done + ok):
                if on_epoch is not None:
                    on_epoch({key: val[:e + 1] for key, val in hist.items()})
            bar.update(ok)
            if ok < k:
                _unpack(model, net, A, a_mu, a_sig, zoff)
                raise _diverged(done + ok, epochs, float(F[done + ok]), opt.lr)
            done += k
    _unpack(model, net, A, a_mu, a_sig, zoff)
    return A, hist


def _unpack(model, net, A, a_mu, a_sig, zoff):
    """The packed weights and A back into ``model.params`` and A, in place."""
    for name, array, index in model._blocks(net):
        model.params[name][...] = array[index]
    for i in range(len(model.layers)):
        A[f"l{i}.mu"][...], A[f"l{i}.sig"][...] = a_mu[..., zoff[i]:zoff[i + 1]], a_sig[..., zoff[i]:zoff[i + 1]]


# ------------------------------------------------------------------------------------ error regression
@dataclass(frozen=True)
class ErrorRegression:
    """Online inference of the latents from prediction errors (docs/equations.md, section 5): at every new
    step a window of the last ``window`` observations; ``iterations`` Adam steps (rate ``lr``, state
    reset each step) on the window's A only, each from the frozen window-start state with fresh noise;
    then a prediction ``horizon`` steps beyond the window from the prior. ``newest``: the new step's A
    when the window slides ("copy" the previous newest, "prior": zeros of mu and log sigma, i.e. the
    first-step prior N(0, I), or "zeros"); ``meta_prior``: w per layer during ER (None: the
    training values); ``sample``: predict by sampling the prior (else its means); ``draws``: the
    window's F before and after the iterations (a trace) is averaged over the first ``draws`` of the
    iterations' noise draws (1: one draw, a noisy estimate); ``credit``/``truncation``: how the
    gradient is assigned (:meth:`PVRNN.free_energy`: "exact", "truncated", "continuous")."""

    window: int = 10
    iterations: int = 50
    lr: float = 0.1
    newest: str = "copy"
    meta_prior: tuple | None = None
    horizon: int = 1
    sample: bool = True
    draws: int = 1
    credit: str = "exact"
    truncation: int | None = None

    def __post_init__(self):
        for name in ("window", "iterations", "horizon", "draws"):
            count(getattr(self, name), f"ErrorRegression.{name}")
        flag(self.sample, "ErrorRegression.sample")
        choice(self.newest, "ErrorRegression.newest", ("copy", "prior", "zeros"))
        positive(self.lr, "ErrorRegression.lr")
        if self.meta_prior is not None and not (
                isinstance(self.meta_prior, (tuple, list))
                and all(v is not None and 0 <= v < math.inf for v in map(as_real, self.meta_prior))):
            raise SubstrateValueError(f"ErrorRegression.meta_prior={self.meta_prior!r} must be a tuple of finite "
                                      "numbers >= 0 (one per layer)")
        if self.draws > self.iterations:
            raise SubstrateValueError(f"ErrorRegression.draws={self.draws} must be <= iterations={self.iterations}")
        _check_credit(self.credit, self.truncation)


def slide(A: dict, window: int, newest: str, prior: dict | None = None) -> dict:
    """The window's A for the next step: shifted by one when the window is full (its oldest step
    dropped, so that A stays with its data step), then a newest step appended: a copy of the previous
    newest ("copy"), the A whose posterior is the new step's prior ("prior": ``prior`` from
    :meth:`PVRNN.prior_adaptive`, (1, Z) each; without it, as at a sequence's first step, zeros:
    N(0, I)), or zeros ("zeros")."""
    if A["l0.mu"].shape[1] == window:
        A = {k: v[:, 1:] for k, v in A.items()}

    def new(k, v):
        if newest == "copy" and v.shape[1]:
            return v[:, -1:]
        if newest == "prior" and prior is not None:
            return prior[k][:, None]
        return np.zeros((1, 1, v.shape[2]))

    return {k: np.concatenate([v, new(k, v)], axis=1) for k, v in A.items()}


def error_regression(model: PVRNN, x, er: ErrorRegression, rng: np.random.Generator, compiled: bool = True,
                     circuit: DeviceCircuit | None = None) -> dict:
    """Run ``er`` over one sequence x (T, D_x). Returns per-step traces (index t: after observing
    x_0..x_t): "prediction" (T, horizon, D_x) made at t for x_{t+1..t+horizon} (NaN beyond the data),
    "prediction_error" (T,) the squared error of the one-step prediction (NaN at the last step),
    "free_energy_before"/"free_energy_after" (T,) the window's F before and after the iterations with
    the same noise (``er.draws`` draws), "kl" (T, layers) of the last iteration, "sigma_q" (T, layers)
    the mean posterior sigma at the window's newest step, "mu_q.l{i}" (T, Z) its posterior means (both
    of the final posterior-mean pass). ``circuit``: the network runs on a device (every pass,
    prediction included, reads it; the same reads before and after for the F traces). ``compiled``:
    the iterations run in ``models._pvrnn_kernels`` (same equations and noise draws as the NumPy
    path, ``compiled=False``, which is the reference) when the credit is exact and there is no device."""
    x = finite_array(x, "x", 2)
    if x.shape[1] != model.outputs or not len(x):
        raise SubstrateValueError(f"x has shape {x.shape}; expected (steps, {model.outputs})")
    if not isinstance(er, ErrorRegression):
        raise SubstrateValueError(f"er must be an ErrorRegression, got {type(er).__name__}")
    if circuit is not None and not (isinstance(circuit, DeviceCircuit) and circuit.model is model):
        raise SubstrateValueError("circuit must be a DeviceCircuit of this model, or None")
    _generator(rng)
    T, L = len(x), len(model.layers)
    if er.meta_prior is not None and len(er.meta_prior) != L:
        raise SubstrateValueError(f"ErrorRegression.meta_prior has {len(er.meta_prior)} values; the model has {L} layers")
    A = {k: v[:, :0] for k, v in model.adaptive_vectors(1, 0).items()}
    start = model.initial_state(1)
    out = {"prediction": np.full((T, er.horizon, model.outputs), np.nan), "prediction_error": np.full(T, np.nan),
           "free_energy_before": np.empty(T), "free_energy_after": np.empty(T), "kl": np.empty((T, L)),
           "sigma_q": np.empty((T, L))}
    out.update({f"mu_q.l{i}": np.empty((T, x_.latents)) for i, x_ in enumerate(model.layers)})
    if compiled and er.credit == "exact" and circuit is None:
        window_step, read = _CompiledWindow(model, er.meta_prior), model.nominal
    else:
        window_step, read = _window_step, (circuit.read if circuit is not None else model.nominal)
    step = None  # the last window step's results
    for t in range(T):
        if A["l0.mu"].shape[1] == er.window:  # slide: the state after the first step of the last pass
            start = step["after_first"]
        A = slide(A, er.window, er.newest,
                  model.prior_adaptive(step["end"], read()) if t > 0 and er.newest == "prior" else None)
        n = A["l0.mu"].shape[1]
        eps = [rng.standard_normal((er.iterations, n, x_.latents)) for x_ in model.layers]  # fresh per iteration
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # a divergence is reported here, once
                step = window_step(model, x[None, t - n + 1:t + 1], A, eps, start, er, read)
            if not math.isfinite(step["free_energy_after"]):
                raise DivergenceError(f"window free energy {step['free_energy_after']}")
        except DivergenceError as e:
            raise DivergenceError(f"error regression diverged at step t={t} ({e}): lower "
                                  f"ErrorRegression.lr={er.lr!r}") from None
        A = step["A"]
        for k in ("free_energy_before", "free_energy_after", "kl"):
            out[k][t] = step[k]
        out["sigma_q"][t] = [float(s.mean()) for s in step["sigma_q"]]
        for i in range(L):
            out[f"mu_q.l{i}"][t] = step["mu_q"][i][0]
        pred = model.generate(1, er.horizon, rng if er.sample else None, start=step["end"], read=read())[0]
        k = min(er.horizon, T - 1 - t)
        out["prediction"][t, :k] = pred[:k]
        if t + 1 < T:
            out["prediction_error"][t] = float(np.sum((pred[0] - x[t + 1]) ** 2))
    return out


def window_counts(model: PVRNN, er: ErrorRegression, steps: int) -> Counts:
    """What one step of error regression over a window of ``steps`` data steps does on the hardware (a
    :class:`substrate.Counts`, docs/equations.md, section 9), counted from the model's shapes and
    ``er``'s fixed schedule: ``er.iterations`` passes with their backward, 2 ``er.draws`` passes for
    the free energy before and after, the posterior-mean pass and the ``er.horizon`` predicted steps.
    A pass runs the weights on the circuit: per data step ``substeps`` x (W_dd, W_zd, W_td) and once
    (W_mu, W_sig, the posterior's weights if any, the output), for one data step of circuit time; the
    latents z go in through DACs, x_hat out through ADCs. The backward pass is digital: a multiply-add
    per weight product (the gradient of A only, the weights frozen) and Adam on the window's A (14
    FLOPs an entry, its two moments held). Memory, by ``er.credit``: the window's states after every
    substep ("exact", "continuous"), or those of one chunk of ``truncation`` data steps
    ("truncated"), plus A and Adam's moments."""
    _count(steps, "steps", minimum=1)
    if not isinstance(er, ErrorRegression):
        raise SubstrateValueError(f"er must be an ErrorRegression, got {type(er).__name__}")
    p, m, L = model.params, model.substeps, len(model.layers)
    per_substep = sum(p[f"l{i}.{k}"].size for i in range(L) for k in ("W_dd", "W_zd", "W_td") if f"l{i}.{k}" in p)
    per_step = p["out.W"].size + sum(p[f"l{i}.{k}"].size for i in range(L)
                                     for k in ("W_mu", "W_sig", "Wq_mu", "Wq_sig") if f"l{i}.{k}" in p)
    N, Z, D = (sum(x.units for x in model.layers), sum(x.latents for x in model.layers), model.outputs)
    passes = er.iterations + 2 * er.draws + 1
    data_steps = passes * steps + er.horizon
    kept = steps if er.credit != "truncated" else min(er.truncation, steps)
    a = 2 * steps * Z  # A: mu and sigma of every latent at every step of the window
    held = kept * (m * N + 6 * Z + D) + 3 * a
    return Counts(samples=1, phases=passes + 1, steps=data_steps * m, nfev=data_steps * m,
                  settle_time=float(data_steps), macs=data_steps * (m * per_substep + per_step),
                  dac=data_steps * Z, adc=data_steps * D,
                  flops=er.iterations * (2 * steps * (m * per_substep + per_step) + 14 * a),
                  memory=held, traffic=er.iterations * 2 * held)


def horizon_errors(out: dict, x, start: int) -> np.ndarray:
    """The prediction error of error regression k = 1..horizon steps ahead, (horizon,): from ``out`` of
    :func:`error_regression` over x (T, D_x), the mean over the steps t >= ``start`` (e.g. the window
    full) for which x_{t+k} exists of ||prediction made at t for x_{t+k} - x_{t+k}||^2 (NaN where no
    step has it); k = 1 is the mean of ``out["prediction_error"][start:-1]``."""
    pred = out["prediction"]
    T, H, _ = pred.shape
    x = finite_array(x, "x", 2, (T, pred.shape[2]))
    _count(start, "start", minimum=0)
    errors = np.full(H, np.nan)
    for k in range(1, min(H, T - 1 - start) + 1):
        errors[k - 1] = float(np.mean(np.sum((pred[start:T - k, k - 1] - x[start + k:]) ** 2, axis=-1)))
    return errors


def _window_step(model, xw, A, eps, start, er, read):
    """The iterations of one ER step on window xw (1, n, D) with the NumPy free energy: {"A" after
    them, "free_energy_before"/"_after", "kl" of the last iteration, "after_first" state of the last
    pass, "end" state and "mu_q", "sigma_q" (per layer, newest step) of the posterior-mean pass}."""
    n, L = xw.shape[1], len(model.layers)
    reads = [read() for _ in range(er.draws)]

    def window_F():
        return np.mean([model.free_energy(xw, A, [e[k][None] for e in eps], gradient=False, start=start,
                                          meta_prior=er.meta_prior, read=c)[0] for k, c in enumerate(reads)])

    out = {"free_energy_before": window_F()}
    opt = Adam(er.lr)
    for itr in range(er.iterations):
        _, parts, _, gA = model.free_energy(xw, A, [e[itr][None] for e in eps], start=start,
                                            meta_prior=er.meta_prior, weights=False, credit=er.credit,
                                            truncation=er.truncation, read=read())
        opt.step(A, gA)
        if not all(np.all(np.isfinite(v)) for v in A.values()):
            raise DivergenceError(f"A not finite after iteration {itr + 1}")
    means = model.run(A, [np.zeros((1, n, x_.latents)) for x_ in model.layers], start, read())
    out.update(A=A, free_energy_after=window_F(), kl=parts["kl"], after_first=parts["pass"].after_first,
               end=means.end, mu_q=[means.mu_q[i][:, -1] for i in range(L)],
               sigma_q=[np.exp(means.logs_q[i][:, -1]) for i in range(L)])
    return out


class _CompiledWindow:
    """:func:`_window_step` by the kernels of ``models._pvrnn_kernels`` (one sequence, exact credit,
    nominal circuit): A and the states in the kernels' layout (one vector of units, one of latents)."""

    def __init__(self, model, meta_prior):
        self.net, self.loss, _ = model.packed(meta_prior)
        self.uoff, self.zoff = self.net[0], self.net[1]

    def split(self, v, off):
        return [v[None, off[i]:off[i + 1]].copy() for i in range(len(off) - 1)]

    def __call__(self, model, xw, A, eps, start, er, read):
        L, n, m = len(model.layers), xw.shape[1], model.substeps
        N, Z, zoff = int(self.uoff[-1]), int(self.zoff[-1]), self.zoff
        a_mu = np.concatenate([A[f"l{i}.mu"][0] for i in range(L)], axis=1)
        a_sig = np.concatenate([A[f"l{i}.sig"][0] for i in range(L)], axis=1)
        e = np.concatenate(eps, axis=2)
        h0, d0 = np.concatenate([a[0] for a in start.h]), np.concatenate([a[0] for a in start.d])
        # written by the kernels before read, as in _train_compiled
        window = (np.empty((n * m + 1, N)), *(np.empty((n, Z)) for _ in range(5)), np.empty((n, model.outputs)),
                  np.empty(N), np.empty(N))
        kl = np.empty(L)
        args = (h0, d0, start.first, self.loss, self.net, window, kl)

        def window_F():
            return np.mean([K.forward(xw[0], a_mu, a_sig, e[k], *args) + kl.sum() for k in range(er.draws)])

        out = {"free_energy_before": window_F()}
        K.regress(xw[0], a_mu, a_sig, e, h0, d0, start.first, self.loss, self.net, window, er.lr, kl)
        out.update(kl=kl.copy(), after_first=State(self.split(window[7], self.uoff), self.split(window[0][m], self.uoff),
                                                   False))
        out["free_energy_after"] = window_F()
        K.forward(xw[0], a_mu, a_sig, np.zeros_like(e[0]), *args)  # posterior means to the window end
        out.update(end=State(self.split(window[8], self.uoff), self.split(window[0][-1], self.uoff), False),
                   mu_q=self.split(window[2][-1], zoff), sigma_q=self.split(window[3][-1], zoff),
                   A={f"l{i}.{k}": v[None, :, zoff[i]:zoff[i + 1]] for i in range(L)
                      for k, v in (("mu", a_mu), ("sig", a_sig))})
        return out


# ------------------------------------------------------------------------------------ argument checks
_MAX_ELEMENTS = 2 ** 31  # 16 GiB of float64: beyond it an allocation is refused up front, not attempted


# the upper bound of a loop count: what numpy's and tqdm's C integers hold (a loop that long would never end)
_count = partial(count, maximum=2 ** 31 - 1, allowed="an integer in [{minimum}, 2**31)")


def _fits(what, elements):
    if elements > _MAX_ELEMENTS:
        raise SubstrateValueError(f"{what} would hold {elements:.3g} numbers, more than {_MAX_ELEMENTS:.3g} "
                                  "(16 GiB): lower sequences or steps")


def _generator(rng):
    if not isinstance(rng, np.random.Generator):
        raise SubstrateValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
