"""Digests of the deterministic content of a study archive, to check that a refactor changes no result.

A digest covers every dataset of the archive's ``data`` group and of each run's ``arrays`` and ``scalars``,
and the run attributes that a run's result depends on (its id, config, seed, status, error and coordinates).
Left out, because they differ between two honest runs of the same code: wall-clock durations (every name
containing "seconds"), dates, host, process, versions, git commit, timings, tracebacks, the HDF5 object
references of dimension scales and the CRC seals over attributes that contain those.

What is exact and what is not: attributes, strings, integers and booleans are digested by a hash of their
bytes and must match bit for bit. Floating-point data (real or complex) is digested by its dtype, shape and
the places of its NaNs and infinities (hashed, exact) and by six statistics of its finite values: the sum, the
sum of magnitudes ``l1``, the Euclidean norm, a projection onto fixed pseudo-random weights in [-1, 1]
(integer hashing: the same weights on every machine), the maximum and the minimum. They must agree within
``RTOL`` of the reference's ``l1`` (the sums, the norm, the projection) or of its largest magnitude (the
maximum and the minimum); a run's result at the larger of those scales and its study's gathered array's. Why not bits: the same code on another CPU, or with another OpenBLAS kernel or
NumPy build, rounds its products differently (13 of the 15 studies' bit-exact digests, made on one machine,
failed on the next one), and a training run carries those ulps forward; what two OpenBLAS kernels make of every
study is recorded next to ``RTOL``.

Refresh the reference (only on a commit whose results are the intended ones) with::

    python -m tests.archive_digest OUT_DIR...    # each OUT_DIR holds one `substrate sweep --profile debug` archive

which replaces the entries of those studies in tests/data/archive_digests.json, keyed by the study config's
file name (the others are kept).
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
# The largest deviation measured between OpenBLAS's Haswell and Sandybridge kernels (OPENBLAS_CORETYPE), every
# study at debug size, as differences() measures it: 1.1e-8 for relaxation's residuals (each ~1e-8, the
# relaxation's stopping tolerance: rounding is all they are made of), 3.3e-13 or less for every other result.
# RTOL leaves two decades above the first for longer chains of rounding on other machines, and a change of a
# result, not of its rounding, moves a statistic by more than a millionth.
RTOL = 1e-6
STATS = ("sum", "l1", "l2", "projection", "max", "min")


def _volatile(name: str) -> bool:
    return "seconds" in name


def _hash(data) -> str:
    a = np.asarray(data)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def _weights(n: int) -> np.ndarray:
    """n fixed weights in [-1, 1) from Knuth's multiplicative hash: integer arithmetic, the same everywhere."""
    i = np.arange(1, n + 1, dtype=np.uint64)
    return ((i * np.uint64(2654435761)) % np.uint64(2**32)).astype(np.float64) / 2.0**31 - 1.0


def _float_digest(a: np.ndarray) -> list:
    """[exact header hash, sum, l1, l2, projection, max, min] of a real or complex array."""
    r = np.ascontiguousarray(a)
    r = (r.view(r.real.dtype) if np.iscomplexobj(r) else r).astype(np.float64).ravel()
    finite = np.isfinite(r)
    header = _hash(np.stack([np.isnan(r), np.isposinf(r), np.isneginf(r)]))
    header = hashlib.sha256(f"{a.dtype.str}{a.shape}{header}".encode()).hexdigest()[:20]
    x = r[finite]
    if not x.size:
        return [header, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    return [header, float(x.sum()), float(np.abs(x).sum()), float(np.sqrt(x @ x)),
            float(x @ _weights(r.size)[finite]), float(x.max()), float(x.min())]


def _digest(data):
    a = np.asarray(data)
    return _float_digest(a) if a.dtype.kind in "fc" else _hash(a)


def _datasets(group: h5py.Group, prefix: str, out: dict):
    for name, obj in group.items():
        if isinstance(obj, h5py.Dataset) and not _volatile(name):
            out[f"{prefix}/{name}"] = _digest(obj[()])


def digest(path: str) -> dict:
    """{where: digest} of the deterministic content of the study archive at ``path``: a hash string for exact
    content, a list [header hash, *STATS] for floating-point data."""
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


def _scales(reference) -> np.ndarray:
    """The scale each statistic of a float digest is compared at: l1 for the sums, the norm and the projection,
    the largest magnitude for the maximum and the minimum."""
    return np.array([reference[2]] * 4 + [max(abs(reference[5]), abs(reference[6]))] * 2)


def deviation(now, reference, floor=None) -> float:
    """How far a digest is from its reference: 0 when equal, inf when an exact part differs, else the largest
    deviation of a statistic relative to its scale (_scales), or to the scales of ``floor`` (the reference digest
    of the study's gathered array of the same result) where those are larger: a run's result that is itself
    rounding (a converged residual, the error of an identity that holds exactly) is judged at the size of that
    result across the study, not at its own."""
    if isinstance(reference, str) or isinstance(now, str):
        return 0.0 if now == reference else np.inf
    if now[0] != reference[0]:
        return np.inf
    scale = _scales(reference)
    if isinstance(floor, list):
        scale = np.maximum(scale, _scales(floor))
    diff = np.abs(np.array(now[1:]) - np.array(reference[1:]))
    if not (diff[scale == 0] == 0).all():
        return np.inf
    return float(np.max(diff[scale > 0] / scale[scale > 0], initial=0.0))


def _gathered(where: str) -> str:
    """data/NAME for a run's runs/ID/arrays/NAME or runs/ID/scalars/NAME (the sweep gathers them there)."""
    return "data/" + where.rsplit("/", 1)[-1]


def differences(now: dict, reference: dict, rtol: float = RTOL) -> dict:
    """{where: deviation} of every entry of ``reference`` that ``now`` misses or does not match within rtol."""
    out = {k: np.inf for k in reference if k not in now}
    for k in reference.keys() & now.keys():
        d = deviation(now[k], reference[k], reference.get(_gathered(k)) if k.startswith("runs/") else None)
        if d > rtol:
            out[k] = d
    return out


def main(folders):
    with open(REFERENCE) as fh:
        reference = json.load(fh)
    for folder in folders:
        (path,) = glob.glob(os.path.join(folder, "*.h5"))
        reference[f"{os.path.basename(os.path.normpath(folder))}.toml"] = digest(path)
    with open(REFERENCE, "w") as fh:
        json.dump(reference, fh, indent=0, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
