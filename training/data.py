"""Datasets as numpy arrays: digits, MNIST/Fashion-MNIST IDX files and .npz, split and checked.

Every loader returns images as float32 (N, C, H, W) in [0, 1] and labels as int64 (N,) or
None. Splits are drawn with numpy's legacy RandomState, whose stream numpy keeps frozen, so
the same spec gives the same split on every machine and numpy version.
"""

from __future__ import annotations

import gzip
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DatasetSplits",
    "IDX_FILES",
    "SPLIT_SEED",
    "Split",
    "binarize_static",
    "check_images",
    "check_labels",
    "load_dataset",
    "parse_spec",
]

logger = logging.getLogger(__name__)

SPLIT_SEED = 0  # the one seed of every train/val/test split; independent of the training seed
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2  # only for data without an official test set (digits, npz)
STATIC_THRESHOLD = 0.5

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
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
class Split:
    """One split: images float32 (N, C, H, W) in [0, 1] and labels int64 (N,) or None."""

    x: np.ndarray
    y: np.ndarray | None

    def __len__(self) -> int:
        return len(self.x)


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
    spec: str, *, binarize: str = "none", split_seed: int = SPLIT_SEED
) -> DatasetSplits:
    """Loads, checks and splits a dataset.

    Args:
        spec: "digits", "mnist:DIR", "fashion-mnist:DIR" or "npz:PATH".
        binarize: "none", "static" (threshold 0.5) or "dynamic" (see DatasetSplits).
        split_seed: seed of the train/val(/test) split.

    Returns:
        The checked splits; the same arguments give the same arrays on every machine.

    Raises:
        FileNotFoundError: a file the spec names (or implies) does not exist.
        ValueError: bad spec, shapes, values, labels, or a split would be empty.
    """
    kind, arg = parse_spec(spec)
    if binarize not in ("none", "static", "dynamic"):
        raise ValueError(f"binarize: expected 'none', 'static' or 'dynamic', got {binarize!r}")
    rng = np.random.RandomState(split_seed)
    if kind == "digits":
        x, y = _load_digits()
        class_names = _CLASS_NAMES["digits"]
        train, val, test = _split_three(spec, x, y, rng)
    elif kind == "npz":
        x, y, class_names = _load_npz(Path(arg))
        train, val, test = _split_three(spec, x, y, rng)
    else:
        (x_tr, y_tr), test = _load_idx_dir(Path(arg))
        class_names = _CLASS_NAMES[kind]
        train, val = _split_off(spec, Split(x_tr, y_tr), VAL_FRACTION, rng, "val")
    for name, split in (("train", train), ("val", val), ("test", test)):
        check_labels(f"{spec} {name} labels", split.y, len(class_names), len(split))
    splits = DatasetSplits(spec, train, val, test, tuple(class_names), binarize, split_seed)
    return _binarized(splits, np.random.RandomState(split_seed + 1))


def check_images(name: str, x: np.ndarray) -> np.ndarray:
    """Checks images and returns them as float32 (N, C, H, W) in [0, 1].

    uint8 arrays are scaled by 1/255; (N, H, W) gains a channel axis; (N, D) with D a
    perfect square becomes (N, 1, √D, √D).

    Raises:
        ValueError: wrong rank or shape, non-numeric, NaN/Inf, or values outside [0, 1].
    """
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif x.dtype == np.bool_:
        x = x.astype(np.float32)
    elif not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name}: expected numeric images, got dtype {x.dtype}")
    if x.ndim == 2 and x.shape[1] > 0 and math.isqrt(x.shape[1]) ** 2 == x.shape[1]:
        side = math.isqrt(x.shape[1])
        x = x.reshape(len(x), 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or min(x.shape[1:]) < 1:
        raise ValueError(
            f"{name}: expected shape (N, H, W), (N, C, H, W) or (N, D) with D a square, "
            f"got {tuple(x.shape)}"
        )
    x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} value(s) are NaN or Inf")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(
            f"{name}: values must lie in [0, 1] (uint8 is scaled by 1/255), "
            f"got range [{x.min():g}, {x.max():g}]"
        )
    return np.ascontiguousarray(x)


def check_labels(name: str, y: np.ndarray | None, num_classes: int, n: int) -> None:
    """Checks that labels are n integers in [0, num_classes).

    Raises:
        ValueError: wrong shape or dtype, or a label outside the class range.
    """
    if y is None:
        return
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: expected integer labels, got dtype {y.dtype}")
    outside = (y < 0) | (y >= num_classes)
    if outside.any():
        raise ValueError(
            f"{name}: {int(outside.sum())} label(s) outside the class range [0, {num_classes}), "
            f"e.g. {int(y[outside][0])}"
        )


def binarize_static(x: np.ndarray) -> np.ndarray:
    """Thresholds grey levels at 0.5 (float32 0/1)."""
    return (x >= STATIC_THRESHOLD).astype(np.float32)


def _binarized(splits: DatasetSplits, rng: np.random.RandomState) -> DatasetSplits:
    if splits.binarize == "none":
        return splits
    if splits.binarize == "static":
        train, val, test = (
            Split(binarize_static(s.x), s.y) for s in (splits.train, splits.val, splits.test)
        )
    else:
        val, test = (
            Split((rng.random_sample(s.x.shape) < s.x).astype(np.float32), s.y)
            for s in (splits.val, splits.test)
        )
        train = splits.train
    return DatasetSplits(
        splits.spec, train, val, test, splits.class_names, splits.binarize, splits.split_seed
    )


def _split_off(
    spec: str, split: Split, fraction: float, rng: np.random.RandomState, name: str
) -> tuple[Split, Split]:
    n = len(split)
    order = rng.permutation(n)
    n_out = int(round(n * fraction))
    if n_out == 0 or n_out == n:
        raise ValueError(
            f"{spec}: {n} image(s) are too few to split off a non-empty {name} split "
            f"({fraction:.0%}) and keep a non-empty train split"
        )
    keep, out = np.sort(order[n_out:]), np.sort(order[:n_out])
    return _take(split, keep), _take(split, out)


def _split_three(
    spec: str, x: np.ndarray, y: np.ndarray | None, rng: np.random.RandomState
) -> tuple[Split, Split, Split]:
    rest, test = _split_off(spec, Split(x, y), TEST_FRACTION, rng, "test")
    train, val = _split_off(spec, rest, VAL_FRACTION / (1 - TEST_FRACTION), rng, "val")
    return train, val, test


def _take(split: Split, idx: np.ndarray) -> Split:
    return Split(split.x[idx], None if split.y is None else split.y[idx])


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 of set bits in 4×4 blocks of the original 32×32 bitmaps.
    x = check_images("digits", bunch.images.astype(np.float32) / 16.0)
    return x, bunch.target.astype(np.int64)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    if not path.is_file():
        raise FileNotFoundError(f"npz dataset not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npz file of plain arrays ({exc})") from exc
    if "x" not in arrays:
        raise ValueError(f"{path}: expected an array 'x', found {sorted(arrays) or 'none'}")
    x = check_images(f"{path} x", arrays["x"])
    y = arrays.get("y")
    if y is None:
        return x, None, ()
    y = np.asarray(y)
    check_labels(f"{path} y", y, np.iinfo(np.int64).max, len(x))
    if "class_names" in arrays:
        class_names = tuple(str(c) for c in np.asarray(arrays["class_names"]).reshape(-1))
    else:
        class_names = tuple(str(i) for i in range(int(y.max(initial=-1)) + 1))
    check_labels(f"{path} y", y, len(class_names), len(x))
    return x, y.astype(np.int64), class_names


def _load_idx_dir(directory: Path) -> tuple[tuple[np.ndarray, np.ndarray], Split]:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"IDX dataset folder not found: {directory} (expected it to hold "
            + ", ".join(IDX_FILES.values())
            + ", each raw or .gz)"
        )
    paths = {key: _find_idx_file(directory, base) for key, base in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"{directory}: missing IDX file(s) {', '.join(missing)} (raw or .gz); "
            "download the dataset's four standard files into this folder"
        )
    arrays = {key: _read_idx(path) for key, path in paths.items()}  # type: ignore[arg-type]
    splits = []
    for part in ("train", "test"):
        x, y = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{directory}: {part} images {tuple(x.shape)} and labels {tuple(y.shape)} "
                "do not match (expected (N, H, W) and (N,))"
            )
        splits.append((check_images(f"{paths[f'{part}_images']}", x), y.astype(np.int64)))
    (x_tr, y_tr), (x_te, y_te) = splits
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(f"{directory}: train images {x_tr.shape[1:]} vs test {x_te.shape[1:]}")
    return (x_tr, y_tr), Split(x_te, y_te)


def _find_idx_file(directory: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read IDX file ({exc})") from exc
    # IDX header: two zero bytes, a type code (0x08 = uint8), the rank, then rank big-endian
    # uint32 dimensions (http://yann.lecun.com/exdb/mnist/).
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX data is {len(raw)} bytes, header implies {expected}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)
