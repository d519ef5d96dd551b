"""The objects and training runs tests/test_persist.py saves and resumes, importable without torch (its
SIGKILL test runs a training in a fresh process from here)."""

import numpy as np

from models import ep
from models.data import Dataset
from models.homeostasis import Homeostasis
from models.train import SGD, Adam, Classifier, train
from substrate import devices as D
from substrate import persist


def assert_same(a, b, where="object"):
    """a and b equal bit for bit: arrays by dtype, shape and bytes, generators by state, floats by bits."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), f"{where}: arrays differ"
    elif isinstance(a, np.random.Generator):
        assert a.bit_generator.state == b.bit_generator.state, f"{where}: generator states differ"
    elif isinstance(a, (float, np.floating)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# devices whose state covers every kind of draw: conductances (programming, stuck-at, drift exponents),
# the kernel's streams, per-sample and per-equilibrium read noise, pulsed devices
DEVICES = {
    "conductances": D.Device((D.ConductanceMapping(g_max=25.0, on_off=100.0), D.Quantisation(32),
                              D.ProgrammingNoise(scale=2.0), D.StuckAt(0.1), D.Drift(nu_dtod=0.1),
                              D.ReadNoise(0.05, policy="phase"), D.TauMismatch(0.2))),
    "pcm": D.preset("pcm_inference"),
    "in_kernel": D.Device((D.ReadNoise(0.05, policy="step"), D.IOChain(), D.StateNoise(0.01),
                           D.ActivationMismatch(), D.IndependentFeedback())),
    "per_sample": D.Device((D.ReadNoise(0.05, policy="sample"),)),
    "equilibrium": D.Device((D.PCMReadNoise(policy="equilibrium"), D.ConductanceMapping())),
    "pulsed": D.Device((D.SoftBounds(dw_min=0.01), D.ReadNoise(0.02)), weight_scale=1.0),
}


def toy_data():
    rng = np.random.default_rng(11)
    x = rng.random((32, 4))
    y = (x[:, 0] + x[:, 1] > 1.0).astype(np.int64) + (x[:, 2] > 0.7)
    return Dataset("toy", x[:24], y[:24], x[24:], y[24:], 3, (4,))


def toy_model(device):
    rng = np.random.default_rng(12)
    if device is None:
        return Classifier.layered([4, 6, 5, 3], rng, cost="cross_entropy")
    model = Classifier.layered([4, 6, 3], rng, cost="squared_error")
    return Classifier(D.attach(model.network, DEVICES[device], rng), model.cost)


# (device, optimiser, checkpoint_every, homeostasis: its stochastic probes draw from train's generator)
CASES = {"adam": (None, lambda: Adam(0.02), 1, Homeostasis(0.1, draws=2)),
         "device_sgd": ("conductances", lambda: SGD(0.2, 0.9), 2, None),
         "pulsed": ("pulsed", lambda: SGD(0.2), 1, None)}


def run(case, epochs, **kw):
    device, optimiser, _, homeostasis = CASES[case]
    model, opt, rng = toy_model(device), optimiser(), np.random.default_rng(13)
    hist = train(model, toy_data(), rule=ep.Centred(0.2), optimiser=opt, epochs=epochs, batch_size=10, rng=rng,
                 relaxation=ep.Relaxation(tol=1e-5, on_failure="record"), probe=8, homeostasis=homeostasis,
                 progress=False, **kw)
    return model, opt, rng, hist


def assert_same_training(a, b):
    (m1, o1, r1, h1), (m2, o2, r2, h2) = a, b
    assert_same(m1.parameters(), m2.parameters(), "parameters")
    assert_same(o1.state, o2.state, "optimiser state")
    assert_same(r1, r2, "rng")
    assert_same({k: v for k, v in h1.arrays().items() if k != "seconds"},
                {k: v for k, v in h2.arrays().items() if k != "seconds"}, "history")
    if isinstance(m1.network, D.DeviceNetwork):
        assert_same(persist.device_state(m1.network), persist.device_state(m2.network), "device")
