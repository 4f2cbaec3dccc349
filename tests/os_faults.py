"""Faults injected at the OS boundary, for failures a test cannot cause for real everywhere."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest


def read_only_folder(
    monkeypatch: pytest.MonkeyPatch, folder: Path, code: int = errno.EACCES
) -> None:
    """Make ``folder`` behave as read-only for this process, even as root (whom the kernel
    lets write anywhere): creating, opening for writing, renaming into or removing anything
    inside it raises OSError(``code``): EACCES as for a folder of mode 0555, EROFS as for a
    read-only mount."""

    def refuse_inside(path: object) -> None:
        if isinstance(path, int):  # a file descriptor: opened before, not our concern
            return
        if Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve()):
            raise OSError(code, os.strerror(code), os.fsdecode(path))

    def guarded(original: Callable, *paths_at: int, writing: Callable = lambda *a, **k: True):
        def call(*args, **kwargs):
            if writing(*args, **kwargs):
                for i in paths_at:
                    refuse_inside(args[i])
            return original(*args, **kwargs)

        return call

    def opens_for_writing(path: object, flags: int, *args: object, **kwargs: object) -> bool:
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    def builtin_open_writes(file: object, mode: str = "r", *args: object, **kwargs: object):
        return any(c in mode for c in "wax+")

    monkeypatch.setattr(os, "mkdir", guarded(os.mkdir, 0))
    monkeypatch.setattr(os, "open", guarded(os.open, 0, writing=opens_for_writing))
    monkeypatch.setattr(os, "replace", guarded(os.replace, 0, 1))
    monkeypatch.setattr(os, "rename", guarded(os.rename, 0, 1))
    monkeypatch.setattr(os, "unlink", guarded(os.unlink, 0))
    monkeypatch.setattr(os, "remove", guarded(os.remove, 0))
    guarded_open = guarded(open, 0, writing=builtin_open_writes)
    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)  # what zipfile (np.savez) calls
