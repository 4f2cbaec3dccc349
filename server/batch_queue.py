"""The batcher's queue: requests in arrival order, taken out as row slices, rows routed back.

Rows in = rows out: a request larger than a batch is split across batches, several small
ones share one, and each request gets exactly its rows, in order (pytriton's invariant).
Requests whose caller left or whose deadline passed leave without being computed. Everything
here runs on the event loop; the queue itself never awaits.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Mapping

import numpy as np

from vaeserve.errors import DeadlineExceeded, NotServing

__all__ = ["Arrays", "QueuedRequest", "RequestQueue", "Slice", "gather", "join", "scatter"]

Arrays = dict[str, np.ndarray]


class QueuedRequest:
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

    def is_dead(self, now: float) -> bool:
        """The caller left, or the deadline passed: computing it would be wasted."""
        return self.future.done() or (self.deadline is not None and now >= self.deadline)

    def deliver(self, first: int, end: int, result: Arrays | BaseException) -> None:
        """Hand over the outputs of rows [first, end); complete the request once it is whole."""
        if self.future.done():
            return
        if isinstance(result, BaseException):
            self.future.set_exception(result)
            return
        self.pieces.append((first, result))
        self.done += end - first
        if self.done == self.rows:
            self.future.set_result(join(self.pieces))


# One slice of a request inside a batch: (request, first row, end row).
Slice = tuple[QueuedRequest, int, int]


class RequestQueue:
    """FIFO of requests, counted in requests (the queue bound) and in rows not yet taken."""

    def __init__(self, name: str, on_dequeue: Callable[[float], None]):
        """Args:
        name: for error messages (e.g. "digits/1/decoder").
        on_dequeue: told each request's time in the queue when it first leaves it.
        """
        self.name = name
        self.rows = 0  # rows not yet handed to a batch
        self.expired = 0  # dropped: deadline passed in the queue
        self.cancelled = 0  # dropped: the caller went away
        self.abandoned = 0  # callers that left since the last sweep; their entries may linger
        self._on_dequeue = on_dequeue
        self._requests: collections.deque[QueuedRequest] = collections.deque()

    def __len__(self) -> int:
        return len(self._requests)

    def oldest_enqueued(self) -> float:
        return self._requests[0].enqueued

    def append(self, request: QueuedRequest) -> None:
        self._requests.append(request)
        self.rows += request.rows

    def take(self, room: int, now: float) -> list[Slice]:
        """Up to ``room`` rows from the head of the queue, dropping dead requests."""
        batch: list[Slice] = []
        while self._requests and room:
            request = self._requests[0]
            if request.taken == 0:
                self._on_dequeue(now - request.enqueued)
            if request.is_dead(now):
                self._drop(self._requests.popleft())
                continue
            count = min(room, request.rows - request.taken)
            batch.append((request, request.taken, request.taken + count))
            request.taken += count
            self.rows -= count
            room -= count
            if request.taken == request.rows:
                self._requests.popleft()
        return batch

    def sweep(self, now: float) -> None:
        """Drop every queued request whose caller left or whose deadline passed.

        Dead requests otherwise leave only when a batch reaches them, and until then they
        hold queue slots: a full queue of callers that gave up would refuse live ones.
        """
        self.abandoned = 0
        alive: collections.deque[QueuedRequest] = collections.deque()
        for request in self._requests:
            if request.is_dead(now):
                if request.taken == 0:
                    self._on_dequeue(now - request.enqueued)
                self._drop(request)
            else:
                alive.append(request)
        self._requests = alive

    def fail_all(self) -> None:
        """Refuse every queued request: the batching task is gone."""
        while self._requests:
            request = self._requests.popleft()
            if not request.future.done():
                request.future.set_exception(NotServing(f"{self.name} stopped"))

    def _drop(self, request: QueuedRequest) -> None:
        self.rows -= request.rows - request.taken
        if request.future.cancelled():
            self.cancelled += 1
        elif not request.future.done():
            self.expired += 1
            request.future.set_exception(
                DeadlineExceeded(
                    f"{self.name}: the deadline passed while the request waited in the queue; "
                    "it was not computed"
                )
            )


def gather(batch: list[Slice]) -> dict[str, np.ndarray]:
    """The batch's inputs; a request that is a whole batch is passed on without a copy."""
    request, start, end = batch[0]
    if len(batch) == 1 and start == 0 and end == request.rows:
        return dict(request.inputs)
    names = request.inputs.keys()
    return {name: np.concatenate([r.inputs[name][s:e] for r, s, e in batch]) for name in names}


def scatter(outputs: Mapping[str, np.ndarray], batch: list[Slice]) -> list[Arrays]:
    """Per-slice views of the batch's outputs (no copies)."""
    pieces = []
    offset = 0
    for _, start, end in batch:
        count = end - start
        pieces.append({name: value[offset : offset + count] for name, value in outputs.items()})
        offset += count
    return pieces


def join(pieces: list[tuple[int, Arrays]]) -> Arrays:
    if len(pieces) == 1:
        return pieces[0][1]
    ordered = [outputs for _, outputs in sorted(pieces, key=lambda piece: piece[0])]
    return {name: np.concatenate([p[name] for p in ordered]) for name in ordered[0]}
