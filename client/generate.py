"""vae-generate: a batch generation job, N samples of a served (or local) model into shards.

Run: vae-generate --server localhost:8500 --model digits --num 100000 --out out/digits

Re-running the same command resumes an interrupted job; see docs/generate.md. With
``--num-workers N --worker-index I`` the command is worker I of a job split across N
processes or machines writing one folder; ``vae-generate --out DIR --finalize`` verifies such a
job and writes its job.json (the last worker to finish does it on its own).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from vaeserve.client.arguments import (
    INDEX_ENV,
    TOKEN_ENV,
    UsageError,
    check_args,
    check_finalize_args,
    parse_args,
)
from vaeserve.client.folder_locks import FINALIZE_LOCK, LOCK_FILE, flock, locked, worker_locked
from vaeserve.client.job import (
    JobEvents,
    JobIncomplete,
    finalize,
    run_job,
    unfinished_workers,
    verify_finished,
    write_preview,
)
from vaeserve.client.job_plan import plan, plan_worker, refuse
from vaeserve.client.results import ModelInfo
from vaeserve.client.shards import JOB_FILE, JobError, JobManifest, read_job
from vaeserve.client.sources import SampleSource
from vaeserve.client.worker_records import (
    WORKERS_DIR,
    WorkerRecord,
    WorkersDefinition,
    create_definition,
    read_definition,
    read_worker,
    worker_file,
)
from vaeserve.errors import VaeServeError

__all__ = ["main"]

log = logging.getLogger(__name__)

DEFAULT_REQUEST_SIZE = 2048


class JobFailed(Exception):
    """The job stopped before it was complete: exit code 1."""


def _open_source(args: argparse.Namespace) -> SampleSource:
    from vaeserve.client.retry import RetryPolicy

    if args.local is not None:
        from vaeserve.client.local import LocalSource

        return LocalSource(Path(args.local))
    from vaeserve.client.client import VaeClient
    from vaeserve.client.sources import ServedSource

    def pem(path: Path | None) -> bytes | None:
        return None if path is None else path.read_bytes()

    client = VaeClient(
        args.server,
        tls=args.tls or args.ca_cert is not None or args.client_cert is not None,
        root_certificates=pem(args.ca_cert),
        private_key=pem(args.client_key),
        certificate_chain=pem(args.client_cert),
        token=args.token,
        timeout_s=args.timeout,
        retry=RetryPolicy(max_attempts=None, max_backoff_s=2.0, deadline_s=args.retry_timeout),
    )
    return ServedSource(client)


def _generate(args: argparse.Namespace, events: JobEvents) -> int:
    name, version = check_args(args)
    source = _open_source(args)
    try:
        try:
            if args.num_workers is None:
                job, info, new = plan(args, source, name, version)
            else:
                split, info = plan_worker(args, source, name, version)
        except VaeServeError as exc:
            where = f"--server {args.server}" if args.server else f"--local {args.local}"
            raise JobFailed(f"{where}: {exc.status}: {exc}") from None
        try:
            folder = args.out if args.num_workers is None else args.out / WORKERS_DIR
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out: cannot create {folder}: {_reason(exc)}") from None
        try:
            if args.num_workers is None:
                with locked(args.out):
                    if new:
                        job.save(args.out)
                    _execute(args, source, job, info, events)
            else:
                with worker_locked(args.out, args.worker_index):
                    record = _claim(args, split)
                    _execute(args, source, record, info, events)
                    _finish_worker(args, split)
        except OSError as exc:  # a read-only or full disk before or after the shards' writing
            raise JobFailed(
                f"--out {args.out}: {_reason(exc)}; the shards finished so far are kept: "
                "re-run the same command once the folder can be written"
            ) from None
        return 0
    finally:
        source.close()


def _reason(exc: OSError) -> str:
    return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc.strerror or exc)


def _claim(args: argparse.Namespace, ours: WorkersDefinition) -> WorkerRecord:
    """This worker's record, after workers/job.json is written (by the first worker) or agrees."""
    try:
        refuse(args.out, create_definition(args.out, ours).differences(ours))
        record = read_worker(args.out, args.worker_index)
    except JobError as exc:
        raise UsageError(f"--out: {exc}") from None
    if record is None:
        record = WorkerRecord(
            ours.spec, num_workers=ours.num_workers, worker_index=args.worker_index
        )
        record.save(args.out)
    elif WorkersDefinition(record.spec, record.num_workers) != ours:
        raise UsageError(f"--out: workers/worker-{args.worker_index}.json records another job")
    return record


def _finish_worker(args: argparse.Namespace, split: WorkersDefinition) -> None:
    """Finalize the job if every worker is done (the last to finish does; a tie is harmless)."""
    me, n = args.worker_index, split.num_workers
    try:
        waiting = unfinished_workers(args.out, split)
        if waiting:
            log.info(
                "worker %d of %d is done; waiting on worker(s) %s: the last to finish verifies "
                "every shard and writes %s", me, n, _listed(waiting), args.out / JOB_FILE,
            )  # fmt: skip
            return
        with flock(args.out / FINALIZE_LOCK, fcntl.LOCK_EX):  # waits for a finalize under way
            finalize(args.out, split)
    except JobIncomplete as exc:
        raise JobFailed(
            f"worker {me} of {n} is done, but the job cannot be finalized: {exc}; "
            f"{_redo(args.out, exc.workers)}"
        ) from None
    except JobError as exc:
        raise JobFailed(f"worker {me} of {n} is done, but: {exc}") from None


def _finalize_command(args: argparse.Namespace) -> int:
    """``vae-generate --out DIR --finalize``: verify a split job, write its job.json."""
    check_finalize_args(args)
    out = args.out
    try:
        split = read_definition(out)
        single = read_job(out) if split is None else None
    except JobError as exc:
        raise UsageError(f"--out: {exc}") from None
    if split is None:
        what = "no vae-generate job" if single is None else "a job run by a single process"
        raise UsageError(
            f"--finalize: {out} holds {what} (no workers/job.json); --finalize is for a job "
            "split across workers (--num-workers)"
        )
    try:
        with flock(out / LOCK_FILE, fcntl.LOCK_SH | fcntl.LOCK_NB, f"--out: {out} is in use"):
            with flock(out / FINALIZE_LOCK, fcntl.LOCK_EX):
                finalize(out, split)
    except JobIncomplete as exc:
        raise JobFailed(f"--finalize: job incomplete: {exc}; {_redo(out, exc.workers)}") from None
    except JobError as exc:
        raise UsageError(f"--out: {exc}") from None
    except OSError as exc:
        raise JobFailed(f"--finalize: --out {out}: {_reason(exc)}") from None
    log.info("job complete: %s verified and finalized", out)
    return 0


def _listed(workers: list[int]) -> str:
    return ", ".join(map(str, workers[:10])) + (
        f" and {len(workers) - 10} more" if len(workers) > 10 else ""
    )


def _redo(out: Path, workers: list[int]) -> str:
    return (
        f"run (or wait for) worker(s) {_listed(workers)} of {out} to finish them (each "
        f"re-checks and redoes its own), then vae-generate --out {out} --finalize"
    )


def _execute(
    args: argparse.Namespace,
    source: SampleSource,
    job: JobManifest,
    info: ModelInfo,
    events: JobEvents,
) -> None:
    spec = job.spec
    whose, record = _whose(job, args.out)
    part = f"; {whose} writes {len(job.owned_shards)} of them" if whose != "job" else ""
    log.info(
        "job: %d samples of %s:%d (seed %d) into %s, %d shards of %d%s",
        spec.num_samples, spec.model, spec.model_version, spec.seed, args.out,
        spec.num_shards, spec.shard_size, part,
    )  # fmt: skip
    good, seconds = verify_finished(args.out, job)
    if good:
        log.info("resume check: %d finished shard(s) verified in %.3f s", good, seconds)
    if job.complete and len(job.shards) == len(job.owned_shards):
        log.info("%s already complete: %s", whose, record)
    else:
        _run(args, source, job, info, events)
    if args.preview is not None:
        try:
            write_preview(source, spec, args.preview)
        except (VaeServeError, OSError) as exc:
            raise JobFailed(f"the job is complete, but --preview failed: {exc!r}") from None


def _whose(job: JobManifest, out: Path) -> tuple[str, Path]:
    """("job", its job.json) or ("worker I of N", its record): whose shards, for messages."""
    if isinstance(job, WorkerRecord):
        name = f"worker {job.worker_index} of {job.num_workers}"
        return name, out / worker_file(job.worker_index)
    return "job", out / JOB_FILE


def _run(
    args: argparse.Namespace,
    source: SampleSource,
    job: JobManifest,
    info: ModelInfo,
    events: JobEvents,
) -> None:
    from tqdm import tqdm

    spec = job.spec
    limit = info.max_stream_samples or DEFAULT_REQUEST_SIZE
    request_size = min(args.request_size or min(spec.shard_size, DEFAULT_REQUEST_SIZE), limit)
    bar = tqdm(
        total=job.samples_owned,
        initial=job.samples_done,
        unit=" samples",
        unit_scale=True,
        smoothing=0.1,
        disable=True if args.no_progress else None,
    )
    try:
        result = run_job(
            args.out,
            job,
            source,
            request_size=request_size,
            concurrency=args.concurrency,
            events=replace(events, samples_received=_both(bar.update, events.samples_received)),
        )
    except (VaeServeError, OSError, RuntimeError, KeyboardInterrupt) as exc:
        whose = _whose(job, args.out)[0]
        reason = f"{exc.status}: {exc}" if isinstance(exc, VaeServeError) else repr(exc)
        raise JobFailed(
            f"{whose} incomplete: {job.samples_done} of {job.samples_owned} samples "
            f"({len(job.shards)} of {len(job.owned_shards)} shards) are written to {args.out}; "
            f"re-run the same command to resume ({reason})"
        ) from None
    finally:
        bar.close()
    rate = result.samples_written / result.seconds if result.seconds > 0 else float("inf")
    whose, record = _whose(job, args.out)
    log.info(
        "%s complete: %d samples written in %.1f s (%.0f samples/s); %s %s",
        whose, result.samples_written, result.seconds, rate,
        "manifest" if whose == "job" else "record", record,
    )  # fmt: skip


def _both(first: Callable[[int], object], second: Callable[[int], None]) -> Callable[[int], None]:
    def call(n: int) -> None:
        first(n)
        second(n)

    return call


def main(argv: Sequence[str] | None = None, events: JobEvents | None = None) -> int:
    """``vae-generate``: exit 0 when the job is complete, 1 when not, 2 for bad arguments.

    ``events`` lets a program that runs the command in-process follow the job (see JobEvents).
    """
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.finalize:
            return _finalize_command(args)
        args.token = args.token or os.environ.get(TOKEN_ENV)
        args.index_env = os.environ.get(INDEX_ENV)  # --worker-index's default
        return _generate(args, events or JobEvents())
    except UsageError as exc:
        print(f"vae-generate: error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"vae-generate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vae-generate: interrupted; re-run the same command to resume", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
