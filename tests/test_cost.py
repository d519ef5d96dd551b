"""The counts the engine reports and the cost model that prices them (substrate.counts, substrate.cost;
docs/equations.md, section 9). Counts are checked exactly against counts made by hand from the
network's shapes and the steps the kernels report; energies against the preset's figures."""

import dataclasses

import numpy as np
import pytest

import substrate as s
from substrate.cost import PRESETS, Hardware, estimate
from substrate.counts import Counts, total


@pytest.fixture(scope="module")
def tiny():
    """3 inputs -> 4 hidden -> 2 outputs with independent feedback: devices 12 (input), 8 + 8 (state)."""
    return s.Network.layered([3, 4, 2], np.random.default_rng(0))


# ------------------------------------------------------------------------------------ Counts
def test_counts_add_sum_and_per_sample():
    a = Counts(samples=2, phases=1, steps=10, nfev=11, settle_time=10.0, macs=100, dac=6, adc=4, memory=8, traffic=8)
    b = Counts(samples=3, phases=2, steps=5, nfev=5, settle_time=2.5, macs=50, pulses=7, write_cycles=3,
               flops=9, memory=20, traffic=4)
    c = a + b
    assert (c.samples, c.phases, c.steps, c.nfev, c.settle_time) == (5, 3, 15, 16, 12.5)
    assert (c.macs, c.dac, c.adc, c.pulses, c.write_cycles, c.flops, c.traffic) == (150, 6, 4, 7, 3, 9, 12)
    assert c.memory == 20  # a peak: the larger, not the sum
    assert sum([a, b]) == c == total([a, b])
    assert total([]) == Counts()
    p = c.per_sample()
    assert p.samples == 1 and p.macs == 30 and p.settle_time == 2.5 and p.memory == 20
    assert a.replace(samples=7).samples == 7 and a.replace(samples=7).macs == 100


@pytest.mark.parametrize("bad, match", [
    ({"macs": -1}, "macs"), ({"steps": float("nan")}, "steps"), ({"adc": True}, "adc"), ({"dac": "3"}, "dac")])
def test_counts_refuse_bad_values(bad, match):
    with pytest.raises(s.SubstrateValueError, match=match):
        Counts(**bad)


def test_counts_bad_operations():
    with pytest.raises(s.SubstrateValueError, match="samples is 0"):
        Counts(macs=3).per_sample()
    with pytest.raises(s.SubstrateValueError, match="unknown field"):
        Counts().replace(joules=1)
    with pytest.raises(TypeError):
        Counts() + 1
    with pytest.raises(s.SubstrateValueError, match="every part"):
        total([Counts(), 3])


# ------------------------------------------------------------------------------------ phases
def test_relax_counts_by_hand(tiny):
    batch = 5
    sol = s.relax(tiny, np.ones((batch, 3)))
    c = sol.counts
    # per field evaluation every state device is read once per sample; the input crossbar once per phase
    assert c.macs == (8 + 8) * sol.nfev * batch + 12 * batch
    # the circuit settles one sample after another, each counted at the batch's time
    assert (c.samples, c.phases, c.steps, c.nfev, c.settle_time) == (batch, 1, sol.steps, sol.nfev, batch * sol.t_final)
    assert c.dac == 3 * batch  # the inputs, once
    assert c.adc == 6 * batch  # every state read out at the end
    assert c.memory == c.traffic == 6 * batch
    assert c.pulses == c.write_cycles == c.flops == 0


def test_integrate_counts_by_hand(tiny):
    sol = s.integrate(tiny, np.ones((2, 3)), t_span=(1.0, 3.0), t_eval=[1.0, 2.0, 3.0], method="rk4", dt=0.5)
    c = sol.counts
    assert sol.steps == 4 and sol.nfev == 16  # rk4: 4 evaluations a step
    assert c.macs == 16 * 16 * 2 + 12 * 2
    assert c.settle_time == 2 * 2.0  # from t0 = 1, for 2 samples
    # the states at 2 and 3 read out; the one at t0 = 1 is the initial state, given
    assert c.adc == 6 * 2 * 2 and c.memory == 6 * 2 * 2


def test_complex_states_count_two_values(tiny):
    sol = s.relax(tiny, np.ones((2, 3)), dtype=np.complex128)
    assert sol.counts.memory == 2 * 6 * 2


def test_masked_positions_are_no_devices():
    layers = [s.Layer("h", 3), s.Layer("y", 2)]
    mask = np.array([[1, 0, 1], [0, 0, 1]], float)
    connections = [s.Connection("x", "h", np.ones((3, 2))), s.Connection("h", "y", np.ones((2, 3)), mask=mask)]
    net = s.Network(layers, connections, [s.Input("x", 2)])
    sol = s.relax(net, np.zeros((1, 2)))
    assert sol.counts.macs == 3 * sol.nfev + 6


# ------------------------------------------------------------------------------------ cost
def test_energy_is_counts_times_the_figures():
    hw = PRESETS["isaac_reram"]
    c = Counts(samples=4, phases=2, steps=30, nfev=31, settle_time=30.0, macs=1000, dac=12, adc=24, pulses=50,
               write_cycles=5, flops=200, memory=48, traffic=96)
    r = estimate(c, hw)
    # by hand, from ISAAC's figures: 1.83 fJ per cell and input bit x 8 bits, 8 one-bit DAC conversions of
    # 0.39 pJ, 8 ADC conversions of 1.5625 pJ, 0.2 pJ a pulse, 2.3 pJ a FLOP, 1.25 pJ a byte of SRAM (2 B a value)
    mac = 8 * 0.3e-3 * 100e-9 / 16384
    expected = {"crossbar": 1000 * mac, "dac": 12 * 8 * 0.390625e-12, "adc": 24 * 8 * 1.5625e-12,
                "writes": 50 * 0.2e-12, "digital": 200 * 2.3e-12, "memory": 96 * 2 * 1.25e-12}
    assert r.breakdown == pytest.approx(expected, rel=1e-12)
    assert r.energy == pytest.approx(sum(expected.values()), rel=1e-12)
    latency = {"settling": 30 * 100e-9, "crossbar": 0.0, "adc": 24 * 8 / 1.28e9 / 96, "writes": 5 * 10e-9,
               "digital": 200 / 128e9}
    assert r.latency_breakdown == pytest.approx(latency, rel=1e-12)
    assert r.latency == pytest.approx(sum(latency.values()), rel=1e-12)
    assert r.memory_bytes == 96
    per = estimate(c, hw, per_sample=True)
    assert per.energy == pytest.approx(r.energy / 4, rel=1e-12)
    assert per.memory_bytes == r.memory_bytes  # a peak is not divided


def test_memory_beyond_the_sram_is_dram():
    hw = dataclasses.replace(PRESETS["isaac_reram"], sram_bytes=100)
    small, large = Counts(memory=50, traffic=10), Counts(memory=51, traffic=10)
    assert estimate(small, hw).breakdown["memory"] == pytest.approx(20 * hw.sram)
    assert estimate(large, hw).breakdown["memory"] == pytest.approx(20 * hw.dram)


def test_a_user_preset_in_a_few_lines():
    mine = dataclasses.replace(PRESETS["isaac_reram"], name="mine", pulse=1e-12)
    c = Counts(pulses=10)
    assert estimate(c, mine).energy == pytest.approx(1e-11)
    assert estimate(c, mine).hardware == "mine"
    scratch = Hardware(name="scratch", tau=1e-6, mac=1e-15, dac=0, adc=0, adc_time=0, adc_units=1, pulse=0,
                       pulse_time=0, flop=0, flop_time=0, sram=0, dram=0, sram_bytes=0, bytes_per_value=1)
    assert estimate(Counts(settle_time=3.0, macs=7), scratch).latency == pytest.approx(3e-6)


def test_digital_baseline_pays_its_macs_in_time():
    hw = PRESETS["digital_45nm"]
    r = estimate(Counts(settle_time=10.0, macs=100), hw)
    assert r.latency_breakdown["settling"] == 0 and r.latency == pytest.approx(100 * hw.mac_time)
    assert r.energy == pytest.approx(100 * 4.6e-12)


def test_cost_bad_input():
    with pytest.raises(s.SubstrateValueError, match="hardware"):
        estimate(Counts(), "tpu")
    with pytest.raises(s.SubstrateValueError, match="counts must be"):
        estimate({"macs": 1})
    with pytest.raises(s.SubstrateValueError, match="per_sample"):
        estimate(Counts(samples=1), per_sample=1)
    with pytest.raises(s.SubstrateValueError, match="tau"):
        dataclasses.replace(PRESETS["isaac_reram"], tau=-1.0)
    with pytest.raises(s.SubstrateValueError, match="adc_units"):
        dataclasses.replace(PRESETS["isaac_reram"], adc_units=0)


# ------------------------------------------------------------------------------------ EP and gradients
def _ep_problem(tiny):
    x = np.linspace(-1, 1, 15).reshape(5, 3)
    y = np.eye(2)[[0, 1, 0, 1, 0]] * 0.5
    return x, y


@pytest.mark.parametrize("name, phases", [("one_sided", 2), ("centred", 3), ("holomorphic", 4)])
def test_ep_counts_by_hand(tiny, name, phases):
    from models import ep

    x, y = _ep_problem(tiny)
    estimator = {"one_sided": ep.OneSided(0.1), "centred": ep.Centred(0.1), "holomorphic": ep.Holomorphic(4, 0.1)}[name]
    est = ep.estimate(tiny, x, y, s.Cost("y"), estimator)
    sols = [est.free] + est.nudged
    # one-sided: free, +beta (its nudged tolerance is tol itself here: no re-relaxation of the free
    # phase); centred: free, +beta, -beta; holomorphic N = 4: free, +beta, i beta (its conjugate folded in), -beta
    assert len(sols) == phases
    c, batch, n = est.counts, 5, 6
    assert c.samples == batch and c.phases == phases
    assert c.steps == sum(p.steps for p in sols) and c.nfev == sum(p.nfev for p in sols)
    assert c.settle_time == sum(p.t_final for p in sols) * batch
    assert c.macs == sum((8 + 8) * p.nfev * batch + 12 * batch for p in sols)
    assert c.dac == 3 * batch * phases + 2 * batch  # the inputs per phase, the targets once
    assert c.adc == n * batch * phases
    values = [2 if p.u.dtype.kind == "c" else 1 for p in sols]
    # the error vector (2 per neuron, sample and phase; complex 2 values), the gradient 2 per device and sample + biases
    assert c.flops == sum(2 * n * batch * v for v in values) + (2 * 28 + n) * batch
    assert c.memory == sum(n * batch * v for v in values) + n * batch + 2 * batch


def test_implicit_gradient_counts_by_hand(tiny):
    x, _ = _ep_problem(tiny)

    def loss(u):
        g = np.zeros_like(u)
        g[:, -2:] = u[:, -2:]
        return 0.5 * np.sum(u[:, -2:] ** 2), g

    g = s.gradient(tiny, x, loss, method=s.Implicit("direct"))
    c, n, batch = g.counts, 6, 5
    fwd = g.solution.counts
    assert (c.phases, c.steps, c.macs, c.adc) == (1, fwd.steps, fwd.macs, n * batch)
    assert c.flops == (2 * n ** 3 // 3 + 4 * n * n) * batch + (2 * 28 + n) * batch
    assert c.memory == (3 * n * batch + n * n * batch)


def test_implicit_counts_of_a_solve_made_apart(tiny):
    """substrate.adjoint.implicit_counts on a relaxation and an adjoint solve made by the caller (as the
    implicit training rule does), by hand: the relaxation's counts, then the solve (dense LU, or GMRES's
    measured J^T products at 2 per state device and 4 per neuron, its basis held) and the parameter
    gradient in digital."""
    from substrate.adjoint import adjoint_solve, implicit_counts

    x, _ = _ep_problem(tiny)
    sol = s.relax(tiny, x, tol=1e-10)
    rhs = np.zeros_like(sol.u)
    rhs[:, -2:] = 1.0
    n, batch, fwd, grad = 6, 5, sol.counts, (2 * 28 + 6) * 5
    direct = implicit_counts(sol, adjoint_solve(sol.field, sol.u, rhs, s.Implicit("direct")))
    assert (direct.steps, direct.macs, direct.adc) == (fwd.steps, fwd.macs, fwd.adc)
    assert direct.flops == fwd.flops + (2 * n ** 3 // 3 + 4 * n * n) * batch + grad
    assert direct.memory == 3 * n * batch + n * n * batch
    adj = adjoint_solve(sol.field, sol.u, rhs, s.Implicit("krylov"))
    krylov = implicit_counts(sol, adj)
    assert adj.products > 0 and krylov.flops == fwd.flops + adj.products * (2 * 16 + 4 * n) * batch + grad
    assert krylov.memory == 3 * n * batch + (min(adj.products, n * batch) + 1) * n * batch


def test_discrete_adjoint_counts_by_hand(tiny):
    x, _ = _ep_problem(tiny)

    def loss(u):
        return 0.5 * np.sum(u ** 2), u.copy()

    n, batch, steps = 6, 5, 8
    full = s.gradient(tiny, x, loss, method=s.DiscreteAdjoint(), t_span=(0, 4.0), dt=0.5, integrator="exp_euler")
    kept = s.gradient(tiny, x, loss, method=s.DiscreteAdjoint(checkpoints=2), t_span=(0, 4.0), dt=0.5,
                      integrator="exp_euler")
    assert full.solution.steps == steps
    a, b = full.counts, kept.counts
    # every state stored: the 7 before steps 2..8 read out, and the final state (the result)
    assert a.adc == n * batch * steps and a.macs == (16 * full.solution.nfev + 12) * batch
    # backward: per step a W^T product and the weight gradient (4 per device and sample) and 6 per neuron;
    # the input weights' gradient
    assert a.flops == steps * (4 * 16 + 6 * n) * batch + 2 * 12 * batch
    # checkpoints=2 of the forward's step bound, 11: a checkpoint every 6 steps, the states at 0 and 6
    # stored (one read, and the result); bisection replays 7 steps in the segment of 6, 1 in that of 2
    assert b.adc == n * batch * (1 + 1)
    assert b.flops == steps * (4 * 16 + 6 * n) * batch + (7 + 1) * (2 * 16 + 4 * n) * batch + 2 * 12 * batch
    assert b.memory < a.memory


def test_replayed_steps_follow_the_bisection():
    from substrate.adjoint import replayed_steps

    # a segment of 4: m=3 from 0 (0->2, 2->3: 3 steps), m=2 found, m=1 (0->1: 1 step), m=0 found
    assert [replayed_steps(k) for k in (0, 1, 2, 4, 6)] == [0, 0, 1, 4, 7]


def test_pulsed_writes_count_the_pulses_applied():
    from substrate import devices as D

    dn = D.attach(s.Network.layered([3, 4, 2], np.random.default_rng(0)), D.preset("reram_sb"),
                  np.random.default_rng(1))
    c = dn.connection("x->h1")
    up = dn.device.update
    step = up.dw_step * dn.device.weight_scale
    before = c.weight.copy()
    change = np.zeros_like(before)
    change[0, 0], change[1, 2], change[3, 1] = 2 * step, -5 * step, 100 * step  # the last capped
    c.weight[...] = before + change
    counts = dn.write()
    assert counts.pulses == 2 + 5 + up.max_pulses and counts.write_cycles == up.max_pulses
    assert s.Network.layered([3, 4, 2], np.random.default_rng(0)).write() == Counts(pulses=28, write_cycles=1)


# ------------------------------------------------------------------------------------ training
class _Counted:
    """Centred EP whose steps report made-up counts (one MAC per sample), or none."""

    def __init__(self, counted):
        from models.train import Rule

        class Rule_(Rule):
            name = "counted"

            def step(self, model, x, y, relaxation, rng):
                from models import ep
                from models.train import Step, named_gradients

                est = ep.estimate(model.network, x, y, model.cost, ep.Centred(0.2), relaxation)
                return Step(named_gradients(est), est.loss, est.logits, est.converged,
                            Counts(samples=len(x), macs=len(x), memory=1) if counted else None)

        self.rule = Rule_()


@pytest.fixture(scope="module")
def digits_tiny():
    from models.data import digits

    return digits().subset(64, 20, np.random.default_rng(2))


def _train_tiny(data, rule, optimiser):
    from models.train import Classifier, train

    rng = np.random.default_rng(0)
    model = Classifier.layered([64, 8, 10], rng)
    return model, train(model, data, rule=rule, optimiser=optimiser, epochs=1, batch_size=32, rng=rng,
                        progress=False, probe=0)


def test_training_counts_every_step_its_optimiser_and_writes(digits_tiny):
    from models.train import SGD, Adam

    model, hist = _train_tiny(digits_tiny, _Counted(True).rule, SGD(0.05, 0.9))
    before, epoch = hist.epoch_counts()
    assert before == Counts()
    entries = sum(p.size for p in model.parameters().values())  # 64x8 + 8 + 10x8 + 10
    devices = 64 * 8  # the network's one crossbar, inputs to the 8 neurons (the readout is digital)
    batches = 2
    assert (epoch.samples, epoch.macs) == (64, 64)
    assert epoch.flops == batches * 4 * entries  # SGD with momentum: 4 operations an entry
    assert epoch.memory == entries  # the momentum, the largest thing held
    assert epoch.pulses == batches * devices and epoch.write_cycles == batches  # no device: every weight once
    _, hist = _train_tiny(digits_tiny, _Counted(True).rule, Adam(1e-3))
    assert hist.epoch_counts()[1].flops == batches * 14 * entries and hist.epoch_counts()[1].memory == 2 * entries
    _, hist = _train_tiny(digits_tiny, _Counted(False).rule, SGD(0.05))
    assert hist.epoch_counts()[1] is None
    assert "counts" not in hist.arrays()  # archives take arrays(): no new variables unless a study asks


def test_ep_training_counts_its_phases(digits_tiny):
    from models import ep
    from models.train import SGD

    _, hist = _train_tiny(digits_tiny, ep.Centred(0.2), SGD(0.05))
    c = hist.epoch_counts()[1]
    assert c.samples == 64 and c.phases == 2 * 3  # two batches of free, +beta, -beta
    # no state crossbar (one layer of 8 driven by the inputs): the input crossbar read once a phase
    assert c.macs == 6 * 64 * 8 * 32
    assert c.adc == 6 * 8 * 32 and c.dac == 6 * 64 * 32 + 2 * 10 * 32  # the states; the inputs, the targets
    assert c.pulses == 2 * 64 * 8


# ------------------------------------------------------------------------------------ error regression
def test_error_regression_counts_by_hand():
    from models import pvrnn

    model = pvrnn.PVRNN([{"units": 6, "latents": 2, "tau": 2.0}, {"units": 4, "latents": 1, "tau": 4.0}], 3,
                        np.random.default_rng(0), substeps=2)
    er = pvrnn.ErrorRegression(window=5, iterations=10, draws=2, horizon=3)
    c = pvrnn.window_counts(model, er, 5)
    # per substep: W_dd 6x6 + 4x4, W_zd 6x2 + 4x1, W_td 6x4; per data step: W_mu, W_sig 2x6 + 1x4 each, out 3x6
    substep, step = 36 + 16 + 12 + 4 + 24, 2 * (12 + 4) + 18
    data_steps = (10 + 2 * 2 + 1) * 5 + 3  # 10 iterations, F before and after over 2 draws, the means, 3 predicted
    assert c.macs == data_steps * (2 * substep + step) and c.settle_time == data_steps
    assert c.dac == data_steps * 3 and c.adc == data_steps * 3  # 3 latents in, 3 outputs read
    assert c.flops == 10 * (2 * 5 * (2 * substep + step) + 14 * 2 * 5 * 3)
    exact = c.memory
    truncated = pvrnn.window_counts(model, dataclasses.replace(er, credit="truncated", truncation=2), 5)
    assert exact - truncated.memory == (5 - 2) * (2 * 10 + 6 * 3 + 3)  # fewer states held per chunk
    assert truncated.macs == c.macs
    with pytest.raises(s.SubstrateValueError, match="er must be"):
        pvrnn.window_counts(model, "er", 5)


# ------------------------------------------------------------------------------------ diffusion
def test_dpm_adjoint_against_backprop_in_memory():
    torch = pytest.importorskip("torch")
    from models import dpm

    model = dpm.NoisePredictor(3, classes=2, hidden=5, depth=2, embed=2, frequencies=1,
                               generator=torch.Generator().manual_seed(0))
    # linear layers 8->5, 5->5, 5->3 (inputs: x 3, time features 1 + 2, embedding 2) and the skip's two
    # 3x3 products; activations: two hidden layers before and after SiLU, the output, the inputs
    weights, acts = 40 + 25 + 15 + 18, 2 * 5 + 2 * 5 + 3 + 8
    params = sum(p.numel() for p in model.parameters())
    short, long = (dpm.gradient_counts(model, 4, "rk4", k) for k in (10, 20))
    for c, evals in ((short, 40), (long, 80)):
        assert c["backprop"].macs == evals * weights * 4 and c["adjoint"].macs == 2 * evals * weights * 4
        assert c["backprop"].flops == c["adjoint"].flops == evals * 4 * weights * 4
    # backprop holds every evaluation's activations and every step's state; the adjoint does not grow
    assert long["backprop"].memory - short["backprop"].memory == 40 * acts * 4 + 10 * 3 * 4
    assert long["adjoint"].memory == short["adjoint"].memory == 5 * (2 * 3 * 4 + 2 * 4 + params) + acts * 4
    with pytest.raises(s.SubstrateValueError, match="solver"):
        dpm.gradient_counts(model, 4, "heun", 10)
