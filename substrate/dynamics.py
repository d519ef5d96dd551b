"""The vector field of the circuit and its derivatives, for one batch of inputs.

    F(u) = -u + W rho(u) + V x + b,        J = dF/du = -I + W diag(rho'(u))

(the ODE is tau du/dt = F(u); J here is the Jacobian of F, without the 1/tau). Every gradient method
is built from four products, each a Numba kernel in ``_kernels``:

* ``F(u)``,
* ``jvp(u, v)``   = J v = -v + W (rho'(u) v),
* ``vjp(u, w)``   = J^T w = -w + rho'(u) (W^T w),
* ``param_vjp(u, w)`` = (dF/dtheta)^T w: for a weight W_c from pre to post, w_post rho(u_pre)^T summed
  over the batch (masked; a tied feedback weight adds its transpose to the forward weight's gradient);
  for a bias, w summed over the batch; for an input projection V, w_post x^T; for the input itself,
  V^T w_post per sample (computed when first read: :class:`InputGradients`).

User-facing arrays are (batch, n) in state order (``network.slices`` gives each layer's columns).
For complex states every product is the plain (holomorphic) transpose, never the conjugate.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import numpy as np

from . import _kernels as K
from .activations import HOLOMORPHIC
from .errors import SubstrateValueError
from .network import Network, check_dtype


def resolve_dtype(network: Network, dtype=None) -> np.dtype:
    """The state dtype: the network's by default; complex128 is allowed for a float64 network whose
    activations are all holomorphic (holomorphic EP nudges a real circuit with complex beta)."""
    net = network.dtype
    if dtype is None and net.kind != "c":  # the network's own real dtype (every call's default)
        return net
    dtype = net if dtype is None else check_dtype(dtype)
    if dtype == np.complex128:
        bad = [x.name for x in network.layers if x.activation not in HOLOMORPHIC]
        if bad:
            raise SubstrateValueError(
                f"dtype=complex128 needs holomorphic activations; layers {bad} use "
                f"{sorted({network.layer(b).activation for b in bad})} (allowed: {sorted(HOLOMORPHIC)})")
    if not (dtype == net or (net == np.float64 and dtype == np.complex128)):
        raise SubstrateValueError(
            f"mismatched dtypes: the network's parameters are {net} but dtype={dtype} was asked; "
            f"allowed: {net}" + (" or complex128" if net == np.float64 else ""))
    return dtype


class VectorField:
    """F and its derivatives for ``network`` driven by inputs ``x`` (the constant drive V x + b is
    computed here once). ``batch`` is needed only for a network without inputs."""

    def __init__(self, network: Network, x=None, *, batch: int | None = None, dtype=None):
        self.network = network
        self.dtype = resolve_dtype(network, dtype)
        self.inputs = network.check_inputs(x, finite=False)  # prepared() checks what it has not seen
        # the packed weights, the input projections as read now (on a device: with this read's noise;
        # a copy, so that param_vjp agrees with F after in-place edits) and the drive V x + b: cached
        # on the network while its parameters and these inputs are unchanged, shared, never written
        self.packed, self._input_weights, self.drive = network.prepared(self.inputs, batch, self.dtype)
        self.batch = self.drive.shape[1]
        self.effects = network.kernel_effects(self.packed, self.batch)
        # does an effect change rho (a device's activation mismatch)? The derivative kernels are nominal
        self.mismatch = bool(self.effects) and any(getattr(e, "changes_activation", False) for e in self.effects)

    @cached_property
    def _tmp(self) -> np.ndarray:
        """The products' scratch (largest layer, batch), made when first used (integrate and relax
        bring their own)."""
        return np.empty((self.packed.max_rows, self.batch), self.dtype)

    @cached_property
    def zero_state(self) -> np.ndarray:
        """Zeros (n, batch) in the engine's layout: the default initial state of integrate and relax,
        made once per field (a field is reused by calls on the same parameters and inputs) and never
        written (the stepping kernel copies its initial state)."""
        return np.zeros((self.network.n, self.batch), self.dtype)

    def state(self, u, argument: str = "u", finite: bool = True) -> np.ndarray:
        """Validate a (batch, n) state and return the engine's (n, batch) C-ordered copy.
        ``finite=False`` leaves out the NaN/Inf check, for a caller that makes it later (relax)."""
        u = np.asarray(u)
        if u.shape != (self.batch, self.network.n):
            raise SubstrateValueError(
                f"{argument} has shape {u.shape}, expected (batch, n) = ({self.batch}, {self.network.n})")
        if u.dtype is not self.dtype and u.dtype != self.dtype:  # the same (canonical) dtype object, mostly
            if u.dtype.kind in "iu" or (u.dtype.kind == "f" and self.dtype.kind == "c"):
                u = u.astype(self.dtype)
            else:
                raise SubstrateValueError(
                    f"mismatched dtypes: {argument} is {u.dtype} but the states are {self.dtype}; "
                    f"pass dtype={u.dtype.name!r} or convert {argument}")
        if finite and not np.logical_and.reduce(np.isfinite(u), axis=None):  # not ndarray.all: its Python wrapper
            raise SubstrateValueError(f"{argument} contains NaN or Inf")
        return u.T.copy()  # C-ordered, a copy also of a batch of one (whose u.T is C-ordered already)

    def _args(self):
        p = self.packed
        return p.wbuf, p.conn, p.layer_off, p.layer_act

    @property
    def circuit(self):
        """The circuit as the stepping and adjoint kernels take it (a ``_kernels.Circuit``)."""
        p = self.packed
        return K.Circuit(self.drive, p.wbuf, p.conn, p.layer_off, p.layer_act, p.tauinv, p.tau)

    @cached_property
    def circuit_fields(self) -> tuple:
        """:attr:`circuit` as a plain tuple (``_kernels.run`` types it faster), made once: a field is
        reused by the calls on the same parameters and inputs (``integrators._field``)."""
        p = self.packed
        return self.drive, p.wbuf, p.conn, p.layer_off, p.layer_act, p.tauinv, p.tau

    def __call__(self, u) -> np.ndarray:
        """F(u) (on a device with activation mismatch, with its neurons' rho(g (u - o)))."""
        ut = self.state(u)
        out, r = np.empty_like(ut), np.empty_like(ut)
        p = self.packed
        if self.mismatch:
            K.activate_effects(self.effects, ut, self.circuit, r)
            K.weights_times(r, p.wbuf, p.conn, p.layer_off, self._tmp, out)
            out += self.drive
            out -= ut
        else:
            K.field(ut, self.drive, p.wbuf, p.conn, p.layer_off, p.layer_act, self._tmp, r, out)
        return out.T

    def _nominal_neurons(self, what):
        if self.mismatch:
            raise SubstrateValueError(
                f"{what}: the device's neurons have activation mismatch, which the engine's derivative "
                "kernels do not model; differentiate its nominal network (twin=True in substrate.gradient)")

    def jvp(self, u, v) -> np.ndarray:
        """J v."""
        self._nominal_neurons("jvp")
        return self.jvp_engine(self.state(u), self.state(v, "v")).T

    def jvp_engine(self, ut, vt) -> np.ndarray:
        """J v in the engine's layout, (n, batch) C-ordered arrays, unchecked (for inner loops)."""
        out, d = np.empty_like(ut), np.empty_like(ut)
        K.jvp(ut, vt, *self._args(), self._tmp, d, out)
        return out

    def jvp_at(self, ut):
        """v -> J v at the states ut for many v (engine layout, (n, batch) C-ordered arrays,
        unchecked): rho'(u) made once (a third of a complex product's time), each product
        ``_kernels.jvp_given``, the bits of :meth:`jvp_engine`."""
        p = self.packed
        d = np.empty_like(ut)
        K.activate_prime(ut, p.layer_off, p.layer_act, d)

        def product(vt):
            out, dv = np.empty_like(ut), np.empty_like(ut)
            K.jvp_given(d, vt, p.wbuf, p.conn, p.layer_off, self._tmp, dv, out)
            return out

        return product

    def vjp(self, u, w) -> np.ndarray:
        """J^T w."""
        self._nominal_neurons("vjp")
        ut, wt = self.state(u), self.state(w, "w")
        out, d = np.empty_like(ut), np.empty_like(ut)
        K.vjp(ut, wt, *self._args(), self._tmp, d, out)
        return out.T

    def param_vjp(self, u, w) -> dict:
        """(dF/dtheta)^T w as ``{"weights": {connection name: array}, "biases": {layer: array},
        "inputs": {input: (batch, size) array}}``; weights and biases summed over the batch, every
        array of its parameter's shape. Tied connections have no entry: their gradient is added to the
        forward weight they are tied to."""
        p = self.packed
        ut, wt = self.state(u), self.state(w, "w")
        r = np.empty_like(ut)
        K.activate_effects(self.effects, ut, self.circuit, r)  # with a device's activation mismatch, if any
        flat = np.empty(p.wbuf.shape, self.dtype)  # complex states: complex gradients of real weights
        K.weight_vjp(wt, r, p.conn, flat)
        return self.parameter_gradients(flat, wt)

    def parameter_gradients(self, flat, gdrive) -> dict:
        """Map cotangents of the engine's packed quantities to the network's own parameters:
        ``flat``, the gradient of the packed (effective) state-to-state weights, and ``gdrive`` (n,
        batch), the cotangent of the drive V x + b. Masks are applied, tied gradients added
        (transposed) to their source, and the drive's cotangent gives the biases (summed over the
        batch), the input weights and the inputs."""
        net, p = self.network, self.packed
        weights, projections = {}, []
        for c in net.connections:
            post = net.slices[c.post]
            if c.pre in net.inputs_by_name:
                g = gdrive[post] @ self.inputs[c.pre]  # gradient of the effective weight
                projections.append((c.pre, self._input_weights[c.name], gdrive[post]))
            else:
                i = p.conn_names.index(c.name)
                off, _, pn, _, qn = p.conn[i]
                g = flat[off:off + qn * pn].reshape(qn, pn).copy()
            if c.mask is not None:
                g = g * c.mask
            if c.tied:  # W_tied = (W_src * M_src)^T * M_tied
                src = net.connection(f"{c.post}->{c.pre}")
                g = g.T if src.mask is None else g.T * src.mask
                weights[src.name] = weights.get(src.name, 0) + g
            else:
                weights[c.name] = weights.get(c.name, 0) + g
        biases = {x.name: gdrive[net.slices[x.name]].sum(axis=1) for x in net.layers}
        sizes = {name: inp.size for name, inp in net.inputs_by_name.items()}
        inputs = InputGradients(sizes, projections, self.batch, gdrive.dtype)
        return {"weights": weights, "biases": biases, "inputs": inputs}


class InputGradients(Mapping):
    """{input name: dL/dx, (batch, size)}: the sum over the input's projections V (post x size) of
    (V^T gbar_post)^T, gbar the cotangent of the drive V x + b, computed when first read. A training
    step reads the parameters' gradients only, and this product costs as much as the input weights'
    gradient (784-500-10, batch 64: 25M multiply-adds, about half a relaxation's time): computed for
    every gradient, it was a quarter of an implicit gradient's time. ``sizes``: {input name: size};
    ``projections``: (input name, V, gbar_post) per projection, arrays that nothing writes (the
    network's prepared input weights, and a cotangent made for this gradient); dx in ``dtype``, gbar's."""

    def __init__(self, sizes: dict, projections: list, batch: int, dtype):
        self._sizes, self._projections, self._batch, self._dtype = sizes, projections, batch, dtype
        self._dx = None

    @property
    def _computed(self) -> dict:
        if self._dx is None:
            dx = {name: np.zeros((self._batch, size), self._dtype) for name, size in self._sizes.items()}
            for name, v, g in self._projections:
                dx[name] += (v.T @ g).T
            self._dx, self._projections = dx, None  # the operands are no longer held
        return self._dx

    def __getitem__(self, name):
        return self._computed[name]

    def __iter__(self):
        return iter(self._sizes)

    def __len__(self):
        return len(self._sizes)

    def __repr__(self):
        return repr(self._computed)


def rightmost_eigenvalues(matvec, n: int, batch: int, dtype, max_dim: int = 12):
    """The rightmost eigenvalue of a batch of n x n operators, one per sample, by Arnoldi.

    ``matvec(V)`` applies every sample's operator to its column of V (n, batch). The Krylov space has
    dimension m = min(n, max_dim): for n <= max_dim it is the whole space and the eigenvalues are
    those of the operator up to rounding; beyond, they are Ritz values, which converge first to the
    eigenvalues standing out of the spectrum (for J = -I + W diag(rho'), an unstable one stands out
    of the bulk around -1). Returns (theta, residual), both (batch,): per sample the Ritz value
    maximising Re(theta) - residual, where residual = |h_{m+1,m} y_m| bounds the distance to an
    eigenvalue (of a normal operator; 0 when the space is complete), so that Re(theta) - residual is
    what an instability test can rely on. Cost: m products and O(m^2 n) per sample.
    """
    m = min(n, max_dim)
    # the operator in its own dtype, the Krylov basis in double precision (a float32 basis loses its
    # orthogonality on clustered spectra and its Ritz values are then off by O(0.1))
    work = np.result_type(dtype, np.float64)
    # a fixed seed: the start vector only has to be generic, and the check must be reproducible
    rng = np.random.default_rng(0)
    V = np.zeros((batch, m + 1, n), work)  # per sample, the basis vectors as rows
    H = np.zeros((batch, m + 1, m), work)

    def orthogonalise(basis, w):
        # classical Gram-Schmidt twice (orthogonal to working precision), batched as matrix
        # products; returns the coefficients. Complex: basis^H w as conj(basis conj(w)), the same
        # bits (each product's parts negated exactly) without a conjugated copy of the basis
        h, cplx = 0, basis.dtype.kind == "c"
        for _ in range(2):
            c = (basis @ w.conj()[:, :, None])[..., 0].conj() if cplx else (basis @ w[:, :, None])[..., 0]
            w -= (c[:, None, :] @ basis)[:, 0]
            h = h + c
        return h

    v = rng.standard_normal((batch, n)).astype(work)
    V[:, 0] = v / np.linalg.norm(v, axis=1)[:, None]
    for j in range(m):
        w = np.array(matvec(np.ascontiguousarray(V[:, j].T, dtype)).T, work)  # C order: the engine's layout
        scale = np.linalg.norm(w, axis=1)
        H[:, :j + 1, j] = orthogonalise(V[:, :j + 1], w)
        if j + 1 == n:  # the Krylov space is the whole space
            break
        beta = np.linalg.norm(w, axis=1)
        # breakdown: V[:j+1] spans an invariant subspace; go on with a fresh direction (h_{j+1,j} = 0
        # keeps H block triangular, its eigenvalues still the operator's)
        dead = beta <= 1e-10 * scale
        H[:, j + 1, j] = np.where(dead, 0, beta)
        if dead.any():
            fresh = rng.standard_normal((int(dead.sum()), n)).astype(work)
            orthogonalise(V[dead, :j + 1], fresh)
            w[dead] = fresh
            beta = np.where(dead, np.linalg.norm(w, axis=1), beta)
        V[:, j + 1] = w / beta[:, None]
    theta, Y = np.linalg.eig(H[:, :m, :m])
    residual = np.abs(H[:, m, m - 1])[:, None] * np.abs(Y[:, m - 1, :])
    best = np.argmax(theta.real - residual, axis=1)
    pick = np.arange(batch)
    return theta[pick, best], residual[pick, best]
