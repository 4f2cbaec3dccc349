"""Datasets: the fixed digits split, binarization, IDX and .npz loading, and every bad input."""

import gzip
import struct

import numpy as np
import pytest

from vaeserve.training.data import load_dataset, parse_spec
from vaeserve.training.data_files import IDX_FILES


def test_digits_split_is_fixed():
    splits = load_dataset("digits")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1258, 180, 359)
    # Pinned: the split is a property of the data set, the same on every machine.
    assert splits.test.y[:12].tolist() == [4, 5, 6, 9, 4, 7, 8, 9, 9, 6, 9, 9]
    assert splits.val.y[:12].tolist() == [8, 5, 9, 0, 1, 3, 3, 5, 0, 5, 3, 0]
    for split in (splits.train, splits.val, splits.test):
        assert split.x.dtype == np.float32 and split.x.shape[1:] == (1, 8, 8)
        assert split.y.dtype == np.int64
        assert 0.0 <= split.x.min() and split.x.max() == 1.0
    assert splits.class_names == tuple("0123456789") and splits.num_classes == 10
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.test.x, splits.test.x)


def test_data_info_holds_the_facts_a_checkpoint_needs():
    info = load_dataset("digits", binarize="static").info()
    assert info["spec"] == "digits" and info["shape"] == [1, 8, 8]
    assert info["value_range"] == [0.0, 1.0] and info["binarize"] == "static"
    assert info["num_classes"] == 10 and info["class_names"] == list("0123456789")
    assert info["split_seed"] == 0


def test_static_binarization_thresholds_every_split():
    splits = load_dataset("digits", binarize="static")
    grey = load_dataset("digits")
    for split, source in ((splits.train, grey.train), (splits.test, grey.test)):
        assert set(np.unique(split.x)) == {0.0, 1.0}
        np.testing.assert_array_equal(split.x, (source.x >= 0.5).astype(np.float32))


def test_dynamic_binarization_keeps_train_grey_and_fixes_val_and_test():
    splits = load_dataset("digits", binarize="dynamic")
    assert len(np.unique(splits.train.x)) > 2  # the loop draws a fresh sample per epoch
    for split in (splits.val, splits.test):
        assert set(np.unique(split.x)) == {0.0, 1.0}
    np.testing.assert_array_equal(load_dataset("digits", binarize="dynamic").test.x, splits.test.x)


@pytest.mark.parametrize(
    "spec", ["", "digits:x", "mnist", "mnist:", "cifar:dir", "npz", "Digits", "fashion_mnist:d"]
)
def test_bad_spec_names_the_accepted_forms(spec):
    with pytest.raises(ValueError, match="mnist:DIR"):
        parse_spec(spec)


def test_bad_binarize_mode():
    with pytest.raises(ValueError, match="binarize"):
        load_dataset("digits", binarize="otsu")


def _npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_with_labels_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((50, 6, 5)).astype(np.float32)
    y = np.arange(50) % 3
    splits = load_dataset(_npz(tmp_path, x=x, y=y, class_names=np.array(["a", "b", "c"])))
    assert splits.shape == (1, 6, 5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (35, 5, 10)
    assert splits.class_names == ("a", "b", "c")
    together = np.concatenate([splits.train.x, splits.val.x, splits.test.x])
    assert sorted(together.sum(axis=(1, 2, 3)).tolist()) == sorted(x.sum(axis=(1, 2)).tolist())


def test_npz_uint8_flat_and_unlabelled(tmp_path):
    x = np.full((20, 16), 255, np.uint8)  # flat 4×4 images
    splits = load_dataset(_npz(tmp_path, x=x))
    assert splits.shape == (1, 4, 4) and splits.train.x.max() == 1.0
    assert splits.train.y is None and splits.num_classes is None and splits.class_names == ()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros(20)}, r"expected shape .*got \(20,\)"),
        ({"x": np.zeros((20, 10))}, r"got \(20, 10\)"),
        ({"x": np.zeros((20, 1, 1, 4, 4))}, "expected shape"),
        ({"x": np.zeros((20, 4, 0))}, "expected shape"),
        ({"x": np.array([[[np.nan]]] * 20)}, "NaN or Inf"),
        ({"x": np.array([[[np.inf]]] * 20)}, "NaN or Inf"),
        ({"x": np.full((20, 2, 2), 1.5)}, r"values must lie in \[0, 1\]"),
        ({"x": np.full((20, 2, 2), -0.1)}, r"values must lie in \[0, 1\]"),
        ({"x": np.full((20, 2, 2), 300, np.int64)}, r"values must lie in \[0, 1\]"),
        ({"x": np.zeros((20, 2, 2)), "y": np.arange(19)}, r"y: expected shape \(20,\)"),
        ({"x": np.zeros((20, 2, 2)), "y": np.zeros(20)}, "integer labels"),
        ({"x": np.zeros((20, 2, 2)), "y": np.arange(20) - 1}, "outside the class range"),
        (
            {"x": np.zeros((20, 2, 2)), "y": np.arange(20) % 4, "class_names": np.array(["a"])},
            r"outside the class range \[0, 1\)",
        ),
        ({"x": np.zeros((3, 2, 2))}, "too few .* non-empty"),
        ({"x": np.zeros((0, 2, 2))}, "too few"),
        ({"images": np.zeros((20, 2, 2))}, "expected an array 'x'"),
    ],
)
def test_bad_npz_is_a_clear_error(tmp_path, arrays, message):
    spec = _npz(tmp_path, **arrays)
    with pytest.raises(ValueError, match=message):
        load_dataset(spec)


def test_npz_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    (tmp_path / "objects.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="objects.npz"):
        load_dataset(f"npz:{tmp_path / 'objects.npz'}")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}] * 3, dtype=object))
    with pytest.raises(ValueError, match="pickled.npz"):
        load_dataset(f"npz:{pickled}")


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        data = gzip.compress(data)
        path = path.with_name(path.name + ".gz")
    path.write_bytes(data)


def _idx_folder(tmp_path, compress=True, train_labels=None):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (30, 6, 6)),
        "train_labels": np.arange(30) % 10 if train_labels is None else train_labels,
        "test_images": rng.integers(0, 256, (10, 6, 6)),
        "test_labels": np.arange(10),
    }
    for key, array in arrays.items():
        _write_idx(tmp_path / IDX_FILES[key], array, compress)
    return tmp_path


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist"])
def test_idx_folder(tmp_path, compress, kind):
    splits = load_dataset(f"{kind}:{_idx_folder(tmp_path, compress)}")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (27, 3, 10)
    assert splits.shape == (1, 6, 6) and splits.test.y.tolist() == list(range(10))
    assert len(splits.class_names) == 10
    if kind == "fashion-mnist":
        assert splits.class_names[0] == "T-shirt/top"


def test_idx_missing_files_are_named(tmp_path):
    _idx_folder(tmp_path)
    (tmp_path / (IDX_FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset(f"mnist:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset(f"mnist:{tmp_path / 'nowhere'}")


def test_idx_corrupt_files(tmp_path):
    _idx_folder(tmp_path, compress=False)
    path = tmp_path / IDX_FILES["test_images"]
    path.write_bytes(b"\x00\x00\x0d\x03" + path.read_bytes()[4:])
    with pytest.raises(ValueError, match="bad magic"):
        load_dataset(f"mnist:{tmp_path}")
    _idx_folder(tmp_path, compress=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="header implies"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_labels_outside_the_class_range(tmp_path):
    _idx_folder(tmp_path, train_labels=np.arange(30) % 12)
    with pytest.raises(ValueError, match=r"outside the class range \[0, 10\)"):
        load_dataset(f"mnist:{tmp_path}")
