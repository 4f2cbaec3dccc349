"""The files of a batch generation job: shards of samples and the job manifest (job.json).

A shard is written under a temporary name and renamed when complete, and only then recorded
in job.json (itself replaced atomically), so a killed job leaves complete shards and a
manifest that lists a subset of them. Layout of ``--out DIR``::

    job.json                  parameters, pinned model version, seed, finished shards
    shard-00000.npz           --format npz: samples, labels (CVAE), latents (if asked)
    shard-00000/              --format npy: samples.npy, labels.npy, latents.npy
    shard-00000/              --format png: 00000000_<label>.png ... + labels.npy, latents.npy

A job split across N workers (``--num-workers``) adds ``workers/``: its definition and each
worker's record (worker_records.py), written and read with job.json's helpers here
(``manifest_json``, ``load_manifest``, ``manifest_contents``).

Files are written byte-deterministically (no timestamps), so a resumed job's files are
identical to an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from vaeserve.atomic import fsync_dir, write_atomically
from vaeserve.errors import VaeServeError
from vaeserve.manifest import sha256_of_file

__all__ = [
    "JOB_FILE",
    "JOB_FORMAT",
    "FORMATS",
    "JobError",
    "JobSpec",
    "ShardRecord",
    "JobManifest",
    "read_job",
    "load_manifest",
    "manifest_contents",
    "manifest_json",
    "shard_path",
    "write_shard",
    "verify_shard",
    "remove_temporaries",
    "remove_file_temporaries",
    "npz_bytes",
]

JOB_FILE = "job.json"
JOB_FORMAT = "vae-generate-job/1"
FORMATS = ("npz", "npy", "png")
_TMP_MARK = ".tmp-"
_SHARD_TMP = re.compile(r"^\.shard-(\d+)(?:\.npz)?\.tmp-\d+$")  # write_shard's temporaries
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: no wall-clock time in the bytes


class JobError(VaeServeError, ValueError):
    """A job that cannot go on: a foreign output folder, a changed parameter, a bad manifest."""


@dataclass(frozen=True)
class JobSpec:
    """Everything that decides a job's bytes. Sample i has class label_pattern[i % len]."""

    model: str
    model_version: int
    model_sha256: str  # the decoder graph's, from the model manifest
    num_samples: int
    labels: str | None  # as given: "balanced", "3", "1,4,7"; None for a VAE
    label_pattern: tuple[int, ...] | None
    seed: int
    temperature: float
    output: str  # "mean" | "draw"
    encoding: str  # "float32" | "float16" | "uint8"
    latents: bool
    shard_size: int
    format: str

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, index: int) -> tuple[int, int]:
        """Samples [start, stop) of shard ``index``."""
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def labels_for(self, start: int, stop: int) -> np.ndarray | None:
        """(stop - start,) int64 classes of samples [start, stop): a function of the index only."""
        if self.label_pattern is None:
            return None
        pattern = np.asarray(self.label_pattern, dtype=np.int64)
        return pattern[np.arange(start, stop) % len(pattern)]

    def differences(self, other: JobSpec) -> list[str]:
        """``"field: recorded X, now Y"`` for each parameter that differs."""
        return [
            f"{f.name}: recorded {getattr(self, f.name)!r}, now {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label_pattern"] = None if self.label_pattern is None else list(self.label_pattern)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> JobSpec:
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            raise JobError(f"{JOB_FILE}: field 'job' must hold exactly {sorted(names)}")
        values = dict(d)
        if values["label_pattern"] is not None:
            values["label_pattern"] = tuple(values["label_pattern"])
        return cls(**values)


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard: its sample range, its path in the output folder, and its sha256."""

    index: int
    start: int
    stop: int
    path: str
    sha256: str


@dataclass
class JobManifest:
    """The contents of job.json."""

    spec: JobSpec
    shards: dict[int, ShardRecord] = field(default_factory=dict)
    complete: bool = False

    def owns(self, shard: int) -> bool:
        """Whether this run writes ``shard`` (a single-process run writes them all)."""
        return True

    @property
    def owned_shards(self) -> list[int]:
        return [k for k in range(self.spec.num_shards) if self.owns(k)]

    @property
    def samples_owned(self) -> int:
        ranges = (self.spec.shard_range(k) for k in self.owned_shards)
        return sum(stop - start for start, stop in ranges)

    def to_json(self) -> str:
        return manifest_json(JOB_FORMAT, {}, self.spec, self.complete, self.shards)

    def save(self, out_dir: Path) -> None:
        """Replace ``out_dir/job.json`` atomically."""
        text = self.to_json().encode()
        write_atomically(out_dir / JOB_FILE, lambda f: f.write(text))

    def remove_temporaries(self, out_dir: Path) -> int:
        """Delete what killed runs of this job left under temporary names; returns how many."""
        return remove_temporaries(out_dir)

    @property
    def samples_done(self) -> int:
        return sum(r.stop - r.start for r in self.shards.values())


def manifest_json(
    fmt: str, head: dict[str, Any], spec: JobSpec, complete: bool, records: dict[int, ShardRecord]
) -> str:
    """The text of a manifest (job.json or a worker record), ``head`` after its format.

    One line per field and per shard, sorted by index and without timestamps: an interrupted
    job and an uninterrupted one end with the same job.json.
    """
    extra = "".join(f'  "{k}": {json.dumps(v)},\n' for k, v in head.items())
    job = ",\n".join(f'    "{k}": {json.dumps(v)}' for k, v in spec.to_dict().items())
    shards = ",\n".join(f"    {json.dumps(asdict(records[k]))}" for k in sorted(records))
    shards = f"[\n{shards}\n  ]" if shards else "[]"
    return (
        f'{{\n  "format": {json.dumps(fmt)},\n{extra}  "job": {{\n{job}\n  }},\n'
        f'  "complete": {json.dumps(complete)},\n  "shards": {shards}\n}}\n'
    )


def load_manifest(path: Path, fmt: str) -> dict[str, Any] | None:
    """The JSON object in ``path`` if its format is ``fmt``; None when there is no file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        found = data.get("format")
    except (ValueError, AttributeError) as exc:
        raise JobError(f"{path}: not a readable vae-generate job manifest ({exc})") from None
    if found != fmt:
        raise JobError(f"{path}: format is {found!r}, expected {fmt!r}")
    return data


def manifest_contents(
    path: Path, data: dict[str, Any]
) -> tuple[JobSpec, dict[int, ShardRecord], bool]:
    """(job, finished shards by index, complete) of the manifest ``data`` read from ``path``."""
    try:
        spec = JobSpec.from_dict(data["job"])
        shards = [ShardRecord(**s) for s in data["shards"]]
        return spec, {s.index: s for s in shards}, bool(data["complete"])
    except JobError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise JobError(f"{path}: not a readable vae-generate job manifest ({exc})") from None


def read_job(out_dir: Path) -> JobManifest | None:
    """The job recorded in ``out_dir``, or None when there is no job.json.

    Raises:
        JobError: job.json is not a vae-generate job manifest.
    """
    path = out_dir / JOB_FILE
    data = load_manifest(path, JOB_FORMAT)
    return None if data is None else JobManifest(*manifest_contents(path, data))


def shard_path(spec: JobSpec, index: int) -> str:
    """The shard's name in the output folder (a file for npz, a folder otherwise)."""
    name = f"shard-{index:05d}"
    return f"{name}.npz" if spec.format == "npz" else name


def write_shard(
    out_dir: Path,
    spec: JobSpec,
    index: int,
    arrays: dict[str, np.ndarray],
    before_publish: Callable[[], None] | None = None,
) -> ShardRecord:
    """Write one shard atomically and return its record.

    Args:
        out_dir: the job's output folder.
        spec: the job.
        index: the shard.
        arrays: "samples" (n, *sample_shape); "labels" (n,) for a CVAE; "latents" if asked.
        before_publish: called after the data is on disk under its temporary name and before
            the rename (tests kill the job there).
    """
    start, stop = spec.shard_range(index)
    assert all(len(a) == stop - start for a in arrays.values()), "shard rows != its range"
    path = shard_path(spec, index)
    target = out_dir / path
    tmp = out_dir / f".{path}{_TMP_MARK}{os.getpid()}"
    try:
        if spec.format == "npz":
            payload = npz_bytes(arrays)
            _write_synced(tmp, payload)
            digest = hashlib.sha256(payload).hexdigest()
        else:
            files = _folder_files(spec, start, arrays)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name, data in files.items():
                _write_synced(tmp / name, data)
            fsync_dir(tmp)
            digest = _listing_sha256(files)
            # A folder left by a run killed after its rename but before job.json recorded it:
            # os.replace cannot replace a non-empty folder.
            shutil.rmtree(target, ignore_errors=True)
        if before_publish is not None:
            before_publish()
        os.replace(tmp, target)
    except BaseException:
        # A full disk: give back the space of the partial shard at once, not on the next run.
        _remove(tmp)
        raise
    fsync_dir(out_dir)
    return ShardRecord(index, start, stop, path, digest)


def verify_shard(out_dir: Path, record: ShardRecord) -> bool:
    """True when the shard on disk still has the sha256 its record says."""
    target = out_dir / record.path
    try:
        if target.is_dir():
            files = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
            return _listing_sha256(files) == record.sha256
        return sha256_of_file(target) == record.sha256
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):  # the error that brought us here is the one to show
            path.unlink(missing_ok=True)


def remove_temporaries(out_dir: Path, owns: Callable[[int], bool] | None = None) -> int:
    """Delete what killed runs left under temporary names; returns how many.

    With ``owns``, only the temporary shards it owns (a worker's), nothing else.
    """
    count = 0
    for p in out_dir.iterdir():
        if owns is None:
            temporary = p.name.startswith(".") and (_TMP_MARK in p.name or p.name.endswith(".tmp"))
        else:
            match = _SHARD_TMP.match(p.name)
            temporary = match is not None and owns(int(match.group(1)))
        if temporary:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            count += 1
    return count


def remove_file_temporaries(folder: Path, name: str) -> int:
    """Delete ``folder/.<name>.*.tmp``: write_atomically's temporaries of one file."""
    if not folder.is_dir():
        return 0
    prefix = f".{name}."
    found = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    for p in found:
        p.unlink(missing_ok=True)
    return len(found)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz file's bytes, the same for the same arrays: np.savez stamps each member with the
    current time; this writes the same layout without (members dated 1980-01-01)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _folder_files(spec: JobSpec, start: int, arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    if spec.format == "npy":
        return {f"{name}.npy": _npy_bytes(a) for name, a in arrays.items()}
    files = {f"{name}.npy": _npy_bytes(a) for name, a in arrays.items() if name != "samples"}
    labels = arrays.get("labels")
    for i, image in enumerate(arrays["samples"]):
        suffix = "" if labels is None else f"_{int(labels[i])}"
        files[f"{start + i:08d}{suffix}.png"] = _png_bytes(image)
    return files


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    assert image.dtype == np.uint8 and image.ndim == 3, "png shards hold uint8 (C, H, W)"
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (H, W[, C])
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _listing_sha256(files: dict[str, bytes]) -> str:
    # A folder's digest: sha256 of its `sha256sum`-style listing, in name order.
    listing = "".join(
        f"{hashlib.sha256(files[name]).hexdigest()}  {name}\n" for name in sorted(files)
    )
    return hashlib.sha256(listing.encode()).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
