"""Device imperfections (docs/equations.md, section 6): small effect classes composed into a
:class:`Device`, and :func:`attach`, which runs a network on a device.

    from substrate import devices
    dev = devices.Device((devices.ConductanceMapping(), devices.ProgrammingNoise(),
                          devices.ReadNoise(0.02, policy="equilibrium")))
    hw = devices.attach(net, dev, np.random.default_rng(0))   # a Network: relax(hw, x), EP, ...
    hw.advance(3600.0)                                         # an hour of drift

``devices.PRESETS`` holds the published device models (``substrate devices`` lists them).
"""

from .base import Effect, stream
from .device import Crossbar, Device, DeviceNetwork, Neurons, attach
from .effects import (READ_POLICIES, ActivationMismatch, ConductanceMapping, Drift, DriftEffect,
                      DynamicsEffect, IndependentFeedback, IOChain, PCMReadNoise, ProgramEffect,
                      ProgrammingNoise, Quantisation, ReadEffect, ReadNoise, RelaxationTime, StateNoise,
                      StuckAt, TauMismatch)
from .presets import PRESETS, preset
from .stepping import StepEffect, register
from .update import (UPDATE_PRESETS, ConstantStep, ExpStep, LinearStep, NeuroSimNonlinear, PulsedDevice,
                     SoftBounds, UpdateModel)

# every effect class by name, for configs
EFFECTS = {"conductance_mapping": ConductanceMapping, "quantisation": Quantisation,
           "programming_noise": ProgrammingNoise, "stuck_at": StuckAt, "drift": Drift, "read_noise": ReadNoise, "pcm_read_noise": PCMReadNoise,
           "io_chain": IOChain, "tau_mismatch": TauMismatch, "activation_mismatch": ActivationMismatch,
           "state_noise": StateNoise, "relaxation_time": RelaxationTime, "independent_feedback": IndependentFeedback}

__all__ = ["ActivationMismatch", "ConductanceMapping", "ConstantStep", "ExpStep", "LinearStep",
           "NeuroSimNonlinear", "PRESETS", "PulsedDevice", "SoftBounds", "UPDATE_PRESETS", "UpdateModel", "preset", "Crossbar", "Device", "DeviceNetwork", "Drift",
           "DriftEffect", "DynamicsEffect", "EFFECTS", "Effect", "IndependentFeedback", "IOChain", "Neurons",
           "PCMReadNoise", "ProgramEffect", "ProgrammingNoise", "Quantisation", "READ_POLICIES",
           "ReadEffect", "ReadNoise", "RelaxationTime", "StateNoise", "StepEffect", "StuckAt", "TauMismatch",
           "attach", "register", "stream"]
