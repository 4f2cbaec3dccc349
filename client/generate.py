"""vae-generate: a batch generation job, N samples of a served (or local) model into shards.

Run: vae-generate --server localhost:8500 --model digits --num 100000 --out out/digits

Re-running the same command resumes an interrupted job; see docs/generate.md.
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

from vaeserve.client.arguments import TOKEN_ENV, UsageError, check_args, parse_args
from vaeserve.client.job import JobEvents, run_job, verify_finished, write_preview
from vaeserve.client.results import ModelInfo
from vaeserve.client.shards import JOB_FILE, JobError, JobManifest, JobSpec, read_job
from vaeserve.client.sources import SampleSource
from vaeserve.errors import VaeServeError

__all__ = ["main"]

log = logging.getLogger(__name__)

DEFAULT_REQUEST_SIZE = 2048
LOCK_FILE = ".lock"


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
    except JobError as exc:
        raise UsageError(f"--out: {exc}") from None
    if existing is None and args.out.is_dir() and _foreign_files(args.out):
        raise UsageError(
            f"--out: {args.out} holds files that are not a vae-generate job (no job.json); "
            "choose a new or empty folder"
        )
    pinned = existing is not None and existing.spec.model == name and not version
    if pinned:
        version = existing.spec.model_version
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
        seed = existing.spec.seed if existing else secrets.randbits(63)
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
    if existing is None:
        return JobManifest(spec), info, True
    differences = existing.spec.differences(spec)
    if differences:
        raise UsageError(
            f"--out: {args.out} holds another job, or this one with other parameters or model: "
            + "; ".join(differences)
            + ". Re-run with the recorded parameters to resume, or choose another --out"
        )
    return existing, info, False


def _generate(args: argparse.Namespace, events: JobEvents) -> int:
    name, version = check_args(args)
    source = _open_source(args)
    try:
        try:
            job, info, new = _plan(args, source, name, version)
        except VaeServeError as exc:
            where = f"--server {args.server}" if args.server else f"--local {args.local}"
            raise JobFailed(f"{where}: {exc.status}: {exc}") from None
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out: cannot create {args.out}: {_reason(exc)}") from None
        try:
            with _locked(args.out):
                if new:
                    job.save(args.out)
                _execute(args, source, job, info, events)
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
def _locked(out: Path) -> Iterator[None]:
    """Hold ``out/.lock``: two runs writing one folder would undo each other's job.json."""
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"--out: {out} is in use by another vae-generate run") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _execute(
    args: argparse.Namespace,
    source: SampleSource,
    job: JobManifest,
    info: ModelInfo,
    events: JobEvents,
) -> None:
    spec = job.spec
    log.info(
        "job: %d samples of %s:%d (seed %d) into %s, %d shards of %d",
        spec.num_samples, spec.model, spec.model_version, spec.seed, args.out,
        spec.num_shards, spec.shard_size,
    )  # fmt: skip
    good, seconds = verify_finished(args.out, job)
    if good:
        log.info("resume check: %d finished shard(s) verified in %.3f s", good, seconds)
    if job.complete and len(job.shards) == spec.num_shards:
        log.info("job already complete: %s", args.out / JOB_FILE)
    else:
        _run(args, source, job, info, events)
    if args.preview is not None:
        try:
            write_preview(source, spec, args.preview)
        except (VaeServeError, OSError) as exc:
            raise JobFailed(f"the job is complete, but --preview failed: {exc!r}") from None


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
        total=spec.num_samples,
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
        reason = f"{exc.status}: {exc}" if isinstance(exc, VaeServeError) else repr(exc)
        raise JobFailed(
            f"job incomplete: {job.samples_done} of {spec.num_samples} samples "
            f"({len(job.shards)} of {spec.num_shards} shards) are written to {args.out}; "
            f"re-run the same command to resume ({reason})"
        ) from None
    finally:
        bar.close()
    rate = result.samples_written / result.seconds if result.seconds > 0 else float("inf")
    log.info(
        "job complete: %d samples written in %.1f s (%.0f samples/s); manifest %s",
        result.samples_written, result.seconds, rate, args.out / JOB_FILE,
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
    args.token = args.token or os.environ.get(TOKEN_ENV)
    try:
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
