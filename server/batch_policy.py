"""The batcher's three measured choices (docs/performance.md): when a batch waits for company,
whether a run goes to a thread, and how idle instances share the queued rows.

- **Queue delay.** It is only spent when it can buy company: while batches recently held more
  than one request (``queue_delay_policy`` "adaptive", the default; "always" waits for every
  batch, as Triton does). A lone closed-loop caller never has company, so waiting would only
  add the delay to every call; its first batch-mate turns the wait back on. Requests that
  arrive while a batch computes share the next batch either way.
- **Inline runs.** A run goes to one of the batcher's threads (onnxruntime releases the GIL,
  so the event loop keeps accepting calls meanwhile), unless runs of that size have been
  measured to take less than ``INLINE_RUN_S``: then it runs on the event loop itself, because
  handing it to a thread and back costs more CPU and latency than the run.
- **Instances.** With ``instances`` > 1, that many runs are in flight at once, each
  single-threaded (the runner's ``run_small``), and idle instances share the queued rows out.
  One multi-threaded run waits at every operator for its slowest thread, so whenever the event
  loop takes a core to serialize an answer, the run's other thread idles; single-threaded
  instances lose only the time the loop took (+15 % for 4 clients of Sample n=4096 on 2 cores).
"""

from __future__ import annotations

import math

__all__ = [
    "COMPANY_MEMORY_S",
    "INLINE_RUN_S",
    "MIN_SHARED_ROWS",
    "DelayPolicy",
    "InlineChoice",
    "instance_share",
]

# How long after the last batch shared by several requests the queue delay is still spent.
COMPANY_MEMORY_S = 1.0
# Runs measured faster than this run on the event loop instead of a worker thread.
INLINE_RUN_S = 200e-6
# With several instances idle, queued rows are shared out in runs of at least this many
# (the last run takes what is left).
MIN_SHARED_ROWS = 64


class DelayPolicy:
    """How long the head of the queue may wait for batch-mates."""

    def __init__(self, max_queue_delay_ms: float, policy: str):
        self.delay_s = max_queue_delay_ms / 1000.0
        self._always = policy == "always"
        self._shared_at = -math.inf  # clock time of the last batch that held several requests

    def batch_taken(self, requests: int, now: float) -> None:
        if requests > 1:
            self._shared_at = now

    def worth_waiting(self, now: float) -> bool:
        """Whether company is likely: always, or a recent batch was shared."""
        return self._always or now - self._shared_at <= COMPANY_MEMORY_S

    def remaining_s(self, oldest_enqueued: float, now: float) -> float:
        """Seconds the oldest queued request may still wait (<= 0: close the batch now)."""
        return oldest_enqueued + self.delay_s - now


class InlineChoice:
    """Runs of a size measured to be tiny run on the event loop; the rest on a thread."""

    def __init__(self) -> None:
        # Last measured run time by rows.bit_length(): sizes within a factor of two alike.
        self._run_s: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        self._run_s[rows.bit_length()] = seconds

    def inline(self, rows: int) -> bool:
        return self._run_s.get(rows.bit_length(), math.inf) < INLINE_RUN_S


def instance_share(max_rows: int, queued_rows: int, idle: int) -> int:
    """Rows the next batch may take: with several instances idle, each takes a share."""
    if idle <= 1:
        return max_rows
    return min(max_rows, max(-(-queued_rows // idle), MIN_SHARED_ROWS))
