"""Saving the local rules' models (substrate.save / substrate.load): counter-current's two circuits,
Forward-Forward's stack, NoProp's blocks and readout (predictive coding's is a Classifier, saved
already). A loaded model has the same parameters, bit for bit, and evaluates to the same numbers; on a
device, its programmed state too."""

import numpy as np
import pytest

from models import data, ep
from models.local import ccl, noprop
from models.local import forward_forward as ff
from substrate import devices, load, save

REL = ep.Relaxation(tol=1e-10)


def _models():
    rng = np.random.default_rng(0)
    return {"counter_current": ccl.CounterCurrentModel.layered([64, 6, 10], rng),
            "forward_forward": ff.ForwardForwardModel.layered([64, 6, 5, 10], rng, label="append",
                                                              normalise_input=True),
            "noprop_dt": noprop.NoPropDT().model([64, 6, 10], rng, blocks=2),
            "noprop_ct": noprop.NoPropCT().model([64, 6, 10], rng, steps=2)}


@pytest.mark.parametrize("name", sorted(_models()))
@pytest.mark.parametrize("device", [None, "programmed"])
def test_a_saved_local_model_loads_equal(tmp_path, name, device):
    model = _models()[name]
    if name.startswith("noprop"):
        model.readout_weight[...] = np.random.default_rng(1).normal(size=model.readout_weight.shape)
    if device:
        chip = devices.Device((devices.ConductanceMapping(), devices.ProgrammingNoise()))
        rng = np.random.default_rng(2)
        if hasattr(model, "on_device"):
            model = model.on_device(chip, rng)
        else:
            model.network = devices.attach(model.network, chip, rng)
    save(model, tmp_path / "m.h5")
    back = load(tmp_path / "m.h5")
    assert type(back) is type(model)
    params, loaded = model.parameters(), back.parameters()
    assert sorted(params) == sorted(loaded)
    for k, v in params.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)
    d = data.load("digits").subset(10, 20)
    assert back.evaluate(d.x_test, d.y_test, REL) == model.evaluate(d.x_test, d.y_test, REL)
