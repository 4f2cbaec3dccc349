"""The flock(2) locks that keep vae-generate runs sharing an output folder from colliding.

A single-process run holds ``.lock`` exclusively; the workers of a job split across workers
share it (so a run of the whole job and a worker exclude each other), and each worker holds
``workers/worker-I.lock`` exclusively so that worker I runs once at a time. Finalize
serialises on ``workers/finalize.lock``. A lock taken by another run is a UsageError naming
it; the kernel releases every lock when its process dies, so a killed run leaves none held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from vaeserve.client.arguments import UsageError
from vaeserve.client.worker_records import WORKERS_DIR

__all__ = ["LOCK_FILE", "FINALIZE_LOCK", "flock", "locked", "worker_locked"]

LOCK_FILE = ".lock"  # exclusive for a single-process run, shared by a job's workers
FINALIZE_LOCK = f"{WORKERS_DIR}/finalize.lock"


@contextlib.contextmanager
def flock(path: Path, operation: int, busy: str = "") -> Iterator[None]:
    """Hold flock ``operation`` on ``path``; a UsageError saying ``busy`` if it is taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            raise UsageError(busy) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def locked(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold ``out/.lock``: two runs writing one folder would undo each other's job.json."""
    busy = f"--out: {out} is in use by another vae-generate run"
    return flock(out / LOCK_FILE, fcntl.LOCK_EX | fcntl.LOCK_NB, busy)


@contextlib.contextmanager
def worker_locked(out: Path, index: int) -> Iterator[None]:
    """Share ``out/.lock`` with the other workers, and hold worker ``index``'s own lock."""
    whole = f"--out: {out} is in use by a vae-generate run of the whole job (no --num-workers)"
    mine = f"--worker-index: worker {index} of {out} is in use by another vae-generate run"
    with flock(out / LOCK_FILE, fcntl.LOCK_SH | fcntl.LOCK_NB, whole):
        with flock(out / WORKERS_DIR / f"worker-{index}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB, mine):
            yield
