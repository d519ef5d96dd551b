"""Jacobian homeostasis (Laborieux & Zenke, ICLR 2024; docs/equations.md, section 4.4).

The penalty on the functional asymmetry of the circuit, with the Jacobian taken in activity
coordinates with the nonlinearity bypassed, J = W - I (W the dense n x n matrix of every connection
between state layers: forward, feedback, lateral, loops; inputs are clamped, not neurons):

    L_homeo = E_eps[ ||J eps||^2 - eps^T J^2 eps ] = ||J||_F^2 - tr(J^2) = 2 ||A||_F^2,
    A = (J - J^T)/2 = (W - W^T)/2,   eps ~ N(0, I).

``exact``: 2 ||A||_F^2 from the assembled W, gradient 4 A. ``stochastic``: the estimator with ``draws``
samples, each two Jacobian-vector products (J eps and J^T eps, the engine's weight products), with
gradient (1/D) sum_d [2 a eps^T - eps a^T - b eps^T] (a = J eps, b = J^T eps), whose mean is 4 A.
Both are divided by n when ``normalise`` (as in their code, so that their lambda values carry over).
Gradients are returned per connection weight in the network's layout (masks applied, tied
connections folded into their source, as ``VectorField.parameter_gradients`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from substrate import Network, VectorField
from substrate import _kernels as K
from substrate.errors import SubstrateValueError


def dense_weights(network: Network, dtype=None) -> np.ndarray:
    """The effective n x n weight matrix W of the connections between state layers."""
    return network.pack(network.dtype if dtype is None else dtype).dense()


def _to_parameters(network: Network, flat) -> dict:
    """Packed weight cotangents -> {connection name: gradient} (masks, tied weights)."""
    zeros = {name: np.zeros((1, inp.size)) for name, inp in network.inputs_by_name.items()}
    vf = VectorField(network, zeros or None, batch=None if zeros else 1, dtype=flat.dtype)
    return vf.parameter_gradients(flat, np.zeros((network.n, 1), flat.dtype))["weights"]


# n x draws numbers the stochastic estimator may hold in each of its four probe arrays (float64: 0.8 GB
# in all); the exact penalty (draws=None) needs one n x n matrix and gives the value without noise
MAX_PROBE_NUMBERS = 25_000_000


@dataclass(frozen=True)
class Homeostasis:
    """lambda L_homeo added to the loss. ``draws``: None for the exact penalty, else the number of
    Gaussian probes of the stochastic estimator (5 in Laborieux & Zenke's code)."""

    strength: float = 1.0
    draws: int | None = 5
    normalise: bool = True

    def __post_init__(self):
        s = self.strength
        real = not isinstance(s, bool) and isinstance(s, (int, float, np.integer, np.floating))
        if not (real and np.isfinite(s) and s >= 0):
            raise SubstrateValueError(f"Homeostasis(strength={self.strength!r}) must be a finite number >= 0")
        d = self.draws
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1):
            raise SubstrateValueError(f"Homeostasis(draws={d!r}) must be None (exact) or a positive integer")

    def penalty(self, network: Network, rng: np.random.Generator | None = None):
        """(L_homeo, {connection name: dL_homeo/dW}), unscaled by ``strength``."""
        p = network.pack(network.dtype)
        if self.draws is None:
            W = dense_weights(network, network.dtype)
            A = 0.5 * (W - W.T)
            value, G = 2.0 * np.sum(A * A), 4.0 * A
            flat = np.empty_like(p.wbuf)
            for wo, pa, pn, qa, qn in p.conn:
                flat[wo:wo + qn * pn] = G[qa:qa + qn, pa:pa + pn].ravel()
        else:
            if not isinstance(rng, np.random.Generator):
                raise SubstrateValueError("the stochastic homeostasis estimator needs rng, a numpy.random.Generator")
            if p.n * self.draws > MAX_PROBE_NUMBERS:
                raise SubstrateValueError(
                    f"Homeostasis(draws={self.draws}) on {p.n} neurons would hold 4 x {p.n * self.draws:.3g} "
                    f"probe numbers; at most {MAX_PROBE_NUMBERS // p.n} draws for this network (n x draws <= "
                    f"{MAX_PROBE_NUMBERS:.2g}); draws=None gives the exact penalty from one {p.n} x {p.n} matrix")
            eps = rng.standard_normal((p.n, self.draws)).astype(network.dtype)
            tmp = np.empty_like(eps)
            a, b = np.empty_like(eps), np.empty_like(eps)
            K.weights_times(eps, p.wbuf, p.conn, p.layer_off, tmp, a)
            K.weights_transpose_times(eps, p.wbuf, p.conn, p.layer_off, tmp, b)
            a -= eps
            b -= eps
            value = (np.sum(a * a) - np.sum(b * a)) / self.draws
            flat, other = np.empty_like(p.wbuf), np.empty_like(p.wbuf)
            K.weight_vjp(np.ascontiguousarray(2.0 * a - b), eps, p.conn, flat)
            K.weight_vjp(np.ascontiguousarray(-eps), a, p.conn, other)
            flat = (flat + other) / self.draws
        if self.normalise:
            value, flat = value / p.n, flat / p.n
        return float(value), _to_parameters(network, flat)
