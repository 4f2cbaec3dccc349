"""Data with its own splits (x_train/x_test), vae-eval on a whole held-out file, and
memory-mapped .npy/.npz loading."""

import json
import mmap
import re
import zipfile

import numpy as np
import pytest
import torch

from vaeserve.training import evaluate, train
from vaeserve.training.config import TrainConfig
from vaeserve.training.data import load_dataset, load_whole
from vaeserve.training.data_files import open_array_file
from vaeserve.training.image_rows import ImageRows, iter_batches

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = {"latent_dim": 2, "hidden_dims": (16,), "eval_k": 2}


def _images(n, seed=0, side=8):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side)).astype(np.uint8)


def _save(path, compress=False, **arrays):
    (np.savez_compressed if compress else np.savez)(path, **arrays)
    return f"npz:{path}"


def _is_mapped(array):
    """True if `array` is, or is a view of, a memory map of a file."""
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


@pytest.mark.parametrize("mmap_mode", [False, True], ids=["memory", "mmap"])
def test_own_splits_keep_the_test_split_whole_and_carve_val_from_train(tmp_path, mmap_mode):
    x_train, x_test = _images(50), _images(13, seed=1)
    y_train, y_test = np.arange(50) % 3, np.arange(13) % 3
    spec = _save(
        tmp_path / "own.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
    )
    splits = load_dataset(spec, mmap=mmap_mode)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 5, 13)
    # The test split is x_test as given: every image, in the file's order.
    np.testing.assert_array_equal(np.asarray(splits.test.x)[:, 0], x_test / np.float32(255))
    np.testing.assert_array_equal(splits.test.y, y_test)
    # Train and val together are exactly x_train (no test image leaks into them).
    together = np.concatenate([np.asarray(splits.train.x), np.asarray(splits.val.x)])[:, 0]
    order = np.lexsort(together.reshape(50, -1).T)
    expected = x_train / np.float32(255)
    np.testing.assert_array_equal(together[order], expected[np.lexsort(expected.reshape(50, -1).T)])
    assert splits.info()["sizes"] == {"train": 45, "val": 5, "test": 13}
    assert splits.class_names == ("0", "1", "2")
    again = load_dataset(spec, mmap=not mmap_mode)  # deterministic, and the same either way
    for name in ("train", "val", "test"):
        a, b = getattr(splits, name), getattr(again, name)
        np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
        np.testing.assert_array_equal(a.y, b.y)


def test_own_splits_unlabelled_and_binarized(tmp_path):
    spec = _save(tmp_path / "own.npz", x_train=_images(30), x_test=_images(7, seed=1))
    for binarize in ("static", "dynamic"):
        splits = load_dataset(spec, binarize=binarize)
        assert len(splits.test) == 7 and splits.test.y is None and splits.num_classes is None
        assert set(np.unique(splits.test.x)) <= {0.0, 1.0}
        mapped = load_dataset(spec, binarize=binarize, mmap=True)
        np.testing.assert_array_equal(np.asarray(mapped.test.x), splits.test.x)
        np.testing.assert_array_equal(np.asarray(mapped.val.x), splits.val.x)


OK = {"x_train": _images(20), "x_test": _images(5, seed=1)}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x_train": _images(20)}, "has 'x_train' but no 'x_test'"),
        ({"x_test": _images(20)}, "has 'x_test' but no 'x_train'"),
        ({**OK, "y_train": np.arange(20) % 2}, "labels for one split only: has 'y_train'"),
        ({**OK, "y_test": np.arange(5) % 2}, "labels for one split only: has 'y_test'"),
        (
            {**OK, "y_train": np.arange(19) % 2, "y_test": np.arange(5) % 2},
            r"y_train: expected shape \(20,\)",
        ),
        (
            {**OK, "y_train": np.arange(20) % 2, "y_test": np.arange(6) % 2},
            r"y_test: expected shape \(5,\)",
        ),
        (
            {**OK, "y_train": np.arange(20) % 2, "y_test": np.full(5, 0.5)},
            "y_test: expected integer labels",
        ),
        (
            {"x_train": _images(20), "x_test": _images(5, side=6)},
            r"x_train images have shape \(1, 8, 8\).* x_test images \(1, 6, 6\)",
        ),
        ({**OK, "x": _images(20)}, "holds both 'x' and 'x_train', 'x_test'"),
        ({**OK, "x_val": _images(3)}, "'x_val'.* carved from the training images"),
        ({"x_train": _images(20), "x_test": _images(0)}, "x_test holds no images"),
        ({"x_train": _images(3), "x_test": _images(5)}, "too few .* non-empty val"),
        ({**OK, "x_test": np.full((5, 8, 8), 2.0)}, r"x_test: values must lie in \[0, 1\]"),
        ({**OK, "x_train": np.zeros((20, 3))}, r"x_train: expected shape"),
        ({"train": _images(20)}, r"expected an array 'x' \(or 'x_train' and 'x_test'\)"),
    ],
)
@pytest.mark.parametrize("mmap_mode", [False, True], ids=["memory", "mmap"])
def test_bad_split_files_are_clear_errors(tmp_path, arrays, message, mmap_mode):
    spec = _save(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset(spec, mmap=mmap_mode)
    assert "bad.npz" in str(info.value)


def test_pickled_or_damaged_members_are_clear_errors(tmp_path):
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x_train=np.array([{"a": 1}] * 20, dtype=object), x_test=_images(5))
    with pytest.raises(ValueError, match="pickled.npz.*pickled objects"):
        load_dataset(f"npz:{pickled}", mmap=True)
    whole = tmp_path / "whole.npz"
    np.savez(whole, x=_images(40))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(whole.read_bytes()[:1500])
    for mmap_mode in (False, True):
        with pytest.raises(ValueError, match="truncated.npz: not a readable"):
            load_dataset(f"npz:{truncated}", mmap=mmap_mode)


def _write_npz_with(path, compression, **arrays):
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for key, value in arrays.items():
            with archive.open(key + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)


@pytest.mark.parametrize("order", ["C", "F"])
def test_stored_npz_and_npy_are_memory_mapped_and_equal_a_normal_load(tmp_path, order):
    x = np.asarray(np.random.default_rng(0).random((30, 5, 4)), order=order)
    y = np.arange(30) % 4
    stored, npy = tmp_path / "stored.npz", tmp_path / "x.npy"
    np.savez(stored, x=x, y=y, class_names=np.array(list("abcd")))
    np.save(npy, x)
    with np.load(stored) as archive:
        normal = {k: archive[k] for k in archive.files}
    mapped = open_array_file(stored)
    assert sorted(mapped) == ["class_names", "x", "y"]
    for key, value in normal.items():
        assert isinstance(mapped[key], np.memmap), key
        np.testing.assert_array_equal(mapped[key], value)
    assert mapped["x"].flags.f_contiguous == (order == "F")
    from_npy = open_array_file(npy)
    assert isinstance(from_npy["x"], np.memmap)
    np.testing.assert_array_equal(from_npy["x"], x)
    assert not isinstance(open_array_file(npy, mmap=False)["x"], np.memmap)


def test_compressed_npz_members_fall_back_to_a_normal_load(tmp_path):
    x = np.random.default_rng(0).random((30, 4, 4)).astype(np.float32)
    path = tmp_path / "mixed.npz"
    # One member deflated, one stored, in one archive: each is read the way it can be.
    _write_npz_with(path, zipfile.ZIP_DEFLATED, x=x)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_STORED) as archive:
        with archive.open("y.npy", "w") as f:
            np.lib.format.write_array(f, np.arange(30) % 2)
    arrays = open_array_file(path)
    assert not _is_mapped(arrays["x"]) and isinstance(arrays["y"], np.memmap)
    np.testing.assert_array_equal(arrays["x"], x)
    splits = load_dataset(f"npz:{path}", mmap=True)
    np.testing.assert_array_equal(np.asarray(splits.test.x), load_dataset(f"npz:{path}").test.x)


def test_mapped_splits_read_rows_from_the_file_batch_by_batch(tmp_path):
    x_train, x_test = _images(50), _images(13, seed=1)
    spec = _save(
        tmp_path / "own.npz",
        x_train=x_train,
        x_test=x_test,
        y_train=np.arange(50) % 2,
        y_test=np.arange(13) % 2,
    )
    splits = load_dataset(spec, mmap=True)
    for split in (splits.train, splits.val, splits.test):
        assert isinstance(split.x, ImageRows) and _is_mapped(split.x.source)
        assert split.x.shape == (len(split), 1, 8, 8)
    in_memory = load_dataset(spec)
    order = torch.randperm(45)
    got = list(iter_batches(splits.train, 16, "cpu", order))
    assert [len(xb) for xb, _ in got] == [16, 16, 13]
    x = torch.cat([xb for xb, _ in got])
    y = torch.cat([yb for _, yb in got])
    torch.testing.assert_close(x, torch.from_numpy(in_memory.train.x)[order], rtol=0, atol=0)
    torch.testing.assert_close(y, torch.from_numpy(in_memory.train.y)[order], rtol=0, atol=0)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    plain = list(iter_batches(in_memory.test, 8))  # numpy arrays work the same way
    assert [len(xb) for xb, _ in plain] == [8, 5]


def test_a_file_with_bad_values_late_in_it_is_found_by_the_chunked_scan(tmp_path):
    x = np.zeros((4000, 32, 32), np.float32)  # 16 MB of float32: the scan takes 2+ chunks
    x[-1, 5, 5] = np.nan
    x[-2, 0, 0] = 7.0
    path = tmp_path / "late.npy"
    np.save(path, x)
    with pytest.raises(ValueError, match="1 value"):
        load_dataset(f"npz:{path}", mmap=True)
    x[-1, 5, 5] = 0.0
    np.save(path, x)
    with pytest.raises(ValueError, match=r"got range \[0, 7\]"):
        load_dataset(f"npz:{path}", mmap=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    try:
        train.train(TrainConfig(epochs=1, num_threads=1, **TINY), out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def _eval(capsys, *argv):
    try:
        code = evaluate.main([*argv, "--k", "2", "--device", "cpu"])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


def test_vae_eval_scores_a_whole_held_out_file_when_asked(tiny_run, tmp_path, capsys):
    grey = np.random.default_rng(0).random((40, 8, 8)).astype(np.float32)
    spec = _save(tmp_path / "held_out.npz", x=grey, y=np.arange(40) % 10)
    code, held_back = _eval(capsys, str(tiny_run), "--data", spec)
    assert code == 0 and held_back["test_images"] == 8  # unchanged: 20 % held back
    code, whole = _eval(capsys, str(tiny_run), "--data", spec, "--whole-file")
    assert code == 0 and whole["test_images"] == 40 and whole["test_split"] == "whole file"
    assert whole["data"] == spec and np.isfinite(whole["test_nll_nats"])
    # Scored whole: the noise-free per-image baseline is the mean of its two halves' values.
    parts = [_save(tmp_path / f"part{i}.npz", x=grey[i * 20 : (i + 1) * 20]) for i in (0, 1)]
    halves = [_eval(capsys, str(tiny_run), "--data", p, "--whole-file")[1] for p in parts]
    key = "baseline_independent_bernoulli_nll_nats"
    assert whole[key] == pytest.approx((halves[0][key] + halves[1][key]) / 2, abs=1e-9)
    npy = tmp_path / "held_out.npy"
    np.save(npy, grey)
    code, from_npy = _eval(capsys, str(tiny_run), "--data", f"npz:{npy}", "--whole-file")
    assert code == 0 and from_npy["test_nll_nats"] == pytest.approx(whole["test_nll_nats"])


def test_vae_eval_scores_a_files_own_test_split_whole_by_default(tiny_run, tmp_path, capsys):
    spec = _save(tmp_path / "own.npz", x_train=_images(30), x_test=_images(17, seed=1))
    code, metrics = _eval(capsys, str(tiny_run), "--data", spec)
    assert code == 0 and metrics["test_images"] == 17 and "test_split" not in metrics


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--whole-file"], "--whole-file: needs --data"),
        (["--data", "digits", "--whole-file"], "scoring a whole file needs npz:PATH"),
        (["--data", "OWN", "--whole-file"], "holds its own test split x_test"),
        (["--data", "SIX", "--whole-file"], r"shape \(1, 6, 6\)"),
    ],
)
def test_vae_eval_whole_file_errors_are_one_line(tiny_run, tmp_path, capsys, argv, message):
    files = {
        "OWN": _save(tmp_path / "own.npz", x_train=_images(30), x_test=_images(7)),
        "SIX": _save(tmp_path / "six.npz", x=_images(30, side=6)),
    }
    code, err = _eval(capsys, str(tiny_run), *[files.get(a, a) for a in argv])
    assert code == 2 and err.startswith("vae-eval: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and re.search(message, err), err


def test_load_whole_keeps_every_image_and_label(tmp_path):
    x, y = _images(40), np.arange(40) % 5
    spec = _save(tmp_path / "all.npz", x=x, y=y)
    for mmap_mode in (False, True):
        split = load_whole(spec, binarize="static", mmap=mmap_mode)
        assert len(split) == 40
        np.testing.assert_array_equal(split.y, y)
        expected = (x[:, None] / np.float32(255) >= 0.5).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(split.x), expected)
