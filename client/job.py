"""Runs a batch generation job: verify what a previous run finished, produce the rest.

Shards are fetched as pieces of at most ``request_size`` samples, ``concurrency`` pieces in
flight, and written in order as soon as their last piece is in; job.json records each one.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
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

__all__ = ["KillSwitch", "JobResult", "verify_finished", "run_job", "write_preview"]

log = logging.getLogger(__name__)

KILL_ENV = "VAE_GENERATE_TEST_KILL"
PREVIEW_COLUMNS = 10
_VAE_PREVIEW_ROWS = 4


@dataclass
class KillSwitch:
    """Test-only: SIGKILL this process at a chosen point, as a crash or ``kill -9`` would.

    Set from ``VAE_GENERATE_TEST_KILL``: ``samples:M`` (once M samples were received by this
    run, whether or not their shard is written), ``write:K`` (shard K is on disk under its
    temporary name, not yet renamed) or ``record:K`` (shard K renamed, not yet in job.json).
    """

    point: str | None = None
    value: int = 0
    received: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KillSwitch:
        text = env.get(KILL_ENV)
        if not text:
            return cls()
        point, _, value = text.partition(":")
        if point not in ("samples", "write", "record") or not value.isdigit():
            raise ValueError(f"{KILL_ENV}: expected samples:M, write:K or record:K, got {text!r}")
        return cls(point, int(value))

    def add_samples(self, n: int) -> None:
        self.received += n
        if self.point == "samples" and self.received >= self.value:
            _die()

    def at(self, point: str, shard: int) -> None:
        if self.point == point and self.value == shard:
            _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


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
    on_progress: Callable[[int], None] = lambda n: None,
    kill: KillSwitch | None = None,
) -> JobResult:
    """Produce the shards ``job`` lacks, recording each in job.json; mark the job complete.

    Raises:
        Whatever ``source.fetch`` or a shard write raises (a fetch once its retries are
        spent); the shards finished so far stay recorded.
    """
    spec, kill = job.spec, kill or KillSwitch()
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
        hook = functools.partial(kill.at, "write", shard)
        record = write_shard(out_dir, spec, shard, arrays, before_publish=hook)
        kill.at("record", shard)
        job.shards[shard] = record
        job.save(out_dir)
        log.debug("wrote shard %s: samples [%d, %d)", record.path, record.start, record.stop)

    try:
        for _ in range(concurrency):
            fetch_next()
        parts: list[dict[str, np.ndarray]] = []
        while in_flight:
            (shard, a, b), future = in_flight.popleft()
            parts.append(future.result())
            fetch_next()
            on_progress(b - a)
            kill.add_samples(b - a)
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
