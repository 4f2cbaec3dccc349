"""Datasets as numpy arrays: digits, MNIST/Fashion-MNIST IDX files, .npz/.npy; checked, split.

Every loader returns images as float32 (N, C, H, W) in [0, 1] and labels as int64 (N,) or
None. Splits are drawn with numpy's legacy RandomState, whose stream numpy keeps frozen, so
the same spec gives the same split on every machine and numpy version.

With ``mmap=True`` an .npy file, and every uncompressed (stored) member of an .npz, is read
memory-mapped, and the images of each split are an `ImageRows`: rows of the file's array,
converted to float32 one batch at a time (`iter_batches`), never the whole array at once.
"""

from __future__ import annotations

import gzip
import logging
import math
import mmap as _mmap
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DatasetSplits",
    "IDX_FILES",
    "ImageRows",
    "SPLIT_SEED",
    "Split",
    "binarize_static",
    "check_images",
    "check_labels",
    "iter_batches",
    "iter_chunks",
    "load_dataset",
    "load_whole",
    "open_array_file",
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


_CHUNK_BYTES = 16 << 20  # float32 bytes of one chunk of a scan or a conversion
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_SINGLE_KEYS = ("x", "y")
_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")  # the layout of Keras' mnist.npz


class ImageRows:
    """Rows of an image array (often memory-mapped), read as float32 (N, C, H, W) in [0, 1].

    Indexing with a slice, an int or an integer array reads and converts only the rows asked
    for (uint8 scaled by 1/255, bool and other numbers cast to float32, thresholded at 0.5
    when `static`) and returns a new, writable numpy array; `np.asarray(rows)` converts them
    all. The source is checked once, in chunks, when it is loaded.
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(
        self, source: np.ndarray, rows: np.ndarray | None = None, *, static: bool = False
    ) -> None:
        self.source = source  # (M, C, H, W), the file's dtype
        self.rows = rows  # int64 row numbers into source, None for all of them
        self.static = static

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.source.shape[1:])

    def __len__(self) -> int:
        return len(self.source) if self.rows is None else len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            raw = self.source[key] if self.rows is None else self.source[self.rows[key]]
        else:
            idx = np.asarray(key)
            if not np.issubdtype(idx.dtype, np.integer):
                raise TypeError(f"ImageRows: expected a slice or integer rows, got {idx.dtype}")
            raw = self.source[idx if self.rows is None else self.rows[idx]]
        x = _to_float32(raw)
        return binarize_static(x) if self.static else x

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        for start, chunk in iter_chunks(self):
            out[start : start + len(chunk)] = chunk
        return out if dtype is None else out.astype(dtype, copy=False)

    def take(self, idx: np.ndarray) -> ImageRows:
        """The rows `idx` of these rows (nothing is read)."""
        rows = np.asarray(idx, np.int64) if self.rows is None else self.rows[idx]
        return ImageRows(self.source, rows, static=self.static)

    def thresholded(self) -> ImageRows:
        """The same rows, binarized at 0.5 as they are read."""
        return ImageRows(self.source, self.rows, static=True)


def iter_chunks(
    x: np.ndarray | ImageRows, rows: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (start, float32 images) for consecutive blocks of `x`, about 16 MB each."""
    if rows is None:
        rows = max(1, _CHUNK_BYTES // (4 * max(1, math.prod(x.shape[1:]))))
    for start in range(0, len(x), rows):
        yield start, x[start : start + rows]


def iter_batches(
    split: Split, batch_size: int, device: Any = "cpu", order: Any = None
) -> Iterator[tuple[Any, Any]]:
    """Yields (x, y) torch tensors on `device`, `batch_size` images at a time.

    Only the batch being yielded is read from the (possibly memory-mapped) file, converted
    and moved, so a training or evaluation loop never holds the data set on the device.

    Args:
        split: the images and labels (y None gives None).
        batch_size: images per batch (the last one may be smaller).
        device: where the tensors go.
        order: row numbers to visit (e.g. a permutation, numpy or torch); None: 0..N-1.
    """
    import torch

    if order is not None:
        order = np.asarray(order.cpu() if hasattr(order, "cpu") else order, np.int64)
    n = len(split) if order is None else len(order)
    for start in range(0, n, batch_size):
        if order is None:
            idx: Any = slice(start, start + batch_size)
        else:
            idx = order[start : start + batch_size]
        x = torch.from_numpy(np.ascontiguousarray(split.x[idx])).to(device)
        y = None if split.y is None else torch.from_numpy(split.y[idx]).to(device)
        yield x, y


@dataclass(frozen=True)
class Split:
    """One split: images float32 (N, C, H, W) in [0, 1] and labels int64 (N,) or None.

    `x` is a numpy array, or with `load_dataset(..., mmap=True)` for .npz/.npy data an
    `ImageRows` that reads its rows from the file as they are asked for.
    """

    x: np.ndarray | ImageRows
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
    spec: str, *, binarize: str = "none", split_seed: int = SPLIT_SEED, mmap: bool = False
) -> DatasetSplits:
    """Loads, checks and splits a dataset.

    Args:
        spec: "digits", "mnist:DIR", "fashion-mnist:DIR" or "npz:PATH" (.npz or .npy).
        binarize: "none", "static" (threshold 0.5) or "dynamic" (see DatasetSplits).
        split_seed: seed of the train/val(/test) split.
        mmap: read .npz/.npy data memory-mapped and give each split's images as an
            `ImageRows` (read and converted batch by batch); False: numpy arrays in memory.
            The values are the same either way.

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
    rng = np.random.RandomState(split_seed)
    if kind == "digits":
        x, y = _load_digits()
        class_names = _CLASS_NAMES["digits"]
        train, val, test = _split_three(spec, x, y, rng)
    elif kind == "npz":
        data = _load_npz(Path(arg), mmap)
        class_names = data.class_names
        if data.test is None:
            train, val, test = _split_three(spec, data.train.x, data.train.y, rng)
        else:  # the file's own test split, whole; val is carved from its train split only
            train, val = _split_off(spec, data.train, VAL_FRACTION, rng, "val")
            test = data.test
    else:
        (x_tr, y_tr), test = _load_idx_dir(Path(arg))
        class_names = _CLASS_NAMES[kind]
        train, val = _split_off(spec, Split(x_tr, y_tr), VAL_FRACTION, rng, "val")
    for name, split in (("train", train), ("val", val), ("test", test)):
        check_labels(f"{spec} {name} labels", split.y, len(class_names), len(split))
    splits = DatasetSplits(spec, train, val, test, tuple(class_names), binarize, split_seed)
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


def open_array_file(
    path: str | Path, keys: tuple[str, ...] | None = None, *, mmap: bool = True
) -> dict[str, np.ndarray]:
    """Reads the arrays of an .npz (by key) or an .npy (key "x") without pickles.

    With `mmap`, an .npy and every uncompressed (stored) .npz member is a read-only np.memmap
    of the file: its bytes are read when used. A compressed (deflated) member cannot be
    mapped and is read into memory.

    Args:
        path: the file; its kind is told by its first bytes, not its name.
        keys: the keys to read (those missing are left out); None: all.
        mmap: memory-map what can be.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an .npz/.npy of plain arrays (pickled objects, damaged or truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz dataset not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
        if magic.startswith(_NPY_MAGIC):
            if keys is not None and "x" not in keys:
                return {}
            return {"x": _checked_dtype(path, "x", _load_npy(path, mmap))}
        if not magic.startswith(_ZIP_MAGIC[:2]):
            raise ValueError("neither a zip (.npz) nor an .npy file")
        with zipfile.ZipFile(path) as archive:
            members = {
                (i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i
                for i in archive.infolist()
            }
            return {
                key: _checked_dtype(path, key, _read_member(path, archive, info, mmap))
                for key, info in members.items()
                if keys is None or key in keys
            }
    except (ValueError, OSError, EOFError, RuntimeError, NotImplementedError, struct.error) as exc:
        raise ValueError(f"{path}: not a readable .npz/.npy file of plain arrays ({exc})") from exc
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not a readable .npz/.npy file of plain arrays ({exc})") from exc


def _check_binarize(binarize: str) -> None:
    if binarize not in ("none", "static", "dynamic"):
        raise ValueError(f"binarize: expected 'none', 'static' or 'dynamic', got {binarize!r}")


def _in_memory(splits: DatasetSplits) -> DatasetSplits:
    train, val, test = (
        Split(np.asarray(s.x) if isinstance(s.x, ImageRows) else s.x, s.y)
        for s in (splits.train, splits.val, splits.test)
    )
    return DatasetSplits(
        splits.spec, train, val, test, splits.class_names, splits.binarize, splits.split_seed
    )


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    if mmap and path.stat().st_size > 0:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            if "mmap length" not in str(exc) and "empty file" not in str(exc):
                raise
    return np.load(path, allow_pickle=False)  # e.g. an array of zero bytes: nothing to map


def _read_member(
    path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, mmap: bool
) -> np.ndarray:
    """One .npy member of a zip: a np.memmap at its offset when stored, else read."""
    if mmap and info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
        mapped = _map_stored_member(path, info)
        if mapped is not None:
            return mapped
    with archive.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _map_stored_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray | None:
    # Local file header (APPNOTE 4.3.7): 30 fixed bytes, the name and an extra field (whose
    # length may differ from the central directory's, e.g. numpy's zip64 extra), then data.
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != _ZIP_MAGIC:
            raise ValueError(f"member {info.filename!r}: bad local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None  # a newer header (3.0: utf-8 names): read it the normal way
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"member {info.filename!r} holds pickled objects")
    nbytes = math.prod(shape) * dtype.itemsize
    if offset + nbytes != start + info.file_size:
        raise ValueError(
            f"member {info.filename!r}: header says {nbytes} bytes of data, "
            f"the member holds {start + info.file_size - offset}"
        )
    if nbytes == 0:
        return np.zeros(shape, dtype)  # nothing to map
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def _checked_dtype(path: Path, key: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.hasobject:
        raise ValueError(f"{key!r} holds pickled objects")
    return array


@dataclass(frozen=True)
class _FileData:
    train: Split  # x, or x_train of a file with its own splits
    test: Split | None  # x_test, or None
    class_names: tuple[str, ...]


def _load_npz(path: Path, mmap: bool) -> _FileData:
    wanted = (*_SINGLE_KEYS, *_SPLIT_KEYS, "x_val", "y_val", "class_names")
    arrays = open_array_file(path, wanted, mmap=mmap)
    split_keys = [k for k in _SPLIT_KEYS if k in arrays]
    val_keys = [k for k in ("x_val", "y_val") if k in arrays]
    if val_keys:
        raise ValueError(
            f"{path}: holds {', '.join(repr(k) for k in val_keys)}; a validation split is "
            "always carved from the training images (10 %), so the file must not hold one"
        )
    if split_keys:
        single = [k for k in _SINGLE_KEYS if k in arrays]
        if single:
            raise ValueError(
                f"{path}: holds both {', '.join(repr(k) for k in single)} and "
                f"{', '.join(repr(k) for k in split_keys)}; expected one layout: 'x' (+ 'y'), "
                "or 'x_train' and 'x_test' (+ 'y_train' and 'y_test')"
            )
        for key in ("x_train", "x_test"):
            if key not in arrays:
                raise ValueError(
                    f"{path}: has {', '.join(repr(k) for k in split_keys)} but no {key!r}; a "
                    "file with its own splits needs both 'x_train' and 'x_test' (the layout "
                    "of Keras' mnist.npz)"
                )
        if ("y_train" in arrays) != ("y_test" in arrays):
            has, lacks = ("y_train", "y_test") if "y_train" in arrays else ("y_test", "y_train")
            raise ValueError(
                f"{path}: labels for one split only: has {has!r} but no {lacks!r}; "
                "give labels for both splits or for neither"
            )
        x_train = _checked_rows(f"{path} x_train", arrays["x_train"])
        x_test = _checked_rows(f"{path} x_test", arrays["x_test"])
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ValueError(
                f"{path}: x_train images have shape {x_train.shape[1:]} (C, H, W), x_test "
                f"images {x_test.shape[1:]}; expected the same shape in both splits"
            )
        if len(x_test) == 0:
            raise ValueError(f"{path}: x_test holds no images; expected a non-empty test split")
        parts = {"train": x_train, "test": x_test}
    elif "x" in arrays:
        parts = {"": _checked_rows(f"{path} x", arrays["x"])}
    else:
        raise ValueError(
            f"{path}: expected an array 'x' (or 'x_train' and 'x_test'), "
            f"found {sorted(arrays) or 'none'}"
        )
    label_keys = {part: ("y_" + part if part else "y") for part in parts}
    if label_keys[next(iter(parts))] not in arrays:
        splits = [Split(x, None) for x in parts.values()]
        return _FileData(splits[0], splits[1] if len(splits) > 1 else None, ())
    labels = {part: np.asarray(arrays[key]) for part, key in label_keys.items()}
    for part, y in labels.items():
        check_labels(f"{path} {label_keys[part]}", y, np.iinfo(np.int64).max, len(parts[part]))
    if "class_names" in arrays:
        class_names = tuple(str(c) for c in np.asarray(arrays["class_names"]).reshape(-1))
    else:
        top = max(int(y.max(initial=-1)) for y in labels.values())
        class_names = tuple(str(i) for i in range(top + 1))
    for part, y in labels.items():
        check_labels(f"{path} {label_keys[part]}", y, len(class_names), len(parts[part]))
    splits = [Split(parts[part], labels[part].astype(np.int64)) for part in parts]
    return _FileData(splits[0], splits[1] if len(splits) > 1 else None, class_names)


def check_images(name: str, x: np.ndarray) -> np.ndarray:
    """Checks images and returns them as float32 (N, C, H, W) in [0, 1].

    uint8 arrays are scaled by 1/255; (N, H, W) gains a channel axis; (N, D) with D a
    perfect square becomes (N, 1, √D, √D).

    Raises:
        ValueError: wrong rank or shape, non-numeric, NaN/Inf, or values outside [0, 1].
    """
    return np.asarray(_checked_rows(name, np.asarray(x)))


def _checked_rows(name: str, x: np.ndarray) -> ImageRows:
    """check_images without the conversion: the checks scan the array in chunks, and a
    memory-mapped array stays mapped (its scanned pages are let go as the scan moves on)."""
    if x.dtype != np.uint8 and x.dtype != np.bool_ and not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name}: expected numeric images, got dtype {x.dtype}")
    mapped = x if isinstance(x, np.memmap) and x.flags.c_contiguous else None
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
    rows = ImageRows(x)
    bad, low, high = 0, math.inf, -math.inf
    for start, chunk in iter_chunks(rows):
        finite = np.isfinite(chunk)
        bad += int(chunk.size - np.count_nonzero(finite))
        if chunk.size and not bad:
            low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
        if mapped is not None:
            _drop_pages(mapped, start, start + len(chunk))
    if bad:
        raise ValueError(f"{name}: {bad} value(s) are NaN or Inf")
    if x.size and (low < 0.0 or high > 1.0):
        raise ValueError(
            f"{name}: values must lie in [0, 1] (uint8 is scaled by 1/255), "
            f"got range [{low:g}, {high:g}]"
        )
    return rows


def _to_float32(raw: np.ndarray) -> np.ndarray:
    if raw.dtype == np.uint8:
        return np.ascontiguousarray(raw.astype(np.float32) / 255.0)
    return np.array(raw, dtype=np.float32, order="C")  # a copy: writable, not the file's


def _drop_pages(array: np.memmap, start: int, stop: int) -> None:
    """Lets go of the pages of rows [start, stop) of a C-ordered memmap: they are clean and
    file-backed, so they leave this process's resident memory and are read again when used."""
    mm = getattr(array, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(_mmap, "MADV_DONTNEED"):
        return
    row = array.strides[0] if array.ndim else array.itemsize
    begin = array.offset % _mmap.ALLOCATIONGRANULARITY + start * row  # in the mapping
    end = min(begin + (stop - start) * row, len(mm))
    begin -= begin % _mmap.PAGESIZE
    if end > begin:
        try:
            mm.madvise(_mmap.MADV_DONTNEED, begin, end - begin)
        except (OSError, ValueError):  # only advice: a refusal changes nothing
            pass


def _fixed_draw(x: np.ndarray | ImageRows, rng: np.random.RandomState) -> Any:
    """One Bernoulli draw of grey images, chunk by chunk from one RandomState stream (the same
    numbers as one draw of the whole array); ImageRows stay lazy, held as bytes of 0/1."""
    if isinstance(x, np.ndarray):
        return (rng.random_sample(x.shape) < x).astype(np.float32)
    out = np.empty(x.shape, np.bool_)
    for start, chunk in iter_chunks(x):
        out[start : start + len(chunk)] = rng.random_sample(chunk.shape) < chunk
    return ImageRows(out)


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
            Split(s.x.thresholded() if isinstance(s.x, ImageRows) else binarize_static(s.x), s.y)
            for s in (splits.train, splits.val, splits.test)
        )
    else:
        val, test = (Split(_fixed_draw(s.x, rng), s.y) for s in (splits.val, splits.test))
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
    x = split.x.take(idx) if isinstance(split.x, ImageRows) else split.x[idx]
    return Split(x, None if split.y is None else split.y[idx])


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 of set bits in 4×4 blocks of the original 32×32 bitmaps.
    x = check_images("digits", bunch.images.astype(np.float32) / 16.0)
    return x, bunch.target.astype(np.int64)


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
