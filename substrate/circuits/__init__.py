"""Nonlinear resistive circuits, the second physical substrate beside the neuron engine
(docs/equations.md, section 10): :class:`Circuit` (conductances, diodes, FETs, sources),
:class:`CircuitField` (F, J v, J^T v, the parameter VJP, the co-content), the DC operating point by
damped Newton (:func:`dc`) or relaxation in time (:func:`relax`), the implicit :func:`gradient`,
and SPICE netlists (:mod:`substrate.circuits.spice`). ``substrate.relax``, ``integrate`` and
``gradient`` take a :class:`Circuit` too, with the engine's methods (:mod:`substrate.circuits.engine`)."""

from . import engine
from .build import bias_inputs, layered, random_circuit
from .circuit import V_T, Circuit, CircuitField, Clamp, Teach
from .solve import DCSolution, adjoint, dc, gradient, relax

Circuit.engine = engine  # where substrate.relax, integrate and gradient send a circuit

__all__ = ["V_T", "Circuit", "CircuitField", "Clamp", "DCSolution", "Teach", "adjoint", "bias_inputs", "dc",
           "gradient", "layered", "random_circuit", "relax"]
