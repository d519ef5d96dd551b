"""A device model (:class:`Device`, a composition of effects) and a network running on it
(:class:`DeviceNetwork`, made by :func:`attach`).

Order of the effects (fixed, whatever order they are given in):

1. write (``write()``, once per change of a weight): target weight -> conductance pair
   (:class:`ConductanceMapping`) -> the program effects in the order given (e.g. quantisation,
   programming noise, stuck-at faults); or, with a pulsed update model, the change as pulses;
2. read at the clock time (every phase): drift since each device's write (-> global compensation),
   then read noise drawn per its policy;
3. every weight product inside the stepping kernel: DAC -> W r (+ per-step or per-sample read noise)
   -> output noise -> ADC (then the ``StepEffect``s' hooks, in the order given);
4. neurons: time-constant and activation mismatch (fixed at attach), state noise at every step, the
   read-out time.

Weights are stored in the network's units. The conductance path (mapping, program, drift and
conductance read effects) is used only when the device has such effects; otherwise a write stores
the target itself, so that an ideal device reproduces the ideal network bit for bit. Biases and a
cost's readout are digital. A pulsed device stores its weight in device units times
``weight_scale``.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from dataclasses import dataclass

import numpy as np

from .. import _kernels as K
from ..counts import Counts
from ..errors import SubstrateValueError
from ..network import Layer, Network
from . import normals, stepping
from .base import Effect, HOOKS, nonnegative, positive, stream
from .effects import (ConductanceMapping, DriftEffect, DynamicsEffect, IndependentFeedback, IOChain,
                      ProgramEffect, ReadEffect)

_SINGLE = ("map", "io", "feedback", "update")  # hooks an effect of which may appear once


@dataclass(frozen=True)
class Device:
    """A device model: a tuple of effects, applied in the fixed order of the module docstring.

    weight_scale: network weight per device unit, for pulsed update models (their bounds and steps
    are in device units). name, citation: for presets."""

    effects: tuple = ()
    weight_scale: float = 1.0
    name: str = "custom"
    citation: str = ""

    def __post_init__(self):
        if isinstance(self.effects, (str, dict)) or not hasattr(self.effects, "__iter__"):
            raise SubstrateValueError(f"Device.effects={self.effects!r} must be a tuple of device effects")
        effects = tuple(self.effects)
        object.__setattr__(self, "effects", effects)
        positive(self.weight_scale, "Device.weight_scale")
        for e in effects:
            if not isinstance(e, Effect):
                raise SubstrateValueError(f"Device.effects: {e!r} is not a device Effect")
            if e.hook not in HOOKS + _SINGLE:
                raise SubstrateValueError(f"{type(e).__name__}.hook={e.hook!r}; allowed: {HOOKS + _SINGLE}")
        for hook in _SINGLE:
            if len([e for e in effects if e.hook == hook]) > 1:
                raise SubstrateValueError(f"Device.effects: at most one {hook!r} effect")
        kinds = [type(e).__name__ for e in effects]
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        if twice:  # their draws and fixed state are keyed by the class
            raise SubstrateValueError(f"Device.effects: {twice} given twice; one effect of a class per device")
        policies = {e.policy for e in self.of(ReadEffect)}
        if len(policies) > 1:
            raise SubstrateValueError(f"Device.effects: read effects with different policies {sorted(policies)}")
        if self.update is not None and (self.of(ProgramEffect) or self.of(DriftEffect) or self.mapping
                                        or any(e.conductances for e in self.of(ReadEffect))):
            raise SubstrateValueError(
                "a pulsed update model defines the device's levels and noise itself: it cannot be "
                "combined with conductance mapping, program, drift or conductance read effects")

    def of(self, kind) -> list:
        """The device's effects that are instances of ``kind`` (a class or a tuple of classes), in order."""
        return [e for e in self.effects if isinstance(e, kind)]

    def _one(self, hook):
        return next((e for e in self.effects if e.hook == hook), None)

    @property
    def mapping(self):
        """The conductance mapping effect, or None."""
        return self._one("map")

    @property
    def update(self):
        """The pulsed update model, or None."""
        return self._one("update")

    @property
    def io(self):
        """The IO chain effect (DAC, ADC, output noise), or None."""
        return self._one("io")

    @property
    def read_policy(self) -> str | None:
        """When the device's read noise is redrawn (the first read effect's policy), or None without one."""
        return next((e.policy for e in self.of(ReadEffect)), None)

    @property
    def conductance_path(self) -> bool:
        """Whether weights go through conductances (a mapping, program or drift effects, or a read effect that needs
        them)."""
        return bool(self.mapping or self.of(ProgramEffect) or self.of(DriftEffect)
                    or any(e.conductances for e in self.of(ReadEffect)))

    def scaled(self, factor: float) -> "Device":
        """Every effect's non-ideality (its ``scalable`` fields: noises and spreads) times ``factor``;
        systematic effects (mapping, quantisation, converters, relaxation time, update response)
        stay as they are."""
        return dataclasses.replace(self, effects=tuple(e.scaled(factor) for e in self.effects))

    def with_effects(self, *effects) -> "Device":
        """This device with ``effects`` added (an effect of the same class replaces the old one)."""
        kinds = {type(e) for e in effects}
        return dataclasses.replace(self, effects=tuple(e for e in self.effects if type(e) not in kinds) + effects)

    def with_weight_scale(self, weight_scale: float) -> "Device":
        """This device with another ``weight_scale`` (network weight per device unit)."""
        return dataclasses.replace(self, weight_scale=weight_scale)

    def without(self, *kinds) -> "Device":
        """This device with the effects of the given classes switched off."""
        return dataclasses.replace(self, effects=tuple(e for e in self.effects if not isinstance(e, kinds)))

    def describe(self, width: int = 100) -> str:
        """The name, the whole citation, then each effect (:meth:`Effect.describe`), wrapped at ``width``
        columns."""
        lines = [self.name]
        if self.citation:
            lines.append(textwrap.fill(f"source: {self.citation}", width, initial_indent="  ",
                                       subsequent_indent="    ", break_on_hyphens=False))
        lines += [textwrap.indent(e.describe(width - 2), "  ") for e in self.effects] or ["  (ideal: no effects)"]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ crossbar
class Crossbar:
    """The devices of one connection: what was written, when, and their fixed (device-to-device)
    draws. ``g_prog`` (2, post, pre) and ``t_write`` (post, pre) on the conductance path."""

    def __init__(self, name, device: Device, seed: int):
        self.name, self.device, self.seed = name, device, seed
        self.mapping = device.mapping or ConductanceMapping()
        self.g_max, self.g_min = self.mapping.g_max, self.mapping.g_min
        self.w_prog = None  # the weights as written (network units)
        self._fixed, self._written, self._dirty, self._rngs = {}, {}, {}, {}

    def rng(self, effect, suffix="") -> np.random.Generator:
        """The random stream of ``effect`` (and ``suffix``) on this crossbar, made on first use from the network's
        seed."""
        key = f"{effect.stream}{suffix}/{self.name}"
        if key not in self._rngs:
            self._rngs[key] = stream(self.seed, key)
        return self._rngs[key]

    def fixed(self, effect, draw):
        """A draw made once per device (device-to-device variation), kept for its lifetime."""
        if effect.stream not in self._fixed:
            self._fixed[effect.stream] = draw()
        return self._fixed[effect.stream]

    def written(self, effect, draw):
        """A draw made at every write of a device (e.g. its drift exponent): redrawn for the devices
        written since the effect last asked, kept for the others."""
        key = effect.stream
        value = self._written.get(key)
        if value is None or self._dirty[key].any():
            new = draw()
            value = new if value is None else np.where(self._dirty[key], new, value)
            self._written[key] = value
            self._dirty[key] = np.zeros(value.shape, bool)
        return value

    # -------------------------------------------------------------------- write
    def write(self, target: np.ndarray, clock: float) -> np.ndarray:
        """Write ``target`` (network units) into the devices whose target changed; return the weights
        as written."""
        dev = self.device
        target = np.asarray(target, dtype=float)
        first = self.w_prog is None
        # the full scale: ConductanceMapping.w_max, else the largest |W| of this write (aihwkit's
        # converters scale every programming to the weights); a new scale rewrites every device
        w_max = self.mapping.w_max or float(np.max(np.abs(target))) or 1.0
        rescaled = not first and dev.conductance_path and w_max != self.w_max
        self.changed = np.ones(target.shape, bool) if first or rescaled else target != self.target
        self.w_max = w_max
        for key in self._written:
            self._dirty[key] |= self.changed
        # what this write costs (substrate.counts): pulses, and the longest pulse train (the devices
        # of a crossbar are pulsed in parallel); a programmed (not pulsed) device counts as one pulse
        changed = int(np.count_nonzero(self.changed))
        self.pulses, self.write_cycles = changed, int(changed > 0)
        if dev.update is not None:
            self._write_pulsed(target, first)
        elif dev.conductance_path:
            self._write_conductances(target, clock, first)
        else:
            self.w_prog = target.copy()
        self.target = target.copy() if dev.update is None else self.w_prog.copy()
        return self.w_prog

    def _write_conductances(self, target, clock, first):
        self.scale = (self.g_max - self.g_min) / self.w_max
        if first:
            self.t_write = np.zeros(target.shape)
            self.g_prog = np.zeros((2,) + target.shape)
        mag = np.minimum(np.abs(target), self.w_max) * self.scale
        g = self.g_min + np.stack([np.where(target > 0, mag, 0.0), np.where(target < 0, mag, 0.0)])
        self.g_target = g
        for e in sorted(self.device.of(ProgramEffect), key=lambda e: e.order):  # the fixed order
            g = e.program(g, self, self.rng(e))
        self.g_prog = np.where(self.changed, g, self.g_prog)
        self.t_write = np.where(self.changed, clock, self.t_write)
        self.w_prog = (self.g_prog[0] - self.g_prog[1]) / self.scale

    def _write_pulsed(self, target, first):
        up, ws = self.device.update, self.device.weight_scale
        if first:
            self.devices = up.devices(target.shape, self.rng(up, ".dtod"))
            self.w_dev = up.initial(target / ws, self.devices)
        else:
            delta = (target - self.w_prog) / ws
            n = up.pulses(delta)
            self.pulses, self.write_cycles = int(n.sum()), int(n.max(initial=0))
            up.apply(self.w_dev, delta, self.devices, self.rng(up))
        self.w_prog = self.w_dev * ws

    # -------------------------------------------------------------------- read
    def read(self, clock: float):
        """(weights, variance of each weight's read deviation) at ``clock``, before read noise."""
        dev = self.device
        if not dev.conductance_path:
            w = self.w_prog
            g = age = None
        else:
            age = np.maximum(clock - self.t_write, 0.0)
            g = self.g_prog
            for e in dev.of(DriftEffect):
                g = e.drift(g, age, self, self.rng(e))
            w = (g[0] - g[1]) / self.scale
        var = [e.read_variance(g, w, age, self) for e in dev.of(ReadEffect)]
        if any(getattr(e, "compensation", False) for e in dev.of(DriftEffect)):
            # one output scale: it multiplies the read noise as well as the weights (aihwkit)
            total = np.sum(np.abs(w))
            comp = np.sum(np.abs(self.w_prog)) / total if total > 0 else 1.0
            w, var = w * comp, [v * comp ** 2 for v in var]
        return w, var


# ------------------------------------------------------------------------------------ neurons
@dataclass
class Neurons:
    """The neurons' physical parameters, edited by dynamics effects at attach."""

    tau: np.ndarray
    gain: np.ndarray
    offset: np.ndarray
    state_noise: float = 0.0
    read_time: float = math.inf


# ------------------------------------------------------------------------------------ network
class DeviceNetwork(Network):
    """A network running on a device (see :func:`attach`). It *is* a :class:`~substrate.Network`
    (relax, integrate, gradients and EP take it as they are), sharing the nominal network's
    connections, biases and inputs: the nominal weights are the targets the learning rule writes, and
    the circuit computes with the weights as the devices read them.

    clock: simulated seconds (drift); ``advance(seconds)`` moves it. ``write()`` writes the nominal
    weights that changed (programming, or pulses that move the devices; with pulses the nominal
    weights are then set to what the devices hold). ``new_equilibrium()`` (called by every EP free
    phase) redraws read noise held per equilibrium or per sample."""

    def __init__(self, network: Network, device: Device, rng: np.random.Generator):
        if isinstance(network, DeviceNetwork):
            raise SubstrateValueError("network is already on a device; attach the nominal network")
        if not isinstance(network, Network):
            raise SubstrateValueError(f"network must be a substrate Network, got {type(network).__name__}")
        if not isinstance(device, Device):
            raise SubstrateValueError(f"device must be a substrate.devices.Device, got {type(device).__name__}")
        if not isinstance(rng, np.random.Generator):
            raise SubstrateValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        if network.dtype.kind == "c":
            raise SubstrateValueError("a device holds real conductances: attach a network with float32 or "
                                      "float64 parameters (complex states for holomorphic EP are fine)")
        self.nominal, self.device = network, device
        self.seed = int(rng.integers(2 ** 63))
        self.clock = 0.0
        tau = network.tau
        neurons = Neurons(tau.copy(), np.ones(network.n), np.zeros(network.n))
        for e in device.of(DynamicsEffect):
            e.neurons(neurons, stream(self.seed, e.stream))
        self.neurons = neurons
        layers = []
        for x in network.layers:
            sl = network.slices[x.name]
            t = neurons.tau[sl]
            layers.append(Layer(x.name, x.size, tau=t if np.ndim(x.tau) or np.any(t != t[0]) else float(t[0]),
                                activation=x.activation, bias=x.bias))
        super().__init__(layers, network.connections, network.inputs)
        self.read_time = neurons.read_time
        self._mismatch = bool(np.any(neurons.gain != 1.0) or np.any(neurons.offset != 0.0))
        separate = bool(device.of(IndependentFeedback))
        self.crossbars = {c.name: Crossbar(c.name, device, self.seed)
                          for c in self.connections if not c.tied or separate}
        self._held, self._held_rngs, self._phase = {}, {}, {}
        self.write()

    # -------------------------------------------------------------------- writing and time
    def _target(self, c):
        if c.tied:  # a separate feedback crossbar is written with the forward weight's transpose
            src = self.connection(f"{c.post}->{c.pre}")
            return src.weight.T if src.mask is None else (src.weight * src.mask).T
        return c.weight

    def write(self):
        """Write the nominal weights that changed since the last write (all of them the first time).
        Returns its :class:`substrate.Counts`: the pulses applied (a programmed device counts as one)
        and the write cycles (the longest pulse train; the crossbars are written in parallel)."""
        pulses = cycles = 0
        for c in self.connections:
            xb = self.crossbars.get(c.name)
            if xb is None:
                continue
            w = xb.write(self._target(c), self.clock)
            pulses, cycles = pulses + xb.pulses, max(cycles, xb.write_cycles)
            if self.device.update is not None and not c.tied:
                c.weight[...] = w  # the devices are the weights: the learning rule continues from them
        self._reading = None
        self.new_equilibrium()
        return Counts(pulses=pulses, write_cycles=cycles)

    def advance(self, seconds: float):
        """Move the simulated clock by ``seconds`` (drift, and the age of the 1/f read noise)."""
        self.clock += nonnegative(seconds, "seconds")
        self._reading = None
        self.new_equilibrium()  # held read noise belongs to the old reading

    def new_equilibrium(self):
        self._held = {}

    def pack(self, dtype):
        """A new phase: the ``phase`` policy draws its read noise here (one draw per relaxation or
        integration, shared by a crossbar's forward and transposed reads and by the input weights
        read with it)."""
        self._phase = {}
        return super().pack(dtype)

    # -------------------------------------------------------------------- reading
    def _state(self):
        """{crossbar: (weights at the clock, [read variances])}, cached until a write or clock move."""
        if self._reading is None:
            self._reading = {k: xb.read(self.clock) for k, xb in self.crossbars.items()}
        return self._reading

    def _draw(self, name, shape_extra=()):
        """A read deviation of crossbar ``name``: each read effect's from its own stream, summed."""
        w, variances = self._state()[name]
        dev = np.zeros(w.shape + shape_extra)
        for e, var in zip(self.device.of(ReadEffect), variances):
            sd = np.sqrt(var)
            z = self.crossbars[name].rng(e, ".read").standard_normal(shape_extra + w.shape)
            dev += (np.moveaxis(z, 0, -1) if shape_extra else z) * (sd[..., None] if shape_extra else sd)
        return dev

    def _deviation(self, name, batch=None):
        """The read deviation of crossbar ``name`` for this read, per the policy: (post, pre), or
        (post, pre, B) for ``sample``; None without read noise (or for ``step`` on state crossbars)."""
        policy = self.device.read_policy
        if policy is None:
            return None
        if policy in ("phase", "step"):  # one draw per phase (per pack), shared by a tied transpose
            if name not in self._phase:
                self._phase[name] = self._draw(name)
            return self._phase[name]
        if policy == "equilibrium":
            if name not in self._held:
                self._held[name] = self._draw(name)
            return self._held[name]
        key = (name, batch)
        if key not in self._held:
            self._held[key] = self._draw(name, (batch,))
        return self._held[key]

    def _read_weight(self, c, deviation=True, batch=None):
        """The weight of connection c as read now (mask applied; a tied one transposed from its
        forward crossbar unless it has its own)."""
        src, transpose = c, False
        if c.name not in self.crossbars:
            src, transpose = self.connection(f"{c.post}->{c.pre}"), True
        w = self._state()[src.name][0]
        d = self._deviation(src.name, batch) if deviation else None
        if d is not None and d.ndim == 2:
            w = w + d
        d = d if d is not None and d.ndim == 3 else None
        if transpose:
            w = w.T
            d = None if d is None else d.transpose(1, 0, 2)
        mask = self._tied_mask(c)
        if mask is not None:  # a tied connection: the source's mask, transposed (also on its own copy)
            w = w * mask
            d = None if d is None else d * mask[..., None]
        return (w * c.mask if c.mask is not None else w.copy()), d

    def _tied_mask(self, c):
        src = self.connection(f"{c.post}->{c.pre}") if c.tied else None
        return None if src is None or src.mask is None else src.mask.T

    def circuit_weight(self, c):
        # per-step and per-sample deviations of state crossbars are drawn in the kernel / held apart
        policy = self.device.read_policy
        apart = policy == "sample" or (policy == "step" and c.pre in self.slices)
        w, _ = self._read_weight(c, deviation=not apart)
        return w.astype(self.dtype, copy=False)

    def drive(self, x, batch, dtype, weights=None):
        """V x + b through the input crossbars as read now: inputs through the DAC, read noise (per
        phase for the ``step`` policy: the input is constant over a phase), output noise once per
        phase; the ADC of the input crossbars is not modelled (their output joins the recurrent
        one's before the kernel's ADC). Complex states (holomorphic EP) get the noise on both
        quadratures."""
        xs = self.check_inputs(x)
        io = self.device.io
        if io is not None and io.inp_bits > 0:
            xs = {k: _quantised(v, io.inp_bits, io.inp_bound) for k, v in xs.items()}
        drive = super().drive(xs, batch, dtype, weights)
        for c in self.connections:
            if c.pre not in xs:
                continue
            sl = self.slices[c.post]
            if self.device.read_policy == "sample":
                _, d = self._read_weight(c, batch=drive.shape[1])
                d = d if c.mask is None else d * c.mask[..., None]
                drive[sl] += np.einsum("ijb,bj->ib", d, xs[c.pre]).astype(dtype, copy=False)
            if io is not None and io.out_noise > 0:
                rng = self._kernel_rng("IOChain.input")
                rows, nb = drive[sl].shape
                # complex states: a draw on each quadrature, Re and Im of a sample side by side
                parts = 2 if drive.dtype.kind == "c" else 1
                xi = rng.standard_normal((rows, parts * nb))
                drive[sl] += io.out_noise * self._crossbar_wmax(c) * (xi.view(drive.dtype) if parts == 2 else xi)
        return drive

    def _crossbar_wmax(self, c):
        xb = self.crossbars.get(c.name) or self.crossbars[f"{c.post}->{c.pre}"]
        return xb.w_max

    @property
    def differentiable(self) -> bool:
        """Is the circuit as read a smooth deterministic function of its state (so that the adjoint
        of its own steps is its gradient)? Not with per-step or per-sample read noise, output noise,
        converters, state noise, activation mismatch or a ``StepEffect`` (the engine's derivative
        kernels are nominal)."""
        return not (self.device.read_policy in ("step", "sample") or self.device.io is not None
                    or self.neurons.state_noise > 0 or self._mismatch or self.device.of(stepping.StepEffect))

    def activities(self, u):
        if not self._mismatch:
            return super().activities(u)
        return super().activities(self.neurons.gain * (u - self.neurons.offset))

    def kernel_effects(self, packed, batch):
        """The states of the device's effects inside the stepping kernel (``stepping``), in the
        fixed order: DAC -> W r -> read noise -> output noise -> ADC, activation mismatch, state noise,
        then the device's own ``StepEffect``s in the order given; ``()`` when there are none, so that
        the ideal kernel runs."""
        dtype = packed.bias.dtype  # the states' (real weights serve complex states too)
        rdt = np.float32 if dtype == np.float32 else np.float64
        n, policy, io = self.n, self.device.read_policy, self.device.io
        state = [self.connection(name) for name in packed.conn_names]
        fx = []
        if io is not None and io.inp_bits > 0:
            fx.append(stepping.InputDAC(io.inp_bits, np.array([float(io.inp_bound)]), np.empty((n, batch), dtype)))
        if policy == "step":
            wvar = (np.concatenate([self._packed_variance(c).ravel() for c in state]).astype(dtype)
                    if state else np.zeros(0, dtype))
            t_c = float(max([e.correlation_time or 0.0 for e in self.device.of(ReadEffect)], default=0.0))
            fx.append(stepping.ReadNoiseStep(wvar, self._kernel_stream("ReadNoise.step"), t_c, np.empty((n, batch), dtype),
                                             np.empty((n, batch), dtype), np.empty((n, batch))))
        elif policy == "sample":
            blocks = [self._read_weight(c, batch=batch)[1] for c in state]
            blocks = [d if c.mask is None else d * c.mask[..., None] for d, c in zip(blocks, state)]
            fx.append(stepping.ReadNoiseSample(
                np.ascontiguousarray(np.concatenate([d.reshape(-1, batch) for d in blocks]), dtype)
                if state else np.zeros((0, batch), dtype)))
        if io is not None:  # noise and bound in units of the full-scale output of each layer's crossbars
            wmax = np.zeros(n)
            for c in state:
                sl = self.slices[c.post]
                wmax[sl] = np.maximum(wmax[sl], self._crossbar_wmax(c))
            # rows that no state crossbar feeds keep 0: no output noise, no ADC (the kernel skips them)
            if io.out_noise > 0:
                fx.append(stepping.OutputNoise((io.out_noise * wmax).astype(rdt), self._kernel_stream("IOChain"),
                                               normals.new_chunk()))
            if io.out_bits > 0:
                fx.append(stepping.OutputADC(io.out_bits, (io.out_bound * wmax).astype(rdt)))
        if self._mismatch:
            fx.append(stepping.ActivationGain(self.neurons.gain.astype(rdt), self.neurons.offset.astype(rdt),
                                              np.empty(batch, dtype)))
        if self.neurons.state_noise > 0:
            fx.append(stepping.StateNoiseStep(float(self.neurons.state_noise), self._kernel_stream("StateNoise"),
                                              normals.new_chunk()))
        for e in self.device.of(stepping.StepEffect):
            s = e.state(self, batch, dtype)
            if s is not None and not K.is_registered(s):
                raise SubstrateValueError(
                    f"{type(e).__name__}.state() returned a {type(s).__name__}, whose kernel hooks are not "
                    f"registered: substrate.devices.register({type(s).__name__}, after=..., step=...)")
            if s is not None:
                fx.append(s)
        return tuple(fx)

    def _packed_variance(self, c):
        if c.name in self.crossbars:
            var = sum(self._state()[c.name][1])
        else:  # a tied connection reads its forward crossbar's devices transposed
            var = sum(self._state()[f"{c.post}->{c.pre}"][1]).T
        mask = self._tied_mask(c)
        if mask is not None:
            var = var * mask ** 2
        var = np.broadcast_to(var, (self.size_of(c.post), self.size_of(c.pre)))
        return var * c.mask ** 2 if c.mask is not None else var

    def rng(self, effect) -> np.random.Generator:
        """The generator of ``effect``'s own stream on this device, kept across phases (draws inside
        the stepping kernel continue it)."""
        return self._kernel_rng(effect.stream)

    def _kernel_rng(self, name):
        if name not in self._held_rngs:
            self._held_rngs[name] = stream(self.seed, name)
        return self._held_rngs[name]

    def _kernel_stream(self, name):
        """A phase's block stream (``normals``) of the stream ``name``: keyed by one draw of its
        generator, which alone carries the state from phase to phase (and through a save)."""
        return normals.new_stream(self._kernel_rng(name))

    def __repr__(self):
        return f"DeviceNetwork({self.device.name}, clock {self.clock:g} s; {super().__repr__()})"


def attach(network: Network, device: Device, rng: np.random.Generator) -> DeviceNetwork:
    """Run ``network`` on ``device``: the devices are drawn (from streams seeded by ``rng``) and
    programmed with the network's weights at clock 0."""
    return DeviceNetwork(network, device, rng)


def _quantised(x, bits, bound):
    """x through the kernels' DAC (``_kernels.quantise``: mid-tread, 2^bits - 1 levels)."""
    q = np.array(x, dtype=float)
    K.quantise(q, bits, np.array([float(bound)]))
    return q
