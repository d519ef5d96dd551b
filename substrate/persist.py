"""Save and reload what you build and train: ``save(obj, path)`` and ``load(path)``.

One HDF5 layout for every kind of object, versioned, readable with h5py alone (nothing is pickled):

* root attributes ``format = "substrate-object"``, ``format_version`` (:data:`FORMAT_VERSION`),
  ``kind`` (the class name), ``module`` (where the class is defined) and ``substrate`` (the version
  that wrote the file);
* below it the object's state: plain datasets for arrays, a JSON attribute ``config`` for the
  settings a constructor takes, and sub-groups for the objects it holds, each with its own ``kind``.

A saveable class contributes one pair of functions, ``write(group, obj)`` and ``read(group) -> obj``
(:func:`register`); they use the helpers below (:func:`write_config`, :func:`write_arrays`,
:func:`write_object` for a held object, :func:`write_state` for a simulator's runtime state: dicts,
lists, arrays, numbers and random generators, each generator as the JSON of its
``bit_generator.state``). Files are written atomically (``archive.create_h5``: a temporary file renamed
into place), every object carries the CRC of its text attributes and every dataset a Fletcher-32
checksum (``archive``), so a killed writer leaves the previous file and a damaged file is an
:class:`~substrate.errors.ArchiveError`, as are a missing file, a file that is not a saved object, an
unknown kind and a format version newer than this code reads.

Kinds defined outside this module register themselves when their module is imported (``models.train``:
``Classifier``, ``SGD``, ``Adam``, ``Checkpoint``; ``models.pvrnn``: ``PVRNN``; ``models.dpm``:
``NoisePredictor``); :func:`load` imports the module a file names if it belongs to this project.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Mapping

import h5py
import numpy as np

from . import archive
from .devices import Device, DeviceNetwork, Effect, Neurons, attach
from .errors import ArchiveError, SubstrateValueError
from .network import Connection, Input, Layer, Network
from .nudge import Cost

FORMAT = "substrate-object"
FORMAT_VERSION = 1
# the packages whose modules load() may import to find a kind a file names (a file must not make the
# reader import arbitrary modules)
PROJECT_PACKAGES = ("substrate", "models")
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


@dataclass(frozen=True)
class Kind:
    """A saveable class: how it writes its state into an h5py group and reads it back."""

    cls: type
    write: Callable  # (group, obj) -> None
    read: Callable  # (group) -> obj


KINDS: dict = {}


def register(cls: type, write: Callable, read: Callable):
    """Make ``cls`` saveable under its class name: ``write(group, obj)`` stores an instance's state in
    an h5py group, ``read(group)`` builds an equal instance from it."""
    KINDS[cls.__name__] = Kind(cls, write, read)


def _kind_of(obj) -> Kind:
    kind = KINDS.get(type(obj).__name__)
    if kind is None or kind.cls is not type(obj):
        raise SubstrateValueError(f"cannot save a {type(obj).__name__}: substrate.save knows "
                                  f"{', '.join(sorted(KINDS))} (models.train, models.pvrnn and models.dpm register "
                                  "theirs when imported)")
    return kind


def _version() -> str:
    try:
        return metadata.version("substrate")
    except metadata.PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------ save and load
def save(obj, path, *, extra: Mapping | None = None) -> str:
    """Write ``obj`` (a Network, DeviceNetwork, Device, Cost, or a kind registered by models: Classifier,
    SGD, Adam, Checkpoint, PVRNN, NoisePredictor) to the HDF5 file ``path``, atomically; ``extra``: named
    values saved beside it (e.g. a PV-RNN's trained adaptive vectors, ``extra={"A": A}``; dicts, lists,
    arrays, numbers, strings, generators). Returns the absolute path."""
    kind = _kind_of(obj)  # before anything is written
    if extra is not None and not isinstance(extra, Mapping):
        raise SubstrateValueError(f"extra must be None or a dict of named values, got {type(extra).__name__}")
    path = os.path.abspath(os.fspath(path))
    with archive.create_h5(path, f"the {kind.cls.__name__}", "free some space and try again") as (f, _):
        save_into(f, obj, extra=extra)
        archive.seal(f)
    return path


def save_into(group: h5py.Group, obj, *, extra: Mapping | None = None) -> h5py.Group:
    """Write ``obj`` (and ``extra``, as :func:`save`) into ``group`` of an HDF5 file opened for writing,
    in :func:`save`'s layout (the same attributes on the group as on a saved file's root), so that a
    bigger file (a study's run file) can hold saved objects; ``load(path, group=...)`` reads them back.
    The caller writes the file atomically and seals it (``archive.seal``)."""
    _kind_of(obj)  # before anything is written
    if extra is not None and not isinstance(extra, Mapping):
        raise SubstrateValueError(f"extra must be None or a dict of named values, got {type(extra).__name__}")
    group.attrs["format"] = FORMAT
    group.attrs["format_version"] = np.int64(FORMAT_VERSION)
    group.attrs["substrate"] = _version()
    write_object(group, obj)
    if extra:
        write_state(group, "extra", dict(extra))
    return group


def load(path, *, extra: bool = False, group: str = "/"):
    """The object saved in ``path`` by :func:`save` (or in its group ``group`` by :func:`save_into`,
    e.g. ``"runs/<run_id>/weights/model"`` of a study archive); with ``extra=True``, ``(object, extra
    values)``. Every failure to read it (no such file or group, not a saved object, an unknown kind, a
    newer format version, damaged or incomplete content) is an :class:`~substrate.errors.ArchiveError`
    naming the file."""
    path = os.fspath(path)
    if not isinstance(group, str):
        raise SubstrateValueError(f"group must be the path of a group in the file (a string), got "
                                  f"{type(group).__name__}")
    with archive.open_file(path) as f:
        g = f.get(group)
        if not isinstance(g, h5py.Group):
            raise ArchiveError(path, f"has no group {group!r}" + ("" if g is None else " (it is a dataset)"))
        _check_format(g, path)
        try:
            obj = read_object(g)
            more = read_state(g["extra"]) if "extra" in g else {}
        except ArchiveError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, OverflowError, AttributeError) as e:
            raise ArchiveError(path, f"does not hold a valid {g.attrs.get('kind')!s} "
                                     f"({type(e).__name__}: {e})") from None
    return (obj, more) if extra else obj


def _check_format(f: h5py.Group, path: str):
    fmt = f.attrs.get("format")
    if not isinstance(fmt, str) or fmt != FORMAT:
        where = "root" if f.name == "/" else f"{f.name}"
        raise ArchiveError(path, f"is not a saved substrate object ({where} attribute format={fmt!r}, expected "
                                 f"{FORMAT!r}); substrate.load reads the files substrate.save writes")
    version = f.attrs.get("format_version")
    if not isinstance(version, (int, np.integer)) or version < 1:
        raise ArchiveError(path, f"has format_version={version!r}; expected an integer from 1 to {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise ArchiveError(path, f"has format version {int(version)}, written by substrate {f.attrs.get('substrate')}; "
                                 f"this substrate ({_version()}) reads versions up to {FORMAT_VERSION}: upgrade it "
                                 "to load this file")


# ------------------------------------------------------------------------------------ helpers for kinds
def write_object(group: h5py.Group, obj):
    """Store a registered object in ``group`` (its ``kind`` and ``module`` as attributes)."""
    kind = _kind_of(obj)
    group.attrs["kind"] = kind.cls.__name__
    group.attrs["module"] = kind.cls.__module__
    kind.write(group, obj)


def read_object(group: h5py.Group):
    """The object stored in ``group`` by :func:`write_object`."""
    name = group.attrs["kind"]
    kind = KINDS.get(name)
    if kind is None:
        module = str(group.attrs.get("module", ""))
        if module.split(".")[0] in PROJECT_PACKAGES:
            try:
                importlib.import_module(module)  # it registers its kinds
            except ImportError as e:  # e.g. models.dpm without torch
                raise ArchiveError(group.file.filename, f"{group.name} holds a {name!r}, whose module {module!r} "
                                                        f"cannot be imported ({e})") from None
            kind = KINDS.get(name)
        if kind is None:
            raise ArchiveError(group.file.filename, f"{group.name} holds a {name!r} (defined in module {module!r}), "
                                                    "a kind this program does not know: import the module that "
                                                    "registers it first")
    return kind.read(group)


def write_config(group: h5py.Group, config: Mapping):
    """Settings (JSON: numbers, strings, booleans, lists, dicts) as the attribute ``config``."""
    group.attrs["config"] = json.dumps(config)


def read_config(group: h5py.Group) -> dict:
    """The settings :func:`write_config` stored on ``group``."""
    return json.loads(group.attrs["config"])


def write_arrays(group: h5py.Group, name: str, arrays: Mapping):
    """A sub-group ``name`` of datasets, one per array, named by their keys, kept in order."""
    g = group.create_group(name, track_order=True)
    for key, value in arrays.items():
        archive.create_dataset(g, key, _plain(np.asarray(value), f"{g.name}/{key}"))


def read_arrays(group: h5py.Group, name: str) -> dict:
    """The arrays :func:`write_arrays` stored under ``name``, {key: array} in order."""
    g = group[name]
    return {key: read_array(g, key) for key in g}


def read_array(group: h5py.Group, name: str) -> np.ndarray:
    """A dataset of ``group`` as an array (0-d for a scalar), checked to be wholly stored in the file."""
    ds = group[name]
    if not isinstance(ds, h5py.Dataset) or ds.dtype.kind in "OV":
        raise ValueError(f"{group.name}/{name} is not a dataset of numbers or text")
    archive.check_stored(ds, group.file.filename)
    return np.asarray(ds[()])


def _plain(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype.kind not in "biufcSU":
        raise SubstrateValueError(f"cannot save {where}: an array of {arr.dtype} (numbers or text only)")
    return arr


# ------------------------------------------------------------------------------------ runtime state
def write_state(group: h5py.Group, name: str, value):
    """A tree of plain values under ``name``: dicts (keys: strings, numbers or tuples of them; stored
    in the JSON attribute ``keys``, items named 0, 1, ...), lists and tuples (items 0, 1, ...), None,
    arrays, NumPy and Python scalars, strings, and ``numpy.random.Generator`` s (the JSON of their
    ``bit_generator.state``). Every node has the attribute ``type``; anything else is refused."""
    where = f"{group.name.rstrip('/')}/{name}"
    if isinstance(value, np.random.Generator):
        node = group.create_group(name)
        node.attrs["state"] = _generator_json(value)
        kind = "Generator"
    elif isinstance(value, Mapping):
        node = group.create_group(name)
        keys = list(value)
        node.attrs["keys"] = json.dumps([_key(k, where) for k in keys])
        for i, k in enumerate(keys):
            write_state(node, str(i), value[k])
        kind = "dict"
    elif type(value) in (list, tuple):  # not a namedtuple: it would come back as a plain tuple
        node = group.create_group(name)
        for i, v in enumerate(value):
            write_state(node, str(i), v)
        kind = type(value).__name__
    elif value is None:
        node, kind = group.create_group(name), "none"
    elif isinstance(value, np.ndarray):
        node, kind = archive.create_dataset(group, name, _plain(value, where)), "ndarray"
    elif isinstance(value, np.generic):  # before the Python types: np.float64 is a float
        node, kind = archive.create_dataset(group, name, _plain(np.asarray(value), where)), "numpy"
    elif isinstance(value, (bool, int, float, complex, str)):
        if isinstance(value, int) and not isinstance(value, bool) and not -2 ** 63 <= value < 2 ** 63:
            raise SubstrateValueError(f"cannot save {where}: the integer {value} does not fit in 64 bits")
        kind = next(t.__name__ for t in (bool, int, float, complex, str) if isinstance(value, t))
        node = archive.create_dataset(group, name, np.asarray(value))
    else:
        raise SubstrateValueError(f"cannot save {where}: a {type(value).__name__} (the state may hold dicts, "
                                  "lists, tuples, None, arrays, numbers, strings and numpy Generators)")
    node.attrs["type"] = kind


_SCALARS = {"bool": bool, "int": int, "float": float, "complex": complex}


def read_state(node):
    """The tree written by :func:`write_state`."""
    kind = node.attrs["type"]
    if isinstance(node, h5py.Group):
        if kind == "dict":
            keys = [_unkey(k) for k in json.loads(node.attrs["keys"])]
            return {k: read_state(node[str(i)]) for i, k in enumerate(keys)}
        if kind in ("list", "tuple"):
            items = [read_state(node[str(i)]) for i in range(len(node))]
            return tuple(items) if kind == "tuple" else items
        if kind == "none":
            return None
        if kind == "Generator":
            return _generator(node.attrs["state"])
    else:
        value = read_array(node.parent, node.name.rsplit("/", 1)[-1])
        if kind == "ndarray":
            return value
        if kind == "numpy":
            return value[()]
        if kind == "str":
            return value[()].decode()
        if kind in _SCALARS:
            return _SCALARS[kind](value[()])
    raise ValueError(f"{node.name}: unknown state type {kind!r}")


def _key(k, where):
    if isinstance(k, tuple):
        return [_key(x, where) for x in k]
    if k is None or isinstance(k, (str, bool, int, float)):
        return k
    raise SubstrateValueError(f"cannot save {where}: a dict key of type {type(k).__name__}")


def _unkey(k):
    return tuple(_unkey(x) for x in k) if isinstance(k, list) else k  # JSON lists were tuples


def _generator_json(rng: np.random.Generator) -> str:
    def arrays(o):
        if isinstance(o, np.ndarray):  # MT19937's key, Philox's counter
            return {"ndarray": o.tolist(), "dtype": o.dtype.str}
        raise TypeError(f"a {type(o).__name__} in a generator's state")

    return json.dumps(rng.bit_generator.state, default=arrays)


def _generator(text: str) -> np.random.Generator:
    state = json.loads(text, object_hook=lambda d: np.array(d["ndarray"], dtype=d["dtype"])
                       if set(d) == {"ndarray", "dtype"} else d)
    name = state.get("bit_generator")
    if name not in BIT_GENERATORS:
        raise ValueError(f"bit generator {name!r}; known: {', '.join(BIT_GENERATORS)}")
    bits = getattr(np.random, name)()
    bits.state = state
    return np.random.Generator(bits)


# ------------------------------------------------------------------------------------ Network
def _write_network(group, net: Network):
    for i, x in enumerate(net.layers):
        g = group.create_group(f"layers/{i}")
        write_config(g, {"name": x.name, "size": x.size, "activation": x.activation})
        archive.create_dataset(g, "tau", np.asarray(x.tau))
        archive.create_dataset(g, "bias", x.bias)
    for i, x in enumerate(net.inputs):
        write_config(group.create_group(f"inputs/{i}"), {"name": x.name, "size": x.size})
    for i, c in enumerate(net.connections):
        g = group.create_group(f"connections/{i}")
        write_config(g, {"pre": c.pre, "post": c.post, "tied": bool(c.tied)})
        for name in ("weight", "mask"):
            if getattr(c, name) is not None:
                archive.create_dataset(g, name, getattr(c, name))


def _items(group, name):
    g = group.get(name)
    return [] if g is None else [g[str(i)] for i in range(len(g))]


def _read_network(group) -> Network:
    layers = []
    for g in _items(group, "layers"):
        cfg, tau = read_config(g), read_array(g, "tau")
        layers.append(Layer(cfg["name"], cfg["size"], tau=float(tau) if tau.ndim == 0 else tau,
                            activation=cfg["activation"], bias=read_array(g, "bias")))
    inputs = [Input(**read_config(g)) for g in _items(group, "inputs")]
    connections = []
    for g in _items(group, "connections"):
        cfg = read_config(g)
        arrays = {name: read_array(g, name) if name in g else None for name in ("weight", "mask")}
        connections.append(Connection(cfg["pre"], cfg["post"], tied=cfg["tied"], **arrays))
    return Network(layers, connections, inputs)


# ------------------------------------------------------------------------------------ Device
def _write_device(group, device: Device):
    write_config(group, {"name": device.name, "citation": device.citation, "weight_scale": device.weight_scale,
                         "effects": [{"class": type(e).__name__, "module": type(e).__module__,
                                      "parameters": dataclasses.asdict(e)} for e in device.effects]})


def _read_device(group) -> Device:
    cfg = read_config(group)
    effects = tuple(_effect_class(e["class"], e["module"])(**{k: _tuples(v) for k, v in e["parameters"].items()})
                    for e in cfg.pop("effects"))
    return Device(effects, **cfg)


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v  # an effect's sequences are tuples


def _effect_class(name: str, module: str) -> type:
    """The Effect subclass ``name`` among those defined now (custom effects included: define or
    import them before loading); the one of ``module`` if several share the name."""
    found, todo = [], [Effect]
    while todo:
        for c in todo.pop().__subclasses__():
            todo.append(c)
            if c.__name__ == name and c not in found:
                found.append(c)
    if len(found) > 1:
        found = [c for c in found if c.__module__ == module] or found
    if len(found) != 1:
        raise ValueError(f"device effect {name!r} (module {module!r}): " + (
            "not defined in this program; define or import it before loading" if not found
            else f"{len(found)} classes of that name are defined"))
    return found[0]


# ------------------------------------------------------------------------------------ DeviceNetwork
# rebuilt by attach() on load, not state: the nominal network and the device (saved as objects), the
# crossbars (saved one by one) and the cache of their reading
_DEVICE_REBUILT = {"nominal", "device", "crossbars", "_reading"}
_CROSSBAR_REBUILT = {"device", "mapping"}


def device_state(network: DeviceNetwork) -> dict:
    """A DeviceNetwork's runtime state as a tree of plain values (:func:`write_state`): its seed and
    clock, the neurons' parameters, the held read noise, every random stream, and each crossbar's
    devices (programmed conductances, write times, fixed draws, pulsed devices' parameters)."""
    structure = set(vars(network.nominal))  # what Network.__init__ derives from the layers and connections
    state = {k: v for k, v in vars(network).items() if k not in structure | _DEVICE_REBUILT}
    state["neurons"] = dataclasses.asdict(network.neurons)
    state["layer_tau"] = [x.tau for x in network.layers]  # from the neurons' time constants
    state["crossbars"] = {name: {k: v for k, v in vars(xb).items() if k not in _CROSSBAR_REBUILT}
                          for name, xb in network.crossbars.items()}
    return state


def set_device_state(network: DeviceNetwork, state: dict):
    """Give ``network`` (attached to an equal device) the state :func:`device_state` returned."""
    state = dict(state)
    for x, tau in zip(network.layers, state.pop("layer_tau"), strict=True):
        x.tau = tau
    network.neurons = Neurons(**state.pop("neurons"))
    crossbars = state.pop("crossbars")
    if set(crossbars) != set(network.crossbars):
        raise ValueError(f"crossbars {sorted(crossbars)}; the network has {sorted(network.crossbars)}")
    for name, xb in network.crossbars.items():
        kept = {k: v for k, v in vars(xb).items() if k in _CROSSBAR_REBUILT}
        vars(xb).clear()
        vars(xb).update(kept, **crossbars[name])
    vars(network).update(state)
    network._reading = None  # read again from the restored devices


def _write_device_network(group, network: DeviceNetwork):
    write_object(group.create_group("nominal"), network.nominal)
    write_object(group.create_group("device"), network.device)
    write_state(group, "state", device_state(network))


def _read_device_network(group) -> DeviceNetwork:
    nominal, device = read_object(group["nominal"]), read_object(group["device"])
    weights = {c.name: c.weight.copy() for c in nominal.connections if c.weight is not None}
    # attach builds the structure; its draws (seeded by a throwaway generator) are replaced by the state
    network = attach(nominal, device, np.random.default_rng(0))
    for c in nominal.connections:
        if c.name in weights:  # a pulsed device's first write set them to its throwaway devices
            c.weight[...] = weights[c.name]
    set_device_state(network, read_state(group["state"]))
    return network


# ------------------------------------------------------------------------------------ Cost
def _write_cost(group, cost: Cost):
    write_config(group, {"layer": cost.layer, "kind": cost.kind})
    for name in ("readout_weight", "readout_bias"):
        if getattr(cost, name) is not None:
            archive.create_dataset(group, name, getattr(cost, name))


def _read_cost(group) -> Cost:
    cfg = read_config(group)
    return Cost(cfg["layer"], cfg["kind"], *(read_array(group, name) if name in group else None
                                             for name in ("readout_weight", "readout_bias")))


register(Network, _write_network, _read_network)
register(Device, _write_device, _read_device)
register(DeviceNetwork, _write_device_network, _read_device_network)
register(Cost, _write_cost, _read_cost)
