"""The block normal draws of the device effects inside the stepping kernel (substrate.devices.normals):
the bits against SplitMix64's published outputs and a Python reference, the polynomial ln, cos and sin
against libm, the Box-Muller transform against a libm reference of the same words, and the
distribution of the draws (fixed seeds, so that every statistical check is deterministic)."""

import math

import numpy as np
import pytest
from scipy import stats

from substrate.devices import normals as N

MASK = (1 << 64) - 1


def splitmix_reference(key, i):
    """SplitMix64 (Steele, Lea & Flood 2014) in Python integers: word i of the sequence seeded with key."""
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def pair_reference(key, j):
    """Box-Muller of block j with libm's log, sqrt, cos and sin."""
    u1 = ((splitmix_reference(key, 2 * j) >> 11) + 1) * 2.0 ** -53
    u2 = (splitmix_reference(key, 2 * j + 1) >> 11) * 2.0 ** -53
    r = math.sqrt(-2.0 * math.log(u1))
    return r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)


def test_splitmix_matches_the_published_sequence_and_a_reference():
    """Seed 0 gives SplitMix64's known first outputs (0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4); other
    keys and word indices (including the wrap of key + (i + 1) gamma past 2^64) equal the Python
    reference bit for bit."""
    assert [int(N.splitmix(np.uint64(0), np.uint64(i))) for i in (0, 1)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    rng = np.random.default_rng(3)
    for key in [0, MASK, 1 << 63] + [int(k) for k in rng.integers(0, 2 ** 64, 5, dtype=np.uint64)]:
        for i in [0, 1, 2, 12345, 2 ** 62 + 7, MASK - 1]:
            assert int(N.splitmix(np.uint64(key), np.uint64(i))) == splitmix_reference(key, i)


def test_log_within_one_ulp_of_libm():
    """The polynomial ln over every u Box-Muller can see, (0, 1] in steps of 2^-53: log-uniform and
    uniform samples, the extremes 2^-53 and 1, and both sides of the reduction's switch at sqrt(2)."""
    rng = np.random.default_rng(0)
    u = np.concatenate([2.0 ** rng.uniform(-53, 0, 100_000), rng.uniform(0, 1, 100_000) + 2.0 ** -53,
                        [2.0 ** -53, 1.0, 1.0 - 2.0 ** -53, 0.5, 2.0 ** -0.5, np.nextafter(2.0 ** -0.5, 0), 0.75]])
    got = np.array([N.log_unit(v) for v in u])
    np.testing.assert_array_max_ulp(got, np.log(u), maxulp=1)
    assert N.log_unit(1.0) == 0.0


def test_cos_sin_of_a_turn_against_extended_precision():
    """(cos 2 pi v, sin 2 pi v) for v in [0, 1): within 2.5e-16 absolute (about 1 ulp of 1) of cos and sin
    in x86's 80-bit long double (libm's float64 cos(2 pi v) is no reference here: its own argument
    2 pi v is rounded, by up to 4.4e-16 rad), exact at the quarter turns."""
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.uniform(0, 1, 20_000), np.arange(16) / 16, [1 - 2.0 ** -53, 2.0 ** -53]])
    got = np.array([N.cos_sin_turn(x) for x in v])
    angle = 2 * np.longdouble("3.14159265358979323846264338327950288") * v.astype(np.longdouble)
    if np.finfo(np.longdouble).eps > 1e-18:  # no extended precision: libm, with its argument's rounding
        angle = 2 * np.pi * v
    tol = 2.5e-16 if np.finfo(np.longdouble).eps < 1e-18 else 7e-16
    np.testing.assert_allclose(got[:, 0], np.cos(angle).astype(float), rtol=0, atol=tol)
    np.testing.assert_allclose(got[:, 1], np.sin(angle).astype(float), rtol=0, atol=tol)
    quarters = np.array([N.cos_sin_turn(x) for x in (0.0, 0.25, 0.5, 0.75)])
    assert np.array_equal(quarters, [[1, 0], [0, 1], [-1, 0], [0, -1]])


@pytest.mark.parametrize("size", [0, 1, 7, 1000, 32640])
def test_fill_is_box_muller_of_the_stream_and_advances_it(size):
    """fill writes block j's pair to out[j] and out[m + j] (the odd last value: the first normal of one
    more block), equal to the libm Box-Muller of the same SplitMix64 words within 1e-14 (|z| <= 8.6, a
    few ulp of each factor), and moves the stream on by the blocks it used, so that the next fill
    continues with fresh blocks."""
    key = 0x0123456789ABCDEF
    stream = np.array([key, 5], dtype=np.uint64)
    out = np.empty(size)
    N.fill(stream, out)
    m, blocks = size // 2, (size + 1) // 2
    assert int(stream[1]) == 5 + blocks
    pairs = np.array([pair_reference(key, 5 + j) for j in range(blocks)]).reshape(blocks, 2)
    want = np.concatenate([pairs[:m, 0], pairs[:m, 1], pairs[m:, 0]])
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-14)
    after = np.empty(3)
    N.fill(stream, after)
    np.testing.assert_allclose(after, [pair_reference(key, 5 + blocks)[0], pair_reference(key, 5 + blocks)[1],
                                       pair_reference(key, 6 + blocks)[0]], rtol=0, atol=1e-14)


def test_new_stream_is_seeded_by_the_generator():
    """The same generator state gives the same stream (same seed, same bits) and advances the generator
    by one draw; another seed gives another key."""
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    sa, sb = N.new_stream(a), N.new_stream(b)
    assert sa.dtype == np.uint64 and np.array_equal(sa, sb) and sa[1] == 0
    assert a.integers(2 ** 63) == b.integers(2 ** 63)
    assert N.new_stream(np.random.default_rng(8))[0] != sa[0]


def test_draws_are_standard_normal():
    """Four million draws (fixed seed, in the blocks of a 510 x 64 step so that both halves of every block
    and many blocks count): mean and variance within 4 standard errors, skewness and excess kurtosis
    within 4 standard errors (sqrt(6/n), sqrt(24/n)); a Kolmogorov-Smirnov test against N(0, 1) and
    one against numpy's own normal draws with p > 0.01; the tail fractions beyond 2, 3, 4 and 5
    sigma within 4 binomial standard errors (+1 count) of 2 Phi(-k); nothing beyond Box-Muller's
    bound sqrt(2 ln 2^53) = 8.57."""
    stream = N.new_stream(np.random.default_rng(2026))
    z = np.empty((123, 510 * 64))
    for block in z:
        N.fill(stream, block)
    z = z.ravel()
    n = z.size
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 4 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 4 * math.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 0.01
    assert stats.ks_2samp(z[:1_000_000], np.random.default_rng(0).standard_normal(1_000_000)).pvalue > 0.01
    for k in (2, 3, 4, 5):
        p = 2 * stats.norm.sf(k)
        count = np.count_nonzero(np.abs(z) > k)
        assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1, (k, count, n * p)
    assert np.abs(z).max() <= math.sqrt(2 * 53 * math.log(2))


def test_draws_are_uncorrelated():
    """No correlation within 4 standard errors (1/sqrt(n)) between the two normals of a block, between
    neighbours in a fill, between the same position of consecutive fills, nor between two phases'
    streams drawn from one generator."""
    rng = np.random.default_rng(11)
    stream = N.new_stream(rng)
    fills = np.empty((200, 510 * 64))
    for f in fills:
        N.fill(stream, f)
    m = fills.shape[1] // 2
    other = np.empty(fills.shape[1])
    N.fill(N.new_stream(rng), other)
    pairs = [(fills[:, :m], fills[:, m:]), (fills[:, :-1], fills[:, 1:]), (fills[:-1], fills[1:]),
             (fills[0], other)]
    for a, b in pairs:
        a, b = a.ravel(), b.ravel()
        assert abs(np.corrcoef(a, b)[0, 1]) < 4 / math.sqrt(a.size)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_add_is_fill_a_chunk_at_a_time(dtype):
    """add(stream, scale, chunk, out) adds scale times the draws fill gives for out's length cut into
    chunks (the last one shorter), in out's dtype, and leaves the stream where those fills would."""
    out = np.linspace(-1, 1, 5000).astype(dtype)
    stream, reference = np.array([99, 3], dtype=np.uint64), np.array([99, 3], dtype=np.uint64)
    want = out.astype(np.float64).copy()
    for a in range(0, out.size, 2048):
        xi = np.empty(min(2048, out.size - a))
        N.fill(reference, xi)
        want[a:a + xi.size] += 0.25 * xi
    N.add(stream, 0.25, N.new_chunk(), out)
    assert np.array_equal(stream, reference)
    np.testing.assert_allclose(out, want.astype(dtype), rtol=0, atol=0 if dtype == np.float64 else 1e-6)
