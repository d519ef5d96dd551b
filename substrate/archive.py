"""HDF5 archives of runs, through h5py.

A run is written to a temporary file beside its destination and renamed into place only when it is
complete (``os.replace`` is atomic on POSIX), so a killed run never leaves a half-written archive.
Every file carries provenance attributes: the resolved config as JSON, the seed, the git commit,
package versions, host and timings.
"""

from __future__ import annotations

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

PACKAGES = ("substrate", "numpy", "scipy", "numba", "h5py")


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


def write_run(path: str, data: Mapping, attrs: Mapping) -> str:
    """Write nested ``data`` (dicts become groups, arrays datasets, strings attributes) and root
    ``attrs`` to ``path`` atomically. Returns the path."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".h5", dir=folder)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            _write_group(f, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


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
