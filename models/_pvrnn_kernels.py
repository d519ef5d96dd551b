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
_U1, _U2, _U3, _U4 = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4)  # unsigned index arithmetic

# reassoc: sums vectorise. Not "contract": Numba links a copy of every kernel a kernel calls into the
# caller's machine code, and a process runs whichever copy it loaded first (regress's own copy of
# forward when regress comes first from the cache); contraction into fused multiply-adds differs between
# such copies, so results were 1 ulp apart by the order a process loaded the kernels in
# (tests/test_pvrnn.py::test_compiled_kernels_give_the_same_bits_whatever_was_loaded_first).
njit = partial(_njit, cache=True, error_model="numpy", fastmath={"reassoc"})


@njit(inline="always")
def _tanh(x):
    """tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) by the engine's vectorisable exp:
    within ~2e-16 of libm's tanh in absolute terms (libm's is a scalar call, ~20 ns, the forward
    pass's largest cost)."""
    e = _exp_f64(-2.0 * abs(x))
    t = (1.0 - e) / (1.0 + e)
    return t if x >= 0.0 else -t


@njit(inline="always")
def _matvec(w, v, r0, r1, c0, c1, out):
    """out[r] += sum_{c0 <= c < c1} w[r, c] v[c] for r0 <= r < r1 (unsigned bounds), four rows at a
    time: four independent sums sharing the loads of v (a short row's sum is otherwise one chain of
    dependent additions; measured 1.4x faster on the 30 x 45 and 15 x 15 blocks of the benchmark)."""
    r = r0
    while r + _U4 <= r1:
        a0, a1, a2, a3 = 0.0, 0.0, 0.0, 0.0
        for c in range(c0, c1):
            vc = v[c]
            a0 += w[r, c] * vc
            a1 += w[r + _U1, c] * vc
            a2 += w[r + _U2, c] * vc
            a3 += w[r + _U3, c] * vc
        out[r] += a0
        out[r + _U1] += a1
        out[r + _U2] += a2
        out[r + _U3] += a3
        r += _U4
    while r < r1:
        a = 0.0
        for c in range(c0, c1):
            a += w[r, c] * v[c]
        out[r] += a
        r += _U1


@njit(inline="always")
def _flat(a):
    """A view of a contiguous array as a vector."""
    return a.reshape(a.size)


@njit
def _sigma2(logs):
    """exp(2 log sigma) elementwise, in a loop of its own, so that it vectorises."""
    out = np.empty_like(logs)
    o, v = _flat(out), _flat(logs)
    for k in range(v.size):
        o[k] = _exp_f64(2.0 * v[k])
    return out


@njit(inline="always")
def _posterior(am, lq, e):
    """(mu^q, sigma^q, z) from the posterior's pre-activations and the noise."""
    mq, sq = _tanh(am), _exp_f64(lq)
    return mq, sq, mq + sq * e


@njit
def forward(x, a_mu, a_sig, eps, h0, d0, first, loss, net, window, kl):
    """The posterior pass over the window from (h0, d0); returns the reconstruction term
    rec_scale sum_t 0.5 ||x_t - x_hat_t||^2 and writes sum_t c(t) KL_t per layer into ``kl``
    (``loss``; the first step of a sequence when ``first``). Only the units are stepped in order:
    the posterior (without posterior weights), the prior's and the output's nonlinearities and the
    loss, which do not feed the units, are loops over all steps at once, so that they vectorise."""
    rec_scale, weight, weight_first = loss
    uoff, zoff, w_rec, w_zd, b, alpha, beta, w_mu, w_sig, b_mu, b_sig, w_out, b_out, n, wq_mu, wq_sig = net
    posterior_weights = wq_mu.shape[0] > 0
    ds, z, mu_q, s_q, mu_p, logs_p, x_hat, h_first, h_end = window
    T, D = x.shape
    L, Z = len(uoff) - 1, z.shape[1]
    lq = np.empty((T, Z))  # log sigma^q
    drive, pre = np.empty(len(b)), np.empty(len(b))
    if not posterior_weights:
        lq[:] = a_sig
        mq_, sq_, z_, am_, lq_, e_ = _flat(mu_q), _flat(s_q), _flat(z), _flat(a_mu), _flat(lq), _flat(eps)
        for k in range(T * Z):
            mq_[k], sq_[k], z_[k] = _posterior(am_[k], lq_[k], e_[k])
    h = h_end
    h[:] = h0
    ds[0] = d0
    for t in range(T):
        prev = ds[t * n]
        for i in range(L):
            lo, hi = uoff[i], uoff[i + 1]
            for j in range(zoff[i], zoff[i + 1]):
                a, ls = 0.0, 0.0  # the prior N(0, I) at a sequence's first step
                if not (t == 0 and first):
                    a, ls = b_mu[j], b_sig[j]
                    for c in range(lo, hi):
                        a += w_mu[j, c] * prev[c]
                        ls += w_sig[j, c] * prev[c]
                mu_p[t, j], logs_p[t, j] = a, ls  # mu_p: its pre-activation until the loop's end
                if posterior_weights:
                    am, lq[t, j] = a_mu[t, j], a_sig[t, j]
                    for c in range(lo, hi):
                        am += wq_mu[j, c] * prev[c]
                        lq[t, j] += wq_sig[j, c] * prev[c]
                    mu_q[t, j], s_q[t, j], z[t, j] = _posterior(am, lq[t, j], eps[t, j])
        for i in range(L):  # the units' drive over this data step: b + W_zd z (z held over the substeps)
            drive[uoff[i]:uoff[i + 1]] = b[uoff[i]:uoff[i + 1]]
            _matvec(w_zd, z[t], uoff[i], uoff[i + 1], zoff[i], zoff[i + 1], drive)
        for k in range(n):
            new = ds[t * n + k + 1]
            new[:] = ds[t * n + k]  # each layer overwrites its block when done: one product per layer below
            for i in range(L - 1, -1, -1):  # top-down: layer i reads its own old d and layer i+1's new d
                lo, mid = uoff[i], uoff[i + 1]
                pre[lo:mid] = drive[lo:mid]
                _matvec(w_rec, new, lo, mid, lo, uoff[min(i + 2, L)], pre)
                for r in range(lo, mid):  # loops of their own, so that they vectorise
                    h[r] = alpha[r] * h[r] + beta[r] * pre[r]
                for r in range(lo, mid):
                    new[r] = _tanh(h[r])
        if t == 0:
            h_first[:] = h
        d_out = ds[(t + 1) * n]
        for o in range(D):
            a = b_out[o]
            for c in range(w_out.shape[1]):
                a += w_out[o, c] * d_out[c]
            x_hat[t, o] = a  # its pre-activation until the loop's end
    rec = 0.0
    y_, x_ = _flat(x_hat), _flat(x)
    for k in range(T * D):
        y_[k] = _tanh(y_[k])
        rec += 0.5 * (y_[k] - x_[k]) ** 2
    sp2 = _sigma2(logs_p)
    mp_ = _flat(mu_p)
    for k in range(T * Z):
        mp_[k] = _tanh(mp_[k])
    kl[:] = 0.0
    for t in range(T):
        for i in range(L):
            for j in range(zoff[i], zoff[i + 1]):
                c_t = weight_first[j] if t == 0 and first else weight[j]
                diff, sq = mu_p[t, j] - mu_q[t, j], s_q[t, j]
                kl[i] += c_t * (logs_p[t, j] - lq[t, j] + (diff * diff + sq * sq) / (2.0 * sp2[t, j]) - 0.5)
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
    w_rec_t, w_zd_t = np.ascontiguousarray(w_rec.T), np.ascontiguousarray(w_zd.T)
    g_pres = np.empty((T * n, len(b)))  # dF/dpre of every substep, for the weight gradients
    sp2s = _sigma2(logs_p)
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
            new, g_pre = ds[t * n + k + 1], g_pres[t * n + k]
            for i in range(L):  # bottom first: layer i-1's pre fed on layer i's new d
                lo, mid = uoff[i], uoff[i + 1]
                if i > 0:
                    _matvec(w_rec_t, g_pre, lo, mid, uoff[i - 1], lo, gd)
                for r in range(lo, mid):
                    g_h = gh[r] + gd[r] * (1.0 - new[r] * new[r])
                    g_pre[r] = beta[r] * g_h
                    gh[r] = alpha[r] * g_h
                gd_before[lo:mid] = 0.0
                _matvec(w_rec_t, g_pre, lo, mid, lo, mid, gd_before)  # rows of the transposes: contiguous
                _matvec(w_zd_t, g_pre, zoff[i], zoff[i + 1], lo, mid, gz)
            gd[:] = gd_before
        # gd is dF/dd at the end of step t-1, where step t's prior and posterior read it
        prev = ds[t * n]
        prior = not (t == 0 and first)  # else N(0, I), no weights
        for i in range(L):
            for j in range(zoff[i], zoff[i + 1]):
                c_t = weight[j] if prior else weight_first[j]
                m, mq, sq, sp2 = mu_p[t, j], mu_q[t, j], s_q[t, j], sp2s[t, j]
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
    if weights:
        _recurrent_gradients(uoff, zoff, n, ds, z, g_pres, gw_rec, gw_zd, gb)


@njit
def _recurrent_gradients(uoff, zoff, n, ds, z, g_pres, gw_rec, gw_zd, gb):
    """dF/dW_rec, dF/dW_zd and dF/db added in from dF/dpre of every substep ``g_pres``: sums over the
    substeps of products with the inputs of the pre-activations (layer i's own d before the substep,
    layer i+1's after it, z held over the data step), as dot products of contiguous rows."""
    S, L = g_pres.shape[0], len(uoff) - 1
    g_t, d_t = np.ascontiguousarray(g_pres.T), np.ascontiguousarray(ds.T)
    z_t = np.empty((z.shape[1], S))
    for s in range(S):
        z_t[:, s] = z[s // n]
    for i in range(L):
        lo, mid = uoff[i], uoff[i + 1]
        top = uoff[min(i + 2, L)]
        for r in range(lo, mid):
            g = g_t[r]
            gb[r] += g.sum()
            for c in range(lo, mid):
                gw_rec[r, c] += _dot(g, d_t[c, :S])
            for c in range(mid, top):
                gw_rec[r, c] += _dot(g, d_t[c, 1:])
            for j in range(zoff[i], zoff[i + 1]):
                gw_zd[r, j] += _dot(g, z_t[j])


@njit(inline="always")
def _dot(a, b):
    acc = 0.0
    for k in range(len(a)):
        acc += a[k] * b[k]
    return acc


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
