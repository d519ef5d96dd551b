"""Bad input is rejected before any compiled code runs, with a message that names the argument and
what is allowed."""

import numpy as np
import pytest

import substrate as S
from substrate import SubstrateValueError as Bad


def net_and_x(rng=None, activation="tanh", dtype="float64"):
    rng = rng or np.random.default_rng(0)
    net = S.Network.layered([3, 4, 2], rng, activation=activation, dtype=dtype)
    return net, rng.normal(size=(2, 3)).astype(dtype)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=0.0), "tau must be finite and > 0"),
    (dict(tau=-1.0), "tau must be finite and > 0"),
    (dict(tau=np.array([1.0, np.nan, 1.0])), "tau must be finite and > 0"),
    (dict(tau=np.ones(4)), r"tau must be a positive scalar or a real array of shape \(3,\)"),
    (dict(activation="relu"), r"activation='relu' is not a known activation; allowed: logistic"),
    (dict(bias=np.zeros(2)), r"bias has shape \(2,\), expected \(3,\)"),
    (dict(size=0), "size=0 must be a positive integer"),
])
def test_layer(kwargs, match):
    args = dict(name="h", size=3)
    args.update(kwargs)
    with pytest.raises(Bad, match=match):
        S.Layer(**args)


def test_connections():
    h, y = S.Layer("h", 3), S.Layer("y", 2)
    with pytest.raises(Bad, match=r"connection h->y: weight has shape \(3, 2\), expected \(2, 3\) \(post size, pre size\)"):
        S.Network([h, y], [S.Connection("h", "y", np.zeros((3, 2)))])
    with pytest.raises(Bad, match=r"mask has shape"):
        S.Network([h, y], [S.Connection("h", "y", np.zeros((2, 3)), mask=np.ones((3, 3)))])
    with pytest.raises(Bad, match="post='x' must be a layer"):
        S.Network([h, y], [S.Connection("h", "x", np.zeros((2, 3)))], inputs=[S.Input("x", 2)])
    with pytest.raises(Bad, match="pre='z' is neither a layer nor an input"):
        S.Network([h, y], [S.Connection("z", "y", np.zeros((2, 3)))])
    with pytest.raises(Bad, match="tied=True needs an untied connection h->y"):
        S.Network([h, y], [S.Connection("y", "h", tied=True)])
    with pytest.raises(Bad, match="names must be unique"):
        S.Network([h, S.Layer("h", 2)])
    with pytest.raises(Bad, match="mismatched dtypes in the network parameters"):
        S.Network([h, S.Layer("y", 2, bias=np.zeros(2))], [S.Connection("h", "y", np.zeros((2, 3), np.float32))])
    with pytest.raises(Bad, match="x is complex but the states are float64"):
        S.relax(S.Network.layered([3, 2], np.random.default_rng(0)), np.ones((1, 3), complex))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="leapfrog"), r"method='leapfrog' is not a known integrator; allowed: euler, rk4"),
    (dict(dt=0.0), "dt=0.0 must be a positive finite number"),
    (dict(dt=-0.1), "dt=-0.1 must be a positive"),
    (dict(dt=np.nan), "dt=nan must be a positive"),
    (dict(dt="big"), "dt='big' must be a positive number"),
    (dict(t_span=(1.0, 0.0)), "t_span=.* must be finite with t1 > t0"),
    (dict(t_span=5.0), "t_span=5.0 must be a pair"),
    (dict(t_eval=[0.5, 0.2]), "t_eval must be a non-empty, strictly increasing"),
    (dict(t_eval=[0.5, 3.0]), "within t_span"),
    (dict(max_steps=0), "max_steps=0 must be a positive integer"),
    (dict(on_failure="ignore"), "on_failure='ignore'; allowed: 'raise', 'return'"),
    (dict(method="dopri5", rtol=0, atol=0), "rtol and atol cannot both be 0"),
    (dict(rtol=-1), "rtol=-1 must be a finite number >= 0"),
    (dict(u0=np.zeros((3, 6))), r"u0 has shape \(3, 6\), expected \(batch, n\) = \(2, 6\)"),
    (dict(u0=np.full((2, 6), np.inf)), "u0 contains NaN or Inf"),
    (dict(dtype="int32"), "dtype='int32' is not supported; allowed: float32, float64, complex128"),
])
def test_integrate_arguments(kwargs, match):
    net, x = net_and_x()
    args = dict(t_span=(0.0, 1.0), method="euler", dt=0.1)
    args.update(kwargs)
    with pytest.raises(Bad, match=match):
        S.integrate(net, x, **args)


def test_fixed_step_methods_need_dt():
    net, x = net_and_x()
    with pytest.raises(Bad, match="dt is required for the fixed-step method 'rk4'"):
        S.integrate(net, x, t_span=(0, 1), method="rk4")


@pytest.mark.parametrize("kwargs, match", [
    (dict(tol=0.0), "tol and rtol cannot both be 0"),
    (dict(tol=-1e-3), "tol=-0.001 must be a finite number >= 0"),
    (dict(max_time=0), "max_time=0 must be a positive number"),
    (dict(dt=0), "dt=0 must be a positive"),
])
def test_relax_arguments(kwargs, match):
    net, x = net_and_x()
    with pytest.raises(Bad, match=match):
        S.relax(net, x, **kwargs)


def test_inputs():
    net, x = net_and_x()
    with pytest.raises(Bad, match=r"x\['x'\] has shape \(2, 5\), expected \(batch, 3\)"):
        S.relax(net, np.zeros((2, 5)))
    with pytest.raises(Bad, match=r"x\['x'\] contains NaN or Inf"):
        S.relax(net, np.full((2, 3), np.nan))
    with pytest.raises(Bad, match=r"x: inputs missing \['x'\], unknown \['z'\]"):
        S.relax(net, {"z": x})
    with pytest.raises(Bad, match="this network has no inputs"):
        S.relax(S.Network([S.Layer("h", 2)]), x)


def test_dtypes():
    net, x = net_and_x(activation="hard_sigmoid")
    with pytest.raises(Bad, match=r"dtype=complex128 needs holomorphic activations; layers \['h1', 'y'\] use \['hard_sigmoid'\]"):
        S.relax(net, x, dtype="complex128")
    with pytest.raises(Bad, match="complex128 needs holomorphic activations"):
        S.relax(net, x, u0=np.zeros((2, 6), complex))
    net32, x32 = net_and_x(dtype="float32")
    with pytest.raises(Bad, match="mismatched dtypes: the network's parameters are float32 but dtype=float64"):
        S.relax(net32, x32, dtype="float64")
    with pytest.raises(Bad, match="mismatched dtypes: u0 is float64 but the states are float32"):
        S.relax(net32, x32, u0=np.zeros((2, 6)))
    with pytest.raises(Bad, match="mismatched dtypes: the network's parameters are float32 but dtype=complex128"):
        S.relax(net32, x32, dtype="complex128")


def test_builders():
    with pytest.raises(Bad, match="rng must be a numpy.random.Generator"):
        S.Network.layered([3, 2], 42)
    with pytest.raises(Bad, match=r"asymmetry_angle=200 must be a number in \[0, 180\] degrees"):
        S.Network.layered([3, 2], np.random.default_rng(0), asymmetry_angle=200)
    with pytest.raises(Bad, match="feedback='mirror'; allowed: tied, independent, none"):
        S.Network.layered([3, 2], np.random.default_rng(0), feedback="mirror")
    with pytest.raises(Bad, match=r"network config: unknown keys \['depth'\]"):
        S.Network.from_config({"sizes": [3, 2], "depth": 3}, seed=0)
    with pytest.raises(Bad, match=r"sizes\[1\]: size=0 must be a positive integer"):
        S.Network.from_config({"sizes": [3, 0]}, seed=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau="x"), r"layer 'h': tau must be a positive scalar or a real array of shape \(3,\), got 'x'"),
    (dict(tau=None), r"tau must be a positive scalar .* got None"),
    (dict(tau=True), r"tau must be a positive scalar .* got True"),
    (dict(tau=np.ones((2, 2))), r"tau must be a positive scalar .* got array of shape \(2, 2\)"),
    (dict(name=""), "layer: name='' must be a non-empty string"),
])
def test_layer_raw_errors(kwargs, match):
    """Were a ValueError from float('x'), a TypeError from float(None), or tau=True taken as 1."""
    args = dict(name="h", size=3)
    args.update(kwargs)
    with pytest.raises(Bad, match=match):
        S.Layer(**args)


@pytest.mark.parametrize("end", ["pre", "post"])
def test_connection_ends_must_be_names(end):
    """Were an unhashable-list TypeError when the network looked the name up."""
    args = dict(pre="h", post="y", weight=np.zeros((2, 3)))
    args[end] = ["h"]
    with pytest.raises(Bad, match=rf"connection: {end}=\['h'\] must be a non-empty string"):
        S.Connection(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=None), r"sizes=None must be a list of positive integers"),
    (dict(sizes=0), r"sizes=0 must be a list of positive integers"),
    (dict(sizes="34"), r"sizes='34' must be a list of positive integers"),
    (dict(tau="x"), r"layer 'h1': tau must be a positive scalar .* got 'x'"),
    (dict(feedback=np.ones(2)), r"feedback=array of shape \(2,\); allowed: tied, independent, none"),
    (dict(lateral=np.ones(2)), r"lateral=array of shape \(2,\) must be True or False"),
    (dict(loop="yes"), r"loop='yes' must be True or False"),
    (dict(asymmetry_angle=None), r"asymmetry_angle=None must be a number in \[0, 180\] degrees"),
    (dict(asymmetry_angle="x"), r"asymmetry_angle='x' must be a number in \[0, 180\] degrees"),
    (dict(asymmetry_angle=10 ** 30), r"asymmetry_angle=10{30} must be a number in \[0, 180\] degrees"),
    (dict(asymmetry_angle=np.nan), r"asymmetry_angle=nan must be a number"),
    (dict(init_scale=-1), r"init_scale=-1 must be a number in \[0, 8.99e\+307\]"),
    (dict(init_scale=np.nan), r"init_scale=nan must be a number in \[0, "),
    (dict(init_scale=np.inf), r"init_scale=inf must be a number in \[0, 8.99e\+307\]"),
    (dict(init_scale=1e308), r"init_scale=1e\+308 must be a number in \[0, 8.99e\+307\]"),
    (dict(init_scale=1e39, dtype="float32"), r"init_scale=1e\+39 must be a number in \[0, 1.7e\+38\]"),
])
def test_layered_raw_errors(kwargs, match):
    """Were TypeErrors (not iterable, ambiguous truth value of an array, isfinite of None or of an int
    beyond float64), numpy's 'high - low < 0' and OverflowError (inf), or weights cast to inf (float32)."""
    args = dict(sizes=[3, 4, 2], rng=np.random.default_rng(0))
    args.update(kwargs)
    with pytest.raises(Bad, match=match):
        S.Network.layered(**args)


def test_layered_init_scale_range_ends():
    """0 (all weights zero) and the largest scale of float32 are valid: finite weights, none inf."""
    rng = np.random.default_rng(0)
    assert all(np.all(c.weight == 0) for c in S.Network.layered([3, 4, 2], rng, init_scale=0).connections)
    big = S.Network.layered([3, 4, 2], rng, init_scale=float(np.finfo(np.float32).max) / 2, dtype="float32")
    assert all(np.all(np.isfinite(c.weight)) for c in big.connections if c.weight is not None)


@pytest.mark.parametrize("kwargs, match", [
    (dict(config=None), r"config=None must be a mapping with keys among \['activation'"),
    (dict(config=[3, 2]), r"config=\[3, 2\] must be a mapping"),
    (dict(seed="x"), r"seed='x' must be an integer >= 0"),
    (dict(seed=None), r"seed=None must be an integer >= 0"),
    (dict(seed=-1), r"seed=-1 must be an integer >= 0"),
    (dict(seed=1.5), r"seed=1.5 must be an integer >= 0"),
])
def test_from_config_raw_errors(kwargs, match):
    """Were a TypeError from set(None) and SeedSequence's TypeError/ValueError; seed=None drew a
    network that could not be rebuilt from its config."""
    args = dict(config={"sizes": [3, 2]}, seed=0)
    args.update(kwargs)
    with pytest.raises(Bad, match=match):
        S.Network.from_config(**args)


@pytest.mark.parametrize("call", ["relax", "integrate"])
def test_on_failure_array(call):
    """Was 'the truth value of an array is ambiguous'."""
    net, x = net_and_x()
    kwargs = dict(t_span=(0.0, 1.0), dt=0.1) if call == "integrate" else {}
    with pytest.raises(Bad, match=r"on_failure=array of shape \(2, 2\); allowed: 'raise', 'return'"):
        getattr(S, call)(net, x, on_failure=np.ones((2, 2)), **kwargs)


def test_batch_and_samples():
    """batch must be a positive integer agreeing with x's samples (was a NumPy broadcast error, or an
    empty success for batch 0)."""
    net, x = net_and_x()
    with pytest.raises(Bad, match="batch=5 but x has 2 samples; omit batch"):
        S.relax(net, x, batch=5)
    for f in (S.relax, lambda *a, **k: S.integrate(*a, t_span=(0, 1), dt=0.1, **k)):
        with pytest.raises(Bad, match="batch=0 must be a positive integer"):
            f(net, x, batch=0)
        with pytest.raises(Bad, match="batch=0 must be a positive integer"):
            f(S.Network([S.Layer("h", 2)]), batch=0)
        with pytest.raises(Bad, match=r"x\['x'\] has shape \(0, 3\), expected \(batch, 3\) with batch >= 1"):
            f(net, np.zeros((0, 3)))


def test_tied_must_be_a_bool():
    h, y = S.Layer("h", 2), S.Layer("y", 2)
    with pytest.raises(Bad, match="connection y->h: tied='no' must be True or False"):
        S.Network([h, y], [S.Connection("h", "y", np.eye(2)), S.Connection("y", "h", tied="no")])


def test_max_steps_beyond_int64():
    """Was an OverflowError from the compiled kernel's arguments."""
    net, x = net_and_x()
    with pytest.raises(Bad, match=r"max_steps=10+ must be a positive integer <= 2\*\*63 - 1"):
        S.relax(net, x, max_steps=10 ** 30)
    with pytest.raises(Bad, match=r"max_steps=10+ must be a positive integer <= 2\*\*63 - 1"):
        S.integrate(net, x, t_span=(0, 1), dt=0.1, max_steps=10 ** 30)


@pytest.mark.parametrize("t_span, dt, max_steps, match", [
    ((0, 1e300), 1.0, 10 ** 7, r"t_span=\(0, 1e\+300\) with dt=1 needs 1e\+300 steps of 'rk4', more than max_steps=10000000"),
    ((0, 1), 1e-300, 10 ** 7, r"t_span=\(0, 1\) with dt=1e-300 needs 1e\+300 steps of 'rk4', more than max_steps=10000000"),
    ((0, 1), 0.1 / 3, 29, r"needs 30 steps of 'rk4', more than max_steps=29"),
])
def test_step_count_beyond_max_steps_is_refused_up_front(t_span, dt, max_steps, match):
    """A fixed-step run needing more than max_steps steps (was 275 s and 160 s before failing)."""
    net, x = net_and_x()
    with pytest.raises(Bad, match=match):
        S.integrate(net, x, t_span=t_span, dt=dt, method="rk4", max_steps=max_steps)


def test_step_count_at_max_steps_runs():
    """Exactly max_steps steps is allowed, also where (t1 - t0)/dt is a whole number only up to
    rounding (1/(0.1/3) = 30.000000000000004)."""
    net, x = net_and_x()
    assert S.integrate(net, x, t_span=(0, 1), dt=0.1, method="rk4", max_steps=10).ok
    assert S.integrate(net, x, t_span=(0, 1), dt=0.1 / 3, method="rk4", max_steps=30).ok


def test_adaptive_first_step_below_the_smallest_step():
    net, x = net_and_x()
    with pytest.raises(Bad, match=r"dt=1e-300, the first step of 'dopri5', is below its smallest step 1e-12"):
        S.integrate(net, x, t_span=(0, 1), method="dopri5", dt=1e-300)


def _loss(u):
    return float((u ** 2).sum()), 2 * u


@pytest.mark.parametrize("kwargs, match", [
    (dict(blowup=-1), "blowup=-1 must be a positive finite number"),
    (dict(integrator="dopri5", dt=None, rtol=0, atol=0), "rtol and atol cannot both be 0"),
    (dict(method="implicit", t_span=None, blowup=0), "blowup=0 must be a positive finite number"),
    (dict(max_steps=10 ** 30), r"max_steps=10+ must be a positive integer"),
    (dict(dt=1e-7), r"needs 1e\+07 steps of 'rk4', more than max_steps=1000000"),
    # the step sizes of an adaptive run are recorded for max_steps steps: 7 TiB refused
    (dict(integrator="dopri5", dt=None, max_steps=10 ** 12),
     r"the sizes of 1000000000000 steps would take 7.45e\+03 GiB, more than the cap of 4 GiB"),
    # every state stored: 1e7 states of (16, 6) float64, 7 GiB refused (was 13 GiB allocated)
    (dict(dt=1e-7, max_steps=10 ** 8, batch=16),
     r"10000004 stored states \(checkpoints\) would take 7.15 GiB, more than the cap of 4 GiB"),
])
def test_gradient_arguments(kwargs, match):
    """gradient() applies integrate's checks and bounds its allocations (before: a DivergenceError or
    StepSizeError after running, or an allocation of terabytes)."""
    net, x = net_and_x()
    args = dict(t_span=(0.0, 1.0), dt=0.1)
    args.update(kwargs)
    if args.pop("batch", None):
        x = np.random.default_rng(1).normal(size=(16, 3))
    with pytest.raises(Bad, match=match):
        S.gradient(net, x, _loss, **args)


def test_gradient_step_sizes_sized_by_the_steps_taken():
    """max_steps is a bound, not an allocation: 10**12 with 10 fixed steps records 10 step sizes."""
    net, x = net_and_x()
    g = S.gradient(net, x, _loss, t_span=(0, 1), dt=0.1, max_steps=10 ** 12)
    ref = S.gradient(net, x, _loss, t_span=(0, 1), dt=0.1)
    assert g.step_sizes.shape == (10,)
    np.testing.assert_array_equal(g.flat(), ref.flat())
