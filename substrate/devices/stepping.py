"""The device effects that act inside the stepping kernel, each one class: a namedtuple of what the
kernel holds (arrays, numbers, its own generator) and its hooks (``_kernels.register_effect``: what it
adds before or after every weight product, to the activities, or after every accepted step).

A :class:`~substrate.devices.device.DeviceNetwork` builds the states of its device in the fixed order
of the weight product, DAC -> W r -> read noise -> output noise -> ADC, then the neurons' activation
mismatch and state noise; a :class:`StepEffect` of the device adds its own after them. Complex
states (holomorphic EP) pass the read chain as their two real quadratures (``_kernels.quadratures``:
I and Q, each value's real and imaginary parts side by side), as a lock-in reads an oscillator's
complex amplitude: each quadrature through its own converter and with its own noise draw. Every
generator is the effect's own stream, so that one effect never shifts another's draws; the built-in
effects draw their normals a block at a time (:mod:`substrate.devices.normals`: the ``stream`` of
their states).
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass
from typing import ClassVar

from .. import _kernels as K
from . import normals
from .base import Effect


class KernelState:
    """What the Python layer asks of an effect state (a plain namedtuple answers False to all):
    ``draws_per_step``, does it draw at every step (then the device needs a fixed-step method);
    ``quadratures``, does it take complex states, as their real quadratures (an effect that draws at
    every step and does not is refused complex states); ``changes_activation``, does it change rho
    (the engine's derivative kernels are nominal)."""

    __slots__ = ()
    draws_per_step = False
    quadratures = False
    changes_activation = False


@dataclass(frozen=True)
class StepEffect(Effect):
    """The base of an effect that acts inside the stepping kernel: ``state(network, batch, dtype)``
    returns its kernel state for a phase of ``batch`` samples with states of ``dtype`` (an instance of
    a namedtuple class registered with ``register(cls, before=..., after=..., activate=..., step=...)``),
    or None to add nothing. ``network`` is the :class:`~substrate.devices.device.DeviceNetwork`
    (``network.seed``, ``network.n``, ``network.rng(self)``: the effect's own generator, kept across
    phases). An effect that draws normals at every step can draw them a block at a time as the built-in
    ones do: ``normals.new_stream(network.rng(self))`` in its state, ``normals.fill(stream, buf)`` in
    its hook."""

    hook: ClassVar[str] = "step"

    def state(self, network, batch: int, dtype):
        """The effect's kernel state for a phase of ``batch`` samples with states of ``dtype``."""
        raise NotImplementedError


def register(state_class, **hooks):
    """Register the kernel hooks of ``state_class`` (see ``_kernels.register_effect``)."""
    return K.register_effect(state_class, **hooks)


# ------------------------------------------------------------------------------------ DAC
class InputDAC(KernelState, namedtuple("InputDAC", "bits bound buf")):
    """The DAC of the activities entering a product: ``bits`` on +-bound (1,); buf (n, B) scratch. A
    complex activity is converted as its two quadratures."""

    __slots__ = ()
    quadratures = True


@K.njit
def _dac_before(e, src):
    K.copy_rows(src, e.buf)
    K.quantise(K.quadratures(e.buf), e.bits, e.bound)
    return e.buf


register(InputDAC, before=_dac_before)


# ------------------------------------------------------------------------------------ read noise
class ReadNoiseStep(KernelState, namedtuple("ReadNoiseStep", "wvar stream correlation_time sq var xi")):
    """Read noise redrawn at every step, per sample, in its output form: sum_j dW_ij r_j with
    independent dW_ij ~ N(0, wvar_ij) is N(0, sum_j wvar_ij r_j^2), one extra product of the
    variances (wvar, flat weight layout) with r^2 instead of n_w draws (aihwkit's weight noise is
    applied the same way); the step's stages share its draw xi. With a correlation time t_c > 0 the
    variance is scaled by t_c/h, the white-noise limit, so that its effect on the trajectory does not
    depend on the step h. sq, var (n, B) and xi (n, B) float64: scratch."""

    __slots__ = ()
    draws_per_step = True


@K.njit
def _read_step_after(e, src, circuit, tmp, out, fresh, h):
    sq, var, xi = e.sq, e.var, e.xi
    for i in range(src.shape[0]):
        for b in range(src.shape[1]):
            sq[i, b] = src[i, b] * src[i, b]
    K.weights_times(sq, e.wvar, circuit.conn, circuit.layer_off, tmp, var)
    if fresh:
        normals.fill(e.stream, xi.reshape(xi.size))
    scale = e.correlation_time / h if e.correlation_time > 0.0 else 1.0
    for i in range(out.shape[0]):
        for b in range(out.shape[1]):
            out[i, b] += math.sqrt(scale * var[i, b].real) * xi[i, b]


register(ReadNoiseStep, after=_read_step_after)


class ReadNoiseSample(KernelState, namedtuple("ReadNoiseSample", "wdev")):
    """Read deviations held per sample: wdev (n_w, B) in the flat weight layout; out += dW_b r_b."""

    __slots__ = ()


@K.njit
def _read_sample_after(e, src, circuit, tmp, out, fresh, h):
    conn, wdev = circuit.conn, e.wdev
    for c in range(conn.shape[0]):
        wo, pa, pn, qa, qn = conn[c, 0], conn[c, 1], conn[c, 2], conn[c, 3], conn[c, 4]
        for i in range(qn):
            for j in range(pn):
                k = wo + i * pn + j
                for b in range(src.shape[1]):
                    out[qa + i, b] += wdev[k, b] * src[pa + j, b]


register(ReadNoiseSample, after=_read_sample_after)


# ------------------------------------------------------------------------------------ output
class OutputNoise(KernelState, namedtuple("OutputNoise", "sd stream chunk")):
    """Gaussian noise on every product's output, sd (n,) per row (0: a row no crossbar feeds); chunk:
    ``normals.new_chunk()`` scratch. A complex output gets a draw on each quadrature: row i's 2 B
    draws in the order of ``_kernels.quadratures`` (Re and Im of sample 0, then sample 1...), the
    draws the real (n, 2 B) array of the quadratures would get."""

    __slots__ = ()
    draws_per_step = True
    quadratures = True


@K.njit
def _output_noise_after(e, src, circuit, tmp, out, fresh, h):
    q = K.quadratures(out)
    for i in range(q.shape[0]):
        if e.sd[i] > 0.0:
            normals.add(e.stream, e.sd[i], e.chunk, q[i])


register(OutputNoise, after=_output_noise_after)


class OutputADC(KernelState, namedtuple("OutputADC", "bits bound")):
    """The ADC of every product's output: ``bits`` on +-bound (n,) per row (0: no converter). A complex
    output is converted as its two quadratures."""

    __slots__ = ()
    quadratures = True


@K.njit
def _adc_after(e, src, circuit, tmp, out, fresh, h):
    K.quantise(K.quadratures(out), e.bits, e.bound)


register(OutputADC, after=_adc_after)


# ------------------------------------------------------------------------------------ neurons
class ActivationGain(KernelState, namedtuple("ActivationGain", "gain offset row")):
    """Activation mismatch: r_i = rho(g_i (u_i - o_i)) per neuron; row (B,) scratch."""

    __slots__ = ()
    changes_activation = True


@K.njit
def _mismatch_activate(e, y, circuit, r):
    K.activate_device(y, circuit.layer_off, *circuit.layer_act, e.gain, e.offset, e.row, r)


register(ActivationGain, activate=_mismatch_activate)


class StateNoiseStep(KernelState, namedtuple("StateNoiseStep", "sigma stream chunk")):
    """Additive state noise after every accepted step: u += sigma sqrt(h) xi; chunk:
    ``normals.new_chunk()`` scratch."""

    __slots__ = ()
    draws_per_step = True


@K.njit
def _state_noise_step(e, u, h):
    normals.add(e.stream, e.sigma * math.sqrt(h), e.chunk, u.reshape(u.size))
    return True


register(StateNoiseStep, step=_state_noise_step)
