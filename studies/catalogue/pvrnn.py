"""The PV-RNN family (``models.pvrnn``; Ahmadi & Tani 2019, docs/equations.md, section 5).

* ``pvrnn_meta_prior``: a PV-RNN trained on the probabilistic sequences of ``models.data`` with
  meta-prior w on every layer: the learned sigma (posterior and prior) per layer, the training
  reconstruction, and generalisation, the prediction error of error regression on held-out
  sequences 1..k steps ahead and the transition statistics of the finite-state machine in generated
  sequences.
* ``pvrnn_er``: a continuous-time PV-RNN trained once, then error regression on held-out sequences
  with each credit assignment (exact, continuous adjoint, truncated BPTT) and on devices (read noise,
  time-constant mismatch): prediction error, seconds per step, gradient cosines with the exact one.

Both save their training history every ``PARTIAL_EPOCHS`` epochs, and in a sweep a killed run resumes
its training from the checkpoint in its scratch folder (``CHECKPOINT_EPOCHS``).
"""

from __future__ import annotations

import math
import os
import textwrap
import time

import matplotlib.pyplot as plt
import numpy as np

import substrate as S
from models.data import PRIMITIVES, pfsm_transitions, probabilistic_sequences, segment_primitives
from models.metrics import transition_statistics
from models.pvrnn import (NORMALISATIONS, PVRNN, DeviceCircuit, ErrorRegression, PVLayer, State, error_regression,
                          horizon_errors, train)
from studies import figures as F
from studies.config import Check, Field, ListOf, Range
from studies.runs import Result, Task, discard
from substrate.devices import Device, ReadNoise, TauMismatch

PV_DATA = {
    "train_sequences": Field(int, Range(1, 10_000), 12, "training sequences"),
    "train_steps": Field(int, Range(2, 100_000), 200, "steps of a training sequence"),
    "test_sequences": Field(int, Range(1, 10_000), 4, "held-out sequences (error regression)"),
    "test_steps": Field(int, Range(2, 100_000), 200, "steps of a held-out sequence"),
    "primitives": Field(ListOf(str, 1, 3, tuple(PRIMITIVES)), None, list(PRIMITIVES),
                        "the 2-D cyclic primitives the finite-state machine switches among (models.data)"),
    "period": Field(int, Range(2, 10_000), 20, "steps of one cycle of a primitive"),
    "amplitude": Field(float, Range(0.0, 1.0, lo_open=True, hi_open=True), 0.8, "amplitude of the primitives"),
    "noise": Field(float, Range(0.0, 10.0), 0.02, "sigma of the Gaussian observation noise"),
    "seed": Field(int, Range(-1, 2 ** 63 - 1), -1, "seed of the data (-1: the run's seed); drawn apart from "
                                                  "the network's, so that every w sees the same sequences"),
}
PV_NETWORK = {
    "units": Field(ListOf(int, 1, 6, Range(1, 4096)), None, [30, 15], "deterministic units per layer, bottom first"),
    "latents": Field(ListOf(int, 1, 6, Range(1, 1024)), None, [3, 1], "stochastic latents per layer"),
    "tau": Field(ListOf(float, 1, 6, Range(1.0, 1e4)), None, [2.0, 8.0], "time constant per layer (>= 1)"),
    "w_first": Field(float, Range(0.0, 1e3), 1.0, "meta-prior of a sequence's first step (prior N(0, I))"),
}
PV_TRAINING = {
    "epochs": Field(int, Range(1, 1_000_000), 3000, "Adam steps on the whole training set"),
    "lr": Field(float, Range(0.0, 1.0, lo_open=True), 5e-3, "Adam's learning rate (weights and every A)"),
}
PV_ER = {
    "window": Field(int, Range(1, 1000), 10, "steps of the sliding window"),
    "iterations": Field(int, Range(1, 10_000), 50, "Adam steps on the window's A per data step"),
    "lr": Field(float, Range(0.0, 10.0, lo_open=True), 0.1, "Adam's learning rate (state reset each step)"),
    "newest": Field(str, ("copy", "prior", "zeros"), "copy", "the new step's A when the window slides"),
    "meta_prior": Field(float, Check(lambda v: v == -1 or 0 <= v < math.inf, "-1 (the training w) or a number >= 0"),
                        -1.0, "w of every layer during error regression (-1: the training w)"),
    "sample": Field(bool, None, True, "predict by sampling the prior (else its means)"),
    "train_sequences": Field(int, Range(1, 10_000), 4, "training sequences also run through error regression "
                                                         "(the first ones), for comparison"),
}
PVRNN_META_PRIOR_SCHEMA = {
    "w": Field(float, Range(0.0, 1e3), 1e-2, "the meta-prior w of every layer (steps t > 0)"),
    "data": PV_DATA,
    "network": {**PV_NETWORK,
                "normalisation": Field(str, tuple(NORMALISATIONS), "gaussian", "how the free energy weighs the "
                                       "reconstruction against the KL (models.pvrnn.NORMALISATIONS)")},
    "training": {**PV_TRAINING,
                 "compiled": Field(bool, None, True, "epochs by the compiled kernels (models.pvrnn.train; the "
                                                     "NumPy path, the reference, agrees to rounding)")},
    "error_regression": {**PV_ER,
                         "horizon": Field(int, Range(1, 1000), 20, "k: the prediction error is measured 1..k "
                                                                   "steps beyond the window's end")},
    "generation": {
        "sequences": Field(int, Range(1, 10_000), 16, "sequences generated from the prior (transition statistics)"),
        "steps": Field(int, Range(2, 100_000), 200, "steps of a generated sequence"),
        "tolerance": Field(float, Range(0.0, 10.0, lo_open=True), 0.05, "mean squared distance per step "
                           "beyond which a generated cycle is no primitive (models.data.segment_primitives)"),
    },
}
PARTIAL_EPOCHS = 1000  # a long training saves its history (save_partial) every this many epochs
# a training checkpoint in the run's scratch folder (models.pvrnn.train's checkpoint) every this many epochs or
# seconds, whichever first: a sweep run again resumes a killed run from it. Constants, not config fields:
# a field would change every run's id (and the digests), and the numbers do not change the results.
CHECKPOINT_EPOCHS, CHECKPOINT_SECONDS = 2000, 300.0


def _check_layers(net):
    if not len(net["units"]) == len(net["latents"]) == len(net["tau"]):
        raise S.SubstrateValueError(f"network.units={net['units']}, network.latents={net['latents']}, "
                                    f"network.tau={net['tau']}: one value per layer, lists of equal lengths")


def _history_arrays(hist):
    return {"free_energy": (("epoch",), hist["free_energy"]), "reconstruction": (("epoch",), hist["reconstruction"]),
            "kl": (("epoch", "layer"), hist["kl"])}


def _history_coords(hist):
    return {"epoch": list(range(1, len(hist["free_energy"]) + 1)), "layer": list(range(hist["kl"].shape[1]))}


def _history_saver(save_partial, epochs):
    """``train``'s on_epoch: the history so far, every ``PARTIAL_EPOCHS`` epochs, to ``save_partial``
    (kept if the run dies); the epochs done of ``epochs`` to its progress."""

    def on_epoch(hist):
        n = len(hist["free_energy"])
        save_partial.progress(n, epochs)
        if n % PARTIAL_EPOCHS == 0:
            save_partial(Result(arrays=_history_arrays(hist), scalars={"epochs_run": float(n)},
                                coords=_history_coords(hist)))

    return on_epoch


def pvrnn_data(config: dict, seed: int):
    """(training sequences, held-out sequences) of ``probabilistic_sequences``, each (B, T, 2), drawn
    from streams of the data seed alone (the run's seed where ``data.seed`` is -1): the same for every w
    and every network, and the held-out set the same whatever the training set's size."""
    d = config["data"]
    data_seed = seed if d["seed"] == -1 else d["seed"]
    kw = dict(primitives=tuple(d["primitives"]), period=d["period"], amplitude=d["amplitude"], noise=d["noise"])
    x, _ = probabilistic_sequences(d["train_sequences"], d["train_steps"], np.random.default_rng([data_seed, 1]),
                                   **kw)
    test, _ = probabilistic_sequences(d["test_sequences"], d["test_steps"], np.random.default_rng([data_seed, 2]),
                                      **kw)
    return x, test


def _prediction_error(model, sequences, er, rng):
    """Per sequence: the mean squared prediction error ||x_hat_{t+k} - x_{t+k}||^2 of error regression
    once its window is full (t >= window), k = 1..horizon (``horizon_errors``), (sequences, horizon);
    and the mean posterior sigma per layer at the window's newest step, over the steps of k = 1."""
    errors, sigmas = [], []
    for seq in sequences:
        out = error_regression(model, seq, er, rng)
        errors.append(horizon_errors(out, seq, er.window))
        sigmas.append(out["sigma_q"][er.window:-1].mean(axis=0))
    return np.array(errors), np.array(sigmas)


def _transitions(model, config, rng):
    """The finite-state machine's statistics in sequences generated from the prior from a sequence's
    beginning (``generation``): each cycle named by ``segment_primitives``, the transitions counted
    against the machine's (``transition_statistics``)."""
    d, g = config["data"], config["generation"]
    x = model.generate(g["sequences"], g["steps"], rng)
    labels, _ = segment_primitives(x, primitives=tuple(d["primitives"]), period=d["period"],
                                   amplitude=d["amplitude"], tolerance=g["tolerance"])
    return transition_statistics(labels, pfsm_transitions(len(d["primitives"])))


def _generation_spread(model, A, x, rng, samples: int = 8, steps: int = 40):
    """How random the learned generative model is, whatever sigma reads: from the posterior-mean
    state halfway through each training sequence, ``samples`` generations of ``steps`` steps from the
    prior; the variance of x_hat across the samples, mean over steps, outputs and sequences (0 for a
    deterministic model; small for deterministic chaos over this horizon)."""
    B, T, _ = x.shape
    half = T // 2
    state = model.run({k: v[:, :half] for k, v in A.items()},
                      [np.zeros((B, half, lay.latents)) for lay in model.layers]).end
    many = State([np.repeat(h, samples, axis=0) for h in state.h], [np.repeat(d, samples, axis=0) for d in state.d],
                 False)
    out = model.generate(B * samples, steps, rng, start=many).reshape(B, samples, steps, -1)
    return float(out.var(axis=1).mean())


def _train(model, x, training, rng, save_partial, compiled=False):
    """``models.pvrnn.train`` for a task: the history saved every ``PARTIAL_EPOCHS`` epochs, and in a
    sweep a checkpoint (``CHECKPOINT_EPOCHS``, ``CHECKPOINT_SECONDS``) in the run's scratch folder,
    from which a killed run resumes (bit-identical results)."""
    scratch = save_partial.scratch()
    return train(model, x, epochs=training["epochs"], rng=rng, lr=training["lr"], progress=False,
                 on_epoch=_history_saver(save_partial, training["epochs"]), compiled=compiled,
                 checkpoint=None if scratch is None else os.path.join(scratch, "training.h5"),
                 checkpoint_every=CHECKPOINT_EPOCHS, checkpoint_seconds=CHECKPOINT_SECONDS)


def _latent_drive(model, run):
    """Per layer, the standard deviation that sampling the prior adds to a unit's drive W_zd z,
    sqrt(mean_{b, t > 0, u} sum_j (W_zd[u, j] sigma^p_j(b, t))^2) along ``run``'s pass. sigma alone does
    not say how random the model is: a latent whose W_zd column is ~0 (unused) keeps any sigma at no
    cost; the drive's noise is what the units receive."""
    return [float(np.sqrt(np.mean(np.exp(2.0 * logs[:, 1:]) @ (model.params[f"l{i}.W_zd"] ** 2).T)))
            for i, logs in enumerate(run.logs_p)]


def run_pvrnn_meta_prior(config: dict, seed: int, save_partial=discard) -> Result:
    """A PV-RNN (``models.pvrnn``) with meta-prior ``w`` on every layer, trained on probabilistic
    sequences, then:

    * the learned sigma per layer: the posterior's sigma^q = exp(A^sig) and the prior's sigma^p =
      exp(W_sig d_{t-1} + b_sig) along the posterior-mean pass (eps = 0), means over the training
      sequences and their steps t > 0 (step 0 has the fixed prior N(0, I), weighted by w_first);
    * the latents' drive per layer, sqrt(mean_{b,t,u} sum_j (W_zd[u, j] sigma^p_j)^2): the standard
      deviation that sampling the prior adds to a unit's input (a sigma read through the weights that
      carry it: an unused latent keeps any sigma at no cost);
    * the training reconstruction error mean_{b,t} ||x_t - x_hat_t||^2 of that pass;
    * generalisation: error regression over each held-out sequence (and over the first
      ``error_regression.train_sequences`` training sequences, for comparison), the mean prediction
      error ||x_hat_{t+k} - x_{t+k}||^2 once the window is full, one step ahead and k = 1..horizon
      steps ahead (``horizon_errors``, the prediction from the prior beyond the window);
    * the finite-state machine in generated sequences (:func:`_transitions`): the frequency of each
      transition between primitives, its total-variation distance from the machine's, the fractions
      of forbidden transitions and of cycles that are no primitive;
    * the open-loop baseline: the same error of the prior-mean generation (no inference) on the
      held-out sequences, mean over every step;
    * the generation spread (:func:`_generation_spread`): how much sampling the prior changes what
      the model generates, the randomness it learned whether or not its latents carry it.

    Arrays per epoch ("free_energy", "reconstruction", "kl" per layer) and per layer; the training
    history is saved every ``PARTIAL_EPOCHS`` epochs (``save_partial``), and in a sweep the training's
    checkpoint (``CHECKPOINT_EPOCHS``, ``CHECKPOINT_SECONDS``) in the run's scratch folder, from which
    the run resumes if it was killed (bit-identical results); the trained model and its adaptive
    vectors A are kept (``objects``)."""
    net, w = config["network"], config["w"]
    _check_layers(net)
    d, e = config["data"], config["error_regression"]
    if e["train_sequences"] > d["train_sequences"]:
        raise S.SubstrateValueError(f"error_regression.train_sequences={e['train_sequences']}: at most "
                                    f"data.train_sequences={d['train_sequences']}")
    if min(d["train_steps"], d["test_steps"]) < e["window"] + 2:
        raise S.SubstrateValueError(f"data.train_steps={d['train_steps']}, data.test_steps={d['test_steps']}: "
                                    f"at least error_regression.window + 2 = {e['window'] + 2} (one prediction "
                                    "after the window is full)")
    if d["test_steps"] < e["window"] + e["horizon"] + 1:
        raise S.SubstrateValueError(f"data.test_steps={d['test_steps']}: at least error_regression.window + "
                                    f"error_regression.horizon + 1 = {e['window'] + e['horizon'] + 1} (a "
                                    "prediction k steps ahead after the window is full)")
    g = config["generation"]
    if g["steps"] < 2 * d["period"]:
        raise S.SubstrateValueError(f"generation.steps={g['steps']}: at least 2 * data.period = {2 * d['period']} "
                                    "(one transition between two cycles)")
    x, test = pvrnn_data(config, seed)
    rng = np.random.default_rng(seed)
    model = PVRNN([PVLayer(u, z, tau, w, net["w_first"]) for u, z, tau in zip(net["units"], net["latents"],
                                                                              net["tau"])], x.shape[2], rng,
                  normalisation=net["normalisation"])
    layers = list(range(len(model.layers)))
    tr = config["training"]
    start = time.perf_counter()
    A, hist = _train(model, x, tr, rng, save_partial, compiled=tr["compiled"])
    train_seconds = time.perf_counter() - start

    run = model.run(A, [np.zeros(x.shape[:2] + (lay.latents,)) for lay in model.layers])
    sigma_q = [float(np.exp(A[f"l{i}.sig"][:, 1:]).mean()) for i in layers]
    sigma_p = [float(np.exp(run.logs_p[i][:, 1:]).mean()) for i in layers]
    latent_drive = _latent_drive(model, run)
    reconstruction_error = float(np.mean(np.sum((run.x_hat - x) ** 2, axis=-1)))

    er = ErrorRegression(window=e["window"], iterations=e["iterations"], lr=e["lr"], newest=e["newest"],
                         meta_prior=None if e["meta_prior"] == -1 else (e["meta_prior"],) * len(layers),
                         sample=e["sample"], horizon=e["horizon"])
    er_rng = np.random.default_rng([seed, 2])
    start = time.perf_counter()
    test_error, test_sigma = _prediction_error(model, test, er, er_rng)
    train_error, _ = _prediction_error(model, x[:e["train_sequences"]], er, er_rng)
    er_seconds = time.perf_counter() - start
    open_loop = model.generate(len(test), test.shape[1], None)
    open_loop_error = float(np.mean(np.sum((open_loop - test) ** 2, axis=-1)))
    spread = _generation_spread(model, A, x, np.random.default_rng([seed, 4]))
    stats = _transitions(model, config, np.random.default_rng([seed, 5]))

    arrays = _history_arrays(hist)
    arrays.update({"sigma_q": (("layer",), np.array(sigma_q)), "sigma_p": (("layer",), np.array(sigma_p)),
                   "latent_drive": (("layer",), np.array(latent_drive)),
                   "test_sigma_q": (("layer",), test_sigma.mean(axis=0)),
                   "test_sequence_error": (("test_sequence",), test_error[:, 0]),
                   "test_horizon_error": (("horizon",), test_error.mean(axis=0)),
                   "transition_frequencies": (("from", "to"), stats["frequencies"])})
    primitives = list(d["primitives"])
    return Result(arrays=arrays,
                  scalars={"test_prediction_error": float(np.mean(test_error[:, 0])),
                           "test_k_step_error": float(np.mean(test_error[:, -1])),
                           "train_prediction_error": float(np.mean(train_error[:, 0])),
                           "train_reconstruction_error": reconstruction_error, "open_loop_error": open_loop_error,
                           "generation_spread": spread, "transition_distance": stats["distance"],
                           "forbidden_transitions": stats["forbidden"], "unrecognised_cycles": stats["unrecognised"],
                           "final_free_energy": float(hist["free_energy"][-1]),
                           "train_seconds": train_seconds, "er_seconds": er_seconds},
                  coords={**_history_coords(hist), "horizon": list(range(1, e["horizon"] + 1)), "from": primitives,
                          "to": primitives},
                  objects={"model": (model, {"A": A})})


def warmup_pvrnn():
    """A training step and error regression on a tiny PV-RNN (loads or compiles the error-regression
    kernels, ``models._pvrnn_kernels``)."""
    rng = np.random.default_rng(0)
    model = PVRNN([PVLayer(3, 1, 2.0), PVLayer(2, 1, 4.0)], 2, rng)
    x = rng.uniform(-0.5, 0.5, size=(1, 4, 2))
    train(model, x, epochs=1, rng=rng, progress=False)
    error_regression(model, x[0], ErrorRegression(window=2, iterations=2), rng)


# ------------------------------------------------------------------------------------ PV-RNN ER: credit, devices
def _credit_ok(v):
    name, _, k = v.partition(":")
    return (name in ("exact", "continuous") and not k) or (name == "truncated" and k.isdigit() and int(k) >= 1)


PVRNN_ER_SCHEMA = {
    "data": PV_DATA,
    "network": {**PV_NETWORK,
                "w": Field(float, Range(0.0, 1e3), 1e-2, "the meta-prior w of every layer (steps t > 0)"),
                "substeps": Field(int, Range(1, 256), 4, "integration steps per data step (1: the published "
                                                        "model; more: the continuous-time circuit)"),
                "method": Field(str, ("euler", "exp_euler"), "exp_euler", "integrator of the units")},
    "training": PV_TRAINING,
    "error_regression": {k: v for k, v in PV_ER.items() if k != "train_sequences"},
    "credit": Field(ListOf(str, 1, 20, Check(_credit_ok, "'exact', 'continuous' or 'truncated:K' (K >= 1)")),
                    None, ["exact", "continuous", "truncated:1", "truncated:2", "truncated:5"],
                    "credit assignments compared inside error regression (no device)"),
    "read_noise": Field(ListOf(float, 0, 20, Range(0.0, 10.0)), None, [0.02, 0.05, 0.1, 0.2],
                        "relative read-noise sigma of every weight, redrawn every pass (exact credit)"),
    "tau_mismatch": Field(ListOf(float, 0, 20, Range(0.0, 10.0)), None, [0.1, 0.2, 0.4],
                          "spread of every unit's time constant, tau (1 + spread xi) (exact credit)"),
    "gradient_windows": Field(int, Range(0, 100_000), 40, "windows of the training sequences (posterior "
                                                           "A, posterior-mean start states) on which each "
                                                           "credit's gradient is compared with the exact one"),
}


def _credit(v):
    name, _, k = v.partition(":")
    return name, int(k) if k else None


def _window_gradient_cosines(model, x, A, window, credits, count, rng):
    """Cosine of each credit's dF/dA with the exact one on ``count`` windows of the training
    sequences: the posterior A of the window, its start state from the posterior-mean pass, fresh
    noise; one value per credit (the median over the windows)."""
    B, T, _ = x.shape
    cos = np.full((len(credits), count), np.nan)
    for c in range(count):
        b, s = int(rng.integers(B)), int(rng.integers(1, T - window + 1))
        start = model.run({k: v[b:b + 1, :s] for k, v in A.items()},
                          [np.zeros((1, s, lay.latents)) for lay in model.layers]).end
        Aw = {k: v[b:b + 1, s:s + window] for k, v in A.items()}
        eps = model.noise(1, window, rng)
        grads = [np.concatenate([g.ravel() for g in model.free_energy(
            x[b:b + 1, s:s + window], Aw, eps, start=start, weights=False, credit=name, truncation=k)[3].values()])
            for name, k in map(_credit, credits)]
        exact = np.concatenate([g.ravel() for g in model.free_energy(
            x[b:b + 1, s:s + window], Aw, eps, start=start, weights=False)[3].values()])
        for j, g in enumerate(grads):
            cos[j, c] = g @ exact / (np.linalg.norm(g) * np.linalg.norm(exact))
    return np.median(cos, axis=1)


def run_pvrnn_er(config: dict, seed: int, save_partial=discard) -> Result:
    """A continuous-time PV-RNN trained on probabilistic sequences, then error regression on the
    held-out sequences under variants, each the mean one-step prediction error once the window is
    full (mean over the held-out sequences) and the seconds per ER step:

    * credit assignment (no device): the exact discrete adjoint, the continuous adjoint of the
      continuous-time circuit, truncated BPTT (the state detached every K data steps) -- and the
      cosine of each one's window gradient with the exact one on windows of the training data;
    * the circuit on a device with exact credit (the adjoint nominal): read noise on every weight,
      redrawn every pass, at each sigma; time-constant mismatch at each spread (the device's own
      streams, ``devices.stream(seed, effect)``, apart from the ER noise).

    Every variant runs the NumPy path (comparable seconds); the compiled exact step runs last, on the
    same noise draws (its error equals the NumPy exact one up to rounding). Also the open-loop error
    (prior means, no inference). The trained model and its adaptive vectors A are kept (``objects``)."""
    net, d, e = config["network"], config["data"], config["error_regression"]
    _check_layers(net)
    if d["test_steps"] < e["window"] + 2:
        raise S.SubstrateValueError(f"data.test_steps={d['test_steps']}: at least error_regression.window + 2 = "
                                    f"{e['window'] + 2} (one prediction after the window is full)")
    if config["gradient_windows"] and d["train_steps"] < e["window"] + 1:
        raise S.SubstrateValueError(f"data.train_steps={d['train_steps']}: at least error_regression.window + 1 "
                                    "for the gradient windows")
    x, test = pvrnn_data(config, seed)
    rng = np.random.default_rng(seed)
    model = PVRNN([PVLayer(u, z, tau, net["w"], net["w_first"]) for u, z, tau in
                   zip(net["units"], net["latents"], net["tau"])], x.shape[2], rng, substeps=net["substeps"],
                  method=net["method"])
    tr = config["training"]
    A, hist = _train(model, x, tr, rng, save_partial)
    L = len(model.layers)
    base = dict(window=e["window"], iterations=e["iterations"], lr=e["lr"], newest=e["newest"],
                meta_prior=None if e["meta_prior"] == -1 else (e["meta_prior"],) * L, sample=e["sample"])

    def regress(er, circuit=None, compiled=False):
        start = time.perf_counter()
        errors = [np.mean(error_regression(model, seq, er, np.random.default_rng([seed, 2, k]), compiled=compiled,
                                          circuit=circuit)["prediction_error"][er.window:-1])
                  for k, seq in enumerate(test)]
        return float(np.mean(errors)), (time.perf_counter() - start) / (len(test) * test.shape[1])

    # every variant by the NumPy path (like for like); the compiled exact step last (warm), the same draws
    credit = [regress(ErrorRegression(**base, credit=name, truncation=k))
              for name, k in map(_credit, config["credit"])]
    read = [regress(ErrorRegression(**base), DeviceCircuit(model, Device((ReadNoise(s),)), seed))
            for s in config["read_noise"]]
    tau = [regress(ErrorRegression(**base), DeviceCircuit(model, Device((TauMismatch(s),)), seed))
           for s in config["tau_mismatch"]]
    error_regression(model, test[0, :2], ErrorRegression(**base), np.random.default_rng(0))  # loads the kernels
    compiled_error, compiled_seconds = regress(ErrorRegression(**base), compiled=True)
    cosines = (_window_gradient_cosines(model, x, A, e["window"], config["credit"], config["gradient_windows"],
                                        np.random.default_rng([seed, 3]))
               if config["gradient_windows"] else np.full(len(config["credit"]), np.nan))
    open_loop = model.generate(len(test), test.shape[1], None)
    arrays = _history_arrays(hist)
    arrays.update({"credit_error": (("credit",), np.array([v[0] for v in credit])),
                   "credit_step_seconds": (("credit",), np.array([v[1] for v in credit])),
                   "credit_gradient_cosine": (("credit",), cosines),
                   "read_noise_error": (("read_noise",), np.array([v[0] for v in read])),
                   "tau_mismatch_error": (("tau_mismatch",), np.array([v[0] for v in tau]))})
    return Result(arrays=arrays,
                  scalars={"compiled_error": compiled_error, "compiled_step_seconds": compiled_seconds,
                           "open_loop_error": float(np.mean(np.sum((open_loop - test) ** 2, axis=-1))),
                           "final_free_energy": float(hist["free_energy"][-1])},
                  coords={**_history_coords(hist), "credit": list(config["credit"]),
                          "read_noise": list(config["read_noise"]), "tau_mismatch": list(config["tau_mismatch"])},
                  objects={"model": (model, {"A": A})})


# ------------------------------------------------------------------------------------ figures
def _vs_x(ax, da, x, color, label, marker="o", ls="-"):
    """The median over every dimension but ``x`` as a line, and every value (the seeds) as points."""
    xs = da[x].values
    ax.plot(xs, np.atleast_1d(F.median(da, [x]).values), marker=marker, ls=ls, color=color, label=label)
    points = da.transpose(x, ...).values.reshape(len(xs), -1)
    ax.plot(np.repeat(xs, points.shape[1]), points.ravel(), ls="none", marker=marker, ms=3, alpha=0.35,
            color=color)


def plot_pvrnn_meta_prior(archive_path: str):
    """PV-RNN meta-prior study, against w (log axes; the median over seeds as lines, the seeds as
    points): the prediction error of error regression on the held-out sequences one step and k steps
    ahead, on training sequences, and of the open-loop generation; the learned sigma per layer,
    posterior sigma^q = exp(A^sig) and prior sigma^p along the posterior-mean pass (training sequences,
    t > 0), and the posterior sigma that error regression infers on the held-out sequences; the
    finite-state machine in prior-sampled generations (total-variation distance of the transition
    frequencies from the machine's, forbidden transitions, cycles that are no primitive); the error
    against the steps ahead for every w; the training reconstruction error, the spread of
    prior-sampled generations and the latents' drive per layer; and the reconstruction term of the free energy during training for
    every w (first seed)."""
    ds, axes = F.open_sweep(archive_path)
    x = "w" if "w" in axes else F.other_axis(ds, axes, ())
    ds = ds.sel({x: ds[x].values[ds[x].values > 0]})  # a log axis
    fig, grid = plt.subplots(2, 3, figsize=(18, 9.5), layout="constrained")
    (ax_er, ax_sigma, ax_fsm), (ax_k, ax_rec, ax_curve) = grid
    k = int(ds["horizon"].values[-1])
    _vs_x(ax_er, ds["test_prediction_error"], x, "C0", "error regression, held-out, 1 step ahead")
    _vs_x(ax_er, ds["test_k_step_error"], x, "C2", f"error regression, held-out, {k} steps ahead", marker="D")
    _vs_x(ax_er, ds["train_prediction_error"], x, "C1", "error regression, training, 1 step ahead", marker="s")
    _vs_x(ax_er, ds["open_loop_error"], x, "0.5", "open loop (prior means, no inference)", marker="^", ls=":")
    ax_er.set_ylabel(r"prediction error $\|\hat x_{t+k} - x_{t+k}\|^2$")
    ax_er.set_title("generalisation (after the window is full)")
    for i, layer in enumerate(ds["layer"].values):
        one = ds.sel(layer=layer)
        _vs_x(ax_sigma, one["sigma_q"], x, f"C{i}", rf"layer {layer}: posterior $\sigma^q$ (training)")
        _vs_x(ax_sigma, one["sigma_p"], x, f"C{i}", rf"layer {layer}: prior $\sigma^p$ (training)", marker="s",
              ls="--")
        _vs_x(ax_sigma, one["test_sigma_q"], x, f"C{i}", rf"layer {layer}: posterior $\sigma^q$ (ER, held-out)",
              marker="^", ls=":")
    ax_sigma.set_ylabel(r"mean $\sigma$ of the latents")
    ax_sigma.set_title("learned sigma")
    _vs_x(ax_fsm, ds["transition_distance"], x, "C4", "TV distance of the transition frequencies from the machine's")
    _vs_x(ax_fsm, ds["forbidden_transitions"], x, "C5", "fraction of transitions the machine never makes",
          marker="s", ls="--")
    _vs_x(ax_fsm, ds["unrecognised_cycles"], x, "C6", "fraction of cycles that are no primitive", marker="^",
          ls=":")
    ax_fsm.set_ylabel("fraction (0: the machine's statistics)")
    ax_fsm.set_title("the finite-state machine in prior-sampled generations")
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(ds[x])))
    for c, value in zip(colors, ds[x].values):
        curve = F.median(ds["test_horizon_error"].sel({x: value}), ["horizon"])
        ax_k.plot(ds["horizon"].values, curve.values, "o-", ms=3, color=c, label=f"{x} = {F.fmt(value.item())}")
    ax_k.set_xlabel("steps ahead k of the window's end")
    F.integer_ticks(ax_k.xaxis)
    ax_k.set_yscale("log")
    ax_k.set_ylabel("prediction error, held-out (median over seeds)")
    ax_k.set_title("prediction horizon")
    ax_k.legend(fontsize=7)
    _vs_x(ax_rec, ds["train_reconstruction_error"], x, "C0", r"reconstruction error $\|\hat x_t - x_t\|^2$ "
          "(posterior means)")
    _vs_x(ax_rec, ds["generation_spread"], x, "C3", r"variance of $\hat x$ across prior samples (40 steps)",
          marker="^", ls=":")
    if "latent_drive" in ds:  # archives from before the measure lack it
        for i, layer in enumerate(ds["layer"].values):
            _vs_x(ax_rec, ds["latent_drive"].sel(layer=layer), x, f"C{i + 7}",
                  rf"layer {layer}: sd of the drive $W_{{zd}} z$ under the prior", marker="s", ls="--")
    ax_rec.set_ylabel(r"$\|\hat x_t - x_t\|^2$, variance of $\hat x$, sd of the drive")
    ax_rec.set_title("training fit, and the randomness the model generates")
    first = ds.isel(seed=0) if "seed" in ds.dims else ds
    for c, value in zip(colors, ds[x].values):
        rec = F.median(first["reconstruction"].sel({x: value}), ["epoch"])
        ax_curve.semilogy(first["epoch"].values, rec.values, color=c, lw=1, label=f"{x} = {F.fmt(value.item())}")
    ax_curve.set_xlabel("epoch")
    F.integer_ticks(ax_curve.xaxis)
    ax_curve.set_ylabel("reconstruction term of F (training set)")
    ax_curve.set_title("training (first seed)")
    ax_curve.legend(fontsize=7)
    for ax in (ax_er, ax_sigma, ax_fsm, ax_rec):
        ax.set_xscale("log")
        ax.set_yscale("log" if ax is not ax_fsm else "linear")
        ax.set_xlabel(f"meta-prior {x}")
    for ax in grid.ravel():
        ax.grid(True, which="both", alpha=0.3)
    F.figure_legend(fig, [ax_er, ax_sigma, ax_fsm, ax_rec], columns=4)
    fig.suptitle(textwrap.fill(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} "
                               "(median over seeds, seeds as points)", 160), fontsize=10)
    return F.readable_ticks(fig)


def overlay_pvrnn_meta_prior(archive_paths: list[str]):
    """Meta-prior sweeps made under different settings (training length, learning rate, latents, ...:
    profiles and ``--set`` overrides, one colour each, :func:`studies.figures.setting`), against w
    (median over seeds as lines, the seeds as points): error regression's prediction error on the
    held-out sequences one and k steps ahead, the training reconstruction error, the spread of
    prior-sampled generations, the learned posterior sigma per layer, and the finite-state machine in
    the generations (total-variation distance, cycles that are no primitive)."""
    sweeps = []
    for path in archive_paths:
        ds, axes = F.open_sweep(path)
        x = "w" if "w" in axes else F.other_axis(ds, axes, ())
        sweeps.append((ds.sel({x: ds[x].values[ds[x].values > 0]}), x))  # a log axis
    layers = max(sweeps, key=lambda s: s[0].sizes["layer"])[0]["layer"].values
    fig, grid = plt.subplots(2, 3 + (len(layers) + 1) // 2, figsize=(5 * (3 + (len(layers) + 1) // 2), 9),
                             layout="constrained")
    panels = [("test_prediction_error", None, r"prediction error $\|\hat x_{t+1} - x_{t+1}\|^2$",
               "error regression, held-out, 1 step ahead"),
              ("test_k_step_error", None, r"prediction error $\|\hat x_{t+k} - x_{t+k}\|^2$",
               "error regression, held-out, k steps ahead"),
              ("train_reconstruction_error", None, r"$\|\hat x_t - x_t\|^2$ (posterior means)",
               "training fit"),
              ("generation_spread", None, r"variance of $\hat x$ across prior samples",
               "randomness of prior-sampled generations")]
    panels += [("sigma_q", layer, r"mean posterior $\sigma^q$ (training)", f"learned sigma, layer {layer}")
               for layer in layers]
    panels += [("transition_distance", None, "total-variation distance (0: the machine's)",
                "transitions in generations"),
               ("unrecognised_cycles", None, "fraction of cycles that are no primitive",
                "cycles in generations")]
    axes_ = grid.ravel()
    for ax, (name, layer, ylabel, title) in zip(axes_, panels):
        for i, (ds, x) in enumerate(sweeps):
            if layer is not None and layer not in ds["layer"].values:
                continue
            da = ds[name] if layer is None else ds[name].sel(layer=layer)
            _vs_x(ax, da, x, f"C{i}", f"{ds.attrs['study_name']}: {F.setting(ds)}")
        ax.set_xscale("log")
        ax.set_yscale("linear" if name in ("transition_distance", "unrecognised_cycles") else "log")
        ax.set_xlabel(f"meta-prior {sweeps[0][1]}")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes_[len(panels):]:
        ax.remove()
    F.figure_legend(fig, columns=3)
    fig.suptitle(f"{sweeps[0][0].attrs['study_name']}: sweeps under {len(sweeps)} settings "
                 "(median over seeds, seeds as points)", fontsize=10)
    return F.readable_ticks(fig)


def plot_pvrnn_er(archive_path: str):
    """PV-RNN error regression under variants (median over seeds as lines or bars, seeds as points;
    one colour per value of the other sweep axis, e.g. substeps): the one-step prediction error of
    each credit assignment and the cosine of its window gradient with the exact one; the error
    against the read-noise sigma and the time-constant spread (at 0: no device, exact credit); and
    the seconds per ER step of each credit in the NumPy path against the compiled exact step."""
    ds, axes = F.open_sweep(archive_path)
    other = F.other_axis(ds, axes, ())
    groups = list(ds[other].values) if other else [None]
    fig, grid = plt.subplots(1, 5, figsize=(24, 4.6), layout="constrained")
    ax_err, ax_cos, ax_read, ax_tau, ax_time = grid
    credits = [str(c) for c in ds["credit"].values]
    width = 0.8 / len(groups)
    for g, value in enumerate(groups):
        one = ds.sel({other: value}) if other else ds
        color, label = f"C{g}", F.label(ds, other, value) if other else ""
        label = f"{other} {label}" if other else "median"
        pos = np.arange(len(credits)) + (g - (len(groups) - 1) / 2) * width
        for ax, name in ((ax_err, "credit_error"), (ax_cos, "credit_gradient_cosine"),
                         (ax_time, "credit_step_seconds")):
            ax.bar(pos, F.median(one[name], ["credit"]).values, width, color=color, alpha=0.6, label=label)
            pts = one[name].transpose("credit", ...).values.reshape(len(credits), -1)
            ax.plot(np.repeat(pos, pts.shape[1]), pts.ravel(), "k.", ms=3)
        ax_time.axhline(float(F.median(one["compiled_step_seconds"], []).values), color=color, ls="--",
                        label=f"compiled exact step ({label})")
        ax_err.axhline(float(F.median(one["open_loop_error"], []).values), color=color, ls=":",
                       label=f"open loop, no inference ({label})")
        exact = one["credit_error"].sel(credit="exact")
        for ax, axis in ((ax_read, "read_noise"), (ax_tau, "tau_mismatch")):
            da = one[f"{axis}_error"]
            xs = np.concatenate([[0.0], da[axis].values])
            med = np.concatenate([[float(F.median(exact, []).values)], F.median(da, [axis]).values])
            ax.plot(xs, med, "o-", color=color, label=label)
            pts = np.concatenate([exact.values.reshape(1, -1), da.transpose(axis, ...).values.reshape(len(xs) - 1, -1)])
            ax.plot(np.repeat(xs, pts.shape[1]), pts.ravel(), ".", color=color, ms=3, alpha=0.5)
    for ax in (ax_err, ax_cos, ax_time):
        ax.set_xticks(np.arange(len(credits)), credits, rotation=20)
        ax.set_xlabel("credit assignment (truncated:K: BPTT cut every K steps)")
    ax_err.set_yscale("log")
    ax_err.set_ylabel(r"one-step prediction error $\|\hat x_{t+1} - x_{t+1}\|^2$")
    ax_err.set_title("credit assignment inside ER (held-out)")
    ax_cos.set_ylabel("cos(window gradient, exact), median")
    ax_cos.set_title("how close each credit is to BPTT")
    ax_time.set_yscale("log")
    ax_time.set_ylabel("seconds per ER step")
    ax_time.set_title("cost (NumPy path; dashed: compiled)")
    for ax, title, xlabel in ((ax_read, "read noise, redrawn every pass", r"read-noise $\sigma$ (fraction of $|W|$)"),
                              (ax_tau, "time-constant mismatch", r"relative s.d. of $\tau$")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("one-step prediction error")
        ax.set_title(title)
    for ax in grid:
        ax.grid(True, which="both", alpha=0.3)
    F.figure_legend(fig, columns=4)
    fig.suptitle(textwrap.fill(f"{ds.attrs['study_name']}: {ds.attrs.get('description', '')} "
                               "(median over seeds, seeds as points)", 160), fontsize=10)
    return F.readable_ticks(fig)


META_PRIOR = Task(PVRNN_META_PRIOR_SCHEMA, run_pvrnn_meta_prior, warmup_pvrnn, plot_pvrnn_meta_prior,
                  "a PV-RNN trained on probabilistic sequences at meta-prior w: sigma, generalisation",
                  overlay=overlay_pvrnn_meta_prior)
ERROR_REGRESSION = Task(PVRNN_ER_SCHEMA, run_pvrnn_er, warmup_pvrnn, plot_pvrnn_er,
                        "PV-RNN error regression: credit assignments compared, and on a noisy device")
