"""Save and reload (substrate.persist, train's checkpoints): every kind comes back bit for bit and
behaves as the original (a reloaded chip continues its noise and drift exactly); the files hold only
numbers, text and JSON (h5py alone reads them); damaged, foreign and newer files are refused; a killed
training resumed from its checkpoint ends bit-identical to an uninterrupted one, and a crash while a
checkpoint is written leaves the previous one."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import h5py
import numpy as np
import pytest
import torch

import substrate as S
from models import dpm, ep, pvrnn
from models.train import SGD, Adam, Checkpoint, Classifier, train
from persist_cases import CASES, DEVICES, assert_same, assert_same_training, run, toy_data, toy_model
from substrate import ArchiveError, SubstrateValueError, archive, persist
from substrate import devices as D


# ------------------------------------------------------------------------------------ helpers
def file_tree(path):
    """{object name: (attributes, data)} of a whole file (the checksum attributes included)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            data = np.asarray(obj[()]) if isinstance(obj, h5py.Dataset) else None
            out[name] = (dict(obj.attrs), None if data is None else (data.dtype, data.tobytes()))
        visit("/", f)
        f.visititems(visit)
    return out


def round_trip(obj, tmp_path, **kw):
    """save -> load -> save: the two files must hold the same objects, attributes and bytes."""
    first = S.save(obj, tmp_path / "first.h5", **kw)
    back = S.load(first)
    second = S.save(back, tmp_path / "second.h5", **kw)
    a, b = file_tree(first), file_tree(second)
    assert a.keys() == b.keys()
    for name in a:
        assert_same(a[name][0], b[name][0], f"{name} attrs")
        assert a[name][1] == b[name][1], f"{name} data"
    return back


def network(dtype="float64", seed=0):
    return S.Network.layered([4, 6, 3], np.random.default_rng(seed), lateral=True, dtype=dtype, init_scale=1.5)


X = np.random.default_rng(5).random((5, 4))


# ------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex128"])
def test_network_round_trip(tmp_path, dtype):
    net = network(dtype)
    back = round_trip(net, tmp_path)
    assert repr(back) == repr(net) and back.dtype == net.dtype
    for x, y in zip(net.layers, back.layers):
        assert_same(x.tau, y.tau), assert_same(x.bias, y.bias)
        assert (x.name, x.size, x.activation) == (y.name, y.size, y.activation)
    for c, d in zip(net.connections, back.connections):
        assert (c.pre, c.post, c.tied) == (d.pre, d.post, d.tied)
        assert_same(c.weight, d.weight), assert_same(c.mask, d.mask)
    assert_same(S.relax(net, X, dtype=dtype).u, S.relax(back, X, dtype=dtype).u)


def test_explicit_network_round_trip(tmp_path):
    """Per-neuron time constants, a tied connection, a mask and two inputs come back as they were."""
    rng = np.random.default_rng(1)
    net = S.Network([S.Layer("h", 5, tau=rng.uniform(1, 2, 5), activation="tanh", bias=rng.normal(size=5)),
                     S.Layer("y", 2, tau=3.0, activation="hard_sigmoid")],
                    [S.Connection("a", "h", rng.normal(size=(5, 3))), S.Connection("b", "h", rng.normal(size=(5, 1))),
                     S.Connection("h", "y", rng.normal(size=(2, 5))), S.Connection("y", "h", tied=True),
                     S.Connection("h", "h", rng.normal(size=(5, 5)), mask=1 - np.eye(5))],
                    inputs=[S.Input("a", 3), S.Input("b", 1)])
    back = round_trip(net, tmp_path)
    assert back.connection("y->h").tied and back.connection("y->h").weight is None
    assert isinstance(back.layer("y").tau, float) and back.layer("h").tau.shape == (5,)
    x = {"a": rng.random((4, 3)), "b": rng.random((4, 1))}
    assert_same(S.relax(net, x).u, S.relax(back, x).u)


@pytest.mark.parametrize("cost", ["cross_entropy", "squared_error"])
def test_classifier_round_trip(tmp_path, cost):
    model = Classifier.layered([4, 6, 5, 3], np.random.default_rng(2), cost=cost)
    back = round_trip(model, tmp_path)
    assert isinstance(back, Classifier) and (back.cost.layer, back.cost.kind) == (model.cost.layer, model.cost.kind)
    assert_same(model.parameters(), back.parameters())
    relaxation = ep.Relaxation(tol=1e-6)
    assert_same(model.output(ep.free_phase(model.network, X, relaxation).u),
                back.output(ep.free_phase(back.network, X, relaxation).u))


# ------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("name", DEVICES)
def test_device_network_continues_bit_identically(tmp_path, name):
    """Relax twice on the original, or once, save, reload and relax once: the second relaxation has
    the same bits (the read noise streams, held draws and devices continue); so does a drift of an
    hour, and a training write (re-programming, or pulses) after it."""
    hw = D.attach(network(), DEVICES[name], np.random.default_rng(3))
    hw.advance(50.0)
    method = dict(method="euler", dt=0.5, max_steps=200, on_failure="return")
    S.relax(hw, X, **method)
    back = round_trip(hw, tmp_path)
    assert back.device == hw.device and back.seed == hw.seed and back.clock == hw.clock
    assert_same(persist.device_state(hw), persist.device_state(back))
    if name == "equilibrium":
        hw.new_equilibrium(), back.new_equilibrium()
    assert_same(S.relax(hw, X, **method).u, S.relax(back, X, **method).u)
    hw.advance(3600.0), back.advance(3600.0)
    assert_same(S.relax(hw, X, **method).u, S.relax(back, X, **method).u)
    for net in (hw, back):
        w = net.connections[0].weight
        w += 0.01 * np.sign(w)
        net.write()
    assert_same(S.relax(hw, X, **method).u, S.relax(back, X, **method).u)
    assert_same(persist.device_state(hw), persist.device_state(back))


def test_every_preset_round_trips(tmp_path):
    """Every published device model (substrate.devices.PRESETS) is saved and found again, effect by
    effect, and the reloaded chip reads as the saved one."""
    method = dict(method="euler", dt=0.5, max_steps=100, on_failure="return")
    for name in D.PRESETS:
        hw = D.attach(network(), D.preset(name), np.random.default_rng(3))
        S.relax(hw, X, **method)
        back = S.load(S.save(hw, tmp_path / f"{name}.h5"))
        assert back.device == hw.device, name
        assert_same(S.relax(hw, X, **method).u, S.relax(back, X, **method).u, name)


def test_classifier_on_a_device_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    model = Classifier.layered([4, 6, 5, 3], rng, cost="cross_entropy")
    model = Classifier(D.attach(model.network, DEVICES["conductances"], rng), model.cost)
    back = round_trip(model, tmp_path)
    assert isinstance(back.network, D.DeviceNetwork) and back.network.nominal is not model.network.nominal
    relaxation = ep.Relaxation(tol=1e-6, on_failure="record")
    assert_same(model.evaluate(X, np.array([0, 1, 2, 0, 1]), relaxation),
                back.evaluate(X, np.array([0, 1, 2, 0, 1]), relaxation))


def test_custom_effect_round_trip(tmp_path):
    """A device effect defined outside substrate (the README's LineGain) is saved by its class name and
    parameters, and found again when it is defined where the file is loaded."""

    @dataclass(frozen=True)
    class LineGain(D.ProgramEffect):
        sigma: float = 0.05

        def program(self, g, crossbar, rng):
            return g * crossbar.fixed(self, lambda: 1.0 + self.sigma * rng.standard_normal(g.shape[1]))[None, :, None]

    hw = D.attach(network(), D.Device((LineGain(0.1), D.ReadNoise(0.02))), np.random.default_rng(6))
    back = round_trip(hw, tmp_path)
    assert type(back.device.effects[0]) is LineGain and back.device == hw.device
    assert_same(S.relax(hw, X).u, S.relax(back, X).u)
    with h5py.File(tmp_path / "first.h5", "r+") as f:  # an effect this program does not define
        f["device"].attrs["config"] = f["device"].attrs["config"].replace("LineGain", "NoSuchGain")
        archive.seal(f)
    with pytest.raises(ArchiveError, match="first.h5: does not hold a valid DeviceNetwork .*device effect 'NoSuchGain' "
                                           ".*not defined in this program; define or import it before loading"):
        S.load(tmp_path / "first.h5")


# ------------------------------------------------------------------------------------ models
def test_pvrnn_round_trip_with_its_adaptive_vectors(tmp_path):
    rng = np.random.default_rng(7)
    net = pvrnn.PVRNN([pvrnn.PVLayer(5, 2, tau=2.0, w=1e-3), pvrnn.PVLayer(3, 1, tau=4.0)], outputs=2, rng=rng,
                      substeps=2, method="exp_euler", posterior_weights=True)
    x = rng.uniform(-0.5, 0.5, (2, 6, 2))
    A, _ = pvrnn.train(net, x, epochs=3, rng=rng, lr=0.01, progress=False)
    first = S.save(net, tmp_path / "pv.h5", extra={"A": A, "note": "three epochs", "epochs": 3})
    back, extra = S.load(first, extra=True)
    assert S.load(first).__class__ is pvrnn.PVRNN
    assert back.layers == net.layers and (back.substeps, back.method, back.posterior_weights) == (2, "exp_euler", True)
    assert_same(net.params, back.params)
    assert_same(extra, {"A": A, "note": "three epochs", "epochs": 3})
    eps = net.noise(2, 6, np.random.default_rng(8))
    F, _, gp, gA = net.free_energy(x, A, eps)
    F2, _, gp2, gA2 = back.free_energy(x, extra["A"], eps)
    assert_same((F, gp, gA), (F2, gp2, gA2))


def test_noise_predictor_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    model = dpm.NoisePredictor(2, classes=3, hidden=8, depth=2, embed=4, frequencies=2, generator=g,
                               schedule=dpm.VPSchedule(0.2, 15.0, 2e-3))
    x = torch.randn(64, 2, dtype=torch.float64, generator=g) * torch.tensor([1.0, 0.3], dtype=torch.float64)
    dpm.train(model, model.schedule, x, np.arange(64) % 3, steps=3, batch=16, generator=g, progress=False)
    global_state = torch.random.get_rng_state()
    back = round_trip(model, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), global_state)  # loading draws nothing from torch's generator
    assert back.schedule == model.schedule and back.gaussian_skip and back.classes == 3
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and v.dtype == v2.dtype and torch.equal(v, v2), k
    assert not torch.equal(back.data_axes, torch.eye(2, dtype=torch.float64))  # the data's fit, recorded by train
    xt, t = torch.randn(5, 2, dtype=torch.float64, generator=g), torch.full((5, 1), 0.3, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(xt, t, model.embedding(1)), back(xt, t, back.embedding(1)))


@pytest.mark.parametrize("optimiser", [SGD(0.1, 0.9), Adam(0.01, beta1=0.8)])
def test_optimiser_round_trip(tmp_path, optimiser):
    rng = np.random.default_rng(9)
    params = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
    optimiser.step(params, {k: rng.normal(size=v.shape) for k, v in params.items()})
    back = round_trip(optimiser, tmp_path)
    assert type(back) is type(optimiser) and vars(back).keys() == vars(optimiser).keys()
    assert_same(optimiser.state, back.state)
    grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
    mine, theirs = {k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in params.items()}
    optimiser.step(mine, grads), back.step(theirs, grads)
    assert_same(mine, theirs)


def test_load_imports_the_module_of_a_kind(tmp_path):
    """A Classifier saved here loads in a fresh process that imported substrate alone: load imports
    models.train, which registers the kind."""
    path = S.save(Classifier.layered([4, 6, 5, 3], np.random.default_rng(2)), tmp_path / "c.h5")
    code = ("import sys, substrate; assert 'models.train' not in sys.modules; "
            f"m = substrate.load({str(path)!r}); print(type(m).__module__, type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["models.train", "Classifier"]


# ------------------------------------------------------------------------------------ the files
def test_files_hold_only_numbers_text_and_json(tmp_path):
    """h5py alone reads everything: no object, opaque or compound datasets (nothing pickled); every
    attribute is a string or a number, and the JSON ones parse."""
    rng = np.random.default_rng(10)
    model = Classifier.layered([4, 6, 5, 3], rng)
    model = Classifier(D.attach(model.network, DEVICES["in_kernel"], rng), model.cost)
    S.relax(model.network, X, max_steps=50, on_failure="return")  # draws from the kernel's streams
    path = S.save(model, tmp_path / "m.h5", extra={"key": (1, "a"), "rng": np.random.default_rng(0)})
    with h5py.File(path, "r") as f:
        assert (f.attrs["format"], f.attrs["format_version"], f.attrs["kind"]) == ("substrate-object", 1, "Classifier")
        assert f.attrs["module"] == "models.train" and f.attrs["substrate"] == S.__version__
        assert f["network"].attrs["kind"] == "DeviceNetwork" and f["network/nominal"].attrs["kind"] == "Network"
        seen = []

        def check(name, obj):
            seen.append(name)
            if isinstance(obj, h5py.Dataset):
                assert obj.dtype.kind in "biufcS", f"{name}: {obj.dtype}"
                assert h5py.check_string_dtype(obj.dtype) is None or obj.dtype.kind == "S"
            for k, v in obj.attrs.items():
                assert isinstance(v, (str, np.integer)), f"{name}.{k}: {type(v)}"
                if k in ("config", "keys", "state"):
                    json.loads(v)

        f.visititems(check)
        assert "network/state" in seen and "extra" in seen
        rng_state = json.loads(f["network/state"][str(json.loads(f["network/state"].attrs["keys"]).index("_held_rngs"))]
                               ["0"].attrs["state"])
        assert rng_state["bit_generator"] == "PCG64"


def saved(tmp_path, name="net.h5"):
    return S.save(network(), tmp_path / name)


def test_refused_files(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(ArchiveError, match="cannot be read"):
        S.load(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not HDF5")
    with pytest.raises(ArchiveError, match="not a readable HDF5 file"):
        S.load(tmp_path / "text.h5")
    study = archive.write_run(str(tmp_path / "run.h5"), {"loss": np.arange(3.0)}, {"config": "{}"})
    with pytest.raises(ArchiveError, match="run.h5: is not a saved substrate object .*expected 'substrate-object'"):
        S.load(study)
    with pytest.raises(ArchiveError, match="is not a regular file"):
        S.load(tmp_path)


def edited(path, **attrs):
    with h5py.File(path, "r+") as f:
        f.attrs.update(attrs)
        archive.seal(f)  # the edit is deliberate: the text checksums follow it
    return path


def test_newer_format_and_unknown_kind_refused(tmp_path):
    path = edited(saved(tmp_path), format_version=np.int64(2))
    with pytest.raises(ArchiveError, match=r"net.h5: has format version 2.*reads versions up to 1: upgrade"):
        S.load(path)
    path = edited(saved(tmp_path, "b.h5"), kind="Spaceship", module="somewhere.else")
    with pytest.raises(ArchiveError, match=r"b.h5: / holds a 'Spaceship' \(defined in module 'somewhere.else'\)"):
        S.load(path)
    path = edited(saved(tmp_path, "c.h5"), kind="Spaceship", module="models.spaceship")
    with pytest.raises(ArchiveError, match=r"c.h5: / holds a 'Spaceship', whose module 'models.spaceship' cannot be "
                                           "imported"):
        S.load(path)


def test_damaged_files_refused(tmp_path):
    path = saved(tmp_path)
    data = open(path, "rb").read()
    for cut in (len(data) // 2, 200):
        (tmp_path / "cut.h5").write_bytes(data[:cut])
        with pytest.raises(ArchiveError, match="cut.h5"):
            S.load(tmp_path / "cut.h5")
    with h5py.File(path, "r") as f:  # a flipped bit inside a weight's chunk: its Fletcher-32 checksum fails
        offset = f["connections/0/weight"].id.get_chunk_info(0).byte_offset
    flipped = bytearray(data)
    flipped[offset + 3] ^= 0x10
    (tmp_path / "flip.h5").write_bytes(bytes(flipped))
    with pytest.raises(ArchiveError, match="flip.h5"):
        S.load(tmp_path / "flip.h5")
    with h5py.File(path, "r+") as f:  # a part missing
        del f["connections/1/weight"]
    with pytest.raises(ArchiveError, match="net.h5: does not hold a valid Network"):
        S.load(path)


def test_bad_save_arguments(tmp_path):
    with pytest.raises(SubstrateValueError, match="cannot save a dict: substrate.save knows .*Network"):
        S.save({"w": 1}, tmp_path / "x.h5")
    with pytest.raises(SubstrateValueError, match=r"cannot save /extra/0: a object \(the state may hold"):
        S.save(network(), tmp_path / "y.h5", extra={"f": object()})
    assert not list(tmp_path.iterdir())  # nothing written, no temporary file left


# ------------------------------------------------------------------------------------ checkpoints
class Killed(Exception):
    pass


@pytest.mark.parametrize("case", CASES)
def test_killed_training_resumes_bit_identically(tmp_path, case):
    """A run killed during epoch 3 (after its checkpoint of epoch 2), rerun with the same call,
    equals an uninterrupted run of 4 epochs: weights, optimiser state, generator, history, devices."""
    path = tmp_path / "ck.h5"
    every = CASES[case][2]

    def kill(history):
        if history.epoch[-1] == 3:
            raise Killed

    with pytest.raises(Killed):
        run(case, 4, checkpoint=path, checkpoint_every=every, on_epoch=kill)
    assert S.load(path).epoch == 2
    resumed = run(case, 4, checkpoint=path, checkpoint_every=every)
    assert_same_training(resumed, run(case, 4))
    assert S.load(path).epoch == 4


def test_training_killed_by_a_signal_resumes_bit_identically(tmp_path):
    """A training process killed (SIGKILL, at whatever point of an epoch or of a checkpoint write) after
    its second checkpoint: the same call, rerun with one epoch more than the checkpoint holds, equals an
    uninterrupted run of as many epochs."""
    path = tmp_path / "ck.h5"
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import persist_cases; "
            f"persist_cases.run('device_sgd', 10 ** 4, checkpoint={str(path)!r}, checkpoint_every=1)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (path.exists() and S.load(path).epoch >= 2):  # renamed into place: always whole
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no second checkpoint within 300 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    epochs = S.load(path).epoch + 1
    assert_same_training(run("device_sgd", epochs, checkpoint=path), run("device_sgd", epochs))


def test_checkpoint_continues_and_finishes(tmp_path):
    """A finished run's checkpoint: the same call returns its result without training; a larger
    epochs continues it (as one longer run); the checkpoint loads as a Checkpoint."""
    path = tmp_path / "ck.h5"
    run("adam", 2, checkpoint=path)
    calls = []
    again = run("adam", 2, checkpoint=path, on_epoch=calls.append)
    assert not calls and again[3].epoch == [0, 1, 2]
    assert_same_training(again, run("adam", 2))
    longer = run("adam", 3, checkpoint=path)
    assert_same_training(longer, run("adam", 3))
    ck = S.load(path)
    assert isinstance(ck, Checkpoint) and ck.epoch == 3 and isinstance(ck.optimiser, Adam)
    assert_same(ck.model.parameters(), longer[0].parameters())


def test_checkpoint_of_another_training_refused(tmp_path):
    path = tmp_path / "ck.h5"
    run("adam", 2, checkpoint=path)
    data = toy_data()
    with pytest.raises(SubstrateValueError, match="was written by another training: its batch_size differ"):
        train(toy_model(None), data, rule=ep.Centred(0.2), optimiser=Adam(0.02), epochs=3, batch_size=8,
              rng=np.random.default_rng(13), relaxation=ep.Relaxation(tol=1e-5, on_failure="record"), probe=8,
              homeostasis=CASES["adam"][3], progress=False, checkpoint=path)
    with pytest.raises(SubstrateValueError, match="its start differ"):  # another initial model
        model = Classifier.layered([4, 6, 5, 3], np.random.default_rng(99), cost="cross_entropy")
        train(model, data, rule=ep.Centred(0.2), optimiser=Adam(0.02), epochs=3, batch_size=10,
              rng=np.random.default_rng(13), relaxation=ep.Relaxation(tol=1e-5, on_failure="record"), probe=8,
              homeostasis=CASES["adam"][3], progress=False, checkpoint=path)
    with pytest.raises(SubstrateValueError, match="holds 2 epochs, more than epochs=1"):
        run("adam", 1, checkpoint=path)
    S.save(network(), tmp_path / "net.h5")
    with pytest.raises(SubstrateValueError, match="holds a Network, not a training checkpoint"):
        run("adam", 1, checkpoint=tmp_path / "net.h5")
    for bad, message in ((0, "checkpoint_every=0 must be a positive integer"),
                         (1.5, "checkpoint_every=1.5 must be a positive integer")):
        with pytest.raises(SubstrateValueError, match=message):
            run("adam", 1, checkpoint=path, checkpoint_every=bad)
    with pytest.raises(SubstrateValueError, match="checkpoint must be None or a file path, got int"):
        run("adam", 1, checkpoint=3)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while the third checkpoint is written (its content half written) leaves the second one
    complete and no temporary file; the rerun resumes from it and ends as an uninterrupted run."""
    path = tmp_path / "ck.h5"
    real = persist.KINDS["Checkpoint"]
    writes = []

    def crashing(group, ck):
        writes.append(ck.epoch)
        if len(writes) == 3:
            persist.write_object(group.create_group("model"), ck.model)
            raise OSError("the disk died")
        real.write(group, ck)

    monkeypatch.setitem(persist.KINDS, "Checkpoint", persist.Kind(Checkpoint, crashing, real.read))
    with pytest.raises(OSError, match="the disk died"):
        run("adam", 4, checkpoint=path)
    assert writes == [1, 2, 3] and S.load(path).epoch == 2
    assert sorted(os.listdir(tmp_path)) == ["ck.h5"]
    monkeypatch.setitem(persist.KINDS, "Checkpoint", real)
    assert_same_training(run("adam", 4, checkpoint=path), run("adam", 4))
