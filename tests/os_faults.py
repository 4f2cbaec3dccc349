"""Faults injected at the OS boundary, for failures a test cannot cause for real everywhere."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest


def read_only_folder(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``folder`` behave as read-only for this process, even as root (whom the kernel
    lets write anywhere): creating, opening for writing or renaming into anything inside it
    raises PermissionError(EACCES), as the kernel does for other users."""

    def refuse_inside(path: object) -> None:
        if Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

    def guarded(original: Callable, *paths_at: int, writing: Callable = lambda *a: True):
        def call(*args, **kwargs):
            if writing(*args, **kwargs):
                for i in paths_at:
                    refuse_inside(args[i])
            return original(*args, **kwargs)

        return call

    opens_for_writing = lambda path, flags, *a, **k: bool(  # noqa: E731
        flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
    )
    builtin_open_writes = lambda file, mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
    monkeypatch.setattr(os, "mkdir", guarded(os.mkdir, 0))
    monkeypatch.setattr(os, "open", guarded(os.open, 0, writing=opens_for_writing))
    monkeypatch.setattr(os, "replace", guarded(os.replace, 1))
    monkeypatch.setattr(os, "rename", guarded(os.rename, 1))
    monkeypatch.setattr("builtins.open", guarded(open, 0, writing=builtin_open_writes))
