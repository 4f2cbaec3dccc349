"""vae-score's command line: its flags, and the checks that need no model."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from vaeserve.client.arguments import (
    MAX_SEED,
    SERVER_HELP,
    TOKEN_ENV,
    UsageError,
    check_server,
    parse_model,
)
from vaeserve.client.score_data import SPLITS

__all__ = ["DEFAULT_BATCH", "build_parser", "check_score_args"]

DEFAULT_BATCH = 256


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vae-score",
        description="Score every image of a data set (ELBO, k-sample bound on log p(x), "
        "E[log p(x|z)], KL; nats) into shard files and a summary; re-run to resume. "
        "See docs/score.md.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help=SERVER_HELP)
    where.add_argument(
        "--local", metavar="REPO", type=Path, help="run in-process on this repository"
    )
    p.add_argument("--model", required=True, help="NAME or NAME:VERSION (default: highest)")
    p.add_argument("--data", required=True, help="npz:PATH (x [+ y], or x_train/x_test [+ y_*])")
    p.add_argument("--k", type=int, required=True, help="importance samples per image")
    p.add_argument("--out", type=Path, required=True, help="output folder of the job")
    p.add_argument("--seed", type=int, help="seed of the draws (default: random, recorded)")
    p.add_argument(
        "--split",
        choices=SPLITS,
        help="rows to score (default: x_test of a file holding one, else all of x); see "
        "docs/score.md",
    )
    p.add_argument("--batch", type=int, help="images per request (default: 256, within limits)")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    p.add_argument(
        "--anomaly-class",
        type=int,
        metavar="C",
        help="also report the AUROC of -log_px for 'is class C' (needs labels)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of a request, seconds")
    p.add_argument("--retry-timeout", type=float, default=120.0, help="seconds to keep retrying")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca-cert", type=Path, help="PEM root certificates for TLS")
    p.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def check_score_args(args: argparse.Namespace) -> tuple[str, int]:
    name, version = parse_model(args.model)
    check_server(args.server)
    for flag, value in (
        ("--k", args.k),
        ("--shard-size", args.shard_size),
        ("--batch", args.batch),
    ):
        if value is not None and value < 1:
            raise UsageError(f"{flag}: expected an integer >= 1, got {value}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed: expected an integer in 0..2**64-1, got {args.seed}")
    for flag, value in (("--timeout", args.timeout), ("--retry-timeout", args.retry_timeout)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag}: expected a positive number of seconds, got {value}")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a folder")
    if args.local is not None and not args.local.is_dir():
        raise UsageError(f"--local: model repository {args.local} is not a folder")
    if args.ca_cert is not None and not args.ca_cert.is_file():
        raise UsageError(f"--ca-cert: {args.ca_cert} is not a readable file")
    return name, version
