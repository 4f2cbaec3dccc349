"""The one place that turns errors into gRPC status codes: ``map_errors``.

Everything the server rejects on purpose raises a ``vaeserve.errors.VaeServeError`` subclass
whose message names the field and what was expected. ``map_errors`` wraps every servicer
method (unary and server-streaming alike): it aborts with the class's status code and the
message; any other exception is logged with its traceback and becomes INTERNAL with a generic
message, so no stack text ever reaches a client. Servicer methods never call
``context.abort`` themselves.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from vaeserve.errors import InvalidRequest, VaeServeError
from vaeserve.server.handlers import MalformedRequest

__all__ = ["INTERNAL_MESSAGE", "status_of", "map_errors"]

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server logged the details"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for ``exc``.

    ``VaeServeError``s of a request's status keep their message; anything else (a bug, or a
    file or environment fault whose text may hold paths) gets INTERNAL with a generic message.
    """
    if isinstance(exc, VaeServeError) and exc.status != "INTERNAL":
        return grpc.StatusCode[exc.status], str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _check_parsed(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidRequest(request.message)


def _log_unexpected(method: Callable[..., Any], exc: BaseException) -> None:
    if not isinstance(exc, VaeServeError) or exc.status == "INTERNAL":
        logger.error("unexpected error in %s", method.__qualname__, exc_info=exc)


def map_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an async servicer method ``(self, request, context)`` with the status mapping.

    Works for coroutine methods (unary answers) and async generators (server streams).
    Cancellation is not an error: it propagates so that gRPC sees the call end.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> Any:
            try:
                _check_parsed(request)
                async for answer in method(self, request, context):
                    yield answer
                return
            except Exception as exc:  # noqa: BLE001 - the one place errors are mapped
                _log_unexpected(method, exc)
                code, message = status_of(exc)
            await context.abort(code, message)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            _check_parsed(request)
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the one place errors are mapped
            _log_unexpected(method, exc)
            code, message = status_of(exc)
        await context.abort(code, message)

    return unary_wrapper
