"""Typed access to the fields of a parsed ``manifest.json``, each error naming file and field.

The schema (``schema.py``) says which fields a manifest has; this module only knows how to read
one JSON value as an integer, a choice, a shape and so on, and how to say what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vaeserve.errors import ManifestError

__all__ = ["FieldReader", "file_reference", "is_dims"]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def file_reference(value: Mapping[str, Any], where: str) -> tuple[str, str]:
    """(file, sha256) of a manifest object that names a file beside the manifest (a graph,
    the prior's arrays): a plain file name and its 64 lowercase hex digits.

    Raises:
        ManifestError: naming ``where``.file or ``where``.sha256.
    """
    file = value.get("file")
    if not isinstance(file, str) or not file or "/" in file or "\\" in file or file[0] == ".":
        raise ManifestError(f"{where}.file is {file!r}, expected a plain file name")
    sha = value.get("sha256")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise ManifestError(f"{where}.sha256 is {sha!r}, expected 64 lowercase hex digits")
    return file, sha


def _is_finite_number(value: Any) -> bool:
    """True for a JSON number (not a bool) that is neither infinite nor NaN."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and abs(value) < float("inf")
    )


def is_dims(value: Any, allow_batch: bool) -> bool:
    """True for a list of positive integers; with ``allow_batch``, the first may be -1."""
    if not isinstance(value, list):
        return False
    for i, d in enumerate(value):
        if isinstance(d, bool) or not isinstance(d, int):
            return False
        if not (d > 0 or (allow_batch and i == 0 and d == -1)):
            return False
    return True


class FieldReader:
    """Reads the fields of one JSON object; errors name ``source`` and the field.

    Each reading method raises ``ManifestError`` saying what the field holds and what was
    expected; ``optional`` fields may be absent or null and then read as ``None``.

    Args:
        data: the parsed JSON object.
        source: where it came from (a file path), for messages.

    Raises:
        ManifestError: ``data`` is not a JSON object.
    """

    def __init__(self, data: Mapping[str, Any], source: str):
        if not isinstance(data, Mapping):
            raise ManifestError(f"{source}: expected a JSON object at the top level")
        self.data = data
        self.source = source

    def fail(self, key: str, expected: str) -> ManifestError:
        """The error for field ``key``: what it holds and what was ``expected``."""
        got = self.data.get(key, "<missing>")
        return ManifestError(f"{self.source}: field '{key}' is {got!r}, expected {expected}")

    def get(self, key: str, optional: bool) -> Any:
        """The raw value of ``key``; ``None`` only if ``optional``."""
        value = self.data.get(key)
        if value is None and not optional:
            raise self.fail(key, "a value")
        return value

    def int(self, key: str, minimum: int, optional: bool = False) -> Any:
        value = self.get(key, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"an integer >= {minimum}")
        return value

    def positive_float(self, key: str, optional: bool) -> float | None:
        value = self.get(key, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise self.fail(key, "a positive number")
        return float(value)

    def choice(self, key: str, options: tuple[str, ...], optional: bool = False) -> Any:
        value = self.get(key, optional)
        if value is not None and value not in options:
            raise self.fail(key, "one of " + ", ".join(repr(o) for o in options))
        return value

    def shape(self, key: str) -> tuple[int, ...]:
        value = self.get(key, optional=False)
        if not is_dims(value, allow_batch=False) or not value:
            raise self.fail(key, "a non-empty list of positive integers")
        return tuple(value)

    def value_range(self, key: str) -> tuple[float, float]:
        value = self.get(key, optional=False)
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not value[0] < value[1]
        ):
            raise self.fail(key, "[low, high] with low < high")
        return float(value[0]), float(value[1])

    def strings(self, key: str, count: int, counted_by: str) -> tuple[str, ...]:
        """A list of exactly ``count`` strings (absent or null reads as an empty list)."""
        value = self.data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "a list of strings")
        if len(value) != count:
            raise self.fail(key, f"{count} names ({counted_by})")
        return tuple(value)

    def matrix(self, key: str, rows: int, cols: int) -> tuple[tuple[float, ...], ...]:
        """A list of ``rows`` lists of ``cols`` finite numbers."""
        value = self.get(key, optional=False)
        ok = (
            isinstance(value, list)
            and len(value) == rows
            and all(
                isinstance(row, list)
                and len(row) == cols
                and all(_is_finite_number(v) for v in row)
                for row in value
            )
        )
        if not ok:
            raise self.fail(key, f"{rows} rows of {cols} finite numbers")
        return tuple(tuple(float(v) for v in row) for row in value)

    def mapping(self, key: str) -> dict[str, Any]:
        """A JSON object (absent or null reads as empty), copied."""
        value = self.data.get(key) or {}
        if not isinstance(value, Mapping):
            raise self.fail(key, "a JSON object")
        return dict(value)
