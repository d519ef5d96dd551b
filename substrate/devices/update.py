"""Non-ideal weight updates: how a training write (a train of pulses) changes a device.

Each model is an :class:`~substrate.devices.base.Effect` with ``hook = "update"`` (docs/equations.md,
sections 6.6, 6.7). All weights are in the device's normalised units; the caller maps network weights
to them. The interface (:class:`UpdateModel`):

* ``devices(shape, rng)`` draws the per-device parameters once (device-to-device variation) and
  returns them as a dict of arrays of ``shape``: ``dw_up``, ``dw_down`` (step sizes), ``w_min``,
  ``w_max`` (bounds), plus model-specific arrays (``slope_up``, ``slope_down``);
* ``initial(w, devices)`` gives the weights as first written (set directly, as aihwkit's
  ``set_weights``): clipped into each device's [w_min, w_max];
* ``apply(w, delta, devices, rng)`` applies the requested change ``delta`` as pulses and updates ``w``
  (a float64 array) in place.

Pulse count. A requested change becomes ``n = sign(delta) min(round(|delta| / dw_min), max_pulses)``
pulses on each device (``dw_min`` the model's nominal step, round half up), each pulse following the
model's response with its cycle-to-cycle noise. This is a deliberate deviation from aihwkit, whose
default update is a stochastic pulse train (BL = min(ceil(lr |x| |d| / dw_min), 31) slots with
coincidence probabilities, E[dw] = lr x d): here the count is deterministic, so the only randomness of
an update is the devices' own (docs/equations.md, section 6.6 gives the aihwkit scheme for comparison).

Random streams: ``devices`` and ``apply`` draw from the generator they are given (use
``base.stream(seed, model.stream)``); the same generator state gives the same bits. ``scaled(k)``
multiplies the device-to-device (``_dtod``) and cycle-to-cycle (``_std``, NeuroSim ``c2c``) fields,
so ``scaled(0)`` is a noise-free device that keeps its systematic response (bounds, asymmetry
``up_down``, nonlinearity). aihwkit's "write noise" (``write_noise_std``: a read-side deviation of a
hidden persistent weight, redrawn at every write) is not modelled; the presets say where they drop it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import SubstrateValueError
from ..validate import number
from . import _update_kernels as K
from .base import Effect, flag, integer, nonnegative, positive, spread

_EMPTY = np.zeros(0)
_EMPTY.flags.writeable = False
_REQUIRED = ("dw_up", "dw_down", "w_min", "w_max")


def _readonly(a: np.ndarray) -> np.ndarray:
    """A flat read-only view of the C-contiguous ``a``: the kernel's inputs are always typed read-only,
    so one compiled specialisation serves every call (a broadcast delta is read-only anyway)."""
    v = a.reshape(-1).view()
    v.flags.writeable = False
    return v


def _shape(shape, name) -> tuple:
    dims = (shape,) if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise SubstrateValueError(f"{name}={shape!r} must be an int or a tuple of ints >= 0") from None
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 0:
            raise SubstrateValueError(f"{name}={shape!r} must be an int or a tuple of ints >= 0")
    return tuple(int(d) for d in dims)


# ------------------------------------------------------------------------------------ interface
@dataclass(frozen=True)
class UpdateModel(Effect):
    """A pulsed update model (the interface; see the module docstring)."""

    hook: ClassVar[str] = "update"
    code: ClassVar[int] = -1  # the kernel's model code (_update_kernels)

    @property
    def dw_step(self) -> float:
        """The nominal weight change of one pulse (sets the pulse count of a requested change)."""
        raise NotImplementedError

    def devices(self, shape, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Per-device parameters drawn once (device-to-device variation), each an array of ``shape``."""
        raise NotImplementedError

    def kernel_parameters(self) -> np.ndarray:
        """The model's constants in the layout of ``_update_kernels`` (``par``)."""
        par = np.zeros(K.N_PAR)
        par[K.DW_MIN], par[K.MAX_PULSES] = self.dw_step, self.max_pulses
        return par

    def pulses(self, delta) -> np.ndarray:
        """The pulses ``apply`` gives each device for the requested change ``delta``: min(round(|delta| /
        dw_min), max_pulses), round half up (the kernel's count, in the same floating-point operations)."""
        return np.minimum(np.floor(np.abs(np.asarray(delta, dtype=np.float64)) / self.dw_step + 0.5),
                          self.max_pulses)

    def initial(self, w, devices) -> np.ndarray:
        """Weights as first written (set directly, as aihwkit's set_weights): clipped into each
        device's [w_min, w_max]. Returns a new float64 array."""
        name = f"{type(self).__name__}.initial"
        w = np.asarray(w, dtype=np.float64)
        if not np.isfinite(w).all():
            raise SubstrateValueError(f"{name}: w must be finite")
        lo, hi = (self._device_array(devices, k, w.shape, name) for k in ("w_min", "w_max"))
        return np.minimum(np.maximum(w, lo), hi)

    def apply(self, w, delta, devices, rng) -> np.ndarray:
        """Apply the requested change ``delta`` as ``n = sign(delta) min(round(|delta|/dw_min),
        max_pulses)`` pulses per device (deterministic count, see the module docstring); updates the
        float64 array ``w`` in place and returns it."""
        name = f"{type(self).__name__}.apply"
        if not isinstance(w, np.ndarray) or w.dtype != np.float64:
            raise SubstrateValueError(f"{name}: w must be a float64 numpy array (updated in place), got "
                                      f"{type(w).__name__}{'' if not hasattr(w, 'dtype') else ' of ' + str(w.dtype)}")
        if not w.flags.writeable:
            raise SubstrateValueError(f"{name}: w must be writeable (it is updated in place)")
        try:
            delta = np.broadcast_to(np.asarray(delta, dtype=np.float64), w.shape)
        except (ValueError, TypeError):
            raise SubstrateValueError(f"{name}: delta must be real and broadcast to w's shape {w.shape}") from None
        if not np.isfinite(delta).all():
            raise SubstrateValueError(f"{name}: delta must be finite")
        if not isinstance(rng, np.random.Generator):
            raise SubstrateValueError(f"{name}: rng must be a numpy.random.Generator, got {type(rng).__name__}")
        arrays = [_readonly(self._device_array(devices, k, w.shape, name)) for k in _REQUIRED]
        for k in ("slope_up", "slope_down"):
            arrays.append(_readonly(self._device_array(devices, k, w.shape, name)) if self.code == K.LINEAR else _EMPTY)
        view = w.flags.c_contiguous
        flat = w.reshape(-1) if view else np.ascontiguousarray(w).reshape(-1)
        K.apply_pulses(flat, _readonly(np.ascontiguousarray(delta)), *arrays, self.code,
                       _readonly(self.kernel_parameters()), rng)
        if not view:
            w[...] = flat.reshape(w.shape)
        return w

    @staticmethod
    def _device_array(devices, key, shape, name) -> np.ndarray:
        if not isinstance(devices, dict) or key not in devices:
            raise SubstrateValueError(f"{name}: devices must be the dict of devices(shape, rng), missing {key!r}")
        a = np.ascontiguousarray(devices[key], dtype=np.float64)
        if a.shape != shape:
            raise SubstrateValueError(f"{name}: devices[{key!r}] has shape {a.shape}, expected {shape} (w's shape)")
        return a


# ------------------------------------------------------------------------------------ aihwkit pulsed devices
@dataclass(frozen=True)
class PulsedDevice(UpdateModel):
    """Common parameters of aihwkit's PulsedDevice (defaults are aihwkit's).

    Per device (drawn once): bounds w_max_ij = w_max (1 + w_max_dtod xi), w_min_ij = w_min (1 +
    w_min_dtod xi); steps dw_up_ij = dw_min (g_ij + r_ij + min(up_down, 0)), dw_down_ij = dw_min
    (g_ij - r_ij - max(up_down, 0)) with gain g_ij = 1 + dw_min_dtod xi and r_ij = up_down_dtod xi'
    (as aihwkit's PulsedRPUDevice::populate: the up/down spread is additive, and a positive up_down
    shrinks the down step, a negative one the up step). aihwkit's enforce_consistency: steps taken as
    |.|, bounds swapped where w_min_ij > w_max_ij, then w_max_ij = |.|, w_min_ij = -|.| (so w_min_ij
    <= 0 <= w_max_ij). ``dw_min_std`` is the cycle-to-cycle noise of a pulse, relative to its step;
    ``max_pulses`` caps the pulses of one update (aihwkit's desired_BL default 31).
    """

    dw_min: float = 0.001
    dw_min_dtod: float = 0.3
    dw_min_std: float = 0.3
    up_down: float = 0.0
    up_down_dtod: float = 0.01
    w_max: float = 0.6
    w_max_dtod: float = 0.3
    w_min: float = -0.6
    w_min_dtod: float = 0.3
    max_pulses: int = 31

    scalable: ClassVar[tuple] = ("dw_min_dtod", "dw_min_std", "up_down_dtod", "w_max_dtod", "w_min_dtod")
    units: ClassVar[dict] = {"dw_min": "device units", "dw_min_dtod": "x dw_min", "dw_min_std": "x step",
                             "up_down": "x dw_min", "up_down_dtod": "x dw_min", "w_max": "device units",
                             "w_max_dtod": "x w_max", "w_min": "device units", "w_min_dtod": "x |w_min|",
                             "max_pulses": "pulses"}
    strict_bounds: ClassVar[bool] = False  # w_min < 0 < w_max required (slopes divide by the bounds)

    def __post_init__(self):
        c = type(self).__name__
        positive(self.dw_min, f"{c}.dw_min")
        for f in ("dw_min_dtod", "dw_min_std", "up_down_dtod", "w_max_dtod", "w_min_dtod"):
            nonnegative(getattr(self, f), f"{c}.{f}")
        if not -1.0 < number(self.up_down, f"{c}.up_down", finite=True) < 1.0:
            raise SubstrateValueError(f"{c}.up_down={self.up_down!r} must be in (-1, 1)")
        lo, hi = number(self.w_min, f"{c}.w_min", finite=True), number(self.w_max, f"{c}.w_max", finite=True)
        if not lo < hi:
            raise SubstrateValueError(f"{c}.w_min={self.w_min!r} must be < w_max={self.w_max!r}")
        if self.strict_bounds and not lo < 0.0 < hi:
            raise SubstrateValueError(f"{c}.w_min={self.w_min!r}, w_max={self.w_max!r}: need w_min < 0 < w_max")
        if not lo <= 0.0 <= hi:
            raise SubstrateValueError(f"{c}.w_min={self.w_min!r}, w_max={self.w_max!r}: "
                                      "[w_min, w_max] must contain 0 (as aihwkit)")
        integer(self.max_pulses, f"{c}.max_pulses", minimum=1)

    @property
    def dw_step(self) -> float:
        return self.dw_min

    def devices(self, shape, rng):
        shape = _shape(shape, f"{type(self).__name__}.devices(shape)")
        hi = self.w_max * spread(shape, self.w_max_dtod, rng)
        lo = self.w_min * spread(shape, self.w_min_dtod, rng)
        gain = spread(shape, self.dw_min_dtod, rng)
        r = self.up_down_dtod * rng.standard_normal(shape)
        dw_up = np.abs((gain + r + min(self.up_down, 0.0)) * self.dw_min)
        dw_down = np.abs((gain - r - max(self.up_down, 0.0)) * self.dw_min)
        swap = lo > hi
        hi, lo = np.abs(np.where(swap, lo, hi)), -np.abs(np.where(swap, hi, lo))
        out = {"dw_up": dw_up, "dw_down": dw_down, "w_min": lo, "w_max": hi}
        out.update(self._more(out, shape, rng))
        return out

    def _more(self, out, shape, rng) -> dict:
        return {}

    def kernel_parameters(self):
        par = super().kernel_parameters()
        par[K.STD] = self.dw_min_std
        par[K.MULT] = float(getattr(self, "mult_noise", True))
        return par


@dataclass(frozen=True)
class ConstantStep(PulsedDevice):
    """aihwkit ConstantStepDevice: w <- clip(w + d dw_ij^d (1 + dw_min_std xi), w_min_ij, w_max_ij)
    per pulse (d = +-1, xi ~ N(0, 1) per pulse; per-device steps and bounds as :class:`PulsedDevice`)."""

    code: ClassVar[int] = K.CONSTANT


@dataclass(frozen=True)
class SoftBounds(PulsedDevice):
    """aihwkit SoftBoundsDevice (a LinearStep with gamma = 1 referenced to the device's own bounds):
    up w += dw_up_ij (1 - w/w_max_ij)(1 + std xi), down w -= dw_down_ij (1 - w/w_min_ij)(1 + std xi)
    (``mult_noise``; additive: the noise term is dw std xi instead), clipped to the bounds after every
    pulse. Noise-free, n up pulses from w_0 give w_n = w_max - (w_max - w_0)(1 - dw_up/w_max)^n.
    ``devices`` adds ``slope_up`` = -dw_up/w_max_ij, ``slope_down`` = -dw_down/w_min_ij (step = dw + slope w)."""

    mult_noise: bool = True

    code: ClassVar[int] = K.LINEAR
    strict_bounds: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        flag(self.mult_noise, f"{type(self).__name__}.mult_noise")

    def _more(self, out, shape, rng):
        return {"slope_up": -out["dw_up"] / out["w_max"], "slope_down": -out["dw_down"] / out["w_min"]}


@dataclass(frozen=True)
class LinearStep(PulsedDevice):
    """aihwkit LinearStepDevice: w <- clip(w + d dw_ij^d (gamma_ij^d w + 1)(1 + std xi)) per pulse
    (``mult_noise``; additive: w + d [dw (gamma w + 1) + dw std xi]), with gamma_ij^+ =
    -|gamma_up + gamma_up_dtod xi| / w_max and gamma_ij^- = -|gamma_down + gamma_down_dtod xi| / w_min
    (aihwkit: additive device-to-device spread, allow_increasing False; the reference bound is the
    mean w_max/w_min if ``mean_bound_reference`` (aihwkit default) else the device's own). gamma = 0:
    constant step; gamma = 1 and the device's bounds: soft bounds. ``devices`` adds ``slope_up`` =
    gamma^+ dw_up, ``slope_down`` = gamma^- dw_down (step magnitude = dw + slope w)."""

    gamma_up: float = 0.0
    gamma_down: float = 0.0
    gamma_up_dtod: float = 0.05
    gamma_down_dtod: float = 0.05
    mean_bound_reference: bool = True
    mult_noise: bool = True

    code: ClassVar[int] = K.LINEAR
    strict_bounds: ClassVar[bool] = True
    scalable: ClassVar[tuple] = PulsedDevice.scalable + ("gamma_up_dtod", "gamma_down_dtod")

    def __post_init__(self):
        super().__post_init__()
        c = type(self).__name__
        for f in ("gamma_up", "gamma_down", "gamma_up_dtod", "gamma_down_dtod"):
            nonnegative(getattr(self, f), f"{c}.{f}")
        flag(self.mean_bound_reference, f"{c}.mean_bound_reference")
        flag(self.mult_noise, f"{c}.mult_noise")

    def _more(self, out, shape, rng):
        g_up = np.abs(self.gamma_up + self.gamma_up_dtod * rng.standard_normal(shape))
        g_down = np.abs(self.gamma_down + self.gamma_down_dtod * rng.standard_normal(shape))
        ref_up = self.w_max if self.mean_bound_reference else out["w_max"]
        ref_down = self.w_min if self.mean_bound_reference else out["w_min"]
        return {"slope_up": -g_up * out["dw_up"] / ref_up, "slope_down": -g_down * out["dw_down"] / ref_down}


@dataclass(frozen=True)
class ExpStep(PulsedDevice):
    """aihwkit ExpStepDevice: z = 2 a w / (w_max_ij - w_min_ij) + b, y^d = 1 - A_d exp(d gamma_d z),
    w <- clip(w + d max(y^d, 0) dw_ij^d (1 + std xi)) per pulse (d = +1 up, -1 down; a, b, A, gamma
    are tile-wide, as aihwkit; defaults are aihwkit's). aihwkit's "complex noise" (dw_min_std_add,
    dw_min_std_slope; the PCM preset) is not modelled."""

    A_up: float = 0.00081
    A_down: float = 0.36833
    gamma_up: float = 12.44625
    gamma_down: float = 12.78785
    a: float = 0.244
    b: float = 0.2425

    code: ClassVar[int] = K.EXP

    def __post_init__(self):
        super().__post_init__()
        for f in ("A_up", "A_down", "gamma_up", "gamma_down", "a", "b"):
            number(getattr(self, f), f"{type(self).__name__}.{f}", finite=True)

    def kernel_parameters(self):
        par = super().kernel_parameters()
        par[K.ES_A], par[K.ES_B] = self.a, self.b
        par[K.ES_A_UP], par[K.ES_A_DOWN] = self.A_up, self.A_down
        par[K.ES_GAMMA_UP], par[K.ES_GAMMA_DOWN] = self.gamma_up, self.gamma_down
        return par


# ------------------------------------------------------------------------------------ NeuroSim
_NL_SLOPE = 0.07 * math.sqrt(2.0)  # max_x (u(x) - x) = _NL_SLOPE |NL|, see neurosim_a
NL_MAX = 9.0  # NeuroSim's getParamA table covers |NL| = 0.01 .. 9


@functools.lru_cache(maxsize=None)
def neurosim_a(nl: float) -> float:
    """NeuroSim's normalised parameter A (A / P_max, signed as NL) of the nonlinearity label NL;
    inf for NL = 0 (linear).

    With x = P/P_max and a = A/P_max, the normalised curve u(x) = (1 - e^{-x/a})/(1 - e^{-1/a}) has
    its largest deviation from the line, max_x (u - x) = 1/c - a + a ln(a c), c = 1 - e^{-1/a}, at
    x* = -a ln(a c). a is solved (bisection in ln a) from max_x (u - x) = 0.07 sqrt(2) |NL|: the relation
    that reproduces NeuroSim's ``getParamA`` table (MLP_NeuroSim V3.0 formula.cpp, normalised A for
    NL = 0.01 .. 9 in steps of 0.01) to its printed digits (checked in the tests). NeuroSim looks the
    label up after truncating it to 0.01 (e.g. 0.105 -> 0.10); here it is used as given.
    """
    if nl == 0.0:
        return math.inf
    target = _NL_SLOPE * abs(nl)

    def dev(a):
        c = -math.expm1(-1.0 / a)
        return 1.0 / c - a + a * math.log(a * c)

    lo, hi = math.log(1e-3), math.log(1e6)  # dev is decreasing in a: dev(1e-3) ~ 0.993, dev(1e6) ~ 1e-7
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if dev(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.copysign(math.exp(0.5 * (lo + hi)), nl)


@dataclass(frozen=True)
class NeuroSimNonlinear(UpdateModel):
    """NeuroSim's nonlinear device (RealDevice of MLP_NeuroSim V3.0, Chen, Peng & Yu, IEEE TCAD 2018).

    Conductance G in [G_min, G_max], G_max = 1, G_min = 1/on_off; weight w = w_min + (w_max - w_min)
    (G - G_min)/(G_max - G_min). Both directions follow G(P) = B (1 - e^{-P/A}) + G_min, B = (G_max -
    G_min)/(1 - e^{-P_max/A}), P in [0, P_max = states], each with its own A = neurosim_a(NL) P_max
    signed as its label (NeuroSim's paramALTP/paramALTD from getParamA; NL = 0: linear). An update of
    n pulses finds the pulse position P = G^-1(G) on the curve of its direction and moves to G(P + n)
    (up) or G(P - n) (down), as NeuroSim's RealDevice::Write; the LTD curve is therefore the same law
    with A_down: a negative label (A < 0) makes G(P) convex, i.e. the point mirror of the LTP curve
    (steps largest just below G_max), a positive one concave (steps largest near G_min). Cycle-to-
    cycle noise c2c (G_max - G_min) sqrt(|n|) xi is added to G once per update, then G is clipped to
    [G_min, G_max]. The pulse count uses dw_step = (w_max - w_min)/states (NeuroSim:
    numPulse = round(dw/(w_max - w_min) P_max)), capped at ``max_pulses``. No device-to-device
    variation (NeuroSim's default sigmaDtoD = 0). The weight dynamics do not depend on ``on_off``
    (it only scales the conductances of ``curve``). Defaults: the Ag:a-Si device of docs/equations.md, section 6.7.
    """

    states: int = 97
    nl_up: float = 2.4
    nl_down: float = -4.88
    on_off: float = 12.5
    c2c: float = 0.035
    max_pulses: int = 31
    w_min: float = -1.0
    w_max: float = 1.0

    code: ClassVar[int] = K.NEUROSIM
    scalable: ClassVar[tuple] = ("c2c",)
    units: ClassVar[dict] = {"states": "pulses", "c2c": "x (G_max - G_min)", "max_pulses": "pulses",
                             "w_min": "device units", "w_max": "device units"}

    def __post_init__(self):
        c = type(self).__name__
        integer(self.states, f"{c}.states", minimum=2)
        for f in ("nl_up", "nl_down"):
            if abs(number(getattr(self, f), f"{c}.{f}", finite=True)) > NL_MAX:
                raise SubstrateValueError(f"{c}.{f}={getattr(self, f)!r} must be in [-{NL_MAX:g}, {NL_MAX:g}] (NeuroSim's table)")
        if not positive(self.on_off, f"{c}.on_off", allow_inf=True) > 1.0:
            raise SubstrateValueError(f"{c}.on_off={self.on_off!r} must be > 1 (G_max/G_min)")
        nonnegative(self.c2c, f"{c}.c2c")
        integer(self.max_pulses, f"{c}.max_pulses", minimum=1)
        if not number(self.w_min, f"{c}.w_min", finite=True) < number(self.w_max, f"{c}.w_max", finite=True):
            raise SubstrateValueError(f"{c}.w_min={self.w_min!r} must be < w_max={self.w_max!r}")

    # -- the curve
    @property
    def g_min(self) -> float:
        """The lowest conductance relative to the highest, 1 / on_off."""
        return 1.0 / self.on_off

    @property
    def dw_step(self) -> float:
        return (self.w_max - self.w_min) / self.states

    def param_a(self, direction: str) -> float:
        """NeuroSim's A (in pulses, signed) of the ``"up"`` (LTP) or ``"down"`` (LTD) curve; inf if linear."""
        nl = self.nl_up if self._direction(direction) else self.nl_down
        return neurosim_a(float(nl)) * self.states

    def conductance(self, p, direction: str) -> np.ndarray:
        """G(P) on the curve of ``direction`` (noise-free, unclipped)."""
        inv_a = 1.0 / self.param_a(direction)
        p = np.asarray(p, dtype=np.float64)
        u = p / self.states if inv_a == 0.0 else np.expm1(-p * inv_a) / math.expm1(-self.states * inv_a)
        return self.g_min + (1.0 - self.g_min) * u

    def position(self, g, direction: str) -> np.ndarray:
        """The pulse position P of the conductance G on the curve of ``direction`` (inverse of conductance)."""
        inv_a = 1.0 / self.param_a(direction)
        u = (np.asarray(g, dtype=np.float64) - self.g_min) / (1.0 - self.g_min)
        return u * self.states if inv_a == 0.0 else -np.log1p(u * math.expm1(-self.states * inv_a)) / inv_a

    def curve(self, direction: str = "up", weight: bool = False) -> np.ndarray:
        """The noise-free conductance (or weight, if ``weight``) after 0..states pulses: up from G_min
        along the LTP curve, or down from G_max along the LTD curve. Shape (states + 1,)."""
        k = np.arange(self.states + 1, dtype=np.float64)
        g = self.conductance(k if self._direction(direction) else self.states - k, direction)
        return self.weight(g) if weight else g

    def weight(self, g) -> np.ndarray:
        """The weight of the conductance G."""
        return self.w_min + (self.w_max - self.w_min) * (np.asarray(g, dtype=np.float64) - self.g_min) / (1.0 - self.g_min)

    def _direction(self, direction) -> bool:
        if direction not in ("up", "down"):
            raise SubstrateValueError(f"{type(self).__name__}: direction={direction!r}; allowed: 'up', 'down'")
        return direction == "up"

    # -- the interface
    def devices(self, shape, rng):
        shape = _shape(shape, f"{type(self).__name__}.devices(shape)")
        return {"dw_up": np.full(shape, self.dw_step), "dw_down": np.full(shape, self.dw_step),
                "w_min": np.full(shape, float(self.w_min)), "w_max": np.full(shape, float(self.w_max))}

    def kernel_parameters(self):
        par = super().kernel_parameters()
        par[K.STD] = self.c2c
        par[K.NS_INV_A_UP] = 1.0 / self.param_a("up")
        par[K.NS_INV_A_DOWN] = 1.0 / self.param_a("down")
        par[K.NS_P_MAX] = self.states
        return par


UPDATE_MODELS = (ConstantStep, SoftBounds, LinearStep, ExpStep, NeuroSimNonlinear)

# ------------------------------------------------------------------------------------ presets
_GOKMEN = "Gokmen & Vlasov, Front. Neurosci. 10, 333 (2016)"
_NEUROSIM = ("NeuroSim device table (docs/equations.md, section 6.7; MLP_NeuroSim V3.0, Chen, Peng & Yu, "
             "IEEE TCAD 37, 3067 (2018))")


def _neurosim(states, nl_up, nl_down, on_off, c2c):
    return NeuroSimNonlinear(states=states, nl_up=nl_up, nl_down=nl_down, on_off=on_off, c2c=c2c)


# name: (model, citation). From aihwkit's presets (simulator/presets/devices.py) and NeuroSim's device
# table. aihwkit's PCMPresetDevice (Nandakumar et al. 2020: exponential step, one-directional, used as a
# plus-minus pair with refresh, complex c2c noise) is left out: it needs a unit cell of two one-sided
# devices, not a single update model.
UPDATE_PRESETS: dict[str, tuple[UpdateModel, str]] = {
    "reram_sb": (
        SoftBounds(dw_min=0.002, up_down=0.0, w_max=1.25, w_min=-0.75, mult_noise=False, dw_min_dtod=0.3,
                   up_down_dtod=0.01, w_max_dtod=0.3 / 1.25, w_min_dtod=0.3 / 0.75, dw_min_std=3.75),
        "aihwkit ReRamSBPresetDevice, loose fit to Gong et al., Nat. Commun. 9, 2102 (2018); c2c 3.75 dw_min "
        "additive; bound spreads 0.3/1.25 and 0.3/0.75 relative (0.3 absolute), as aihwkit; not modelled: "
        "write_noise_std = 56 dw_min and the reference device (SoftBoundsReferenceDevice) whose subtraction "
        "puts the symmetry point at 0"),
    "reram_es": (
        ExpStep(dw_min=0.00135, up_down=0.259359, w_max=1.0, w_min=-1.0, a=-0.5, b=-0.5, gamma_up=5.0,
                gamma_down=5.0, A_up=-1.18445, A_down=-0.081404, dw_min_dtod=0.2, up_down_dtod=0.05,
                w_max_dtod=0.3, w_min_dtod=0.3, dw_min_std=5.0),
        "aihwkit ReRamESPresetDevice, fit to Gong et al., Nat. Commun. 9, 2102 (2018); not modelled: "
        "write_noise_std = 75 dw_min"),
    "ecram": (
        LinearStep(dw_min=0.002, up_down=0.0, w_max=1.1724, w_min=-0.8276, mult_noise=True, gamma_up=0.1153,
                   gamma_down=0.5085, dw_min_dtod=0.1, up_down_dtod=0.01, w_max_dtod=0.05, w_min_dtod=0.05,
                   gamma_up_dtod=0.05, gamma_down_dtod=0.05, dw_min_std=0.3),
        "aihwkit EcRamPresetDevice, fit to Tang et al., IEDM 2018 (Li-ion ECRAM), range shifted so that "
        "the symmetry point is at 0"),
    "capacitor": (
        LinearStep(dw_min=0.005, up_down=0.0, w_max=1.0, w_min=-1.0, mult_noise=False, gamma_up=0.05,
                   gamma_down=0.05, dw_min_dtod=0.1, up_down_dtod=0.06, w_max_dtod=0.07, w_min_dtod=0.07,
                   gamma_up_dtod=0.01, gamma_down_dtod=0.01, dw_min_std=0.3),
        "aihwkit CapacitorPresetDevice, fit to Li et al., VLSI 2018; the capacitor leak (lifetime 1e6 "
        "updates, +-30 % device-to-device) is ignored"),
    "gokmen_vlasov": (
        ConstantStep(dw_min=0.0016, dw_min_dtod=0.3, dw_min_std=0.3, up_down=0.0, up_down_dtod=0.01,
                     w_max=1.0, w_min=-1.0, w_max_dtod=0.3, w_min_dtod=0.3),
        f"aihwkit GokmenVlasovPresetDevice, {_GOKMEN} (~1200 states on -1..1)"),
    "idealized": (
        ConstantStep(dw_min=0.0002, dw_min_dtod=0.3, dw_min_std=0.3, up_down=0.0, up_down_dtod=0.0,
                     w_max=1.0, w_min=-1.0, w_max_dtod=0.3, w_min_dtod=0.3),
        f"aihwkit IdealizedPresetDevice, {_GOKMEN} with no up/down asymmetry and ~10000 states "
        "(Rasch, Gokmen & Haensch, IEEE Design & Test 2019)"),
    "neurosim_ag_a_si": (_neurosim(97, 2.4, -4.88, 12.5, 0.035),
                         f"Ag:a-Si (Jo et al., Nano Lett. 10, 1297 (2010)); {_NEUROSIM}"),
    "neurosim_taox_hfox": (_neurosim(128, 0.04, -0.63, 10.0, 0.037), f"TaOx/HfOx RRAM; {_NEUROSIM}"),
    "neurosim_pcmo": (_neurosim(50, 3.68, -6.76, 6.84, 0.01),
                      f"PCMO (Pr0.7Ca0.3MnO3) RRAM; {_NEUROSIM}; c2c '<1 %' taken as 1 %"),
    "neurosim_alox_hfo2": (_neurosim(40, 1.94, -0.61, 4.43, 0.05), f"AlOx/HfO2 RRAM; {_NEUROSIM}"),
    "neurosim_gst_pcm": (_neurosim(100, 0.105, 2.4, 19.8, 0.015),
                         f"GST PCM; {_NEUROSIM}; the table's 100-120 states taken as 100 for both directions"),
    "neurosim_epiram": (_neurosim(64, 0.5, -0.5, 50.2, 0.02),
                        f"EpiRAM (SiGe epitaxial RAM, Choi et al., Nat. Mater. 17, 335 (2018)); {_NEUROSIM}"),
    "neurosim_hzo_fefet": (_neurosim(32, 1.75, 1.46, 45.0, 0.005),
                           f"HZO FeFET; {_NEUROSIM}; c2c '<0.5 %' taken as 0.5 %"),
}
