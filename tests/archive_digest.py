"""Digests of the deterministic content of a study archive, to check that a refactor changes no result.

A digest covers every dataset of the archive's ``data`` group and of each run's ``arrays`` and ``scalars``
(dtype, shape and bytes), and the run attributes that a run's result depends on (its id, config, seed, status,
error and coordinates). Left out, because they differ between two honest runs of the same code: wall-clock
durations (every name containing "seconds"), dates, host, process, versions, git commit, timings, tracebacks, the
HDF5 object references of dimension scales and the CRC seals over attributes that contain those.

Refresh the reference (only on a commit whose results are the intended ones) with::

    python -m tests.archive_digest OUT_DIR...    # each OUT_DIR holds one `substrate sweep --profile debug` archive

which writes tests/data/archive_digests.json, keyed by the study config's file name.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys

import h5py
import numpy as np

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "archive_digests.json")
RUN_ATTRS = ("run_id", "config", "seed", "status", "error", "coords", "index", "array_dims", "array_coords", "task")


def _volatile(name: str) -> bool:
    return "seconds" in name


def _hash(data) -> str:
    a = np.asarray(data)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def _datasets(group: h5py.Group, prefix: str, out: dict):
    for name, obj in group.items():
        if isinstance(obj, h5py.Dataset) and not _volatile(name):
            out[f"{prefix}/{name}"] = _hash(obj[()])


def digest(path: str) -> dict:
    """{where: digest} of the deterministic content of the study archive at ``path``."""
    out = {}
    with h5py.File(path, "r") as f:
        _datasets(f["data"], "data", out)
        for rid, g in f["runs"].items():
            for a in RUN_ATTRS:
                if a in g.attrs:
                    out[f"runs/{rid}@{a}"] = _hash(np.asarray(g.attrs[a]))
            for sub in ("arrays", "scalars"):
                if sub in g:
                    _datasets(g[sub], f"runs/{rid}/{sub}", out)
    return out


def main(folders):
    reference = {}
    for folder in folders:
        (path,) = glob.glob(os.path.join(folder, "*.h5"))
        reference[f"{os.path.basename(os.path.normpath(folder))}.toml"] = digest(path)
    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    with open(REFERENCE, "w") as fh:
        json.dump(reference, fh, indent=0, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
