"""What the simulated hardware did: the engine's counts (docs/equations.md, section 9).

Every result that ran the circuit (a :class:`~substrate.Solution`, an EP estimate, a gradient, a
training step) exposes a :class:`Counts`, computed in the Python layer from what the kernels
returned (steps, field evaluations, the time reached, shapes, checkpoint sizes), never estimated
from formulas of what a method should take. ``substrate.cost`` turns counts into joules, seconds and
bytes for a hardware preset; the engine never imports it.

What one relaxation or integration of a batch of B samples counts (:func:`phase`):

* ``settle_time``: the simulated time it ran (in the network's time unit: tau = 1 makes it tau) times
  B: a circuit settles one sample after another; the batch ran until its slowest sample had settled,
  and every sample is counted at that time;
* ``macs``: analog multiply-accumulates, (devices of the state-to-state crossbars) x B per field
  evaluation, plus (devices of the input crossbars) x B once (a constant input is a constant drive);
  a device is a weight present in the circuit (its mask, if any, is 1), read whatever its value;
* ``dac``: the inputs converted once per phase (input width x B); with a device's IO chain (DAC and
  ADC around every analog product), every crossbar's inputs and outputs once per field evaluation,
  twice for complex states (holomorphic EP: a complex value is read as its two quadratures, I and Q,
  each through its own converter; the crossbar itself carries the oscillation, one MAC per device);
* ``adc``: the states read out at the end (n x B per saved time);
* ``memory``/``traffic``: the read-out states held in digital memory (values; written once).

Values, not bytes: memory is counted in numbers held (a complex number is two), so that the cost
model sizes them by the hardware's own word (``Hardware.bytes_per_value``), not by the simulator's
float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from .errors import SubstrateValueError

# combined by their maximum under +: a peak, not a total
_PEAKS = ("memory",)


@dataclass(frozen=True)
class Counts:
    """Operations the hardware performed, for ``samples`` training or inference samples.

    samples: the samples the work served; phases: relaxations or integrations run; steps: integrator
    steps; nfev: vector-field evaluations (each an analog read of every crossbar); settle_time: the
    circuit time of all phases of all samples, one after the other (network time units, tau for tau
    = 1; per sample, the time a sample's phases take); macs:
    analog multiply-accumulates in the crossbars; dac, adc: conversions; pulses: programming pulses
    applied to devices (a direct, non-pulsed write of a device counts as one); write_cycles: the
    sequential pulse slots of the writes (the devices of a crossbar are pulsed in parallel, so a
    write takes as long as its longest pulse train); flops: digital operations (readout, error
    vector, optimiser, adjoint arithmetic done digitally); memory: the largest number of values held
    in digital memory at once (a peak: ``+`` keeps the larger); traffic: values written to or read
    from that memory.

    ``a + b``: the work of a then b (every count adds, samples too; memory is the larger peak); the
    builtin ``sum`` works (``sum(parts)``, starting from 0). ``per_sample()`` divides the totals by
    the samples. ``replace(**fields)`` gives a copy with fields changed (phases of one batch combine
    as ``sum(parts).replace(samples=batch)``).
    """

    samples: float = 0
    phases: float = 0
    steps: float = 0
    nfev: float = 0
    settle_time: float = 0.0
    macs: float = 0
    dac: float = 0
    adc: float = 0
    pulses: float = 0
    write_cycles: float = 0
    flops: float = 0
    memory: float = 0
    traffic: float = 0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating))
                    or not math.isfinite(v) or v < 0):
                raise SubstrateValueError(f"Counts({f.name}={v!r}) must be a finite number >= 0")

    def __add__(self, other):
        if not isinstance(other, Counts):
            return NotImplemented
        return Counts(**{f.name: (max if f.name in _PEAKS else _add)(getattr(self, f.name), getattr(other, f.name))
                         for f in fields(self)})

    def __radd__(self, other):
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:  # sum()'s start
            return self
        return NotImplemented

    def replace(self, **changes) -> Counts:
        """A copy with ``changes`` (checked as the constructor checks them)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise SubstrateValueError(f"Counts.replace: unknown field(s) {unknown}; allowed: "
                                      f"{', '.join(f.name for f in fields(self))}")
        return replace(self, **changes)

    def per_sample(self) -> Counts:
        """The counts per sample (totals divided by ``samples``, ``samples`` 1); the memory peak is
        not divided: a sample needs all of it while it is processed."""
        if self.samples <= 0:
            raise SubstrateValueError("Counts.per_sample: samples is 0; these counts served no sample")
        return Counts(**{f.name: 1 if f.name == "samples" else getattr(self, f.name) if f.name in _PEAKS
                         else getattr(self, f.name) / self.samples for f in fields(self)})

    def as_dict(self) -> dict:
        """{field: value} (for archives and tables)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _add(a, b):
    return a + b


def total(parts) -> Counts:
    """The sum of an iterable of Counts (``Counts()`` when empty)."""
    out = Counts()
    for c in parts:
        if not isinstance(c, Counts):
            raise SubstrateValueError(f"total: every part must be a Counts, got {type(c).__name__}")
        out = out + c
    return out


def values(dtype) -> int:
    """Numbers per state value of ``dtype``: 2 for a complex number (its real and imaginary parts)."""
    return 2 if np.dtype(dtype).kind == "c" else 1


def crossbar_devices(network) -> tuple[int, int]:
    """(devices of the state-to-state crossbars, devices of the input crossbars): the weights
    present in the circuit, a masked-out position being no device. A tied feedback connection is
    read as its own product (the circuit computes it at every field evaluation), so it counts."""
    state = inputs = 0
    for c in network.connections:
        n = int(np.count_nonzero(c.mask)) if c.mask is not None else int(np.size(c.weight))
        if c.pre in network.inputs_by_name:
            inputs += n
        else:
            state += n
    return state, inputs


def io_conversions(network, dtype=np.float64) -> tuple[int, int, int]:
    """Per sample, on a device with an IO chain (converters around every analog product), else 0:
    (DAC, ADC) of one field evaluation (each state crossbar's inputs and outputs) and the ADC of the
    input crossbars' outputs, converted once per phase (their input is constant); with complex states
    of ``dtype`` each a conversion per quadrature, twice as many."""
    device = getattr(network, "device", None)
    if device is None or getattr(device, "io", None) is None:
        return 0, 0, 0
    dac = adc = once = 0
    for c in network.connections:
        if c.pre in network.inputs_by_name:
            once += network.size_of(c.post)
        else:
            dac += network.size_of(c.pre)
            adc += network.size_of(c.post)
    k = values(dtype)
    return k * dac, k * adc, k * once


def phase(network, *, batch: int, steps: int, nfev: int, settle_time: float, reads: int = 1,
          dtype=np.float64) -> Counts:
    """The counts of one relaxation or integration of ``network`` over ``batch`` samples that took
    ``steps`` steps and ``nfev`` field evaluations over ``settle_time``, its states read out
    ``reads`` times (see the module docstring)."""
    state, inputs = crossbar_devices(network)
    width = sum(x.size for x in network.inputs)
    io_dac, io_adc, io_once = io_conversions(network, dtype)
    held = network.n * batch * reads * values(dtype)
    return Counts(samples=batch, phases=1, steps=steps, nfev=nfev, settle_time=float(settle_time) * batch,
                  macs=(state * nfev + inputs) * batch, dac=(width + io_dac * nfev) * batch,
                  adc=(network.n * reads + io_adc * nfev + io_once) * batch, memory=held, traffic=held)


def parameter_flops(network, batch: int, dtype=np.float64) -> int:
    """Digital FLOPs of a parameter gradient (dF/dtheta)^T v over ``batch`` samples: a multiply and an
    add per device and sample (v_post r_pre), one add per neuron and sample (the biases); complex
    states cost four times as many real operations."""
    state, inputs = crossbar_devices(network)
    return (2 * (state + inputs) + network.n) * batch * _complexity(dtype)


def direct_solve_flops(n: int, batch: int, dtype=np.float64) -> int:
    """Digital FLOPs of J^T lambda = rhs by dense LU for ``batch`` samples of ``n`` neurons: 2n^3/3
    for the factorisation, 2n^2 for the solves, n^2 to form J and n^2 for the condition estimate."""
    return int((2 * n ** 3 // 3 + 4 * n * n) * batch * _complexity(dtype))


def _complexity(dtype) -> int:
    return 4 if np.dtype(dtype).kind == "c" else 1
