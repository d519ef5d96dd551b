"""Standard normal draws in blocks, for the effects inside the stepping kernel.

A kernel effect draws tens of thousands of normals a step; one at a time through a numpy Generator
(a call to the bit generator and a scalar ziggurat per value) they cost more than the step itself.
Here a block is filled in one loop that LLVM vectorises:

* bits: SplitMix64 (Steele, Lea & Flood, OOPSLA 2014; the generator that seeds xoshiro): word i
  of a stream is a hash of key + (i + 1) gamma, so that every word is computed on its own (no
  serial state to carry from lane to lane) with two 64-bit products; the outputs are SplitMix64's
  sequence from the seed ``key`` (a random 64-bit key per phase: two phases' runs of words overlap
  with a probability of about (words per phase / 2^64) per pair of phases);
* normals: Box-Muller, u1 in (0, 1] and u2 in [0, 1) of 53 bits from the two words of a block,
  z0 = r cos(2 pi u2), z1 = r sin(2 pi u2), r = sqrt(-2 ln u1) (tails up to 8.57 sigma), with ln,
  sin and cos as polynomials (fdlibm's; llvmlite here has no SVML, so math.log would be a scalar libm
  call that stops the vectoriser).

A stream is a uint64 array ``[key, next block]`` (:func:`new_stream`, the key drawn from the
effect's numpy Generator once per phase, so that the Generator is the persisted state and the same
seed gives the same bits); :func:`fill` advances the block counter, :func:`add` adds scaled draws.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _kernels as K

# SplitMix64's Weyl increment and mixing constants (Stafford's variant 13)
_GAMMA, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_U30, _U27, _U31, _U11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_ONE, _TWO = np.uint64(1), np.uint64(2)
_TWO_M53 = 2.0 ** -53

# fdlibm e_log.c: ln(1 + f) = f - hfsq + s (hfsq + R(s^2)), s = f / (2 + f), |f| <= sqrt(2) - 1
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_LG1, _LG2, _LG3, _LG4 = 6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01, 2.222219843214978396e-01
_LG5, _LG6, _LG7 = 1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01
_MANTISSA, _ONE_BITS = 0x000FFFFFFFFFFFFF, 0x3FF0000000000000
_SQRT2 = 1.4142135623730951

# fdlibm k_sin.c and k_cos.c on [-pi/4, pi/4]
_S1, _S2, _S3 = -1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04
_S4, _S5, _S6 = 2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10
_C1, _C2, _C3 = 4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05
_C4, _C5, _C6 = -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11
_HALF_PI = 1.5707963267948966


@K.njit(inline="always")  # inlined, the block loop vectorises (a call per block stops it)
def splitmix(key, i):
    """Word i (uint64) of the SplitMix64 sequence seeded with ``key``."""
    z = key + (i + _ONE) * _GAMMA
    z = (z ^ (z >> _U30)) * _MIX1
    z = (z ^ (z >> _U27)) * _MIX2
    return z ^ (z >> _U31)


@K.njit(fastmath={"contract"}, inline="always")
def log_unit(u):
    """ln u for a normal positive u (fdlibm's reduction and polynomial; within 1 ulp of libm,
    tests/test_normals.py)."""
    bits = K._f64_bits(u)
    k = (bits >> 52) - 1023
    m = K._bits_f64((bits & _MANTISSA) | _ONE_BITS)  # in [1, 2)
    big = m > _SQRT2
    m = 0.5 * m if big else m
    k = k + 1 if big else k
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
    hfsq = 0.5 * f * f
    dk = float(k)
    return dk * _LN2_HI - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO)) - f)


@K.njit(fastmath={"contract"}, inline="always")
def cos_sin_turn(v):
    """(cos 2 pi v, sin 2 pi v) for v in [0, 1): v in quarter turns is split exactly into the nearest
    quarter q and a rest |theta| <= pi/4, where fdlibm's polynomials hold."""
    t = 4.0 * v
    q = math.floor(t + 0.5)
    theta = (t - q) * _HALF_PI
    z = theta * theta
    s = theta + theta * z * (_S1 + z * (_S2 + z * (_S3 + z * (_S4 + z * (_S5 + z * _S6)))))
    c = 1.0 - 0.5 * z + z * z * (_C1 + z * (_C2 + z * (_C3 + z * (_C4 + z * (_C5 + z * _C6)))))
    quarter = int(q) & 3
    odd = quarter & 1
    cos_, sin_ = (s, c) if odd else (c, s)
    return (-cos_ if quarter == 1 or quarter == 2 else cos_), (-sin_ if quarter >= 2 else sin_)


@K.njit(fastmath={"contract"}, inline="always")
def pair(key, j):
    """The two normals of block j (uint64: words 2j and 2j + 1) of the stream ``key``."""
    u1 = float(np.int64((splitmix(key, _TWO * j) >> _U11) + _ONE)) * _TWO_M53  # (0, 1]: ln u1 is finite
    u2 = float(np.int64(splitmix(key, _TWO * j + _ONE) >> _U11)) * _TWO_M53  # [0, 1)
    r = math.sqrt(-2.0 * log_unit(u1))
    c, s = cos_sin_turn(u2)
    return r * c, r * s


@K.njit(fastmath={"contract"})
def fill(stream, out):
    """Fill the 1-D float64 ``out`` with standard normals from ``stream`` ([key, next block], uint64),
    advancing it: block j's pair goes to out[j] and out[m + j] (m = len(out) // 2, contiguous stores
    for the vectoriser); an odd length takes the first normal of one more block."""
    key, first = stream[0], stream[1]
    m = out.shape[0] // 2
    for j in range(m):
        z0, z1 = pair(key, first + np.uint64(j))
        out[j] = z0
        out[m + j] = z1
    blocks = m
    if out.shape[0] % 2:
        out[2 * m] = pair(key, first + np.uint64(m))[0]
        blocks += 1
    stream[1] = first + np.uint64(blocks)


@K.njit
def add(stream, scale, chunk, out):
    """out += scale * xi for the 1-D ``out`` (any real dtype), xi drawn by :func:`fill` into ``chunk``
    (float64, 1-D) a chunk at a time: the draws are consumed while in L1 instead of passing through a
    buffer as large as ``out`` (measured: ~30% of the draws' cost inside the stepping kernel)."""
    n = chunk.shape[0]
    for a in range(0, out.shape[0], n):
        c = chunk[:min(n, out.shape[0] - a)]
        fill(stream, c)
        for k in range(c.shape[0]):
            out[a + k] += scale * c[k]


def new_chunk() -> np.ndarray:
    """A scratch chunk for :func:`add`: 2048 values, 16 kB (an L1 cache holds it and what it adds to)."""
    return np.empty(2048)


def new_stream(rng: np.random.Generator) -> np.ndarray:
    """A stream keyed by one draw of ``rng`` (the draw advances it), starting at block 0."""
    return np.array([rng.integers(2 ** 64, dtype=np.uint64), 0], dtype=np.uint64)
