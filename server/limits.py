"""RequestLimits: the server-wide bounds that keep one caller from taking the server from others.

An interceptor inside the token check (a caller without the token never gets here, and its
body is never parsed). For every call, of every service (health and reflection included):

- **Size by method.** Only the methods whose requests carry tensors (``TENSOR_METHODS``:
  Encode, Decode, Reconstruct, Score, ModelInfer) may send up to ``max_message_bytes``; every
  other request is tiny and is refused RESOURCE_EXHAUSTED past ``max_small_request_bytes``,
  before it is parsed.
  gRPC checks ``max_message_bytes`` on the decompressed size, while it inflates.
- **Calls and request bytes in flight.** Past ``max_inflight_calls`` calls, or
  ``max_inflight_request_bytes`` of request bodies held by calls in progress, a new call is
  refused RESOURCE_EXHAUSTED at once.
- **Streams a client does not read.** A streamed answer is written with a stall timeout: a
  client that reads nothing for ``stream_stall_timeout_s`` is cut off (RESOURCE_EXHAUSTED,
  which it receives after what it had not read), and
  answers written but not yet taken by clients are bounded in all by
  ``max_pending_answer_bytes`` (RESOURCE_EXHAUSTED for the stream that would pass it).

Connection-level bounds (concurrent streams per connection, pings, idle and maximum age) are
gRPC channel options, set in server/app.py from the same settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from vaeserve.proto.inference import grpc_service_pb2 as oip_pb
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.server.handlers import WrappedHandlers, rewrapped, tensor_methods
from vaeserve.server.settings import ServerSettings

__all__ = ["TENSOR_METHODS", "RequestLimits", "connection_options"]

logger = logging.getLogger(__name__)

# The methods whose requests carry tensors, by full method name; every other request is small.
TENSOR_METHODS = tensor_methods(
    [pb.DESCRIPTOR.services_by_name["VaeService"],
     oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]]
)  # fmt: skip


class _Refused:
    """Stands in for a request refused before it was parsed (too large, or over a bound)."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


# The request bytes of the call in progress: set by its parser, read by its behavior. grpc.aio
# runs both in the call's own task (so in its own context), which lets one wrapped handler per
# method serve every call instead of a handler and closures built per call.
_REQUEST_BYTES: contextvars.ContextVar[int] = contextvars.ContextVar("request_bytes", default=0)


class RequestLimits(grpc.aio.ServerInterceptor):
    """Applies the bounds of ``settings`` to every call (see the module's docstring)."""

    def __init__(self, settings: ServerSettings):
        self._settings = settings
        self.inflight_calls = 0
        self.inflight_request_bytes = 0
        self.pending_answer_bytes = 0
        self._wrapped = WrappedHandlers(self._wrap)

    def calls_refusal(self) -> str | None:
        """Why one more call is refused now (None: it is not), in the words of both
        transports."""
        s = self._settings
        if self.inflight_calls >= s.max_inflight_calls:
            return (
                f"the server has {self.inflight_calls} calls in progress "
                f"(max_inflight_calls {s.max_inflight_calls}); retry with backoff"
            )
        return None

    def bytes_refusal(self, adding: int) -> str | None:
        """Why holding ``adding`` more bytes of requests is refused now (None: it is not)."""
        s = self._settings
        if self.inflight_request_bytes + adding > s.max_inflight_request_bytes:
            return (
                f"the server holds {self.inflight_request_bytes} bytes of requests in "
                f"progress (max_inflight_request_bytes {s.max_inflight_request_bytes}); "
                "retry with backoff"
            )
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._wrapped.get(handler, handler_call_details.method or "")

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        s = self._settings
        cap = s.max_message_bytes if method in TENSOR_METHODS else s.max_small_request_bytes
        if handler.request_streaming:  # reflection: a size bound only
            keep = lambda behavior: behavior  # noqa: E731
            return rewrapped(handler, keep, keep, _size_bounded(handler.request_deserializer, cap))
        return rewrapped(
            handler,
            self._unary,
            self._streaming,
            self._admitting(handler.request_deserializer, cap),
        )

    def _admitting(
        self, deserialize: Callable[[bytes], Any] | None, cap: int
    ) -> Callable[[bytes], Any]:
        """The request parser, behind the size bound and the in-flight bounds."""

        def parse(data: bytes) -> Any:
            if len(data) > cap:
                return _Refused(
                    f"the request is {len(data)} bytes, over this method's limit of {cap} bytes"
                )
            refusal = self.calls_refusal() or self.bytes_refusal(len(data))
            if refusal is not None:
                return _Refused(refusal)
            _REQUEST_BYTES.set(len(data))
            return data if deserialize is None else deserialize(data)

        return parse

    # The counts move only in the behaviors, whose finally always runs: a call that ends
    # before its behavior starts (cancelled while arriving) never entered them.
    def _enter(self) -> int:
        request_bytes = _REQUEST_BYTES.get()
        self.inflight_calls += 1
        self.inflight_request_bytes += request_bytes
        return request_bytes

    def _leave(self, request_bytes: int) -> None:
        self.inflight_calls -= 1
        self.inflight_request_bytes -= request_bytes

    def _unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if type(request) is _Refused:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, request.message)
            request_bytes = self._enter()
            try:
                return await behavior(request, context)
            finally:
                self._leave(request_bytes)

        return unary

    def _streaming(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable:
        s = self._settings

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if type(request) is _Refused:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, request.message)
            request_bytes = self._enter()
            try:
                async for answer in behavior(request, context):
                    size = len(answer) if isinstance(answer, bytes) else 0
                    if self.pending_answer_bytes and (
                        self.pending_answer_bytes + size > s.max_pending_answer_bytes
                    ):
                        await context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the server holds {self.pending_answer_bytes} bytes of streamed "
                            "answers that clients have not read (max_pending_answer_bytes "
                            f"{s.max_pending_answer_bytes}); retry with backoff",
                        )
                    # gRPC resumes this generator once the answer is written, which waits for
                    # the client's flow-control window: a client that reads nothing stalls it.
                    stall = _cut_off_later(context, s.stream_stall_timeout_s)
                    self.pending_answer_bytes += size
                    try:
                        yield answer
                    finally:
                        self.pending_answer_bytes -= size
                        stall.cancel()
            finally:
                self._leave(request_bytes)

        return streaming


def _cut_off_later(context: grpc.aio.ServicerContext, seconds: float) -> asyncio.TimerHandle:
    """End the running call after ``seconds`` (unless the handle is cancelled first) with
    RESOURCE_EXHAUSTED, and stop its handler.

    The handler waits inside gRPC for the client's flow-control window. Cancelling its task
    alone would stop it without a word on the wire: gRPC takes a cancelled handler for a call
    the client cancelled, sends no status, and the client would wait forever. So the status is
    sent first, from a task of its own (the client receives it after what it has not read),
    and the handler is cancelled once that task has started.
    """
    handler = asyncio.current_task()
    message = (
        f"the client read nothing of this stream for {seconds:g} s "
        "(stream_stall_timeout_s); read faster or ask for smaller chunks"
    )

    async def send_status() -> None:
        with contextlib.suppress(grpc.aio.AbortError):  # abort ends by raising
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def stalled() -> None:
        logger.warning("a stream's client read nothing for %g s; cutting the call off", seconds)
        ending = asyncio.ensure_future(send_status())
        _ending_calls.add(ending)
        ending.add_done_callback(_ending_calls.discard)
        if handler is not None:  # after send_status's first step: the status goes out first
            asyncio.get_running_loop().call_soon(handler.cancel)

    return asyncio.get_running_loop().call_later(seconds, stalled)


# The status sends of cut-off calls, held while they wait to be flushed (the loop keeps only
# weak references to tasks).
_ending_calls: set[asyncio.Future] = set()


def _size_bounded(deserialize: Callable[[bytes], Any] | None, cap: int) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if len(data) > cap:
            raise ValueError(f"a message of {len(data)} bytes, over the limit of {cap} bytes")
        return data if deserialize is None else deserialize(data)

    return parse


def connection_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """gRPC's per-connection bounds: streams, pings, idle time and age."""
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    options = [
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # gRPC's backlog of calls the event loop has not taken up yet; past it gRPC ends new
        # calls CANCELLED. Its default is soft (1000, then random drops up to 3000); a fixed
        # bound also bounds the wait behind a full backlog (~0.4 s at 1024 on 2 cores).
        ("grpc.server.max_pending_requests", settings.max_waiting_calls),
        ("grpc.server.max_pending_requests_hard_limit", settings.max_waiting_calls),
        # Pings closer together than this, without data, are strikes; two strikes: GOAWAY.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(settings.min_ping_interval_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", ms(settings.max_connection_idle_s)),
    ]
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", ms(settings.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(settings.max_connection_age_grace_s)),
        ]
    return options
