"""The counts of the local rules' steps (models/local, docs/equations.md section 9), by hand on tiny
networks: every relaxation the step ran is recorded by a spy on ``ep.free_phase`` (its steps, field
evaluations and time are what the engine measured), and the devices, conversions and digital operations
are written out from the sizes. The counts are exact integers (or sums of the phases' own times), so
they are compared exactly; train() sums them per epoch and substrate.cost prices them."""

import numpy as np
import pytest

from models import data, ep
from models.data import one_hot
from models.local import ccl, noprop, pc
from models.local import forward_forward as ff
from models.train import SGD, train
from substrate import Counts, cost, devices
from substrate.adjoint import implicit_counts

REL = ep.Relaxation(tol=1e-10)


@pytest.fixture
def phases(monkeypatch):
    """Every solution ep.free_phase returns during the test, in order."""
    seen, relax = [], ep.free_phase

    def spy(*args, **kwargs):
        sol = relax(*args, **kwargs)
        seen.append(sol)
        return sol

    monkeypatch.setattr(ep, "free_phase", spy)
    return seen


def _batch(seed, B, n, K):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (B, n)), one_hot(rng.integers(0, K, B), K)


def _run(sols, batches, state, inputs, widths, n):
    """The analog part of the phases ``sols`` by hand: each with its batch, state and input devices,
    input width and neurons (one read-out)."""
    return {"phases": len(sols), "steps": sum(s.steps for s in sols), "nfev": sum(s.nfev for s in sols),
            "settle_time": sum(s.t_final * b for s, b in zip(sols, batches)),
            "macs": sum((st * s.nfev + i) * b for s, b, st, i in zip(sols, batches, state, inputs)),
            "dac": sum(w * b for w, b in zip(widths, batches)), "adc": sum(m * b for m, b in zip(n, batches))}


def _check(counts, samples, run, flops, held):
    want = Counts(samples=samples, flops=flops, memory=held, **run)
    assert counts.replace(traffic=0) == want
    assert counts.traffic == run["adc"] + 2 * held  # the read-outs written, the held values written and read
    report = cost.estimate(counts)
    assert report.energy > 0 and report.latency > 0
    assert report.memory_bytes == held * cost.hardware("isaac_reram").bytes_per_value


def test_counter_current_counts(phases):
    """Sizes (6, 5, 4, 3), B = 4. Forward: 30 input devices, 20 state, 9 neurons; feedback (K = 3 one-hot
    inputs): 12 input devices, 20 + 30 state, 15 neurons. Digital: per pair of width d (6, 5, 4), S
    2dKB, R 2KB, feedback error 2dKB + 2dK, forward error (layers only) 2dKB + 2dB = 1170; outer
    products (2 x 50 + 9) x 4 + (2 x 62 + 15) x 3 = 853; readout (4 x 3 x 4 + 5 x 3) x 4 = 252;
    clipping (it scales) 3 x (74 + 77) = 453."""
    model = ccl.CounterCurrentModel.layered([6, 5, 4, 3], np.random.default_rng(0))
    x, y = _batch(1, 4, 6, 3)
    step = ccl.CounterCurrent(clip=1e-3).step(model, x, y, REL)
    assert len(phases) == 2
    run = _run(phases, [4, 3], [20, 50], [30, 12], [6, 3], [9, 15])
    _check(step.counts, 4, run, 1170 + 853 + 252 + 453, 2 * (9 * 4 + 15 * 3) + 12)


def test_forward_forward_counts(phases):
    """Sizes (6, 5, 4, 3), B = 4, one negative: per layer (30 and 20 input devices, 5 and 4 neurons) a
    scoring pass of K B = 12 and a training pass of 2 B = 8. Digital: normalisations and goodness 5
    per value of the 20 samples (900), the scores' sums and cross-entropy (2 + 5) x 12 = 84, per
    layer 4 x 8 + 4 d x 8 and the outer products (2 x 30 + 5) x 8, (2 x 20 + 4) x 8."""
    model = ff.ForwardForwardModel.layered([6, 5, 4, 3], np.random.default_rng(0))
    x, y = _batch(2, 4, 6, 3)
    step = ff.ForwardForward().step(model, x, y, REL, np.random.default_rng(3))
    assert len(phases) == 4  # scoring: layer 0, layer 1; training: layer 0, layer 1
    run = _run(phases, [12, 12, 8, 8], [0] * 4, [30, 20, 30, 20], [6, 5, 6, 5], [5, 4, 5, 4])
    flops = 900 + 84 + (32 + 160 + 65 * 8) + (32 + 128 + 44 * 8)
    _check(step.counts, 4, run, flops, 12 + 3 * 5 * 8 + 3 * 4 * 8)


@pytest.mark.parametrize("method,stages", [("euler", 1), ("rk4", 4)])
def test_predictive_coding_counts(phases, method, stages):
    """Sizes (3, 4, 2), B = 5: 12 input devices, 8 state, 6 neurons. The feed-forward pass, then the
    relaxation: 1 + steps x stages field evaluations (the convergence check's evaluation is the next
    step's first stage), each reading the state crossbar forward and transposed, time steps x dt; the
    input and the target converted, values and errors read out. Digital: the outer products (2 x 20 +
    6) x 5 and the division by gamma, one per parameter (26)."""
    model = pc.pc_classifier([3, 4, 2], np.random.default_rng(0))
    x, y = _batch(4, 5, 3, 2)
    rule = pc.PredictiveCoding(method=method, dt=0.3, tol=1e-8)
    step = rule.step(model, x, y, REL)
    relaxed = rule.relax(model.network, x, y, phases[0].u)
    assert relaxed.converged and relaxed.steps > 3 and relaxed.nfev == 1 + relaxed.steps * stages
    free = _run(phases, [5], [8], [12], [3], [6])
    relaxation = {"phases": 1, "steps": relaxed.steps, "nfev": relaxed.nfev, "settle_time": relaxed.steps * 0.3 * 5,
                  "macs": (2 * 8 * relaxed.nfev + 12) * 5, "dac": (3 + 2) * 5, "adc": 2 * 6 * 5}
    run = {k: free[k] + v for k, v in relaxation.items()}
    _check(step.counts, 5, run, 46 * 5 + 26, 2 * 6 * 5)


def test_predictive_coding_counts_the_io_chain_of_both_reads():
    """With converters around every analog product (IOChain; ideal ones, so that the phases settle): per
    field evaluation the forward read of h -> y converts its 4 inputs and 2 outputs, the transposed read
    its 2 inputs and 4 outputs; the input crossbar's 4 outputs once; plus the input (3) and the target
    (2) converted and the values and errors (6 + 6) read out."""
    model = pc.pc_classifier([3, 4, 2], np.random.default_rng(0))
    chip = devices.Device((devices.IOChain(inp_bits=0, out_noise=0.0, out_bits=0),))
    model.network = devices.attach(model.network, chip, np.random.default_rng(1))
    x, y = _batch(4, 5, 3, 2)
    rule = pc.PredictiveCoding(dt=0.3, tol=1e-8)
    relaxed = rule.relax(model.network, x, y, rule._run(model, x, y, REL)[0].u)
    counts = rule.relax_counts(model.network, relaxed)
    assert counts.dac == (3 + 2 + (4 + 2) * relaxed.nfev) * 5
    assert counts.adc == (12 + 4 + (2 + 4) * relaxed.nfev) * 5


@pytest.mark.parametrize("continuous", [False, True])
def test_noprop_counts(phases, monkeypatch, continuous):
    """Sizes (3, 4, 2), B = 5. DT with 2 blocks, each its own circuit: 12 x-line and 8 z-line input
    devices, 8 state devices (h1 -> u), 6 neurons; inference 2 relaxations (block 1, then block 2), 5
    operations per value of z and step. CT (one block, 8 time features, 2 RK4 steps: 8 relaxations): 12 +
    8 + 32 input devices, 8 state, 6 neurons, 5 per value and stage. Then each block's training
    relaxation with its implicit gradient (substrate.adjoint's counts of the solves the step ran,
    recorded by a spy), the weighted error (3 per output), and the readout's 6K^2 + 5K per sample."""
    solves, solve = [], noprop.adjoint_solve
    monkeypatch.setattr(noprop, "adjoint_solve", lambda *a, **k: solves.append(solve(*a, **k)) or solves[-1])
    rule = noprop.NoPropCT() if continuous else noprop.NoPropDT()
    options = {"steps": 2} if continuous else {"blocks": 2}
    model = rule.model([3, 4, 2], np.random.default_rng(0), **options)
    x, y = _batch(5, 5, 3, 2)
    step = rule.step(model, x, y, REL, np.random.default_rng(6))
    blocks = 1 if continuous else 2
    inferred, frees = phases[:-blocks], phases[-blocks:]
    assert len(inferred) == (8 if continuous else 2) and len(solves) == blocks
    inputs, width = (52, 3 + 2 + 8) if continuous else (20, 3 + 2)
    run = _run(inferred, [5] * len(inferred), [8] * len(inferred), [inputs] * len(inferred),
               [width] * len(inferred), [6] * len(inferred))
    trained = [implicit_counts(free, adj) for free, adj in zip(frees, solves)]
    for free, t in zip(frees, trained):
        assert t.macs == (8 * free.nfev + inputs) * 5  # the training relaxation, by hand too
        run = {k: run[k] + getattr(t, k) for k in run}
    flops = 5 * 2 * 5 * len(inferred) + sum(t.flops for t in trained) + 3 * 2 * 5 * blocks + (6 * 4 + 10) * 5
    held = max(max(t.memory for t in trained), 6 * blocks * 5 + 2 * 2 * 5)
    assert step.counts.replace(traffic=0) == Counts(samples=5, flops=flops, memory=held, **run)
    assert cost.estimate(step.counts).energy > 0


def test_train_sums_the_local_rules_counts():
    """One epoch of each rule on 40 digits: the epoch's counts serve the 40 samples (not None: every step
    counted), and include the optimiser's and the writes' work."""
    d = data.load("digits").subset(40, 20)
    rng = np.random.default_rng(0)
    for rule, model in [(ccl.CounterCurrent(), ccl.CounterCurrentModel.layered([64, 8, 10], rng)),
                        (ff.ForwardForward(), ff.ForwardForwardModel.layered([64, 8, 10], rng)),
                        (pc.PredictiveCoding(), pc.pc_classifier([64, 8, 10], rng)),
                        (noprop.NoPropDT(), noprop.NoPropDT().model([64, 8, 10], rng, blocks=2))]:
        hist = train(model, d, rule=rule, optimiser=SGD(0.01), epochs=1, batch_size=20, relaxation=REL,
                     rng=np.random.default_rng(1), probe=0, progress=False)
        counts = hist.epoch_counts()[1]
        assert counts is not None and counts.samples == 40, rule.name
        assert counts.flops > 0 and counts.macs > 0 and counts.phases >= 2, rule.name
