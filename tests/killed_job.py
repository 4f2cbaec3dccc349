"""Run vae-generate in this process and SIGKILL it at a chosen point, as a crash would.

    python tests/killed_job.py POINT [vae-generate arguments...]

POINT is ``samples:M`` (once M samples arrived, whether or not their shard is written),
``written:K`` (shard K on disk under its temporary name, not yet renamed), ``published:K``
(renamed, not yet in job.json) or ``recorded:K`` (in job.json), or ``none``. The kill comes
through vae-generate's public JobEvents, from outside the shipped code.

With $KILLED_JOB_SPY set to a file, each shard this process writes (JobEvents.shard_written)
is appended to it, one index a line: what a test of workers checks ownership with.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace

from vaeserve.client.generate import main
from vaeserve.client.job import JobEvents

POINTS = ("samples", "written", "published", "recorded")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_events(point: str) -> JobEvents:
    """JobEvents that SIGKILL this process at ``point`` (see the module's docstring)."""
    if point == "none":
        return JobEvents()
    name, _, text = point.partition(":")
    if name not in POINTS or not text.isdigit():
        raise ValueError(f"kill point: expected none or one of {POINTS} with ':N', got {point!r}")
    value = int(text)
    if name == "samples":
        received = [0]

        def count(n: int) -> None:
            received[0] += n
            if received[0] >= value:
                _die()

        return JobEvents(samples_received=count)

    def at_shard(shard: int) -> None:
        if shard == value:
            _die()

    event: Callable[[int], None] = at_shard
    return JobEvents(**{f"shard_{name}": event})


def spied(events: JobEvents, path: str | None) -> JobEvents:
    """``events``, also appending each shard written to ``path`` (before a kill there)."""
    if not path:
        return events

    def record(shard: int) -> None:
        with open(path, "a") as f:
            f.write(f"{shard}\n")
        events.shard_written(shard)

    return replace(events, shard_written=record)


if __name__ == "__main__":
    events = spied(kill_events(sys.argv[1]), os.environ.get("KILLED_JOB_SPY"))
    sys.exit(main(sys.argv[2:], events=events))
