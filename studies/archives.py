"""Reading sweep archives and run files, every name and value checked before use: a hostile or damaged
file gives an :class:`~substrate.errors.ArchiveError` naming the file and the part, never a traceback,
a path outside the output folder or an allocation beyond what the archive holds.

:func:`find_archive` finds a study's archive for a notebook; :func:`open_dataset` gives an archive's
stacked results as an ``xarray.Dataset``; :func:`read_header`
and :func:`read_layout` its checked attributes and layout; :func:`read_runs` and :func:`load_run` the
copies of its runs; :func:`read_run` and :func:`run_status` a run file (see :mod:`studies.sweep` for
the layout); :func:`saved_objects` what the runs of either kept of what they trained.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import xarray as xr

from studies.config import valid_name
from studies.runs import RESERVED, RUN_FORMAT, WEIGHTS
from substrate import archive
from substrate.errors import ArchiveError

FORMAT = "substrate-sweep/1"
ARCHIVE_VARIABLE = "SUBSTRATE_ARCHIVE"
COUNTS = ("n_runs", "n_done", "n_failed", "n_missing")
STATUSES = ("done", "failed", "missing")


class ArchiveNotFound(FileNotFoundError):
    """A study's archive is not where it was looked for; the message says where it looked and the
    command that makes it."""


def find_archive(study: str, path: str | None = None) -> str:
    """The archive of the study named ``study`` (what its notebook draws): ``path`` if given; else the
    environment variable ``SUBSTRATE_ARCHIVE`` (an archive, or a folder holding ``<study>.h5`` or
    ``<study>/<study>.h5``); else ``sweep-output/<study>/<study>.h5`` (what ``substrate sweep <study>``
    writes), then ``sweep-output/<study>-<profile>/<study>.h5``, in the working folder or the nearest of
    its parents that has one. Raises :class:`ArchiveNotFound` saying where it looked and the command that
    makes the archive."""
    if path is not None:
        candidates, looked = [os.path.abspath(path)], f"{os.path.abspath(path)} (the path given)"
    elif os.environ.get(ARCHIVE_VARIABLE):
        given = os.path.abspath(os.environ[ARCHIVE_VARIABLE])
        candidates = ([os.path.join(given, f"{study}.h5"), os.path.join(given, study, f"{study}.h5")]
                      if os.path.isdir(given) else [given])
        looked = f"{' and '.join(candidates)} (${ARCHIVE_VARIABLE})"
    else:
        candidates, folder = [], os.getcwd()
        while True:
            out = os.path.join(folder, "sweep-output")
            profiles = sorted(n for n in os.listdir(out) if n.startswith(f"{study}-")) if os.path.isdir(out) else []
            candidates += [os.path.join(out, n, f"{study}.h5") for n in [study] + profiles]
            if os.path.dirname(folder) == folder:
                break
            folder = os.path.dirname(folder)
        looked = f"sweep-output/{study}/{study}.h5 (or {study}-<profile>) in {os.getcwd()} and its parents"
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise ArchiveNotFound(f"no archive of the study {study!r}: looked for {looked}. Make it with `substrate sweep "
                          f"{study}` (or a small one, quickly: `substrate sweep {study} --profile debug`), or set "
                          f"{ARCHIVE_VARIABLE} to an archive's path")


def _attr(v):
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def _json(path: str, where: str, text, kind: type):
    """An attribute holding JSON of type ``kind``."""
    if not isinstance(text, str):
        raise ArchiveError(path, f"{where} is {type(text).__name__}, expected JSON text")
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ArchiveError(path, f"{where} is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise ArchiveError(path, f"{where} holds a JSON {type(value).__name__}, expected a {kind.__name__}")
    return value


def _names(path: str, where: str, values) -> list:
    if not all(isinstance(v, str) and v for v in values):
        raise ArchiveError(path, f"{where} = {values!r}: expected non-empty strings")
    return list(values)


def _member(path: str, group: h5py.Group, name: str, kind: type):
    """``group[name]``, which must exist and be a ``kind`` (h5py.Group or h5py.Dataset)."""
    where = f"{group.name.rstrip('/')}/{name}"
    if name not in group:
        raise ArchiveError(path, f"{where} is missing")
    obj = group[name]
    if not isinstance(obj, kind):
        raise ArchiveError(path, f"{where} is not a {'group' if kind is h5py.Group else 'dataset'}")
    return obj


def read_header(f: h5py.File, path: str) -> dict:
    """The root attributes of a sweep archive, checked: the format, ``study_name`` a valid file name,
    ``task`` and the other texts strings, ``axes`` JSON {name: non-empty list}, the counts of runs
    consistent with the axes. ``axes`` and ``axis_keys`` are returned parsed."""
    a = {k: _attr(v) for k, v in f.attrs.items()}
    if a.get("format") != FORMAT:
        raise ArchiveError(path, f"is not a sweep archive (format {a.get('format')!r}, expected {FORMAT!r})")
    for key in ("study_name", "task", "study", "created", "host", "git_commit", "axes"):
        if not isinstance(a.get(key), str):
            raise ArchiveError(path, f"attribute {key!r} is {'missing' if key not in a else repr(a[key])}; "
                                     "expected a string")
    for key in ("profile", "description"):
        if not isinstance(a.setdefault(key, ""), str):
            raise ArchiveError(path, f"attribute {key!r} = {a[key]!r}; expected a string")
    if not valid_name(a["study_name"]):
        raise ArchiveError(path, f"study_name = {a['study_name']!r} is not a valid name; allowed: letters, "
                                 "digits and _ . + -, not starting with '.' (a file name)")
    axes = _json(path, "attribute 'axes'", a["axes"], dict)
    for name, values in axes.items():
        if not valid_name(name) or not isinstance(values, list) or not values:
            raise ArchiveError(path, f"attribute 'axes': axis {name!r} = {values!r}; expected a name and a "
                                     "non-empty list")
    a["axes"] = axes
    keys = _json(path, "attribute 'axis_keys'", a.get("axis_keys", "{}"), dict)
    a["axis_keys"] = {k: _names(path, f"attribute 'axis_keys' of {k!r}", v if isinstance(v, list) else [v])
                      for k, v in keys.items()}
    for key in COUNTS:
        if isinstance(a.get(key), bool) or not isinstance(a.get(key), int) or a[key] < 0:
            raise ArchiveError(path, f"attribute {key!r} = {a.get(key)!r}; expected an integer >= 0")
    points = int(np.prod([len(v) for v in axes.values()]))
    if a["n_runs"] != points or a["n_done"] + a["n_failed"] + a["n_missing"] != points:
        raise ArchiveError(path, f"counts of runs {[a[k] for k in COUNTS]} ({', '.join(COUNTS)}) do not add "
                                 f"up to the {points} points of the axes")
    return a


def read_layout(f: h5py.File, path: str) -> dict:
    """The checked header (:func:`read_header`) and the layout of ``/data`` without reading its data:
    ``dims`` {dataset: its dims}, ``coords`` (the coordinate names), ``sizes`` {dim: length}. Every
    dataset's shape must be what its dims imply (the sweep axes' lengths, the result dimensions'
    coordinates), the coordinates and status wholly stored, and no result hold more values per run than
    the largest array a run stored: a file cannot claim arrays beyond what it holds."""
    head = read_header(f, path)
    data = _member(path, f, "data", h5py.Group)
    coords = _names(path, "/data attribute 'coordinates'",
                    _json(path, "/data attribute 'coordinates'", _attr(data.attrs.get("coordinates")), list))
    dims, datasets = {}, {}
    for name in data:
        ds = _member(path, data, name, h5py.Dataset)
        d = _names(path, f"{ds.name} attribute 'dims'", _json(path, f"{ds.name} attribute 'dims'",
                                                               _attr(ds.attrs.get("dims")), list))
        if len(d) != ds.ndim or len(set(d)) != len(d):
            raise ArchiveError(path, f"{ds.name} has {ds.ndim} dimensions but its attribute 'dims' names {d}")
        dims[name], datasets[name] = d, ds
        strings = h5py.check_string_dtype(ds.dtype) is not None
        if (name in RESERVED and not strings) or (name not in RESERVED and name not in coords and
                                                  ds.dtype.kind not in "biufc"):
            raise ArchiveError(path, f"{ds.name} has dtype {ds.dtype}; expected "
                                     f"{'strings' if name in RESERVED else 'numbers'}")
    missing = [c for c in coords if c not in dims] or [a for a in head["axes"] if a not in coords]
    if missing:
        raise ArchiveError(path, f"/data attribute 'coordinates' = {coords} does not match the datasets and "
                                 f"axes ({missing})")
    sizes = {a: len(v) for a, v in head["axes"].items()}
    for name in list(head["axes"]) + [n for n in coords if dims.get(n) == [n]] + list(RESERVED):
        if name not in dims:
            raise ArchiveError(path, f"/data/{name} is missing")
        if name in coords and dims[name] == [name]:
            sizes.setdefault(name, datasets[name].shape[0])
    axes = list(head["axes"])
    largest = _largest_run_array(f, path)
    for name, d in dims.items():
        unknown = [x for x in d if x not in sizes]
        if unknown:
            raise ArchiveError(path, f"/data/{name}: dimension(s) {unknown} have no coordinate")
        implied = tuple(sizes[x] for x in d)
        if datasets[name].shape != implied:
            raise ArchiveError(path, f"/data/{name} has shape {datasets[name].shape}, but its dims {d} imply "
                                     f"{implied}")
        if name in coords or name in RESERVED:  # written whole: their size is backed by the file
            archive.check_stored(datasets[name], path)
        if name not in coords and name not in RESERVED:
            if d[:len(axes)] != axes:
                raise ArchiveError(path, f"/data/{name} has dims {d}; a result's first dims are the axes {axes}")
            if int(np.prod(implied[len(axes):])) > largest:
                raise ArchiveError(path, f"/data/{name} holds {int(np.prod(implied[len(axes):]))} values per run, "
                                         f"more than any run stored ({largest})")
        if name in RESERVED and d != axes:
            raise ArchiveError(path, f"/data/{name} has dims {d}; expected the axes {axes}")
    return {"attrs": head, "dims": dims, "coords": coords, "sizes": sizes}


def _largest_run_array(f: h5py.File, path: str) -> int:
    """The size of the largest array a run copy stores wholly (1: a scalar)."""
    largest = 1
    for g in _member(path, f, "runs", h5py.Group).values():
        arrays = g.get("arrays") if isinstance(g, h5py.Group) else None
        for ds in (arrays.values() if isinstance(arrays, h5py.Group) else ()):
            if isinstance(ds, h5py.Dataset) and ds.size > largest:
                archive.check_stored(ds, path)
                largest = ds.size
    return largest


def _decode(ds: h5py.Dataset, path: str) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.asarray(ds.asstr(errors="replace")[()], dtype=object).astype(str)
    if ds.dtype.kind not in "biufc":
        raise ArchiveError(path, f"{ds.name} has dtype {ds.dtype}; expected numbers or strings")
    return ds[()]


def open_dataset(path: str):
    """The archive's stacked results as an ``xarray.Dataset`` (read with h5py, loaded into memory): the
    sweep axes and result dimensions as named dims with coordinates, ``status``/``error``/``run_id`` and
    every result as variables, the archive's attributes as ``attrs`` (``axes``, ``base`` and ``study``
    hold JSON and TOML text). Raises :class:`~substrate.errors.ArchiveError` naming the file and the part
    when it is not a readable, consistent sweep archive (see :func:`read_layout`)."""
    with archive.open_file(path) as f:
        layout = read_layout(f, path)
        data = f["data"]
        need = sum(data[n].size * data[n].dtype.itemsize for n in layout["dims"])
        if need > _memory():
            raise ArchiveError(path, f"its data take {need / 2 ** 30:.1f} GiB, more than this machine's memory")
        coords, data_vars = {}, {}
        for name, dims in layout["dims"].items():
            (coords if name in layout["coords"] else data_vars)[name] = (tuple(dims), _decode(data[name], path))
        attrs = {k: _attr(v) for k, v in f.attrs.items() if k != archive.TEXT_CRC}
    bad = sorted(set(np.unique(data_vars["status"][1]).tolist()) - set(STATUSES))
    if bad:
        raise ArchiveError(path, f"/data/status holds {bad}; allowed: {', '.join(STATUSES)}")
    return xr.Dataset(data_vars, coords, attrs)


def _memory() -> int:
    """Bytes of physical memory (no limit where the system does not tell)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 2 ** 63


def read_runs(f: h5py.File, path: str):
    """Each run copy of an archive, checked: yields (run_id, status, coords, error)."""
    runs = _member(path, f, "runs", h5py.Group)
    for rid in runs:
        g = _member(path, runs, rid, h5py.Group)
        a = {k: _attr(g.attrs.get(k)) for k in ("status", "error", "coords")}
        if a["status"] not in ("done", "failed") or not isinstance(a["error"], str):
            raise ArchiveError(path, f"{g.name}: status {a['status']!r} and error {a['error']!r}; expected "
                                     "'done' or 'failed' and a string")
        yield rid, a["status"], _json(path, f"{g.name} attribute 'coords'", a["coords"], dict), a["error"]


def load_run(path: str, rid: str) -> dict:
    """One run of an archive: {attrs, config, arrays: name -> (dims, array), scalars}."""
    with archive.open_file(path) as f:
        g = _member(path, _member(path, f, "runs", h5py.Group), rid, h5py.Group)
        return _run_contents(g, path)


def _run_contents(g: h5py.Group, path: str) -> dict:
    """A run (a run file's root, or its copy in an archive), checked."""
    attrs = {k: _attr(v) for k, v in g.attrs.items() if k != archive.TEXT_CRC}
    where = g.name.rstrip("/")
    dims = _json(path, f"{where} attribute 'array_dims'", attrs.get("array_dims", "{}"), dict)
    arrays, scalars = {}, {}
    for part, out in (("arrays", arrays), ("scalars", scalars)):
        if part not in g:
            continue
        for k in _member(path, g, part, h5py.Group):
            ds = _member(path, g[part], k, h5py.Dataset)
            archive.check_stored(ds, path)
            value = _decode(ds, path)
            if part == "scalars":
                if value.ndim or value.dtype.kind not in "biuf":
                    raise ArchiveError(path, f"{ds.name} is {value.dtype} of shape {value.shape}; expected a "
                                             "real number")
                out[k] = float(value)
            else:
                d = dims.get(k, [])
                if not isinstance(d, list) or len(d) != value.ndim:
                    raise ArchiveError(path, f"{ds.name}: dims {d!r} do not name its {value.ndim} axes")
                out[k] = (tuple(d), value)
    config = _json(path, f"{where} attribute 'config'", attrs.get("config"), dict)
    coords = _json(path, f"{where} attribute 'array_coords'", attrs.get("array_coords", "{}"), dict)
    return {"attrs": attrs, "config": config, "arrays": arrays, "scalars": scalars, "coords": coords}


def saved_objects(path: str) -> list:
    """What the runs of a run file or a sweep archive trained and kept (``save_weights``): one dict per
    saved object, {run_id, task, name, group (its path in the file, for ``substrate.load(path, group=...)``),
    config, seed, coords}, in the file's order of runs. Raises :class:`~substrate.errors.ArchiveError`
    for a file that is neither."""
    out = []
    with archive.open_file(path) as f:
        fmt = _attr(f.attrs.get("format"))
        if fmt == FORMAT:
            runs = [(f"runs/{rid}", g) for rid, g in _member(path, f, "runs", h5py.Group).items()]
        elif fmt == RUN_FORMAT:
            runs = [("", f)]
        else:
            raise ArchiveError(path, f"is neither a sweep archive nor a run file (format {fmt!r}; expected "
                                     f"{FORMAT!r} or {RUN_FORMAT!r})")
        for where, g in runs:
            weights = g.get(WEIGHTS) if isinstance(g, h5py.Group) else None
            if not isinstance(weights, h5py.Group):
                continue
            where = f"{where}/" if where else ""
            config = _json(path, f"{g.name} attribute 'config'", _attr(g.attrs.get("config")), dict)
            coords = _json(path, f"{g.name} attribute 'coords'", _attr(g.attrs.get("coords", "{}")), dict)
            seed = _attr(g.attrs.get("seed"))
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ArchiveError(path, f"{g.name} attribute 'seed' = {seed!r}; expected an integer")
            for name in weights:
                out.append({"run_id": str(_attr(g.attrs.get("run_id", ""))), "task": str(_attr(g.attrs.get("task"))),
                            "name": name,
                            "group": f"{where}{WEIGHTS}/{name}", "config": config, "seed": seed, "coords": coords})
    return out


def run_status(path: str) -> str | None:
    """The status stored in a run file, or None when it is absent or unreadable."""
    try:
        with archive.open_file(path) as f:
            return str(f.attrs["status"])
    except (ArchiveError, KeyError):
        return None


def read_run(path: str) -> dict:
    """A run file as {attrs, config, arrays: name -> (dims, array), scalars: name -> float, coords}."""
    with archive.open_file(path) as f:
        return _run_contents(f, path)
