"""The device effects other than pulsed updates (those are in :mod:`substrate.devices.update`).

Each class is one effect of docs/equations.md, section 6: its fields are its parameters, its docstring the
formula and the source. They act through one of four hooks, each a small base class with one method,
so that a new effect is one class (see the README):

* :class:`ProgramEffect` ``program(g, crossbar, rng)``: the conductances a write leaves, from the
  targets, in microsiemens; ``g`` has shape (2, post, pre), the positive and negative device of each
  differential pair;
* :class:`DriftEffect` ``drift(g, age, crossbar, rng)``: the conductances ``age`` seconds after the
  devices' last write (``age`` per device);
* :class:`ReadEffect` ``read_variance(g, w, age, crossbar)``: the variance of each weight's read
  deviation (weight units), redrawn as the effect's ``policy`` says;
* :class:`DynamicsEffect` ``neurons(circuit, rng)``: edits the neurons' parameters (time constants,
  activation gain/offset, state noise, read-out time) held by ``circuit`` (a
  :class:`~substrate.devices.device.Neurons`).

The IO chain (:class:`IOChain`) and :class:`IndependentFeedback` are read by the device itself.
Effects inside the stepping kernel (per weight product or per step) are in
:mod:`substrate.devices.stepping`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import SubstrateValueError
from .base import Effect, choice, flag, fraction, integer, nonnegative, positive

READ_POLICIES = ("step", "phase", "equilibrium", "sample")


# ------------------------------------------------------------------------------------ hook bases
@dataclass(frozen=True)
class ProgramEffect(Effect):
    """Acts once per write, on the conductances of the differential pairs (microsiemens). Program
    effects run by ``order``: quantisation (10), programming noise (20), stuck-at faults (30), then
    effects of other classes (50, in the order given)."""

    hook: ClassVar[str] = "program"
    order: ClassVar[int] = 50

    def program(self, g: np.ndarray, crossbar, rng: np.random.Generator) -> np.ndarray:
        """The conductances (2, post, pre) programmed for the targets ``g`` (microsiemens) of ``crossbar``, drawing
        from ``rng``."""
        raise NotImplementedError


@dataclass(frozen=True)
class DriftEffect(Effect):
    """Acts when the devices are read: the conductances after ``age`` seconds since each device's write."""
    hook: ClassVar[str] = "drift"

    def drift(self, g: np.ndarray, age: np.ndarray, crossbar, rng: np.random.Generator) -> np.ndarray:
        """The conductances ``g`` (2, post, pre) as read ``age`` seconds after each device's write."""
        raise NotImplementedError


@dataclass(frozen=True)
class ReadEffect(Effect):
    """Read noise: a Gaussian deviation of every weight with the variance ``read_variance`` gives,
    redrawn per ``policy``: ``"step"`` (every integration step, per sample, shared by the step's
    stages; see ``correlation_time``),
    ``"phase"`` (every relaxation or integration, shared by the batch), ``"equilibrium"`` (once per
    free phase; the nudged phases of an EP estimate see the same draw) or ``"sample"`` (like
    equilibrium, but every sample of the batch its own draw: it holds a (post, pre, batch) array per
    crossbar, 1.6 GB for 784 x 256 at batch 1000). Holomorphic EP folds conjugate nudges into one
    complex phase, so under ``"phase"`` a conjugate pair shares one draw."""

    hook: ClassVar[str] = "read"
    conductances: ClassVar[bool] = False  # does the variance need the conductances?
    correlation_time = None  # "step" policy: see ReadNoise.correlation_time

    def read_variance(self, g, w, age, crossbar) -> np.ndarray:
        """The variance of each weight's read deviation (weight units squared), given the conductances ``g``, the
        weights ``w`` and the ages."""
        raise NotImplementedError


@dataclass(frozen=True)
class DynamicsEffect(Effect):
    """Acts once, at attach, on the neurons' parameters (time constants, gains, offsets, state noise, read time)."""
    hook: ClassVar[str] = "dynamics"

    def neurons(self, circuit, rng: np.random.Generator) -> None:
        """Edit the neurons' parameters ``circuit`` (a ``Neurons``) in place, drawing from ``rng``."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------ programming
@dataclass(frozen=True)
class ConductanceMapping(Effect):
    """Weights as differential pairs of conductances (aihwkit SinglePairConductanceConverter with an
    on/off ratio): W = (g+ - g-)/s with s = (g_max - g_min)/w_max, g_min = g_max/on_off. A positive
    weight is programmed on g+ = g_min + s W (g- = g_min), a negative one on g-. ``w_max``: the weight
    mapped to g_max, larger ones saturate at g_max; None takes max|W| of each crossbar at every write
    (as aihwkit's converters do), so that a write that changes it reprograms every device of the
    crossbar."""

    hook: ClassVar[str] = "map"
    g_max: float = 25.0
    on_off: float = math.inf
    w_max: float | None = None
    units: ClassVar[dict] = {"g_max": "uS", "w_max": "weight units"}

    def __post_init__(self):
        positive(self.g_max, "ConductanceMapping.g_max")
        v = positive(self.on_off, "ConductanceMapping.on_off", allow_inf=True)
        if v <= 1:
            raise_range("ConductanceMapping.on_off", self.on_off, "> 1 (g_max/g_min)")
        if self.w_max is not None:
            positive(self.w_max, "ConductanceMapping.w_max")

    @property
    def g_min(self) -> float:
        """The lowest conductance, g_max / on_off (microsiemens)."""
        return self.g_max / self.on_off


@dataclass(frozen=True)
class Quantisation(ProgramEffect):
    """Programming to one of ``levels`` conductances evenly spaced on [g_min, g_max] (the nearest)."""

    levels: int = 16
    order: ClassVar[int] = 10

    def __post_init__(self):
        integer(self.levels, "Quantisation.levels", minimum=2)

    def program(self, g, crossbar, rng):
        lo, hi = crossbar.g_min, crossbar.g_max
        step = (hi - lo) / (self.levels - 1)
        return lo + np.round((np.clip(g, lo, hi) - lo) / step) * step


@dataclass(frozen=True)
class ProgrammingNoise(ProgramEffect):
    """aihwkit PCMLikeNoiseModel (Nandakumar et al. 2019): g_prog = g_target + scale sigma xi with
    sigma = c0 + c1 gT + c2 gT^2 microsiemens (gT = g_target/g_max; c = 0.26348, 1.9650, -1.1731
    fitted at ``g_max_reference`` = 25 uS, rescaled by g_max/g_max_reference), clipped at 0."""

    coefficients: tuple = (0.26348, 1.9650, -1.1731)
    scale: float = 1.0
    g_max_reference: float = 25.0
    scalable: ClassVar[tuple] = ("scale",)
    units: ClassVar[dict] = {"coefficients": "uS", "g_max_reference": "uS"}
    order: ClassVar[int] = 20

    def __post_init__(self):
        nonnegative(self.scale, "ProgrammingNoise.scale")
        positive(self.g_max_reference, "ProgrammingNoise.g_max_reference")
        if len(self.coefficients) < 1:
            raise_range("ProgrammingNoise.coefficients", self.coefficients, "a polynomial's coefficients")

    def sigma(self, g, g_max):
        """The standard deviation of the programmed conductance at target ``g`` (microsiemens), for a device of
        ``g_max``."""
        gt = g / g_max
        return sum(c * gt ** k for k, c in enumerate(self.coefficients)) * (g_max / self.g_max_reference)

    def program(self, g, crossbar, rng):
        noise = self.sigma(g, crossbar.g_max) * rng.standard_normal(g.shape)
        return np.maximum(g + self.scale * noise, 0.0)


@dataclass(frozen=True)
class StuckAt(ProgramEffect):
    """A ``fraction`` of the devices stuck at g_min, g_max or a uniform random conductance in
    [g_min, g_max] (``value``), chosen once per device at its first write; later writes leave them."""

    fraction: float = 0.01
    value: str = "min"
    scalable: ClassVar[tuple] = ("fraction",)
    units: ClassVar[dict] = {"fraction": "of devices"}
    order: ClassVar[int] = 30

    def __post_init__(self):
        fraction(self.fraction, "StuckAt.fraction")
        choice(self.value, "StuckAt.value", ("min", "max", "random"))

    def program(self, g, crossbar, rng):
        def draw():
            stuck = rng.random(g.shape) < self.fraction
            level = {"min": crossbar.g_min, "max": crossbar.g_max}.get(self.value)
            at = (rng.uniform(crossbar.g_min, crossbar.g_max, g.shape) if level is None
                  else np.full(g.shape, level))
            return stuck, at

        stuck, at = crossbar.fixed(self, draw)
        return np.where(stuck, at, g)


# ------------------------------------------------------------------------------------ drift
@dataclass(frozen=True)
class Drift(DriftEffect):
    """Conductance drift (aihwkit PCMLikeNoiseModel): g(t) = g_prog ((age + t0)/t0)^(-nu) with the
    age counted from each device's last write, nu ~ |N(mu_nu, s_nu)| per device and write,
    mu_nu = clamp(-0.0155 ln gT + 0.0244, 0.049, 0.1), s_nu = clamp(-0.0125 ln gT - 0.0059, 0.008,
    0.045) (``nu=None``), or a fixed ``nu`` with a device-to-device spread ``nu_dtod``; ``scale``
    multiplies nu. ``compensation``: aihwkit's global drift compensation, one output scale per
    crossbar restoring sum|W| of the weights as programmed."""

    t0: float = 20.0
    nu: float | None = None
    nu_dtod: float = 0.0
    scale: float = 1.0
    compensation: bool = False
    scalable: ClassVar[tuple] = ("scale",)
    units: ClassVar[dict] = {"t0": "s", "nu_dtod": "x nu"}

    def __post_init__(self):
        positive(self.t0, "Drift.t0")
        if self.nu is not None:
            nonnegative(self.nu, "Drift.nu")
        nonnegative(self.nu_dtod, "Drift.nu_dtod")
        nonnegative(self.scale, "Drift.scale")
        flag(self.compensation, "Drift.compensation")

    def exponents(self, g_target, g_max, rng):
        """nu per device, drawn at a write."""
        if self.nu is None:
            gt = np.maximum(np.abs(g_target / g_max), 1e-6)  # aihwkit's _ZERO_CLIP
            mu = np.clip(-0.0155 * np.log(gt) + 0.0244, 0.049, 0.1)
            s = np.clip(-0.0125 * np.log(gt) - 0.0059, 0.008, 0.045)
            return np.abs(mu + s * rng.standard_normal(g_target.shape)) * self.scale
        return np.abs(self.nu * (1.0 + self.nu_dtod * rng.standard_normal(g_target.shape))) * self.scale

    def drift(self, g, age, crossbar, rng):
        nu = crossbar.written(self, lambda: self.exponents(crossbar.g_target, crossbar.g_max, rng))
        return g * ((age + self.t0) / self.t0) ** (-nu)


# ------------------------------------------------------------------------------------ read
@dataclass(frozen=True)
class ReadNoise(ReadEffect):
    """Gaussian read noise on every weight: W_read = W + sigma |W| xi (``relative``) or
    W + sigma w_max xi (additive, w_max the crossbar's largest |W| at its last write), redrawn per
    ``policy``."""

    sigma: float = 0.02
    relative: bool = True
    policy: str = "phase"
    correlation_time: float | None = None
    scalable: ClassVar[tuple] = ("sigma",)
    units: ClassVar[dict] = {"sigma": "x |W| (relative) or x w_max", "correlation_time": "tau"}

    def __post_init__(self):
        nonnegative(self.sigma, "ReadNoise.sigma")
        flag(self.relative, "ReadNoise.relative")
        choice(self.policy, "ReadNoise.policy", READ_POLICIES)
        _correlation_time(self)

    def read_variance(self, g, w, age, crossbar):
        s = self.sigma * (np.abs(w) if self.relative else crossbar.w_max)
        return np.broadcast_to(s * s, w.shape)


@dataclass(frozen=True)
class PCMReadNoise(ReadEffect):
    """aihwkit's accumulated 1/f read noise of PCM: g <- g + scale |g| sigma xi on each device, with
    sigma = Q_s sqrt(ln((t + t_read)/(2 t_read))), Q_s = min(0.0088/max(gT, 1e-3)^0.65, 0.2),
    t = age + t0 (seconds since the write plus aihwkit's first read time t0 = 20 s), gT = g/g_max;
    in weight units the pair's deviations add: var W = (var g+ + var g-)/s^2."""

    t_read: float = 250e-9
    t0: float = 20.0
    scale: float = 1.0
    policy: str = "phase"
    correlation_time: float | None = None
    scalable: ClassVar[tuple] = ("scale",)
    units: ClassVar[dict] = {"t_read": "s", "t0": "s", "correlation_time": "tau"}
    conductances: ClassVar[bool] = True

    def __post_init__(self):
        positive(self.t_read, "PCMReadNoise.t_read")
        positive(self.t0, "PCMReadNoise.t0")
        nonnegative(self.scale, "PCMReadNoise.scale")
        choice(self.policy, "PCMReadNoise.policy", READ_POLICIES)
        _correlation_time(self)

    def sigma(self, g_prog, age, g_max):
        """The relative standard deviation of the 1/f read noise of devices programmed at ``g_prog``, ``age``
        seconds after their write."""
        qs = np.minimum(0.0088 / np.maximum(np.abs(g_prog) / g_max, 1e-3) ** 0.65, 0.2)
        t = age + self.t0
        return qs * np.sqrt(np.log((t + self.t_read) / (2 * self.t_read)))

    def read_variance(self, g, w, age, crossbar):
        sd = self.scale * np.abs(g) * self.sigma(crossbar.g_prog, age, crossbar.g_max)
        return (sd[0] ** 2 + sd[1] ** 2) / crossbar.scale ** 2


@dataclass(frozen=True)
class IOChain(Effect):
    """The periphery of an analog matrix product (aihwkit IOParameters): inputs through a DAC of
    ``inp_bits`` on +-``inp_bound``; the output gets Gaussian noise ``out_noise`` and passes an ADC of
    ``out_bits`` on +-``out_bound``. As in aihwkit, noise and bound are in units of the output of
    full-scale weights: they are multiplied by the largest |W| of the crossbars feeding each layer.
    Converters are mid-tread: 2^bits - 1 levels with 0 among them (aihwkit's resolution
    1/(2^bits - 2)); bits = 0: ideal converter. Applied to every weight product inside the stepping kernel, and to
    the input projection once per phase (the input is constant)."""

    hook: ClassVar[str] = "io"
    inp_bits: int = 7
    inp_bound: float = 1.0
    out_noise: float = 0.06
    out_bits: int = 9
    out_bound: float = 12.0
    scalable: ClassVar[tuple] = ("out_noise",)
    units: ClassVar[dict] = {"inp_bits": "bits", "out_noise": "x full-scale output", "out_bits": "bits",
                             "out_bound": "x full-scale output"}

    def __post_init__(self):
        for name in ("inp_bits", "out_bits"):
            # beyond 52 bits a level is finer than float64's rounding of the bound
            bits = integer(getattr(self, name), f"IOChain.{name}", minimum=0, maximum=52)
            if bits == 1:
                raise_range(f"IOChain.{name}", bits, "0 (no converter) or in [2, 52] (a mid-tread converter "
                            "has 2^bits - 1 levels)")
        positive(self.inp_bound, "IOChain.inp_bound")
        positive(self.out_bound, "IOChain.out_bound")
        nonnegative(self.out_noise, "IOChain.out_noise")


# ------------------------------------------------------------------------------------ dynamics
@dataclass(frozen=True)
class TauMismatch(DynamicsEffect):
    """Time-constant mismatch: tau_i = tau_i (1 + spread xi_i), per neuron, clipped at 0.05 tau_i (a
    physical time constant stays positive)."""

    spread: float = 0.1
    scalable: ClassVar[tuple] = ("spread",)
    units: ClassVar[dict] = {"spread": "x tau"}

    def __post_init__(self):
        nonnegative(self.spread, "TauMismatch.spread")

    def neurons(self, circuit, rng):
        circuit.tau = circuit.tau * np.maximum(1.0 + self.spread * rng.standard_normal(circuit.tau.shape), 0.05)


@dataclass(frozen=True)
class ActivationMismatch(DynamicsEffect):
    """Activation gain and offset mismatch: rho_i(u) = rho(g_i (u - o_i)), g_i = 1 + gain_spread xi
    (clipped at 0.05), o_i = offset_spread xi', per neuron."""

    gain_spread: float = 0.05
    offset_spread: float = 0.05
    scalable: ClassVar[tuple] = ("gain_spread", "offset_spread")
    units: ClassVar[dict] = {"gain_spread": "x gain"}

    def __post_init__(self):
        nonnegative(self.gain_spread, "ActivationMismatch.gain_spread")
        nonnegative(self.offset_spread, "ActivationMismatch.offset_spread")

    def neurons(self, circuit, rng):
        n = circuit.tau.shape[0]
        circuit.gain = circuit.gain * np.maximum(1.0 + self.gain_spread * rng.standard_normal(n), 0.05)
        circuit.offset = circuit.offset + self.offset_spread * rng.standard_normal(n)


@dataclass(frozen=True)
class StateNoise(DynamicsEffect):
    """Additive state noise du = F/tau dt + sigma dW: u += sigma sqrt(h) xi after every step
    (Euler-Maruyama with ``euler``), drawn inside the stepping kernel."""

    sigma: float = 0.01
    scalable: ClassVar[tuple] = ("sigma",)
    units: ClassVar[dict] = {"sigma": "per sqrt(tau)"}

    def __post_init__(self):
        nonnegative(self.sigma, "StateNoise.sigma")

    def neurons(self, circuit, rng):
        circuit.state_noise = math.hypot(circuit.state_noise, self.sigma)


@dataclass(frozen=True)
class RelaxationTime(DynamicsEffect):
    """A finite relaxation time: every phase is read after ``duration`` (in the neurons' time units),
    converged or not (a phase that meets its tolerance earlier stops there, as the state no longer
    moves)."""

    duration: float = 20.0
    units: ClassVar[dict] = {"duration": "tau"}

    def __post_init__(self):
        positive(self.duration, "RelaxationTime.duration")

    def neurons(self, circuit, rng):
        circuit.read_time = min(circuit.read_time, self.duration)


@dataclass(frozen=True)
class IndependentFeedback(Effect):
    """Feedback weights programmed as their own devices: a tied feedback connection (nominally W^T)
    gets its own crossbar, written with the same targets W^T but its own programming noise, drift,
    faults and read noise: the physical origin of the asymmetry of the circuit's weights. Without
    this effect a tied connection reads the forward crossbar transposed (a bidirectional array)."""

    hook: ClassVar[str] = "feedback"


def _correlation_time(effect):
    """``correlation_time`` (``"step"`` policy only): None, the noise is drawn once per integration
    step with the variance given (its effect then depends on the step h); t_c > 0, the variance of a
    step's draw is scaled by t_c/h (white noise of correlation time t_c, in tau units), so that the
    trajectory's noise does not depend on h."""
    name = f"{type(effect).__name__}.correlation_time"
    if effect.correlation_time is not None:
        positive(effect.correlation_time, name)
        if effect.policy != "step":
            raise_range(name, effect.correlation_time, "None unless policy='step'")


def raise_range(name, value, allowed):
    """Raise a SubstrateValueError: ``name`` = ``value`` must be ``allowed``."""
    raise SubstrateValueError(f"{name}={value!r} must be {allowed}")
