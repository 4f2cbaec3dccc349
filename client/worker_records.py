"""The records of a job split across workers (``--num-workers N``), under ``workers/``.

``workers/job.json`` (a ``WorkersDefinition``) holds the job's definition and N; it is created
once, by whichever worker comes first, and compared by every other. ``workers/worker-I.json``
(a ``WorkerRecord``) is worker I's record of the shards it owns (s mod N == I) and has
finished, written only by worker I. Every file has one writer; the output folder's job.json is
written only by finalize, once all is verified (see job.py). The shards themselves and the
manifest format these records share with job.json are shards.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vaeserve.atomic import fsync_dir, write_atomically
from vaeserve.client.shards import (
    JOB_FILE,
    JobError,
    JobManifest,
    JobSpec,
    load_manifest,
    manifest_contents,
    manifest_json,
    remove_file_temporaries,
    remove_temporaries,
)

__all__ = [
    "WORKERS_DIR",
    "WorkerRecord",
    "WorkersDefinition",
    "read_worker",
    "read_definition",
    "create_definition",
    "worker_file",
]

WORKERS_DIR = "workers"  # of a job split across workers: workers/job.json, workers/worker-I.json
WORKERS_FORMAT = "vae-generate-workers/1"
WORKER_FORMAT = "vae-generate-worker/1"


@dataclass
class WorkerRecord(JobManifest):
    """workers/worker-I.json: worker I of N and the shards it owns (s mod N == I) it finished."""

    num_workers: int = 1
    worker_index: int = 0

    def owns(self, shard: int) -> bool:
        return shard % self.num_workers == self.worker_index

    def to_json(self) -> str:
        head = {"num_workers": self.num_workers, "worker_index": self.worker_index}
        return manifest_json(WORKER_FORMAT, head, self.spec, self.complete, self.shards)

    def save(self, out_dir: Path) -> None:
        """Replace ``out_dir/workers/worker-I.json`` atomically (only worker I writes it)."""
        text = self.to_json().encode()
        write_atomically(out_dir / worker_file(self.worker_index), lambda f: f.write(text))

    def remove_temporaries(self, out_dir: Path) -> int:
        # Only this worker's: another worker's may be on its way to a rename right now.
        mine = remove_temporaries(out_dir, owns=self.owns)
        name = Path(worker_file(self.worker_index)).name
        return mine + remove_file_temporaries(out_dir / WORKERS_DIR, name)


@dataclass(frozen=True)
class WorkersDefinition:
    """workers/job.json: the job its N workers share, written once and compared by each."""

    spec: JobSpec
    num_workers: int

    def differences(self, other: WorkersDefinition) -> list[str]:
        found = self.spec.differences(other.spec)
        if self.num_workers != other.num_workers:
            found.append(f"num_workers: recorded {self.num_workers}, now {other.num_workers}")
        return found

    def to_json(self) -> str:
        job = ",\n".join(f'    "{k}": {json.dumps(v)}' for k, v in self.spec.to_dict().items())
        return (
            f'{{\n  "format": {json.dumps(WORKERS_FORMAT)},\n'
            f'  "num_workers": {self.num_workers},\n  "job": {{\n{job}\n  }}\n}}\n'
        )


def worker_file(index: int) -> str:
    """Worker ``index``'s record, relative to the output folder."""
    return f"{WORKERS_DIR}/worker-{index}.json"


def read_worker(out_dir: Path, index: int) -> WorkerRecord | None:
    """Worker ``index``'s record in ``out_dir``, or None when it has none yet.

    Raises:
        JobError: the file is not a worker record, or not worker ``index``'s.
    """
    path = out_dir / worker_file(index)
    data = load_manifest(path, WORKER_FORMAT)
    if data is None:
        return None
    spec, shards, complete = manifest_contents(path, data)
    n, i = data.get("num_workers"), data.get("worker_index")
    if not (isinstance(n, int) and i == index and 0 <= index < n):
        raise JobError(f"{path}: not the record of worker {index} (worker {i!r} of {n!r})")
    return WorkerRecord(spec, shards, complete, num_workers=n, worker_index=index)


def read_definition(out_dir: Path) -> WorkersDefinition | None:
    """The job split across workers in ``out_dir`` (workers/job.json), or None.

    Raises:
        JobError: workers/job.json is not such a definition.
    """
    path = out_dir / WORKERS_DIR / JOB_FILE
    data = load_manifest(path, WORKERS_FORMAT)
    if data is None:
        return None
    try:
        n = data["num_workers"]
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"num_workers is {n!r}")
        return WorkersDefinition(JobSpec.from_dict(data["job"]), n)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise JobError(f"{path}: not a readable vae-generate job definition ({exc})") from None


def create_definition(out_dir: Path, definition: WorkersDefinition) -> WorkersDefinition:
    """Write workers/job.json unless it exists; return the definition it holds then.

    The file appears complete or not at all (a hard link to a synced temporary, which fails
    when the name exists), so of workers starting at once exactly one writes it.
    """
    path = out_dir / WORKERS_DIR / JOB_FILE
    if not path.exists():
        text = definition.to_json().encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{JOB_FILE}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
                fsync_dir(path.parent)
        finally:
            Path(tmp).unlink(missing_ok=True)
    found = read_definition(out_dir)
    if found is None:
        raise JobError(f"{path}: vanished right after it was written")
    return found
