"""The per-call caches (issue 17): the packed weights and the drive V x + b kept on the network
(``Network.prepared``), the stepping buffers kept across calls, and integrate's final residual computed
when read. A cached result must never be a stale one: every way the parameters change (assignment,
in-place edits, an optimiser step, a device's programming, a checkpoint restore) is checked against a
network built afresh from the same arrays, bit for bit (the cache must change nothing, so equality is
exact)."""

import copy

import numpy as np
import pytest

import substrate
from models import train
from substrate import Connection, Layer, Network, devices, integrate, relax
from substrate import network as netmod
from substrate.integrators import ExplicitRK


def layered(sizes=(4, 8, 3), seed=0, **kw):
    return Network.layered(list(sizes), np.random.default_rng(seed), **kw)


def fresh(net: Network) -> Network:
    """A network with no cache, built from copies of ``net``'s parameters as they are now."""
    layers = [Layer(x.name, x.size, tau=copy.copy(x.tau), activation=x.activation, bias=x.bias.copy())
              for x in net.layers]
    conns = [Connection(c.pre, c.post, None if c.weight is None else c.weight.copy(),
                        None if c.mask is None else c.mask.copy(), c.tied) for c in net.connections]
    return Network(layers, conns, net.inputs)


def run(net, x, **kw):
    """The states of a short integration with every kind of parameter in play."""
    return integrate(net, x, t_span=(0.0, 1.0), dt=0.1, method="rk4", **kw).u


def assert_current(net, x, before=None, **kw):
    """``net`` gives what a fresh copy of it gives, and (if given) not ``before``: the change mattered."""
    got = run(net, x, **kw)
    np.testing.assert_array_equal(got, run(fresh(net), x, **kw))
    if before is not None:
        assert not np.array_equal(got, before), "the change did not change the result: the test tests nothing"
    return got


X = np.random.default_rng(5).standard_normal((3, 4))


# ------------------------------------------------------------------------------------ invalidation
def _edits():
    """(name, edit(net)) for every way a parameter changes."""
    def assign_weight(net):
        c = net.connection("h1->y")
        c.weight = c.weight * 1.5

    def inplace_weight(net):
        net.connection("h1->y").weight[1, 2] += 0.25

    def inplace_slice(net):
        net.connection("y->h1").weight[:] = 0.5

    def inplace_input_weight(net):  # an input projection: the drive changes
        net.connection("x->h1").weight[0, 0] -= 1.0

    def inplace_bias(net):
        net.layer("y").bias[0] += 0.5

    def assign_bias(net):
        net.layer("h1").bias = net.layer("h1").bias + 0.1

    def assign_tau(net):
        net.layer("y").tau = 2.0

    def inplace_tau(net):
        net.layer("h1").tau = np.ones(8)
        run(net, X)  # cached with the array
        net.layer("h1").tau[3] = 4.0

    def assign_activation(net):
        net.layer("h1").activation = "tanh"

    def one_bit(net):  # the smallest change there is: the last bit of one weight
        w = net.connection("h1->y").weight
        w[0, 0] = np.nextafter(w[0, 0], np.inf)

    return [assign_weight, inplace_weight, inplace_slice, inplace_input_weight, inplace_bias, assign_bias,
            assign_tau, inplace_tau, assign_activation, one_bit]


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
def test_every_edit_is_seen(edit):
    net = layered()
    before = run(net, X)
    edit(net)
    assert_current(net, X, None if edit.__name__ == "one_bit" else before)


def test_one_bit_is_seen_by_the_cache():
    """The last bit of a weight is seen: the packed weights are rebuilt (compared with a fresh pack)."""
    net = layered()
    run(net, X)
    w = net.connection("h1->y").weight
    w[0, 0] = np.nextafter(w[0, 0], np.inf)
    vf = substrate.VectorField(net, X)
    np.testing.assert_array_equal(vf.packed.wbuf, fresh(net).pack(net.dtype).wbuf)


def test_a_large_weight_edited_in_place():
    """Arrays beyond the bytes fingerprint (16 KiB) are compared with a copy: an edit is seen too."""
    net = layered((30, 60, 50))  # h1 -> y is 50 x 60 float64: 24,000 bytes
    x = np.random.default_rng(1).standard_normal((2, 30))
    before = run(net, x)
    net.connection("h1->y").weight[49, 59] += 1.0
    assert_current(net, x, before)
    net.connection("x->h1").weight[:, 7] = 0.0  # 60 x 30 input projection: 14,400 bytes, by bytes
    assert_current(net, x)


def test_masked_and_tied():
    """A mask edited in place, and a tied weight following its source."""
    net = layered((4, 6, 6, 3), feedback="tied", lateral=True)
    before = run(net, X)
    net.connection("h1->h1").mask[0, 1] = 0.0
    before = assert_current(net, X, before)
    net.connection("h1->h2").weight[2, 3] += 0.5  # its tied transpose h2->h1 changes with it
    assert_current(net, X, before)


def test_optimiser_step():
    rng = np.random.default_rng(0)
    model = train.Classifier.layered([4, 8, 3, 2], rng)
    x = rng.standard_normal((5, 4))
    before = run(model.network, x)
    params = model.parameters()  # held across steps, as train() holds them
    grads = {k: np.full_like(p, 0.1) for k, p in params.items()}
    for optimiser in (train.SGD(lr=0.5, momentum=0.9), train.Adam(lr=0.1)):
        optimiser.step(params, grads)
        before = assert_current(model.network, x, before)


def test_device_programming():
    """A device with pulsed updates writes its devices' weights into the network's arrays in place."""
    net = layered()
    before = run(net, X)
    nominal = {c.name: c.weight.copy() for c in net.connections if c.weight is not None}
    devices.attach(net, devices.PRESETS["reram_sb"], np.random.default_rng(1))
    assert any(not np.array_equal(c.weight, nominal[c.name]) for c in net.connections if c.weight is not None)
    assert_current(net, X, before)


def test_device_read_noise_is_drawn_at_every_call():
    """A device network reads its devices its own way (read noise drawn per relaxation): never cached."""
    net = devices.attach(layered(), devices.PRESETS["pcm_inference"], np.random.default_rng(1))
    a, b = (relax(net, X, tol=1e-10).u for _ in range(2))
    assert not np.array_equal(a, b)


def test_checkpoint_restore(tmp_path):
    """Restoring a checkpoint writes its parameters into the model's arrays in place."""
    rng = np.random.default_rng(0)
    model = train.Classifier.layered([4, 8, 3, 2], rng)
    x = rng.standard_normal((5, 4))
    path = tmp_path / "model.h5"
    substrate.save(model, path)
    saved = run(model.network, x)
    for p in model.parameters().values():
        p *= 0.5
    halved = assert_current(model.network, x, saved)
    for k, p in model.parameters().items():  # as train's resume does
        p[...] = substrate.load(path).parameters()[k]
    np.testing.assert_array_equal(assert_current(model.network, x, halved), saved)


def test_inputs_edited_in_place_and_new_views():
    net = layered()
    data = np.random.default_rng(2).standard_normal((6, 4))
    x = data[:3]
    before = run(net, x)
    np.testing.assert_array_equal(run(net, data[:3]), before)  # a new view of the same data
    x[1, 2] += 1.0  # the caller's array edited in place
    assert_current(net, x, before)
    assert_current(net, data[3:])


def test_dtypes_are_kept_apart():
    net = layered(activation="tanh")
    a = run(net, X)
    c = run(net, X, dtype="complex128")
    np.testing.assert_array_equal(run(net, X), a)
    assert c.dtype == np.complex128
    np.testing.assert_allclose(c.real, a, rtol=0, atol=1e-15)  # complex tanh: within an ulp of the real one
    net.connection("h1->y").weight[0, 0] += 0.5
    np.testing.assert_array_equal(run(net, X, dtype="complex128"), run(fresh(net), X, dtype="complex128"))


def test_a_vector_field_keeps_its_own_copy():
    """A VectorField (a Solution's ``field``) keeps the parameters it was made with."""
    net = layered()
    vf = substrate.VectorField(net, X)
    u = np.random.default_rng(3).standard_normal((3, net.n))
    f = vf(u)
    net.connection("h1->y").weight[:] += 1.0
    net.connection("x->h1").weight[:] += 1.0
    substrate.VectorField(net, X)  # repacks the network's cache into new arrays
    np.testing.assert_array_equal(vf(u), f)


# ------------------------------------------------------------------------------------ buffers
def test_buffers_carry_nothing_between_calls():
    """Methods with the same number of stages share buffers: an exponential method after an explicit
    one (whose coefficients fill entries the exponential one leaves 0) gives a fresh network's result."""
    midpoint = ExplicitRK("midpoint", 2, a=((0, 0), (0.5, 0)), b=(0, 1))
    net = layered()
    for method in (midpoint, "etd2rk", midpoint, "rk4", "etdrk4", "dopri5", "etdrk4"):
        got = integrate(net, X, t_span=(0, 2), dt=0.2, method=method).u
        np.testing.assert_array_equal(got, integrate(fresh(net), X, t_span=(0, 2), dt=0.2, method=method).u)


def test_results_are_not_buffers():
    """A Solution's arrays and the caller's u0 are untouched by later calls."""
    net = layered()
    u0 = np.random.default_rng(4).standard_normal((3, net.n))
    keep = u0.copy()
    first = relax(net, X, u0=u0)
    u, trace = first.u.copy(), first.residual_trace.copy()
    second = relax(net, X[::-1].copy(), u0=u0)
    integrate(net, X, t_span=(0, 1), dt=0.1, u0=u0)
    np.testing.assert_array_equal(u0, keep)
    np.testing.assert_array_equal(first.u, u)
    np.testing.assert_array_equal(first.residual_trace, trace)
    assert not np.array_equal(second.u, first.u)


# ------------------------------------------------------------------------------------ residual
def test_final_residual_is_that_of_the_final_state():
    """integrate's residual, computed when read, is max_i |F_i| at the final state, with the weights of
    the call even if they changed since."""
    net = layered()
    sol = integrate(net, X, t_span=(0, 3), dt=0.1, method="euler")
    old = fresh(net)
    net.connection("h1->y").weight[:] *= 3.0
    integrate(net, X, t_span=(0, 1), dt=0.1)
    expected = np.max(np.abs(substrate.VectorField(old, X)(sol.u[-1])), axis=1)
    np.testing.assert_array_equal(sol.residual, expected)
    assert sol.residual is sol.residual  # computed once, then kept
    assert "max residual" in sol.report()


# ------------------------------------------------------------------------------------ stability
def test_stability_check_remembered_only_for_the_same_circuit_and_state():
    """relax from an equilibrium it already checked reuses the check; changed weights or another state
    are checked afresh (the eigenvalue compared with a fresh network's, bit for bit)."""
    net = layered()
    eq = relax(net, X, tol=1e-12)
    again = relax(net, X, u0=eq.u, tol=1e-6)
    assert again.steps == 0
    np.testing.assert_array_equal(again.eigenvalue, eq.eigenvalue)
    again.eigenvalue[:] = 0  # the caller's copy: the remembered one is untouched
    np.testing.assert_array_equal(relax(net, X, u0=eq.u, tol=1e-6).eigenvalue, eq.eigenvalue)
    net.connection("y->h1").weight[:] *= 3.0  # the same states, another Jacobian
    got = relax(net, X, u0=eq.u, tol=10.0)  # a tolerance the old equilibrium passes: no step
    ref = relax(fresh(net), X, u0=eq.u, tol=10.0)
    assert got.steps == 0
    np.testing.assert_array_equal(got.eigenvalue, ref.eigenvalue)
    assert not np.array_equal(got.eigenvalue, eq.eigenvalue)


def test_copies_leave_the_caches_behind():
    net = layered()
    before = run(net, X)
    twin = copy.deepcopy(net)
    assert not twin._prepared and not twin._work
    twin.connection("h1->y").weight[:] = 0.0
    np.testing.assert_array_equal(run(net, X), before)
    assert_current(twin, X, before)


# ------------------------------------------------------------------------------------ the reused field
def test_field_reused_only_for_the_same_inputs_and_parameters():
    """Calls with the very same input array on unchanged parameters share one VectorField (the last
    call's); another array with the same values, an in-place edit of the inputs or of a weight, or
    another dtype make a new one, whose results are a fresh network's."""
    net = layered()
    x = X.copy()
    a = integrate(net, x, t_span=(0.0, 0.5), dt=0.1, method="euler")
    b = relax(net, x, tol=1e-9)
    assert b.field is a.field
    assert integrate(net, x.copy(), t_span=(0.0, 0.5), dt=0.1, method="euler").field is not a.field
    c = integrate(net, x, t_span=(0.0, 0.5), dt=0.1, method="euler")
    x[0, 0] += 0.5
    d = integrate(net, x, t_span=(0.0, 0.5), dt=0.1, method="euler")
    assert d.field is not c.field and not np.array_equal(d.u, c.u)
    np.testing.assert_array_equal(d.u, integrate(fresh(net), x, t_span=(0.0, 0.5), dt=0.1, method="euler").u)
    net.connection("h1->y").weight[0, 0] += 0.5
    e = integrate(net, x, t_span=(0.0, 0.5), dt=0.1, method="euler")
    assert e.field is not d.field
    np.testing.assert_array_equal(e.u, integrate(fresh(net), x, t_span=(0.0, 0.5), dt=0.1, method="euler").u)
    f = integrate(net, x, t_span=(0.0, 0.5), dt=0.1, method="euler", dtype="complex128")
    assert f.field is not e.field and f.u.dtype == np.complex128


def test_inputs_reshaped_in_place_are_checked_again():
    """The same input array given a new shape in place is checked again, not taken as before."""
    net = layered()
    x = X[:2].copy()
    integrate(net, x, t_span=(0.0, 0.5), dt=0.1, method="euler")
    x.shape = (1, 8)
    with pytest.raises(substrate.SubstrateValueError, match=r"x\['x'\] has shape \(1, 8\), expected \(batch, 4\)"):
        integrate(net, x, t_span=(0.0, 0.5), dt=0.1, method="euler")


def test_connection_replaced_in_the_list_is_seen():
    """A connection replaced in ``network.connections`` (no assignment to any attribute of the
    network's own layers or connections) is seen: the lists of layers and connections are compared."""
    net = layered()
    before = run(net, X)
    i = next(k for k, c in enumerate(net.connections) if c.name == "h1->y")
    old = net.connections[i]
    count = netmod._ASSIGNMENTS[0]
    net.connections[i] = Connection("h1", "y", old.weight * 2.0)
    assert netmod._ASSIGNMENTS[0] != count  # the new object's own construction counted, but...
    netmod._ASSIGNMENTS[0] = count  # ...the list comparison alone must see it
    assert_current(net, X, before)


def test_unrelated_assignments_keep_the_cache():
    """An assignment to another network's layer makes the fingerprint compare the objects again,
    which finds them unchanged: no repacking (the same packed weights)."""
    net, other = layered(), layered(seed=1)
    run(net, X)
    packed = net._prepared[net.dtype].packed
    other.layer("y").bias = other.layer("y").bias + 1.0
    run(net, X)
    assert net._prepared[net.dtype].packed is packed


def test_complex_states_take_the_real_form():
    """Complex states of a real network with real inputs take the float64 entry's packed weights and
    drive: bit for bit what ``pack`` and ``drive`` compute for complex128, after every kind of edit
    (an input weight, the inputs in place, a bias); phases alternating real and complex states on
    unchanged parameters each reuse their own field (holomorphic EP's nudged phases)."""
    net = layered(activation="tanh")
    x = X.copy()
    edits = [lambda: None, lambda: net.connection("x->h1").weight.__setitem__((0, 0), 0.25),
             lambda: x.__setitem__((1, 2), 2.0), lambda: net.layer("y").bias.__setitem__(0, 0.5)]
    drives = []
    for edit in edits:
        edit()
        substrate.VectorField(net, x)  # the float64 form, as a free phase leaves it
        vf = substrate.VectorField(net, x, dtype="complex128")
        packed = net.pack(np.complex128)
        assert vf.drive.dtype == vf.packed.bias.dtype == np.complex128
        np.testing.assert_array_equal(vf.drive, net.drive(net.check_inputs(x), None, np.complex128))
        np.testing.assert_array_equal(vf.packed.wbuf, packed.wbuf)
        np.testing.assert_array_equal(vf.packed.bias, packed.bias)
        assert not any(np.array_equal(vf.drive, d) for d in drives), "an edit did not change the drive"
        drives.append(vf.drive)
    real, cplx = relax(net, x, tol=1e-9), relax(net, x, tol=1e-9, dtype=np.complex128)
    assert relax(net, x, tol=1e-9).field is real.field
    assert relax(net, x, tol=1e-9, dtype=np.complex128).field is cplx.field
    np.testing.assert_array_equal(cplx.u, relax(fresh(net), x, tol=1e-9, dtype=np.complex128).u)
