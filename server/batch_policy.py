"""The batcher's three measured choices (docs/performance.md): when a batch waits for company,
whether a run goes to a thread, and how idle instances share the queued rows.

- **Queue delay.** ``queue_delay_policy`` "always" waits up to the delay for every batch, as
  Triton does. "adaptive" (the default) never makes a request wait while a run could start
  now on an idle core, and otherwise only waits when waiting pays: company is likely (a
  batch of the last second was shared, and requests arrive less than the delay apart on
  average), the process is using every core (so the CPU a merged run saves goes to other
  calls), and the queued rows' measured run cost is mostly the per-run fixed cost (at most
  twice the smallest run's): merging two such runs saves about a run. It stops waiting once
  as many requests are queued as were ever waiting at once in the last second (nobody else
  is on the way). A lone caller never has company; 64-row requests gain ~10 % CPU from
  merging and would lose the idle instance's time (the 64 x 4 loss of docs/performance.md).
  Requests that arrive while a batch computes share the next batch either way.
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
import time

from vaeserve.server.settings import usable_cores

__all__ = [
    "COMPANY_MEMORY_S",
    "CpuLoad",
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
# Per-run fixed cost: a run of the queued rows measured within this factor of a 1-row run
# is mostly fixed cost, so merging it with a batch-mate saves about a run.
FIXED_COST_FACTOR = 2.0
# Run costs are moving averages with this weight on the newest run.
RUN_WEIGHT = 0.25
# The arrival gap is a moving average with this weight on the newest gap.
GAP_WEIGHT = 0.1
# How often the process's CPU use is re-read (seconds).
CPU_WINDOW_S = 0.02
# With several instances idle, queued rows are shared out in runs of at least this many
# (the last run takes what is left).
MIN_SHARED_ROWS = 64


class CpuLoad:
    """Cores' worth of CPU this process used over the last window, all threads together."""

    def __init__(self) -> None:
        self.cores = usable_cores()
        self._wall, self._cpu = time.monotonic(), time.process_time()
        self._busy = 0.0

    def saturated(self) -> bool:
        """Whether no core is left idle: the process used more than all cores but one."""
        wall = time.monotonic()
        if wall - self._wall >= CPU_WINDOW_S:
            cpu = time.process_time()
            self._busy = (cpu - self._cpu) / (wall - self._wall)
            self._wall, self._cpu = wall, cpu
        return self._busy > self.cores - 1


class DelayPolicy:
    """How long the head of the queue may wait for batch-mates."""

    def __init__(self, max_queue_delay_ms: float, policy: str):
        self.delay_s = max_queue_delay_ms / 1000.0
        self._always = policy == "always"
        self._shared_at = -math.inf  # clock time of the last batch that held several requests
        self._arrived_at = -math.inf
        self._gap_s = math.inf  # moving average of the time between arrivals
        self._cpu = CpuLoad()
        self._callers = 0  # callers waiting for their results: queued or computing
        self._peak = 0  # the most callers at once since _peak_since
        self._peak_since = -math.inf

    def caller_in(self, now: float) -> None:
        self._callers += 1
        if now - self._peak_since > COMPANY_MEMORY_S:  # a fresh window: forget old crowds
            self._peak, self._peak_since = self._callers, now
        else:
            self._peak = max(self._peak, self._callers)

    def caller_out(self) -> None:
        self._callers -= 1

    def everyone_queued(self, queued: int) -> bool:
        """Whether as many requests are queued as ever waited at once of late: under the
        adaptive policy a batch stops waiting then, since nobody else is on the way (a closed
        loop of C clients sends at most C at once)."""
        return not self._always and queued >= self._peak

    def arrived(self, now: float) -> None:
        gap = now - self._arrived_at
        self._arrived_at = now
        if gap > COMPANY_MEMORY_S:
            self._gap_s = math.inf  # a quiet spell: the old rate says nothing
        elif self._gap_s == math.inf:
            self._gap_s = gap
        else:
            self._gap_s += GAP_WEIGHT * (gap - self._gap_s)

    def batch_taken(self, requests: int, now: float) -> None:
        if requests > 1:
            self._shared_at = now

    def lone(self, now: float) -> bool:
        """No company of late: a request may skip the queue (the batcher's fast path)."""
        return not self._always and now - self._shared_at > COMPANY_MEMORY_S

    def worth_waiting(self, now: float, run_s: float, fixed_s: float) -> bool:
        """Whether the head of the queue should wait for company (see the module docstring).

        Args:
            run_s: the measured cost of a run of the queued rows (inf: not measured).
            fixed_s: the per-run fixed cost, as measured (inf: not measured).
        """
        if self._always:
            return True
        if self.lone(now) or self._gap_s >= self.delay_s:
            return False
        if run_s != math.inf and fixed_s != math.inf and run_s > FIXED_COST_FACTOR * fixed_s:
            return False
        return self._cpu.saturated()

    def remaining_s(self, oldest_enqueued: float, now: float) -> float:
        """Seconds the oldest queued request may still wait (<= 0: close the batch now)."""
        return oldest_enqueued + self.delay_s - now


class InlineChoice:
    """Runs of a size measured to be tiny run on the event loop; the rest on a thread."""

    def __init__(self) -> None:
        # Measured run time by rows.bit_length(): sizes within a factor of two alike.
        self._run_s: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        # A moving average: on shared cores one preempted run would otherwise send its size
        # to the threads (or make it look costly) until the next run of that size.
        key = rows.bit_length()
        old = self._run_s.get(key)
        self._run_s[key] = seconds if old is None else old + RUN_WEIGHT * (seconds - old)

    def inline(self, rows: int) -> bool:
        return self.run_s(rows) < INLINE_RUN_S

    def run_s(self, rows: int) -> float:
        """The measured cost of a run of about ``rows`` rows (inf: never measured)."""
        return self._run_s.get(rows.bit_length(), math.inf)

    def fixed_s(self) -> float:
        """The per-run fixed cost, bounded by the smallest size measured (inf: none yet)."""
        return self._run_s[min(self._run_s)] if self._run_s else math.inf


def instance_share(max_rows: int, queued_rows: int, idle: int) -> int:
    """Rows the next batch may take: with several instances idle, each takes a share."""
    if idle <= 1:
        return max_rows
    return min(max_rows, max(-(-queued_rows // idle), MIN_SHARED_ROWS))
