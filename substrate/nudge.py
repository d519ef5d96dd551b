"""A teaching current into one layer: the nudge of equilibrium propagation (docs/equations.md, section 4.1).

    tau du/dt = F(u) + beta dl/dr_L        (on the rows of the nudged layer L)

with l the per-sample cost of that layer's activities r_L = rho(u_L) (not divided by the batch size):

* ``squared_error``: l = 0.5 ||r_L - y||^2, so dl/dr_L = r_L - y (y has the layer's size);
* ``cross_entropy`` through a linear readout z = W_o r_L + b_o: l = -sum_c y_c log softmax(z)_c, so
  dl/dr_L = W_o^T (softmax(z) - y) (y is one-hot or a distribution over the C classes).

Sign: this is Laborieux & Zenke's convention, F_beta = F + beta dl/dr, so that positive beta pushes the
output *up* the cost and (1/beta)(r*(beta) - r*(0)) estimates +dL/dtheta. Every operation is
holomorphic, so a complex beta (holomorphic EP) drives complex states. Physically this is a current
source on the output neurons controlled by their own activity: the engine adds it after the weight
products of every stage (``_kernels.teach``), so every integrator and the residual test see it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from . import _kernels as K
from .activations import rho, rho_prime
from .errors import SubstrateValueError
from .validate import real_array

COSTS = {"squared_error": K.SQUARED_ERROR, "cross_entropy": K.CROSS_ENTROPY}


def _log_softmax(z):
    shift = np.max(z.real, axis=-1, keepdims=True)
    e = np.exp(z - shift)
    return z - shift - np.log(e.sum(axis=-1, keepdims=True)), e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True, eq=False)
class Cost:
    """A per-sample cost l(r_L; y) of the activities of one layer, with its gradient dl/dr_L.

    layer: the layer it reads (and a nudge drives); kind: ``squared_error`` or ``cross_entropy``
    (then ``readout_weight`` (C, layer size) and ``readout_bias`` (C,) define the linear readout)."""

    layer: str
    kind: str = "squared_error"
    readout_weight: np.ndarray | None = None
    readout_bias: np.ndarray | None = None

    def __post_init__(self):
        if not isinstance(self.layer, str):
            raise SubstrateValueError(f"cost layer={self.layer!r} must be a layer's name")
        if not isinstance(self.kind, str) or self.kind not in COSTS:
            raise SubstrateValueError(f"cost kind={self.kind!r}; allowed: {', '.join(COSTS)}")
        has = (self.readout_weight is not None, self.readout_bias is not None)
        if self.kind == "cross_entropy":
            if not all(has):
                raise SubstrateValueError("a cross_entropy cost needs readout_weight (C, layer size) "
                                          "and readout_bias (C,)")
            w, b = real_array(self.readout_weight, "readout_weight"), real_array(self.readout_bias, "readout_bias")
            object.__setattr__(self, "readout_weight", w)  # arrays from here on (lists are accepted)
            object.__setattr__(self, "readout_bias", b)
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise SubstrateValueError(f"readout_weight {w.shape} and readout_bias {b.shape} must be "
                                          "(C, layer size) and (C,)")
            if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
                raise SubstrateValueError("readout_weight and readout_bias must be finite")
        elif any(has):
            raise SubstrateValueError("readout_weight/readout_bias apply to kind='cross_entropy' only")

    def width(self, network) -> int:
        """The size of a target: the layer's size, or the number of classes of the readout."""
        size = network.layer(self.layer).size  # raises for an unknown layer
        if self.kind == "cross_entropy":
            if self.readout_weight.shape[1] != size:
                raise SubstrateValueError(f"readout_weight has {self.readout_weight.shape[1]} columns but "
                                          f"layer {self.layer!r} has {size} neurons")
            return self.readout_weight.shape[0]
        return size

    def readout(self, r):
        """The readout's logits z = r W_o^T + b_o for activities r (batch, size)."""
        return r @ self.readout_weight.T + self.readout_bias

    def readout_error(self, r, y):
        """softmax(z) - y, the readout's error: dl/dz for cross-entropy (batch, C)."""
        return _log_softmax(self.readout(r))[1] - y

    def value_and_grad(self, r, y):
        """(l per sample (batch,), dl/dr (batch, size)) for activities r and targets y, in NumPy; the
        reference that ``_kernels.teach`` is tested against, and the loss of exact gradients."""
        if self.kind == "squared_error":
            d = r - y
            return 0.5 * np.sum(d * d, axis=1), d
        logp, p = _log_softmax(self.readout(r))
        return -np.sum(y * logp, axis=1), (p - y) @ self.readout_weight


@dataclass(frozen=True, eq=False)
class Nudge:
    """The teaching current beta dl/dr_L of ``cost`` with targets ``target`` (batch, width)."""

    cost: Cost
    beta: complex | float
    target: np.ndarray

    def __post_init__(self):
        if not isinstance(self.cost, Cost):
            raise SubstrateValueError(f"nudge cost must be a Cost, got {type(self.cost).__name__}")
        if isinstance(self.beta, (bool, np.bool_)) or not isinstance(self.beta, numbers.Number):
            raise SubstrateValueError(f"beta={self.beta!r} must be a (real or complex) number")
        target = np.asarray(self.target)
        if target.dtype.kind not in "biufc":
            raise SubstrateValueError(f"nudge target must be an array of numbers, got {target.dtype}")
        object.__setattr__(self, "target", target)

    def kernel_args(self, network, dtype, batch):
        """The ``_kernels.Nudge`` that ``_kernels.teach`` reads, in the state's dtype and layout, validated."""
        c = self.cost
        m = c.width(network)
        y = self.target
        if y.shape != (batch, m):
            raise SubstrateValueError(f"nudge target has shape {y.shape}, expected (batch, {m}) = ({batch}, {m})")
        beta = complex(self.beta)
        if not np.isfinite(beta):
            raise SubstrateValueError(f"beta={self.beta!r} must be finite")
        if beta.imag != 0 and np.dtype(dtype).kind != "c":
            raise SubstrateValueError(f"a complex beta={self.beta!r} needs complex states: pass dtype='complex128'")
        if not np.all(np.isfinite(y)):
            raise SubstrateValueError("nudge target contains NaN or Inf")
        sl = network.slices[c.layer]
        cast = lambda a, dt=dtype: np.ascontiguousarray(a, dtype=dt)  # noqa: E731
        beta_arr = np.array([beta if np.dtype(dtype).kind == "c" else beta.real], dtype)
        if c.kind == "cross_entropy":  # the readout stays real for complex states
            wo, bo = cast(c.readout_weight, _real(dtype)), cast(c.readout_bias, _real(dtype))
        else:
            wo, bo = np.zeros((0, 0), _real(dtype)), np.zeros(0, _real(dtype))
        return K.Nudge(COSTS[c.kind], sl.start, sl.stop, beta_arr, cast(y.T), wo, bo,
                       np.empty((wo.shape[0] + 1, batch), dtype))

    def linearised(self, network, u):
        """The derivative of :meth:`current` at states u, (n, batch) in the engine's layout, as a
        function of v_L (the nudged layer's rows of a direction v, (size, batch)) giving dC/du v on
        those rows (zero elsewhere): beta H (rho'(u_L) * v_L), H the Hessian of l in r_L: I for
        squared error, W_o^T (diag(s) - s s^T) W_o with s = softmax(z) for cross-entropy. Exact and
        holomorphic (plain transposes); rho', s made once here, so that a product costs two readout
        products (the stability check's, :func:`~substrate.integrators.stability`)."""
        c = self.cost
        activation = network.layer(c.layer).activation
        ul = u[network.slices[c.layer]]
        d = self.beta * rho_prime(activation, ul)
        if c.kind == "squared_error":
            return lambda v: d * v
        wo = c.readout_weight
        s = c.readout_error(rho(activation, ul.T), 0.0).T  # softmax(z), (C, batch)

        def product(v):
            g = s * (wo @ (d * v))
            return wo.T @ (g - s * g.sum(axis=0))

        return product

    def current(self, network, u):
        """beta dl/dr_L at states u (batch, n), as a (batch, n) array (zero outside the layer)."""
        sl = network.slices[self.cost.layer]
        layer = network.layer(self.cost.layer)
        out = np.zeros_like(u)
        out[:, sl] = self.beta * self.cost.value_and_grad(rho(layer.activation, u[:, sl]), self.target)[1]
        return out


def _real(dtype):
    """The real dtype of a state dtype (float32 stays float32)."""
    return np.float32 if np.dtype(dtype) == np.float32 else np.float64


def no_nudge(dtype):
    """The kernel argument for 'no teaching current', with the same Numba types as a real one."""
    z2 = np.zeros((0, 0), dtype)
    return K.Nudge(K.NO_NUDGE, 0, 0, np.zeros(1, dtype), z2, np.zeros((0, 0), _real(dtype)),
                   np.zeros(0, _real(dtype)), np.zeros((1, 1), dtype))
