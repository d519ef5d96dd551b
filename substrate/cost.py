"""The hardware cost model: counts -> energy (J), latency (s) and memory (bytes) (docs/equations.md,
section 9).

:func:`estimate` prices a :class:`~substrate.counts.Counts` (what the engine did) with a
:class:`Hardware` preset (energy and time per operation)::

    energy  = macs E_mac + dac E_dac + adc E_adc + pulses E_pulse + flops E_flop
              + traffic b E_mem,   E_mem = E_sram if memory b <= sram_bytes else E_dram
    latency = settle_time tau + macs t_mac + adc t_adc / adc_units + write_cycles t_pulse + flops t_flop
    memory_bytes = memory b                                    (b = bytes_per_value)

Phases, conversions and writes are taken one after the other (no pipelining, no overlap of the
digital work with the settling).

Left out: the peripheral circuits other than the converters (drivers, sense amplifiers, shift-and-add,
sample-and-hold, multiplexers, the neurons' own circuits), wires and the on-chip network, leakage and
static power, clocking, the energy of the settling itself beyond the crossbar reads (one read of every
device per field evaluation), the verification reads of program-and-verify writes, and the area.

Presets (``PRESETS``; numbers derived from the cited figures, each step stated):

* ``isaac_reram`` (32 nm ReRAM crossbars, the ISAAC accelerator, Shafiee et al., ISCA 2016, Table 2,
  digital parts at 45 nm): crossbar read 2.4 mW for 8 arrays of 128 x 128 cells, one read per 100 ns
  cycle: 0.3 mW x 100 ns / 16384 = 1.83 fJ per cell and input bit; inputs are fed bit-serially, here 8
  bits (our choice, the resolution of its ADC): E_mac = 14.6 fJ. DAC: 1-bit, 4 mW for 8 x 128 of them
  at one conversion per 100 ns: 0.39 pJ per bit, E_dac = 8 bits x 0.39 = 3.1 pJ per value. ADC: 8-bit
  SAR at 1.28 GS/s, 16 mW for 8 (Kull et al., ISSCC 2013, 32 nm SOI): 1.56 pJ and 0.78 ns per
  conversion, one per input bit: E_adc = 12.5 pJ, t_adc = 6.25 ns per value; 96 ADCs in parallel (12
  IMAs of 8 per tile). Write pulse: NeuroSim's ideal analog synapse (Chen et al., IEEE TCAD 37, 3067
  (2018); ``IdealDevice``: 2 V, 10 ns, G_max 5 uS): at most V^2 G_max t = 0.2 pJ, t_pulse 10 ns.
  tau = 100 ns (our choice: one crossbar read cycle per time constant, so that an exponential-Euler
  step of tau is one read). Digital: Horowitz, ISSCC 2014 (45 nm, 0.9 V): float32 add 0.9 pJ,
  multiply 3.7 pJ, E_flop = their mean 2.3 pJ; 8 kB SRAM 10 pJ per 64-bit access, E_sram = 1.25 pJ/B;
  DRAM 1.3-2.6 nJ per 64-bit access, E_dram = 1.95 nJ / 8 = 244 pJ/B; sram_bytes 2 MiB and t_flop
  = 1/(128 x 1 GHz) (our choices: an on-chip buffer, a 128-lane digital unit); 16-bit values (ISAAC's).
* ``reram_ag_a_si``: ``isaac_reram`` with NeuroSim's measured Ag:a-Si synapse (``RealDevice``, Jo et
  al., Nano Lett. 10, 1297 (2010)): 3.2 V, 300 us pulses, G_max 38.5 nS: E_pulse <= 3.2^2 x 38.5 nS
  x 300 us = 118 pJ, t_pulse 300 us (slow writes dominate its latency).
* ``digital_45nm``: the same work on digital CMOS (Horowitz, ISSCC 2014, 45 nm): a MAC is a float32
  multiply and add (4.6 pJ, 2 t_flop), no converters, no settling time (tau = 0: the digital unit
  integrates the steps, whose MACs it pays), a weight write is one SRAM write of a 4-byte value
  (5 pJ); 32-bit values.

A preset of your own: ``dataclasses.replace(PRESETS["isaac_reram"], name="mine", pulse=1e-12)``, or
``Hardware(name="mine", ...)`` with every figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from .counts import Counts
from .errors import SubstrateValueError
from .validate import choice


@dataclass(frozen=True)
class Hardware:
    """Energy (J) and time (s) per operation of a hardware, and its word size.

    tau: seconds per unit of the network's simulated time (the time constant of a tau = 1 network);
    mac, mac_time: one analog multiply-accumulate (a device read; mac_time 0 where the settling
    time already accounts for it); dac, adc: one conversion of a value; adc_time: one conversion,
    adc_units of them in parallel; pulse, pulse_time: one programming pulse (a direct write counts
    as one pulse); flop, flop_time: one digital operation; sram, dram: one byte written or read,
    digital memory of at most sram_bytes being SRAM, more DRAM; bytes_per_value: the word of a value
    in digital memory. citation: where the figures come from.
    """

    name: str
    tau: float
    mac: float
    dac: float
    adc: float
    adc_time: float
    adc_units: int
    pulse: float
    pulse_time: float
    flop: float
    flop_time: float
    sram: float
    dram: float
    sram_bytes: float
    bytes_per_value: int
    mac_time: float = 0.0
    citation: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SubstrateValueError(f"Hardware(name={self.name!r}) must be a non-empty string")
        for f in fields(self):
            if f.name in ("name", "citation"):
                continue
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SubstrateValueError(f"Hardware({f.name}={v!r}) must be a finite number >= 0")
        for name in ("adc_units", "bytes_per_value"):
            v = getattr(self, name)
            if v != int(v) or v < 1:
                raise SubstrateValueError(f"Hardware({name}={v!r}) must be an integer >= 1")


@dataclass(frozen=True)
class Report:
    """What ``counts`` cost on ``hardware``: energy (J), latency (s), memory_bytes (the peak of digital
    memory), breakdown {item: J} and latency_breakdown {item: s} (their sums are energy and latency)."""

    energy: float
    latency: float
    memory_bytes: float
    breakdown: dict
    latency_breakdown: dict
    hardware: str


_ISAAC = ("ISAAC (Shafiee et al., ISCA 2016) crossbar, DAC and ADC at 32 nm; NeuroSim IdealDevice write "
          "pulse (Chen et al., IEEE TCAD 2018); digital at 45 nm (Horowitz, ISSCC 2014)")
_HOROWITZ = "Horowitz, ISSCC 2014 (45 nm, 0.9 V): float32 add 0.9 pJ, multiply 3.7 pJ; SRAM 1.25 pJ/B; DRAM 244 pJ/B"
_FLOP_TIME = 1.0 / (128 * 1e9)

PRESETS: dict[str, Hardware] = {}
PRESETS["isaac_reram"] = Hardware(
    name="isaac_reram", tau=100e-9, mac=8 * 0.3e-3 * 100e-9 / 16384, dac=8 * 4e-3 / (1024 * 1e7),
    adc=8 * 16e-3 / (8 * 1.28e9), adc_time=8 / 1.28e9, adc_units=96, pulse=2.0 ** 2 * 5e-6 * 10e-9,
    pulse_time=10e-9, flop=(0.9e-12 + 3.7e-12) / 2, flop_time=_FLOP_TIME, sram=10e-12 / 8, dram=1.95e-9 / 8,
    sram_bytes=2 * 2 ** 20, bytes_per_value=2, citation=_ISAAC)
PRESETS["reram_ag_a_si"] = replace(
    PRESETS["isaac_reram"], name="reram_ag_a_si", pulse=3.2 ** 2 * 38.5e-9 * 300e-6, pulse_time=300e-6,
    citation=_ISAAC + "; NeuroSim RealDevice Ag:a-Si write pulse (Jo et al., Nano Lett. 2010)")
PRESETS["digital_45nm"] = Hardware(
    name="digital_45nm", tau=0.0, mac=0.9e-12 + 3.7e-12, mac_time=2 * _FLOP_TIME, dac=0.0, adc=0.0,
    adc_time=0.0, adc_units=1, pulse=4 * 10e-12 / 8, pulse_time=0.0, flop=(0.9e-12 + 3.7e-12) / 2,
    flop_time=_FLOP_TIME, sram=10e-12 / 8, dram=1.95e-9 / 8, sram_bytes=2 * 2 ** 20, bytes_per_value=4,
    citation=_HOROWITZ)


def hardware(preset) -> Hardware:
    """A :class:`Hardware`, or the preset of that name (``PRESETS``)."""
    if isinstance(preset, Hardware):
        return preset
    return PRESETS[choice(preset, "hardware", tuple(PRESETS))]


def estimate(counts: Counts, preset="isaac_reram", *, per_sample: bool = False) -> Report:
    """What ``counts`` cost on ``preset`` (a :class:`Hardware` or a name of ``PRESETS``); with
    ``per_sample``, per sample (``counts.per_sample()``). See the module docstring for the formulas."""
    if not isinstance(counts, Counts):
        raise SubstrateValueError(f"counts must be a substrate.counts.Counts, got {type(counts).__name__}")
    if not isinstance(per_sample, bool):
        raise SubstrateValueError(f"per_sample={per_sample!r} must be True or False")
    hw = hardware(preset)
    c = counts.per_sample() if per_sample else counts
    b = hw.bytes_per_value
    memory = c.memory * b
    per_byte = hw.sram if memory <= hw.sram_bytes else hw.dram
    energy = {"crossbar": c.macs * hw.mac, "dac": c.dac * hw.dac, "adc": c.adc * hw.adc,
              "writes": c.pulses * hw.pulse, "digital": c.flops * hw.flop, "memory": c.traffic * b * per_byte}
    latency = {"settling": c.settle_time * hw.tau, "crossbar": c.macs * hw.mac_time,
               "adc": c.adc * hw.adc_time / hw.adc_units, "writes": c.write_cycles * hw.pulse_time,
               "digital": c.flops * hw.flop_time}
    return Report(sum(energy.values()), sum(latency.values()), memory, energy, latency, hw.name)
