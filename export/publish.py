"""Atomic publication of one model version into a model repository.

A version is built in a staging folder beside its final place, ``<repository>/<name>/.staging-*``
(the leading "." hides it from the server's scanner), and renamed into place only once every
file is written and checked. A crash at any point leaves either no version or the complete
one; a leftover staging folder is invisible to the server and safe to delete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vaeserve.atomic import fsync_dir
from vaeserve.errors import VaeServeError
from vaeserve.manifest import DIR_MODE, FILE_MODE, list_versions, validate_model_name

__all__ = [
    "STAGING_PREFIX",
    "VersionExistsError",
    "model_folder",
    "publish_version",
    "resolve_version",
    "staging_folder",
]

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
_REPLACED_PREFIX = ".replaced-"


class VersionExistsError(VaeServeError, FileExistsError):
    """The version folder exists already and ``--force`` was not given."""


def model_folder(repository: str | os.PathLike[str], name: str) -> Path:
    """Create (if needed) and return ``<repository>/<name>``.

    Raises:
        ValueError: ``name`` is not a valid model name.
        NotADirectoryError / PermissionError / OSError: the repository cannot hold it; the
            message names the path.
    """
    validate_model_name(name)
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise NotADirectoryError(f"repository {repository} is not a folder")
    folder = repository / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"{folder} exists and is not a folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"model folder {folder} is not writable")
    return folder


def resolve_version(folder: Path, version: int | None, force: bool) -> int:
    """The version to publish: ``version`` if given (refused if it exists without ``force``),
    else one more than the highest published version.

    Raises:
        ValueError: ``version`` is not a positive integer.
        VersionExistsError: ``version`` is published and ``force`` is false.
    """
    if version is None:
        return max(list_versions(folder), default=0) + 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version: expected an integer >= 1, got {version!r}")
    if (folder / str(version)).exists() and not force:
        raise VersionExistsError(
            f"{folder / str(version)} exists already; pass --force to replace it, or omit "
            "--version to publish the next free one"
        )
    return version


@contextlib.contextmanager
def staging_folder(folder: Path) -> Iterator[Path]:
    """A fresh hidden folder inside ``folder``; removed on exit unless it was published."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_version(staging: Path, folder: Path, version: int, force: bool) -> Path:
    """Rename the complete ``staging`` folder to ``folder/<version>``.

    With ``force`` an existing version is swapped with the new one in one atomic
    ``renameat2(RENAME_EXCHANGE)`` on Linux, then removed. Where that call is missing, the old
    version is renamed aside first: a reader still sees the old or the new version, never a
    mixture, but the version is absent for the instant between the two renames.

    Returns:
        The published version folder.

    Raises:
        VersionExistsError: the version exists (or appeared meanwhile) and ``force`` is false.
    """
    target = folder / str(version)
    _make_readable(staging)
    _fsync_tree(staging)
    replaced = None
    if target.exists():
        if not force:
            raise VersionExistsError(f"{target} exists already; pass --force to replace it")
        if _exchange(staging, target):  # staging now holds the old version
            shutil.rmtree(staging, ignore_errors=True)
            fsync_dir(folder)
            logger.info("replaced the previous %s", target)
            return target
        replaced = Path(tempfile.mkdtemp(prefix=f"{_REPLACED_PREFIX}{version}-", dir=folder))
        os.rename(target, replaced / "old")
    try:
        os.rename(staging, target)
    except OSError as exc:
        if replaced is not None:  # put the old version back rather than leave none
            os.rename(replaced / "old", target)
            shutil.rmtree(replaced, ignore_errors=True)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise VersionExistsError(
                f"{target} was published by someone else meanwhile; run again"
            ) from None
        raise
    fsync_dir(folder)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
        logger.info("replaced the previous %s", target)
    return target


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False if unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2  # from <fcntl.h> and <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no such flag on this fs/kernel
        return False
    raise OSError(err, os.strerror(err), str(b))


def _make_readable(staging: Path) -> None:
    # mkdtemp creates the folder 0700: a server running as another user could not read it.
    os.chmod(staging, DIR_MODE)
    for path in staging.iterdir():
        os.chmod(path, FILE_MODE)


def _fsync_tree(staging: Path) -> None:
    # The files' bytes must be on disk before the rename that makes them visible.
    for path in staging.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(staging)
