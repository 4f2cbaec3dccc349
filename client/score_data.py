"""vae-score's data: an .npz read with numpy alone, shaped and scaled as the model expects.

The client may not import the training package (the layer rule), so this reads the file
itself, the way ``vaeserve.training.data`` reads an ``npz:PATH``: uint8 scaled by 1/255, bool
and other numbers cast to float, (N, H, W) given a channel axis, (N, D) with D a square made
(N, 1, √D, √D); then the images must have the manifest's ``sample_shape`` and lie in its
``value_range``. Nothing is binarized: the model scores the values the file holds.

``--split``: a file holding ``x_train`` and ``x_test`` scores ``x_test`` by default; ``train``
and ``val`` are training's split of ``x_train`` (val: 10 %, drawn as vae-train draws it), and
``all`` is x_train then x_test. A file holding ``x`` scores all of it by default; ``train``,
``val`` and ``test`` select vae-train's 70/10/20 % split of it (seed 0, numpy's frozen
RandomState stream), so ``--split test`` scores the images a model trained on the file never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeserve.info import ModelInfo
from vaeserve.manifest import sha256_of_file

__all__ = ["SPLITS", "DataError", "ScoreData", "load_score_data", "split_off", "to_model"]

SPLITS = ("test", "train", "val", "all")
# vae-train's split (vaeserve.training.data): one seed, val 10 %, test 20 % of a file with x.
_SPLIT_SEED = 0
_VAL_FRACTION = 0.1
_TEST_FRACTION = 0.2
_KEYS = ("x", "y", "x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """The data cannot be scored by this model: one line, exit code 2."""


@dataclass(frozen=True)
class ScoreData:
    """The rows to score, in order: row i of ``x`` is scored as input i (its noise index)."""

    path: Path
    sha256: str
    split: str
    x: np.ndarray  # (n, *sample_shape), the model's sample dtype
    y: np.ndarray | None  # (n,) int64
    rows: np.ndarray  # (n,) int64: each row's index in the file's array it came from
    source: tuple[str, ...]  # the arrays the rows came from, in order ("x", or "x_test", ...)


def load_score_data(spec: str, split: str | None, info: ModelInfo) -> ScoreData:
    """Read ``npz:PATH`` and return the rows of ``split`` (None: the file's default).

    Raises:
        DataError: a bad spec, a missing or unreadable file, a layout, shape or value range the
            model does not take, or labels a CVAE cannot use.
    """
    kind, sep, arg = spec.partition(":")
    if kind == "digits" and not sep:
        raise DataError(
            "--data: 'digits' needs scikit-learn, which the client does not install; save the "
            "images as an .npz (x, y) and give npz:PATH"
        )
    if kind != "npz" or not arg:
        raise DataError(f"--data: expected npz:PATH, got {spec!r}")
    path = Path(arg)
    if not path.is_file():
        raise DataError(f"--data: {path} does not exist or is not a file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k in _KEYS}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"--data: cannot read {path} as an .npz: {exc}") from None
    x, y, rows, source, split = _select(path, arrays, split)
    x = to_model(x, info, f"--data: {path}")
    if y is not None:
        y = _labels(path, y, len(x), info)
    elif info.kind == "cvae":
        raise DataError(
            f"--data: {path} holds no labels (y / y_test), but {info.name} is a CVAE: "
            "scoring it needs each image's class"
        )
    return ScoreData(path, sha256_of_file(path), split, x, y, rows, source)


def _select(
    path: Path, arrays: dict[str, np.ndarray], split: str | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, tuple[str, ...], str]:
    if "x_test" in arrays:
        if "x_train" not in arrays and split not in (None, "test"):
            raise DataError(f"--split {split}: {path} holds x_test but no x_train")
        split = split or "test"
        if split == "test":
            parts = ["x_test"]
        elif split == "all":
            parts = ["x_train", "x_test"]
        else:  # vae-train carves val (10 %) from x_train
            n = len(arrays["x_train"])
            rest, val = split_off(n, _VAL_FRACTION, np.random.RandomState(_SPLIT_SEED))
            return _part(path, arrays, "x_train", rest if split == "train" else val) + (split,)
        xs, ys, rows = [], [], []
        for name in parts:
            x, y, r, _ = _part(path, arrays, name, None)
            xs.append(x)
            ys.append(y)
            rows.append(r)
        labelled = [y is not None for y in ys]
        if any(labelled) and not all(labelled):
            raise DataError(f"--data: {path} has labels for one split only")
        y = np.concatenate(ys) if all(labelled) else None
        return np.concatenate(xs), y, np.concatenate(rows), tuple(parts), split
    if "x" not in arrays:
        raise DataError(
            f"--data: {path}: expected an array 'x' (or 'x_test'), found {sorted(arrays) or 'none'}"
        )
    split = split or "all"
    if split == "all":
        return _part(path, arrays, "x", None) + (split,)
    rng = np.random.RandomState(_SPLIT_SEED)
    rest, test = split_off(len(arrays["x"]), _TEST_FRACTION, rng)
    if split == "test":
        return _part(path, arrays, "x", test) + (split,)
    keep, val = split_off(len(rest), _VAL_FRACTION / (1 - _TEST_FRACTION), rng)
    return _part(path, arrays, "x", rest[keep if split == "train" else val]) + (split,)


def split_off(n: int, fraction: float, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """(kept, split off) row numbers, sorted: vae-train's ``_split_off`` on n rows."""
    order = rng.permutation(n)
    n_out = int(round(n * fraction))
    if n_out == 0 or n_out == n:
        raise DataError(f"--split: {n} image(s) are too few to split as vae-train does")
    return np.sort(order[n_out:]), np.sort(order[:n_out])


def _part(
    path: Path, arrays: dict[str, np.ndarray], name: str, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, tuple[str, ...]]:
    x = arrays[name]
    label = "y" + name[1:]
    y = arrays.get(label)
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise DataError(f"--data: {path}: {label} has shape {y.shape}, expected ({len(x)},)")
    if rows is None:
        rows = np.arange(len(x), dtype=np.int64)
    return x[rows], None if y is None else y[rows], rows.astype(np.int64), (name,)


def to_model(x: np.ndarray, info: ModelInfo, where: str) -> np.ndarray:
    """Images as the model takes them: its sample shape and dtype, inside its value range."""
    if x.dtype != np.bool_ and not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{where}: expected numeric images, got dtype {x.dtype}")
    if len(x) == 0:
        raise DataError(f"{where}: holds no images")
    if x.ndim == 2 and x.shape[1] > 0 and math.isqrt(x.shape[1]) ** 2 == x.shape[1]:
        side = math.isqrt(x.shape[1])
        x = x.reshape(len(x), 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    expected = tuple(info.sample_shape)
    if tuple(x.shape[1:]) != expected:
        raise DataError(
            f"{where}: images have shape {tuple(x.shape[1:])}, but {info.name}:{info.version} "
            f"takes {expected} (C, H, W)"
        )
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    x = np.ascontiguousarray(x.astype(info.sample_dtype, copy=False))
    if not np.isfinite(x).all():
        raise DataError(f"{where}: images hold NaN or Inf")
    low, high = info.value_range
    lowest, highest = float(x.min()), float(x.max())
    if lowest < low or highest > high:
        raise DataError(
            f"{where}: values lie in [{lowest:g}, {highest:g}] (uint8 scaled by 1/255), outside "
            f"{info.name}'s value_range [{low:g}, {high:g}]"
        )
    return x


def _labels(path: Path, y: np.ndarray, n: int, info: ModelInfo) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"--data: {path}: labels have dtype {y.dtype}, expected integers")
    y = y.astype(np.int64)
    if info.kind == "cvae" and len(y) and (y.min() < 0 or y.max() >= info.num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(
            f"--data: {path}: label {bad} is outside {info.name}'s classes "
            f"0..{info.num_classes - 1}"
        )
    return y
