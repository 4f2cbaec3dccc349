"""Runs a batch generation job: verify what a previous run finished, produce the rest.

Shards are fetched as pieces of at most ``request_size`` samples, ``concurrency`` pieces in
flight, and written in order as soon as their last piece is in; job.json records each one.
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
    JobManifest,
    JobSpec,
    remove_temporaries,
    verify_shard,
    write_shard,
)
from vaeserve.client.sources import SampleSource

__all__ = ["JobEvents", "JobResult", "verify_finished", "run_job", "write_preview"]

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
    removed = remove_temporaries(out_dir)
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
    """Produce the shards ``job`` lacks, recording each in job.json; mark the job complete.

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
    for shard in range(spec.num_shards):
        if shard in job.shards:
            continue
        start, stop = spec.shard_range(shard)
        pieces += [
            (shard, a, min(a + request_size, stop)) for a in range(start, stop, request_size)
        ]
    return pieces


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
