"""HDF5 archives of runs, through h5py.

A run is written to a temporary file beside its destination and renamed into place only when it is
complete (``os.replace`` is atomic on POSIX), so a killed run never leaves a half-written archive.
Every file carries provenance attributes: the resolved config as JSON, the seed, the git commit,
package versions, host and timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from typing import Mapping

import h5py
import numpy as np

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


def _write_group(group: h5py.Group, tree: Mapping):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _write_group(group.create_group(key), value)
        elif isinstance(value, str):
            group.attrs[key] = value
        else:
            arr = np.asarray(value)
            group.create_dataset(key, data=arr, compression="gzip" if arr.size > 1024 else None)


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


def write_run(path: str, data: Mapping, attrs: Mapping) -> str:
    """Write nested ``data`` (dicts become groups, arrays datasets, strings attributes) and root
    ``attrs`` to ``path`` atomically. Returns the path."""
    path = os.path.abspath(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            _write_group(f, data)
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


def read(path: str) -> dict:
    """The whole archive as nested dicts: datasets as arrays, attributes under ``"attrs"``."""

    def walk(g):
        out = {"attrs": dict(g.attrs)}
        for k, v in g.items():
            out[k] = walk(v) if isinstance(v, h5py.Group) else v[()]
        return out

    with h5py.File(path, "r") as f:
        return walk(f)
