"""The ``selftest`` study: a run that sleeps, then returns, raises, diverges or kills its own process;
it exercises the sweep machinery in the tests."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from studies.config import Field, Range
from studies.runs import Result, RunFailed, Task, discard

SCHEMA = {
    "value": Field(float, Range(-1e6, 1e6), 1.0, "scales the returned trace"),
    "size": Field(int, Range(1, 100_000), 4, "length of the returned trace"),
    "sleep": Field(float, Range(0.0, 60.0), 0.0, "seconds the run sleeps"),
    "fail": Field(str, ("none", "raise", "diverge", "crash"), "none",
                  "raise: an exception; diverge: a recorded failure; crash: the process kills itself"),
}


SLICES = 10  # a sleeping run reports its progress in this many steps


def run_selftest(config: dict, seed: int, save_partial=discard) -> Result:
    """One run of the selftest task: sleeps (reporting progress), then returns a noisy trace of ``value`` or fails
    as ``fail`` says."""
    for step in range(1, SLICES + 1 if config["sleep"] else 0):
        time.sleep(config["sleep"] / SLICES)
        save_partial.progress(step, SLICES, "step")
    trace = config["value"] * np.arange(config["size"]) + np.random.default_rng(seed).normal(size=config["size"])
    result = Result(arrays={"trace": (("step",), trace)}, scalars={"value": config["value"]})
    save_partial(result)  # what a long run does after each epoch; kept if the process then dies
    if config["fail"] == "raise":
        raise ValueError(f"selftest raised for value {config['value']:g}")
    if config["fail"] == "diverge":
        raise RunFailed(f"selftest diverged for value {config['value']:g}", result)
    if config["fail"] == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    return result


TASK = Task(SCHEMA, run_selftest, description="sleeps, then returns, raises, diverges or crashes")
