"""DynamicBatcher: queued requests → one batched run on a worker thread → rows routed back.

Requests queue in arrival order. A batch closes when it holds ``max_batch_size`` rows or
when its oldest request has waited ``max_queue_delay_ms``; a request larger than a batch is
split across batches, and several small ones share one. Rows in = rows out: each request
gets exactly its rows, in order (pytriton's invariant). Requests whose client cancelled or
whose deadline passed leave the queue without being computed. If a batched run fails, each
request of that batch is run alone, so one bad request never fails its batch-mates.

Two measured choices (docs/performance.md) keep a lone caller's latency low:
- The queue delay is only spent when it can buy company: while batches recently held more
  than one request (``queue_delay_policy`` "adaptive", the default; "always" waits for every
  batch, as Triton does). A lone closed-loop caller never has company, so waiting would only
  add the delay to every call; its first batch-mate turns the wait back on. Requests that
  arrive while a batch computes share the next batch either way.
- A run goes to one of the batcher's threads (onnxruntime releases the GIL, so the event
  loop keeps accepting calls meanwhile), unless runs of that size have been measured to take
  less than ``INLINE_RUN_S``: then it runs on the event loop itself, because handing it to a
  thread and back costs more CPU and latency than the run.

With ``instances`` > 1, that many runs are in flight at once, each single-threaded (the
runner's ``run_small``), and idle instances share the queued rows out. One multi-threaded run
waits at every operator for its slowest thread, so whenever the event loop takes a core to
serialize an answer, the run's other thread idles; single-threaded instances lose only the
time the loop took (docs/performance.md: +15 % for 4 clients of Sample n=4096 on 2 cores).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vaeserve.errors import DeadlineExceeded, NotServing, QueueFull
from vaeserve.server.settings import BatchingSettings

__all__ = [
    "Runner",
    "BatchObserver",
    "BatchStats",
    "DynamicBatcher",
    "THREAD_PREFIX",
    "COMPANY_MEMORY_S",
    "INLINE_RUN_S",
    "MIN_SHARED_ROWS",
]

logger = logging.getLogger(__name__)

THREAD_PREFIX = "vaeserve-batcher"
Arrays = dict[str, np.ndarray]
# How long after the last batch shared by several requests the queue delay is still spent.
COMPANY_MEMORY_S = 1.0
# Runs measured faster than this go on the event loop (a thread hand-off costs ~0.1-0.2 ms).
INLINE_RUN_S = 200e-6
# With several instances idle, queued rows are shared out in runs of at least this many
# (the last run takes what is left).
MIN_SHARED_ROWS = 64


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


class _Request:
    __slots__ = ("inputs", "rows", "deadline", "enqueued", "future", "taken", "done", "pieces")

    def __init__(
        self,
        inputs: Mapping[str, np.ndarray],
        rows: int,
        deadline: float | None,
        enqueued: float,
        future: asyncio.Future[Arrays],
    ):
        self.inputs = inputs
        self.rows = rows
        self.deadline = deadline
        self.enqueued = enqueued
        self.future = future
        self.taken = 0  # rows handed to a batch so far
        self.done = 0  # rows computed so far
        self.pieces: list[tuple[int, Arrays]] = []  # (first row, outputs): in any order


# One slice of a request inside a batch: (request, first row, end row).
_Slice = tuple[_Request, int, int]


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
        self.stats = BatchStats()
        self._runner = runner
        self._run_small = getattr(runner, "run_small", runner.run)  # see Runner
        self._max_rows = settings.max_batch_size
        self._delay_s = settings.max_queue_delay_ms / 1000.0
        self._max_queue = settings.max_queue_size
        self._clock = clock
        self._observer: BatchObserver = observer or _Unobserved()
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0  # rows not yet handed to a batch
        self._abandoned = 0  # callers that left since the last sweep; their entries may linger
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_for_work = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._instances = settings.instances or 1  # 0 (auto) is resolved by the registry
        self._running: set[asyncio.Future] = set()  # runs in flight on the worker threads
        self._executor = ThreadPoolExecutor(
            self._instances, thread_name_prefix=f"{THREAD_PREFIX}-{name}"
        )
        self._shared_at = -math.inf  # clock time of the last batch that held several requests
        self._always_wait = settings.queue_delay_policy == "always"
        # Last measured run time by rows.bit_length(): the inline/thread choice per size.
        self._run_s: dict[int, float] = {}

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
        if len(self._queue) >= self._max_queue and self._abandoned and not self._stopping:
            self._sweep()
        if self._stopping or len(self._queue) >= self._max_queue:
            self._observer.on_request(0.0, ok=False)
            if self._stopping:
                raise NotServing(f"{self.name} is shutting down; retry on another replica")
            raise QueueFull(
                f"{self.name}: {self._max_queue} requests are already queued "
                "(max_queue_size); retry with backoff"
            )
        rows = len(next(iter(inputs.values())))
        assert rows > 0, "requests are validated to hold at least one row"
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        enqueued = self._clock()
        self._queue.append(_Request(inputs, rows, deadline, enqueued, future))
        self._queued_rows += rows
        if self._waiting_for_work or self._queued_rows >= self._max_rows:
            self._notify()
        try:
            result = await future
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                self._abandoned += 1
            self._observer.on_request(self._clock() - enqueued, ok=False)
            raise
        self._observer.on_request(self._clock() - enqueued, ok=True)
        return result

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
                batch = self._take()
                if batch:
                    await self._execute(batch)
            if self._running:
                await asyncio.wait(self._running)
        except BaseException as exc:
            self._fail_all(exc)
            raise

    async def _wait_for_company(self) -> None:
        if not self._always_wait and self._clock() - self._shared_at > COMPANY_MEMORY_S:
            return
        # A sweep may empty the queue while this waits.
        while self._queue and self._queued_rows < self._max_rows and not self._stopping:
            remaining = self._queue[0].enqueued + self._delay_s - self._clock()
            if remaining <= 0:
                return
            await self._sleep(remaining)

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

    def _take(self) -> list[_Slice]:
        """Up to max_batch_size rows from the head of the queue, dropping dead requests."""
        batch: list[_Slice] = []
        room = self._max_rows
        idle = self._instances - len(self._running)
        if idle > 1:
            # Rows enough for every idle instance: each takes a share, in parallel.
            share = max(-(-self._queued_rows // idle), MIN_SHARED_ROWS)
            room = min(room, share)
        now = self._clock()
        while self._queue and room:
            request = self._queue[0]
            if request.taken == 0:
                self._observer.on_dequeue(now - request.enqueued)
            if request.future.done() or (request.deadline is not None and now >= request.deadline):
                self._drop(self._queue.popleft())
                continue
            count = min(room, request.rows - request.taken)
            batch.append((request, request.taken, request.taken + count))
            request.taken += count
            self._queued_rows -= count
            room -= count
            if request.taken == request.rows:
                self._queue.popleft()
        if len(batch) > 1:
            self._shared_at = now
        return batch

    def _sweep(self) -> None:
        """Drop every queued request whose caller left or whose deadline passed.

        Dead requests otherwise leave only when a batch reaches them, and until then they
        hold queue slots: a full queue of callers that gave up would refuse live ones.
        """
        self._abandoned = 0
        now = self._clock()
        alive: collections.deque[_Request] = collections.deque()
        for request in self._queue:
            if request.future.done() or (request.deadline is not None and now >= request.deadline):
                if request.taken == 0:
                    self._observer.on_dequeue(now - request.enqueued)
                self._drop(request)
            else:
                alive.append(request)
        self._queue = alive

    def _drop(self, request: _Request) -> None:
        self._queued_rows -= request.rows - request.taken
        if request.future.cancelled():
            self.stats.cancelled += 1
        elif not request.future.done():
            self.stats.expired += 1
            request.future.set_exception(
                DeadlineExceeded(
                    f"{self.name}: the deadline passed while the request waited in the queue; "
                    "it was not computed"
                )
            )

    async def _execute(self, batch: list[_Slice]) -> None:
        """Run ``batch`` on the event loop (then yield), or start it on a worker thread."""
        rows = sum(end - start for _, start, end in batch)
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.batch_sizes[rows] += 1
        self.stats.requests_per_batch[len(batch)] += 1
        start = time.perf_counter()
        if self._run_s.get(rows.bit_length(), math.inf) < INLINE_RUN_S:
            self.stats.inline_runs += 1
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

    def _deliver(
        self, batch: list[_Slice], results: list[Arrays | BaseException], rows: int, start: float
    ) -> None:
        """Hand each slice's outputs to its request; complete the requests now whole."""
        self._observer.on_batch(rows, time.perf_counter() - start)
        for (request, first, end), result in zip(batch, results, strict=True):
            if request.future.done():
                continue
            if isinstance(result, BaseException):
                request.future.set_exception(result)
                continue
            request.pieces.append((first, result))
            request.done += end - first
            if request.done == request.rows:
                request.future.set_result(_join(request.pieces))

    def _fail_all(self, exc: BaseException) -> None:
        logger.error("%s: batching task ended unexpectedly", self.name, exc_info=exc)
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(NotServing(f"{self.name} stopped"))

    # --- the worker thread ---

    def _compute(self, batch: list[_Slice], small: bool = False) -> list[Arrays | BaseException]:
        """Run one batch; on failure run each slice alone so only the culprit fails."""
        run = self._run_small if small else self._runner.run
        try:
            inputs = _gather(batch)
            start = time.perf_counter()
            outputs = run(inputs)
            rows = len(next(iter(inputs.values())))
            self._run_s[rows.bit_length()] = time.perf_counter() - start
        except Exception as exc:
            self.stats.failed_runs += 1
            if len(batch) == 1:
                return [exc]
            logger.warning(
                "%s: a run of %d requests failed (%r); running each alone",
                self.name,
                len(batch),
                exc,
            )
            return [self._compute_alone(run, piece) for piece in batch]
        return _scatter(outputs, batch)

    def _compute_alone(self, run: Callable[..., Arrays], piece: _Slice) -> Arrays | BaseException:
        try:
            return run(_gather([piece]))
        except Exception as exc:
            self.stats.failed_runs += 1
            return exc


def _gather(batch: list[_Slice]) -> dict[str, np.ndarray]:
    """The batch's inputs; a request that is a whole batch is passed on without a copy."""
    request, start, end = batch[0]
    if len(batch) == 1 and start == 0 and end == request.rows:
        return dict(request.inputs)
    names = request.inputs.keys()
    return {name: np.concatenate([r.inputs[name][s:e] for r, s, e in batch]) for name in names}


def _scatter(outputs: Mapping[str, np.ndarray], batch: list[_Slice]) -> list[Arrays]:
    """Per-slice views of the batch's outputs (no copies)."""
    pieces = []
    offset = 0
    for _, start, end in batch:
        count = end - start
        pieces.append({name: value[offset : offset + count] for name, value in outputs.items()})
        offset += count
    return pieces


def _join(pieces: list[tuple[int, Arrays]]) -> Arrays:
    if len(pieces) == 1:
        return pieces[0][1]
    ordered = [outputs for _, outputs in sorted(pieces, key=lambda piece: piece[0])]
    return {name: np.concatenate([p[name] for p in ordered]) for name in ordered[0]}
