"""Diagnostics of gradient estimates against the exact gradient, and of the circuit's asymmetry.

* :func:`compare`: cosine similarity and relative error ||g - g*|| / ||g*|| of an estimate g against
  the exact g*, per parameter (``W:pre->post``, ``b:layer``) and over all of them (``all``);
* :func:`error_alignment`: the same for EP's neuronal error vector v against the exact adjoint
  lambda = -J^{-T} dl/du (per sample, then averaged; and overall);
* :func:`weight_angles`: the angle arccos(<W, B^T> / (||W|| ||B||)) between each forward weight and
  its independent feedback weight, in degrees (0 = symmetric), and over all such pairs;
* :func:`jacobian_symmetry`: ||S|| / (||S|| + ||A||) of the Jacobian at the equilibrium (S, A its
  symmetric and antisymmetric parts; Frobenius norms; 1 = symmetric), averaged over the batch;
* :func:`bias_decomposition`: an estimator's bias split into its finite-nudge part (estimate minus
  its exact beta -> 0 limit) and its asymmetry part (limit minus exact gradient), plus the same
  estimate on the symmetrised network (feedback replaced by the forward weights' transposes);
* :func:`transition_statistics`: how often each transition of a probabilistic finite-state machine
  is reproduced by sequences of its states (e.g. the primitives of generated sequences, read by
  ``models.data.segment_primitives``), and the distance of those frequencies from the machine's.
"""

from __future__ import annotations

import copy

import numpy as np

from substrate import Gradients, Network
from substrate.activations import rho_prime
from substrate.errors import SubstrateValueError

from . import ep
from .homeostasis import dense_weights


def cosine(a, b) -> float:
    """The cosine of the angle between ``a`` and ``b`` (flattened; real part of the inner product); NaN if either is
    zero."""
    a, b = np.ravel(a), np.ravel(b)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(np.real(np.vdot(b, a)) / (na * nb)) if na > 0 and nb > 0 else float("nan")


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| (flattened); NaN if b is zero."""
    nb = np.linalg.norm(np.ravel(b))
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / nb) if nb > 0 else float("nan")


def _parts(g: Gradients) -> dict:
    parts = {f"W:{k}": np.asarray(v) for k, v in g.weights.items()}
    parts.update({f"b:{k}": np.asarray(v) for k, v in g.biases.items()})
    return parts


def compare(estimate: Gradients, exact: Gradients) -> dict:
    """{"cosine": {part: c}, "relative_error": {part: e}} per weight and bias, and ``all``."""
    a, b = _parts(estimate), _parts(exact)
    names = sorted(b)
    out = {"cosine": {}, "relative_error": {}}
    for k in names + ["all"]:
        x = np.concatenate([a[n].ravel() for n in names]) if k == "all" else a[k]
        y = np.concatenate([b[n].ravel() for n in names]) if k == "all" else b[k]
        out["cosine"][k] = cosine(x, y)
        out["relative_error"][k] = relative_error(x, y)
    return out


def error_alignment(v, delta) -> dict:
    """Alignment of error vectors v and delta (batch, n): mean per-sample cosine, overall cosine."""
    per = [cosine(a, b) for a, b in zip(v, delta)]
    return {"mean_cosine": float(np.nanmean(per)), "cosine": cosine(v, delta),
            "relative_error": relative_error(v, delta)}


def _feedback_pairs(network: Network):
    """(forward, feedback) connection pairs where both weights are independent parameters."""
    names = {c.name: c for c in network.connections}
    seen = set()
    for c in network.connections:
        back = names.get(f"{c.post}->{c.pre}")
        if c.pre == c.post or back is None or c.tied or back.tied or c.name in seen or c.pre in network.inputs_by_name:
            continue
        seen.update({c.name, back.name})
        yield c, back


def weight_angles(network: Network) -> dict:
    """{forward name: angle in degrees} for every independent forward/feedback pair, and ``all``."""
    out, num, den_w, den_b = {}, 0.0, 0.0, 0.0
    for f, b in _feedback_pairs(network):
        W, B = network.effective_weight(f), network.effective_weight(b)
        out[f.name] = float(np.degrees(np.arccos(np.clip(cosine(W, B.T), -1, 1))))
        num += float(np.sum(W * B.T))
        den_w += float(np.sum(W * W))
        den_b += float(np.sum(B * B))
    if out:
        out["all"] = float(np.degrees(np.arccos(np.clip(num / np.sqrt(den_w * den_b), -1, 1))))
    return out


def jacobian_symmetry(network: Network, u) -> float:
    """Mean over samples of ||S|| / (||S|| + ||A||) for the Jacobian at states u (batch, n), in the
    coordinates where EP is exact iff it is symmetric: J = -I + W D (D = diag rho'(u)) is similar to
    D^(1/2) J D^(-1/2) = -I + D^(1/2) W D^(1/2), symmetric exactly when W is (where rho' > 0)."""
    W = dense_weights(network, np.float64)
    out = []
    for ub in np.real(u):
        d = np.empty_like(ub)
        for layer in network.layers:
            sl = network.slices[layer.name]
            d[sl] = rho_prime(layer.activation, ub[sl])
        s = np.sqrt(np.maximum(d, 0.0))
        Js = s[:, None] * W * s[None, :] - np.eye(len(ub))
        ns, na = np.linalg.norm(Js + Js.T) / 2, np.linalg.norm(Js - Js.T) / 2
        out.append(ns / (ns + na))
    return float(np.mean(out))


def symmetrised(network: Network) -> Network:
    """A copy of the network whose independent feedback weights are the forward weights' transposes."""
    net = copy.deepcopy(network)
    for f, b in _feedback_pairs(net):
        b.weight = np.ascontiguousarray(f.weight.T).copy()
    return net


def bias_decomposition(network: Network, x, y, cost, estimator: ep.Estimator,
                       relaxation: ep.Relaxation = ep.Relaxation()) -> dict:
    """The bias of ``estimator`` against the exact gradient, split in two (see the module docstring).

    Returns {"total", "finite_nudge", "asymmetry", "symmetrised"}: each a :func:`compare` dict
    ("total": estimate vs exact; "finite_nudge": estimate vs limit; "asymmetry": limit vs exact;
    "symmetrised": the estimate vs the exact gradient, both on the symmetrised network)."""
    free = ep.free_phase(network, x, relaxation)
    g = {name: ep.estimate(network, x, y, cost, est, relaxation, free=free).gradients
         for name, est in (("estimate", estimator), ("limit", ep.Limit()), ("exact", ep.Exact()))}
    sym = symmetrised(network)
    sfree = ep.free_phase(sym, x, relaxation)
    s_est = ep.estimate(sym, x, y, cost, estimator, relaxation, free=sfree).gradients
    s_exact = ep.estimate(sym, x, y, cost, ep.Exact(), relaxation, free=sfree).gradients
    return {"total": compare(g["estimate"], g["exact"]), "finite_nudge": compare(g["estimate"], g["limit"]),
            "asymmetry": compare(g["limit"], g["exact"]), "symmetrised": compare(s_est, s_exact)}


def transition_statistics(labels, transitions) -> dict:
    """The transitions between consecutive states in ``labels`` (B, C) ints (-1: unrecognised) against
    the machine's matrix ``transitions`` (k, k). Returns {"counts" (k, k): each transition seen,
    "frequencies" (k, k): counts over their row's total (NaN for a state never left), "distance": the
    total-variation distance 0.5 sum_j |f_ij - P_ij| of each row, averaged over rows weighted by how
    often the state is left (0: the machine's statistics; 1: disjoint), "row_distance" (k,),
    "forbidden": the fraction of transitions the machine never makes (P_ij = 0), "unrecognised": the
    fraction of states that are -1, "transitions": how many pairs were counted}."""
    P = np.asarray(transitions, dtype=float)
    labels = np.asarray(labels)
    if P.ndim != 2 or P.shape[0] != P.shape[1] or np.any(P < 0) or not np.allclose(P.sum(axis=1), 1.0):
        raise SubstrateValueError(f"transitions must be a (k, k) matrix of probabilities whose rows sum to 1, got {P.shape}")
    k = len(P)
    if labels.ndim != 2 or labels.dtype.kind not in "iu" or labels.size and (labels.min() < -1 or labels.max() >= k):
        raise SubstrateValueError(f"labels must be (sequences, cycles) integers in [-1, {k}), got {labels.dtype} {labels.shape}")
    a, b = labels[:, :-1].ravel(), labels[:, 1:].ravel()
    known = (a >= 0) & (b >= 0)
    counts = np.zeros((k, k))
    np.add.at(counts, (a[known], b[known]), 1.0)
    left = counts.sum(axis=1)
    with np.errstate(invalid="ignore"):
        freq = counts / left[:, None]
    row = 0.5 * np.abs(freq - P).sum(axis=1)
    total = left.sum()
    return {"counts": counts, "frequencies": freq, "row_distance": row,
            "distance": float(np.sum(np.nan_to_num(row) * left) / total) if total else float("nan"),
            "forbidden": float(counts[P == 0].sum() / total) if total else float("nan"),
            "unrecognised": float(np.mean(labels < 0)) if labels.size else float("nan"),
            "transitions": int(total)}
