"""What several study families share: scikit-learn's 8x8 digits drawn by a seed, and the schema of a
layered network (``substrate.Network.from_config``)."""

from __future__ import annotations

import numpy as np

import substrate as S
from models.data import digits_arrays
from studies.config import Check, Field, ListOf, Range

N_DIGITS = 1797


def digits(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` of scikit-learn's 8x8 digits drawn without replacement by ``seed``, pixels in [0, 1]."""
    x, y = digits_arrays()
    idx = np.random.default_rng([1, int(seed)]).choice(len(y), size=batch, replace=False)
    return x[idx], y[idx]


def _sizes_ok(s):
    return s[0] == 64 and s[-1] == 10


NETWORK = {
    "sizes": Field(ListOf(int, 3, 6, Range(1, 4096)), Check(_sizes_ok, "starting with 64 (the 8x8 pixels) and "
                                                                   "ending with 10 (the digit classes)"),
                   [64, 32, 10], "layer sizes: input, hidden layers, output"),
    "activation": Field(str, tuple(S.ACTIVATIONS), "logistic", "activation of every layer"),
    "tau": Field(float, Range(0.0, 1e3, lo_open=True), 1.0, "time constant of every neuron"),
    "feedback": Field(str, ("tied", "independent", "none"), "independent", "feedback connections"),
    "asymmetry_angle": Field(float, Range(0.0, 180.0), 90.0, "degrees between the feedback and W^T"),
    "init_scale": Field(float, Range(0.0, 100.0, lo_open=True), 1.0, "weights uniform in +-scale/sqrt(fan_in)"),
    "lateral": Field(bool, None, False, "all-to-all connections inside hidden layers"),
}


def network_schema(default_sizes):
    """:data:`NETWORK` with other default layer sizes."""
    schema = dict(NETWORK)
    schema["sizes"] = NETWORK["sizes"]._replace(default=list(default_sizes))
    return schema
