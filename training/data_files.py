"""Reading data files: .npy and .npz arrays and MNIST-style IDX folders, checked as they are read.

`open_array_file` reads an .npz (by key) or an .npy without pickles; with `mmap`, an .npy and
every uncompressed (stored) .npz member is a np.memmap of the file, a member mapped at its
offset inside the zip, while a compressed member falls back to being read into memory.
`_load_npz` reads an .npz/.npy in one of its two layouts (x and y, or Keras' x_train/x_test)
and `_load_idx_dir` the four IDX files of an MNIST folder, both checking what they read with
`image_rows`. It is separate so that the file formats (zip and IDX headers, dtypes, layouts)
stay out of `data`, which picks, splits and binarizes a data set; it never imports `data`.
"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeserve.training.image_rows import Split, _checked_rows, check_images, check_labels

__all__ = ["IDX_FILES", "open_array_file"]

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_SINGLE_KEYS = ("x", "y")
_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")  # the layout of Keras' mnist.npz


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
