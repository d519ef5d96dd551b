"""Datasets for training on the simulator: scikit-learn's 8x8 digits and IDX files (MNIST, Fashion-MNIST).

Every dataset is a :class:`Dataset` of float64 features in [0, 1], one row per example, and int64 labels.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import numbers
import os
import zlib

import h5py
import numpy as np

from substrate import archive
from substrate.errors import SubstrateValueError
from substrate.validate import count, real_array

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
NAMES = ("digits", "fashion_mnist", "mnist", "idx")

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FASHION_MNIST_HINT = (
    "install it with `sudo apt install dataset-fashion-mnist` (puts the IDX files in "
    f"{FASHION_MNIST_DIR}) or pass directory= pointing at the four IDX files"
)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split: ``x_*`` (N, d) float64 in [0, 1], ``y_*`` (N,) int64 in [0, classes);
    ``shape`` is the image shape of one row (d = prod(shape))."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    shape: tuple

    @property
    def n_features(self) -> int:
        """Features per example, d."""
        return self.x_train.shape[1]

    def subset(self, n_train: int | None = None, n_test: int | None = None, rng: np.random.Generator | None = None) -> Dataset:
        """The first ``n_train`` training and ``n_test`` test examples (None: all of them), taken after a
        permutation of each split drawn from ``rng`` when one is given."""
        train = _first(len(self.y_train), n_train, "n_train", rng)
        test = _first(len(self.y_test), n_test, "n_test", rng)
        return dataclasses.replace(
            self, x_train=self.x_train[train], y_train=self.y_train[train], x_test=self.x_test[test], y_test=self.y_test[test]
        )


def _first(size: int, n: int | None, argument: str, rng: np.random.Generator | None) -> np.ndarray:
    """Indices of the first ``n`` of ``size`` examples, after a permutation from ``rng`` if given."""
    n = size if n is None else count(n, argument, minimum=0)
    if n > size:
        raise SubstrateValueError(f"{argument}={n} exceeds the {size} examples available")
    order = np.arange(size) if rng is None else rng.permutation(size)
    return order[:n]


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: pixels / 16 (float64) and labels (int64), read from the CSV file scikit-learn
    ships, as ``load_digits`` reads it, without importing scikit-learn (about 1 s, in every worker
    process); through ``load_digits`` where that file is not found. Cached: do not modify."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
        if os.path.exists(path):
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
            return table[:, :-1] / 16.0, table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data / 16.0, d.target.astype(np.int64)


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, values 0..16 scaled by 1/16), split per class:
    each class's indices are permuted with ``default_rng(seed)`` and the first round(test_fraction * count)
    go to the test set. Both splits keep the original order of the examples."""
    if not 0.0 < test_fraction < 1.0:
        raise SubstrateValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    x, y = digits_arrays()
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        test.append(members[: round(test_fraction * len(members))])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[np.concatenate(test)] = True
    return Dataset("digits", x[~is_test], y[~is_test], x[is_test], y[is_test], int(y.max()) + 1, (8, 8))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array in an IDX file (the MNIST format), raw or gzip-compressed (told by its magic bytes),
    in native byte order."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise SubstrateValueError(f"{path}: corrupt gzip data ({err})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise SubstrateValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex() or 'empty'}, expected 0000<type><ndim>)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_TYPES:
        raise SubstrateValueError(f"{path}: unknown IDX type code 0x{type_code:02X} (known: {', '.join(f'0x{t:02X}' for t in _IDX_TYPES)})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SubstrateValueError(f"{path}: size does not match the header: {len(raw)} bytes, shorter than the {header}-byte header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in dims):
        raise SubstrateValueError(f"{path}: negative dimension in the header {dims}")
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise SubstrateValueError(f"{path}: size does not match the header {dims}: {len(raw)} bytes, expected {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def idx_dataset(directory: str | os.PathLike, name: str = "idx") -> Dataset:
    """The MNIST-format dataset in ``directory``: train-images-idx3-ubyte, train-labels-idx1-ubyte,
    t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each raw or ``.gz``. Pixels (unsigned bytes) are
    flattened and scaled by 1/255; ``classes`` is the largest label + 1, at least 10 (MNIST's digits)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no such directory: {directory}")
    x_train, y_train = _idx_split(directory, "train")
    x_test, y_test = _idx_split(directory, "t10k")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise SubstrateValueError(f"{directory}: train images are {x_train.shape[1:]} but test images are {x_test.shape[1:]}")
    classes = max(10, int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1)
    shape = x_train.shape[1:]
    return Dataset(name, _pixels(x_train), y_train, _pixels(x_test), y_test, classes, shape)


def _idx_split(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one split (``train`` or ``t10k``), checked against each other."""
    images_path = _idx_path(directory, f"{split}-images-idx3-ubyte")
    labels_path = _idx_path(directory, f"{split}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise SubstrateValueError(f"{images_path}: expected unsigned-byte images (N, rows, cols), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise SubstrateValueError(f"{labels_path}: expected non-negative integer labels (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise SubstrateValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return images, labels.astype(np.int64)


def _idx_path(directory: str | os.PathLike, stem: str) -> str:
    """The file ``stem`` or ``stem.gz`` in ``directory`` (the raw one if both are there)."""
    path = os.path.join(directory, stem)
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"missing IDX file: {path} (or {path}.gz)")


def _pixels(images: np.ndarray) -> np.ndarray:
    """Unsigned-byte images (N, ...) as rows of float64 in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def fashion_mnist(directory: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST (60000 train, 10000 test, 28x28, 10 classes) from ``directory``, by default
    :data:`FASHION_MNIST_DIR` where the Debian package dataset-fashion-mnist puts it."""
    directory = FASHION_MNIST_DIR if directory is None else directory
    try:
        return idx_dataset(directory, name="fashion_mnist")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Fashion-MNIST not found: {err}; {_FASHION_MNIST_HINT}") from None


def load(name: str, directory: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """The dataset called ``name``: "digits" (``kwargs`` go to :func:`digits`), "fashion_mnist", or
    "mnist" / "idx" (IDX files in ``directory``, which is required)."""
    if name == "digits":
        if directory is not None:
            raise SubstrateValueError("the digits dataset comes with scikit-learn and takes no directory")
        return digits(**kwargs)
    if name == "fashion_mnist":
        return fashion_mnist(directory, **kwargs)
    if name in ("mnist", "idx"):
        if directory is None:
            raise SubstrateValueError(f"load({name!r}) needs directory= pointing at the four IDX files")
        return idx_dataset(directory, name=name, **kwargs)
    raise SubstrateValueError(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")


def one_hot(y: np.ndarray, classes: int) -> np.ndarray:
    """Labels ``y`` (N,) in [0, classes) as rows of a (N, classes) float64 identity."""
    classes = count(classes, "classes")
    y = np.asarray(y)
    if y.ndim != 1 or (y.size and (y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= classes)):
        raise SubstrateValueError(f"y must be 1-D integer labels in [0, {classes}), got {y.dtype} {y.shape}")
    out = np.zeros((len(y), classes), dtype=np.float64)
    out[np.arange(len(y)), y] = 1.0
    return out


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A permutation of range(n) drawn from ``rng``, cut into index arrays of ``batch_size`` (the last
    one may be smaller)."""
    n = count(n, "n", minimum=0)
    batch_size = count(batch_size, "batch_size")
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


# ------------------------------------------------------------------------------------ sequences
# 2-D cyclic primitives x = sin(a phi + delta), y = sin(b phi), phi over one period (Lissajous figures)
PRIMITIVES = {"circle": (1, 1, np.pi / 2), "figure_eight": (1, 2, 0.0), "lissajous_3_2": (3, 2, np.pi / 2)}


def pfsm_transitions(k: int) -> np.ndarray:
    """The default machine's (k, k) transition matrix among k primitives: never a repeat; 0.7 to the
    next primitive in the list and 0.3 to the one after (k > 2), 1 to the other (k = 2), 1 to itself
    (k = 1)."""
    k = count(k, "k")
    transitions = np.zeros((k, k))
    for i in range(k):
        transitions[i, (i + 1) % k] += 0.7 if k > 2 else 1.0
        if k > 2:
            transitions[i, (i + 2) % k] += 0.3
    if k == 1:
        transitions[:] = 1.0
    return transitions


def primitive_shapes(primitives=tuple(PRIMITIVES), period: int = 20, amplitude: float = 0.8) -> np.ndarray:
    """One noiseless cycle of each primitive, (k, period, 2)."""
    unknown = [p for p in primitives if p not in PRIMITIVES]
    if unknown or not primitives:
        raise SubstrateValueError(f"primitives={primitives!r}; known: {list(PRIMITIVES)}")
    phi = 2 * np.pi * np.arange(count(period, "period")) / period
    return np.stack([np.stack([np.sin(a * phi + d), np.sin(b * phi)], -1)
                     for a, b, d in (PRIMITIVES[p] for p in primitives)]) * amplitude


def probabilistic_sequences(sequences: int, steps: int, rng: np.random.Generator, *,
                            primitives=("circle", "figure_eight", "lissajous_3_2"), transitions=None,
                            period: int = 20, amplitude: float = 0.8, noise: float = 0.02):
    """Sequences of a probabilistic finite-state machine that switches among 2-D cyclic primitives
    (``PRIMITIVES``, Lissajous figures of ``period`` steps): after every completed cycle the next
    primitive is drawn from the row of ``transitions`` (default :func:`pfsm_transitions`), the first
    uniformly; Gaussian observation noise ``noise``.
    Returns (x (sequences, steps, 2), primitive index per step (sequences, steps))."""
    if not isinstance(rng, np.random.Generator):
        raise SubstrateValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    shapes = primitive_shapes(primitives, period, amplitude)
    k = len(primitives)
    transitions = pfsm_transitions(k) if transitions is None else np.asarray(transitions, dtype=float)
    if transitions.shape != (k, k) or np.any(transitions < 0) or not np.allclose(transitions.sum(axis=1), 1.0):
        raise SubstrateValueError(f"transitions must be a ({k}, {k}) matrix of probabilities whose rows sum to 1")
    sequences, steps = count(sequences, "sequences"), count(steps, "steps")
    x = np.empty((sequences, steps, 2))
    labels = np.empty((sequences, steps), np.int64)
    for s in range(sequences):
        state = int(rng.integers(k))
        for c in range(0, steps, period):
            n = min(period, steps - c)
            x[s, c:c + n] = shapes[state, :n]
            labels[s, c:c + n] = state
            state = int(rng.choice(k, p=transitions[state]))
    return x + noise * rng.standard_normal(x.shape), labels


def segment_primitives(x, *, primitives=("circle", "figure_eight", "lissajous_3_2"), period: int = 20,
                       amplitude: float = 0.8, tolerance: float = 0.05):
    """The primitive of every complete cycle of sequences x (B, T, 2): x cut into consecutive
    ``period``-step cycles from its start (where the machine switches), each named by the nearest
    primitive at its nearest phase (mean squared distance per step over every cyclic shift, so that a
    generation that drifted in phase is still read), or -1 when even that one is farther than
    ``tolerance`` (not a cycle of any primitive: a mixture, a drift, a blur).
    Returns (labels (B, T // period) int64, distance (B, T // period))."""
    x = real_array(x, "x", "a (sequences, steps, 2) array")
    if x.ndim != 3 or x.shape[2] != 2:
        raise SubstrateValueError(f"x must be (sequences, steps, 2), got shape {x.shape}")
    shapes = primitive_shapes(primitives, period, amplitude)
    if not 0 < tolerance < np.inf:
        raise SubstrateValueError(f"tolerance={tolerance!r} must be a positive number")
    B, T, _ = x.shape
    cycles = x[:, :T // period * period].reshape(B, T // period, 1, 1, period, 2)
    shifted = np.stack([np.roll(shapes, -r, axis=1) for r in range(period)], axis=1)  # (k, phase, period, 2)
    dist = np.mean(np.sum((cycles - shifted) ** 2, axis=-1), axis=-1).min(axis=-1)  # (B, cycles, k)
    labels, best = dist.argmin(axis=-1), dist.min(axis=-1)
    return np.where(best <= tolerance, labels, -1), best


def load_sequences(source, dataset: str = "sequences") -> np.ndarray:
    """User sequences as a float64 array (sequences, steps, dims): from an array, or from the dataset
    ``dataset`` of an HDF5 file (a path)."""
    if isinstance(source, (str, os.PathLike)):
        with archive.open_file(os.fspath(source)) as f:  # a FIFO, a damaged file: an error naming the file
            if not isinstance(f.get(dataset), h5py.Dataset):
                raise SubstrateValueError(f"source {source}: no dataset {dataset!r}; it has {list(f)}")
            source = f[dataset][...]
    x = real_array(source, "source", "a path or a real array")
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or 0 in x.shape:
        raise SubstrateValueError(f"source must be a (sequences, steps, dims) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise SubstrateValueError("source contains NaN or Inf: sequences must be finite")
    return x


def eight_gaussians(n: int, rng: np.random.Generator, *, radius: float = 2.0, std: float = 0.1):
    """The 2-D toy of eight Gaussians (standard deviation ``std``) evenly spaced on a circle of
    ``radius``: (x (n, 2), the mode of each sample (n,), which can serve as a class label)."""
    if not isinstance(rng, np.random.Generator):
        raise SubstrateValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    n = count(n, "n")
    mode = rng.integers(8, size=n)
    angle = 2 * np.pi * mode / 8
    centres = radius * np.stack([np.cos(angle), np.sin(angle)], -1)
    return centres + std * rng.standard_normal((n, 2)), mode
