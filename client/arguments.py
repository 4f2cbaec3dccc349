"""vae-generate's command line: the flags, and the checks that need no model or server."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from vaeserve.client.shards import FORMATS

__all__ = [
    "INDEX_ENV",
    "MAX_SEED",
    "TOKEN_ENV",
    "UsageError",
    "check_args",
    "check_finalize_args",
    "check_server",
    "parse_args",
    "parse_model",
    "SERVER_HELP",
]

MAX_SEED = 2**64 - 1
TOKEN_ENV = "VAESERVE_TOKEN"
INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by a Kubernetes Indexed Job: 0..completions-1
# What --finalize reads from the folder instead of the command line.
_FINALIZE_FLAGS = ("out", "finalize", "log_level", "no_progress")


SERVER_HELP = (
    "host:port of vae-serve; several, comma-separated (round robin); or one gRPC target such "
    "as dns:///NAME:PORT, whose every address gets calls in turn (a headless Service)"
)


class UsageError(Exception):
    """A bad argument: reported in one line, exit code 2, before any work."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # --finalize reads the job from --out: the job's own flags are not required then.
    finalizing, _ = _parser(required=False).parse_known_args(argv)
    return _parser(required=not finalizing.finalize).parse_args(argv)


def _parser(required: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vae-generate",
        description="Generate N samples of a VAE/CVAE into shard files; re-run to resume. "
        "A job can be split across workers (--num-workers, --worker-index), each writing its "
        "own shards into the same --out: see docs/generate.md.",
    )
    where = p.add_mutually_exclusive_group(required=required)
    where.add_argument("--server", help=SERVER_HELP)
    where.add_argument("--local", metavar="REPO", help="run in-process on this model repository")
    p.add_argument("--model", required=required, help="NAME or NAME:VERSION (default: highest)")
    p.add_argument("--num", type=int, required=required, help="number of samples")
    p.add_argument("--out", type=Path, required=True, help="output folder of the job")
    p.add_argument(
        "--labels",
        help="CVAE classes: 'balanced' (default; sample i has class i mod num_classes), one "
        "class, or a comma-separated list cycled over the samples; by index or class name",
    )
    p.add_argument("--seed", type=int, help="seed of the job (default: random, recorded)")
    p.add_argument("--temperature", type=float, default=1.0, help="prior std scale")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    p.add_argument("--format", choices=FORMATS, default="npz", help="shard file format")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--output", choices=("mean", "draw"), default="mean", help="E[x|z] or a draw")
    p.add_argument(
        "--encoding",
        choices=("float32", "float16", "uint8"),
        help="sample encoding (default float32; uint8 for png)",
    )
    p.add_argument("--latents", action="store_true", help="also store the latents z")
    p.add_argument("--preview", type=Path, help="write a PNG grid of the first samples here")
    p.add_argument("--request-size", type=int, help="samples per request (default: automatic)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of a request, seconds")
    p.add_argument(
        "--retry-timeout",
        type=float,
        default=120.0,
        help="seconds to keep retrying an unavailable server before the job fails",
    )
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca-cert", type=Path, help="PEM root certificates for TLS")
    p.add_argument("--client-cert", type=Path, help="PEM client certificate (mutual TLS)")
    p.add_argument("--client-key", type=Path, help="PEM key of --client-cert")
    p.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--num-workers",
        type=int,
        metavar="N",
        help="split the job across N workers writing into one --out; worker I writes shards "
        "s with s mod N == I, and the last to finish verifies all and writes job.json",
    )
    p.add_argument(
        "--worker-index",
        type=int,
        metavar="I",
        help=f"this worker, 0..N-1 (default: ${INDEX_ENV}, as a Kubernetes Indexed Job sets it)",
    )
    p.add_argument(
        "--finalize",
        action="store_true",
        help="with --out only: verify every shard of a job split across workers and write its "
        "job.json (the last worker to finish does this on its own)",
    )
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def parse_model(text: str) -> tuple[str, int]:
    """``--model NAME`` or ``NAME:VERSION`` as (name, version or 0 for the highest)."""
    name, _, version_text = text.partition(":")
    if not name or (version_text and not (version_text.isdigit() and int(version_text) >= 1)):
        raise UsageError(f"--model: expected NAME or NAME:VERSION (VERSION >= 1), got {text!r}")
    return name, int(version_text or 0)


def check_server(server: str | None) -> None:
    """``--server`` as VaeClient's addresses would take it (unset: --local is used)."""
    if server is None:
        return
    from vaeserve.client.channels import targets  # imports grpc: only when a server is named

    try:
        targets(server)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc).replace("addresses:", "--server:", 1)) from None


def check_args(args: argparse.Namespace) -> tuple[str, int]:
    """Checks that need no model; returns (model name, version or 0)."""
    name, version = parse_model(args.model)
    check_server(args.server)
    positive = {
        "--num": args.num,
        "--shard-size": args.shard_size,
        "--concurrency": args.concurrency,
        "--request-size": args.request_size,
    }
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag}: expected an integer >= 1, got {value}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature: expected a finite number >= 0, got {args.temperature}")
    for flag, value in (("--timeout", args.timeout), ("--retry-timeout", args.retry_timeout)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag}: expected a positive number of seconds, got {value}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed: expected an integer in 0..2**64-1, got {args.seed}")
    if args.format == "png" and args.encoding not in (None, "uint8"):
        raise UsageError("--encoding: --format png stores uint8 pixels; use uint8 or leave it out")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a folder")
    if args.local is not None and not Path(args.local).is_dir():
        raise UsageError(f"--local: model repository {args.local} is not a folder")
    if (args.client_cert is None) != (args.client_key is None):
        raise UsageError("--client-cert and --client-key: expected both or neither")
    for flag, path in (
        ("--ca-cert", args.ca_cert),
        ("--client-cert", args.client_cert),
        ("--client-key", args.client_key),
    ):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag}: {path} is not a readable file")
    _check_worker(args)
    return name, version


def _check_worker(args: argparse.Namespace) -> None:
    """Resolve --worker-index (default $JOB_COMPLETION_INDEX, read by main into index_env)."""
    n, index = args.num_workers, args.worker_index
    if n is None:
        if index is not None:
            raise UsageError("--worker-index: needs --num-workers (the number of workers)")
        return  # a single-process job, whatever the environment holds
    if n < 1:
        raise UsageError(f"--num-workers: expected an integer >= 1, got {n}")
    source = "--worker-index"
    if index is None:
        text = getattr(args, "index_env", None)
        if text is None:
            raise UsageError(
                f"--worker-index: required with --num-workers (or set ${INDEX_ENV}, as a "
                "Kubernetes Indexed Job does)"
            )
        if not text.strip().isdigit():
            raise UsageError(f"--worker-index: ${INDEX_ENV} is {text!r}, expected 0..{n - 1}")
        index, source = int(text), f"--worker-index (${INDEX_ENV})"
    if not 0 <= index < n:
        raise UsageError(f"{source}: expected 0..{n - 1} (--num-workers {n}), got {index}")
    args.worker_index = index
    if args.seed is None:
        raise UsageError(
            "--seed: required with --num-workers (every worker must draw from one seed)"
        )
    if args.preview is not None:
        raise UsageError("--preview: not with --num-workers (every worker would write it)")


def check_finalize_args(args: argparse.Namespace) -> None:
    """--finalize takes only --out (and --log-level): the job is read from the folder."""
    defaults = vars(_parser(required=False).parse_args(["--out", "."]))
    given = [k for k, v in vars(args).items() if k not in _FINALIZE_FLAGS and v != defaults.get(k)]
    given = [k for k in given if k in defaults]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(
            f"--finalize: takes only --out (and --log-level), got {flags}: the job, its "
            f"workers and parameters are read from {args.out}/workers/job.json"
        )
    if not args.out.is_dir():
        raise UsageError(f"--out: {args.out} is not a folder")
