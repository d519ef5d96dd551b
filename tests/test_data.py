"""models.data: the digits split, IDX parsing and loading, load dispatch, one_hot and minibatches."""

import gzip
import os

import numpy as np
import pytest
from sklearn.datasets import load_digits

from models import data
from models.data import Dataset, digits, idx_dataset, load, minibatches, one_hot, read_idx

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
          np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array):
    """``array`` in the IDX format (big-endian dims and data)."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, _CODES[dtype], array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + array.astype(dtype).tobytes()


def write_idx(path, array, compress=False):
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def tiny_set(directory, n_train=12, n_test=6, compress=False):
    """A 4-file MNIST-format set of 5x4 images; returns the arrays written."""
    rng = np.random.default_rng(7)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 5, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 3).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 5, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 3).astype(np.uint8),
    }
    arrays["train-images-idx3-ubyte"][0, 0, 0], arrays["train-images-idx3-ubyte"][0, 0, 1] = 0, 255
    for stem, array in arrays.items():
        write_idx(directory / (stem + ".gz" if compress else stem), array, compress)
    return arrays


# --- digits ---------------------------------------------------------------------------------------


def test_digits_shapes_and_ranges():
    ds = digits()
    assert isinstance(ds, Dataset) and ds.name == "digits"
    assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
    assert ds.y_train.shape == (1438,) and ds.y_test.shape == (359,)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float64
    assert ds.y_train.dtype == ds.y_test.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0 and 0.0 <= ds.x_test.min() <= ds.x_test.max() <= 1.0
    assert ds.classes == 10 and ds.shape == (8, 8) and ds.n_features == 64


def test_digits_split_is_deterministic_and_seeded():
    a, b, c = digits(seed=3), digits(seed=3), digits(seed=4)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    assert a.x_test.shape == c.x_test.shape and not np.array_equal(a.x_test, c.x_test)


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_digits_split_is_stratified(fraction):
    ds = digits(test_fraction=fraction, seed=1)
    total = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=10)
    test = np.bincount(ds.y_test, minlength=10)
    assert np.all(test > 0)
    assert np.all(np.abs(test - fraction * total) <= 0.5)
    # train and test together are the whole set, no example twice
    whole = load_digits()
    assert np.array_equal(total, np.bincount(whole.target))
    x = np.concatenate([ds.x_train, ds.x_test])
    assert np.array_equal(np.unique(x * 16, axis=0), np.unique(whole.data, axis=0))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_digits_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        digits(test_fraction=fraction)


def test_subset():
    ds = digits()
    small = ds.subset(100, 20)
    assert small.x_train.shape == (100, 64) and small.x_test.shape == (20, 64)
    assert np.array_equal(small.x_train, ds.x_train[:100]) and np.array_equal(small.y_test, ds.y_test[:20])
    assert small.classes == 10 and small.shape == (8, 8) and small.name == "digits"
    assert ds.subset(n_test=5).x_train.shape == ds.x_train.shape
    s1 = ds.subset(50, 10, rng=np.random.default_rng(2))
    s2 = ds.subset(50, 10, rng=np.random.default_rng(2))
    assert s1.x_train.tobytes() == s2.x_train.tobytes() and s1.y_test.tobytes() == s2.y_test.tobytes()
    assert not np.array_equal(s1.x_train, small.x_train[:50])
    with pytest.raises(ValueError, match="n_train"):
        ds.subset(n_train=10**6)
    with pytest.raises(ValueError, match="n_test"):
        ds.subset(n_test=-1)


# --- one_hot and minibatches ----------------------------------------------------------------------


def test_one_hot():
    out = one_hot(np.array([2, 0, 1, 2]), 4)
    assert out.dtype == np.float64 and out.shape == (4, 4)
    assert np.array_equal(out, np.eye(4)[[2, 0, 1, 2]])
    assert one_hot(np.array([], dtype=np.int64), 3).shape == (0, 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        one_hot(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="classes"):
        one_hot(np.array([0]), 0)


def test_minibatches_cover_every_index_once():
    batches = minibatches(23, 5, np.random.default_rng(0))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(23))
    assert not np.array_equal(np.concatenate(batches), np.arange(23))
    assert [len(b) for b in minibatches(20, 5, np.random.default_rng(0))] == [5] * 4
    assert minibatches(0, 5, np.random.default_rng(0)) == []


def test_minibatches_are_seed_reproducible():
    a = minibatches(50, 8, np.random.default_rng(11))
    b = minibatches(50, 8, np.random.default_rng(11))
    c = minibatches(50, 8, np.random.default_rng(12))
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, True, "4"])
def test_minibatches_validate_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        minibatches(10, batch_size, np.random.default_rng(0))


# --- read_idx -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 4)], ids=["1d", "3d"])
def test_read_idx_round_trip(tmp_path, compress, dtype, shape):
    rng = np.random.default_rng(5)
    array = (rng.normal(size=shape) * 50).astype(dtype)
    # the name says nothing: compression is told by the magic bytes
    back = read_idx(write_idx(tmp_path / "file.idx", array, compress))
    assert back.shape == shape and back.dtype == np.dtype(dtype).newbyteorder("=")
    assert back.dtype.isnative and back.flags.writeable
    assert np.array_equal(back, array)


def test_read_idx_known_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(bytes.fromhex("00000801" "00000003" "070009"))
    assert np.array_equal(read_idx(path), np.array([7, 0, 9], dtype=np.uint8))
    path.write_bytes(bytes.fromhex("00000D01" "00000001" "3FC00000"))  # big-endian float32 1.5
    assert read_idx(path).tolist() == [1.5]


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_read_idx_errors(tmp_path, compress):
    def write(name, raw):
        path = tmp_path / name
        path.write_bytes(gzip.compress(raw) if compress else raw)
        return path

    good = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
    with pytest.raises(ValueError, match=r"bad\.idx.*bad magic"):
        read_idx(write("bad.idx", b"\x01\x02" + good[2:]))
    with pytest.raises(ValueError, match=r"empty\.idx.*bad magic"):
        read_idx(write("empty.idx", b""))
    with pytest.raises(ValueError, match=r"type\.idx.*unknown IDX type code 0x0A"):
        read_idx(write("type.idx", good[:2] + b"\x0a" + good[3:]))
    with pytest.raises(ValueError, match=r"short\.idx.*size does not match"):
        read_idx(write("short.idx", good[:-1]))
    with pytest.raises(ValueError, match=r"long\.idx.*size does not match"):
        read_idx(write("long.idx", good + b"\x00"))
    with pytest.raises(ValueError, match=r"header\.idx.*size does not match"):
        read_idx(write("header.idx", good[:6]))


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))[:-10])
    with pytest.raises(ValueError, match=r"cut\.gz.*gzip"):
        read_idx(path)


# --- idx_dataset ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_idx_dataset(tmp_path, compress):
    arrays = tiny_set(tmp_path, compress=compress)
    ds = idx_dataset(tmp_path, name="tiny")
    assert ds.name == "tiny" and ds.shape == (5, 4) and ds.n_features == 20
    assert ds.x_train.shape == (12, 20) and ds.x_test.shape == (6, 20)
    assert ds.x_train.dtype == np.float64 and ds.y_train.dtype == ds.y_test.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert np.array_equal(ds.x_train, arrays["train-images-idx3-ubyte"].reshape(12, 20) / 255.0)
    assert np.array_equal(ds.x_test, arrays["t10k-images-idx3-ubyte"].reshape(6, 20) / 255.0)
    assert ds.y_train.tolist() == [0, 1, 2] * 4 and ds.y_test.tolist() == [0, 1, 2] * 2
    assert ds.classes == 10  # largest label + 1, at least MNIST's 10


def test_idx_dataset_classes_above_ten(tmp_path):
    tiny_set(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 25], dtype=np.uint8))
    assert idx_dataset(tmp_path).classes == 26


def test_idx_dataset_mismatched_counts(tmp_path):
    tiny_set(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, dtype=np.uint8))
    with pytest.raises(ValueError, match="12 images but .*train-labels-idx1-ubyte holds 11 labels"):
        idx_dataset(tmp_path)


def test_idx_dataset_mismatched_image_shapes(tmp_path):
    tiny_set(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((6, 4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train images are \(5, 4\) but test images are \(4, 5\)"):
        idx_dataset(tmp_path)


def test_idx_dataset_rejects_non_byte_images(tmp_path):
    tiny_set(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((12, 5, 4), dtype=">f4"))
    with pytest.raises(ValueError, match="unsigned-byte images"):
        idx_dataset(tmp_path)


def test_idx_dataset_missing_file(tmp_path):
    tiny_set(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        idx_dataset(tmp_path)


def test_fashion_mnist_missing_directory_gives_install_hint(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*sudo apt install dataset-fashion-mnist.*directory="):
        data.fashion_mnist(missing)


def test_fashion_mnist_missing_file_gives_install_hint(tmp_path):
    tiny_set(tmp_path)
    os.remove(tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*sudo apt install dataset-fashion-mnist"):
        data.fashion_mnist(tmp_path)


def test_fashion_mnist_from_a_directory(tmp_path):
    tiny_set(tmp_path, compress=True)
    ds = data.fashion_mnist(tmp_path)
    assert ds.name == "fashion_mnist" and ds.x_train.shape == (12, 20)


# --- load -----------------------------------------------------------------------------------------


def test_load_dispatch(tmp_path):
    tiny_set(tmp_path)
    ds = load("digits", test_fraction=0.5, seed=2)
    assert ds.name == "digits" and ds.y_test.tobytes() == digits(0.5, 2).y_test.tobytes()
    assert load("mnist", tmp_path).name == "mnist"
    assert load("idx", directory=tmp_path).name == "idx"
    assert load("fashion_mnist", tmp_path).name == "fashion_mnist"


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*digits, fashion_mnist, mnist, idx"):
        load("cifar")
    for name in ("mnist", "idx"):
        with pytest.raises(ValueError, match="directory="):
            load(name)
    with pytest.raises(ValueError, match="no directory"):
        load("digits", tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load("fashion_mnist", tmp_path / "nowhere")


# --- the real Fashion-MNIST -----------------------------------------------------------------------


@pytest.mark.fashion_mnist
def test_real_fashion_mnist():
    if not os.path.isdir(data.FASHION_MNIST_DIR):
        pytest.skip(f"{data.FASHION_MNIST_DIR} not found (sudo apt install dataset-fashion-mnist)")
    ds = data.fashion_mnist()
    assert ds.name == "fashion_mnist" and ds.shape == (28, 28) and ds.classes == 10 and ds.n_features == 784
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.dtype == np.float64 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0 and 0.0 <= ds.x_test.min() <= ds.x_test.max() <= 1.0
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 6000))
    assert np.array_equal(np.bincount(ds.y_test), np.full(10, 1000))


# ------------------------------------------------------------------------------------ sequences
def test_probabilistic_sequences_follow_their_transitions():
    """The primitive after each completed cycle is drawn from the transition matrix: empirical
    frequencies over ~6000 transitions within 4 standard errors; the noise has its std; same seed,
    same bits."""
    from models.data import PRIMITIVES, probabilistic_sequences

    P = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.25, 0.25, 0.5]])
    x, lab = probabilistic_sequences(100, 1200, np.random.default_rng(0), transitions=P, period=20, noise=0.05)
    assert x.shape == (100, 1200, 2) and lab.shape == (100, 1200)
    cur, nxt = lab[:, 0:-20:20].ravel(), lab[:, 20::20].ravel()
    for i in range(3):
        n = np.sum(cur == i)
        for j in range(3):
            f = np.sum((cur == i) & (nxt == j)) / n
            assert abs(f - P[i, j]) < 4 * np.sqrt(P[i, j] * (1 - P[i, j]) / n) + 1e-12, (i, j, f)
    clean, lab2 = probabilistic_sequences(100, 1200, np.random.default_rng(0), transitions=P, period=20, noise=0.0)
    np.testing.assert_array_equal(lab, lab2)  # the noise is drawn after the primitives: the same ones
    a, b, d = PRIMITIVES["circle"]
    phi = 2 * np.pi * np.arange(20) / 20
    s, c = np.nonzero(lab2[:, ::20] == 0)
    np.testing.assert_allclose(clean[s[0], 20 * c[0]:20 * c[0] + 20, 0], 0.8 * np.sin(a * phi + d), atol=1e-15)
    again = probabilistic_sequences(100, 1200, np.random.default_rng(0), transitions=P, period=20, noise=0.05)[0]
    np.testing.assert_array_equal(x, again)
    resid = x - probabilistic_sequences(100, 1200, np.random.default_rng(0), transitions=P, period=20, noise=0.0)[0]
    assert abs(np.std(resid) - 0.05) < 4 * 0.05 / np.sqrt(2 * resid.size)


def test_segmentation_reads_the_machine_and_its_statistics_score_zero():
    """segment_primitives names every cycle of the machine's noisy sequences as drawn (also when a
    cycle is shifted in phase) and refuses noise; transition_statistics scores the machine's own
    sequences near 0 (TV distance within sampling error: ~1500 transitions, < 0.05) and a
    deterministic cycle through the primitives at 0.3 exactly (each row puts 1 where the machine
    puts 0.7 and 0 where it puts 0.3); a primitive repeated is all forbidden transitions."""
    from models.data import pfsm_transitions, primitive_shapes, probabilistic_sequences, segment_primitives
    from models.metrics import transition_statistics

    P = pfsm_transitions(3)
    np.testing.assert_array_equal(P, [[0, 0.7, 0.3], [0.3, 0, 0.7], [0.7, 0.3, 0]])
    x, lab = probabilistic_sequences(50, 640, np.random.default_rng(3), noise=0.05)
    seg, dist = segment_primitives(x)
    np.testing.assert_array_equal(seg, lab[:, ::20])
    assert dist.max() < 0.02  # 2 * 0.05^2 expected from the noise
    stats = transition_statistics(seg, P)
    assert stats["transitions"] == 50 * 31 and stats["distance"] < 0.05 and stats["forbidden"] == 0.0
    assert stats["unrecognised"] == 0.0 and np.nansum(stats["counts"]) == 50 * 31

    shapes = primitive_shapes()
    shifted = np.roll(shapes[1], 7, axis=0)[None]  # the figure eight from another phase
    assert segment_primitives(shifted)[0].tolist() == [[1]]
    noise = np.random.default_rng(0).uniform(-0.8, 0.8, (1, 60, 2))
    assert segment_primitives(noise)[0].tolist() == [[-1, -1, -1]]

    cycle = np.tile(np.concatenate(list(shapes)), (4, 5, 1))  # circle, eight, 3:2, circle, ...
    stats = transition_statistics(segment_primitives(cycle)[0], P)
    assert stats["distance"] == pytest.approx(0.3, abs=1e-12) and stats["forbidden"] == 0.0
    np.testing.assert_array_equal(stats["frequencies"], [[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    stuck = transition_statistics(np.zeros((2, 5), np.int64), P)
    assert stuck["forbidden"] == 1.0 and stuck["distance"] == 1.0 and np.isnan(stuck["frequencies"][1]).all()
    with pytest.raises(ValueError, match="labels"):
        transition_statistics(np.full((2, 3), 3), P)


def test_sequences_load_from_arrays_and_hdf5(tmp_path):
    import h5py

    from models.data import load_sequences

    x = np.random.default_rng(1).normal(size=(3, 7, 2))
    np.testing.assert_array_equal(load_sequences(x), x)
    assert load_sequences(x[0]).shape == (1, 7, 2)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["sequences"] = x
    np.testing.assert_array_equal(load_sequences(tmp_path / "s.h5"), x)
    with pytest.raises(ValueError, match="no dataset"):
        load_sequences(tmp_path / "s.h5", dataset="other")
    with pytest.raises(ValueError, match="finite"):
        load_sequences(np.full((2, 3, 1), np.nan))
