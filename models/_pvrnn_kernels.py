"""Compiled PV-RNN: the error-regression step (batch 1, gradient with respect to A only) and
training (epochs of Adam on the weights and every sequence's A).

The same equations as :meth:`models.pvrnn.PVRNN.run` and ``_backward`` (docstring of
``models/pvrnn.py``): for error regression (:func:`forward`, :func:`backward`, :func:`regress`) scalar
loops over one sequence, so that an ER step (window ~10, ~50 iterations of forward, backward and
Adam) costs microseconds instead of NumPy's per-call overhead; for training (:func:`gradient`,
:func:`train`) every sequence of the batch at once, products over the sequences (section "training: a
batch" below), an epoch without Python per step. Checked against the NumPy path in
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

``grads``: the gradients of the trainable arrays of ``net``, in the order of :data:`TRAINABLE`.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
from numba import njit as _njit

from substrate._blas import SCALARS, gemm, gemm_small
from substrate._kernels import ONE, ZERO, _exp_f64

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
def _kl_term(mp, mq, sq, lp, lq, sp2):
    """One step's and latent's KL[q || p] = log sigma^p - log sigma^q + ((mu^p - mu^q)^2 + (sigma^q)^2)
    / (2 (sigma^p)^2) - 1/2 (sp2 = (sigma^p)^2, lp and lq the log sigmas)."""
    diff = mp - mq
    return lp - lq + (diff * diff + sq * sq) / (2.0 * sp2) - 0.5


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
                kl[i] += c_t * _kl_term(mu_p[t, j], mu_q[t, j], s_q[t, j], logs_p[t, j], lq[t, j], sp2[t, j])
    return rec * rec_scale


@njit
def backward(x, eps, first, loss, net, window, g_mu, g_sig, gd, gh, gd_before, gz):
    """dF/dA^mu and dF/dA^sig of the last ``forward`` (its ``window``), the exact discrete adjoint;
    gd, gh, gd_before (N,), gz (Z,) are work arrays. No gradient flows into the start state (frozen, or
    a sequence's zeros)."""
    rec_scale, weight, weight_first = loss
    uoff, zoff, w_rec, w_zd, b, alpha, beta, w_mu, w_sig, b_mu, b_sig, w_out, b_out, n, wq_mu, wq_sig = net
    posterior_weights = wq_mu.shape[0] > 0
    ds, z, mu_q, s_q, mu_p, logs_p, x_hat, h_first, h_end = window
    T, D = x.shape
    L = len(uoff) - 1
    w_rec_t, w_zd_t = np.ascontiguousarray(w_rec.T), np.ascontiguousarray(w_zd.T)
    sp2s = _sigma2(logs_p)
    gd[:] = 0.0
    gh[:] = 0.0
    g_pre = np.empty(len(b))
    for t in range(T - 1, -1, -1):
        for o in range(D):
            y = x_hat[t, o]
            g_out = (y - x[t, o]) * rec_scale * (1.0 - y * y)
            for c in range(w_out.shape[1]):
                gd[c] += g_out * w_out[o, c]
        gz[:] = 0.0
        for k in range(n - 1, -1, -1):
            new = ds[t * n + k + 1]
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
    for k in range(eps.shape[0]):
        forward(x, a_mu, a_sig, eps[k], h0, d0, first, loss, net, window, kl)
        backward(x, eps[k], first, loss, net, window, g_mu, g_sig, gd, gh, gd_before, gz)
        adam(a_mu, g_mu, m_mu, v_mu, k + 1, lr, 0.9, 0.999, 1e-8)
        adam(a_sig, g_sig, m_sig, v_sig, k + 1, lr, 0.9, 0.999, 1e-8)


# ------------------------------------------------------------------------------------ training: a batch
# Training runs every sequence of the batch at once, and one layer at a time: a layer's units read their own previous state and the layer above's new one
# (top-down), never a lower layer's, so the forward runs the top layer's whole trajectory first, then the
# next below, and the adjoint the bottom layer's first. A layer's step is then one small product
# W_ii d (:func:`substrate._blas.gemm_small`, by hand, on views, no copies) over all sequences; its drive from the
# layer above and from its latents is one product over all (substep, sequence) columns before its loop,
# and so is, after its adjoint's loop, what it sends the layer above. Whatever does not feed the units
# (the prior and the output after the forward, their adjoints before the backward, the posterior ahead
# without posterior weights, the weight gradients after) is also one product over all columns. The
# latents', prior's and output's arrays are (rows, (T + 1) B), the sequences on the last axis: column
# block t (columns t B .. t B + B) is data step t, aligned with ``de``'s block t, the units at the end of
# step t - 1 (the input of step t's prior and posterior; block 0: the start, zeros); the output of step t
# is in block t + 1 (it reads the end of step t). The units' arrays are the transpose, ((T + 1) B, N) per
# data step and ((T n + 1) B, N) per substep (block s: substep s; block 0: the start), laid out by layer:
# layer i's (rows, N_i) block is contiguous, after layer i - 1's (:func:`_block`), so that a substep's
# values of a layer's units for every sequence are one contiguous run (the step loops walk them in order,
# flat loops without a remainder a row; rows of (N, columns) were ~1.5x slower, a cache line per unit and
# step; one (rows, N) block ~5% slower than the layer's own) and every product reads a layer's block.
# Training starts every sequence at h = d = 0 with the first-step prior N(0, I).


def batch_work(B, T, D, net):
    """The work arrays of :func:`gradient` for B sequences of T steps and D outputs (C = (T + 1) B
    columns per data step, SC = (T n + 1) B per substep; every entry read is written first), in this
    order: x (D, C); A^mu (then the posterior's pre-activation), log sigma^q, eps, mu^q, sigma^q (Z, C); z and a
    row of ones (Z + 1, C);
    z repeated for every substep (Z, T n B; with one substep (0, 0): z itself); the units after every
    substep (SC, N); the units at the data steps' ends (C, N; with one substep those of ``ds``, (0, 0));
    the units' drive b + W_td d_above + W_zd z per substep, to which the step adds W_ii d (the pre-activation)
    (SC N: layer i's (SC, N_i) from SC uoff[i]); h of a substep (B N: layer i's (B, N_i) from B uoff[i],
    contiguous, so that the update and tanh are one loop each), and alpha, then beta, in h's layout (2 B N); the
    prior's and output's pre-activations (2 Z + D, C); the prior's variance (sigma^p)^2 (Z, C);
    [W_mu; W_sig; W_out] (2 Z + D, N; W_out zero beyond the bottom layer's units); every layer's W_ii and
    its transpose, contiguous, one after the other (sum_i N_i^2 each: the step's product reads rows of
    its right operand); their gradients, and
    with posterior weights W_q's, before their blocks are taken (2 Z + D (+ 2 Z), N), then W_zd's and b's
    ((Z + 1), N, transposed); the adjoint's:
    dF/d(prior, output, posterior pre-activations) (4 Z + D, C); the jumps of dF/dd from the
    losses (C, N) and, with several substeps, every jump of dF/dd per substep (SC, N; else (0, 0): the
    first), to which the adjoint adds the other paths into the units (then dF/dd); dF/dpre of every substep
    (SC, N); its sums over the data steps (T B, N; with one substep (0, 0): a view of the former); dF/dz
    (Z, C); dF/dh and a data step's sum of dF/dpre (B, N; the last (0, 0) with one substep). The units'
    arrays, (rows, N), are laid out by layer (:func:`_block`)."""
    uoff, zoff, n = net[0], net[1], net[13]
    N, Z = int(uoff[-1]), int(zoff[-1])
    C, SC = (T + 1) * B, (T * n + 1) * B
    several = n > 1
    squares = sum(int(uoff[i + 1] - uoff[i]) ** 2 for i in range(len(uoff) - 1))
    shapes = [(D, C), *[(Z, C)] * 5, (Z + 1, C), (Z, T * n * B) if several else (0, 0), (SC, N), (C, N) if several else (0, 0),
              (SC, N), (B * N,), (2 * B * N,), (2 * Z + D, C), (Z, C), (2 * Z + D, N), (squares,), (squares,),
              ((4 * Z + D if net[14].shape[0] else 2 * Z + D) + Z + 1, N), (4 * Z + D, C), (C, N),
              (SC, N) if several else (0, 0), (SC, N), (T * B, N) if several else (0, 0), (Z, C), (B, N),
              (B, N) if several else (0, 0)]
    # one allocation, each array on cache lines of its own
    sizes = [-(-math.prod(sh) // 8) * 8 for sh in shapes]
    buf = np.empty(sum(sizes) + 8)
    start = (-buf.ctypes.data // 8) % 8  # 64-byte alignment
    out = []
    for sh, k in zip(shapes, sizes):
        out.append(buf[start:start + math.prod(sh)].reshape(sh))
        start += k
    return tuple(out)


@njit
def _to_columns(a, out, shift):
    """out[k, (t + shift) B + b] = a[b, t, k]: (B, T, K) into the column layout (the other block zero)."""
    B, T, K = a.shape
    out[:, (T if shift == 0 else 0) * B:(T + 1 if shift == 0 else 1) * B] = 0.0
    for k in range(K):
        for t in range(T):
            c = (t + shift) * B
            for b in range(B):
                out[k, c + b] = a[b, t, k]


@njit
def _noise_to_columns(eps, zoff, B, T, out):
    """The noise of every layer, as :meth:`models.pvrnn.PVRNN.noise` draws it (one vector: layer i's (B, T, Z_i)
    in C order from B T zoff[i]), into the column layout of :func:`_to_columns` (shift 0): the generator's
    numbers are read where they were drawn, with no reordering copy."""
    for i in range(len(zoff) - 1):
        z0, z1 = int(zoff[i]), int(zoff[i + 1])
        _to_columns(eps[B * T * z0:B * T * z1].reshape(B, T, z1 - z0), out[z0:z1], ZERO)


@njit
def _from_columns(a, out):
    """out[b, t, k] = a[k, t B + b]: the inverse of :func:`_to_columns` (shift 0)."""
    B, T, K = out.shape
    for b in range(B):
        for t in range(T):
            for k in range(K):
                out[b, t, k] = a[k, t * B + b]


@njit
def _posterior_columns(am, lq, e, mq, sq, z, c0, c1):
    """(mu^q, sigma^q, z) of the columns c0..c1 from the pre-activations and the noise: per row a loop
    per output on views from column c0 (few arrays and indices from 0 per loop, so that each
    vectorises)."""
    for j in range(am.shape[0]):
        am_, lq_, e_, mq_, sq_, z_ = am[j, c0:c1], lq[j, c0:c1], e[j, c0:c1], mq[j, c0:c1], sq[j, c0:c1], z[j, c0:c1]
        for c in range(am_.size):
            mq_[c] = _tanh(am_[c])
        for c in range(am_.size):
            sq_[c] = _exp_f64(lq_[c])
        for c in range(am_.size):
            z_[c] = mq_[c] + sq_[c] * e_[c]


@njit(inline="always")
def _posterior_gradient_row(c_t, gz, mq, sq, e, mp, sp2, g_mu, g_sig, j, c0, c1):
    """dF/dA^mu, dF/dA^sig of latent j's columns c0..c1, of KL weight c_t: on views from column c0, a
    loop per output (few arrays per loop: each vectorises)."""
    gz_, mq_, sq_, e_, mp_, v_ = gz[j, c0:c1], mq[j, c0:c1], sq[j, c0:c1], e[j, c0:c1], mp[j, c0:c1], sp2[j, c0:c1]
    gm_, gs_ = g_mu[j, c0:c1], g_sig[j, c0:c1]
    for c in range(gz_.size):
        m = mq_[c]
        gm_[c] = (gz_[c] - c_t * (mp_[c] - m) / v_[c]) * (1.0 - m * m)
    for c in range(gz_.size):
        s = sq_[c]
        gs_[c] = gz_[c] * s * e_[c] + c_t * (s * s / v_[c] - 1.0)


@njit
def _posterior_gradients(gz, mq, sq, e, mp, sp2, weight, weight_first, g_mu, g_sig, B, c0, c1):
    """dF/dA^mu and dF/dA^sig (the posterior's pre-activations) of the columns c0..c1 < T B from dF/dz
    and the KL (weight ``weight_first`` in block 0, the first step), for the latents of the given rows."""
    for j in range(gz.shape[0]):
        if c0 < B:
            _posterior_gradient_row(weight_first[j], gz, mq, sq, e, mp, sp2, g_mu, g_sig, j, c0, min(c1, B))
        if c1 > B:
            _posterior_gradient_row(weight[j], gz, mq, sq, e, mp, sp2, g_mu, g_sig, j, max(c0, B), c1)


@njit(inline="always")
def _kl(c_t, mp, lp, mq, sq, lq, sp2):
    """c_t sum_c KL_c (:func:`_kl_term`) over the columns of one latent's views (mu^p, log sigma^p, mu^q,
    sigma^q, log sigma^q, (sigma^p)^2)."""
    acc = 0.0
    for c in range(mp.size):
        acc += _kl_term(mp[c], mq[c], sq[c], lp[c], lq[c], sp2[c])
    return c_t * acc


@njit(inline="always")
def _block(a, lo, hi):
    """Layer lo..hi's units of a units array (rows, N) laid out by layer (every layer's (rows, N_i) block
    contiguous, one after the other: a substep's values of a layer are one contiguous run), as a
    (rows, hi - lo) view."""
    return _flat(a)[a.shape[0] * lo:a.shape[0] * hi].reshape(a.shape[0], hi - lo)


@njit(inline="always")
def _stack_rows(i, z0, z1, Z, R):
    """The rows r0..r1 of [W_mu; W_sig; W_out] (R = 2 Z + D rows) that read layer i's units: from its
    first latent's row of W_mu to its last's of W_sig, and W_out's with the bottom layer (the rows between
    are zeros in the layer's columns). A layer's products over these rows only: one product over all rows
    multiplied ~40% zeros in the benchmark's."""
    return z0, (R if i == 0 else Z + z1)


@njit(inline="always")
def _copy_rows(a, out):
    """out[:] = a for 2-D views of one shape, in loops (numba's slice assignment is generic and slow)."""
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            out[r, c] = a[r, c]


@njit
def _forward_batch(x, a_mu, a_sig, eps, loss, net, work, kl):
    """The posterior pass of B sequences from their start (``work``'s arrays, :func:`batch_work`);
    returns the reconstruction term and writes the KL terms per layer into ``kl``, as :func:`forward`.
    The layers top-down, each over all steps: its drive from the layer above and its latents first (one
    product each over all substeps; with posterior weights the latents' per step), then per substep one
    product W_ii d and h <- alpha h + beta (W_ii d + drive + b), d = tanh(h)."""
    rec_scale, weight, weight_first = loss
    uoff, zoff, w_rec, w_zd, b, alpha, beta, w_mu, w_sig, b_mu, b_sig, w_out, b_out, n, wq_mu, wq_sig = net
    xt, am, lq, et, mq, sq, zo, zx, ds, de, drive, h, ab, pz, sp2, w_stack, w_ii, w_ii_t = work[:18]
    B, T, D = x.shape
    L, Z, C, N, SC = len(uoff) - 1, a_mu.shape[2], (T + 1) * B, len(b), (T * n + 1) * B
    z = zo[:Z]
    zo[Z] = 1.0  # the bias's "latent" in the weight gradients' product
    de = ds if n == 1 else de
    zx = z[:, :T * B] if n == 1 else zx
    posterior_weights = wq_mu.shape[0] > 0
    _to_columns(x, xt, ONE)  # int64, not literals: one compiled _to_columns (substrate._kernels.NOT_LITERAL)
    _to_columns(a_mu, am, ZERO)
    _to_columns(a_sig, lq, ZERO)
    _noise_to_columns(eps, zoff, B, T, et)
    # z ahead for every step without posterior weights; block T is no step (A, eps 0 there: z = 0, which the
    # weight gradients' products read)
    _posterior_columns(am, lq, et, mq, sq, z, T * B if posterior_weights else 0, C)
    if n > 1 and not posterior_weights:  # z of data step t for each of its substeps
        for t in range(T):
            for k in range(n):
                _copy_rows(z[:, t * B:t * B + B], zx[:, (t * n + k) * B:(t * n + k + 1) * B])
    a = 0
    for i in range(L):  # W_ii and W_ii^T, contiguous
        lo, mid = int(uoff[i]), int(uoff[i + 1])
        w, w_t = w_ii[a:a + (mid - lo) ** 2].reshape(mid - lo, mid - lo), w_ii_t[a:a + (mid - lo) ** 2].reshape(mid - lo, mid - lo)
        for r in range(mid - lo):
            for c in range(mid - lo):
                w[r, c] = w_t[c, r] = w_rec[lo + r, lo + c]
        a += (mid - lo) ** 2
    for i in range(L - 1, -1, -1):  # top-down: a layer reads its own old d and the layer above's new d
        lo, mid, top, z0, z1 = int(uoff[i]), int(uoff[i + 1]), int(uoff[min(i + 2, L)]), int(zoff[i]), int(zoff[i + 1])
        a -= (mid - lo) ** 2
        w_t = w_ii_t[a:a + (mid - lo) ** 2].reshape(mid - lo, mid - lo)
        ds_i, de_i, drv = _block(ds, lo, mid), _block(de, lo, mid), _flat(drive)[SC * lo:SC * mid]
        ds_i[:B] = 0.0
        de_i[:B] = 0.0
        drv[:B * (mid - lo)] = 0.0  # no substep 0: never read, but every entry of the work arrays is written
        dr = drv.reshape(SC, mid - lo)[B:]
        for r in range(dr.shape[0]):  # b, then the products added (BLAS's beta = 0 would zero it first)
            dr_, b_ = dr[r], b[lo:mid]
            for c in range(mid - lo):
                dr_[c] = b_[c]
        if top > mid:
            gemm(_block(ds, mid, top)[B:], w_rec[lo:mid, mid:top].T, dr, 1, SCALARS)
        if not posterior_weights:
            gemm(zx[z0:z1].T, w_zd[lo:mid, z0:z1].T, dr, 1, SCALARS)
        h_, al_, be_ = h[B * lo:B * mid], ab[B * lo:B * mid], ab[B * (N + lo):B * (N + mid)]
        h_[:] = 0.0
        for q in range(B):  # alpha and beta per sequence, in the layout of h
            for r in range(mid - lo):
                al_[q * (mid - lo) + r], be_[q * (mid - lo) + r] = alpha[lo + r], beta[lo + r]
        for t in range(T):
            c0, c1 = t * B, t * B + B
            if posterior_weights:  # the posterior reads the layer's units at the end of step t - 1
                gemm(wq_mu[z0:z1, lo:mid], de_i[c0:c1].T, am[z0:z1, c0:c1], 1, SCALARS)
                gemm(wq_sig[z0:z1, lo:mid], de_i[c0:c1].T, lq[z0:z1, c0:c1], 1, SCALARS)
                _posterior_columns(am[z0:z1], lq[z0:z1], et[z0:z1], mq[z0:z1], sq[z0:z1], z[z0:z1], c0, c1)
                for k in range(n):
                    s = (t * n + k + 1) * B
                    gemm(z[z0:z1, c0:c1].T, w_zd[lo:mid, z0:z1].T, dr[s - B:s], 1, SCALARS)
            for k in range(n):
                s = (t * n + k + 1) * B  # substep t n + k + 1's rows
                # the drive's rows become the pre-activation: (W_ii d)^T = d^T W_ii^T added in place (by hand:
                # a product this small costs dgemm as much in packing as in arithmetic)
                gemm_small(ds_i[s - B:s], w_t, dr[s - B:s])
                pre, new = drv[s * (mid - lo):(s + B) * (mid - lo)], _flat(ds_i)[s * (mid - lo):(s + B) * (mid - lo)]
                for c in range(h_.size):  # loops of their own over the layer's values: they vectorise, no
                    h_[c] = al_[c] * h_[c] + be_[c] * pre[c]  # remainder a row
                for c in range(h_.size):
                    new[c] = _tanh(h_[c])
            if n > 1:
                _copy_rows(ds_i[(t * n + n) * B:(t * n + n + 1) * B], de_i[c1:c1 + B])
    # the prior (block 0: N(0, I), pre-activations 0) and the output (block t + 1 of step t): a product per
    # layer, over the rows of the stack that read its units
    w_stack[:] = 0.0
    w_stack[:Z] = w_mu
    w_stack[Z:2 * Z] = w_sig
    w_stack[2 * Z:, :w_out.shape[1]] = w_out
    mp, lp, y = pz[:Z], pz[Z:2 * Z], pz[2 * Z:]
    for j in range(Z):  # the biases, then the product added (BLAS's beta = 0 would zero pz first)
        mp[j] = b_mu[j]
        lp[j] = b_sig[j]
    for o in range(D):
        y[o] = b_out[o]
    for i in range(L):
        lo, mid = int(uoff[i]), int(uoff[i + 1])
        r0, r1 = _stack_rows(i, int(zoff[i]), int(zoff[i + 1]), Z, 2 * Z + D)
        gemm(w_stack[r0:r1, lo:mid], _block(de, lo, mid).T, pz[r0:r1], 1, SCALARS)
    # row views from column B (loops without branches, indices from 0: they vectorise)
    for j in range(Z):
        mp[j, :B] = 0.0
        lp[j, :B] = 0.0
        m_, l_, s_ = mp[j, B:], lp[j, B:], sp2[j, B:]
        for c in range(m_.size):
            m_[c] = _tanh(m_[c])
        for c in range(l_.size):  # (sigma^p)^2 once: the KL and its gradients read it
            s_[c] = _exp_f64(2.0 * l_[c])
        sp2[j, :B] = 1.0
    rec = 0.0
    for o in range(D):
        y_, x_ = y[o, B:], xt[o, B:]
        for c in range(y_.size):
            y_[c] = _tanh(y_[c])
        for c in range(y_.size):
            rec += 0.5 * (y_[c] - x_[c]) ** 2
    kl[:] = 0.0
    for i in range(L):
        for j in range(int(zoff[i]), int(zoff[i + 1])):
            kl[i] += _kl(weight_first[j], mp[j, :B], lp[j, :B], mq[j, :B], sq[j, :B], lq[j, :B], sp2[j, :B])
            kl[i] += _kl(weight[j], mp[j, B:T * B], lp[j, B:T * B], mq[j, B:T * B], sq[j, B:T * B], lq[j, B:T * B],
                         sp2[j, B:T * B])
    return rec * rec_scale


@njit
def _backward_batch(x, loss, net, work, g_mu, g_sig, grads):
    """The exact adjoint of the last :func:`_forward_batch`: dF/dA^mu, dF/dA^sig (B, T, Z) and dF/dweights
    added into ``grads``. The layers bottom-up, each: the losses' jumps of dF/dd of its units (the output
    and the prior; they do not depend on the adjoint), one product, then all steps backwards (per
    substep one product W_ii^T dF/dpre), followed by the product that sends its dF/dpre to the layer above
    (whose units it read); the weight gradients are one product each after the loops. dF/dpre of substep
    s is in column block s of ``ga`` (block 0 unused), the layout of ``ds``."""
    rec_scale, weight, weight_first = loss
    uoff, zoff, w_rec, w_zd, b, alpha, beta, w_mu, w_sig, b_mu, b_sig, w_out, b_out, n, wq_mu, wq_sig = net
    gw_rec, gw_zd, gb, gw_mu, gw_sig, gb_mu, gb_sig, gw_out, gb_out, gwq_mu, gwq_sig = grads
    (xt, _, _, et, mq, sq, zo, _, ds, de, _, _, ab, pz, sp2, w_stack, w_ii, _, p, gs, jump, td, ga, gsum, gz, gh, tmp) = work
    de = ds if n == 1 else de
    td = jump if n == 1 else td
    posterior_weights = wq_mu.shape[0] > 0
    B, T, D = x.shape
    L, Z, C, S = len(uoff) - 1, gz.shape[0], (T + 1) * B, T * n
    TB, R, P, N = T * B, 2 * Z + D, p.shape[0] - Z - 1, len(b)
    mp, y = pz[:Z], pz[2 * Z:]
    gpm, gls, g_out, gmu, gsig = gs[:Z], gs[Z:2 * Z], gs[2 * Z:R], gs[R:R + Z], gs[R + Z:]
    # dF/d(output pre-activation) (block t + 1) and dF/d(prior pre-activations) (block t > 0)
    g_out[:, :B] = 0.0
    for o in range(D):
        for c in range(B, C):
            u = y[o, c]
            g_out[o, c] = (u - xt[o, c]) * rec_scale * (1.0 - u * u)
    for j in range(Z):
        gpm[j, :B] = 0.0  # the first step's prior has no weights
        gls[j, :B] = 0.0
        gpm[j, TB:] = 0.0  # block T is no step
        gls[j, TB:] = 0.0
        # views of the columns B..T B, a loop per output (they vectorise)
        m_, q_, s_, v_ = mp[j, B:TB], mq[j, B:TB], sq[j, B:TB], sp2[j, B:TB]
        gp_, gl_, w_j = gpm[j, B:TB], gls[j, B:TB], weight[j]
        for c in range(gl_.size):
            m = m_[c]
            gp_[c] = w_j * (m - q_[c]) / v_[c] * (1.0 - m * m)
        for c in range(gl_.size):
            diff, s = m_[c] - q_[c], s_[c]
            gl_[c] = w_j * (1.0 - (diff * diff + s * s) / v_[c])
    gmu[:, TB:] = 0.0  # block T is no step (the posterior weights' gradients read it)
    gsig[:, TB:] = 0.0
    gz[:, TB:] = 0.0
    if n > 1:
        td[:] = 0.0
    for i in range(L):  # the losses' jumps of dF/dd of every layer's units, in the layout of ``de`` (block 0 is
        # no step's end; with one substep the adjoint's last product adds into it, never read)
        lo, mid = int(uoff[i]), int(uoff[i + 1])
        r0, r1 = _stack_rows(i, int(zoff[i]), int(zoff[i + 1]), Z, R)
        jump_i = _block(jump, lo, mid)
        jump_i[:B] = 0.0
        gemm(gs[r0:r1, B:].T, w_stack[r0:r1, lo:mid], jump_i[B:], 0, SCALARS)
    a = 0
    for i in range(L):  # bottom-up: layer i's dF/dpre feeds dF/dd of layer i + 1
        lo, mid, top, z0, z1 = int(uoff[i]), int(uoff[i + 1]), int(uoff[min(i + 2, L)]), int(zoff[i]), int(zoff[i + 1])
        # dF/dd of the layer's units (``td``): what the layer below sent, the losses' jumps (with one substep
        # ``td`` is ``jump`` itself), and, in the step loop, the path through the layer's own next substep
        Ni, ds_i, ga_i, td_i, jump_i = mid - lo, _block(ds, lo, mid), _block(ga, lo, mid), _block(td, lo, mid), _block(jump, lo, mid)
        gsum_i = ga_i[B:] if n == 1 else _block(gsum, lo, mid)  # with one substep, data step t's dF/dpre is substep t + 1's
        gh_, tmp_ = _flat(gh)[B * lo:B * mid], _flat(tmp)[B * lo:B * mid]
        al_, be_ = ab[B * lo:B * mid], ab[B * (N + lo):B * (N + mid)]  # alpha, beta in the layout of a substep's
        if n > 1:  # the end of data step t is substep (t + 1) n
            for t in range(1, T + 1):
                td_t, jump_t = _flat(td_i)[t * n * B * Ni:(t * n + 1) * B * Ni], _flat(jump_i)[t * B * Ni:(t + 1) * B * Ni]
                for c in range(B * Ni):
                    td_t[c] += jump_t[c]
        w = w_ii[a:a + Ni ** 2].reshape(Ni, Ni)
        a += Ni ** 2
        ga_i[:B] = 0.0  # no substep 0
        gh_[:] = 0.0
        for t in range(T - 1, -1, -1):
            c0, c1 = t * B, t * B + B
            if n > 1:
                tmp_[:] = 0.0
            for k in range(n - 1, -1, -1):
                s = (t * n + k + 1) * B  # substep t n + k + 1's rows
                # a substep's values of the layer, contiguous: flat loops, no remainder a row
                d_, td_, ga_ = _flat(ds_i)[s * Ni:(s + B) * Ni], _flat(td_i)[s * Ni:(s + B) * Ni], _flat(ga_i)[s * Ni:(s + B) * Ni]
                for c in range(B * Ni):  # td_: dF/dd of the substep's units, every path into them summed
                    d = d_[c]
                    g_h = gh_[c] + td_[c] * (1.0 - d * d)
                    ga_[c] = be_[c] * g_h
                    gh_[c] = al_[c] * g_h
                # dF/dd of the units before the substep, g^T W_ii, added in place into their jumps
                gemm_small(ga_i[s:s + B], w, td_i[s - B:s])
                if n > 1:
                    for c in range(B * Ni):
                        tmp_[c] += ga_[c]
            if n > 1:
                _copy_rows(tmp_.reshape(B, Ni), gsum_i[c0:c1])
            if posterior_weights:  # the posterior's adjoint feeds dF/dd: its step here
                gemm(w_zd[lo:mid, z0:z1].T, gsum_i[c0:c1].T, gz[z0:z1, c0:c1], 0, SCALARS)
                _posterior_gradients(gz[z0:z1], mq[z0:z1], sq[z0:z1], et[z0:z1], mp[z0:z1], sp2[z0:z1], weight[z0:z1],
                                     weight_first[z0:z1], gmu[z0:z1], gsig[z0:z1], B, c0, c1)
                if t > 0:  # the start is frozen; the posterior of step t read the units at substep t n
                    gemm(gmu[z0:z1, c0:c1].T, wq_mu[z0:z1, lo:mid], td_i[t * n * B:(t * n + 1) * B], 1, SCALARS)
                    gemm(gsig[z0:z1, c0:c1].T, wq_sig[z0:z1, lo:mid], td_i[t * n * B:(t * n + 1) * B], 1, SCALARS)
        if top > mid:  # the layer above's units fed this layer's pre at the same substep
            gemm_small(ga_i[B:], w_rec[lo:mid, mid:top], _block(td, mid, top)[B:])
    if not posterior_weights:
        for i in range(L):
            lo, mid, z0, z1 = int(uoff[i]), int(uoff[i + 1]), int(zoff[i]), int(zoff[i + 1])
            gsum_i = _block(ga, lo, mid)[B:] if n == 1 else _block(gsum, lo, mid)
            gemm(w_zd[lo:mid, z0:z1].T, gsum_i.T, gz[z0:z1, :TB], 0, SCALARS)
        _posterior_gradients(gz, mq, sq, et, mp, sp2, weight, weight_first, gmu, gsig, B, ZERO, TB)
    _from_columns(gmu, g_mu)
    _from_columns(gsig, g_sig)
    # the weight gradients: sums over all (step, sequence) columns, a product each
    for i in range(L):
        lo, mid, top = int(uoff[i]), int(uoff[i + 1]), int(uoff[min(i + 2, L)])
        ga_i = _block(ga, lo, mid)
        gemm(ga_i[B:].T, _block(ds, lo, mid)[:S * B], gw_rec[lo:mid, lo:mid], 1, SCALARS)  # the units before
        if top > mid:
            gemm_small(ga_i[B:].T, _block(ds, mid, top)[B:], gw_rec[lo:mid, mid:top])  # the new ones above
    # per layer: [z; 1] x dF/dpre summed over the substeps (W_zd's and b's gradients) and [prior; output;
    # posterior] x its units, then their blocks
    p[:] = 0.0  # the products add into it (the blocks none writes: never read)
    for i in range(L):
        lo, mid, z0, z1 = int(uoff[i]), int(uoff[i + 1]), int(zoff[i]), int(zoff[i + 1])
        gsum_i = _block(ga, lo, mid)[B:] if n == 1 else _block(gsum, lo, mid)
        gemm_small(zo[z0:, :TB], gsum_i, p[P + z0:, lo:mid])  # its latents' rows, those above and the ones
        r0, r1 = _stack_rows(i, z0, z1, Z, R)
        r1 = R + Z + z1 if posterior_weights else r1  # and the rows of W_q^mu, W_q^sig
        gemm_small(gs[r0:r1], _block(de, lo, mid), p[r0:r1, lo:mid])
        for r in range(z0, z1):
            for c in range(lo, mid):
                gw_mu[r, c] += p[r, c]
                gw_sig[r, c] += p[Z + r, c]
                if posterior_weights:
                    gwq_mu[r, c] += p[R + r, c]
                    gwq_sig[r, c] += p[R + Z + r, c]
                gw_zd[c, r] += p[P + r, c]
    for o in range(D):
        for c in range(w_out.shape[1]):
            gw_out[o, c] += p[2 * Z + o, c]
    for r in range(len(b)):
        gb[r] += p[P + Z, r]
    for j in range(Z):
        gb_mu[j] += gpm[j].sum()
        gb_sig[j] += gls[j].sum()
    for o in range(D):
        gb_out[o] += g_out[o].sum()


@njit
def gradient(x, a_mu, a_sig, eps, loss, net, work, g_mu, g_sig, grads, kl):
    """For B sequences x (B, T, D) from their start, A (a_mu, a_sig) and noise eps (B T Z,: every layer's
    (B, T, Z_i) in turn, :func:`_noise_to_columns`): the
    reconstruction term of F (returned), its KL terms per layer (into ``kl``), dF/dA (into g_mu, g_sig)
    and dF/dweights (added into ``grads``, in the order of :data:`TRAINABLE`); ``work``:
    :func:`batch_work`."""
    rec = _forward_batch(x, a_mu, a_sig, eps, loss, net, work, kl)
    _backward_batch(x, loss, net, work, g_mu, g_sig, grads)
    return rec


@njit
def train(x, theta, grad, m, v, step, lr, beta1, beta2, adam_eps, a_mu, a_sig, g_mu, g_sig, eps, loss, net, grads,
          work, history):
    """``eps.shape[0]`` epochs of training on sequences x (B, T, D), each: the posterior pass of every
    sequence from its start with the noise eps[e] (in :func:`gradient`'s layout), the adjoint (:func:`gradient`),
    then one Adam step (number ``step`` + e + 1) on ``theta``, the vector every trainable array of ``net`` and A
    (a_mu, a_sig (B, T, Z)) are views of (``grad``: the same for ``grads``, g_mu, g_sig; m, v: Adam's
    moments). ``history`` = (F (K,), reconstruction (K,), kl (K, L)) per epoch. Returns the number
    of epochs after which F, the weights and A were all finite (K unless training diverged; it
    stops at the first that is not)."""
    free_energy, reconstruction, kls = history
    kl = np.empty(kls.shape[1])
    for e in range(eps.shape[0]):
        grad[:] = 0.0
        reconstruction[e] = gradient(x, a_mu, a_sig, eps[e], loss, net, work, g_mu, g_sig, grads, kl)
        kls[e] = kl
        free_energy[e] = reconstruction[e] + kl.sum()
        adam(theta, grad, m, v, step + e + 1, lr, beta1, beta2, adam_eps)
        nan = free_energy[e] * 0.0  # NaN if anything is not finite (0 * inf is NaN)
        for k in range(theta.size):
            nan += theta[k] * 0.0
        if nan != 0.0:
            return e
    return eps.shape[0]
