"""The base of every device effect, and the random streams they draw from.

An effect is a small frozen dataclass (aihwkit style): its fields are its parameters, its docstring
gives the formula and the source. ``hook`` says where it acts (docs/equations.md, section 6):

* ``program``  -- once per write of a weight (conductance mapping, quantisation, programming noise,
  stuck-at faults), fixed until the next write;
* ``read``     -- every time the circuit reads its weights (read noise; the policy says how often it is
  redrawn), plus the IO chain of the matrix product (DAC/ADC, output noise);
* ``drift``    -- on the simulated clock, since each device's last write;
* ``update``   -- how a training write changes a device (pulsed, bounded, asymmetric);
* ``dynamics`` -- the neurons (time-constant and activation mismatch, state noise, relaxation time,
  feedback programmed as a separate copy);
* ``step``     -- inside the stepping kernel, on every weight product or after every step (a
  :class:`~substrate.devices.stepping.StepEffect`).

``_dtod`` fields are device-to-device spreads (drawn once per device, when the device is first
programmed), ``_std`` fields cycle-to-cycle noise (redrawn at every event). ``scaled(k)`` multiplies
an effect's non-ideality (the fields listed in ``scalable``) by k, so that one preset can be swept
from ideal (k = 0) to k times its published level.

Streams: every effect draws from its own generator, derived from the device's seed and the effect's
``stream`` name (a stable CRC32 key of a ``SeedSequence``), so switching one effect on or off never
changes the draws of another, and the same seed gives the same bits.
"""

from __future__ import annotations

import dataclasses
import textwrap
import zlib
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import numpy as np

from .. import validate

HOOKS = ("program", "read", "drift", "update", "dynamics", "step")


@dataclass(frozen=True)
class Effect:
    """One non-ideality; see the module docstring."""

    hook: ClassVar[str] = ""
    scalable: ClassVar[tuple] = ()  # the fields that scaled(k) multiplies
    units: ClassVar[dict] = {}  # field: unit, for describe (a dimensionless field has none)

    @property
    def stream(self) -> str:
        """The name of the effect's random stream (its class name)."""
        return type(self).__name__

    def scaled(self, factor: float) -> "Effect":
        """The same effect with its non-ideality (the ``scalable`` fields) multiplied by ``factor``."""
        factor = nonnegative(factor, f"{type(self).__name__}.scaled(factor)")
        return dataclasses.replace(self, **{f: getattr(self, f) * factor for f in self.scalable})

    def parameters(self) -> dict:
        """The effect's parameters, {field: value}."""
        return dataclasses.asdict(self)

    def describe(self, width: int = 100) -> str:
        """The class and the first clause of its docstring (the effect and its source, whole), then its
        parameters rounded to 6 significant digits with their ``units``, wrapped at ``width`` columns."""
        head = textwrap.fill(f"{type(self).__name__}: {first_clause(type(self).__doc__)}", width,
                             subsequent_indent="  ", break_on_hyphens=False)
        params = [f"{k}={rounded(v)}" + (f" {self.units[k]}" if k in self.units and v is not None else "")
                  for k, v in self.parameters().items()]
        return head + ("\n" + wrap(params, width, "    ") if params else "")


def first_clause(doc: str | None) -> str:
    """The text of ``doc`` up to its first ': ' or '. ' outside parentheses (so a citation in
    parentheses, 'Nandakumar et al. 2019', stays whole), whitespace collapsed."""
    doc, depth = " ".join((doc or "").split()), 0
    for i, c in enumerate(doc):
        depth += (c == "(") - (c == ")")
        if depth == 0 and doc[i:i + 2] in (": ", ". "):
            return doc[:i]
    return doc.rstrip(".")


def rounded(v, digits: int = 6) -> str:
    """repr of ``v`` with its floats rounded to ``digits`` significant digits (0.39999999999999997 -> 0.4):
    no preset constant has more, so the rounding shows the published value without float noise."""
    if isinstance(v, float):
        return repr(float(f"{v:.{digits}g}"))
    if isinstance(v, tuple):
        return "(" + ", ".join(rounded(x, digits) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


def wrap(items, width: int, indent: str) -> str:
    """``items`` joined by ", " in lines of at most ``width`` columns, each line starting with ``indent``
    (an item longer than a line gets its own); never broken inside an item, so a number stays with
    its unit (textwrap would break at any space)."""
    lines, line = [], indent
    for item in items:
        if line != indent and len(line) + 2 + len(item) >= width:  # leaves room for the comma
            lines.append(line + ",")
            line = indent
        line += (", " if line != indent else "") + item
    return "\n".join(lines + [line])


def stream(seed: int, name: str) -> np.random.Generator:
    """The generator of the random stream ``name`` under ``seed``: independent of every other name."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(zlib.crc32(name.encode()),))))


# ------------------------------------------------------------------------------------ checks
# the devices' wording: a number first ("must be a number, not NaN"), then its range as a relation
# ("a finite number > 0", "an integer >= 2")
positive = partial(validate.positive, staged=True, relation=True)
nonnegative = partial(validate.nonnegative, staged=True)
fraction = partial(validate.fraction, staged=True)
integer = partial(validate.count, relation=True)
flag, choice = validate.flag, validate.choice


def spread(shape, dtod: float, rng: np.random.Generator) -> np.ndarray:
    """Per-device factors 1 + dtod xi, xi ~ N(0, 1) (aihwkit's device-to-device variation)."""
    return 1.0 + dtod * rng.standard_normal(shape)
