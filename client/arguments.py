"""vae-generate's command line: the flags, and the checks that need no model or server."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from vaeserve.client.shards import FORMATS

__all__ = ["MAX_SEED", "TOKEN_ENV", "UsageError", "check_args", "parse_args"]

MAX_SEED = 2**64 - 1
TOKEN_ENV = "VAESERVE_TOKEN"


class UsageError(Exception):
    """A bad argument: reported in one line, exit code 2, before any work."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vae-generate",
        description="Generate N samples of a VAE/CVAE into shard files; re-run to resume.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="host:port of vae-serve; several, comma-separated")
    where.add_argument("--local", metavar="REPO", help="run in-process on this model repository")
    p.add_argument("--model", required=True, help="NAME or NAME:VERSION (default: highest)")
    p.add_argument("--num", type=int, required=True, help="number of samples")
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
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[str, int]:
    """Checks that need no model; returns (model name, version or 0)."""
    name, _, version_text = args.model.partition(":")
    if not name or (version_text and not (version_text.isdigit() and int(version_text) >= 1)):
        raise UsageError(
            f"--model: expected NAME or NAME:VERSION (VERSION >= 1), got {args.model!r}"
        )
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
    return name, int(version_text or 0)
