"""Image grids as PNG files from numpy arrays (no torch, so serving and client code may use it)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vaeserve.atomic import write_atomically

__all__ = ["make_grid", "save_grid"]


def make_grid(
    images: np.ndarray, nrow: int, *, padding: int = 1, pad_value: float = 0.5, scale: int = 1
) -> np.ndarray:
    """Tiles images into one uint8 picture.

    Args:
        images: (N, C, H, W) with C in {1, 3}, values in [0, 1] (clipped).
        nrow: images per row of the grid.
        padding: pixels between images (before scaling).
        pad_value: grey level of the padding, in [0, 1].
        scale: integer nearest-neighbour upscaling, so that 8×8 images stay visible.

    Returns:
        uint8 (H', W') for one channel or (H', W', 3) for three.

    Raises:
        ValueError: wrong shape, channel count, nrow, padding or scale.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images: expected (N, C, H, W) with N >= 1, C 1 or 3, got {images.shape}")
    for name, value, minimum in (("nrow", nrow, 1), ("padding", padding, 0), ("scale", scale, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    n, channels, height, width = images.shape
    rows = -(-n // nrow)
    cell_h, cell_w = height + padding, width + padding
    grid = np.full(
        (channels, rows * cell_h + padding, nrow * cell_w + padding), pad_value, np.float32
    )
    for i, image in enumerate(images):
        top, left = padding + (i // nrow) * cell_h, padding + (i % nrow) * cell_w
        grid[:, top : top + height, left : left + width] = image
    grid = np.repeat(np.repeat(grid, scale, axis=1), scale, axis=2)
    pixels = np.round(np.clip(grid, 0.0, 1.0) * 255.0).astype(np.uint8)
    return pixels[0] if channels == 1 else pixels.transpose(1, 2, 0)


def save_grid(
    images: np.ndarray,
    path: str | os.PathLike,
    nrow: int,
    *,
    padding: int = 1,
    pad_value: float = 0.5,
    scale: int = 1,
) -> Path:
    """Writes `make_grid(images, ...)` as a PNG, atomically (temp file, then os.replace).

    Returns:
        The path written.
    """
    from PIL import Image

    pixels = make_grid(images, nrow, padding=padding, pad_value=pad_value, scale=scale)
    return write_atomically(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))
