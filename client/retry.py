"""Retries with exponential backoff and full jitter, for UNAVAILABLE and RESOURCE_EXHAUSTED only.

Every other status fails fast: INVALID_ARGUMENT or NOT_FOUND will not change by waiting, and
DEADLINE_EXCEEDED means the caller's own budget is spent. A call that fails for good raises
the ``vaeserve.errors`` class of its status (``typed_error``), carrying the gRPC status code
and the server's message.

The rules are written once: ``Retrier`` decides whether and how long to wait, and only the
sleep differs between the blocking client (``call_with_retry``, ``Retrier.wait_or_raise``) and
the asyncio one (``call_with_retry_async``, ``Retrier.wait_or_raise_async``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from vaeserve.errors import VaeServeError, error_for_status

__all__ = [
    "RETRYABLE_CODES",
    "RetryPolicy",
    "Retrier",
    "call_with_retry",
    "call_with_retry_async",
    "is_retryable",
    "typed_error",
]

log = logging.getLogger(__name__)

# A restarting server (UNAVAILABLE) or a full queue (RESOURCE_EXHAUSTED) are worth waiting for.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry a call that failed with a retryable status.

    The n-th wait (n = 0, 1, ...) is drawn uniformly from [0, min(max_backoff_s,
    initial_backoff_s * multiplier**n)] ("full jitter"), so clients that failed together do not
    come back together.
    """

    max_attempts: int | None = 10  # attempts in all, the first included; None: until deadline
    initial_backoff_s: float = 0.1
    multiplier: float = 2.0
    max_backoff_s: float = 5.0
    deadline_s: float = 60.0  # overall, across attempts and waits

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts: expected an integer >= 1, got {self.max_attempts}")
        for name in ("initial_backoff_s", "max_backoff_s", "deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")
        if not self.multiplier >= 1:
            raise ValueError(f"multiplier: expected a number >= 1, got {self.multiplier}")

    def backoff_s(self, retry: int, rng: random.Random | None = None) -> float:
        """The wait before retry number ``retry`` (0-based), with full jitter."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return (rng or random).uniform(0.0, cap)


def typed_error(exc: grpc.RpcError) -> VaeServeError:
    """The ``vaeserve.errors`` class of a failed call's status, with ``code`` (the
    ``grpc.StatusCode``) and the server's message."""
    code = exc.code()
    error = error_for_status(code.name, exc.details() or code.name)
    error.code = code
    return error


def is_retryable(exc: BaseException) -> bool:
    """True for a gRPC error whose status is worth retrying."""
    return isinstance(exc, grpc.RpcError) and exc.code() in RETRYABLE_CODES


class Retrier:
    """The retry state of one logical call: attempts made and the overall deadline.

    A stream that made progress calls ``progress()``: the budget is for consecutive failures,
    so a long job that survives several server restarts is not charged for all of them at once.
    """

    def __init__(self, policy: RetryPolicy, what: str = "call"):
        self.policy = policy
        self.what = what
        self.progress()

    def progress(self) -> None:
        """Start the budget afresh (after an attempt that got somewhere)."""
        self._retry = 0
        self._give_up_at = time.monotonic() + self.policy.deadline_s

    def attempt_timeout(self, timeout_s: float | None) -> float:
        """The deadline of the next attempt: ``timeout_s`` cut to what is left overall."""
        left = max(self._give_up_at - time.monotonic(), 0.001)
        return left if timeout_s is None else min(timeout_s, left)

    def backoff_or_raise(self, exc: grpc.RpcError) -> float:
        """The wait before the next attempt (counted as a retry), or ``exc``'s typed error
        when it is final. Sleeping is the caller's: ``time.sleep`` or ``asyncio.sleep``.

        Raises:
            VaeServeError: the class of ``exc``'s status, when it is not retryable or the
                policy is spent.
        """
        attempts = self.policy.max_attempts
        if not is_retryable(exc) or (attempts is not None and self._retry + 1 >= attempts):
            raise typed_error(exc) from exc
        wait = self.policy.backoff_s(self._retry)
        if time.monotonic() + wait >= self._give_up_at:
            raise typed_error(exc) from exc
        self._retry += 1
        log.warning(
            "%s failed with %s (%s); retry %d in %.2fs",
            self.what,
            exc.code().name,
            exc.details(),
            self._retry,
            wait,
        )
        return wait

    def wait_or_raise(self, exc: grpc.RpcError) -> None:
        """Sleep before the next attempt, or raise as ``backoff_or_raise``."""
        time.sleep(self.backoff_or_raise(exc))

    async def wait_or_raise_async(self, exc: grpc.RpcError) -> None:
        """``wait_or_raise`` for asyncio: the event loop runs on while it waits."""
        await asyncio.sleep(self.backoff_or_raise(exc))


def call_with_retry(
    attempt: Callable[[float], T],
    policy: RetryPolicy,
    timeout_s: float | None,
    what: str = "call",
) -> T:
    """Run ``attempt(timeout)`` until it succeeds, fails for good, or the policy runs out.

    Args:
        attempt: makes one call; receives the deadline in seconds that attempt may use.
        policy: the retry policy.
        timeout_s: the per-attempt deadline, or None for none beyond the overall deadline.
        what: a name for log messages.

    Returns:
        What the first successful attempt returned.

    Raises:
        VaeServeError: the last error's class, when it is not retryable or the policy is spent.
    """
    retrier = Retrier(policy, what)
    while True:
        try:
            return attempt(retrier.attempt_timeout(timeout_s))
        except grpc.RpcError as exc:
            retrier.wait_or_raise(exc)


async def call_with_retry_async(
    attempt: Callable[[float], Awaitable[T]],
    policy: RetryPolicy,
    timeout_s: float | None,
    what: str = "call",
) -> T:
    """``call_with_retry`` for asyncio: ``attempt(timeout)`` is awaited, waits are
    ``asyncio.sleep``. Cancelling the task cancels the attempt or the wait under way."""
    retrier = Retrier(policy, what)
    while True:
        try:
            return await attempt(retrier.attempt_timeout(timeout_s))
        except grpc.RpcError as exc:
            await retrier.wait_or_raise_async(exc)
