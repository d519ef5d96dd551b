"""Nonlinear resistive circuits: Kirchhoff's current law as the dynamics (docs/equations.md, section 10).

Node voltages V (volts; ground 0). At every node i not held by a voltage source

    C_i dV_i/dt = F_i(V) = sum_{edges e=(i,j)} g_e (V_j - V_i) - sum_{elements} I_out,i(V) + I_i^src

with the elements

* a linear conductance g_e (siemens) between two nodes: the trainable weights;
* a diode from anode a to cathode b (Shockley): I = I_s (exp((V_a - V_b)/(n V_T)) - 1), ideality n;
* a FET (drain d, gate g, source s), an EKV-style smooth square law, symmetric in drain and source:
  I_ds = K [s(V_g - V_s - V_th)^2 - s(V_g - V_d - V_th)^2],  s(v) = phi ln(1 + e^{v/phi}),
  phi = 2 n V_T; above threshold this is the square law K (V_gs - V_th)^2 in saturation and
  K V_ds (2 (V_gs - V_th) - V_ds) in triode, below it a subthreshold exponential; the gate draws
  no current;
* voltage sources holding the input nodes at x, constant current sources I^src into nodes.

Units are SI but only ratios matter: scaling every g, I_s, K and I^src by one factor leaves V unchanged.

The DC operating point F(V) = 0 is found by a damped Newton solve (:func:`dc`) or by relaxing the
dynamics in time (:func:`relax`). Without FETs the circuit is reciprocal: F = -dE/dV for the
co-content E(V) = sum_e int_0^{dV_e} I_e(v) dv - sum_i I_i^src V_i (:meth:`CircuitField.energy`),
the Jacobian is symmetric negative definite (for a circuit where every node reaches a source or
ground through conductances) and the operating point minimises E, so equilibrium propagation applies
exactly with E as the energy. A FET's Jacobian is not symmetric (its gate is an input only).

The nudge of EP is a current beta dl/dV_out injected at the output nodes (l = |V_out - y|^2 / 2 per
sample; Laborieux and Zenke's sign, as ``substrate.nudge``); coupled learning instead clamps the
outputs with voltage sources (``clamp``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import SubstrateValueError
from ..validate import count, positive
from . import _kernels as K

# kT/q at 300 K (CODATA 2018 exact constants)
V_T = 1.380649e-23 * 300.0 / 1.602176634e-19


def _nodes(a, n, what, width=None) -> np.ndarray:
    a = np.asarray(a if a is not None else np.zeros((0,) if width is None else (0, width)), dtype=np.int64)
    if width is not None and (a.ndim != 2 or a.shape[1] != width):
        raise SubstrateValueError(f"{what} must be an integer array (count, {width}), got shape {a.shape}")
    if width is None and a.ndim != 1:
        raise SubstrateValueError(f"{what} must be a 1-d integer array of nodes, got shape {a.shape}")
    if a.size and (a.min() < -1 or a.max() >= n):
        raise SubstrateValueError(f"{what} has nodes outside -1..{n - 1} (-1 is the ground)")
    return a


def _values(v, size, what, *, allow_zero=False) -> np.ndarray:
    v = np.array(np.broadcast_to(np.asarray(v, dtype=float), (size,)))
    if not np.all(np.isfinite(v)) or (np.any(v < 0) if allow_zero else np.any(v <= 0)):
        raise SubstrateValueError(f"{what} must be finite and {'>= 0' if allow_zero else '> 0'}")
    return v


@dataclass(eq=False)
class Circuit:
    """A circuit of ``n`` nodes (0..n-1; -1 is the ground). ``edges`` (E, 2) with ``conductance``
    (E,), the trainable weights, updated in place; ``diodes`` (D, 2) (anode, cathode) with
    ``diode_is`` and ``diode_n`` per element (mismatch: one value per element); ``fets`` (M, 3)
    (drain, gate, source) with ``fet_k``, ``fet_vth``, ``fet_n``; ``inputs``: the nodes held by
    voltage sources at x (batch, len(inputs)); ``outputs``: the nodes the cost reads; ``sources``
    with ``source_current``: constant currents into nodes; ``capacitance`` to ground per node."""

    n: int
    edges: np.ndarray
    conductance: np.ndarray
    inputs: np.ndarray
    outputs: np.ndarray
    diodes: np.ndarray | None = None
    diode_is: np.ndarray | float = 1e-12
    diode_n: np.ndarray | float = 1.0
    fets: np.ndarray | None = None
    fet_k: np.ndarray | float = 1.0
    fet_vth: np.ndarray | float = 0.5
    fet_n: np.ndarray | float = 1.0
    sources: np.ndarray | None = None
    source_current: np.ndarray | float = 0.0
    capacitance: np.ndarray | float = 1.0
    v_t: float = V_T
    _free: np.ndarray = field(init=False, repr=False)
    # the engine's entry points on a circuit (substrate.circuits.engine; ``substrate.relax``, ``integrate``
    # and ``gradient`` dispatch to them): set by the package, as engine imports this module
    engine: ClassVar = None
    # structures that depend on the topology only (fixed once built): the stamp pattern, sparse patterns
    _cache: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        n = self.n = count(self.n, "Circuit(n)")
        self.edges = _nodes(self.edges, n, "Circuit(edges)", 2)
        g = np.asarray(self.conductance, dtype=float)
        if g.shape != (len(self.edges),) or not np.all(np.isfinite(g)) or np.any(g < 0):
            raise SubstrateValueError(f"Circuit(conductance) must be {len(self.edges)} finite values >= 0 (one "
                                      f"per edge), got shape {g.shape}")
        self.conductance = np.ascontiguousarray(g)
        self.diodes = _nodes(self.diodes, n, "Circuit(diodes)", 2)
        self.fets = _nodes(self.fets, n, "Circuit(fets)", 3)
        self.inputs, self.outputs = _nodes(self.inputs, n, "Circuit(inputs)"), _nodes(self.outputs, n, "Circuit(outputs)")
        self.sources = _nodes(self.sources, n, "Circuit(sources)")
        for what, nodes in (("inputs", self.inputs), ("outputs", self.outputs)):
            if np.any(nodes < 0) or len(np.unique(nodes)) != len(nodes):
                raise SubstrateValueError(f"Circuit({what}) must be distinct nodes >= 0 (not the ground)")
        if np.intersect1d(self.inputs, self.outputs).size:
            raise SubstrateValueError("Circuit: a node cannot be both an input (voltage source) and an output")
        self.diode_is = _values(self.diode_is, len(self.diodes), "Circuit(diode_is)")
        self.diode_n = _values(self.diode_n, len(self.diodes), "Circuit(diode_n)")
        self.fet_k = _values(self.fet_k, len(self.fets), "Circuit(fet_k)", allow_zero=True)
        self.fet_vth = np.array(np.broadcast_to(np.asarray(self.fet_vth, float), (len(self.fets),)))
        if not np.all(np.isfinite(self.fet_vth)):
            raise SubstrateValueError("Circuit(fet_vth) must be finite")
        self.fet_n = _values(self.fet_n, len(self.fets), "Circuit(fet_n)")
        self.source_current = np.array(np.broadcast_to(np.asarray(self.source_current, float), (len(self.sources),)))
        if not np.all(np.isfinite(self.source_current)):
            raise SubstrateValueError("Circuit(source_current) must be finite")
        self.capacitance = _values(self.capacitance, n, "Circuit(capacitance)")
        self.v_t = positive(self.v_t, "Circuit(v_t)")
        free = np.ones(n + 1, bool)
        free[self.inputs] = False
        free[n] = False
        self._free = free

    # ---------------------------------------------------------------- structure
    def internal(self, a):
        """Node indices with the ground (-1) as node n, the kernels' layout."""
        return np.where(a < 0, self.n, a)

    @property
    def free_nodes(self) -> np.ndarray:
        """The nodes whose voltage the circuit sets (not held by a voltage source): the state's columns."""
        return np.flatnonzero(self._free)

    @property
    def reciprocal(self) -> bool:
        """Whether the Jacobian is symmetric and the co-content an energy (no FET)."""
        return len(self.fets) == 0

    def kernel_args(self) -> tuple:
        """The element arrays in the order the kernels take them (ground as node n)."""
        e, d, f = self.internal(self.edges), self.internal(self.diodes), self.internal(self.fets)
        c = np.ascontiguousarray
        return (c(e[:, 0]), c(e[:, 1]), self.conductance, c(d[:, 0]), c(d[:, 1]), self.diode_is,
                self.diode_n * self.v_t, c(f[:, 0]), c(f[:, 1]), c(f[:, 2]), self.fet_k, self.fet_vth,
                2.0 * self.fet_n * self.v_t)

    def stamp_pattern(self) -> tuple:
        """(rows, cols) of the kernels' stamps (see ``_kernels.stamps``), ground as node n (computed once)."""
        if "stamps" not in self._cache:
            self._cache["stamps"] = self._stamp_pattern()
        return self._cache["stamps"]

    def _stamp_pattern(self) -> tuple:
        e, d, f = self.internal(self.edges), self.internal(self.diodes), self.internal(self.fets)
        two = np.concatenate([e, d])
        rows = [np.stack([two[:, 0], two[:, 0], two[:, 1], two[:, 1]], 1).ravel(),
                np.stack([f[:, 0]] * 3 + [f[:, 2]] * 3, 1).ravel()]
        cols = [np.stack([two[:, 0], two[:, 1], two[:, 0], two[:, 1]], 1).ravel(),
                np.stack([f[:, 0], f[:, 1], f[:, 2]] * 2, 1).ravel()]
        return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)

    def check_inputs(self, x) -> np.ndarray:
        """x as a float (batch, len(inputs)) array."""
        x = np.asarray(x, dtype=float)
        if x.ndim != 2 or x.shape[1] != len(self.inputs):
            raise SubstrateValueError(f"x has shape {x.shape}, expected (batch, {len(self.inputs)}): one voltage "
                                      "per input node")
        if not np.all(np.isfinite(x)):
            raise SubstrateValueError("x contains NaN or Inf")
        return x

    def parameters(self) -> dict:
        """{name: array} of the trainable parameters (updated in place): the conductances."""
        return {"conductance": self.conductance}


@dataclass(frozen=True)
class Clamp:
    """Extra voltage sources for one solve: ``values`` (batch, len(nodes)) held at ``nodes`` (coupled
    learning's clamped state)."""

    nodes: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class Teach:
    """EP's nudge: a current beta (V_out - y) injected at the output nodes, i.e. beta dl/dV_out for
    l = |V_out - y|^2 / 2 (positive beta pushes the outputs up the cost, as ``substrate.nudge``)."""

    beta: float
    target: np.ndarray


class CircuitField:
    """F and its derivatives for ``circuit`` at inputs ``x`` (and optionally a clamp and a nudge): the
    circuit's counterpart of :class:`substrate.VectorField`. States u are the free nodes' voltages
    (batch, number of free nodes), in the order of ``self.free``; J = dF/du."""

    def __init__(self, circuit: Circuit, x, clamp: Clamp | None = None, teach: Teach | None = None):
        self.circuit = circuit
        self.x = circuit.check_inputs(x)
        self.batch = len(self.x)
        free = circuit._free.copy()
        self.clamp = clamp
        if clamp is not None:
            nodes = _nodes(clamp.nodes, circuit.n, "Clamp(nodes)")
            values = np.asarray(clamp.values, float)
            if values.shape != (self.batch, len(nodes)) or not np.all(np.isfinite(values)):
                raise SubstrateValueError(f"Clamp(values) must be finite, shape ({self.batch}, {len(nodes)})")
            if not np.all(free[nodes]):
                raise SubstrateValueError("Clamp(nodes) must be free nodes (not inputs or the ground)")
            free[nodes] = False
        self.free = np.flatnonzero(free)
        self.teach = teach
        if teach is not None:
            y = np.asarray(teach.target, float)
            if y.shape != (self.batch, len(circuit.outputs)) or not np.all(np.isfinite(y)):
                raise SubstrateValueError(f"the target must be finite, shape ({self.batch}, {len(circuit.outputs)})")
            if not np.all(free[circuit.outputs]):
                raise SubstrateValueError("a nudge needs free output nodes (not clamped)")
            self._out = np.searchsorted(self.free, circuit.outputs)  # output columns of u
        self.args = circuit.kernel_args()
        self.rows, self.cols = circuit.stamp_pattern()
        base = np.zeros((self.batch, circuit.n + 1))
        base[:, circuit.inputs] = self.x
        if clamp is not None:
            base[:, nodes] = values
        self._base = base
        self._src = (circuit.internal(circuit.sources), circuit.source_current)
        self.evaluations = 0  # of F, by the solvers using this field (their counts' nfev)

    @property
    def size(self) -> int:
        """The number of free nodes (the state's width)."""
        return len(self.free)

    def state(self, u) -> np.ndarray:
        """u as a float (batch, free nodes) copy, checked."""
        u = np.array(u, dtype=float)
        if u.shape != (self.batch, self.size) or not np.all(np.isfinite(u)):
            raise SubstrateValueError(f"u must be finite, shape (batch, free nodes) = ({self.batch}, {self.size}), "
                                      f"got {u.shape}")
        return u

    def full(self, u) -> np.ndarray:
        """Every node's voltage (batch, n + 1; the last column the ground) from the free ones."""
        u = np.asarray(u, float)
        if u.shape != (self.batch, self.size):
            raise SubstrateValueError(f"u has shape {u.shape}, expected (batch, free nodes) = ({self.batch}, {self.size})")
        V = self._base.copy()
        V[:, self.free] = u
        return V

    def __call__(self, u) -> np.ndarray:
        """F(u) (with the nudge's current, if any) at the free nodes; counted in ``evaluations``."""
        self.evaluations += 1
        V = self.full(u)
        out = np.empty_like(V)
        K.currents(V, *self.args[:7], *self.args[7:], *self._src, out)
        F = out[:, self.free]
        if self.teach is not None:
            F[:, self._out] += self.teach.beta * (u[:, self._out] - self.teach.target)
        return F

    def stamp_values(self, u) -> np.ndarray:
        """(batch, stamps): every stamp's value at u (nudge excluded)."""
        vals = np.empty((self.batch, len(self.rows)))
        K.stamps(self.full(u), *self.args, vals)
        return vals

    def _product(self, u, v, transpose):
        vals = self.stamp_values(u)
        V = np.zeros((self.batch, self.circuit.n + 1))
        V[:, self.free] = v
        out = np.empty_like(V)
        rows, cols = (self.cols, self.rows) if transpose else (self.rows, self.cols)
        K.stamp_product(vals, rows, cols, V, out)
        return out

    def jvp(self, u, v) -> np.ndarray:
        """J v."""
        out = self._product(u, v, False)[:, self.free]
        if self.teach is not None:
            out[:, self._out] += self.teach.beta * np.asarray(v)[:, self._out]
        return out

    def vjp(self, u, w) -> np.ndarray:
        """J^T w."""
        out = self._product(u, w, True)[:, self.free]
        if self.teach is not None:
            out[:, self._out] += self.teach.beta * np.asarray(w)[:, self._out]
        return out

    def jacobian(self, u) -> np.ndarray:
        """J per sample, (batch, free, free), dense (only the stamps between free nodes are summed: a
        network with many input nodes would not fit as a dense matrix over every node)."""
        if not hasattr(self, "_free_stamps"):
            index = np.full(self.circuit.n + 1, -1)
            index[self.free] = np.arange(self.size)
            r, c = index[self.rows], index[self.cols]
            keep = np.flatnonzero((r >= 0) & (c >= 0))
            self._free_stamps = keep, r[keep], c[keep]
        keep, r, c = self._free_stamps
        J = np.empty((self.batch, self.size, self.size))
        K.dense_stamps(np.ascontiguousarray(self.stamp_values(u)[:, keep]), r, c, J)
        if self.teach is not None:
            J[:, self._out, self._out] += self.teach.beta
        return J

    def param_vjp(self, u, w) -> dict:
        """(dF/dtheta)^T w summed over the batch: {"conductance": (E,), "source_current": (S,)}, and
        "inputs": (batch, len(inputs)), (dF/dx)^T w per sample. dF_a/dg_e = -(V_a - V_b) at the
        edge's ends a and b (+ at b), so the conductance's is -sum_b (w_a - w_b)(V_a - V_b)."""
        c = self.circuit
        V = self.full(u)
        W = np.zeros_like(V)
        W[:, self.free] = w
        a, b = c.internal(c.edges[:, 0]), c.internal(c.edges[:, 1])
        dg = -np.einsum("be,be->e", W[:, a] - W[:, b], V[:, a] - V[:, b])
        ds = W[:, c.internal(c.sources)].sum(axis=0)
        dx = np.empty_like(W)  # J_full^T w, whose input columns are (dF/dx)^T w
        K.stamp_product(self.stamp_values(u), self.cols, self.rows, W, dx)
        return {"conductance": dg, "source_current": ds, "inputs": dx[:, c.inputs]}

    def energy(self, u) -> np.ndarray:
        """The co-content E(V) per sample (reciprocal circuits only): F = -dE/du."""
        c = self.circuit
        if not c.reciprocal:
            raise SubstrateValueError("the co-content is an energy only for a reciprocal circuit (no FETs)")
        V = self.full(u)
        e, d = c.internal(c.edges), c.internal(c.diodes)
        dv = V[:, e[:, 0]] - V[:, e[:, 1]]
        E = 0.5 * (dv * dv) @ c.conductance
        nvt = c.diode_n * c.v_t
        dd = V[:, d[:, 0]] - V[:, d[:, 1]]
        E += (c.diode_is * (nvt * np.expm1(dd / nvt) - dd)).sum(axis=1)
        E -= V[:, c.internal(c.sources)] @ c.source_current
        return E
