"""Compiled PV-RNN: the error-regression step (batch 1, gradient with respect to A only) and
training (epochs of Adam on the weights and every sequence's A).

The same equations as :meth:`models.pvrnn.PVRNN.run` and ``_backward`` (docstring of
``models/pvrnn.py``), written as scalar loops over one sequence so that an ER step (window ~10, ~50
iterations of forward, backward and Adam) costs microseconds instead of NumPy's per-call overhead,
and an epoch of training runs without Python per step; checked against the NumPy path in
tests/test_pvrnn.py. tanh and exp are the engine's polynomial forms (no scalar libm call).

Layout: the layers' units are one vector of N (layer i is ``uoff[i]:uoff[i+1]``, bottom first) and
their latents one vector of Z (``zoff``). ``net`` = (uoff, zoff, W_rec (N, N), W_zd (N, Z), b, alpha,
beta (N,), W_mu, W_sig (Z, N), b_mu, b_sig (Z,), W_out (D, N_0), b_out (D,), substeps, Wq_mu, Wq_sig
(Z, N) with posterior weights, else (0, N)): W_rec holds
W_dd on its diagonal blocks and W_td in the block (layer i, layer i+1), so that layer i's rows read
the contiguous columns ``uoff[i]:uoff[i+2]``: its own units of the previous substep and the layer
above's of this one (top-down order); W_zd, W_mu and W_sig are block diagonal and read only their
layer's block (W_q too). ``alpha``/``beta`` are the leak per unit (h <- alpha h + beta pre).

``window`` = (ds (T n + 1, N): d at the start and after every substep, z, mu_q, s_q, mu_p, logs_p
(T, Z), x_hat (T, D), h_first (N,): h after the first data step, h_end (N,)), filled by the forward.

``loss`` = (rec_scale, weight, weight_first): F = rec_scale sum_t 0.5 ||x_t - x_hat_t||^2 +
sum_t sum_j c_j(t) KL_{t,j}, c_j = ``weight_first[j]`` at a sequence's first step, else ``weight[j]``
(w_l / Z_l per latent): every normalisation is in these numbers, computed in Python.

``grads``: the gradients of the trainable arrays of ``net``, in the order of :data:`TRAINABLE`
(empty arrays: no weight gradient, as in error regression).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from numba import njit as _njit

from substrate._kernels import _exp_f64

# the arrays of ``net`` that training changes, by their index in ``net``
TRAINABLE = (2, 3, 4, 7, 8, 9, 10, 11, 12, 14, 15)

njit = partial(_njit, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})


@njit(inline="always")
def _tanh(x):
    """tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) by the engine's vectorisable exp:
    within ~2e-16 of libm's tanh in absolute terms (libm's is a scalar call, ~20 ns, the forward
    pass's largest cost)."""
    e = _exp_f64(-2.0 * abs(x))
    t = (1.0 - e) / (1.0 + e)
    return t if x >= 0.0 else -t


@njit
def forward(x, a_mu, a_sig, eps, h0, d0, first, loss, net, window, kl):
    """The posterior pass over the window from (h0, d0); returns the reconstruction term
    rec_scale sum_t 0.5 ||x_t - x_hat_t||^2 and writes sum_t c(t) KL_t per layer into ``kl``
    (``loss``; the first step of a sequence when ``first``)."""
    rec_scale, weight, weight_first = loss
    uoff, zoff, w_rec, w_zd, b, alpha, beta, w_mu, w_sig, b_mu, b_sig, w_out, b_out, n, wq_mu, wq_sig = net
    posterior_weights = wq_mu.shape[0] > 0
    ds, z, mu_q, s_q, mu_p, logs_p, x_hat, h_first, h_end = window
    T, D = x.shape
    L = len(uoff) - 1
    h = h_end
    h[:] = h0
    ds[0] = d0
    kl[:] = 0.0
    rec = 0.0
    for t in range(T):
        prev = ds[t * n]
        for i in range(L):
            lo, hi = uoff[i], uoff[i + 1]
            for j in range(zoff[i], zoff[i + 1]):
                if t == 0 and first:
                    m, ls = 0.0, 0.0
                else:
                    a, ls = b_mu[j], b_sig[j]
                    for c in range(lo, hi):
                        a += w_mu[j, c] * prev[c]
                        ls += w_sig[j, c] * prev[c]
                    m = _tanh(a)
                am, lq = a_mu[t, j], a_sig[t, j]
                if posterior_weights:
                    for c in range(lo, hi):
                        am += wq_mu[j, c] * prev[c]
                        lq += wq_sig[j, c] * prev[c]
                mq, sq = _tanh(am), _exp_f64(lq)
                mu_p[t, j], logs_p[t, j], mu_q[t, j], s_q[t, j] = m, ls, mq, sq
                z[t, j] = mq + sq * eps[t, j]
                c_t = weight_first[j] if t == 0 and first else weight[j]
                diff = m - mq
                kl[i] += c_t * (ls - lq + (diff * diff + sq * sq) / (2.0 * _exp_f64(2.0 * ls)) - 0.5)
        for k in range(n):
            s = t * n + k
            old, new = ds[s], ds[s + 1]
            for i in range(L - 1, -1, -1):  # top-down: layer i reads layer i+1's new d
                lo, mid = uoff[i], uoff[i + 1]
                top = uoff[min(i + 2, L)]
                for r in range(lo, mid):
                    pre = b[r]
                    for c in range(lo, mid):
                        pre += w_rec[r, c] * old[c]
                    for c in range(mid, top):
                        pre += w_rec[r, c] * new[c]
                    for j in range(zoff[i], zoff[i + 1]):
                        pre += w_zd[r, j] * z[t, j]
                    h[r] = alpha[r] * h[r] + beta[r] * pre
                for r in range(lo, mid):  # a loop of its own, so that it vectorises
                    new[r] = _tanh(h[r])
        if t == 0:
            h_first[:] = h
        d_out = ds[(t + 1) * n]
        for o in range(D):
            a = b_out[o]
            for c in range(w_out.shape[1]):
                a += w_out[o, c] * d_out[c]
            y = _tanh(a)
            x_hat[t, o] = y
            rec += 0.5 * (y - x[t, o]) ** 2
    return rec * rec_scale


@njit
def backward(x, eps, first, loss, net, window, g_mu, g_sig, gd, gh, gd_before, gz, grads):
    """dF/dA^mu and dF/dA^sig of the last ``forward`` (its ``window``), the exact discrete adjoint,
    and (non-empty ``grads``) dF/dweights added into ``grads``; gd, gh, gd_before (N,), gz (Z,) are
    work arrays. No gradient flows into the start state (frozen, or a sequence's zeros)."""
    rec_scale, weight, weight_first = loss
    uoff, zoff, w_rec, w_zd, b, alpha, beta, w_mu, w_sig, b_mu, b_sig, w_out, b_out, n, wq_mu, wq_sig = net
    gw_rec, gw_zd, gb, gw_mu, gw_sig, gb_mu, gb_sig, gw_out, gb_out, gwq_mu, gwq_sig = grads
    weights = gw_rec.shape[0] > 0
    posterior_weights = wq_mu.shape[0] > 0
    ds, z, mu_q, s_q, mu_p, logs_p, x_hat, h_first, h_end = window
    T, D = x.shape
    L = len(uoff) - 1
    gd[:] = 0.0
    gh[:] = 0.0
    for t in range(T - 1, -1, -1):
        d_out = ds[(t + 1) * n]
        for o in range(D):
            y = x_hat[t, o]
            g_out = (y - x[t, o]) * rec_scale * (1.0 - y * y)
            for c in range(w_out.shape[1]):
                gd[c] += g_out * w_out[o, c]
            if weights:
                gb_out[o] += g_out
                for c in range(w_out.shape[1]):
                    gw_out[o, c] += g_out * d_out[c]
        gz[:] = 0.0
        for k in range(n - 1, -1, -1):
            old, new = ds[t * n + k], ds[t * n + k + 1]
            gd_before[:] = 0.0
            for i in range(L):  # bottom first: layer i's pre fed on layer i+1's new d
                lo, mid = uoff[i], uoff[i + 1]
                top = uoff[min(i + 2, L)]
                for r in range(lo, mid):
                    g_h = gh[r] + gd[r] * (1.0 - new[r] * new[r])
                    g_pre = beta[r] * g_h
                    gh[r] = alpha[r] * g_h
                    for c in range(lo, mid):
                        gd_before[c] += g_pre * w_rec[r, c]
                    for c in range(mid, top):
                        gd[c] += g_pre * w_rec[r, c]
                    for j in range(zoff[i], zoff[i + 1]):
                        gz[j] += g_pre * w_zd[r, j]
                    if weights:
                        gb[r] += g_pre
                        for c in range(lo, mid):
                            gw_rec[r, c] += g_pre * old[c]
                        for c in range(mid, top):
                            gw_rec[r, c] += g_pre * new[c]
                        for j in range(zoff[i], zoff[i + 1]):
                            gw_zd[r, j] += g_pre * z[t, j]
            gd[:] = gd_before
        # gd is dF/dd at the end of step t-1, where step t's prior and posterior read it
        prev = ds[t * n]
        prior = not (t == 0 and first)  # else N(0, I), no weights
        for i in range(L):
            for j in range(zoff[i], zoff[i + 1]):
                c_t = weight[j] if prior else weight_first[j]
                m, mq, sq = mu_p[t, j], mu_q[t, j], s_q[t, j]
                sp2 = _exp_f64(2.0 * logs_p[t, j])
                diff = m - mq
                g_mu[t, j] = (gz[j] - c_t * diff / sp2) * (1.0 - mq * mq)
                g_sig[t, j] = gz[j] * sq * eps[t, j] + c_t * (sq * sq / sp2 - 1.0)
                g_pre_mu = c_t * diff / sp2 * (1.0 - m * m)
                g_logs_p = c_t * (1.0 - (diff * diff + sq * sq) / sp2)
                if weights and prior:
                    gb_mu[j] += g_pre_mu
                    gb_sig[j] += g_logs_p
                    for c in range(uoff[i], uoff[i + 1]):
                        gw_mu[j, c] += g_pre_mu * prev[c]
                        gw_sig[j, c] += g_logs_p * prev[c]
                if weights and posterior_weights:
                    for c in range(uoff[i], uoff[i + 1]):
                        gwq_mu[j, c] += g_mu[t, j] * prev[c]
                        gwq_sig[j, c] += g_sig[t, j] * prev[c]
                if t > 0:  # the start state is frozen: no gradient beyond it is needed
                    for c in range(uoff[i], uoff[i + 1]):
                        gd[c] += g_pre_mu * w_mu[j, c] + g_logs_p * w_sig[j, c]
                    if posterior_weights:
                        for c in range(uoff[i], uoff[i + 1]):
                            gd[c] += g_mu[t, j] * wq_mu[j, c] + g_sig[t, j] * wq_sig[j, c]


@njit
def adam(p, g, m, v, step, lr, beta1, beta2, eps):
    """One Adam step in place on contiguous arrays of any shape (``models.train.Adam``'s
    arithmetic); ``step`` counts from 1."""
    p, g, m, v = p.reshape(p.size), g.reshape(g.size), m.reshape(m.size), v.reshape(v.size)
    c1, c2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    for k in range(p.size):
        m[k] = beta1 * m[k] + (1.0 - beta1) * g[k]
        v[k] = beta2 * v[k] + (1.0 - beta2) * g[k] * g[k]
        p[k] -= lr * (m[k] / c1) / (np.sqrt(v[k] / c2) + eps)


@njit
def regress(x, a_mu, a_sig, eps, h0, d0, first, loss, net, window, lr, kl):
    """The iterations of one ER step: for every noise draw eps[k] (iterations, T, Z) a forward pass,
    the adjoint and an Adam step (state fresh) on A in place.
    ``kl`` (L,) holds the last iteration's KL terms; ``window`` its pass (h_first: the state after its
    first step)."""
    N, Z = len(h0), a_mu.shape[1]
    g_mu, g_sig = np.empty_like(a_mu), np.empty_like(a_sig)
    m_mu, v_mu, m_sig, v_sig = np.zeros_like(a_mu), np.zeros_like(a_mu), np.zeros_like(a_mu), np.zeros_like(a_mu)
    gd, gh, gd_before, gz = np.empty(N), np.empty(N), np.empty(N), np.empty(Z)
    e2, e1 = np.empty((0, 0)), np.empty(0)
    none = (e2, e2, e1, e2, e2, e1, e1, e2, e1, e2, e2)  # no weight gradient
    for k in range(eps.shape[0]):
        forward(x, a_mu, a_sig, eps[k], h0, d0, first, loss, net, window, kl)
        backward(x, eps[k], first, loss, net, window, g_mu, g_sig, gd, gh, gd_before, gz, none)
        adam(a_mu, g_mu, m_mu, v_mu, k + 1, lr, 0.9, 0.999, 1e-8)
        adam(a_sig, g_sig, m_sig, v_sig, k + 1, lr, 0.9, 0.999, 1e-8)


@njit
def train(x, theta, grad, m, v, step, lr, beta1, beta2, adam_eps, a_mu, a_sig, g_mu, g_sig, eps, loss, net, grads,
          window, history):
    """``eps.shape[0]`` epochs of training on sequences x (B, T, D), each: for every sequence the
    posterior pass from a sequence's start with its noise eps[e, b] (T, Z), the adjoint, then one Adam
    step (number ``step`` + e + 1) on ``theta``, the vector every trainable array of ``net`` and A
    (a_mu, a_sig (B, T, Z)) are views of (``grad``: the same for ``grads``, g_mu, g_sig; m, v: Adam's
    moments). ``history`` = (F (K,), reconstruction (K,), kl (K, L)) per epoch. Returns the number
    of epochs after which F, the weights and A were all finite (K unless training diverged; it
    stops at the first that is not)."""
    B = x.shape[0]
    N, Z, L = len(net[4]), a_mu.shape[2], len(net[0]) - 1
    h0, d0 = np.zeros(N), np.zeros(N)
    gd, gh, gd_before, gz = np.empty(N), np.empty(N), np.empty(N), np.empty(Z)
    kl = np.empty(L)
    free_energy, reconstruction, kls = history
    for e in range(eps.shape[0]):
        grad[:] = 0.0
        rec = 0.0
        kls[e] = 0.0
        for b in range(B):
            rec += forward(x[b], a_mu[b], a_sig[b], eps[e, b], h0, d0, True, loss, net, window, kl)
            kls[e] += kl
            backward(x[b], eps[e, b], True, loss, net, window, g_mu[b], g_sig[b], gd, gh, gd_before, gz, grads)
        reconstruction[e] = rec
        free_energy[e] = rec + kls[e].sum()
        adam(theta, grad, m, v, step + e + 1, lr, beta1, beta2, adam_eps)
        nan = free_energy[e] * 0.0  # NaN if anything is not finite (0 * inf is NaN)
        for k in range(theta.size):
            nan += theta[k] * 0.0
        if nan != 0.0:
            return e
    return eps.shape[0]
