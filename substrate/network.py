"""The circuit: layers of leaky neurons and the connections between them (docs/equations.md, section 1).

    tau_i du_i/dt = F_i(u) = -u_i + sum_j W_ij rho(u_j) + sum_k V_ik x_k + b_i

A :class:`Network` holds state layers (:class:`Layer`), clamped inputs (:class:`Input`) and
:class:`Connection` s. A connection's weight has shape (post size, pre size), so that the current into
``post`` is ``weight @ rho(u_pre)``; from an input it is ``weight @ x``. Any topology is allowed:
forward, feedback, lateral (pre == post, masked diagonal), or a loop from the output back to the first
hidden layer. A feedback connection can be *tied* (its weight is always the transpose of the forward
one) or independent.

Parameters are plain NumPy arrays owned by the network (float32, float64 or complex128, one dtype for
the whole network). ``integrate`` and ``relax`` use the engine's packed copy of them and the drive
V x + b cached on the network (:meth:`Network.prepared`), checked at every call against the parameters
as they are now: a new array (assignment) or changed contents (an in-place edit by a user, an
optimiser, a device write, a load) make a new copy, so editing them between calls is safe; a
``VectorField`` keeps the copy it was constructed with.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import operator
import sys
import warnings
from collections.abc import Iterable, Mapping
from itertools import chain
from dataclasses import dataclass, replace
from functools import cache, cached_property
from typing import Sequence

import numpy as np

from . import _kernels as K
from . import activations
from .counts import Counts, crossbar_devices
from .errors import SubstrateValueError

DTYPES = (np.float32, np.float64, np.complex128)
_FLOAT64 = np.dtype(np.float64)
# A parameter array up to this many bytes is fingerprinted by its bytes (cheaper than numpy's per-call
# overhead); a larger one by an exact copy, compared in one pass (a few ms at 2048 x 2048 f64, a
# fraction of a step of that network).
_BYTES_LIMIT = 16384
_DTYPE_NAMES = "float32, float64, complex128"


def check_dtype(dtype, argument: str = "dtype") -> np.dtype:
    """``dtype`` as a numpy dtype if it is float32, float64 or complex128 (holomorphic EP), else a
    SubstrateValueError naming ``argument``."""
    try:
        with warnings.catch_warnings():  # numpy's deprecated aliases ('a') are refused below anyway
            warnings.simplefilter("ignore", DeprecationWarning)
            d = np.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d.type not in DTYPES:
        raise SubstrateValueError(f"{argument}={dtype!r} is not supported; allowed: {_DTYPE_NAMES}")
    return d


def _snapshot(value):
    """What :func:`_unchanged` compares ``value`` with later (None for what cannot change in place)."""
    if not isinstance(value, np.ndarray):
        return None  # immutable (a float tau, an activation name, None): its identity is enough
    return value.shape, value.dtype, value.tobytes() if value.nbytes <= _BYTES_LIMIT else value.copy()


def _bits(a: np.ndarray) -> np.ndarray:
    """The bits of ``a`` as unsigned integers: exact comparison, NaN payloads and -0.0 included."""
    a = np.ascontiguousarray(a).reshape(-1)
    return a.view(np.uint64 if a.itemsize % 8 == 0 else np.uint32 if a.itemsize == 4 else np.uint8)


def _libc_memcmp():
    """C's memcmp (one pass over both arrays, no temporary: half np.array_equal's time), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or ("msvcrt" if sys.platform == "win32" else None))
        f = libc.memcmp
    except (OSError, AttributeError, TypeError):
        return None
    f.restype, f.argtypes = ctypes.c_int, (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    return f


_memcmp = _libc_memcmp()


def _same(a: np.ndarray, snapshot) -> bool:
    """Has array ``a`` the shape, dtype and bits of ``snapshot`` (from :func:`_snapshot`)?"""
    shape, dtype, content = snapshot
    if a.shape != shape or a.dtype != dtype:
        return False
    if isinstance(content, bytes):
        return a.tobytes() == content
    a = np.ascontiguousarray(a)  # content is C-contiguous, of the same shape and dtype: the same bytes
    if _memcmp is not None:
        return _memcmp(a.ctypes.data, content.ctypes.data, a.nbytes) == 0
    return np.array_equal(_bits(a), _bits(content))


def _fingerprint(network, sources: list) -> list:
    """What :func:`_unchanged` compares ``sources`` (``network._sources()``) with later: the objects
    themselves (an assignment makes a new one) and, for the arrays among them, shapes, dtypes and bits
    (an in-place edit): the small arrays' bytes joined into one string (one comparison for all: a
    network's biases and small weights cost ~0.3 us each through :func:`_same`), the large ones as
    :func:`_snapshot` s. Then the assignment count (``_ASSIGNMENTS``) before ``sources`` were read
    and the network's layers and connections, which let :func:`_unchanged` skip reading the sources."""
    count = _ASSIGNMENTS[0]
    arrays = [v for v in sources if isinstance(v, np.ndarray)]
    small = [a for a in arrays if a.nbytes <= _BYTES_LIMIT]
    large = [(a, _snapshot(a)) for a in arrays if a.nbytes > _BYTES_LIMIT]
    return [sources, small, list(map(_LAYOUT, small)), b"".join(map(_BYTES, small)), large,
            count, list(network.layers), list(network.connections)]


# through map, in C: a list comprehension's frame costs more than these small arrays' reads
_LAYOUT = operator.attrgetter("shape", "dtype")
_BYTES = np.ndarray.tobytes
_LAYER_SOURCES = operator.attrgetter("activation", "tau", "bias")
_CONNECTION_SOURCES = operator.attrgetter("weight", "mask", "tied")


def _unchanged(network, fingerprint) -> bool:
    """Are ``network``'s sources (:meth:`Network._sources`) the very objects of ``fingerprint``
    (:func:`_fingerprint`), arrays with unchanged shapes, dtypes and contents? Without an assignment to
    any layer or connection since, and with the same layers and connections in the network, they are
    the same objects: only the arrays are compared (reading and comparing the ~15 sources of a small
    network is a tenth of its call)."""
    objects, small, layout, joined, large, count, layers, connections = fingerprint
    if count != _ASSIGNMENTS[0] or layers != network.layers or connections != network.connections:
        count = _ASSIGNMENTS[0]
        sources = network._sources()
        if len(sources) != len(objects) or not all(map(operator.is_, sources, objects)):
            return False
        fingerprint[5:] = count, list(network.layers), list(network.connections)  # the same objects still
    return (list(map(_LAYOUT, small)) == layout and b"".join(map(_BYTES, small)) == joined
            and (not large or all(map(_same, *zip(*large)))))


# Assignments to an attribute of any Layer or Connection, counted by _Counted: while the count is a
# fingerprint's, no source of a network with the same layers and connections is a new object.
# (Increments under the GIL; a lost one between two threads still leaves the count changed.)
_ASSIGNMENTS = [0]


class _Counted:
    """Base of :class:`Layer` and :class:`Connection`: counts every assignment to their attributes in
    ``_ASSIGNMENTS`` (:func:`_unchanged`)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        _ASSIGNMENTS[0] += 1


@cache
def _own_reading(cls) -> bool:
    """Does ``cls`` read its parameters as :class:`Network` does (so that their packed form can be cached)?"""
    return all(getattr(cls, m) is getattr(Network, m) for m in
               ("pack", "circuit_weight", "effective_weight", "input_weights", "drive", "tau"))


def _shown(value) -> str:
    """``value`` for a one-line message: an array by its shape, anything else by its repr."""
    return f"array of shape {value.shape}" if isinstance(value, np.ndarray) else repr(value)


def _check_name(name, argument: str) -> str:
    if not isinstance(name, str) or not name:
        raise SubstrateValueError(f"{argument}={_shown(name)} must be a non-empty string")
    return name


def _check_size(size, what: str) -> int:
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) or size < 1:
        raise SubstrateValueError(f"{what}: size={_shown(size)} must be a positive integer")
    return int(size)


def _check_bool(value, argument: str) -> bool:
    # a truth value, not anything truthy: an array here would be ambiguous, a string a typo
    if not isinstance(value, (bool, np.bool_)):
        raise SubstrateValueError(f"{argument}={_shown(value)} must be True or False")
    return bool(value)


def _check_real(value, argument: str, low: float, high: float, unit: str = "") -> float:
    """``value`` as a float in [low, high]; bools, strings and arrays are refused, not converted."""
    try:
        ok = not isinstance(value, (bool, np.bool_, str, bytes)) and np.ndim(value) == 0
        v = float(value) if ok else math.nan
    except (TypeError, ValueError, OverflowError):
        v = math.nan
    if not low <= v <= high:  # NaN fails too
        raise SubstrateValueError(f"{argument}={_shown(value)} must be a number in [{low:.3g}, {high:.3g}]{unit}")
    return v


@dataclass(eq=False)
class Input:
    """A clamped input of ``size`` units; its projections are computed once per sample."""

    name: str
    size: int

    def __post_init__(self):
        _check_name(self.name, "input: name")
        self.size = _check_size(self.size, f"input {self.name!r}")


@dataclass(eq=False)
class Layer(_Counted):
    """A layer of ``size`` leaky neurons.

    tau: time constant, a positive scalar or one per neuron. activation: one of
    ``activations.NAMES``. bias: array of shape (size,) or None for zeros.
    """

    name: str
    size: int
    tau: float | np.ndarray = 1.0
    activation: str = "logistic"
    bias: np.ndarray | None = None

    def __post_init__(self):
        _check_name(self.name, "layer: name")
        self.size = _check_size(self.size, f"layer {self.name!r}")
        activations.check_name(self.activation, f"layer {self.name!r}: activation")
        try:  # refused, not converted: tau='2', True or None (numpy: nan) is a mistake
            tau = (None if self.tau is None or isinstance(self.tau, (str, bytes, bool, np.bool_))
                   or np.iscomplexobj(self.tau)
                   else np.asarray(self.tau, dtype=float))
        except (TypeError, ValueError, OverflowError):
            tau = None
        if tau is None or tau.ndim > 1 or (tau.ndim == 1 and tau.shape != (self.size,)):
            raise SubstrateValueError(
                f"layer {self.name!r}: tau must be a positive scalar or a real array of shape "
                f"({self.size},), got {_shown(self.tau)}"
            )
        if not np.all(np.isfinite(tau)) or np.any(tau <= 0):
            raise SubstrateValueError(
                f"layer {self.name!r}: tau must be finite and > 0, got min {float(np.min(tau))!r}"
            )
        self.tau = tau if tau.ndim else float(tau)
        if self.bias is not None:  # None: zeros in the network's dtype, set by Network
            self.bias = np.asarray(self.bias)
            if self.bias.shape != (self.size,):
                raise SubstrateValueError(
                    f"layer {self.name!r}: bias has shape {self.bias.shape}, expected ({self.size},)"
                )


@dataclass(eq=False)
class Connection(_Counted):
    """Synapses from ``pre`` (a layer or an input) to ``post`` (a layer).

    weight: array (post size, pre size); None with ``tied=True``, where the weight is the transpose
    of the connection post -> pre, kept tied at every call. mask: optional 0/1 array of the weight's
    shape; the effective weight is ``weight * mask``.
    """

    pre: str
    post: str
    weight: np.ndarray | None = None
    mask: np.ndarray | None = None
    tied: bool = False

    def __post_init__(self):
        _check_name(self.pre, "connection: pre")
        _check_name(self.post, "connection: post")

    @property
    def name(self) -> str:
        """"pre->post"."""
        return f"{self.pre}->{self.post}"


@dataclass(frozen=True)
class Packed:
    """The network in the engine's form for one compute dtype (see ``_kernels`` for the layout)."""

    n: int
    layer_off: np.ndarray
    layer_act: tuple  # (codes, costly): _kernels.layer_activations
    tauinv: np.ndarray
    tau: np.ndarray
    wbuf: np.ndarray
    conn: np.ndarray
    conn_names: tuple
    bias: np.ndarray
    max_rows: int = 1  # the largest pre or post size of a connection: the rows of the products' scratch

    @cached_property
    def tau_min(self) -> float:
        return float(self.tau.min())

    def dense(self) -> np.ndarray:
        """The n x n matrix W of all connections between state layers (effective weights)."""
        W = np.zeros((self.n, self.n), self.wbuf.dtype)
        for wo, pa, pn, qa, qn in self.conn:
            W[qa:qa + qn, pa:pa + pn] += self.wbuf[wo:wo + qn * pn].reshape(qn, pn)
        return W


@dataclass(eq=False)
class _Prepared:
    """A network's parameters in the engine's form for one dtype, with what they were computed from."""

    sources: list  # the _fingerprint of Network._sources()
    packed: Packed
    input_weights: dict
    drive: np.ndarray | None = None
    drive_key: tuple = ()
    inputs: list = ()  # snapshots of the inputs the drive was computed from
    of: tuple = ()  # a complex entry of a real network: the float64 (packed, drive) it was made from


def _complex_packed(packed: Packed, dtype) -> Packed:
    """The float64 ``packed`` as ``pack(dtype)`` makes it for complex states: the weights the same real
    arrays, the bias complex, the activation flag of complex states (``_kernels.layer_activations``: a
    network without tanh or dsilu layers then runs the complex kernels compiled without their rows)."""
    return replace(packed, bias=packed.bias.astype(dtype), layer_act=K.layer_activations(packed.layer_act[0], dtype))


class Network:
    """A circuit of layers, inputs and connections; see the module docstring."""

    def __init__(self, layers: Sequence[Layer], connections: Sequence[Connection] = (),
                 inputs: Sequence[Input] = ()):
        self.layers = list(layers)
        self.inputs = list(inputs)
        self.connections = list(connections)
        if not self.layers:
            raise SubstrateValueError("layers: a network needs at least one layer")
        for item, kind in [(x, Layer) for x in self.layers] + [(x, Input) for x in self.inputs]:
            if not isinstance(item, kind):
                raise SubstrateValueError(f"expected a {kind.__name__}, got {item!r}")
        names = [x.name for x in self.layers] + [x.name for x in self.inputs]
        dup = {x for x in names if names.count(x) > 1}
        if dup:
            raise SubstrateValueError(f"layer and input names must be unique; repeated: {sorted(dup)}")
        self._layer = {x.name: x for x in self.layers}
        self._input = {x.name: x for x in self.inputs}
        self.inputs_by_name = self._input
        offsets = np.cumsum([0] + [x.size for x in self.layers])
        self.slices = {x.name: slice(int(offsets[i]), int(offsets[i + 1]))
                       for i, x in enumerate(self.layers)}
        self.n = int(offsets[-1])
        self._check_connections()
        self.dtype = self._common_dtype()
        real = np.float32 if self.dtype == np.float32 else np.float64
        for x in self.layers:
            x.bias = np.zeros(x.size, self.dtype) if x.bias is None else x.bias
        for c in self.connections:
            if c.mask is not None:
                c.mask = c.mask.astype(real)  # so that masked gradients keep the network's dtype
        self._prepared = {}  # dtype -> _Prepared, see prepared()
        self._work = {}  # buffers of the stepping kernel and of relax, by use and shape (integrators._take)
        self._stability = None  # the last stability check of relax (integrators._checked_stability)
        self._field = {}  # dtype argument -> the last VectorField made for it (integrators._field)

    def __getstate__(self):
        """Copies and pickles leave the caches behind (rebuilt on first use; buffers can be large)."""
        return {**self.__dict__, "_prepared": {}, "_work": {}, "_stability": None, "_field": {}}

    # ---------------------------------------------------------------------------- validation
    def _check_connections(self):
        seen = set()
        for c in self.connections:
            if not isinstance(c, Connection):
                raise SubstrateValueError(f"connections: expected a Connection, got {c!r}")
            if c.post not in self._layer:
                raise SubstrateValueError(
                    f"connection {c.name}: post={c.post!r} must be a layer; layers: {list(self._layer)}")
            if c.pre not in self._layer and c.pre not in self._input:
                raise SubstrateValueError(
                    f"connection {c.name}: pre={c.pre!r} is neither a layer nor an input; "
                    f"known: {list(self._layer) + list(self._input)}")
            if c.name in seen:
                raise SubstrateValueError(f"connection {c.name} is given twice")
            seen.add(c.name)
            shape = (self._layer[c.post].size, self.size_of(c.pre))
            if _check_bool(c.tied, f"connection {c.name}: tied"):
                if c.pre in self._input:
                    raise SubstrateValueError(f"connection {c.name}: an input projection cannot be tied")
                if c.weight is not None:
                    raise SubstrateValueError(
                        f"connection {c.name}: tied=True takes its weight from {c.post}->{c.pre}; "
                        "pass weight=None")
                src = self.connection(f"{c.post}->{c.pre}", missing_ok=True)
                if src is None or src.tied:
                    raise SubstrateValueError(
                        f"connection {c.name}: tied=True needs an untied connection {c.post}->{c.pre}")
            else:
                if c.weight is None:
                    raise SubstrateValueError(f"connection {c.name}: weight is required unless tied=True")
                c.weight = np.asarray(c.weight)
                if c.weight.shape != shape:
                    raise SubstrateValueError(
                        f"connection {c.name}: weight has shape {c.weight.shape}, expected {shape} "
                        "(post size, pre size)")
            if c.mask is not None:
                c.mask = np.asarray(c.mask)
                if c.mask.shape != shape:
                    raise SubstrateValueError(
                        f"connection {c.name}: mask has shape {c.mask.shape}, expected {shape}")

    def _common_dtype(self) -> np.dtype:
        arrays = {f"bias of {x.name}": x.bias for x in self.layers if x.bias is not None}
        arrays.update({f"weight of {c.name}": c.weight for c in self.connections if c.weight is not None})
        dtypes = {}
        for what, a in arrays.items():
            if a.dtype.kind in "iub":
                continue  # integer or boolean arrays adopt the network's dtype
            d = check_dtype(a.dtype, what)
            dtypes.setdefault(d, what)
        if len(dtypes) > 1:
            listing = ", ".join(f"{w} is {d}" for d, w in dtypes.items())
            raise SubstrateValueError(f"mismatched dtypes in the network parameters ({listing}); "
                                      "convert them to one of " + _DTYPE_NAMES)
        return next(iter(dtypes), np.dtype(np.float64))

    # ---------------------------------------------------------------------------- access
    def size_of(self, name: str) -> int:
        """The number of units of the layer or input ``name``."""
        return (self._layer.get(name) or self._input[name]).size

    def layer(self, name: str) -> Layer:
        """The layer ``name`` (a SubstrateValueError lists the layers if there is none)."""
        if name not in self._layer:
            raise SubstrateValueError(f"no layer {name!r}; layers: {list(self._layer)}")
        return self._layer[name]

    def connection(self, name: str, missing_ok: bool = False) -> Connection | None:
        """The connection ``name`` ("pre->post"); None if there is none and ``missing_ok``, else a
        SubstrateValueError."""
        for c in self.connections:
            if c.name == name:
                return c
        if missing_ok:
            return None
        raise SubstrateValueError(f"no connection {name!r}; connections: {[c.name for c in self.connections]}")

    def effective_weight(self, c: Connection) -> np.ndarray:
        """The weight the circuit sees, mask applied; a tied connection's is the transpose of its
        source's effective (masked) weight."""
        w = self.effective_weight(self.connection(f"{c.post}->{c.pre}")).T if c.tied else c.weight
        return w * c.mask if c.mask is not None else w

    def circuit_weight(self, c: Connection) -> np.ndarray:
        """The weight the circuit computes with: the effective weight here; a device's network
        (``substrate.devices``) returns the weight as its devices read it."""
        return self.effective_weight(c)

    # The hooks of a device (``substrate.devices.DeviceNetwork`` overrides them); an ideal circuit:
    read_time = math.inf  # phases are read when they converge

    def kernel_effects(self, packed: "Packed", batch: int) -> tuple:
        """The device effects inside the stepping kernel (states registered with
        ``_kernels.register_effect``): none, the empty tuple, for which the stepping kernel is compiled
        without any device code."""
        return ()

    def new_equilibrium(self):
        """Called at the start of every free phase (a device redraws read noise held per equilibrium)."""

    def write(self):
        """Commit the parameters after a learning step (a device programs or pulses its devices).
        Returns its :class:`substrate.Counts`: without a device, every weight present is written once,
        in one cycle (an ideal circuit does not know which changed)."""
        state, inputs = crossbar_devices(self)
        return Counts(pulses=state + inputs, write_cycles=1)

    def activities(self, u) -> np.ndarray:
        """r = rho(u) for states u (batch, n), layer by layer, real or complex."""
        r = np.empty_like(u)
        for x in self.layers:
            sl = self.slices[x.name]
            r[:, sl] = activations.rho(x.activation, u[:, sl])
        return r

    @property
    def holomorphic(self) -> bool:
        """Whether every layer's activation is holomorphic (complex nudges, holomorphic EP)."""
        return all(x.activation in activations.HOLOMORPHIC for x in self.layers)

    @property
    def tau(self) -> np.ndarray:
        """Time constants of all n neurons, in state order."""
        return np.concatenate([np.broadcast_to(x.tau, (x.size,)) for x in self.layers]).astype(float)

    def pack(self, dtype) -> Packed:
        """Copy the parameters into the engine's flat form for states of ``dtype``. The weights keep
        the network's own dtype: complex128 states of a real network meet real weights (the kernels
        multiply the states' real views, ``_kernels.as_real``), never a complex copy of them."""
        dtype = np.dtype(dtype)
        rdt = np.float32 if dtype == np.float32 else np.float64
        state = [c for c in self.connections if c.pre in self._layer]
        sizes = [self.layer(c.post).size * self.layer(c.pre).size for c in state]
        wbuf = np.empty(int(sum(sizes)), dtype if self.dtype.kind == "c" else rdt)
        conn = np.zeros((len(state), 5), np.int64)
        off = 0
        for i, c in enumerate(state):
            pre, post = self.slices[c.pre], self.slices[c.post]
            wbuf[off:off + sizes[i]] = self.circuit_weight(c).ravel()
            conn[i] = (off, pre.start, pre.stop - pre.start, post.start, post.stop - post.start)
            off += sizes[i]
        layer_off = np.array([0] + [self.slices[x.name].stop for x in self.layers], np.int64)
        layer_act = K.layer_activations([activations.CODES[x.activation] for x in self.layers], dtype)
        tau = self.tau
        return Packed(self.n, layer_off, layer_act, (1.0 / tau).astype(rdt), tau.astype(rdt),
                      wbuf, conn, tuple(c.name for c in state),
                      np.concatenate([x.bias for x in self.layers]).astype(dtype),
                      int(conn[:, [2, 4]].max(initial=1)))

    def _sources(self) -> list:
        """Everything the packed form and the drive are computed from and a user may change."""
        return [*chain.from_iterable(map(_LAYER_SOURCES, self.layers)),
                *chain.from_iterable(map(_CONNECTION_SOURCES, self.connections))]

    def prepared(self, xs: dict, batch: int | None, dtype) -> tuple:
        """(packed, input weights, drive) for checked inputs ``xs`` (:meth:`check_inputs`, with or
        without its finiteness check: :meth:`drive` makes it when it computes a drive): the
        engine's form of the parameters as they are now. Reused from the last call while every
        parameter is the same object with the same bits and (for the drive) the inputs and batch have
        the same bits; recomputed otherwise, into new arrays (a ``VectorField`` made earlier keeps
        its own). The returned arrays are shared between calls: read them, never write them."""
        dtype = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
        if not _own_reading(type(self)):
            weights = {k: w.copy() for k, w in self.input_weights().items()}
            return self.pack(dtype), weights, self.drive(xs, batch, dtype, weights=weights)
        if dtype.kind == "c" and self.dtype.kind != "c" and not any(map(np.iscomplexobj, xs.values())):
            return self._complex_of_real(xs, batch, dtype)
        entry = self._prepared.get(dtype)
        if entry is None or not _unchanged(self, entry.sources):
            weights = {k: w.copy() for k, w in self.input_weights().items()}
            entry = _Prepared(_fingerprint(self, self._sources()), self.pack(dtype), weights)
            self._prepared[dtype] = entry
        if batch is not None and type(batch) is not int:  # checked by drive(), not a cache key
            return entry.packed, entry.input_weights, self.drive(xs, batch, dtype, weights=entry.input_weights)
        # inputs are compared by contents only: a minibatch is often a new view of the same data
        key = (batch, tuple(xs))
        if entry.drive is None or key != entry.drive_key or not all(map(_same, xs.values(), entry.inputs)):
            entry.drive = self.drive(xs, batch, dtype, weights=entry.input_weights)
            entry.drive_key, entry.inputs = key, [_snapshot(a) for a in xs.values()]
        return entry.packed, entry.input_weights, entry.drive

    def _complex_of_real(self, xs: dict, batch, dtype) -> tuple:
        """:meth:`prepared` for complex states of a real network with real inputs: the float64 entry's
        form, bit for bit what ``pack`` and ``drive`` would compute for ``dtype`` (the weights stay
        real, V x + b is the same real product with a zero imaginary part), so that a complex phase
        after a real one costs no second V x, weight copy or fingerprint; made once per float64 form."""
        packed, weights, drive = self.prepared(xs, batch, _FLOAT64)
        real = self._prepared[_FLOAT64]
        if real.drive is not drive:  # a drive for a batch that is not a plain int: not cached
            return _complex_packed(packed, dtype), weights, drive.astype(dtype)
        entry = self._prepared.get(dtype)
        if entry is None or entry.of[0] is not packed or entry.of[1] is not drive:
            entry = _Prepared(real.sources, _complex_packed(packed, dtype), weights,
                              drive.astype(dtype), real.drive_key, real.inputs, (packed, drive))
            self._prepared[dtype] = entry
        return entry.packed, entry.input_weights, entry.drive

    def _current(self, dtype, drive, xs: dict) -> bool:
        """Would :meth:`prepared` return ``drive`` (which it returned for checked inputs ``xs`` in
        ``dtype``) again for ``xs``: the parameters unchanged and the inputs with the bits it was
        computed from (their shapes and the batch as then, which the caller knows)?"""
        entry = self._prepared.get(dtype)
        return (entry is not None and entry.drive is drive and _unchanged(self, entry.sources)
                and all(map(_same, xs.values(), entry.inputs)))

    def input_weights(self) -> dict:
        """{connection name: V} of the input projections, as the circuit reads them now."""
        return {c.name: self.circuit_weight(c) for c in self.connections if c.pre in self._input}

    def drive(self, x: Mapping[str, np.ndarray] | np.ndarray | None, batch: int | None,
              dtype, weights: dict | None = None) -> np.ndarray:
        """The constant part of the input current, V x + b, as an (n, B) array: computed once per
        sample, never per step. ``weights``: the input projections to use (default
        ``input_weights()``)."""
        weights = self.input_weights() if weights is None else weights
        xs = self.check_inputs(x)
        samples = next(iter(xs.values())).shape[0] if xs else None
        if batch is not None:
            if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)) or batch < 1:
                raise SubstrateValueError(f"batch={batch!r} must be a positive integer")
            if samples is not None and batch != samples:
                raise SubstrateValueError(f"batch={batch} but x has {samples} samples; omit batch (x gives "
                                          "it) or pass the same number")
        batch = int(batch or samples or 1)
        drive = np.empty((self.n, batch), dtype)
        drive[:] = np.concatenate([x.bias for x in self.layers])[:, None]
        if drive.dtype.kind != "c" and any(np.iscomplexobj(a) for a in xs.values()):
            raise SubstrateValueError(f"x is complex but the states are {drive.dtype}; pass dtype='complex128'")
        for c in self.connections:
            if c.pre in self._input:
                # in the state's precision: a float32 network projects float32 inputs (half the cost);
                # real inputs of complex states through real weights by a real product, not a zgemm
                x, w = xs[c.pre], weights[c.name]
                pdt = np.float32 if drive.dtype == np.float32 else (
                    drive.dtype if np.iscomplexobj(x) or np.iscomplexobj(w) else np.float64)
                drive[self.slices[c.post]] += w.astype(pdt, copy=False) @ x.astype(pdt, copy=False).T
        return drive

    def check_inputs(self, x, finite: bool = True) -> dict:
        """Validate inputs: a dict {input name: (B, size)} or, with one input, the array itself.
        ``finite=False`` leaves out the NaN/Inf check, for :meth:`prepared`, which makes it only when
        the inputs differ from those its cached drive was computed (and checked) from."""
        if not self.inputs:
            if x is not None and not (isinstance(x, Mapping) and not x):
                raise SubstrateValueError("x: this network has no inputs; pass x=None")
            return {}
        if type(x) is np.ndarray or not isinstance(x, Mapping):  # an array first: Mapping's check is slow
            if len(self.inputs) != 1:
                raise SubstrateValueError(
                    f"x must be a dict with keys {[i.name for i in self.inputs]}")
            x = {self.inputs[0].name: x}  # the one input: its name is right
        elif x.keys() != self._input.keys():
            missing = set(self._input) - set(x)
            extra = set(x) - set(self._input)
            raise SubstrateValueError(
                f"x: inputs missing {sorted(missing)}, unknown {sorted(extra)}; expected {list(self._input)}")
        out = {}
        batch = None
        for name, a in x.items():
            a = np.asarray(a)
            if a.ndim == 1:
                a = a[None, :]
            size = self._input[name].size
            if a.ndim != 2 or a.shape[1] != size or a.shape[0] == 0:
                raise SubstrateValueError(f"x[{name!r}] has shape {np.shape(x[name])}, expected (batch, {size}) "
                                          "with batch >= 1")
            if a.dtype.kind not in "iufc":
                raise SubstrateValueError(f"x[{name!r}] has dtype {a.dtype}; expected a numeric array")
            if finite and not np.isfinite(a).all():
                raise SubstrateValueError(f"x[{name!r}] contains NaN or Inf")
            if batch is not None and a.shape[0] != batch:
                raise SubstrateValueError(f"x: inputs have different batch sizes ({batch} and {a.shape[0]})")
            batch = a.shape[0]
            out[name] = a
        return out

    # ---------------------------------------------------------------------------- builders
    @classmethod
    def layered(cls, sizes: Sequence[int], rng: np.random.Generator, *, activation: str = "logistic",
                tau: float = 1.0, feedback: str = "independent", asymmetry_angle: float = 90.0,
                lateral: bool = False, loop: bool = False, init_scale: float = 1.0,
                dtype="float64") -> "Network":
        """A layered network ``sizes[0]`` (input) -> hidden layers -> ``sizes[-1]`` (output).

        Weights are drawn uniform in +-init_scale/sqrt(fan_in) (PyTorch's default init, as in
        Laborieux & Zenke). feedback: ``"tied"`` (B = W^T, kept tied), ``"independent"`` (B =
        sin(a) B_indep + cos(a) W^T with a = asymmetry_angle in degrees, docs/equations.md, section 1), or
        ``"none"``. lateral: all-to-all connections inside each hidden layer, diagonal masked out.
        loop: an independent connection from the output layer back to the first hidden layer.
        Layer names: ``x`` (input), ``h1``..``hK``, ``y`` (output).
        """
        if not isinstance(rng, np.random.Generator):
            raise SubstrateValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        if isinstance(sizes, (str, bytes, Mapping)) or not isinstance(sizes, Iterable):
            raise SubstrateValueError(f"sizes={_shown(sizes)} must be a list of positive integers, "
                                      "e.g. [64, 32, 10]")
        sizes = [_check_size(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
        if len(sizes) < 2:
            raise SubstrateValueError(f"sizes={sizes} needs an input and at least one layer")
        if not isinstance(feedback, str) or feedback not in ("tied", "independent", "none"):
            raise SubstrateValueError(f"feedback={_shown(feedback)}; allowed: tied, independent, none")
        asymmetry_angle = _check_real(asymmetry_angle, "asymmetry_angle", 0.0, 180.0, " degrees")
        lateral, loop = _check_bool(lateral, "lateral"), _check_bool(loop, "loop")
        dtype = check_dtype(dtype)
        # the drawn range, 2 init_scale/sqrt(fan_in), and the feedback mix of two weights, at most
        # sqrt(2) init_scale, must be finite in the dtype: beyond, numpy refuses the range or casts to inf
        init_scale = _check_real(init_scale, "init_scale", 0.0, float(np.finfo(dtype).max) / 2)

        def uniform(post, pre, shape=None):
            bound = init_scale / np.sqrt(pre)
            return rng.uniform(-bound, bound, shape or (post, pre)).astype(dtype)

        names = [f"h{i}" for i in range(1, len(sizes) - 1)] + ["y"]
        layers = [Layer(nm, sz, tau=tau, activation=activation, bias=uniform(sz, sizes[i], (sz,)))
                  for i, (nm, sz) in enumerate(zip(names, sizes[1:]))]
        conns = [Connection("x", names[0], uniform(sizes[1], sizes[0]))]
        a = np.deg2rad(asymmetry_angle)
        for i in range(len(names) - 1):
            pre, post = names[i], names[i + 1]
            w = uniform(sizes[i + 2], sizes[i + 1])
            conns.append(Connection(pre, post, w))
            if feedback == "tied":
                conns.append(Connection(post, pre, tied=True))
            elif feedback == "independent":
                b = uniform(sizes[i + 1], sizes[i + 2])
                conns.append(Connection(post, pre, (np.sin(a) * b + np.cos(a) * w.T).astype(dtype)))
        if lateral:
            for nm, sz in zip(names[:-1], sizes[1:-1]):
                conns.append(Connection(nm, nm, uniform(sz, sz), mask=1.0 - np.eye(sz)))
        if loop and len(names) == 2 and feedback != "none":
            raise SubstrateValueError("loop=True with one hidden layer is the feedback y->h1 itself; "
                                      "pass feedback='none' with it, or add a hidden layer")
        if loop and len(names) > 1:
            conns.append(Connection(names[-1], names[0], uniform(sizes[1], sizes[-1])))
        return cls(layers, conns, inputs=[Input("x", sizes[0])])

    CONFIG_KEYS = {"sizes", "activation", "tau", "feedback", "asymmetry_angle", "lateral", "loop",
                   "init_scale", "dtype"}

    @classmethod
    def from_config(cls, config: Mapping, seed: int) -> "Network":
        """Build :meth:`layered` from a config mapping (keys ``CONFIG_KEYS``) and an integer seed."""
        if not isinstance(config, Mapping):
            raise SubstrateValueError(f"config={_shown(config)} must be a mapping with keys among "
                                      f"{sorted(cls.CONFIG_KEYS)}, e.g. {{'sizes': [64, 32, 10]}}")
        # an integer, not None (a fresh random seed: the network could not be rebuilt from the config)
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise SubstrateValueError(f"seed={_shown(seed)} must be an integer >= 0")
        unknown = set(config) - cls.CONFIG_KEYS
        if unknown:
            raise SubstrateValueError(f"network config: unknown keys {sorted(unknown)}; "
                                      f"allowed: {sorted(cls.CONFIG_KEYS)}")
        if "sizes" not in config:
            raise SubstrateValueError("network config: 'sizes' is required, e.g. [64, 32, 10]")
        cfg = dict(config)
        return cls.layered(cfg.pop("sizes"), np.random.default_rng(seed), **cfg)

    def __repr__(self):
        ls = ", ".join(f"{x.name}[{x.size}, {x.activation}]" for x in self.layers)
        cs = ", ".join(c.name + (" (tied)" if c.tied else "") for c in self.connections)
        return f"Network(layers: {ls}; inputs: {[i.name for i in self.inputs]}; connections: {cs})"
