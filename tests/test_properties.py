"""Property-based checks (hypothesis) of the public constructors and calls (issue 15): whatever one
argument is, valid or not, the only outcomes are a result or a substrate error whose message names
that argument (:class:`SubstrateValueError`), or a failure of the dynamics (:class:`IntegrationError`,
a legitimate outcome of some valid inputs: too few steps, a stiff circuit).

Each test varies one argument of one call, all others at valid values, over a strategy that mixes the
argument's valid values with bad ones (wrong types, NaN/Inf, negative, zero, 10**30, strings, wrong
shapes). ``derandomize=True``: the examples are the same on every run, so that the fast suite is
reproducible; ``max_examples`` bounds its time (the whole file ~20 s on one core, measured).
"""

from dataclasses import dataclass

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import substrate as S  # noqa: E402
from substrate import devices as D  # noqa: E402
from substrate.errors import IntegrationError, SubstrateValueError  # noqa: E402

EXAMPLES = 12
SETTINGS = settings(derandomize=True, max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def _bad_values():
    nan, inf = float("nan"), float("inf")
    return [None, "x", "", nan, inf, -inf, -1, 0, -0.5, 10 ** 30, -(10 ** 30), 1e300, True, 1j, [], [1.0, 2.0],
            np.ones((2, 2)), np.full(3, nan), np.zeros((0,)), {}, ("a", 1), object()]


BAD = st.one_of(st.sampled_from(_bad_values()), st.integers(), st.floats(), st.text(max_size=4))
REAL = st.floats(min_value=-10, max_value=10, allow_nan=False)
POSITIVE = st.floats(min_value=0.05, max_value=10)


def arrays(shape, lo=-1.0, hi=1.0):
    """Real arrays of ``shape``, finite, from a seed (fast to draw, shrinks to the seed)."""
    return st.integers(0, 2 ** 16).map(lambda s: np.random.default_rng(s).uniform(lo, hi, shape))


def rngs():
    return st.integers(0, 2 ** 16).map(np.random.default_rng)


@dataclass
class Case:
    """``call(**kwargs)`` with ``defaults`` (valid); each argument of ``valid`` is varied in its own
    test over its valid values and BAD."""

    name: str
    call: object
    defaults: dict
    valid: dict


def net(sizes=(3, 4, 2), seed=0, **options):
    return S.Network.layered(list(sizes), np.random.default_rng(seed), **options)


NET = net()
X = np.random.default_rng(1).uniform(size=(2, 3))


def _square_loss(u):
    return float(np.sum(u * u)), 2 * u


def _layer(**kw):
    return S.Layer(**kw)


def _connection(**kw):
    return S.Network([S.Layer("h", 3), S.Layer("y", 2)], [S.Connection(**kw)])


def _cost_nudge(beta=0.5, target=None, **cost):
    c = S.Cost(**cost)
    y = np.zeros((2, 2)) if target is None else target
    return S.relax(NET, X, nudge=S.Nudge(c, beta, y), max_steps=2000)


def _cross_entropy(**kw):
    args = dict(layer="h1", kind="cross_entropy", readout_weight=np.ones((2, 4)), readout_bias=np.zeros(2))
    args.update(kw)
    return S.relax(NET, X, nudge=S.Nudge(S.Cost(**args), 0.5, np.full((2, 2), 0.5)), max_steps=2000)


def _nudge(**kw):
    return S.relax(NET, X, nudge=S.Nudge(**kw), max_steps=2000)


def _effect(cls):
    def call(**kw):
        dev = D.Device((cls(**kw),))
        hw = D.attach(NET, dev, np.random.default_rng(0))
        return S.relax(hw, X, max_steps=2000, on_failure="return")
    return call


def _device(**kw):
    return D.attach(NET, D.Device(**kw), np.random.default_rng(0))


def _attach(**kw):
    return D.attach(**kw)


CASES = [
    Case("Layer", _layer, dict(name="h", size=3),
         dict(name=st.text(min_size=1, max_size=3), size=st.integers(1, 8), tau=POSITIVE,
              activation=st.sampled_from(sorted(S.ACTIVATIONS)), bias=st.none() | arrays(3))),
    Case("Connection", _connection, dict(pre="h", post="y", weight=np.zeros((2, 3))),
         dict(pre=st.sampled_from(["h", "y"]), post=st.sampled_from(["y"]), weight=st.none() | arrays((2, 3)),
              mask=st.none() | arrays((2, 3)).map(lambda a: a > 0), tied=st.booleans())),
    Case("Network.layered", lambda **kw: S.Network.layered(**kw), dict(sizes=[3, 4, 2], rng=np.random.default_rng(0)),
         dict(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4), rng=rngs(),
              activation=st.sampled_from(["tanh", "logistic"]), tau=POSITIVE,
              feedback=st.sampled_from(["tied", "independent", "none"]), asymmetry_angle=st.floats(0, 180),
              lateral=st.booleans(), loop=st.booleans(), init_scale=POSITIVE,
              dtype=st.sampled_from(["float64", "float32"]))),
    Case("Network.from_config", lambda **kw: S.Network.from_config(**kw), dict(config={"sizes": [3, 2]}, seed=0),
         dict(config=st.lists(st.integers(1, 6), min_size=2, max_size=3).map(lambda s: {"sizes": s}),
              seed=st.integers(0, 2 ** 31))),
    Case("relax", lambda **kw: S.relax(NET, **kw), dict(x=X),
         dict(x=arrays((2, 3)), method=st.sampled_from(sorted(S.METHODS)), dt=st.none() | st.floats(0.01, 0.5),
              tol=st.floats(1e-8, 1e-2), rtol=st.floats(0, 1e-2), u0=st.none() | arrays((2, 6)),
              dtype=st.sampled_from([None, "float64"]), max_time=st.floats(1.0, 100.0),
              max_steps=st.integers(1, 5000), blowup=st.floats(10.0, 1e12), on_failure=st.just("return"))),
    Case("integrate", lambda **kw: S.integrate(NET, **kw), dict(x=X, t_span=(0.0, 1.0), dt=0.1),
         dict(x=arrays((2, 3)), t_span=st.tuples(st.floats(0, 1), st.floats(1.5, 3)),
              t_eval=st.none() | st.just([0.5, 1.0]), method=st.sampled_from(["euler", "rk4"]),
              dt=st.floats(0.01, 0.5), u0=st.none() | arrays((2, 6)), rtol=st.floats(1e-8, 1e-2),
              atol=st.floats(1e-10, 1e-4), max_steps=st.integers(1, 5000), blowup=st.floats(10.0, 1e12),
              on_failure=st.sampled_from(["raise", "return"]))),
    Case("gradient", lambda **kw: S.gradient(NET, **kw), dict(x=X, loss=_square_loss, t_span=(0.0, 1.0), dt=0.1),
         dict(x=arrays((2, 3)), loss=st.just(_square_loss), t_span=st.tuples(st.floats(0, 0.5), st.floats(1, 2)),
              integrator=st.sampled_from(["euler", "rk4"]), dt=st.floats(0.05, 0.5), u0=st.none() | arrays((2, 6)),
              rtol=st.floats(1e-8, 1e-2), atol=st.floats(1e-10, 1e-4), max_steps=st.integers(20, 5000),
              blowup=st.floats(10.0, 1e12))),
    Case("VectorField", lambda **kw: S.VectorField(NET, **kw), dict(x=X),
         dict(x=arrays((2, 3)), batch=st.none(), dtype=st.sampled_from([None, "float64"]))),
    Case("Cost", _cost_nudge, dict(layer="y"),
         dict(layer=st.just("y"), kind=st.just("squared_error"))),
    Case("Cost(cross_entropy)", _cross_entropy, {},
         dict(readout_weight=arrays((2, 4)), readout_bias=arrays(2))),
    Case("Input", lambda **kw: S.Network([S.Layer("h", 2)], [S.Connection("x", "h", np.ones((2, 3)))],
                                         [S.Input(**kw)]), dict(name="x", size=3),
         dict(size=st.just(3))),  # (another name is a connection's error: from an unknown input)
    Case("Nudge", _nudge, dict(cost=S.Cost("y"), beta=0.5, target=np.zeros((2, 2))),
         dict(cost=st.just(S.Cost("y")), beta=REAL, target=arrays((2, 2)))),
    Case("Device", _device, dict(),
         dict(effects=st.just(()) | st.just((D.ReadNoise(0.01),)), weight_scale=POSITIVE, name=st.text(max_size=4),
              citation=st.text(max_size=4))),
    Case("attach", _attach, dict(network=NET, device=D.preset("ideal"), rng=np.random.default_rng(0)),
         dict(network=st.just(NET), device=st.sampled_from(sorted(D.PRESETS)).map(D.preset), rng=rngs())),
    Case("preset", lambda **kw: D.preset(**kw), dict(name="ideal"), dict(name=st.sampled_from(sorted(D.PRESETS)))),
]

# every effect with every argument, over the ranges its docstring allows
EFFECTS = {
    D.ActivationMismatch: dict(gain_spread=st.floats(0, 0.2), offset_spread=st.floats(0, 0.2)),
    D.ConductanceMapping: dict(g_max=POSITIVE, on_off=st.floats(2, 100), w_max=st.none() | POSITIVE),
    D.Drift: dict(t0=POSITIVE, nu=st.none() | st.floats(0, 0.1), nu_dtod=st.floats(0, 0.1), scale=st.floats(0, 2),
                  compensation=st.booleans()),
    D.IOChain: dict(inp_bits=st.integers(1, 12), inp_bound=POSITIVE, out_noise=st.floats(0, 0.1),
                    out_bits=st.integers(1, 12), out_bound=POSITIVE),
    D.PCMReadNoise: dict(t_read=st.floats(1e-8, 1e-6), t0=POSITIVE, scale=st.floats(0, 2),
                         policy=st.sampled_from(sorted(D.READ_POLICIES))),
    D.ProgrammingNoise: dict(scale=st.floats(0, 2), g_max_reference=POSITIVE),
    D.Quantisation: dict(levels=st.integers(2, 64)),
    D.ReadNoise: dict(sigma=st.floats(0, 0.1), relative=st.booleans(), policy=st.sampled_from(sorted(D.READ_POLICIES))),
    D.RelaxationTime: dict(duration=POSITIVE),
    D.StateNoise: dict(sigma=st.floats(0, 0.1)),
    D.StuckAt: dict(fraction=st.floats(0, 0.5), value=st.sampled_from(["min", "max", "zero"])),
    D.TauMismatch: dict(spread=st.floats(0, 0.3)),
}
CASES += [Case(f"devices.{cls.__name__}", _effect(cls), {}, valid) for cls, valid in EFFECTS.items()]


def _pulses(cls):
    def call(**kw):
        model, rng = cls(**kw), np.random.default_rng(0)
        devices = model.devices(4, rng)
        return model.apply(model.initial(np.zeros(4), devices), np.full(4, 0.01), devices, rng)
    return call


PULSED = dict(dw_min=st.floats(1e-4, 0.01), dw_min_dtod=st.floats(0, 0.5), dw_min_std=st.floats(0, 0.5),
              up_down=st.floats(-0.5, 0.5), up_down_dtod=st.floats(0, 0.1), w_max=st.floats(0.1, 1),
              w_max_dtod=st.floats(0, 0.5), w_min=st.floats(-1, -0.1), w_min_dtod=st.floats(0, 0.5),
              max_pulses=st.integers(1, 100))
UPDATES = {
    D.ConstantStep: PULSED,
    D.SoftBounds: dict(PULSED, mult_noise=st.booleans()),
    D.LinearStep: dict(PULSED, gamma_up=st.floats(0, 1), gamma_down=st.floats(0, 1), gamma_up_dtod=st.floats(0, 0.1),
                       gamma_down_dtod=st.floats(0, 0.1), mean_bound_reference=st.booleans(), mult_noise=st.booleans()),
    D.ExpStep: dict(PULSED, A_up=st.floats(1e-4, 1), A_down=st.floats(1e-4, 1), gamma_up=st.floats(0, 20),
                    gamma_down=st.floats(0, 20), a=st.floats(0, 1), b=st.floats(0, 1)),
    D.NeuroSimNonlinear: dict(states=st.integers(2, 200), nl_up=st.floats(-5, 5), nl_down=st.floats(-5, 5),
                              on_off=st.floats(2, 100), c2c=st.floats(0, 0.1), max_pulses=st.integers(1, 100)),
}
CASES += [Case(f"devices.{cls.__name__}", _pulses(cls), {}, valid) for cls, valid in UPDATES.items()]


def _pvrnn_cases():
    from models import pvrnn

    def model(**kw):
        args = dict(layers=[pvrnn.PVLayer(4, 2, 2.0)], outputs=2, rng=np.random.default_rng(0))
        args.update(kw)
        return pvrnn.PVRNN(**args)

    m = model()
    seq = np.random.default_rng(2).uniform(-0.5, 0.5, (2, 4, 2))
    return [
        Case("PVLayer", lambda **kw: pvrnn.PVLayer(**kw), dict(units=4, latents=2, tau=2.0),
             dict(units=st.integers(1, 8), latents=st.integers(1, 4), tau=st.floats(1, 20), w=st.floats(0, 1),
                  w_first=st.floats(0, 2))),
        Case("PVRNN", model, {},
             dict(layers=st.just([pvrnn.PVLayer(3, 1, 4.0), {"units": 2, "latents": 1, "tau": 2.0}]),
                  outputs=st.integers(1, 4), rng=rngs(), substeps=st.integers(1, 4),
                  method=st.sampled_from(["euler", "exp_euler"]), posterior_weights=st.booleans())),
        Case("pvrnn.train", lambda **kw: pvrnn.train(m, progress=False, **kw),
             dict(x=seq, epochs=1, rng=np.random.default_rng(0)),
             dict(x=arrays((2, 4, 2), -0.5, 0.5), epochs=st.integers(0, 2), rng=rngs(), lr=st.floats(1e-4, 1e-2),
                  A=st.none() | st.just(m.adaptive_vectors(2, 4)))),
        Case("PVRNN.generate", lambda **kw: m.generate(**kw), dict(sequences=1, steps=3, rng=None),
             dict(sequences=st.integers(1, 3), steps=st.integers(1, 5), rng=st.none() | rngs())),
        Case("pvrnn.error_regression", lambda **kw: pvrnn.error_regression(m, **kw),
             dict(x=seq[0], er=pvrnn.ErrorRegression(window=2, iterations=2), rng=np.random.default_rng(0)),
             dict(x=arrays((4, 2), -0.5, 0.5), rng=rngs(),
                  er=st.builds(pvrnn.ErrorRegression, window=st.integers(1, 3), iterations=st.integers(1, 3),
                               lr=st.floats(1e-3, 0.1)))),
        Case("pvrnn.DeviceCircuit", lambda **kw: pvrnn.DeviceCircuit(**kw),
             dict(model=m, device=D.Device((D.TauMismatch(0.1),)), seed=0),
             dict(model=st.just(m), device=st.just(D.Device((D.ReadNoise(0.05),))), seed=st.integers(0, 2 ** 31 - 1))),
        Case("ErrorRegression", lambda **kw: pvrnn.ErrorRegression(**kw), {},
             dict(window=st.integers(1, 20), iterations=st.integers(1, 100), lr=st.floats(1e-4, 1),
                  newest=st.sampled_from(["copy", "prior", "zeros"]), meta_prior=st.none() | st.just((0.1,)),
                  horizon=st.integers(1, 5), draws=st.just(1))),
    ]


def _ep_cases():
    from models import ep

    cost = S.Cost("y")
    y = np.zeros((2, 2))
    return [
        Case(f"ep.{cls.__name__}", lambda cls=cls, **kw: ep.estimate(NET, X, y, cost, estimator=cls(**kw)), {},
             dict(beta=st.floats(0.01, 0.5))) for cls in (ep.Centred, ep.OneSided, ep.Negative)
    ] + [
        Case("ep.Holomorphic", lambda **kw: ep.Holomorphic(**kw), {},
             dict(points=st.integers(2, 8), beta=st.floats(0.01, 0.5))),
        Case("ep.RotatingHolomorphic", lambda **kw: ep.RotatingHolomorphic(**kw), {},
             dict(points=st.integers(2, 8), beta=st.floats(0.01, 0.5), duration=POSITIVE, periods=st.integers(1, 3))),
        Case("ep.Relaxation", lambda **kw: ep.free_phase(NET, X, relaxation=ep.Relaxation(**kw)), {},
             dict(method=st.sampled_from(["exp_euler", "euler"]), dt=st.none() | st.floats(0.05, 0.5),
                  tol=st.floats(1e-8, 1e-3), max_steps=st.integers(1, 3000),
                  nudged_max_steps=st.none() | st.integers(1, 3000), on_failure=st.sampled_from(["return", "record"]))),
        Case("ep.Exact", lambda **kw: ep.estimate(NET, X, y, cost, estimator=ep.Exact(**kw)), {},
             dict(solver=st.sampled_from(["direct"]))),
        Case("ep.make_estimator", lambda **kw: ep.make_estimator(**kw), dict(name="centred"),
             dict(name=st.sampled_from(sorted(ep.ESTIMATORS)))),
        Case("ep.estimate", lambda **kw: ep.estimate(NET, **kw), dict(x=X, y=y, cost=cost),
             dict(x=arrays((2, 3)), y=arrays((2, 2)), cost=st.just(cost))),
    ]


def _train_cases():
    from models import train as T
    from models.data import Dataset

    rng = np.random.default_rng(10)
    data = Dataset("tiny", rng.uniform(size=(6, 3)), rng.integers(0, 2, 6), rng.uniform(size=(4, 3)),
                   rng.integers(0, 2, 4), 2, (3,))
    model = T.Classifier.layered([3, 3, 2], np.random.default_rng(0), cost="squared_error")
    return [Case("train.train", lambda **kw: T.train(model, data, progress=False, **kw),
                 dict(epochs=1, batch_size=3, rng=np.random.default_rng(0), probe=0),
                 dict(epochs=st.integers(0, 1), batch_size=st.integers(1, 6), rng=rngs(), probe=st.integers(0, 4)))]


def _dpm_cases():
    torch = pytest.importorskip("torch")
    from models import dpm

    sch = dpm.VPSchedule()
    g = torch.Generator().manual_seed(0)
    m = dpm.NoisePredictor(2, classes=2, hidden=4, depth=1, generator=g)
    c = m.embedding(0).detach()
    times = dpm.grid(sch, 2)
    x_T = torch.zeros(3, 2, dtype=torch.float64)

    def square(x):
        return float((x ** 2).sum()), 2 * x

    def tensors(shape):
        return arrays(shape).map(torch.as_tensor)

    return [
        Case("dpm.VPSchedule", lambda **kw: dpm.VPSchedule(**kw), {},
             dict(beta_0=st.floats(0.01, 1), beta_1=st.floats(5, 30), t_min=st.floats(1e-4, 0.1))),
        Case("dpm.NoisePredictor", lambda **kw: dpm.NoisePredictor(**kw), dict(dim=2),
             dict(dim=st.integers(1, 3), classes=st.integers(1, 3), hidden=st.integers(1, 4), depth=st.integers(1, 2),
                  embed=st.integers(1, 3), frequencies=st.integers(0, 3), gaussian_skip=st.booleans())),
        Case("dpm.grid", lambda **kw: dpm.grid(sch, **kw), dict(steps=3),
             dict(steps=st.integers(1, 20), kind=st.sampled_from(list(dpm.GRIDS)))),
        Case("dpm.sample", lambda **kw: dpm.sample(m, sch, **kw), dict(x_T=x_T, c=c, times=times),
             dict(x_T=tensors((3, 2)), c=st.just(c), times=st.sampled_from([times, dpm.grid(sch, 3, "uniform_t")]),
                  ode=st.sampled_from(list(dpm.ODES)), solver=st.sampled_from(list(dpm.SOLVERS)))),
        Case("dpm.adjoint", lambda **kw: dpm.adjoint(m, sch, loss_grad=square, **kw),
             dict(x_T=x_T, c=c, times=times),
             dict(x_T=tensors((3, 2)), times=st.just(times), solver=st.sampled_from(["euler", "dpm1"]))),
        Case("dpm.customise", lambda **kw: dpm.customise(m, sch, x_T, c, times, square, **kw),
             dict(what="noise", steps=1), dict(what=st.sampled_from(["noise", "conditioning"]),
                                               steps=st.integers(1, 2), lr=st.floats(1e-3, 0.1))),
        Case("dpm.train", lambda **kw: dpm.train(dpm.NoisePredictor(2, hidden=4, depth=1), sch, progress=False, **kw),
             dict(x=np.zeros((8, 2)), steps=1, batch=4, generator=torch.Generator().manual_seed(0)),
             dict(x=arrays((8, 2)), steps=st.integers(1, 2), batch=st.integers(1, 8), lr=st.floats(1e-4, 1e-2),
                  uncond=st.floats(0, 1), generator=st.integers(0, 9).map(lambda s: torch.Generator().manual_seed(s)))),
    ]


CASES += _pvrnn_cases() + _ep_cases() + _train_cases() + _dpm_cases()

def _params():
    for case in CASES:
        for arg in case.valid:
            yield pytest.param(case, arg, id=f"{case.name}-{arg}")


def check_outcome(case, arg, value):
    """Call ``case`` with ``arg=value``: a result, an IntegrationError, or a SubstrateValueError that
    names ``arg``; anything else (a raw TypeError, IndexError, numpy/torch error) fails."""
    kwargs = dict(case.defaults)
    kwargs[arg] = value
    try:
        with np.errstate(all="ignore"):
            case.call(**kwargs)
    except SubstrateValueError as e:
        assert arg in str(e), f"{case.name}({arg}={value!r}): the message does not name {arg!r}: {e}"
    except IntegrationError:
        pass


@pytest.mark.parametrize("case, arg", list(_params()))
def test_one_argument_valid_or_bad(case, arg):
    for value in _bad_values():  # every fixed bad value, then hypothesis's mix of valid and random ones
        check_outcome(case, arg, value)

    @SETTINGS
    @given(value=st.one_of(case.valid[arg], BAD))
    def run(value):
        check_outcome(case, arg, value)

    run()
