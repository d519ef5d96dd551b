"""Circuits to experiment with: random networks (for the solver and SPICE checks) and layered deep
resistive networks (Scellier et al. 2024: layers of nodes joined by trainable conductances, each
hidden node with an antiparallel diode pair to a bias)."""

from __future__ import annotations

import numpy as np

from ..validate import count
from .circuit import Circuit


def random_circuit(rng: np.random.Generator, n: int = 12, inputs: int = 3, outputs: int = 2, *, edges: int = 30,
                   diodes: int = 6, fets: int = 0, sources: int = 2, spread: float = 0.0) -> Circuit:
    """A random circuit: nodes 0..inputs-1 held by voltage sources, the next ``outputs`` the outputs;
    every other node joined to an earlier one (so each reaches a source) plus ``edges`` random
    conductances in [0.1, 1] S (some to ground); ``diodes`` Shockley diodes (I_s 1e-9 A) and ``fets``
    FETs (K 0.5 A/V^2, V_th 0.3 V) between random nodes; ``spread``: relative element mismatch (I_s,
    n, K and V_th each times 1 + spread N(0, 1), clipped to stay positive)."""
    n, inputs, outputs = count(n, "n"), count(inputs, "inputs"), count(outputs, "outputs")
    pairs = [(i, int(rng.integers(0, i))) for i in range(inputs, n)]
    for _ in range(edges):
        a, b = rng.choice(np.arange(-1, n), 2, replace=False)
        pairs.append((int(a), int(b)))
    e = np.array(pairs)

    def pick(k, width):  # elements with at least one free end (between sources they change nothing)
        out = []
        while len(out) < k:
            nodes = rng.choice(np.arange(-1, n), width, replace=False)
            if np.any(nodes >= inputs):
                out.append(nodes)
        return np.array(out, dtype=np.int64).reshape(k, width)

    def spread_(v, k):
        return v * np.clip(1 + spread * rng.standard_normal(k), 0.2, None)

    f = pick(fets, 3)
    return Circuit(n, e, rng.uniform(0.1, 1.0, len(e)), np.arange(inputs), np.arange(inputs, inputs + outputs),
                   diodes=pick(diodes, 2), diode_is=spread_(1e-9, diodes), diode_n=spread_(1.0, diodes), fets=f,
                   fet_k=spread_(0.5, fets), fet_vth=0.3 + 0.1 * spread * rng.standard_normal(fets),
                   sources=rng.integers(inputs, n, sources), source_current=rng.uniform(-0.2, 0.2, sources))


def layered(sizes, rng: np.random.Generator, *, g_range=(1e-3, 2e-2), diode_is=1e-12, diode_n=1.0,
            bias: float = 0.4, spread: float = 0.0, diodes: bool = True) -> Circuit:
    """A deep resistive network: ``sizes`` = (inputs, hidden..., outputs). Nodes layer after layer, then
    two bias nodes (fixed at +-``bias`` V, the last two inputs: x has sizes[0] + 2 columns, see
    :func:`bias_inputs`); every node of a layer joined to every node of the previous one by a
    conductance drawn uniformly from ``g_range`` (S); every hidden node has a diode to the +bias node
    (conducting when the node is above +bias) and one from the -bias node (below -bias), so that
    hidden voltages saturate softly near +-bias: the nonlinearity. ``spread``: diode mismatch as in
    :func:`random_circuit`. ``diodes=False``: the same network without diodes (linear; the same
    conductances are drawn), the baseline the diodes' nonlinearity is measured against."""
    sizes = [count(s, "sizes") for s in sizes]
    start = np.cumsum([0] + sizes)
    n = int(start[-1]) + 2
    hi, lo = n - 2, n - 1
    edges = []
    for k in range(1, len(sizes)):
        pre, post = np.arange(start[k - 1], start[k]), np.arange(start[k], start[k + 1])
        edges.append(np.stack(np.meshgrid(post, pre, indexing="ij"), -1).reshape(-1, 2))
    edges = np.concatenate(edges)
    hidden = np.arange(start[1], start[-2])
    pairs = np.concatenate([np.stack([hidden, np.full_like(hidden, hi)], 1),
                            np.stack([np.full_like(hidden, lo), hidden], 1)])
    k = len(pairs)
    g = rng.uniform(*g_range, len(edges))
    i_s = diode_is * np.clip(1 + spread * rng.standard_normal(k), 0.2, None)
    n_d = diode_n * np.clip(1 + spread * rng.standard_normal(k), 0.2, None)
    keep = slice(None) if diodes else slice(0)  # drawn either way: both networks see the same random stream
    inputs = np.concatenate([np.arange(sizes[0]), [hi, lo]])
    return Circuit(n, edges, g, inputs, np.arange(start[-2], start[-1]),
                   diodes=pairs[keep], diode_is=i_s[keep], diode_n=n_d[keep],
                   capacitance=1e-12)


def bias_inputs(x, bias: float = 0.4) -> np.ndarray:
    """x (batch, inputs) with the two bias columns +-bias that :func:`layered` expects."""
    x = np.asarray(x, float)
    return np.concatenate([x, np.tile([bias, -bias], (len(x), 1))], axis=1)
