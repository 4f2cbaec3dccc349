"""Runs a batch generation job: verify what a previous run finished, produce the rest.

Shards are fetched as pieces of at most ``request_size`` samples, ``concurrency`` pieces in
flight, and written in order as soon as their last piece is in; job.json records each one.
A worker of a job split across N (``WorkerRecord``) does the same for the shards it owns,
recording them in its own file, and ``finalize`` checks every worker's shards and writes
job.json.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vaeserve.client.shards import (
    JOB_FILE,
    JobError,
    JobManifest,
    JobSpec,
    ShardRecord,
    remove_file_temporaries,
    shard_path,
    verify_shard,
    write_shard,
)
from vaeserve.client.sources import SampleSource
from vaeserve.client.worker_records import WORKERS_DIR, WorkersDefinition, read_worker

__all__ = [
    "JobEvents",
    "JobResult",
    "JobIncomplete",
    "verify_finished",
    "run_job",
    "unfinished_workers",
    "finalize",
    "write_preview",
]

log = logging.getLogger(__name__)

PREVIEW_COLUMNS = 10
_VAE_PREVIEW_ROWS = 4


def _ignore(_: int) -> None:
    pass


@dataclass(frozen=True)
class JobEvents:
    """What ``run_job`` reports as it goes, each with a count or a shard index.

    A progress bar or a metrics exporter listens to ``samples_received``; the shard events mark
    the points between a shard's steps where a crash leaves a different state on disk (the
    crash tests SIGKILL the process from one of them and resume). Callbacks run on the job's
    threads and must be quick; what they raise fails the job as a failed write would.
    """

    samples_received: Callable[[int], None] = _ignore  # a piece arrived, not yet written
    shard_written: Callable[[int], None] = _ignore  # on disk under its temporary name
    shard_published: Callable[[int], None] = _ignore  # renamed, not yet in job.json
    shard_recorded: Callable[[int], None] = _ignore  # listed in job.json


@dataclass(frozen=True)
class JobResult:
    samples_written: int  # by this run
    seconds: float  # of this run's sampling and writing


def verify_finished(out_dir: Path, job: JobManifest) -> tuple[int, float]:
    """Check every finished shard's sha256; forget the ones that differ so they are redone.

    Returns:
        (shards verified good, seconds taken).
    """
    start = time.perf_counter()
    removed = job.remove_temporaries(out_dir)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    bad = [k for k, record in job.shards.items() if not verify_shard(out_dir, record)]
    for k in bad:
        log.warning(
            "shard %s differs from its recorded sha256; it will be redone", job.shards[k].path
        )
        del job.shards[k]
    if bad:
        job.complete = False
        job.save(out_dir)
    return len(job.shards), time.perf_counter() - start


def run_job(
    out_dir: Path,
    job: JobManifest,
    source: SampleSource,
    *,
    request_size: int,
    concurrency: int,
    events: JobEvents = JobEvents(),
) -> JobResult:
    """Produce the shards ``job`` owns and lacks, recording each; mark the job complete.

    Raises:
        Whatever ``source.fetch`` or a shard write raises (a fetch once its retries are
        spent); the shards finished so far stay recorded.
    """
    spec = job.spec
    start_time, done_before = time.perf_counter(), job.samples_done
    pieces = deque(_pieces(spec, job, request_size))
    in_flight: deque[tuple[tuple[int, int, int], Future]] = deque()
    fetchers = ThreadPoolExecutor(concurrency, thread_name_prefix="vae-generate-fetch")
    # Shards are written (and fsynced) on a thread of their own while the next one arrives.
    writer = ThreadPoolExecutor(1, thread_name_prefix="vae-generate-write")
    writing: Future | None = None

    def fetch_next() -> None:
        if pieces:
            piece = pieces.popleft()
            in_flight.append((piece, fetchers.submit(source.fetch, spec, piece[1], piece[2])))

    def write(shard: int, arrays: dict[str, np.ndarray]) -> None:
        hook = functools.partial(events.shard_written, shard)
        record = write_shard(out_dir, spec, shard, arrays, before_publish=hook)
        events.shard_published(shard)
        job.shards[shard] = record
        job.save(out_dir)
        events.shard_recorded(shard)
        log.debug("wrote shard %s: samples [%d, %d)", record.path, record.start, record.stop)

    try:
        for _ in range(concurrency):
            fetch_next()
        parts: list[dict[str, np.ndarray]] = []
        while in_flight:
            (shard, a, b), future = in_flight.popleft()
            parts.append(future.result())
            fetch_next()
            events.samples_received(b - a)
            if b == spec.shard_range(shard)[1]:
                arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
                parts = []
                if writing is not None:
                    writing.result()  # one shard in the writer at a time; its error surfaces
                writing = writer.submit(write, shard, arrays)
        if writing is not None:
            writing.result()
    finally:
        # On failure, queued pieces are dropped; running ones finish their (bounded) request,
        # and a shard being written is finished and recorded.
        fetchers.shutdown(wait=False, cancel_futures=True)
        writer.shutdown(wait=True)
    job.complete = True
    job.save(out_dir)
    return JobResult(job.samples_done - done_before, time.perf_counter() - start_time)


def _pieces(spec: JobSpec, job: JobManifest, request_size: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) requests covering the unfinished shards, in sample order."""
    pieces = []
    for shard in job.owned_shards:
        if shard in job.shards:
            continue
        start, stop = spec.shard_range(shard)
        pieces += [
            (shard, a, min(a + request_size, stop)) for a in range(start, stop, request_size)
        ]
    return pieces


class JobIncomplete(JobError):
    """finalize found shards missing or damaged; ``workers`` are the ones to run again."""

    def __init__(self, message: str, workers: list[int]):
        super().__init__(message)
        self.workers = workers


def unfinished_workers(out_dir: Path, definition: WorkersDefinition) -> list[int]:
    """The workers whose record is missing or not marked complete (a cheap look, no hashing)."""
    records = (read_worker(out_dir, i) for i in range(definition.num_workers))
    return [i for i, r in enumerate(records) if r is None or not r.complete]


def finalize(out_dir: Path, definition: WorkersDefinition) -> JobManifest:
    """Verify every shard of the job against its worker's record, then write job.json.

    Idempotent: job.json is rewritten only when its bytes would change, and two finalizers
    would write the same bytes (the caller serialises them anyway). The job.json written is
    the one a single process running the whole job ends with.

    Raises:
        JobIncomplete: a shard not recorded by its worker, absent, or not matching its sha256.
        JobError: a worker record of another job.
    """
    spec, n = definition.spec, definition.num_workers
    records: dict[int, ShardRecord] = {}
    problems: list[tuple[int, str]] = []
    for i in range(n):
        worker = read_worker(out_dir, i)
        if worker is not None and WorkersDefinition(worker.spec, worker.num_workers) != definition:
            raise JobError(f"{out_dir / WORKERS_DIR}/worker-{i}.json: records another job")
        for k in range(i, spec.num_shards, n):
            record = None if worker is None else worker.shards.get(k)
            if record is None:
                problems.append((k, "not finished"))
            elif not (out_dir / record.path).exists():
                problems.append((k, "missing"))
            elif not verify_shard(out_dir, record):
                problems.append((k, "sha256 differs from the worker's record"))
            else:
                records[k] = record
    if problems:
        problems.sort()
        named = [f"{shard_path(spec, k)} (worker {k % n}: {why})" for k, why in problems[:10]]
        more = f" and {len(problems) - 10} more" if len(problems) > 10 else ""
        workers = sorted({k % n for k, _ in problems})
        raise JobIncomplete(
            f"{len(problems)} of {spec.num_shards} shards are not done: "
            + ", ".join(named) + more, workers
        )  # fmt: skip
    for folder in (out_dir, out_dir / WORKERS_DIR):  # left by a finalize or a worker killed
        remove_file_temporaries(folder, JOB_FILE)
    job = JobManifest(spec, records, complete=True)
    text = job.to_json()
    path = out_dir / JOB_FILE
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        job.save(out_dir)
        log.info("finalized: verified %d shards, wrote %s", spec.num_shards, path)
    else:
        log.info("finalized already: verified %d shards, %s unchanged", spec.num_shards, path)
    return job


def write_preview(source: SampleSource, spec: JobSpec, path: Path) -> None:
    """A PNG grid of the job's first samples: one row per class for a CVAE, else 10 columns."""
    from vaeserve.images import save_grid

    # PREVIEW_COLUMNS periods of the label pattern hold at least that many of each class.
    periods = len(spec.label_pattern) if spec.label_pattern else _VAE_PREVIEW_ROWS
    count = min(spec.num_samples, PREVIEW_COLUMNS * periods)
    preview = replace(spec, encoding="uint8", latents=False)
    arrays = source.fetch(preview, 0, count)
    images = arrays["samples"].astype(np.float32) / 255.0  # (count, C, H, W)
    labels = arrays.get("labels")
    if labels is None:
        grid = images
    else:
        rows = []
        for cls in sorted(set(spec.label_pattern or ())):
            row = images[labels == cls][:PREVIEW_COLUMNS]
            blank = np.zeros((PREVIEW_COLUMNS - len(row), *row.shape[1:]), np.float32)
            rows.append(np.concatenate([row, blank]))
        grid = np.concatenate(rows)
    save_grid(grid, path, nrow=PREVIEW_COLUMNS, scale=max(1, 64 // images.shape[-1]))
    log.info("wrote preview %s", path)
