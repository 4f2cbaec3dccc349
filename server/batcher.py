"""DynamicBatcher: queued requests → one batched run on a worker thread → rows routed back.

Requests queue in arrival order (server/batch_queue.py). A batch closes when it holds
``max_batch_size`` rows or when its oldest request has waited ``max_queue_delay_ms``; a request
larger than a batch is split across batches, and several small ones share one. Requests whose
client cancelled or whose deadline passed leave the queue without being computed. If a batched
run fails, each request of that batch is run alone, so one bad request never fails its
batch-mates. When to wait, where to run and how instances share rows are measured choices,
kept in server/batch_policy.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vaeserve.errors import NotServing, QueueFull
from vaeserve.server.batch_policy import DelayPolicy, InlineChoice, instance_share
from vaeserve.server.batch_queue import Arrays, QueuedRequest, RequestQueue, Slice, gather, scatter
from vaeserve.server.settings import BatchingSettings

__all__ = ["Runner", "BatchObserver", "BatchStats", "DynamicBatcher", "THREAD_PREFIX"]

logger = logging.getLogger(__name__)

THREAD_PREFIX = "vaeserve-batcher"


class Runner(Protocol):
    """What a batcher runs: a batch of named arrays in, named arrays with the same rows out.

    A runner may also offer ``run_small(inputs)``, the same computation tuned for the small
    batches that run on the event loop (OnnxRunner: a single-threaded session); the batcher
    uses it for those when present.
    """

    def run(self, inputs: Mapping[str, np.ndarray]) -> Arrays: ...


class BatchObserver(Protocol):
    """Told what a batcher does, as it happens (server/metrics.py counts it); must be cheap."""

    def on_dequeue(self, queue_s: float) -> None:
        """A request left the queue: for its first batch, or dropped before compute."""

    def on_batch(self, rows: int, compute_s: float) -> None:
        """One batched run of ``rows`` rows took ``compute_s`` seconds."""

    def on_request(self, total_s: float, ok: bool) -> None:
        """A request got its result (``ok``) or its error, ``total_s`` after ``run`` began."""


class _Unobserved:
    def on_dequeue(self, queue_s: float) -> None:
        pass

    def on_batch(self, rows: int, compute_s: float) -> None:
        pass

    def on_request(self, total_s: float, ok: bool) -> None:
        pass


@dataclass
class BatchStats:
    """Counters of one batcher, for tests, logs and (later) metrics."""

    batches: int = 0
    rows: int = 0
    expired: int = 0  # dropped before compute: deadline passed in the queue
    cancelled: int = 0  # dropped before compute: the caller went away
    failed_runs: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)  # rows
    requests_per_batch: collections.Counter[int] = field(default_factory=collections.Counter)
    inline_runs: int = 0  # batches run on the event loop rather than a worker thread


class DynamicBatcher:
    """Merges and splits concurrent requests into runs of at most ``max_batch_size`` rows.

    Use from one asyncio event loop: ``await start()``, ``await run(inputs)``, ``await stop()``.
    """

    def __init__(
        self,
        runner: Runner,
        settings: BatchingSettings,
        name: str = "graph",
        clock: Callable[[], float] = time.monotonic,
        observer: BatchObserver | None = None,
    ):
        """Args:
        runner: does the work; called on the batcher's worker thread only.
        name: for logs, errors and the worker thread's name (e.g. "digits/1/decoder").
        clock: monotonic seconds; deadlines passed to ``run`` are on this clock.
        observer: told of every dequeue, batched run and result (metrics).
        """
        self.name = name
        self._stats = BatchStats()
        self._runner = runner
        self._run_small = getattr(runner, "run_small", runner.run)  # see Runner
        self._max_rows = settings.max_batch_size
        self._max_queue = settings.max_queue_size
        self._clock = clock
        self._observer: BatchObserver = observer or _Unobserved()
        self._queue = RequestQueue(name, self._observer.on_dequeue)
        self._delay = DelayPolicy(settings.max_queue_delay_ms, settings.queue_delay_policy)
        self._inline = InlineChoice()
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_for_work = False
        self._waiting_for_company = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._instances = settings.instances or 1  # 0 (auto) is resolved by the registry
        self._running: set[asyncio.Future] = set()  # runs in flight on the worker threads
        self._executor = ThreadPoolExecutor(
            self._instances, thread_name_prefix=f"{THREAD_PREFIX}-{name}"
        )

    async def start(self) -> None:
        """Start the worker thread and the batching task on the running loop.

        Never suspends: a caller that starts batchers and registers them in one step cannot
        be cancelled in between (which would leave a thread nobody stops).
        """
        self._executor.submit(lambda: None)  # the pool starts its thread inside submit
        self._task = asyncio.get_running_loop().create_task(self._serve(), name=self.name)

    async def stop(self) -> None:
        """Refuse new requests, finish every queued one, then end the worker thread."""
        self._stopping = True
        self._notify()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    @property
    def stats(self) -> BatchStats:
        self._stats.expired, self._stats.cancelled = self._queue.expired, self._queue.cancelled
        return self._stats

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def instances(self) -> int:
        """Runs this batcher keeps in flight at most."""
        return self._instances

    async def run(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None) -> Arrays:
        """Compute ``inputs`` (all with the same number of rows, >= 1) as part of some batches.

        Args:
            deadline: on the batcher's clock; past it the request is dropped, not computed.

        Returns:
            The runner's outputs for exactly these rows, in order.

        Raises:
            QueueFull: ``max_queue_size`` requests are already waiting.
            NotServing: the batcher is stopping.
            DeadlineExceeded: the deadline passed before the request reached a batch.
        """
        queue = self._queue
        if len(queue) >= self._max_queue and queue.abandoned and not self._stopping:
            queue.sweep(self._clock())
        if self._stopping or len(queue) >= self._max_queue:
            self._observer.on_request(0.0, ok=False)
            if self._stopping:
                raise NotServing(f"{self.name} is shutting down; retry on another replica")
            raise QueueFull(
                f"{self.name}: {self._max_queue} requests are already queued "
                "(max_queue_size); retry with backoff"
            )
        rows = len(next(iter(inputs.values())))
        assert rows > 0, "requests are validated to hold at least one row"
        enqueued = self._clock()
        self._delay.arrived(enqueued)
        loop = asyncio.get_running_loop()
        if (
            self._waiting_for_work
            and not queue
            and self._inline.inline(rows)
            and len(self._running) < self._instances
            and self._delay.lone(enqueued)
            and (deadline is None or enqueued < deadline)
            and not getattr(loop, "_ready", True)
        ):
            return self._run_alone(inputs, rows, enqueued)
        future: asyncio.Future[Arrays] = loop.create_future()
        queue.append(QueuedRequest(inputs, rows, deadline, enqueued, future))
        delay = self._delay
        delay.caller_in(enqueued)
        if (
            self._waiting_for_work
            or queue.rows >= self._max_rows
            or (self._waiting_for_company and delay.everyone_queued(len(queue)))
        ):
            self._notify()
        try:
            result = await future
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                queue.abandoned += 1
            self._observer.on_request(self._clock() - enqueued, ok=False)
            raise
        finally:
            delay.caller_out()
        self._observer.on_request(self._clock() - enqueued, ok=True)
        return result

    def _run_alone(self, inputs: Mapping[str, np.ndarray], rows: int, enqueued: float) -> Arrays:
        """The fast path of a lone small request: run it here and now. The queue, the future,
        the batching task's wake-up and the hand-back cost more than the run; the stats, the
        observer's events and the errors are the queued path's.

        Lone means: nothing queued, the batching task idle, an instance free, no shared batch
        of late, a run measured to be tiny, and nothing else ready to run on the event loop.
        The last one matters: gRPC hands a burst of calls to the loop at once, and each would
        find the queue empty, run alone and never share; a burst shows as handlers waiting in
        asyncio's ready queue (``loop._ready``; a loop without one never takes this path)."""
        observer, stats = self._observer, self._stats
        observer.on_dequeue(0.0)
        self._count_batch(rows, 1, inline=True)
        start = time.perf_counter()
        try:
            outputs = self._run_small(dict(inputs))
        except Exception:
            stats.failed_runs += 1
            observer.on_batch(rows, time.perf_counter() - start)
            observer.on_request(self._clock() - enqueued, ok=False)
            raise
        elapsed = time.perf_counter() - start
        self._inline.record(rows, elapsed)
        observer.on_batch(rows, elapsed)
        observer.on_request(self._clock() - enqueued, ok=True)
        return dict(outputs)

    # --- the batching task (event loop) ---

    async def _serve(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._stopping:
                        break
                    self._waiting_for_work = True
                    await self._sleep(None)
                    self._waiting_for_work = False
                    continue
                if len(self._running) >= self._instances:
                    await self._sleep(None)  # a finished run wakes this
                    continue
                await self._wait_for_company()
                now = self._clock()
                room = instance_share(
                    self._max_rows, self._queue.rows, self._instances - len(self._running)
                )
                batch = self._queue.take(room, now)
                self._delay.batch_taken(len(batch), now)
                if batch:
                    await self._execute(batch)
            if self._running:
                await asyncio.wait(self._running)
        except BaseException as exc:
            logger.error("%s: batching task ended unexpectedly", self.name, exc_info=exc)
            self._queue.fail_all()
            raise

    async def _wait_for_company(self) -> None:
        inline = self._inline
        if not self._delay.worth_waiting(
            self._clock(), inline.run_s(self._queue.rows), inline.fixed_s()
        ):
            return
        # A sweep may empty the queue while this waits.
        queue, delay = self._queue, self._delay
        self._waiting_for_company = True
        try:
            while queue and queue.rows < self._max_rows and not self._stopping:
                if delay.everyone_queued(len(queue)):
                    return
                remaining = delay.remaining_s(queue.oldest_enqueued(), self._clock())
                if remaining <= 0:
                    return
                await self._sleep(remaining)
        finally:
            self._waiting_for_company = False

    async def _sleep(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self._notify)
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _notify(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _execute(self, batch: list[Slice]) -> None:
        """Run ``batch`` on the event loop (then yield), or start it on a worker thread."""
        rows = sum(end - start for _, start, end in batch)
        inline = self._inline.inline(rows)
        self._count_batch(rows, len(batch), inline)
        start = time.perf_counter()
        if inline:
            self._deliver(batch, self._compute(batch, small=True), rows, start)
            # Give the loop a turn before the next batch: answers go out and new calls come
            # in (and fill the queue, so its bound still refuses an overload).
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        run = loop.run_in_executor(self._executor, self._compute, batch, self._instances > 1)
        self._running.add(run)

        def finished(run: asyncio.Future[list[Arrays | BaseException]]) -> None:
            self._running.discard(run)
            self._notify()
            error = run.exception()  # _compute turns runner errors into results: a bug
            if error is not None:
                logger.error("%s: a batched run failed unexpectedly", self.name, exc_info=error)
            results = [error] * len(batch) if error is not None else run.result()
            self._deliver(batch, results, rows, start)

        run.add_done_callback(finished)

    def _count_batch(self, rows: int, requests: int, inline: bool) -> None:
        """A batch's place in the stats, queued or on the fast path alike."""
        stats = self._stats
        stats.batches += 1
        stats.rows += rows
        stats.batch_sizes[rows] += 1
        stats.requests_per_batch[requests] += 1
        stats.inline_runs += inline

    def _deliver(
        self, batch: list[Slice], results: list[Arrays | BaseException], rows: int, start: float
    ) -> None:
        """Hand each slice's outputs to its request."""
        self._observer.on_batch(rows, time.perf_counter() - start)
        for (request, first, end), result in zip(batch, results, strict=True):
            request.deliver(first, end, result)

    # --- the worker thread ---

    def _compute(self, batch: list[Slice], small: bool = False) -> list[Arrays | BaseException]:
        """Run one batch; on failure run each slice alone so only the culprit fails."""
        run = self._run_small if small else self._runner.run
        try:
            inputs = gather(batch)
            start = time.perf_counter()
            outputs = run(inputs)
            rows = len(next(iter(inputs.values())))
            self._inline.record(rows, time.perf_counter() - start)
        except Exception as exc:
            self._stats.failed_runs += 1
            if len(batch) == 1:
                return [exc]
            logger.warning(
                "%s: a run of %d requests failed (%r); running each alone",
                self.name,
                len(batch),
                exc,
            )
            return [self._compute_alone(run, piece) for piece in batch]
        return scatter(outputs, batch)

    def _compute_alone(self, run: Callable[..., Arrays], piece: Slice) -> Arrays | BaseException:
        try:
            return run(gather([piece]))
        except Exception as exc:
            self._stats.failed_runs += 1
            return exc
