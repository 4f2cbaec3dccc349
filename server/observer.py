"""RequestObserver: the gRPC interceptor that counts, times and logs every RPC once.

It sits outermost, so it also sees calls that the auth interceptor turns away. Each call adds
to the request counters and the latency histogram under (rpc, model, status code); each call
that ends with a status other than OK gets exactly one log line, with structured fields.
The model label comes from the request, passed through ``model_label`` so that made-up names
cannot grow the number of series without bound.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import grpc

from vaeserve.server.handlers import DetachedRequest, WrappedHandlers, rewrapped
from vaeserve.server.metrics import ServerMetrics

__all__ = ["CLIENT_CODES", "RequestObserver", "UNKNOWN_MODEL", "model_name_of", "report_call"]

logger = logging.getLogger(__name__)

UNKNOWN_MODEL = "_unknown"
# Where requests name their model: ModelInfer; typed API; SampleStream; other OIP RPCs.
_NAME_PATHS = (("model_name",), ("model", "name"), ("request", "model", "name"), ("name",))
# Failures that are the caller's doing are routine; the others need an operator's eye.
CLIENT_CODES = frozenset(
    {"CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "DEADLINE_EXCEEDED",
     "RESOURCE_EXHAUSTED", "PERMISSION_DENIED"}
)  # fmt: skip


def model_name_of(request: Any) -> str:
    """The model a request names, or "" if it names none (health, ServerLive, ListModels)."""
    key = (type(request), type(request.message)) if type(request) is DetachedRequest else (
        type(request)
    )  # fmt: skip
    path = _PATH_OF_TYPE.get(key, _UNSEEN)
    if path is not _UNSEEN:
        value = _follow(request, path) if path else None
        return value if isinstance(value, str) else ""
    for path in _NAME_PATHS:
        value = _follow(request, path)
        if isinstance(value, str):
            if len(_PATH_OF_TYPE) < _TYPES_KEPT:
                _PATH_OF_TYPE[key] = path
            return value
    if len(_PATH_OF_TYPE) < _TYPES_KEPT:
        _PATH_OF_TYPE[key] = ()
    return ""


# Where each request type names its model (which of _NAME_PATHS; () for none): a protobuf
# type's fields are the same for every request, and a failed getattr costs an exception.
_PATH_OF_TYPE: dict[Any, tuple[str, ...]] = {}
_STREAMED: dict[type, bool] = {}  # whether a request type is a client stream
_TYPES_KEPT = 256
_UNSEEN = object()


def _follow(value: Any, path: tuple[str, ...]) -> Any:
    try:
        for attr in path:
            value = getattr(value, attr)
    except AttributeError:
        return None
    return value


class RequestObserver(grpc.aio.ServerInterceptor):
    """Counts, times and (on failure) logs each call; passes everything else through."""

    def __init__(self, metrics: ServerMetrics, model_label: Callable[[str], str] = str):
        """Args:
        metrics: where counts and latencies go.
        model_label: maps a requested name to its label (e.g. unknown names to one label).
        """
        self._metrics = metrics
        self._model_label = model_label
        # The inner handlers are built once per method (RequestLimits), so one wrapped
        # handler serves every call.
        self._wrapped = WrappedHandlers(self._wrap)

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
        rpc = method.rsplit("/", 1)[-1]
        return rewrapped(handler, partial(self._unary, rpc), partial(self._stream, rpc))

    def _unary(self, rpc: str, inner: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            failure: str | None = None
            try:
                answer = inner(request, context)
                return await answer if inspect.isawaitable(answer) else answer
            except asyncio.CancelledError:
                failure = _code(context) or "CANCELLED"  # a code: the server ended it (a bound)
                raise
            except BaseException:
                failure = _code(context) or "UNKNOWN"
                raise
            finally:
                self._record(rpc, request, context, failure, start)

        return observed

    def _stream(self, rpc: str, inner: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            failure: str | None = None
            try:
                answers = inner(request, context)
                if inspect.isasyncgen(answers):
                    async for answer in answers:
                        yield answer
                else:
                    for answer in answers:
                        yield answer
            except (asyncio.CancelledError, GeneratorExit):
                failure = _code(context) or "CANCELLED"  # a code: the server ended it (a bound)
                raise
            except BaseException:
                failure = _code(context) or "UNKNOWN"
                raise
            finally:
                self._record(rpc, request, context, failure, start)

        return observed

    def _record(
        self, rpc: str, request: Any, context: grpc.aio.ServicerContext, failure: str | None,
        start: float,
    ) -> None:  # fmt: skip
        latency = time.perf_counter() - start
        code = failure or _code(context) or "OK"
        streamed = _STREAMED.get(type(request))
        if streamed is None:  # a client stream names no model; hasattr costs an exception
            streamed = inspect.isasyncgen(request) or hasattr(request, "__aiter__")
            if len(_STREAMED) < _TYPES_KEPT:
                _STREAMED[type(request)] = streamed
        requested = "" if streamed else model_name_of(request)
        model = self._model_label(requested) if requested else ""
        report_call(self._metrics, rpc, model, code, latency, lambda: _details(context))


def report_call(
    metrics: ServerMetrics, rpc: str, model: str, code: str, latency_s: float,
    details: Callable[[], str], transport: str | None = None,
) -> None:  # fmt: skip
    """Count one call; log it once if it failed (``details()`` is read only then).

    Args:
        transport: named in the log line when not gRPC ("rest").
    """
    metrics.observe_request(rpc, model, code, latency_s)
    if code == "OK":
        return
    message = details()
    level = logging.INFO if code in CLIENT_CODES else logging.WARNING
    extra = {"event": "rpc_failed", "rpc": rpc, "model": model, "code": code,
             "latency_ms": round(latency_s * 1000.0, 3), "details": message}  # fmt: skip
    text = "rpc failed: rpc=%s model=%s code=%s latency_ms=%.2f message=%r"
    if transport is not None:
        text += f" transport={transport}"
        extra["transport"] = transport
    logger.log(level, text, rpc, model, code, latency_s * 1000.0, message, extra=extra)


def _code(context: grpc.aio.ServicerContext) -> str | None:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - a context without a code yet
        return None
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return grpc.StatusCode(code).name if isinstance(code, tuple) else str(code)


def _details(context: grpc.aio.ServicerContext) -> str:
    try:
        details = context.details()
    except Exception:  # noqa: BLE001 - a context without details
        return ""
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details or ""
