"""Plans a vae-generate job: the job the arguments ask for, checked against what --out holds.

Runs before anything is written. It asks the source for the model (the version the job in
--out recorded when the arguments name none), checks --labels against the model's classes and
the image-only options, and accepts an output folder only if it is new, empty, or holds this
very job (job.json for a single process, workers/job.json for a job split across workers) with
the same parameters. A refusal is a UsageError naming what differs (``refuse``, also used when
a worker claims its part).
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

from vaeserve.client.arguments import UsageError
from vaeserve.client.folder_locks import LOCK_FILE
from vaeserve.client.results import ModelInfo
from vaeserve.client.shards import JobError, JobManifest, JobSpec, read_job
from vaeserve.client.sources import SampleSource
from vaeserve.client.worker_records import WORKERS_DIR, WorkersDefinition, read_definition

__all__ = ["plan", "plan_worker", "refuse"]


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


def _foreign_files(out: Path) -> bool:
    # A lone lock file is what a run killed before it wrote job.json leaves.
    return any(p.name != LOCK_FILE for p in out.iterdir())


def plan(
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
    refuse(args.out, existing.spec.differences(spec))
    return existing, info, False


def plan_worker(
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
        refuse(out, split.differences(ours))
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


def refuse(out: Path, differences: list[str]) -> None:
    """A UsageError listing ``differences`` between the job in ``out`` and this one, if any."""
    if differences:
        raise UsageError(
            f"--out: {out} holds another job, or this one with other parameters or model: "
            + "; ".join(differences)
            + ". Re-run with the recorded parameters to resume, or choose another --out"
        )
