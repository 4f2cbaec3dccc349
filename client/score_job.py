"""vae-score: score a whole data set with a served (or local) model into shards, then summarise.

Run: vae-score --server localhost:8500 --model digits --data npz:test.npz --k 100 --out scores/

Each input gets the four numbers of the ``Score`` RPC (docs/architecture.md "Scoring"): elbo,
log_px (the k-sample importance-weighted bound), log_likelihood and kl, in nats. Input i of the
data (after ``--split``) is scored with noise index i (``start_index`` of its batch plus its
place in it), so a score is a pure function of (model version, seed, i, k, the image and its
label): any batching, and any interruption, gives the same bytes. Re-running the same command
resumes; see docs/score.md for the files and their guarantees.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vaeserve.atomic import fsync_dir, write_atomically
from vaeserve.client.arguments import UsageError
from vaeserve.client.folder_locks import flock
from vaeserve.client.score_args import DEFAULT_BATCH, build_parser, check_score_args
from vaeserve.client.score_data import DataError, ScoreData, load_score_data
from vaeserve.client.score_summary import SCORES, summarize
from vaeserve.client.scorers import LocalScorer, Scorer, ServedScorer
from vaeserve.client.shards import npz_bytes
from vaeserve.errors import ModelNotFound, VaeServeError
from vaeserve.info import ModelInfo
from vaeserve.manifest import sha256_of_file

__all__ = ["ScoreEvents", "main"]

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"
JOB_FORMAT = "vae-score-job/1"
_TEMPORARY = re.compile(r"^\.(shard-\d+\.npz|job\.json|summary\.json)\..*tmp$")
# What decides a job's bytes: a resume must agree on every one.
_IDENTITY = ("model", "model_version", "data_sha256", "split", "rows", "k", "seed", "shard_size")


class JobFailed(Exception):
    """The job stopped before it was complete: exit code 1."""


def _ignore(_: int) -> None:
    pass


@dataclass(frozen=True)
class ScoreEvents:
    """Points of a shard's life, for tests that kill the job there (called with its index)."""

    shard_written: Callable[[int], None] = _ignore  # on disk under its temporary name
    shard_recorded: Callable[[int], None] = _ignore  # renamed and listed in job.json


# --- the job's files ----------------------------------------------------------------------------


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()


def _save_json(path: Path, obj: Any) -> None:
    data = _dump(obj)
    write_atomically(path, lambda f: f.write(data))
    fsync_dir(path.parent)


def _read_job(out: Path) -> dict[str, Any] | None:
    path = out / JOB_FILE
    if not path.exists():
        if out.is_dir() and any(p.name.startswith("shard-") for p in out.iterdir()):
            raise UsageError(f"--out: {out} holds shard files but no {JOB_FILE}; use a new folder")
        return None
    try:
        job = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--out: cannot read {path}: {exc}") from None
    if not isinstance(job, dict) or job.get("format") != JOB_FORMAT:
        raise UsageError(f"--out: {path} is not a vae-score job ({JOB_FORMAT})")
    return job


def _write_shard(
    out: Path, index: int, arrays: dict[str, np.ndarray], events: ScoreEvents
) -> dict[str, Any]:
    name = _shard_name(index)
    payload = npz_bytes(arrays)
    tmp = out / f".{name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        events.shard_written(index)
        os.replace(tmp, out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out)
    return {"path": name, "sha256": hashlib.sha256(payload).hexdigest()}


def _read_columns(out: Path, job: dict[str, Any]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for index in range(_num_shards(job)):
        with np.load(out / _shard_name(index), allow_pickle=False) as shard:
            for key in shard.files:
                parts.setdefault(key, []).append(shard[key])
    return {key: np.concatenate(arrays) for key, arrays in parts.items()}


def _num_shards(job: dict[str, Any]) -> int:
    return -(-job["rows"] // job["shard_size"])


# --- the command --------------------------------------------------------------------------------


def _open(args: argparse.Namespace, name: str, version: int) -> Scorer:
    where = f"--server {args.server}" if args.server else f"--local {args.local}"
    try:
        if args.local is not None:
            return LocalScorer(args.local, name, version)
        return ServedScorer(args, name, version)
    except ModelNotFound as exc:
        raise UsageError(f"--model: {where}: {exc}") from None
    except VaeServeError as exc:
        raise JobFailed(f"{where}: {exc.status}: {exc}") from None


def _batch(args: argparse.Namespace, info: ModelInfo) -> int:
    if args.k > info.max_score_samples:
        raise UsageError(
            f"--k: {args.k} is over the server's max_score_samples {info.max_score_samples}"
        )
    if args.k > info.max_score_rows:
        raise UsageError(f"--k: {args.k} is over the server's max_score_rows {info.max_score_rows}")
    limit = min(info.max_samples_per_request, info.max_score_rows // args.k)
    return min(args.batch or DEFAULT_BATCH, limit)


def _plan(
    args: argparse.Namespace, old: dict[str, Any] | None, info: ModelInfo, data: ScoreData
) -> dict[str, Any]:
    """The job's job.json: the one found in --out if it is this job, else a new one."""
    seed = args.seed if args.seed is not None else (old or {}).get("seed")
    ours = {
        "format": JOB_FORMAT,
        "model": info.name,
        "model_version": info.version,
        "data": str(data.path),
        "data_sha256": data.sha256,
        "split": data.split,
        "source_arrays": list(data.source),
        "labels": data.y is not None,
        "rows": len(data.x),
        "k": args.k,
        "seed": secrets.randbits(64) if seed is None else seed,
        "shard_size": args.shard_size,
        "shards": {},
        "complete": False,
    }
    if old is None:
        return ours
    changed = [
        f"{key} {old.get(key)!r} (now {ours[key]!r})"
        for key in _IDENTITY
        if old.get(key) != ours[key]
    ]
    if changed:
        raise UsageError(
            f"--out: {args.out} holds another scoring job: {'; '.join(changed)}; use a new "
            "folder, or the job's own parameters to resume it"
        )
    return old


def _score_job(args: argparse.Namespace, events: ScoreEvents) -> int:
    name, version = check_score_args(args)
    old = _read_job(args.out) if args.out.is_dir() else None
    if old is not None and version == 0:
        version = old.get("model_version", 0)  # resume the pinned version, not a newer one
    scorer = _open(args, name, version)
    try:
        info = scorer.info
        batch = _batch(args, info)
        try:
            data = load_score_data(args.data, args.split, info)
        except DataError as exc:
            raise UsageError(str(exc)) from None
        if args.anomaly_class is not None:
            _check_anomaly(args.anomaly_class, data)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out: cannot create {args.out}: {exc.strerror or exc}") from None
        busy = f"--out: {args.out} is in use by another vae-score run"
        with flock(args.out / LOCK_FILE, fcntl.LOCK_EX | fcntl.LOCK_NB, busy):
            job = _plan(args, _read_job(args.out), info, data)
            try:
                _run(args.out, job, data, scorer, batch, events)
                columns = _read_columns(args.out, job)
                summary = summarize(job, columns, args.anomaly_class)
                _save_json(args.out / SUMMARY_FILE, summary)
            except OSError as exc:
                raise JobFailed(
                    f"--out {args.out}: {exc}; the shards finished so far are kept: re-run the "
                    "same command to resume"
                ) from None
        lp = summary["log_px"]
        log.info(
            "done: %d images, log_px mean %.4f (median %.4f) nats, k %d; %s",
            summary["count"], lp["mean"], lp["quantiles"]["50%"], job["k"],
            args.out / SUMMARY_FILE,
        )  # fmt: skip
        if "anomaly" in summary:
            log.info("AUROC of -log_px for class %d: %.4f", args.anomaly_class,
                     summary["anomaly"]["auroc"])  # fmt: skip
        return 0
    finally:
        scorer.close()


def _check_anomaly(c: int, data: ScoreData) -> None:
    if data.y is None:
        raise UsageError(f"--anomaly-class: {data.path} holds no labels")
    hits = int((data.y == c).sum())
    if hits == 0 or hits == len(data.y):
        what = "no" if hits == 0 else "only"
        raise UsageError(f"--anomaly-class: the scored rows hold {what} images of class {c}")


def _run(
    out: Path,
    job: dict[str, Any],
    data: ScoreData,
    scorer: Scorer,
    batch: int,
    events: ScoreEvents,
) -> None:
    for p in out.iterdir():
        if _TEMPORARY.match(p.name):
            p.unlink(missing_ok=True)
    shards: dict[str, dict[str, Any]] = job["shards"]
    bad = [i for i, r in shards.items() if sha256_of_file_or_none(out / r["path"]) != r["sha256"]]
    for i in bad:
        log.warning("%s differs from its recorded sha256; it will be redone", shards[i]["path"])
        del shards[i]
    if bad:
        job["complete"] = False
    total, size, n = _num_shards(job), job["shard_size"], job["rows"]
    if len(shards) == total:
        log.info("all %d shard(s) verified: nothing left to score", total)
    else:
        log.info(
            "scoring %d images of %s:%d (k %d, seed %d, split %s) into %s: %d shard(s) of %d, "
            "%d done",
            n, job["model"], job["model_version"], job["k"], job["seed"], job["split"], out,
            total, size, len(shards),
        )  # fmt: skip
    _save_json(out / JOB_FILE, job)
    began, scored = time.perf_counter(), 0
    labels = data.y if scorer.info.kind == "cvae" else None  # a VAE's labels are only kept
    for index in range(total):
        if str(index) in shards:
            continue
        start, stop = index * size, min((index + 1) * size, n)
        parts = [
            scorer.score(
                data.x[a : min(a + batch, stop)],
                None if labels is None else labels[a : min(a + batch, stop)],
                job["k"],
                job["seed"],
                a,
            )
            for a in range(start, stop, batch)
        ]
        arrays = {"index": np.arange(start, stop, dtype=np.int64), "row": data.rows[start:stop]}
        arrays.update({s: np.concatenate([p[s] for p in parts]) for s in SCORES})
        if data.y is not None:
            arrays["y"] = data.y[start:stop]
        record = _write_shard(out, index, arrays, events)
        shards[str(index)] = {"start": start, "stop": stop, **record}
        job["shards"] = dict(sorted(shards.items(), key=lambda kv: int(kv[0])))
        shards = job["shards"]
        job["complete"] = len(shards) == total
        _save_json(out / JOB_FILE, job)
        events.shard_recorded(index)
        scored += stop - start
        rate = scored / max(time.perf_counter() - began, 1e-9)
        log.info(
            "shard %d/%d: images %d..%d, log_px mean %.4f nats; %d of %d images done "
            "(%.0f images/s)",
            index + 1, total, start, stop - 1, float(arrays["log_px"].mean()),
            sum(r["stop"] - r["start"] for r in shards.values()), n, rate,
        )  # fmt: skip


def sha256_of_file_or_none(path: Path) -> str | None:
    try:
        return sha256_of_file(path)
    except OSError:
        return None


def main(argv: Sequence[str] | None = None, events: ScoreEvents | None = None) -> int:
    """``vae-score``: exit 0 when the job is complete, 1 when not, 2 for bad arguments or data."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).setLevel(args.log_level)
    try:
        return _score_job(args, events or ScoreEvents())
    except UsageError as exc:
        print(f"vae-score: error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"vae-score: {exc}", file=sys.stderr)
        return 1
    except VaeServeError as exc:
        print(
            f"vae-score: {exc.status}: {exc}; the shards finished so far are kept: re-run the "
            "same command to resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("vae-score: interrupted; re-run the same command to resume", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
