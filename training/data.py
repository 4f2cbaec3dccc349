"""Datasets as numpy arrays: digits, MNIST/Fashion-MNIST IDX files, .npz/.npy; checked, split.

Every loader returns images as float32 (N, C, H, W) in [0, 1] and labels as int64 (N,) or
None. Splits are drawn with numpy's legacy RandomState, whose stream numpy keeps frozen, so
the same spec gives the same split on every machine and numpy version.

With ``mmap=True`` an .npy file, and every uncompressed (stored) member of an .npz, is read
memory-mapped (`data_files` reads the files), and the images of each split are an `ImageRows`
(`image_rows`): rows of the file's array, converted to float32 one batch at a time
(`iter_batches`), never the whole array at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vaeserve.training.data_files import _load_idx_dir, _load_npz
from vaeserve.training.image_rows import (
    ImageRows,
    Split,
    binarize_static,
    check_images,
    check_labels,
    iter_chunks,
)

__all__ = [
    "DatasetSplits",
    "SPLIT_SEED",
    "load_dataset",
    "load_whole",
    "parse_spec",
]


SPLIT_SEED = 0  # the one seed of every train/val/test split; independent of the training seed
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2  # only for data without an official test set (digits, npz)
_CLASS_NAMES = {
    "digits": tuple(str(i) for i in range(10)),
    "mnist": tuple(str(i) for i in range(10)),
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
}
_SPEC_FORMS = "digits, mnist:DIR, fashion-mnist:DIR or npz:PATH"


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train/val/test splits and the facts a checkpoint records about it.

    With binarize="dynamic" the train images stay grey (the training loop draws a fresh
    Bernoulli sample each epoch) while val and test hold one fixed, seeded draw, so that the
    reported numbers are likelihoods of binary data.
    """

    spec: str
    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]  # empty when the data has no labels
    binarize: str
    split_seed: int
    val_fraction: float = VAL_FRACTION  # share of the training images held out as val

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(int(d) for d in self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None for unlabelled data."""
        return len(self.class_names) if self.train.y is not None else None

    def info(self) -> dict[str, Any]:
        """Returns the `data_info` dict stored in a checkpoint (plain values only)."""
        return {
            "spec": self.spec,
            "shape": list(self.shape),
            "value_range": [0.0, 1.0],
            "binarize": self.binarize,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "split_seed": self.split_seed,
            "val_fraction": self.val_fraction,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
        }


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Splits a dataset spec into (kind, argument), e.g. "npz:a.npz" -> ("npz", "a.npz").

    Raises:
        ValueError: the spec is not one of the accepted forms.
    """
    if not isinstance(spec, str):
        raise ValueError(f"dataset: expected {_SPEC_FORMS}, got {spec!r}")
    kind, sep, arg = spec.partition(":")
    if kind == "digits" and not sep:
        return kind, None
    if kind in ("mnist", "fashion-mnist", "npz") and arg:
        return kind, arg
    raise ValueError(f"dataset: expected {_SPEC_FORMS}, got {spec!r}")


def load_dataset(
    spec: str,
    *,
    binarize: str = "none",
    split_seed: int = SPLIT_SEED,
    mmap: bool = False,
    val_fraction: float = VAL_FRACTION,
) -> DatasetSplits:
    """Loads, checks and splits a dataset.

    Args:
        spec: "digits", "mnist:DIR", "fashion-mnist:DIR" or "npz:PATH" (.npz or .npy).
        binarize: "none", "static" (threshold 0.5) or "dynamic" (see DatasetSplits).
        split_seed: seed of the train/val(/test) split.
        mmap: read .npz/.npy data memory-mapped and give each split's images as an
            `ImageRows` (read and converted batch by batch); False: numpy arrays in memory.
            The values are the same either way.
        val_fraction: share of the training images held out as val (0.1); 0 leaves val
            empty and every training image in train. The other splits do not move with it.

    Returns:
        The checked splits; the same arguments give the same arrays on every machine. An
        .npz holding x_train and x_test keeps x_test whole as the test split and carves val
        (10 %) from x_train; one holding x holds back 20 % as test and 10 % as val.

    Raises:
        FileNotFoundError: a file the spec names (or implies) does not exist.
        ValueError: bad spec, shapes, values, labels, or a split would be empty.
    """
    kind, arg = parse_spec(spec)
    _check_binarize(binarize)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float):
        raise ValueError(f"val_fraction: expected a number in [0, 0.5], got {val_fraction!r}")
    if not 0 <= val_fraction <= 0.5:
        raise ValueError(f"val_fraction: expected a number in [0, 0.5], got {val_fraction!r}")
    rng = np.random.RandomState(split_seed)
    if kind == "digits":
        x, y = _load_digits()
        class_names = _CLASS_NAMES["digits"]
        train, val, test = _split_three(spec, x, y, rng, val_fraction)
    elif kind == "npz":
        data = _load_npz(Path(arg), mmap)
        class_names = data.class_names
        if data.test is None:
            train, val, test = _split_three(spec, data.train.x, data.train.y, rng, val_fraction)
        else:  # the file's own test split, whole; val is carved from its train split only
            train, val = _split_off(spec, data.train, val_fraction, rng, "val")
            test = data.test
    else:
        (x_tr, y_tr), test = _load_idx_dir(Path(arg))
        class_names = _CLASS_NAMES[kind]
        train, val = _split_off(spec, Split(x_tr, y_tr), val_fraction, rng, "val")
    for name, split in (("train", train), ("val", val), ("test", test)):
        check_labels(f"{spec} {name} labels", split.y, len(class_names), len(split))
    splits = DatasetSplits(
        spec, train, val, test, tuple(class_names), binarize, split_seed, val_fraction
    )
    splits = _binarized(splits, np.random.RandomState(split_seed + 1))
    return splits if mmap else _in_memory(splits)


def load_whole(
    spec: str, *, binarize: str = "none", split_seed: int = SPLIT_SEED, mmap: bool = False
) -> Split:
    """Every image of an npz:PATH file holding one array `x` (and `y`), as one test split.

    For scoring a held-out file whole (`vae-eval --whole-file`): nothing is held back.
    Binarization is that of a test split: a 0.5 threshold, or for "dynamic" one fixed draw
    seeded by `split_seed`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an npz:PATH spec, a file with its own x_train/x_test splits, or bad data.
    """
    kind, arg = parse_spec(spec)
    _check_binarize(binarize)
    if kind != "npz":
        raise ValueError(
            f"whole file: {spec} is not a file of images; scoring a whole file needs "
            "npz:PATH (an .npz holding x, or an .npy)"
        )
    data = _load_npz(Path(arg), mmap)
    if data.test is not None:
        raise ValueError(
            f"{arg}: holds its own test split x_test, which is scored whole without asking; "
            "whole-file scoring is for a file holding one array 'x'"
        )
    if len(data.train) == 0:
        raise ValueError(f"{arg}: x holds no images")
    x = data.train.x
    if binarize == "static":
        x = x.thresholded()
    elif binarize == "dynamic":
        x = _fixed_draw(x, np.random.RandomState(split_seed + 1))
    split = Split(x, data.train.y)
    return split if mmap else Split(np.asarray(split.x), split.y)


def _check_binarize(binarize: str) -> None:
    if binarize not in ("none", "static", "dynamic"):
        raise ValueError(f"binarize: expected 'none', 'static' or 'dynamic', got {binarize!r}")


def _in_memory(splits: DatasetSplits) -> DatasetSplits:
    train, val, test = (
        Split(np.asarray(s.x) if isinstance(s.x, ImageRows) else s.x, s.y)
        for s in (splits.train, splits.val, splits.test)
    )
    return dataclasses.replace(splits, train=train, val=val, test=test)


def _fixed_draw(x: np.ndarray | ImageRows, rng: np.random.RandomState) -> Any:
    """One Bernoulli draw of grey images, chunk by chunk from one RandomState stream (the same
    numbers as one draw of the whole array); ImageRows stay lazy, held as bytes of 0/1."""
    if isinstance(x, np.ndarray):
        return (rng.random_sample(x.shape) < x).astype(np.float32)
    out = np.empty(x.shape, np.bool_)
    for start, chunk in iter_chunks(x):
        out[start : start + len(chunk)] = rng.random_sample(chunk.shape) < chunk
    return ImageRows(out)


def _binarized(splits: DatasetSplits, rng: np.random.RandomState) -> DatasetSplits:
    if splits.binarize == "none":
        return splits
    if splits.binarize == "static":
        train, val, test = (
            Split(s.x.thresholded() if isinstance(s.x, ImageRows) else binarize_static(s.x), s.y)
            for s in (splits.train, splits.val, splits.test)
        )
    else:
        val, test = (Split(_fixed_draw(s.x, rng), s.y) for s in (splits.val, splits.test))
        train = splits.train
    return dataclasses.replace(splits, train=train, val=val, test=test)


def _split_off(
    spec: str, split: Split, fraction: float, rng: np.random.RandomState, name: str
) -> tuple[Split, Split]:
    n = len(split)
    order = rng.permutation(n)  # drawn for fraction 0 too: the test split never depends on val
    if fraction == 0 and name == "val":  # no validation split asked for
        return split, _take(split, np.zeros(0, np.int64))
    n_out = int(round(n * fraction))
    if n_out == 0 or n_out == n:
        raise ValueError(
            f"{spec}: {n} image(s) are too few to split off a non-empty {name} split "
            f"({fraction:.0%}) and keep a non-empty train split"
        )
    keep, out = np.sort(order[n_out:]), np.sort(order[:n_out])
    return _take(split, keep), _take(split, out)


def _split_three(
    spec: str,
    x: np.ndarray,
    y: np.ndarray | None,
    rng: np.random.RandomState,
    val_fraction: float = VAL_FRACTION,
) -> tuple[Split, Split, Split]:
    # val_fraction is a share of the whole (digits: 10 % val, 20 % test, 70 % train).
    rest, test = _split_off(spec, Split(x, y), TEST_FRACTION, rng, "test")
    train, val = _split_off(spec, rest, val_fraction / (1 - TEST_FRACTION), rng, "val")
    return train, val, test


def _take(split: Split, idx: np.ndarray) -> Split:
    x = split.x.take(idx) if isinstance(split.x, ImageRows) else split.x[idx]
    return Split(x, None if split.y is None else split.y[idx])


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 of set bits in 4×4 blocks of the original 32×32 bitmaps.
    x = check_images("digits", bunch.images.astype(np.float32) / 16.0)
    return x, bunch.target.astype(np.int64)
