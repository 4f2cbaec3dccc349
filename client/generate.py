"""vae-generate: a batch generation job, N samples of a served (or local) model into shards.

Run: vae-generate --server localhost:8500 --model digits --num 100000 --out out/digits

Re-running the same command resumes an interrupted job; see docs/generate.md. With
``--num-workers N --worker-index I`` the command is worker I of a job split across N
processes or machines writing one folder; ``vae-generate --out DIR --finalize`` verifies such a
job and writes its job.json (the last worker to finish does it on its own).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Sequence
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
from vaeserve.client.job import (
    JobEvents,
    JobIncomplete,
    finalize,
    run_job,
    unfinished_workers,
    verify_finished,
    write_preview,
)
from vaeserve.client.results import ModelInfo
from vaeserve.client.shards import (
    JOB_FILE,
    WORKERS_DIR,
    JobError,
    JobManifest,
    JobSpec,
    WorkerRecord,
    WorkersDefinition,
    create_definition,
    read_definition,
    read_job,
    read_worker,
    worker_file,
)
from vaeserve.client.sources import SampleSource
from vaeserve.errors import VaeServeError

__all__ = ["main"]

log = logging.getLogger(__name__)

DEFAULT_REQUEST_SIZE = 2048
LOCK_FILE = ".lock"  # exclusive for a single-process run, shared by a job's workers
FINALIZE_LOCK = f"{WORKERS_DIR}/finalize.lock"


class JobFailed(Exception):
    """The job stopped before it was complete: exit code 1."""


def _label_pattern(text: str | None, info: ModelInfo) -> tuple[str | None, tuple[int, ...] | None]:
    """(normalised --labels, label of sample i = pattern[i % len(pattern)])."""
    if info.kind != "cvae":
        if text is not None:
            raise UsageError(f"--labels: model {info.name!r} is a {info.kind} and takes no labels")
        return None, None
    text = "balanced" if text is None else text.strip()
    if text == "balanced":
        return text, tuple(range(info.num_classes))
    pattern = []
    for token in (t.strip() for t in text.split(",")):
        if token.lstrip("-").isdigit():
            cls = int(token)
        elif token in info.class_names:
            cls = info.class_names.index(token)
        else:
            raise UsageError(
                f"--labels: {token!r} is not a class index or name of {info.name!r}: expected "
                f"'balanced', 0..{info.num_classes - 1} or one of {list(info.class_names)}"
            )
        if not 0 <= cls < info.num_classes:
            raise UsageError(
                f"--labels: class {cls} is out of range: expected 0..{info.num_classes - 1}"
            )
        pattern.append(cls)
    return ",".join(map(str, pattern)), tuple(pattern)


def _check_images(args: argparse.Namespace, info: ModelInfo) -> None:
    shape = info.sample_shape
    is_image = len(shape) == 3 and shape[0] in (1, 3)
    for flag, used in (("--format png", args.format == "png"), ("--preview", args.preview)):
        if used and not is_image:
            raise UsageError(f"{flag}: needs image samples (C, H, W) with C 1 or 3, got {shape}")


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


def _foreign_files(out: Path) -> bool:
    # A lone lock file is what a run killed before it wrote job.json leaves.
    return any(p.name != LOCK_FILE for p in out.iterdir())


def _plan(
    args: argparse.Namespace, source: SampleSource, name: str, version: int
) -> tuple[JobManifest, ModelInfo, bool]:
    """The job to run (new, or the one recorded in --out), after every argument check.

    Returns:
        (job, model info, whether job.json is new).
    """
    try:
        existing = read_job(args.out) if args.out.is_dir() else None
        split = read_definition(args.out) if args.out.is_dir() else None
    except JobError as exc:
        raise UsageError(f"--out: {exc}") from None
    if split is not None:
        n = split.num_workers
        raise UsageError(
            f"--out: {args.out} holds a job split across {n} workers (workers/job.json): run "
            f"each with --num-workers {n} --worker-index I, or check it with --finalize"
        )
    if existing is None and args.out.is_dir() and _foreign_files(args.out):
        raise UsageError(
            f"--out: {args.out} holds files that are not a vae-generate job (no job.json); "
            "choose a new or empty folder"
        )
    spec, info = _spec(args, source, name, version, existing.spec if existing else None)
    if existing is None:
        return JobManifest(spec), info, True
    _refuse(args.out, existing.spec.differences(spec))
    return existing, info, False


def _plan_worker(
    args: argparse.Namespace, source: SampleSource, name: str, version: int
) -> tuple[WorkersDefinition, ModelInfo]:
    """The job this worker is part of, checked against workers/job.json if a worker wrote it."""
    out = args.out
    try:
        # Listed first: a worker writes workers/job.json before any shard.
        names = {p.name for p in out.iterdir()} if out.is_dir() else set()
        split = read_definition(out) if out.is_dir() else None
        single = read_job(out) if out.is_dir() else None
    except JobError as exc:
        raise UsageError(f"--out: {exc}") from None
    if split is None and single is not None:
        raise UsageError(
            f"--out: {out} holds a job run by a single process (job.json, no workers/job.json): "
            "resume it without --num-workers, or choose another --out"
        )
    if split is None and names - {LOCK_FILE, WORKERS_DIR}:
        raise UsageError(
            f"--out: {out} holds files that are not a vae-generate job (no workers/job.json); "
            "choose a new or empty folder"
        )
    spec, info = _spec(args, source, name, version, None if split is None else split.spec)
    ours = WorkersDefinition(spec, args.num_workers)
    if split is not None:
        _refuse(out, split.differences(ours))
    return ours, info


def _spec(
    args: argparse.Namespace,
    source: SampleSource,
    name: str,
    version: int,
    recorded: JobSpec | None,
) -> tuple[JobSpec, ModelInfo]:
    """The job the arguments ask for; the version and seed ``recorded`` if they leave them out."""
    pinned = recorded is not None and recorded.model == name and not version
    if pinned:
        version = recorded.model_version
    try:
        info = source.model_info(name, version)
    except LookupError as exc:
        why = f" (the job in {args.out} started with version {version})" if pinned else ""
        raise UsageError(f"--model: {exc}{why}") from None
    _check_images(args, info)
    labels, pattern = _label_pattern(args.labels, info)
    if args.seed is not None:
        seed = args.seed
    else:
        seed = recorded.seed if recorded else secrets.randbits(63)
    spec = JobSpec(
        model=info.name,
        model_version=info.version,
        model_sha256=info.manifest.get("decoder", {}).get("sha256", ""),
        num_samples=args.num,
        labels=labels,
        label_pattern=pattern,
        seed=seed,
        temperature=args.temperature,
        output=args.output,
        encoding=args.encoding or ("uint8" if args.format == "png" else "float32"),
        latents=args.latents,
        shard_size=args.shard_size,
        format=args.format,
    )
    return spec, info


def _refuse(out: Path, differences: list[str]) -> None:
    if differences:
        raise UsageError(
            f"--out: {out} holds another job, or this one with other parameters or model: "
            + "; ".join(differences)
            + ". Re-run with the recorded parameters to resume, or choose another --out"
        )


def _generate(args: argparse.Namespace, events: JobEvents) -> int:
    name, version = check_args(args)
    source = _open_source(args)
    try:
        try:
            if args.num_workers is None:
                job, info, new = _plan(args, source, name, version)
            else:
                split, info = _plan_worker(args, source, name, version)
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
                with _locked(args.out):
                    if new:
                        job.save(args.out)
                    _execute(args, source, job, info, events)
            else:
                with _worker_locked(args.out, args.worker_index):
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


@contextlib.contextmanager
def _flock(path: Path, operation: int, busy: str = "") -> Iterator[None]:
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


def _locked(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold ``out/.lock``: two runs writing one folder would undo each other's job.json."""
    busy = f"--out: {out} is in use by another vae-generate run"
    return _flock(out / LOCK_FILE, fcntl.LOCK_EX | fcntl.LOCK_NB, busy)


@contextlib.contextmanager
def _worker_locked(out: Path, index: int) -> Iterator[None]:
    """Share ``out/.lock`` with the other workers, and hold worker ``index``'s own lock."""
    whole = f"--out: {out} is in use by a vae-generate run of the whole job (no --num-workers)"
    mine = f"--worker-index: worker {index} of {out} is in use by another vae-generate run"
    with _flock(out / LOCK_FILE, fcntl.LOCK_SH | fcntl.LOCK_NB, whole):
        with _flock(
            out / WORKERS_DIR / f"worker-{index}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB, mine
        ):
            yield


def _claim(args: argparse.Namespace, ours: WorkersDefinition) -> WorkerRecord:
    """This worker's record, after workers/job.json is written (by the first worker) or agrees."""
    try:
        _refuse(args.out, create_definition(args.out, ours).differences(ours))
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
        with _flock(args.out / FINALIZE_LOCK, fcntl.LOCK_EX):  # waits for a finalize under way
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
        with _flock(out / LOCK_FILE, fcntl.LOCK_SH | fcntl.LOCK_NB, f"--out: {out} is in use"):
            with _flock(out / FINALIZE_LOCK, fcntl.LOCK_EX):
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
