"""Images read as rows on demand: `ImageRows`, the `Split` holding them, their checks, batches.

An `ImageRows` is rows of an image array, often a memory-mapped file, converted to float32
(N, C, H, W) in [0, 1] only for the rows asked for: the checks (`check_images`) scan it in
chunks and let go of the scanned pages, and a training or evaluation loop (`iter_batches`,
`iter_chunks`) reads it a batch at a time, so no step holds a whole data set as float32. It is
kept apart because both the file readers (`data_files`) and the loading and splitting of a data
set (`data`) build on it; it imports neither of them.
"""

from __future__ import annotations

import math
import mmap as _mmap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ImageRows",
    "STATIC_THRESHOLD",
    "Split",
    "binarize_static",
    "check_images",
    "check_labels",
    "iter_batches",
    "iter_chunks",
]

STATIC_THRESHOLD = 0.5
_CHUNK_BYTES = 16 << 20  # float32 bytes of one chunk of a scan or a conversion


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
