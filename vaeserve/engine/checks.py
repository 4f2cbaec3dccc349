"""The checks every front end makes on what a model version's graphs will be given.

One set for both protocols (the typed API and the Open Inference Protocol) and for the
in-process ``Engine``: finite values, inputs inside the model's value range, class labels the
model has, and answers that fit in one message. Each raises ``InvalidRequest`` naming the
field (as the caller calls it: ``labels``, ``input 'y'``) and what was expected, before any
graph runs.
"""

from __future__ import annotations

import numpy as np

from vaeserve.errors import InvalidRequest
from vaeserve.manifest import ModelManifest

__all__ = [
    "MESSAGE_HEADROOM",
    "check_in_range",
    "check_finite",
    "check_value_range",
    "check_labels",
    "check_answer_size",
]

# What an answer holds besides its tensors' bytes: protobuf framing, names, shapes, scalars.
MESSAGE_HEADROOM = 64 * 1024


def check_in_range(field: str, value: int, low: int, high: int) -> None:
    """``low <= value <= high``, or InvalidRequest naming ``field``."""
    if not low <= value <= high:
        raise InvalidRequest(f"{field} is {value}, expected {low}..{high}")


def check_finite(field: str, array: np.ndarray) -> None:
    """No NaN or Inf in a float array."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidRequest(f"{field} holds NaN or Inf, expected finite values")


def check_value_range(field: str, x: np.ndarray, manifest: ModelManifest) -> None:
    """Inputs x lie in the model's value range (NaN fails too: it compares false)."""
    low, high = manifest.value_range
    lowest, highest = x.min(), x.max()  # NaN propagates into both
    if not (low <= lowest and highest <= high):
        check_finite(field, x)
        raise InvalidRequest(
            f"{field} holds values in [{lowest}, {highest}], expected the model's value_range "
            f"[{low}, {high}]"
        )


def check_labels(field: str, labels: np.ndarray, manifest: ModelManifest) -> None:
    """Every class label lies in 0..num_classes-1 of a conditional model."""
    if manifest.num_classes is None:
        raise InvalidRequest(f"{field} is set, but {manifest.name} is a vae: expected no labels")
    if not labels.size:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= manifest.num_classes:
        bad = low if low < 0 else high
        raise InvalidRequest(
            f"{field} holds class {bad}, expected classes 0..{manifest.num_classes - 1}"
        )


def check_answer_size(
    field: str, rows: int, bytes_per_row: int, max_message_bytes: int, advice: str
) -> None:
    """Refuse, before computing, an answer that would not fit in one message.

    Args:
        field: what decides the answer's size, as the request names it.
        advice: what the caller can do instead, after "ask for at most N rows".
    """
    limit = max_message_bytes - MESSAGE_HEADROOM
    if rows * bytes_per_row > limit:
        raise InvalidRequest(
            f"{field}: the answer would hold {rows * bytes_per_row} bytes, over the server's "
            f"max_message_bytes ({max_message_bytes}); ask for at most "
            f"{limit // bytes_per_row} rows{advice}"
        )
