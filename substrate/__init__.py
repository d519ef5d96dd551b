"""substrate: a simulator of physical learning machines.

The simulated hardware: analog networks (:class:`Network`) whose neurons relax under
tau du/dt = -u + W rho(u) + V x + b, integrated by :func:`integrate` and :func:`relax`, with the
vector field and its derivatives in :class:`VectorField`. ``import substrate`` never imports torch.
"""

from __future__ import annotations

import os as _os
import tempfile as _tempfile


def _numba_cache_dir():
    """Numba caches next to the sources; where the package is installed read-only, use a user cache
    directory instead (numba then needs NUMBA_CACHE_DIR set before it is imported)."""
    if "NUMBA_CACHE_DIR" in _os.environ:
        return
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.access(here, _os.W_OK):
        return
    base = _os.environ.get("XDG_CACHE_HOME") or _os.path.join(_os.path.expanduser("~"), ".cache")
    if not _os.access(_os.path.dirname(base) if not _os.path.exists(base) else base, _os.W_OK):
        base = _tempfile.gettempdir()
    _os.environ["NUMBA_CACHE_DIR"] = _os.path.join(base, "substrate", "numba")


_numba_cache_dir()

from . import cost  # noqa: E402
from .activations import NAMES as ACTIVATIONS  # noqa: E402
from .adjoint import ContinuousAdjoint, DiscreteAdjoint, Gradients, Implicit, gradient  # noqa: E402
from .cost import Hardware, Report  # noqa: E402
from .counts import Counts  # noqa: E402
from .dynamics import VectorField  # noqa: E402
from .errors import (ArchiveError, ConvergenceError, DivergenceError, IntegrationError, StepSizeError,  # noqa: E402
                     SubstrateValueError)
from .integrators import METHODS, Solution, integrate, relax  # noqa: E402
from .network import Connection, Input, Layer, Network  # noqa: E402
from .nudge import Cost, Nudge  # noqa: E402
from .persist import load, save  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ACTIVATIONS", "ArchiveError", "Connection", "ContinuousAdjoint", "ConvergenceError", "Cost", "Counts", "Nudge", "DiscreteAdjoint", "DivergenceError",
           "Gradients", "Hardware", "Implicit", "Input", "Report", "cost", "gradient",
           "IntegrationError", "Layer", "METHODS", "Network", "Solution", "StepSizeError",
           "SubstrateValueError", "VectorField", "integrate", "load", "relax", "save"]
