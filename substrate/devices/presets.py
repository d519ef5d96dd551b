"""Published device models as :class:`~substrate.devices.Device` presets, each with its source
(docs/equations.md, section 6; ``substrate devices`` lists them with every parameter).

* ``ideal``: no effects (bit-identical to the network without a device).
* ``pcm_inference``: aihwkit's inference model of PCM (InferenceRPUConfig defaults with
  PCMLikeNoiseModel, g_max 25 uS): differential conductance mapping, programming noise, drift with
  conductance-dependent exponents and global compensation, accumulated 1/f read noise (drawn per
  equilibrium: aihwkit draws it once per evaluation), the IO chain (7-bit DAC, 9-bit ADC, output
  noise 0.06). Its output noise never lets a phase settle below ~0.06 w_max, so the preset reads
  the circuit after a finite relaxation time of 40 tau (our choice: the studies' ideal circuits
  converge to 1e-6 within it).
* aihwkit training devices (pulsed updates; weights in device units, ``weight_scale`` 1):
  ``reram_sb``, ``reram_es``, ``ecram``, ``capacitor``, ``gokmen_vlasov``, ``idealized``;
  ``rram`` is an alias of ``reram_sb``.
* NeuroSim's devices (nonlinear pulsed updates, weights on [-1, 1]): ``neurosim_ag_a_si``,
  ``neurosim_taox_hfox``, ``neurosim_pcmo``, ``neurosim_alox_hfo2``, ``neurosim_gst_pcm``,
  ``neurosim_epiram``, ``neurosim_hzo_fefet``.
"""

from __future__ import annotations

from ..errors import SubstrateValueError
from .device import Device
from .effects import (ConductanceMapping, Drift, IOChain, PCMReadNoise, ProgrammingNoise,
                      RelaxationTime)
from .update import UPDATE_PRESETS

_AIHWKIT_PCM = ("aihwkit PCMLikeNoiseModel (Nandakumar et al., J. Appl. Phys. 124, 152135 (2018); "
                "Joshi et al., Nat. Commun. 11, 2473 (2020)) with aihwkit's IOParameters defaults")

PRESETS: dict[str, Device] = {
    "ideal": Device((), name="ideal", citation="no device effects"),
    "pcm_inference": Device(
        (ConductanceMapping(g_max=25.0), ProgrammingNoise(), Drift(compensation=True),
         PCMReadNoise(policy="equilibrium"), IOChain(), RelaxationTime(40.0)),
        name="pcm_inference", citation=_AIHWKIT_PCM),
}
PRESETS.update({name: Device((model,), name=name, citation=cite) for name, (model, cite) in UPDATE_PRESETS.items()})
PRESETS["rram"] = Device(PRESETS["reram_sb"].effects, name="rram", citation=PRESETS["reram_sb"].citation)


def alias_of(name: str) -> str | None:
    """The first preset listed before ``name`` with the same definition (effects and weight scale), or
    None (``rram`` is an alias of ``reram_sb``)."""
    names = list(PRESETS)
    dev = PRESETS[name]
    return next((k for k in names[:names.index(name)]
                 if PRESETS[k].effects == dev.effects and PRESETS[k].weight_scale == dev.weight_scale), None)


def preset(name: str) -> Device:
    """The preset device ``name`` (see ``PRESETS``)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise SubstrateValueError(f"name: device preset {name!r} is unknown; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]
