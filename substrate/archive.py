"""HDF5 archives of runs, through h5py.

A run is written to a temporary file beside its destination and renamed into place only when it is
complete (``os.replace`` is atomic on POSIX), so a killed run never leaves a half-written archive.
Every file carries provenance attributes: the resolved config as JSON, the seed, the git commit,
package versions, host and timings.

Integrity. Files are written in the HDF5 1.10 format (``LIBVER``), whose object headers, the
attributes stored in them and the chunk indexes carry checksums; every dataset with data is chunked with the
Fletcher-32 filter (:func:`create_dataset`); the text of string attributes, which HDF5 keeps outside
the headers, is covered by a CRC-32 (:func:`seal`). A flipped bit is reported on read, not returned as
a wrong number. :func:`open_file` is the one way archives are read: it refuses what is not a regular
file (a FIFO or a device would block the reader), links out of the file, datasets whose data is not in
it and text that does not match its CRC, and turns every failure of HDF5 into an
:class:`~substrate.errors.ArchiveError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import stat
import subprocess
import tempfile
import zlib
from datetime import datetime, timezone
from importlib import metadata
from typing import Mapping

import h5py
import numpy as np

from substrate.errors import ArchiveError

# the HDF5 1.10 file format (HDF5 >= 1.10 reads it): version-2 object headers and the chunk indexes
# of 1.10 (fixed and extensible arrays) carry checksums; the default format's (version-1 headers and
# B-trees) do not, so a flipped bit in a chunk's address read silently as the fill value, NaN
LIBVER = ("v110", "v110")
PACKAGES = ("substrate", "numpy", "scipy", "numba", "h5py", "scikit-learn")


def git_commit(path: str | None = None) -> str:
    """The commit of the source tree (with ``+dirty`` if it has uncommitted changes), or 'unknown'."""
    cwd = path or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(config: Mapping, seed: int | None, timings: Mapping[str, float] | None = None) -> dict:
    """The attributes a result file carries: the config (JSON), the seed (-1 for none), package versions, git
    commit, host, Python, the date and ``timings``."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = "not installed"
    return {
        "config": json.dumps(config, sort_keys=True, default=str),
        "seed": -1 if seed is None else int(seed),
        "git_commit": git_commit(),
        "versions": json.dumps(versions, sort_keys=True),
        "host": platform.node(),
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings": json.dumps(dict(timings or {}), sort_keys=True),
    }


def create_dataset(group: h5py.Group, name: str, data, compress_above: int = 1024) -> h5py.Dataset:
    """A dataset whose data a checksum covers: chunked with the Fletcher-32 filter (HDF5 filters need
    chunks), gzip beyond ``compress_above`` values; a 0-d one in compact layout, that is inside its
    object header, whose checksum covers it (a scalar cannot be chunked); an empty one has no data to
    protect. Strings are stored as fixed-length UTF-8: the text of variable-length strings lives in a
    heap that no checksum covers."""
    arr = np.asarray(data)
    kwargs = {}
    if arr.dtype.kind in "OUS":
        text = [v if isinstance(v, bytes) else str(v).encode() for v in arr.ravel()]
        dtype = h5py.string_dtype("utf-8", max([1] + [len(t) for t in text]))
        arr = np.array(text, dtype=dtype).reshape(arr.shape)
    if arr.ndim == 0:  # low level: h5py's create_dataset drops the layout of a scalar's dcpl
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        dsid = h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(arr.dtype, logical=True),
                               h5py.h5s.create(h5py.h5s.SCALAR), dcpl=dcpl)
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(arr))
        return h5py.Dataset(dsid)
    if arr.size:
        kwargs.update(chunks=True, fletcher32=True)
        if arr.size > compress_above:
            kwargs.update(compression="gzip", compression_opts=4, shuffle=True)
    return group.create_dataset(name, data=arr, **kwargs)


def _write_group(group: h5py.Group, tree: Mapping):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _write_group(group.create_group(key), value)
        elif isinstance(value, str):
            group.attrs[key] = value
        else:
            create_dataset(group, key, value)


TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary file name beside ``path`` (prefix ``.tmp-``); when the block ends without an
    exception the file is flushed to disk and renamed to ``path`` (``os.replace``: atomic on POSIX),
    else removed. A reader sees either the previous complete file or the new complete one, never a
    partial file, whenever the writer is killed (and, with the fsyncs, after a power cut)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".h5", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from other users
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fsync(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without fsync
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # read once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_run(path: str, data: Mapping, attrs: Mapping, what: str = "the file",
              hint: str = "free some space and try again", more=None) -> str:
    """Write nested ``data`` (dicts become groups, arrays datasets, strings attributes) and root
    ``attrs`` to ``path`` atomically through :func:`create_h5` (a full disk is a :class:`WriteError`
    naming ``what`` and ``hint``); ``more(file)``, if given, writes the rest (saved objects) before the
    file is sealed. Returns the path."""
    path = os.path.abspath(path)
    with create_h5(path, what, hint) as (f, _):
        for k, v in attrs.items():
            f.attrs[k] = v
        _write_group(f, data)
        if more is not None:
            more(f)
        seal(f)
    return path


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_path`'s temporary files (never a complete file)."""
    base = os.path.basename(name)
    return base.startswith(TEMP_PREFIX) and base.endswith(".h5")


def remove_temporary(folder: str) -> list:
    """Remove the temporary files a killed writer left in ``folder``; returns their names. Call it only
    when no writer is active there."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        if is_temporary(name):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def members(group: Mapping) -> dict:
    """The sub-groups and datasets of a group returned by :func:`read`, without its ``attrs``."""
    return {k: v for k, v in group.items() if k != "attrs"}


# ------------------------------------------------------------------------------------ reading
@contextlib.contextmanager
def open_file(path: str):
    """Open an archive for reading (``with open_file(path) as f``). Refuses what is not a regular file
    (opening a FIFO blocks, a device never ends), links out of the file, virtual datasets and data
    stored in other files; an error of HDF5 while the block reads (a corrupt file, a checksum
    mismatch) becomes an :class:`ArchiveError` naming the file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ArchiveError(path, f"cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ArchiveError(path, "is not a regular file (a directory, FIFO or device is no archive)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ArchiveError(path, f"is not a readable HDF5 file ({e})") from None
    try:
        with f:
            problem = _text_problem(f) or f.id.links.visit(lambda name: _link_problem(f, name))
            if problem:
                raise ArchiveError(path, problem)
            yield f
    except (OSError, RuntimeError) as e:  # h5py raises either for a failure inside HDF5
        raise ArchiveError(path, f"is corrupt: HDF5 cannot read it ({e})") from None


def _link_problem(f: h5py.File, name: bytes) -> str | None:
    """What is wrong with the link ``name`` and its object, or None. The visit stops at the first
    message returned; every exception is caught here, as one raised in the callback would not cross
    HDF5's C code intact."""
    try:
        link = f.get(name, getlink=True)
    except (OSError, RuntimeError, KeyError, ValueError) as e:  # h5py's errors for a damaged object
        return f"/{name.decode(errors='replace')} cannot be read ({e})"
    name = name.decode(errors="replace")
    if isinstance(link, h5py.ExternalLink):
        return f"/{name} is a link to {link.filename}:{link.path}; an archive holds no links to other files"
    if not isinstance(link, h5py.HardLink):
        return f"/{name} is a {type(link).__name__}; an archive holds only groups and datasets"
    try:
        obj = f[name]
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        return f"/{name} cannot be read ({e})"
    if isinstance(obj, h5py.Dataset) and (obj.is_virtual or obj.external):
        return f"/{name} takes its data from other files (a virtual or external dataset); an archive " \
               "holds its data itself"
    return _text_problem(obj)


TEXT_CRC = "text_crc32"


def _text_crc(obj) -> int:
    """CRC-32 of an object's string attributes, names and values."""
    return zlib.crc32(json.dumps(sorted((k, v) for k, v in obj.attrs.items()
                                        if isinstance(v, str) and k != TEXT_CRC)).encode())


def seal(f: h5py.File):
    """Store on every object of ``f`` the CRC-32 of its string attributes (the config, the study, the
    errors, the dims): their text lives in HDF5's global heap, which no HDF5 checksum covers, unlike
    the object headers that hold the CRC. Readers check it (:func:`open_file`)."""
    objects = [f]
    f.visititems(lambda name, obj: objects.append(obj))
    for obj in objects:
        obj.attrs[TEXT_CRC] = np.int64(_text_crc(obj))


def _text_problem(obj) -> str | None:
    try:
        stored = obj.attrs.get(TEXT_CRC)
        if stored is not None and int(stored) != _text_crc(obj):
            return f"{obj.name}: its text attributes do not match their checksum (a damaged file)"
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:  # a damaged header or heap
        return f"{obj.name}: its attributes cannot be read ({e})"
    return None


def check_stored(ds: h5py.Dataset, path: str):
    """Refuse a dataset that is not wholly stored in the file: missing chunks read as the fill value, so
    a small file could otherwise claim an array of any size (every dataset written with data, as
    :func:`create_dataset` does, is wholly stored)."""
    if ds.size == 0 or ds.id.get_create_plist().get_layout() == h5py.h5d.COMPACT:
        return
    if ds.chunks is None:
        stored = ds.id.get_storage_size() > 0
    else:
        stored = ds.id.get_num_chunks() == int(np.prod([-(-n // c) for n, c in zip(ds.shape, ds.chunks)]))
    if not stored:
        raise ArchiveError(path, f"{ds.name} (shape {ds.shape}) is not wholly stored in the file")


def read(path: str) -> dict:
    """The whole archive as nested dicts: datasets as arrays, attributes under ``"attrs"``."""

    def walk(g):
        out = {"attrs": {k: v for k, v in g.attrs.items() if k != TEXT_CRC}}
        for k, v in g.items():
            if isinstance(v, h5py.Dataset):
                check_stored(v, path)
                out[k] = v[()]
            else:
                out[k] = walk(v)
        return out

    with open_file(path) as f:
        return walk(f)


class WriteError(OSError):
    """A file of the sweep (a run file, the archive) could not be written: disk full, quota, I/O error."""


@contextlib.contextmanager
def create_h5(path: str, what: str, hint: str):
    """Yield ``(h5py.File, sink)``: a new HDF5 file written atomically to ``path``
    (:func:`atomic_path`) through a :class:`WriteSink` (``sink.error``: the first
    failed write, if any). A failed write raises :class:`WriteError` (``what``, ``path``, the reason, then
    ``hint``) once the file is closed, and the incomplete file is removed."""
    with atomic_path(path) as tmp:
        sink = WriteSink(tmp)
        try:
            with h5py.File(sink, "w", libver=LIBVER) as f:
                yield f, sink
        finally:
            sink.close()
        if sink.error is not None:
            raise WriteError(f"cannot write {what} {path}: {sink.error.strerror or sink.error}; {hint}") \
                from sink.error


class WriteSink:
    """A file for h5py's ``fileobj`` driver that keeps the first failed write (ENOSPC, EDQUOT, EIO) in
    ``error`` and drops every write after it, so that HDF5 never sees a write fail. Why: HDF5 (2.0,
    h5py 3.16) crashes the process (segfault) when it closes a file after a failed write, which the
    ``sec2`` driver of ``h5py.File(path)`` reports to it; here the caller raises ``error`` once the file
    is closed, and the incomplete file is discarded."""

    def __init__(self, path: str):
        self._f = open(path, "r+b", buffering=0)  # unbuffered: a write fails in write(), not later
        self.error = None

    def write(self, data) -> int:
        """Write ``data`` whole; after a failed write, keep its error and drop this and every later write. Returns
        the bytes taken."""
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                while view:
                    n = self._f.write(view)
                    if not n:
                        raise OSError(errno.EIO, "short write")
                    view = view[n:]
            except OSError as e:
                self.error = e
        return len(data)

    def truncate(self, size=None):
        """Truncate the file to ``size`` (a failure is kept in ``error``, as a write's)."""
        try:
            return self._f.truncate(size)
        except OSError as e:
            self.error = self.error or e
            return size

    def read(self, size=-1):
        """Read up to ``size`` bytes (all with -1)."""
        return self._f.read(size)

    def readinto(self, buffer):  # past what was written (dropped writes) reads short: h5py pads with zeros
        """Read into ``buffer``; returns the bytes read."""
        return self._f.readinto(buffer)

    def seek(self, offset, whence=os.SEEK_SET):
        """Move to ``offset`` from ``whence``; returns the new position."""
        return self._f.seek(offset, whence)

    def tell(self):
        """The current position."""
        return self._f.tell()

    def flush(self):
        """Nothing to do: the file is unbuffered."""
        pass  # unbuffered

    def close(self):
        """Close the file."""
        self._f.close()
