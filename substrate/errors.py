"""Exceptions raised by substrate.

Bad input is reported as :class:`SubstrateValueError` (a ``ValueError``) before any compiled code
runs; failures of the dynamics (divergence, no convergence) as :class:`IntegrationError` subclasses
that carry the simulated time and step where they happened.
"""

from __future__ import annotations


class SubstrateValueError(ValueError):
    """An argument is out of its allowed range; the message names it and what is allowed."""


class IntegrationError(RuntimeError):
    """The dynamics failed; ``solution`` holds what was computed up to the failure."""

    def __init__(self, message: str, solution=None):
        super().__init__(message)
        self.solution = solution


class DivergenceError(IntegrationError):
    """The state became NaN/Inf or exceeded the blow-up bound."""


class ConvergenceError(IntegrationError):
    """Relaxation did not reach the residual tolerance within its budget."""


class StepSizeError(IntegrationError):
    """An adaptive step size fell below the smallest allowed step."""


class ArchiveError(SubstrateValueError):
    """An archive cannot be read as what it claims to be (not a regular file, not HDF5, corrupt data,
    a missing or malformed part, a link out of the file); the message names the file and the part."""

    def __init__(self, path, message: str):
        # one line: HDF5's messages may span several
        super().__init__(f"{path}: " + " ".join(str(message).split()))
        self.path = path
